"""Length bucketing: every prompt in one batch, longest first, few distinct shapes."""

import pytest

from longflow_jax import bucketing


def test_plan_batches_buckets_by_length_and_pads_rows_to_the_devices():
    lengths = [5, 190, 17, 16, 40, 33, 1, 120, 16, 16, 16]
    batches = bucketing.plan_batches(lengths, batch_size=4, num_devices=2, max_prompt_len=200)
    covered = sorted(i for b in batches for i in b.indices)
    assert covered == list(range(len(lengths)))
    for b in batches:
        assert b.rows % 2 == 0 and len(b.indices) <= b.rows <= 4
        assert all(lengths[i] <= b.prompt_len for i in b.indices)
        assert b.prompt_len in (16, 32, 64, 128, 200)  # powers of two >= 16, capped at the limit
        assert b.prompt_len == bucketing.bucket_length(max(lengths[i] for i in b.indices), 200)
    flat = [lengths[i] for b in batches for i in b.indices]
    assert flat == sorted(flat, reverse=True)  # longest first
    with pytest.raises(ValueError, match="longer than"):
        bucketing.plan_batches([201], 4, 1, 200)


def test_plan_batches_bounds_the_number_of_shapes():
    lengths = [(7 * i) % 500 + 1 for i in range(1000)]
    batches = bucketing.plan_batches(lengths, batch_size=16, num_devices=4, max_prompt_len=512)
    shapes = {(b.rows, b.prompt_len) for b in batches}
    assert {rows for rows, _ in shapes} <= {4, 8, 16}
    assert len({p for _, p in shapes}) <= 6  # 16 .. 512
