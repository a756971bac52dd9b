"""`longflow-batch`: generate for a JSONL file of prompts, data parallel over the local devices, resumably.

Input, one JSON object a line: {"id": ..., "prompt": "text"} or {"id": ..., "messages": [chat messages]}.
Output, one line per prompt, appended batch by batch:
  {"id", "text", "prompt_tokens", "completion_tokens", "finish_reason": "stop"|"length", "seconds"}
("seconds": wall time of the batch the prompt was generated in, compile included on a new shape).

Data parallel: one `jax.sharding.Mesh` over this process's devices with a "data" axis; the batch axis is
sharded over it (NamedSharding(mesh, P("data"))) and the params are replicated (P()). `generate` runs
under `shard_map`, so each device decodes its own rows with no communication at all (automatic
partitioning of the jitted loop all-gathers the new keys/values for the cache scatter every step and
keeps every device looping until the slowest row anywhere stops). Each batch is padded with copies of
its first row up to a multiple of the device count (dropped from the output; greedy copies stop when
that row stops, so they never lengthen the loop).

Shapes: prompts are sorted by token count (longest first, so memory trouble shows up at once) and cut
into batches within a length bucket. A batch's prompt padding is the next power of two >= its longest
prompt (at least MIN_BUCKET, at most what the model allows), and its row count the next power of two of
its prompt count (at most --batch-size, rounded up to the device count), so one run compiles `generate`
for at most (number of buckets) x (log2(batch size) + 1) shapes.

Resuming: ids already present in the output are skipped. Each batch's lines are written with one
write, flush and fsync, so a crash loses at most the batch in flight; a partial last line left by a
crash mid-write is truncated on the next run.

Multi-host (--distributed): `jax.distributed.initialize()`, then every process reads the whole input,
takes records k with k % process_count == process_index (k counts the valid records in file order) and
runs them on its own devices with no cross-host communication (hosts never wait for each other; a slow or
restarted host holds up nobody). Process i of n appends to OUT.i-of-n.jsonl (for OUT.jsonl); a run reads
the ids done in the plain output and in every OUT.*-of-*.jsonl next to it, so a resume with another
number of hosts does not redo finished prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .config import POLICIES, CompressionConfig, SamplingConfig

PROG = "longflow-batch"
MIN_BUCKET = 16  # smallest prompt padding: short prompts share one shape


class InputError(ValueError):
    """--strict and the input had records that cannot be generated for."""


# ----------------------------------------------------------------------------------------- input


@dataclasses.dataclass(frozen=True)
class Skipped:
    """An input record that was not generated for, and why."""

    line: int
    id: Any
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" (id {self.id!r})" if self.id is not None else "")
        return f"{where}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class Record:
    line: int
    id: Any
    data: Any  # what the validator made of the JSON object


def id_key(record_id) -> str:
    """Ids compare by their JSON text: 1 and "1" are different ids."""
    return json.dumps(record_id, sort_keys=True)


def read_jsonl_records(
    path: str, validate: Callable[[dict], Any], id_field: str = "id", id_from_line: bool = False
):
    """Parse a JSONL file: returns (records in file order, skipped).

    validate(obj) returns the record's data or raises ValueError with the reason. Blank lines are not
    records. Bad JSON, a non-object, a missing/null id (unless id_from_line: then the line number is
    the id), a failed validation and a repeated id (its second and later occurrences) are skipped, each
    with its 1-based line number.
    """
    records, skipped, seen = [], [], set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.append(Skipped(number, None, f"bad JSON ({e.msg} at column {e.colno})"))
                continue
            if not isinstance(obj, dict):
                skipped.append(Skipped(number, None, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            record_id = obj.get(id_field)
            if record_id is None and id_from_line:
                record_id = number
            if record_id is None:
                skipped.append(Skipped(number, None, f"missing {id_field!r}"))
                continue
            if not isinstance(record_id, str | int) or isinstance(record_id, bool):
                skipped.append(Skipped(number, record_id, f"{id_field!r} must be a string or an integer"))
                continue
            try:
                data = validate(obj)
            except ValueError as e:
                skipped.append(Skipped(number, record_id, str(e)))
                continue
            key = id_key(record_id)
            if key in seen:
                skipped.append(Skipped(number, record_id, "duplicate id (an earlier line has it)"))
                continue
            seen.add(key)
            records.append(Record(number, record_id, data))
    return records, skipped


def validate_prompt_record(obj: dict):
    """{"prompt": str} -> ("prompt", str); {"messages": [...]} -> ("messages", list)."""
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise ValueError("needs exactly one of 'prompt' and 'messages'")
    if has_prompt:
        if not isinstance(obj["prompt"], str):
            raise ValueError(f"'prompt' must be a string, got {type(obj['prompt']).__name__}")
        return ("prompt", obj["prompt"])
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")
    return ("messages", messages)


# ---------------------------------------------------------------------------------------- output


def output_path(path: str, process_index: int, process_count: int) -> str:
    """OUT.jsonl for a single process; OUT.i-of-n.jsonl for process i of n."""
    if process_count == 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}.{process_index}-of-{process_count}{ext}"


def sibling_outputs(path: str) -> list[str]:
    """The plain output and every per-process output of any process count, those that exist."""
    stem, ext = os.path.splitext(path)
    found = sorted(glob.glob(f"{glob.escape(stem)}.*-of-*{glob.escape(ext)}"))
    return ([path] if os.path.isfile(path) else []) + [p for p in found if p != path]


def done_ids(path: str, truncate: bool) -> tuple[set[str], list[str]]:
    """Ids (id_key) already written to `path`, and notes on what was repaired.

    A last line without its newline is a write cut short by a crash: with truncate=True (the file this
    process appends to) it is cut off the file, otherwise (another host's file, maybe being written
    right now) it is ignored.
    """
    ids, notes = set(), []
    if not os.path.isfile(path):
        return ids, notes
    with open(path, "rb") as f:
        content = f.read()
    end = content.rfind(b"\n") + 1
    if end < len(content):
        if truncate:
            with open(path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
            notes.append(f"{path}: truncated a partial last line ({len(content) - end} bytes)")
    for number, line in enumerate(content[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            ids.add(id_key(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            notes.append(f"{path}:{number}: unreadable output line ignored (its prompt will be redone)")
    return ids, notes


def append_lines(f, rows: Sequence[dict]) -> None:
    """All of a batch's rows in one write, then flush and fsync: a crash leaves whole lines only."""
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


