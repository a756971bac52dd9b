"""The batch loop of `longflow-batch` and `longflow-eval`: tokenise records, bucket them, generate data
parallel over this process's devices, and yield each batch's texts.

`generate` runs on a ("data", "model") mesh (`--mesh`): `shard_map` splits the batch over "data", so each
data shard decodes its own rows and stops when they are done, where automatic partitioning would loop
until the slowest row anywhere stops; "model" splits the weights and the KV buffer (tensor parallel,
`sharding.py`), for a model that does not fit one device. A batch is padded with copies of its first
row, which stop with it and so never lengthen the loop.
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

from pallas_kernels.quant import KV_QUANT_KINDS

from .bucketing import Batch, bucket_length, plan_batches, round_up
from .config import (
    MIN_TEMPERATURE,
    THINKV_CALIBRATION_FILE,
    CompressionConfig,
    SamplingConfig,
    ThinKVConfig,
    dtype_from_name,
)
from .jsonl_io import Record, Skipped, id_key, read_jsonl_records, same_file
from .sharding import DATA, MODEL, default_mesh_shape, make_mesh, parse_mesh_shape


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    """The flags every generating command shares: the cache layout, the kernel and the sampling."""
    p.add_argument("--granularity", default="sequence", choices=["sequence", "kv_head"])
    p.add_argument(
        "--kv-quant", choices=KV_QUANT_KINDS, help="store the KV buffer quantized (default bf16/f32)"
    )
    p.add_argument("--kv-quant-group", type=int, default=32, help="elements per scale with --kv-quant")
    p.add_argument(
        "--thinkv-calibration",
        metavar="PATH",
        help=f"policy thinkv: its layers and thresholds (longflow-calibrate-thinkv's file; default "
        f"CKPT/{THINKV_CALIBRATION_FILE} when it exists, else the uncalibrated defaults)",
    )
    p.add_argument("--attention-impl", default="reference", choices=["reference", "pallas", "triton"])
    add_sampling_args(p)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The flags that choose each next token and where a row stops (`sampling_from`)."""
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="Hugging Face's: > 1 discourages every token of the prompt and the output so far (1: off)",
    )
    p.add_argument(
        "--presence-penalty",
        type=float,
        default=0.0,
        help="OpenAI's: subtracted from each generated id's logit",
    )
    p.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.0,
        help="OpenAI's: subtracted from an id's logit once per time it was generated",
    )
    p.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=0,
        metavar="N",
        help="ban any token that would repeat an N-gram of the prompt and the output (0: off)",
    )
    p.add_argument(
        "--min-new-tokens", type=int, default=0, help="EOS and the stop ids are banned until this many tokens"
    )
    p.add_argument("--ignore-eos", action="store_true", help="EOS does not end a row (fixed-length runs)")
    p.add_argument(
        "--stop-token-ids",
        type=int,
        nargs="+",
        default=[],
        metavar="ID",
        help="more ids that end a row as EOS does",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="cut the text before the first TEXT (repeatable; on the decoded text after generation: the "
        "device loop stops on token ids only)",
    )
    p.add_argument("--seed", type=int, default=0)


AUTO = "auto"  # --batch-size of longflow-batch: sized from the device's memory (`auto_batch_size`)


def batch_size_or_auto(text: str) -> int | str:
    """--batch-size of longflow-batch: an int, or "auto" (`auto_batch_size`)."""
    if text == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'auto', got {text!r}") from None


