"""Batches of prompts with few distinct shapes, so `generate` compiles only a handful of times.

Prompts are sorted by token count (longest first, so memory trouble shows up at once) and cut into
batches within a length bucket. A batch's prompt padding is the next power of two >= its longest prompt
(at least MIN_BUCKET, at most what the model allows), and its row count the next power of two of its
prompt count (at most batch_size, rounded up to the device count): at most (number of buckets) x
(log2(batch_size) + 1) shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

MIN_BUCKET = 16  # smallest prompt padding: short prompts share one shape


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Batch:
    indices: tuple[int, ...]  # into the prompt list, longest first
    prompt_len: int  # padded prompt length
    rows: int  # padded batch size, a multiple of the device count


def bucket_length(n: int, max_prompt_len: int) -> int:
    return min(max(MIN_BUCKET, next_pow2(n)), max_prompt_len)


def plan_batches(
    lengths: Sequence[int], batch_size: int, num_devices: int, max_prompt_len: int
) -> list[Batch]:
    """Sort prompts by length (longest first), cut batches of <= batch_size within each length bucket."""
    if batch_size < 1 or num_devices < 1:
        raise ValueError(f"batch_size and num_devices must be >= 1, got {batch_size}, {num_devices}")
    if any(n > max_prompt_len for n in lengths):
        raise ValueError(f"a prompt is longer than max_prompt_len {max_prompt_len}")
    buckets: dict[int, list[int]] = {}
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        buckets.setdefault(bucket_length(lengths[i], max_prompt_len), []).append(i)
    batches = []
    for prompt_len, members in buckets.items():
        for start in range(0, len(members), batch_size):
            chunk = tuple(members[start : start + batch_size])
            rows = round_up(min(next_pow2(len(chunk)), batch_size), num_devices)
            batches.append(Batch(chunk, prompt_len, rows))
    return batches