# -------------------------------------------------------------------------------------- batching


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
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: dict[int, list[int]] = {}
    for i in order:
        buckets.setdefault(bucket_length(lengths[i], max_prompt_len), []).append(i)
    batches = []
    for prompt_len, members in buckets.items():
        for start in range(0, len(members), batch_size):
            chunk = tuple(members[start : start + batch_size])
            rows = round_up(min(next_pow2(len(chunk)), batch_size), num_devices)
            batches.append(Batch(chunk, prompt_len, rows))
    return batches


# ------------------------------------------------------------------------------------ generation


@dataclasses.dataclass(frozen=True)
class Completion:
    tokens: list[int]  # generated ids, the EOS included when there is one
    finish_reason: str  # "stop" (an EOS id ended it) or "length" (max_new_tokens)


def finish_reason(tokens: Sequence[int], eos_token_ids: Sequence[int]) -> str:
    return "stop" if len(tokens) and int(tokens[-1]) in set(eos_token_ids) else "length"


class DataParallelGenerator:
    """A converted checkpoint, replicated over a 1-D "data" mesh of this process's devices."""

    def __init__(self, ckpt_dir: str, *, num_devices: int | None = None, dtype: str | None = None):
        from transformers import AutoTokenizer

        from .convert import load

        devices = jax.local_devices()
        if num_devices is not None:
            if not 1 <= num_devices <= len(devices):
                raise ValueError(f"--devices must be in [1, {len(devices)}], got {num_devices}")
            devices = devices[:num_devices]
        self.mesh = Mesh(np.asarray(devices), ("data",))
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
        config, self.params = load(ckpt_dir, dtype=dtype, sharding=NamedSharding(self.mesh, P()))
        # Chat models end a turn with the tokenizer's eos (e.g. <|im_end|>), which config.json may lack.
        eos = config.eos_token_ids
        if self.tokenizer.eos_token_id is not None:
            eos = tuple(dict.fromkeys((*eos, int(self.tokenizer.eos_token_id))))
        self.config = config.replace(eos_token_ids=eos)
        self._runs = {}

    def _compiled(self, max_new_tokens, compression, sampling, attention_impl):
        """generate() per device on its rows (shard_map): no communication between devices at all,
        and each device's decode loop stops when its own rows are done. One jitted function per
        setting (jit then caches one executable per batch shape)."""
        from .generate import generate

        setting = (max_new_tokens, compression, sampling, attention_impl)
        if setting in self._runs:
            return self._runs[setting]

        def per_device(params, ids, lengths, key):
            key = jax.random.fold_in(key, jax.lax.axis_index("data"))  # independent draws per device
            return generate(
                params,
                self.config,
                ids,
                lengths,
                max_new_tokens=max_new_tokens,
                compression=compression,
                sampling=sampling,
                attention_impl=attention_impl,
                seed=key,
            )

        self._runs[setting] = jax.jit(
            jax.shard_map(
                per_device,
                mesh=self.mesh,
                in_specs=(P(), P("data"), P("data"), P()),
                out_specs=P("data"),
                check_vma=False,
            )
        )
        return self._runs[setting]

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        prompt_len: int,
        rows: int,
        *,
        max_new_tokens: int,
        compression: CompressionConfig,
        sampling: SamplingConfig,
        attention_impl: str = "reference",
        seed: int = 0,
    ) -> list[Completion]:
        """Generate for len(prompts) <= rows token lists, padded to [rows, prompt_len]."""
        from .generate import check_generate_inputs

        if not 1 <= len(prompts) <= rows or rows % self.num_devices:
            raise ValueError(f"{len(prompts)} prompts in {rows} rows over {self.num_devices} devices")
        padded = list(prompts) + [prompts[0]] * (rows - len(prompts))
        ids = np.full((rows, prompt_len), self.config.pad_token_id, np.int32)
        for r, p in enumerate(padded):
            ids[r, : len(p)] = p
        lengths = np.asarray([len(p) for p in padded], np.int32)
        # The value checks generate() skips under shard_map, where it sees tracers.
        check_generate_inputs(
            self.config, ids, lengths, max_new_tokens, compression, sampling, attention_impl
        )
        run = self._compiled(max_new_tokens, compression, sampling, attention_impl)
        out = run(
            self.params,
            jax.device_put(ids, self.batch_sharding),
            jax.device_put(lengths, self.batch_sharding),
            jax.random.PRNGKey(seed),
        )
        tokens, counts = np.asarray(out.tokens), np.asarray(out.lengths)
        done = []
        for r in range(len(prompts)):
            row = tokens[r, : counts[r]].tolist()
            done.append(Completion(row, finish_reason(row, self.config.eos_token_ids)))
        return done


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