def add_model_input_args(p: argparse.ArgumentParser, auto_batch_size: bool = False) -> None:
    """The flags of every command that tokenizes JSONL prompts for a checkpoint and generates from them.
    auto_batch_size: --batch-size also takes "auto" (`auto_batch_size`)."""
    p.add_argument("--ckpt", required=True, help="a converted checkpoint directory (longflow-convert)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    if auto_batch_size:
        p.add_argument(
            "--batch-size",
            type=batch_size_or_auto,
            default=16,
            help="prompts per generate call (per process), or 'auto': the most one device's memory holds "
            "for the longest prompt (a few compiles first)",
        )
    else:
        p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (per process)")
    p.add_argument("--dtype", default=None, help="cast the params on load, e.g. bfloat16")
    p.add_argument(
        "--chat-template-kwargs",
        type=_flag_type(json.loads, "a JSON object"),
        default={},
        help="JSON object passed to apply_chat_template, e.g. '{\"enable_thinking\": false}'",
    )
    p.add_argument("--no-chat-template", action="store_true", help="tokenize plain prompts raw")
    p.add_argument("--strict", action="store_true", help="fail on any input record that would be skipped")


def _flag_type(parse: Callable, expected: str | None = None) -> Callable:
    """parse as an argparse type whose error says why: argparse shows a ValueError's type name only."""

    def flag_type(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(
                str(e) if expected is None else f"{text!r}: {e} (expected {expected})"
            ) from None

    flag_type.__name__ = parse.__name__
    return flag_type


def add_generation_args(p: argparse.ArgumentParser, auto_batch_size: bool = False) -> None:
    """The flags of the JSONL commands (longflow-batch, longflow-eval)."""
    add_model_input_args(p, auto_batch_size)
    add_decoding_args(p)
    p.add_argument("--devices", type=int, default=None, help="use the first N local devices (default all)")
    p.add_argument(
        "--mesh",
        type=_flag_type(parse_mesh_shape),  # its message names the value and the form
        default=None,
        metavar="data=D,model=M",
        help="split the rows over D devices and the weights and KV heads over M (default: all devices on "
        "data when the model fits one device, else the smallest model axis that fits)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def plan_on_one_device(args, validate, prog: str, prompt_of=None):
    """(generator on one device, plan) for the records of --input that `validate` accepts, the first
    --limit of them: the commands that compare runs on one device (fidelity, ThinKV calibration)."""
    records, skipped = read_jsonl_records(args.input, validate, id_from_line=True)
    handle_skipped(skipped, args.input, args.strict, prog)
    records = records[: args.limit]
    if not records:
        raise ValueError(f"no usable records in {args.input}")
    generator = DataParallelGenerator(args.ckpt, num_devices=1, dtype=args.dtype)
    plan = make_plan(generator, records, args, prog, prompt_of=prompt_of)
    if not plan.records:
        raise ValueError(f"no record of {args.input} can be generated for (all were skipped)")
    return generator, plan


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
    "logprobs": 0,
    "kv_quant_group": 1,
}


def check_args(args) -> None:
    """Every flag of a generating command, before anything is loaded: ValueError naming the flag, its
    value and what is expected."""
    for name, least in MIN_VALUES.items():
        value = getattr(args, name, None)
        if isinstance(value, int) and value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    mesh, devices = getattr(args, "mesh", None), getattr(args, "devices", None)
    if mesh is not None and devices is not None and math.prod(mesh) != devices:
        raise ValueError(
            f"--mesh data={mesh[0]},model={mesh[1]} is {math.prod(mesh)} devices, not --devices {devices}"
        )
    t = args.temperature
    if not (math.isfinite(t) and (t == 0 or t >= MIN_TEMPERATURE)):
        raise ValueError(f"--temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {t}")
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    try:
        sampling_from(args)
    except ValueError as e:  # SamplingConfig names the field first: name the flag instead
        field, rest = str(e).split(" ", 1)
        raise ValueError(f"--{field.replace('_', '-')} {rest}") from None
    if not all(args.stop):
        raise ValueError("--stop must be a non-empty string")
    kwargs = getattr(args, "chat_template_kwargs", {})
    if not isinstance(kwargs, dict):
        raise ValueError(f"--chat-template-kwargs must be a JSON object, got {kwargs!r}")
    if getattr(args, "dtype", None) is not None:
        dtype_from_name(args.dtype)
    if getattr(args, "thinkv_calibration", None) is not None:
        thinkv_from(args)
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
    return SamplingConfig(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        min_new_tokens=args.min_new_tokens,
        ignore_eos=args.ignore_eos,
        stop_token_ids=tuple(args.stop_token_ids),
    )


def check_vocab_flags(vocab_size: int, args) -> None:
    """The flags that name token ids or counts, against the model's vocabulary, by their flag names."""
    if any(i >= vocab_size for i in args.stop_token_ids):
        raise ValueError(
            f"--stop-token-ids must be < the model's vocab_size {vocab_size}, got {args.stop_token_ids}"
        )
    if (getattr(args, "logprobs", None) or 0) > vocab_size:
        raise ValueError(f"--logprobs must be <= the model's vocab_size {vocab_size}, got {args.logprobs}")


def check_runs(generator, compressions, args, prompt_len: int) -> None:
    """Each compression as `generate` checks it, for the longest prompt at the run's flags: before a
    command writes anything, not in the middle of its runs."""
    from .generate import check_generate_inputs

    check_vocab_flags(generator.config.vocab_size, args)

    ids = jax.ShapeDtypeStruct((1, prompt_len), np.int32)
    lengths = jax.ShapeDtypeStruct((1,), np.int32)
    for compression in compressions:
        check_generate_inputs(
            generator.config,
            ids,
            lengths,
            args.max_new_tokens,
            compression,
            sampling_from(args),
            args.attention_impl,
            return_logprobs=getattr(args, "logprobs", None) is not None,
            top_logprobs=getattr(args, "logprobs", None) or 0,
        )


def thinkv_from(args) -> ThinKVConfig:
    """ThinKV's settings: layers and thresholds from --thinkv-calibration, else from the checkpoint's
    thinkv.json when it has one, else unset (`generate` then warns and uses the defaults)."""
    path = getattr(args, "thinkv_calibration", None)
    if path is not None and not os.path.isfile(path):
        raise ValueError(
            f"--thinkv-calibration {path!r}: no such file (longflow-calibrate-thinkv writes one)"
        )
    beside = os.path.join(args.ckpt, THINKV_CALIBRATION_FILE) if getattr(args, "ckpt", None) else None
    if path is None and beside is not None and os.path.isfile(beside):
        path = beside
    return ThinKVConfig() if path is None else ThinKVConfig.from_calibration(path)


def compression_from(args) -> CompressionConfig:
    return CompressionConfig(
        policy=args.policy, budget=args.budget, granularity=args.granularity, kv_quant=args.kv_quant,
        kv_quant_group=args.kv_quant_group, thinkv=thinkv_from(args) if args.policy == "thinkv" else None,
    )  # fmt: skip


def check_outputs_not_input(args, outputs: dict[str, str], flag: str = "--output") -> None:
    """None of a run's outputs (`outputs`: what to call it -> path) is its --input, which the run would
    replace, even with --overwrite; `flag` is the option that moves them."""
    for name, path in outputs.items():
        if same_file(path, args.input):
            raise ValueError(
                f"{name} {path} is the same file as --input {args.input}: the run would replace the "
                f"problems it reads; pass another {flag}"
            )


def check_table_path(args) -> None:
    """--table is rewritten at the end of a run: never the --input or --output file."""
    for flag in ("input", "output"):
        if args.table and same_file(args.table, getattr(args, flag)):
            raise ValueError(
                f"--table {args.table} is the same file as --{flag} {getattr(args, flag)}: the table would "
                f"replace it; pass another --table"
            )


def check_plot_path(flag: str, path: str | None, **others: str | None) -> None:
    """A plot asked for (drawn at the end of a run): matplotlib installed (the "plot" extra), a file
    format it writes, and none of the run's other files (`others`: flag -> path), which the plot would
    replace. Said before the run, not after it."""
    if path is None:
        return
    try:
        import matplotlib.figure
    except ImportError:
        raise ValueError(
            f"{flag} {path}: drawing needs matplotlib, which is not installed (pip install "
            f"'longflow-jax[plot]', or leave out {flag})"
        ) from None
    for name, other in others.items():
        if other and same_file(other, path):
            raise ValueError(
                f"{flag} {path} is the same file as {name} {other}: the plot would replace it; pass "
                f"another {flag}"
            )
    ext = os.path.splitext(path)[1][1:].lower()  # none: matplotlib's default format (png)
    formats = matplotlib.figure.Figure().canvas.get_supported_filetypes()
    if ext and ext not in formats:
        raise ValueError(
            f"{flag} {path}: matplotlib cannot write .{ext} files; expected one of {sorted(formats)}"
        )


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
    tokens: list[int]  # generated ids, the stop id (EOS or a stop_token_id) included when there is one
    # "stop" (a stop id or a stop string), "length" (max_new_tokens), "error" (NaN/inf logits: tokens stop)
    finish_reason: str
    text: str  # the tokens decoded, special tokens skipped, cut before the first stop string
    stop_string: str | None = None  # the stop string the text was cut at
    logprobs: list[float] | None = None  # per generated token, when asked (generate's return_logprobs)
    top_logprobs: list[list[list]] | None = None  # per generated token: [[id, log-prob], ...], best first


def finish_reason(tokens: Sequence[int], stop_ids: Sequence[int], nonfinite: bool = False) -> str:
    """stop_ids: `SamplingConfig.stop_ids` of the model's EOS ids."""
    if nonfinite:
        return "error"
    return "stop" if len(tokens) and int(tokens[-1]) in set(stop_ids) else "length"


def cut_at_stop_string(text: str, stop_strings: Sequence[str]) -> tuple[str, str | None]:
    """(text before the earliest stop string, that string); (text, None) when none occurs. Of two
    starting at the same place, the one listed first."""
    found = [(text.find(s), i) for i, s in enumerate(stop_strings) if s in text]
    if not found:
        return text, None
    at, i = min(found)
    return text[:at], stop_strings[i]


def warn_errors(names: Sequence, prog: str) -> None:
    """names: the rows (ids) whose completion has finish_reason "error"."""
    if names:
        report(
            f"warning: the logits became NaN/inf for {len(names)} row(s) {list(names)}: their output "
            f"stops there, with finish_reason 'error' (check the checkpoint's weights and --dtype)",
            prog,
        )


class DataParallelGenerator:
    """A converted checkpoint on a ("data", "model") mesh of this process's devices: rows split over
    "data", weights and KV buffer over "model" (`generate`'s mesh). mesh_shape (data, model), default
    every device on "data" when the weights fit one device, else the smallest "model" axis whose share
    fits (`sharding.default_mesh_shape`); num_devices: use the first N devices (default all)."""

    def __init__(
        self,
        ckpt_dir: str,
        *,
        num_devices: int | None = None,
        dtype: str | None = None,
        mesh_shape: tuple[int, int] | None = None,
    ):
        from transformers import AutoTokenizer

        from .config import ModelConfig
        from .convert import load

        devices = jax.local_devices()
        num_devices = len(devices) if num_devices is None else num_devices
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"--devices must be in [1, {len(devices)}], got {num_devices}")
        if mesh_shape is None:
            config = ModelConfig.from_pretrained_dir(ckpt_dir)
            config = config if dtype is None else config.replace(dtype=dtype)
            device_bytes = (devices[0].memory_stats() or {}).get("bytes_limit")
            mesh_shape = default_mesh_shape(config, num_devices, device_bytes)
        elif math.prod(mesh_shape) > len(devices):
            raise ValueError(f"--mesh {mesh_shape} needs {math.prod(mesh_shape)} devices, got {len(devices)}")
        self.mesh = make_mesh(*mesh_shape, devices)
        config, self.params = load(ckpt_dir, dtype=dtype, mesh=self.mesh)
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
        # Chat models end a turn with the tokenizer's eos (e.g. <|im_end|>), which config.json may lack.
        eos = config.eos_token_ids
        if self.tokenizer.eos_token_id is not None:
            eos = tuple(dict.fromkeys((*eos, int(self.tokenizer.eos_token_id))))
        self.config = config.replace(eos_token_ids=eos)
        self._runs = {}  # (rows, prompt_len, options) -> compile_generate's run

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def data_size(self) -> int:
        """Devices on "data": a batch's rows are a multiple of it."""
        return self.mesh.shape[DATA]

    def describe(self) -> str:
        """The mesh in words, for the progress lines."""
        model = self.mesh.shape[MODEL]
        tensor = f", tensor parallel over {model}" if model > 1 else ""
        return f"data parallel over {self.data_size} device(s){tensor} [{self.mesh.devices.flat[0].platform}]"

    def compile(self, rows: int, prompt_len: int, **options) -> float:
        """Compile generate for [rows, prompt_len] prompts with `compile_generate`'s options, once;
        returns the seconds it took (0.0 when it was compiled before)."""
        return self._compiled(rows, prompt_len, options)[1]

    def _compiled(self, rows: int, prompt_len: int, options: dict):
        from .generate import compile_generate

        setting = (rows, prompt_len, *sorted(options.items()))
        if setting in self._runs:
            return self._runs[setting], 0.0
        self._runs[setting], seconds = compile_generate(
            self.params, self.config, batch=rows, prompt_len=prompt_len, mesh=self.mesh, **options
        )
        return self._runs[setting], seconds

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        prompt_len: int,
        rows: int,
        *,
        seed: int = 0,
        stop_strings: Sequence[str] = (),
        **options,
    ) -> list[Completion]:
        """Generate for len(prompts) <= rows token lists, padded to [rows, prompt_len]. options:
        generate()'s max_new_tokens, compression, sampling, attention_impl, and optionally
        return_logprobs and top_logprobs. Each text is cut before the first of stop_strings."""
        if not 1 <= len(prompts) <= rows or rows % self.data_size:
            raise ValueError(f"{len(prompts)} prompts in {rows} rows over data={self.data_size} devices")
        padded = list(prompts) + [prompts[0]] * (rows - len(prompts))
        ids = np.full((rows, prompt_len), self.config.pad_token_id, np.int32)
        for r, p in enumerate(padded):
            ids[r, : len(p)] = p
        lengths = np.asarray([len(p) for p in padded], np.int32)
        out = self._compiled(rows, prompt_len, options)[0](self.params, ids, lengths, seed)
        tokens, counts, bad = np.asarray(out.tokens), np.asarray(out.lengths), np.asarray(out.nonfinite)
        logprobs, top_ids, top_logprobs = (
            None if x is None else np.asarray(x) for x in (out.logprobs, out.top_token_ids, out.top_logprobs)
        )
        stop_ids = options["sampling"].stop_ids(self.config.eos_token_ids)
        completions = []
        for r, p in enumerate(prompts):
            n = counts[r]
            new = tokens[r, :n].tolist()
            text, matched = cut_at_stop_string(
                self.tokenizer.decode(new, skip_special_tokens=True), stop_strings
            )
            reason = finish_reason(new, stop_ids, bool(bad[r]))
            scores = {}
            if logprobs is not None:
                scores["logprobs"] = logprobs[r, :n].tolist()
            if top_ids is not None:
                pairs = zip(top_ids[r, :n].tolist(), top_logprobs[r, :n].tolist())
                scores["top_logprobs"] = [[[i, v] for i, v in zip(*step)] for step in pairs]
            reason = "stop" if matched is not None and reason != "error" else reason
            completions.append(Completion(len(p), new, reason, text, matched, **scores))
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
    generator: DataParallelGenerator, records: list[Record], args, prog: str, prompt_of=None, compression=None
) -> Plan:
    """Tokenise records and bucket them. A failing chat template, an empty prompt or one longer than
    the model allows drops the record, reported (and fatal with --strict). prompt_of(record) ->
    ("prompt", text) or ("messages", list); default: the record's data. --batch-size auto sizes the
    batches for `compression` (`auto_batch_size`)."""
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
    check_vocab_flags(generator.config.vocab_size, args)
    n, batch_size = generator.data_size, args.batch_size
    if batch_size == AUTO and prompts:
        prompt_len = bucket_length(max(map(len, prompts)), limit)
        batch_size = auto_batch_size(generator, args, compression, prompt_len)
        report(
            f"--batch-size auto: {batch_size} rows ({generator.describe()}, prompts padded to {prompt_len})",
            prog,
        )
    elif batch_size == AUTO:
        batch_size = n  # nothing to generate
    batches = plan_batches([len(p) for p in prompts], round_up(batch_size, n), n, limit)
    return Plan(kept, prompts, batches, skipped)


