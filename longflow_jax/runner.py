"""The batch loop of `longflow-batch` and `longflow-eval`: tokenise records, bucket them, generate data
parallel over this process's devices, and yield each batch's texts.

`generate` runs under `shard_map` over a 1-D "data" mesh (params replicated, batch sharded): each device
decodes its own rows with no communication and stops when they are done, where automatic partitioning
would all-gather the new keys/values every step and loop until the slowest row anywhere stops. A batch
is padded with copies of its first row, which stop with it and so never lengthen the loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .bucketing import Batch, plan_batches, round_up
from .config import CompressionConfig, SamplingConfig, dtype_from_name
from .jsonl_io import Record, Skipped, id_key


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    """The flags every generating command shares: the cache layout, the kernel and the sampling."""
    p.add_argument("--granularity", default="sequence", choices=["sequence", "kv_head"])
    p.add_argument("--attention-impl", default="reference", choices=["reference", "pallas", "triton"])
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The flags of the JSONL commands (longflow-batch, longflow-eval)."""
    p.add_argument("--ckpt", required=True, help="a converted checkpoint directory (longflow-convert)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    add_decoding_args(p)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (per process)")
    p.add_argument("--devices", type=int, default=None, help="use the first N local devices (default all)")
    p.add_argument("--dtype", default=None, help="cast the params on load, e.g. bfloat16")
    p.add_argument(
        "--chat-template-kwargs",
        type=json.loads,
        default={},
        help="JSON object passed to apply_chat_template, e.g. '{\"enable_thinking\": false}'",
    )
    p.add_argument("--no-chat-template", action="store_true", help="tokenize plain prompts raw")
    p.add_argument("--strict", action="store_true", help="fail on any input record that would be skipped")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# The least value of each integer flag, by argparse dest; a flag a command lacks (or leaves None) is skipped.
MIN_VALUES = {
    "max_new_tokens": 1,
    "batch_size": 1,
    "budget": 2,  # one slot is the new token's
    "devices": 1,
    "seed": 0,
    "top_k": 0,
    "limit": 1,
    "batch": 1,
    "prompt_len": 1,
}


def check_args(args) -> None:
    """Every flag of a generating command, before anything is loaded: ValueError naming the flag, its
    value and what is expected."""
    for name, least in MIN_VALUES.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    kwargs = getattr(args, "chat_template_kwargs", {})
    if not isinstance(kwargs, dict):
        raise ValueError(f"--chat-template-kwargs must be a JSON object, got {kwargs!r}")
    if getattr(args, "dtype", None) is not None:
        dtype_from_name(args.dtype)
    if getattr(args, "ckpt", None) is not None:
        from .convert import incomplete_reason

        # Before the tokenizer, which would take a missing path for a hub name.
        reason = incomplete_reason(os.path.abspath(args.ckpt))
        if reason:
            raise ValueError(
                f"--ckpt {args.ckpt!r}: {reason} (convert a Hugging Face directory with "
                f"`longflow-convert HF_DIR OUT_DIR`)"
            )


def sampling_from(args) -> SamplingConfig:
    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def compression_from(args) -> CompressionConfig:
    return CompressionConfig(policy=args.policy, budget=args.budget, granularity=args.granularity)


def report(message: str, prog: str) -> None:
    print(f"{prog}: {message}", file=sys.stderr, flush=True)


def handle_skipped(skipped: list[Skipped], source: str, strict: bool, prog: str) -> None:
    for s in skipped:
        report(f"{source}: {'error' if strict else 'skipped'}: {s}", prog)
    if strict and skipped:
        raise ValueError(f"{len(skipped)} input record(s) cannot be generated for (--strict)")


def cli_main(run: Callable, parser: argparse.ArgumentParser, prog: str, argv=None) -> int:
    """Parse, run; a bad input or an I/O error is one line on stderr and exit status 2."""
    try:
        run(parser.parse_args(argv))
    except (ValueError, OSError) as e:
        report(f"error: {e}", prog)
        return 2
    return 0


@dataclasses.dataclass(frozen=True)
class Completion:
    prompt_tokens: int
    tokens: list[int]  # generated ids, the EOS included when there is one
    finish_reason: str  # "stop" (EOS), "length" (max_new_tokens), "error" (NaN/inf logits: tokens stop)
    text: str  # the tokens decoded, special tokens skipped