def encode_records(tokenizer, records, chat_template, template_kwargs, max_prompt_len, prompt_of=None):
    """Returns (records kept, their token ids, skipped: template errors, empty and too-long prompts).

    prompt_of(record) -> ("prompt", text) or ("messages", list); default: the record's data.
    """
    prompt_of = prompt_of or (lambda r: r.data)
    needs_template = any(chat_template or prompt_of(r)[0] == "messages" for r in records)
    if needs_template and not tokenizer.chat_template:
        raise ValueError(
            "the checkpoint's tokenizer has no chat template: 'messages' records cannot be formatted "
            "(pass --no-chat-template to feed plain 'prompt' records raw)"
        )
    kept, ids, skipped = [], [], []
    for r in records:
        try:
            tokens = encode(tokenizer, *prompt_of(r), chat_template, template_kwargs)
        except Exception as e:  # a template that raises on this record's messages (jinja errors vary)
            skipped.append(Skipped(r.line, r.id, f"chat template failed: {e}"))
            continue
        if not tokens:
            skipped.append(Skipped(r.line, r.id, "the prompt is empty (0 tokens)"))
        elif len(tokens) > max_prompt_len:
            skipped.append(
                Skipped(
                    r.line,
                    r.id,
                    f"prompt of {len(tokens)} tokens is longer than the model allows with this "
                    f"max_new_tokens ({max_prompt_len} = max_position_embeddings - max_new_tokens)",
                )
            )
        else:
            kept.append(r)
            ids.append(tokens)
    return kept, ids, skipped