# The share of a device's memory limit that --batch-size auto fills (as benchmark_generate's BATCH=max):
# XLA's own count leaves out the allocator's fragmentation and what other programs hold.
AUTO_BATCH_MEMORY_FRACTION = 0.9


def device_memory_limit(device) -> int | None:
    """The bytes JAX's allocator may use on device (memory_stats' bytes_limit), None where unknown."""
    return (device.memory_stats() or {}).get("bytes_limit")


def auto_batch_size(generator: DataParallelGenerator, args, compression, prompt_len: int) -> int:
    """--batch-size auto: the rows a device fits (`max_batch` fitted to `generate`'s compiled program
    for these options, in AUTO_BATCH_MEMORY_FRACTION of its memory limit) times the data shards. Needs
    a "model" axis of 1 (each device then runs the whole model on its rows) and a device that reports
    its memory limit."""
    from .generate import max_batch

    if generator.mesh.shape[MODEL] != 1:
        mesh = dict(generator.mesh.shape)
        raise ValueError(f"--batch-size auto needs a model axis of 1, got the mesh {mesh}: pass a number")
    device = generator.mesh.devices.flat[0]
    limit = device_memory_limit(device)
    if not limit:
        raise ValueError(
            f"--batch-size auto needs a device that reports its memory limit; {device.platform} does not: "
            "pass a number"
        )
    top = getattr(args, "logprobs", None)
    with jax.default_device(device):
        rows = max_batch(
            generator.config, compression, args.max_new_tokens, prompt_len,
            int(AUTO_BATCH_MEMORY_FRACTION * limit), attention_impl=args.attention_impl,
            sampling=sampling_from(args), return_logprobs=top is not None, top_logprobs=top or 0,
        )  # fmt: skip
    return rows * generator.data_size