def finish_reason(tokens: Sequence[int], eos_token_ids: Sequence[int], nonfinite: bool = False) -> str:
    if nonfinite:
        return "error"
    return "stop" if len(tokens) and int(tokens[-1]) in set(eos_token_ids) else "length"


def warn_errors(names: Sequence, prog: str) -> None:
    """names: the rows (ids) whose completion has finish_reason "error"."""
    if names:
        report(
            f"warning: the logits became NaN/inf for {len(names)} row(s) {list(names)}: their output "
            f"stops there, with finish_reason 'error' (check the checkpoint's weights and --dtype)",
            prog,
        )


class DataParallelGenerator:
    """A converted checkpoint, replicated over a 1-D "data" mesh of this process's devices."""

    def __init__(self, ckpt_dir: str, *, num_devices: int | None = None, dtype: str | None = None):
        from transformers import AutoTokenizer

        from .convert import load

        devices = jax.local_devices()
        num_devices = len(devices) if num_devices is None else num_devices
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"--devices must be in [1, {len(devices)}], got {num_devices}")
        self.mesh = Mesh(np.asarray(devices[:num_devices]), ("data",))
        config, self.params = load(ckpt_dir, dtype=dtype, sharding=NamedSharding(self.mesh, P()))
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
        # Chat models end a turn with the tokenizer's eos (e.g. <|im_end|>), which config.json may lack.
        eos = config.eos_token_ids
        if self.tokenizer.eos_token_id is not None:
            eos = tuple(dict.fromkeys((*eos, int(self.tokenizer.eos_token_id))))
        self.config = config.replace(eos_token_ids=eos)
        self._runs = {}

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def _compiled(self, **options):
        """One jitted shard_map of generate(**options) per option set; jit caches one per batch shape."""
        from .generate import generate

        setting = tuple(sorted(options.items()))
        if setting not in self._runs:

            def per_device(params, ids, lengths, key):
                key = jax.random.fold_in(key, jax.lax.axis_index("data"))  # independent draws per device
                return generate(params, self.config, ids, lengths, seed=key, **options)

            specs = dict(in_specs=(P(), P("data"), P("data"), P()), out_specs=P("data"))
            self._runs[setting] = jax.jit(jax.shard_map(per_device, mesh=self.mesh, check_vma=False, **specs))
        return self._runs[setting]

    def generate(
        self, prompts: Sequence[Sequence[int]], prompt_len: int, rows: int, *, seed: int = 0, **options
    ) -> list[Completion]:
        """Generate for len(prompts) <= rows token lists, padded to [rows, prompt_len]. options:
        generate()'s max_new_tokens, compression, sampling and attention_impl, all required."""
        from .generate import check_generate_inputs

        if not 1 <= len(prompts) <= rows or rows % self.num_devices:
            raise ValueError(f"{len(prompts)} prompts in {rows} rows over {self.num_devices} devices")
        padded = list(prompts) + [prompts[0]] * (rows - len(prompts))
        ids = np.full((rows, prompt_len), self.config.pad_token_id, np.int32)
        for r, p in enumerate(padded):
            ids[r, : len(p)] = p
        lengths = np.asarray([len(p) for p in padded], np.int32)
        # The value checks generate() skips under shard_map, where it sees tracers.
        check_generate_inputs(self.config, ids, lengths, **options)
        ids, lengths = jax.device_put((ids, lengths), NamedSharding(self.mesh, P("data")))
        out = self._compiled(**options)(self.params, ids, lengths, jax.random.PRNGKey(seed))
        tokens, counts, bad = np.asarray(out.tokens), np.asarray(out.lengths), np.asarray(out.nonfinite)
        eos, decode = self.config.eos_token_ids, self.tokenizer.decode
        completions = []
        for r, p in enumerate(prompts):
            new = tokens[r, : counts[r]].tolist()
            reason = finish_reason(new, eos, bool(bad[r]))
            completions.append(Completion(len(p), new, reason, decode(new, skip_special_tokens=True)))
        return completions