def batch_seed(seed: int, first_id) -> int:
    """Sampling is seeded per batch from its first id: a rerun of the same batch draws the same."""
    return (seed * 1_000_003 + zlib.crc32(id_key(first_id).encode())) % (2**31)


def generate_batches(generator, records, prompts, batches, *, seed: int, **generate_kwargs):
    """Yield (batch, completions, seconds) for each planned batch, in order."""
    for b in batches:
        start = time.perf_counter()
        completions = generator.generate(
            [prompts[i] for i in b.indices],
            b.prompt_len,
            b.rows,
            seed=batch_seed(seed, records[b.indices[0]].id),
            **generate_kwargs,
        )
        yield b, completions, time.perf_counter() - start


# ------------------------------------------------------------------------------------------- CLI


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Options shared with longflow-eval."""
    p.add_argument("--ckpt", required=True, help="a converted checkpoint directory (longflow-convert)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--granularity", default="sequence", choices=["sequence", "kv_head"])
    p.add_argument("--attention-impl", default="reference", choices=["reference", "pallas", "triton"])
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (per process)")
    p.add_argument("--devices", type=int, default=None, help="use the first N local devices (default all)")
    p.add_argument("--dtype", default=None, help="cast the params on load, e.g. bfloat16")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--chat-template-kwargs",
        type=json.loads,
        default={},
        help="JSON object passed to apply_chat_template, e.g. '{\"enable_thinking\": false}'",
    )
    p.add_argument("--strict", action="store_true", help="fail on any input record that would be skipped")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help='JSONL: {"id", "prompt"} or {"id", "messages"} per line')
    p.add_argument("--output", required=True, help="JSONL results, appended to (resumable)")
    add_generation_args(p)
    p.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: jax.distributed.initialize(), then each process takes its share of the input",
    )
    p.add_argument("--policy", default="longflow", choices=POLICIES)
    p.add_argument("--budget", type=int, default=2048, help="KV slots per layer per sequence")
    p.add_argument("--no-chat-template", action="store_true", help="tokenize 'prompt' records raw")
    return p


def sampling_from(args) -> SamplingConfig:
    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def start_processes(args) -> tuple[int, int]:
    if args.distributed:
        jax.distributed.initialize()
    return jax.process_index(), jax.process_count()


def report(message: str, prog: str = PROG) -> None:
    print(f"{prog}: {message}", file=sys.stderr, flush=True)


def check_args(args) -> None:
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not isinstance(args.chat_template_kwargs, dict):
        raise ValueError(f"--chat-template-kwargs must be a JSON object, got {args.chat_template_kwargs!r}")


def max_prompt_len(config, max_new_tokens: int) -> int:
    limit = config.max_position_embeddings - max_new_tokens
    if limit < 1:
        raise ValueError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt: the model's "
            f"max_position_embeddings is {config.max_position_embeddings}"
        )
    return limit


def handle_skipped(skipped: list[Skipped], source: str, strict: bool, prog: str = PROG) -> None:
    for s in skipped:
        report(f"{source}: {'error' if strict else 'skipped'}: {s}", prog)
    if strict and skipped:
        raise InputError(f"{len(skipped)} input record(s) cannot be generated for (--strict)")


def run(args) -> dict:
    from tqdm import tqdm

    check_args(args)
    compression = CompressionConfig(policy=args.policy, budget=args.budget, granularity=args.granularity)
    sampling = sampling_from(args)
    process_index, process_count = start_processes(args)
    out_path = output_path(args.output, process_index, process_count)

    records, skipped = read_jsonl_records(args.input, validate_prompt_record)
    handle_skipped(skipped, args.input, args.strict)
    records = records[process_index::process_count]
    done, notes = set(), []
    for path in sibling_outputs(out_path):
        ids, path_notes = done_ids(path, truncate=path == out_path)
        done |= ids
        notes += path_notes
    for note in notes:
        report(note)
    todo = [r for r in records if id_key(r.id) not in done]

    generator = DataParallelGenerator(args.ckpt, num_devices=args.devices, dtype=args.dtype)
    limit = max_prompt_len(generator.config, args.max_new_tokens)
    todo, prompts, too_long = encode_records(
        generator.tokenizer, todo, not args.no_chat_template, args.chat_template_kwargs, limit
    )
    handle_skipped(too_long, args.input, args.strict)
    skipped += too_long

    batch_size = round_up(args.batch_size, generator.num_devices)
    batches = plan_batches([len(p) for p in prompts], batch_size, generator.num_devices, limit)
    shapes = sorted({(b.rows, b.prompt_len) for b in batches}, reverse=True)
    report(
        f"process {process_index}/{process_count}: {len(todo)} prompts to generate "
        f"({len(records) - len(todo) - len(too_long)} already in the output, {len(skipped)} skipped), "
        f"{len(batches)} batches, data parallel over {generator.num_devices} device(s) "
        f"[{generator.mesh.devices.flat[0].platform}], shapes (rows, prompt_len): {shapes}"
    )

    start = time.perf_counter()
    completion_tokens = 0
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with (
        open(out_path, "ab") as f,
        tqdm(total=len(todo), unit="prompt", disable=args.quiet, dynamic_ncols=True) as bar,
    ):
        for batch, completions, seconds in generate_batches(
            generator,
            todo,
            prompts,
            batches,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            compression=compression,
            sampling=sampling,
            attention_impl=args.attention_impl,
        ):
            rows = []
            for i, c in zip(batch.indices, completions):
                rows.append(
                    {
                        "id": todo[i].id,
                        "text": generator.tokenizer.decode(c.tokens, skip_special_tokens=True),
                        "prompt_tokens": len(prompts[i]),
                        "completion_tokens": len(c.tokens),
                        "finish_reason": c.finish_reason,
                        "seconds": round(seconds, 3),
                    }
                )
                completion_tokens += len(c.tokens)
            append_lines(f, rows)
            bar.update(len(rows))
            bar.set_postfix_str(f"{completion_tokens / (time.perf_counter() - start):.1f} tok/s")
    seconds = time.perf_counter() - start
    summary = {
        "output": out_path,
        "prompts": len(todo),
        "completion_tokens": completion_tokens,
        "prompt_tokens": sum(len(p) for p in prompts),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(completion_tokens / seconds, 2) if seconds > 0 else 0.0,
        "already_done": len(records) - len(todo) - len(too_long),
        "skipped": len(skipped),
        "devices": generator.num_devices,
        "process": f"{process_index}/{process_count}",
    }
    print(
        f"{summary['prompts']} prompts, {completion_tokens} tokens in {seconds:.1f} s "
        f"({summary['tokens_per_s']} tokens/s, compile included) on {generator.num_devices} device(s); "
        f"{summary['already_done']} already done, {summary['skipped']} skipped -> {out_path}"
    )
    return summary


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:
        report(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