def batch_seed(seed: int, first_id) -> int:
    """Sampling is seeded per batch from its first id: a rerun of the same batch draws the same."""
    return (seed * 1_000_003 + zlib.crc32(id_key(first_id).encode())) % (2**31)


def generate_batches(
    generator: DataParallelGenerator, plan: Plan, args, compression: CompressionConfig, prog: str
) -> Iterator[tuple[float, float, list[tuple[Record, Completion]]]]:
    """Yield (compile_seconds, seconds, [(record, completion)]) per batch of plan, in order:
    compile_seconds for a new shape (0.0 once compiled), seconds the generation's wall time without
    it. With args.logprobs = K (longflow-batch --logprobs), completions carry log-probs and K
    alternatives. Rows whose logits became non-finite are reported on stderr."""
    top = getattr(args, "logprobs", None)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        compression=compression,
        sampling=sampling_from(args),
        attention_impl=args.attention_impl,
        return_logprobs=top is not None,
        top_logprobs=top or 0,
    )
    for b in plan.batches:
        compile_seconds = generator.compile(b.rows, b.prompt_len, **options)
        start = time.perf_counter()
        completions = generator.generate(
            [plan.prompts[i] for i in b.indices],
            b.prompt_len,
            b.rows,
            seed=batch_seed(args.seed, plan.records[b.indices[0]].id),
            stop_strings=args.stop,
            **options,
        )
        seconds = time.perf_counter() - start
        warn_errors(
            [plan.records[i].id for i, c in zip(b.indices, completions) if c.finish_reason == "error"], prog
        )
        yield compile_seconds, seconds, [(plan.records[i], c) for i, c in zip(b.indices, completions)]
