"""Decode throughput of a random-weight model of real shape: full cache vs LongFlow (GPU).

Runs prefill, then decodes in chunks of `--chunk` steps (a `lax.fori_loop` over the library's
`decode_step` inside one jit, cache donated), timing each chunk: tokens/s overall and as a function of
generated length (for the plot). Greedy; weights are random (speed does not depend on their values) and
no EOS is set, so every row decodes every step. Each configuration is compiled ahead of time so the
timed chunks exclude compilation; the first chunk is also reported separately.

  python scripts/benchmark_generate.py --model qwen3-4b --runs full:16:8192 longflow:16:8192:2048 \
      --out runs/gen.jsonl

A run is POLICY:BATCH:NEW_TOKENS[:BUDGET[:IMPL[:STEPS]]], e.g. longflow:16:8192:2048:pallas. BATCH may
be `max`: the largest batch whose KV buffer, plus the params and a per-row working-set allowance, fits in
`--memory-gib` (default: 90% of the device's memory limit), so full cache and LongFlow can be compared
at equal memory. STEPS (default NEW_TOKENS) times only the first STEPS decode steps of a run whose
buffer is sized for NEW_TOKENS: for a compressed cache, whose per-step cost stops changing once its C
slots are full, that measures the same steady rate in less device time; rows record both numbers.
`--plot FILE.png` draws decode tokens/s against generated length for every run.

`--isolate` runs every configuration in its own process: each row's peak memory is then its own, a
large run starts from an empty allocator, and a run that runs out of memory at BATCH=max is retried
at 90% of the batch (twice at most; the row records the scale it ran at).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from longflow_jax import CompressionConfig, ModelConfig, decode_step, init_random_params  # noqa: E402
from longflow_jax.generate import buffer_capacity, prefill_in_slices  # noqa: E402
from longflow_jax.kv_cache import cache_bytes  # noqa: E402

MODELS = {
    # Qwen3-4B: 36 layers, hidden 2560, 32 q heads, 8 KV heads, head_dim 128, tied embeddings.
    "qwen3-4b": ModelConfig(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        qk_norm=True,
        dtype="bfloat16",
    ),
    # DeepSeek-R1-Distill-Qwen-7B (Qwen2 architecture): 28 layers, hidden 3584, 28/4 heads, qkv bias.
    "r1-distill-qwen-7b": ModelConfig(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1e4,
        max_position_embeddings=131072,
        qkv_bias=True,
        dtype="bfloat16",
    ),
    "tiny": ModelConfig(
        model_type="qwen3",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        head_dim=32,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=65536,
        tie_word_embeddings=True,
        qk_norm=True,
        dtype="bfloat16",
    ),
}


def parse_run(spec: str):
    parts = spec.split(":")
    if not 3 <= len(parts) <= 6:
        raise ValueError(f"run {spec!r}: expected POLICY:BATCH:NEW_TOKENS[:BUDGET[:IMPL[:STEPS]]]")
    policy, batch, new = parts[0], parts[1] if parts[1] == "max" else int(parts[1]), int(parts[2])
    budget = int(parts[3]) if len(parts) > 3 and parts[3] else 2048
    impl = parts[4] if len(parts) > 4 and parts[4] else "reference"
    steps = int(parts[5]) if len(parts) > 5 and parts[5] else new
    if not 0 < steps <= new:
        raise ValueError(f"run {spec!r}: STEPS must be in [1, NEW_TOKENS={new}], got {steps}")
    return policy, batch, new, budget, impl, steps


def params_bytes(params) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(params))


def row_bytes(config: ModelConfig, capacity: int) -> int:
    """Device bytes one more row costs: its KV buffer plus float32 logits and activations per step."""
    itemsize = jnp.dtype(config.param_dtype).itemsize
    kv = 2 * config.num_layers * config.num_kv_heads * capacity * config.head_dim * itemsize
    work = 4 * (2 * config.vocab_size + 8 * config.intermediate_size + 4 * config.num_heads * capacity)
    return kv + work


def max_batch(config, params, policy, new_tokens, budget, prompt_len, memory_bytes) -> int:
    capacity = buffer_capacity(CompressionConfig(policy=policy, budget=budget), prompt_len, new_tokens)
    free = memory_bytes - params_bytes(params)
    batch = int(free // row_bytes(config, capacity))
    if batch < 1:
        raise ValueError(f"{policy}: not even one row fits in {memory_bytes / 2**30:.1f} GiB")
    return batch


def device_memory_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def peak_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run_one(
    params,
    config,
    policy,
    batch,
    new_tokens,
    budget,
    impl,
    prompt_len,
    chunk,
    seed,
    steps=None,
    prefill_rows=None,
):
    comp = CompressionConfig(policy=policy, budget=budget)
    capacity = buffer_capacity(comp, prompt_len, new_tokens)
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(1, config.vocab_size, (batch, prompt_len)), jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)

    # --prefill-rows: the prompt pass in row slices, for a BATCH=max whose prompt activations would
    # not fit beside the cache (they grow with batch x prompt length).
    prefill_fn = jax.jit(lambda p, i, n: prefill_in_slices(p, config, i, n, comp, capacity, prefill_rows))

    def chunk_body(p, cache, token, start):
        def body(i, carry):
            cache, token = carry
            logits, cache, _ = decode_step(
                p,
                config,
                cache,
                token,
                lengths + start + i,
                jax.random.PRNGKey(0),
                compression=comp,
                attention_impl=impl,
            )
            return cache, jnp.argmax(logits, -1).astype(jnp.int32)

        return jax.lax.fori_loop(0, chunk, body, (cache, token))

    chunk_fn = jax.jit(chunk_body, donate_argnums=(1,))

    t0 = time.perf_counter()
    cache, logits = jax.block_until_ready(prefill_fn(params, ids, lengths))
    prefill_s = time.perf_counter() - t0  # includes compile: informational only
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    t0 = time.perf_counter()
    compiled = chunk_fn.lower(params, cache, token, jnp.int32(0)).compile()
    compile_s = time.perf_counter() - t0

    chunk_seconds = []
    # One KV write per step: the buffer holds prompt + new_tokens; only the first `steps` are timed.
    num_chunks = (steps or new_tokens) // chunk
    if num_chunks < 1:
        raise ValueError(f"{steps or new_tokens} steps is less than one chunk of {chunk}")
    for c in range(num_chunks):
        t0 = time.perf_counter()
        cache, token = compiled(params, cache, token, jnp.int32(c * chunk))
        token.block_until_ready()
        chunk_seconds.append(time.perf_counter() - t0)
    decoded = num_chunks * chunk
    steady = chunk_seconds[1:] or chunk_seconds
    return {
        "policy": policy,
        "impl": impl,
        "batch": batch,
        "new_tokens": new_tokens,
        "decoded_steps": decoded,
        "budget": budget if policy != "full" else None,
        "capacity": capacity,
        "prompt_len": prompt_len,
        "kv_cache_bytes": cache_bytes(cache),
        "peak_bytes": peak_bytes(),
        "decode_tokens_per_s": batch * decoded / sum(chunk_seconds),
        "decode_tokens_per_s_after_first_chunk": batch * chunk * len(steady) / sum(steady),
        "ms_per_step": 1e3 * sum(chunk_seconds) / decoded,
        "chunk": chunk,
        "chunk_tokens_per_s": [batch * chunk / s for s in chunk_seconds],
        "compile_s": compile_s,
        "prefill_s_incl_compile": prefill_s,
    }


def buffer_full_tokens_per_s(r):
    """Tokens/s over the timed chunks that start once a compressed buffer is full (None for full cache:
    its buffer never is). From then on every step reads the same C slots, so the rate is steady."""
    if r["policy"] == "full":
        return None
    fill = r["capacity"] - r["prompt_len"]  # decode steps until every slot holds a token
    steady = [t for i, t in enumerate(r["chunk_tokens_per_s"]) if i * r["chunk"] >= fill]
    return len(steady) / sum(1.0 / t for t in steady) if steady else None


def whole_run_tokens_per_s(r):
    """Tokens/s over all NEW_TOKENS steps: measured when every step was timed; otherwise the timed
    steps plus the untimed ones at the buffer-full rate (a projection, flagged by the second value)."""
    untimed = r["new_tokens"] - r["decoded_steps"]
    steady = buffer_full_tokens_per_s(r)
    if untimed == 0 or steady is None:
        return r["decode_tokens_per_s"], False
    seconds = r["batch"] * r["decoded_steps"] / r["decode_tokens_per_s"] + r["batch"] * untimed / steady
    return r["batch"] * r["new_tokens"] / seconds, True


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        x = [(i + 1) * r["chunk"] for i in range(len(r["chunk_tokens_per_s"]))]
        name = r["policy"] if r["policy"] == "full" else f"{r['policy']} C={r['budget']}"
        line = ax.plot(
            x, r["chunk_tokens_per_s"], marker=".", label=f"{name}, batch {r['batch']} ({r['impl']})"
        )
        steady = buffer_full_tokens_per_s(r)
        if r["decoded_steps"] < r["new_tokens"] and steady:
            ax.plot(
                [x[-1], r["new_tokens"]],
                [steady, steady],
                linestyle="--",
                color=line[0].get_color(),
                label=f"{name}: buffer-full rate, untimed steps",
            )
    ax.set_xlabel("generated tokens per row")
    ax.set_ylabel("decode tokens/s (all rows)")
    first = results[0]
    ax.set_title(f"{first['model']} on {first['device']}, {first['date']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def _is_oom(text: str) -> bool:
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def run_isolated(argv_base, spec, out_path, command, retries=2):
    """Run one configuration in a child process (retrying an out-of-memory BATCH=max at 90%)."""
    scale = 1.0
    for attempt in range(retries + 1):
        with tempfile.TemporaryDirectory() as tmp:
            part = os.path.join(tmp, "row.jsonl")
            cmd = [sys.executable, os.path.abspath(__file__), *argv_base, "--runs", spec, "--out", part]
            cmd += ["--batch-scale", f"{scale:.4f}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            sys.stdout.write(proc.stdout)
            if proc.returncode == 0:
                with open(part) as f:
                    rows = [json.loads(line) for line in f]
                for row in rows:  # the command a reader reruns is the parent's
                    row["run_command"], row["command"] = row["command"], command
                break
            sys.stderr.write(proc.stderr[-3000:])
            if not (_is_oom(proc.stderr) and ":max:" in f":{spec}" and attempt < retries):
                raise RuntimeError(f"run {spec} failed (exit {proc.returncode})")
            scale *= 0.9
            print(f"  {spec}: out of memory, retrying at {scale:.2f} x the largest batch", flush=True)
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return rows


def print_table(results):
    print(
        "\n| policy | impl | batch | new tokens | timed steps | KV GiB | peak GiB | ms/step | "
        "tok/s timed | tok/s buffer full | tok/s over new tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        name = r["policy"] if r["policy"] == "full" else f"{r['policy']} C={r['budget']}"
        peak = f"{r['peak_bytes'] / 2**30:.1f}" if r["peak_bytes"] else "n/a"
        steady = buffer_full_tokens_per_s(r)
        whole, projected = whole_run_tokens_per_s(r)
        print(
            f"| {name} | {r['impl']} | {r['batch']} | {r['new_tokens']} | {r['decoded_steps']} | "
            f"{r['kv_cache_bytes'] / 2**30:.2f} | {peak} | {r['ms_per_step']:.2f} | "
            f"{r['decode_tokens_per_s']:.0f} | {f'{steady:.0f}' if steady else '-'} | "
            f"{whole:.0f}{' (projected)' if projected else ''} |"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-4b", choices=sorted(MODELS))
    ap.add_argument("--runs", nargs="+", help="POLICY:BATCH:NEW_TOKENS[:BUDGET[:IMPL[:STEPS]]]")
    ap.add_argument("--from-jsonl", nargs="+", help="no runs: table (and --plot) of rows saved by --out")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="append one JSON line per run")
    ap.add_argument("--memory-gib", type=float, help="memory for BATCH=max (default: 90%% of the device's)")
    ap.add_argument("--plot", help="PNG: decode tokens/s vs generated length, one line per run")
    ap.add_argument("--isolate", action="store_true", help="one process per run (own peak memory)")
    ap.add_argument("--prefill-rows", type=int, help="rows per prefill slice (default: one pass)")
    ap.add_argument("--batch-scale", type=float, default=1.0, help=argparse.SUPPRESS)  # isolate's retry
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    command = " ".join(["python3", "scripts/benchmark_generate.py", *argv])
    if args.from_jsonl:
        results = []
        for path in args.from_jsonl:
            with open(path) as f:
                results += [json.loads(line) for line in f if line.strip()]
        if args.plot:
            plot(results, args.plot)
        print_table(results)
        return 0
    if not args.runs:
        ap.error("--runs is required (or --from-jsonl)")
    for spec in args.runs:
        parse_run(spec)  # bad specs fail before any work
    if args.isolate:
        base = ["--model", args.model, "--prompt-len", str(args.prompt_len), "--chunk", str(args.chunk)]
        base += ["--seed", str(args.seed)]
        base += ["--memory-gib", str(args.memory_gib)] if args.memory_gib else []
        base += ["--prefill-rows", str(args.prefill_rows)] if args.prefill_rows else []
        results = [row for spec in args.runs for row in run_isolated(base, spec, args.out, command)]
        if args.plot:
            plot(results, args.plot)
        print_table(results)
        return 0
    config = MODELS[args.model]
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}; model {args.model}")
    params = init_random_params(config, seed=args.seed)
    jax.block_until_ready(params)
    results = []
    for spec in args.runs:
        policy, batch, new, budget, impl, steps = parse_run(spec)
        memory_limit = None
        if batch == "max":
            limit = args.memory_gib * 2**30 if args.memory_gib else 0.9 * (device_memory_bytes() or 0)
            if not limit:
                raise ValueError("BATCH=max needs --memory-gib on a device that reports no memory limit")
            memory_limit = limit
            batch = max(
                1,
                int(
                    max_batch(config, params, policy, new, budget, args.prompt_len, limit) * args.batch_scale
                ),
            )
            print(
                f"  {spec}: largest batch in {limit / 2**30:.1f} GiB (x{args.batch_scale:.2f}) is {batch}",
                flush=True,
            )
        res = run_one(
            params,
            config,
            policy,
            batch,
            new,
            budget,
            impl,
            args.prompt_len,
            args.chunk,
            args.seed,
            steps,
            args.prefill_rows,
        )
        res.update(
            memory_limit_bytes=memory_limit,
            batch_scale=args.batch_scale if memory_limit else None,
            model=args.model,
            device=device.device_kind,
            jax=jax.__version__,
            date=datetime.date.today().isoformat(),
            command=command,
        )
        results.append(res)
        print(
            f"  {spec}: {res['decode_tokens_per_s']:.0f} tok/s, {res['ms_per_step']:.2f} ms/step, "
            f"KV {res['kv_cache_bytes'] / 2**30:.2f} GiB, compile {res['compile_s']:.0f}s",
            flush=True,
        )
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")
        del res
    if args.plot:
        plot(results, args.plot)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