def encode(tokenizer, kind: str, content, chat_template: bool, template_kwargs: dict) -> list[int]:
    """Token ids of a prompt. Messages always go through the chat template; a plain prompt does too
    (as one user message) unless chat_template=False, then it is tokenized raw with the tokenizer's
    special tokens (a BOS where the model wants one)."""
    if kind == "prompt" and not chat_template:
        return list(tokenizer(content, add_special_tokens=True)["input_ids"])
    messages = content if kind == "messages" else [{"role": "user", "content": content}]
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **template_kwargs
    )
    # The template writes the special tokens (BOS included) itself.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclasses.dataclass(frozen=True)
class Plan:
    records: list[Record]  # those to generate for
    prompts: list[list[int]]  # their token ids
    batches: list[Batch]
    skipped: list[Skipped]  # records dropped while tokenising


def make_plan(
    generator: DataParallelGenerator, records: list[Record], args, prog: str, prompt_of=None
) -> Plan:
    """Tokenise records and bucket them. A failing chat template, an empty prompt or one longer than
    the model allows drops the record, reported (and fatal with --strict). prompt_of(record) ->
    ("prompt", text) or ("messages", list); default: the record's data."""
    prompt_of = prompt_of or (lambda r: r.data)
    tokenizer, chat_template = generator.tokenizer, not args.no_chat_template
    limit = generator.config.max_position_embeddings - args.max_new_tokens
    if limit < 1:
        raise ValueError(
            f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt: the model's "
            f"max_position_embeddings is {generator.config.max_position_embeddings}"
        )
    if not tokenizer.chat_template and any(chat_template or prompt_of(r)[0] == "messages" for r in records):
        raise ValueError(
            "the checkpoint's tokenizer has no chat template: 'messages' records cannot be formatted "
            "(pass --no-chat-template to feed plain 'prompt' records raw)"
        )
    kept, prompts, skipped = [], [], []
    for r in records:
        try:
            tokens = encode(tokenizer, *prompt_of(r), chat_template, args.chat_template_kwargs)
        except Exception as e:  # a template that raises on this record's messages (jinja errors vary)
            skipped.append(Skipped(r.line, r.id, f"chat template failed: {e}"))
            continue
        if not tokens:
            skipped.append(Skipped(r.line, r.id, "the prompt is empty (0 tokens)"))
        elif len(tokens) > limit:
            reason = (
                f"prompt of {len(tokens)} tokens is longer than the model allows with this "
                f"max_new_tokens ({limit} = max_position_embeddings - max_new_tokens)"
            )
            skipped.append(Skipped(r.line, r.id, reason))
        else:
            kept.append(r)
            prompts.append(tokens)
    handle_skipped(skipped, args.input, args.strict, prog)
    n = generator.num_devices
    batches = plan_batches([len(p) for p in prompts], round_up(args.batch_size, n), n, limit)
    return Plan(kept, prompts, batches, skipped)


def batch_seed(seed: int, first_id) -> int:
    """Sampling is seeded per batch from its first id: a rerun of the same batch draws the same."""
    return (seed * 1_000_003 + zlib.crc32(id_key(first_id).encode())) % (2**31)


def generate_batches(
    generator: DataParallelGenerator, plan: Plan, args, compression: CompressionConfig, prog: str
) -> Iterator[tuple[float, list[tuple[Record, Completion]]]]:
    """Yield (seconds, [(record, completion)]) per batch of plan, in order; seconds is its wall time,
    compile included on a new shape. Rows whose logits became non-finite are reported on stderr."""
    for b in plan.batches:
        start = time.perf_counter()
        completions = generator.generate(
            [plan.prompts[i] for i in b.indices],
            b.prompt_len,
            b.rows,
            max_new_tokens=args.max_new_tokens,
            compression=compression,
            sampling=sampling_from(args),
            attention_impl=args.attention_impl,
            seed=batch_seed(args.seed, plan.records[b.indices[0]].id),
        )
        seconds = time.perf_counter() - start
        warn_errors(
            [plan.records[i].id for i, c in zip(b.indices, completions) if c.finish_reason == "error"], prog
        )
        yield seconds, [(plan.records[i], c) for i, c in zip(b.indices, completions)]
