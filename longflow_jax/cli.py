"""`longflow-generate`: generate from a converted checkpoint, or `--demo` on a tiny model it builds itself.

--demo writes a random Qwen3-style Hugging Face checkpoint (`testing.make_tiny_hf_checkpoint`: no torch,
no download), converts it with `longflow-convert`'s code, and generates a batch with LongFlow and with the
full cache, printing tokens/s and KV-cache bytes.

Both say which policy and budget ran and whether any row outgrew the budget (so tokens were evicted),
and time compilation (`compile_generate`) apart from generation.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import jax
import numpy as np

from . import runner
from .attention import KERNEL_POLICIES
from .bucketing import round_up
from .config import POLICIES, CompressionConfig
from .convert import convert, load
from .generate import compile_generate, kv_cache_bytes
from .testing import make_tiny_hf_checkpoint

PROG = "longflow-generate"

# A Qwen3-style shape big enough for the KV savings to show, small enough to build in a second.
DEMO_MODEL = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    initializer_range=0.08,
)


def eviction_summary(compression: CompressionConfig, prompt_tokens, generated) -> str:
    """Which policy and budget ran, and whether a row needed more slots than the budget: its prompt
    and every generated token but the last (whose KV is never written), at least one slot beyond the
    prompt (a prompt of budget tokens or more is compressed at prefill). R-KV compresses only once its
    buffer of rkv_buffer slots beyond the budget is full, or at prefill a prompt longer than the budget."""
    if compression.policy == "full":
        return "policy full: the cache holds every token, nothing was evicted"
    head = f"policy {compression.policy}, budget {compression.budget} slots"
    if compression.policy == "thinkv":  # segments enter at schedule[0] tokens: thinned at any budget
        return (
            f"{head}: each finished segment of {compression.thinkv.tau} tokens keeps at most "
            f"{compression.thinkv.schedule[0]}, stored at its thought type's precision"
        )
    needed = [p + max(n - 1, 1) for p, n in zip(prompt_tokens, generated)]
    if compression.policy == "rkv":
        room = compression.budget + compression.rkv_buffer
        over = sum(n > room or p > compression.budget for n, p in zip(needed, prompt_tokens))
    else:
        over = sum(n > compression.budget for n in needed)
    if not over:
        return f"{head}: the run fit the budget, nothing was evicted"
    return f"{head}: {over} of {len(needed)} row(s) needed up to {max(needed)} slots, so tokens were evicted"


def _timed_generate(params, config, ids, lengths, seed, **kwargs):
    """(output, compile seconds, generation seconds), compiled ahead of time."""
    run, compile_seconds = compile_generate(
        params, config, batch=ids.shape[0], prompt_len=ids.shape[1], **kwargs
    )
    start = time.perf_counter()
    out = run(params, ids, lengths, seed)
    jax.block_until_ready(out.tokens)
    return out, compile_seconds, time.perf_counter() - start


def run_demo(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_tiny_hf_checkpoint(os.path.join(tmp, "hf"), "qwen3", args.seed, **DEMO_MODEL)
        convert(hf_dir, os.path.join(tmp, "ckpt"))
        config, params = load(os.path.join(tmp, "ckpt"))
    print(
        f"demo model: random Qwen3-style, {config.num_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_heads}/{config.num_kv_heads} heads, head_dim {config.head_dim}, on {jax.devices()[0]}"
    )
    rng = np.random.default_rng(args.seed)
    batch, prompt_len = args.batch, args.prompt_len
    lengths = rng.integers(max(1, prompt_len // 2), prompt_len + 1, batch).astype(np.int32)
    ids = rng.integers(1, config.vocab_size, (batch, prompt_len)).astype(np.int32)
    common = dict(max_new_tokens=args.max_new_tokens, sampling=runner.sampling_from(args))
    runs = [runner.compression_from(args)]
    if args.policy != "full":
        runs.append(CompressionConfig(policy="full"))  # the baseline: unquantized
    rows = []
    for comp in runs:
        impl = args.attention_impl if comp.policy in KERNEL_POLICIES else "reference"
        out, compiling, seconds = _timed_generate(
            params, config, ids, lengths, args.seed, compression=comp, attention_impl=impl, **common
        )
        kv = kv_cache_bytes(config, comp, batch, prompt_len, args.max_new_tokens)
        name = comp.policy if comp.policy == "full" else f"{comp.policy} C={comp.budget}"
        name += f" {comp.kv_quant}" if comp.kv_quant else ""
        generated = np.asarray(out.lengths)
        rows.append((name, int(generated.sum()), compiling, seconds, kv, int(np.max(out.cache_occupancy))))
        print(f"  {name}: first row's tokens {np.asarray(out.tokens[0, :16]).tolist()} ...")
        print(f"  {eviction_summary(comp, lengths.tolist(), generated.tolist())}")
    print(
        f"\nbatch {batch}, prompts of {lengths.min()}-{lengths.max()} tokens, "
        f"{args.max_new_tokens} new tokens per row"
    )
    header = f"{'cache':<18}{'tokens':>8}{'compile s':>11}{'seconds':>10}{'tokens/s':>11}{'KV bytes':>14}"
    print(header + f"{'slots used/row':>16}")
    for name, tokens, compiling, seconds, kv, slots in rows:
        print(
            f"{name:<18}{tokens:>8}{compiling:>11.2f}{seconds:>10.2f}{tokens / seconds:>11.1f}{kv:>14,}"
            f"{slots:>16}"
        )
    if len(rows) == 2:
        saved = 1 - rows[0][4] / rows[1][4]
        print(
            f"\nThe {runs[0].policy} KV cache is {rows[0][4]:,} bytes against {rows[1][4]:,} for the full "
            f"cache: {saved:.1%} saved ({rows[1][4] / rows[0][4]:.1f}x smaller)."
        )
    if runs[0].policy == "thinkv":  # its precisions are per thought type, not --kv-quant
        return
    quantized = {
        kind: kv_cache_bytes(
            config, dataclasses.replace(runs[0], kv_quant=kind), batch, prompt_len, args.max_new_tokens
        )
        for kind in ("int8", "int4")
    }
    print(
        f"Stored quantized (--kv-quant), the {rows[0][0].split()[0]} cache would take "
        + ", ".join(f"{b:,} bytes at {kind}" for kind, b in quantized.items())
        + " (lf.kv_cache_bytes: payloads, scales and slot bookkeeping)."
    )


def run_checkpoint(args) -> None:
    generator = runner.DataParallelGenerator(args.ckpt)
    tokenizer = generator.tokenizer
    use_template = bool(tokenizer.chat_template) and not args.no_chat_template
    prompts = [runner.encode(tokenizer, "prompt", text, use_template, {}) for text in args.prompt]
    for text, ids in zip(args.prompt, prompts):
        if not ids:
            raise ValueError(f"--prompt {text!r} encodes to no tokens: nothing to generate from")
    compression = runner.compression_from(args)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        compression=compression,
        sampling=runner.sampling_from(args),
        attention_impl=args.attention_impl,
    )
    prompt_len, rows = max(map(len, prompts)), round_up(len(prompts), generator.data_size)
    compile_seconds = generator.compile(rows, prompt_len, **options)
    start = time.perf_counter()
    completions = generator.generate(
        prompts, prompt_len, rows, seed=args.seed, stop_strings=args.stop, **options
    )
    seconds = time.perf_counter() - start
    for row, c in enumerate(completions):
        stopped = " (stopped: the logits became NaN/inf)" if c.finish_reason == "error" else ""
        if c.stop_string is not None:
            stopped += f" (text cut before the stop string {c.stop_string!r})"
        print(f"--- [{row}] {len(c.tokens)} tokens{stopped}")
        print(c.text)
    runner.warn_errors([row for row, c in enumerate(completions) if c.finish_reason == "error"], PROG)
    print()
    print(
        eviction_summary(
            compression, [c.prompt_tokens for c in completions], [len(c.tokens) for c in completions]
        )
    )
    print(
        f"{sum(len(c.tokens) for c in completions)} tokens in {seconds:.1f} s of generation "
        f"+ {compile_seconds:.1f} s of compilation"
    )


def run(args) -> None:
    budget, max_new_tokens = (128, 512) if args.demo else (2048, 1024)
    args.budget = budget if args.budget is None else args.budget
    args.max_new_tokens = max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    if args.ckpt and not args.prompt:
        raise ValueError("--ckpt needs at least one --prompt")
    if args.demo and args.prompt:
        raise ValueError("--prompt is for --ckpt: the demo's random model generates from random prompt ids")
    for flag, value in (("--batch", args.batch), ("--prompt-len", args.prompt_len)):
        if args.ckpt and value is not None:
            raise ValueError(f"{flag} is for --demo: with --ckpt the --prompt texts make the batch")
    args.batch = 4 if args.batch is None else args.batch
    args.prompt_len = 64 if args.prompt_len is None else args.prompt_len
    runner.check_args(args)
    if args.demo:
        run_demo(args)
    else:
        run_checkpoint(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--demo", action="store_true", help="build a tiny random model and generate with it")
    src.add_argument("--ckpt", help="a converted checkpoint directory (longflow-convert)")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch); --ckpt only")
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--policy", default="longflow", choices=POLICIES)
    p.add_argument("--budget", type=int, help="KV slots per layer per sequence; demo 128, else 2048")
    p.add_argument("--max-new-tokens", type=int, help="demo 512, else 1024")
    runner.add_decoding_args(p)
    p.add_argument("--batch", type=int, help="demo batch size (4)")
    p.add_argument("--prompt-len", type=int, help="demo prompt length (64)")
    return p


def main(argv=None) -> int:
    return runner.cli_main(run, build_parser(), PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
