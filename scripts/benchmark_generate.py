r"""Decode throughput of a random-weight model of real shape: full cache vs LongFlow (GPU).

After prefill, decodes in chunks of --chunk steps (a lax.fori_loop over the library's decode_step inside
one jit, cache donated, compiled ahead of time) and times each chunk: tokens/s overall and against
generated length. Greedy, random weights (speed does not depend on their values), no EOS: every row
decodes every step.

  python scripts/benchmark_generate.py --model qwen3-4b --runs full:16:8192 longflow:16:8192:2048 \
      --out runs/gen.jsonl

A run is POLICY[@KV_QUANT[/GROUP]]:BATCH:NEW_TOKENS[:BUDGET[:IMPL[:STEPS]]], e.g.
longflow@int4:16:8192:2048:pallas; GROUP is kv_quant_group (default 32), e.g. longflow@int8/128.
BATCH=max is `lf.max_batch` in --memory-gib (default: 90% of the device's memory limit): full cache and
LongFlow at equal memory. With --fit-batch it is fitted to `generate`'s compiled program for the run's
IMPL (`max_batch(attention_impl=...)`: a few compiles, each as long as the run's own), not estimated.
STEPS (default NEW_TOKENS) times only the first STEPS steps of a buffer sized for NEW_TOKENS: a
compressed cache's per-step cost stops changing once its C slots are full, so the table projects the
untimed steps at that buffer-full rate. ThinKV has no such step (its tiers fill and thin out): its rate
counts as buffer-full once the last timed chunks agree within 1% (STEADY_TOLERANCE), else the row
gets no projection. --isolate runs each configuration in its own process: its own
memory peak, an empty allocator, and a BATCH=max run that runs out of memory retried at 90% of the batch
(twice at most; the row records the scale). --generate also times each run's whole generation as
`lf.compile_generate` compiles it (prefill and every step), compile time apart; with --mesh
data=D,model=M that generation runs on the ("data", "model") mesh (`generate(mesh=...)`, weights placed
on it before the clock starts), while the chunked decode stays on one device.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from longflow_jax import (  # noqa: E402
    COMPILER_OPTIONS,
    CompressionConfig,
    ModelConfig,
    SamplingConfig,
    compile_generate,
    decode_step,
    init_random_params,
    max_batch,
)
from longflow_jax.attention import check_attention_impl  # noqa: E402
from longflow_jax.generate import (  # noqa: E402
    buffer_capacity,
    effective_compression,
    prefill_in_slices,
    ready_to_decode,
    step_working_set_bytes,
)
from longflow_jax.kv_cache import cache_bytes  # noqa: E402
from longflow_jax.sharding import make_mesh, param_shardings, parse_mesh_shape  # noqa: E402

# fmt: off
MODELS = {
    "qwen3-4b": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=40960, tie_word_embeddings=True, qk_norm=True, dtype="bfloat16"),
    "r1-distill-qwen-7b": ModelConfig(  # DeepSeek-R1-Distill-Qwen-7B: the Qwen2 architecture
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e4,
        max_position_embeddings=131072, qkv_bias=True, dtype="bfloat16"),
    "tiny": ModelConfig(
        model_type="qwen3", vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4,
        num_heads=8, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=65536, tie_word_embeddings=True, qk_norm=True, dtype="bfloat16"),
}
# fmt: on


DEFAULT_GROUP = CompressionConfig().kv_quant_group

# Policies whose step cost keeps changing: the full cache grows (every step is timed); ThinKV's tiers
# fill and thin out, until its rate settles (STEADY_TOLERANCE).
UNPROJECTED = ("full",)
SETTLING = ("thinkv",)
STEADY_TOLERANCE = 0.01  # the last chunks' rates agree this closely: the rate has settled
STEADY_CHUNKS = 2  # and at least this many of them


def parse_run(spec: str):
    """(compression, batch or "max", new_tokens, impl, steps) from a --runs spec."""
    parts = spec.split(":")
    if not 3 <= len(parts) <= 6:
        raise ValueError(
            f"run {spec!r}: expected POLICY[@KV_QUANT[/GROUP]]:BATCH:NEW_TOKENS[:BUDGET[:IMPL[:STEPS]]]"
        )
    policy, batch, new, budget, impl, steps = parts + [""] * (6 - len(parts))
    batch, new, steps = batch if batch == "max" else int(batch), int(new), int(steps or new)
    if batch != "max" and batch < 1:
        raise ValueError(f"run {spec!r}: BATCH must be a positive int or 'max', got {batch}")
    if not 0 < steps <= new:
        raise ValueError(f"run {spec!r}: STEPS must be in [1, NEW_TOKENS={new}], got {steps}")
    policy, _, kv_quant = policy.partition("@")
    kv_quant, slash, group = kv_quant.partition("/")
    if slash and not (kv_quant and group.isdigit()):
        raise ValueError(
            f"run {spec!r}: a GROUP takes a KV_QUANT and a positive int, got {kv_quant!r}/{group!r}"
        )
    group = {"kv_quant_group": int(group)} if group else {}
    if steps < new and policy in UNPROJECTED:
        raise ValueError(
            f"run {spec!r}: STEPS < NEW_TOKENS projects the untimed steps at the buffer-full rate, and "
            f"policy {policy!r} has none (its per-step cost keeps changing): time every step"
        )
    comp = CompressionConfig(policy=policy, budget=int(budget or 2048), kv_quant=kv_quant or None, **group)
    impl = impl or "reference"
    try:  # generate's own check: a kernel runs only the policies it fuses
        check_attention_impl(impl, comp)
    except ValueError as e:
        raise ValueError(f"run {spec!r}: {e}") from None
    return comp, batch, new, impl, steps


def memory_stat(name):
    return (jax.devices()[0].memory_stats() or {}).get(name)


def run_one(params, config, args, comp, batch, new_tokens, impl, steps):
    """Prefill, then decode the first `steps` of new_tokens steps in timed chunks: the run's row. With
    --generate, then also the whole generation as `compile_generate` compiles it."""
    prompt_len, chunk, num_chunks = args.prompt_len, args.chunk, steps // args.chunk
    if num_chunks < 1:
        raise ValueError(f"{steps} steps is less than one chunk of {chunk}")
    decoding = effective_compression(comp, prompt_len, new_tokens)  # what generate runs for this shape
    capacity = buffer_capacity(decoding, prompt_len, new_tokens)  # one KV write per step, timed or not
    ids = jnp.asarray(np.random.default_rng(0).integers(1, config.vocab_size, (batch, prompt_len)), jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    rows = args.prefill_rows  # prompt pass in row slices: at BATCH=max its activations may not fit

    @jax.jit
    def prefill_fn(p, i, n):
        """The cache as generate decodes from it: with the Triton kernel's state, ThinKV's tiers."""
        cache, logits = prefill_in_slices(p, config, i, n, decoding, capacity, rows)
        return ready_to_decode(cache, decoding, impl, new_tokens), logits

    step = functools.partial(decode_step, compression=decoding, attention_impl=impl)

    def chunk_body(p, cache, token, start):
        def body(i, carry):
            logits, cache, _ = step(p, config, *carry, lengths + start + i, jax.random.PRNGKey(0))
            return cache, jnp.argmax(logits, -1).astype(jnp.int32)

        return jax.lax.fori_loop(0, chunk, body, (cache, token))

    t0 = time.perf_counter()
    cache, logits = jax.block_until_ready(prefill_fn(params, ids, lengths))
    prefill_s = time.perf_counter() - t0  # includes compile: informational only
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    t0 = time.perf_counter()
    compiled = jax.jit(chunk_body, donate_argnums=(1,), compiler_options=COMPILER_OPTIONS)
    compiled = compiled.lower(params, cache, token, jnp.int32(0)).compile()
    compile_s, chunk_seconds = time.perf_counter() - t0, []
    # What the step needs beside its arguments, printed before the first chunk so that a run that then
    # runs out of memory still shows it, against what `max_batch` budgets a row for it.
    analysis = compiled.memory_analysis()
    temp_bytes = getattr(analysis, "temp_size_in_bytes", None)
    budget = step_working_set_bytes(config, comp, new_tokens, prompt_len)
    if temp_bytes is not None:
        per_row = temp_bytes / batch
        print(
            f"    decode chunk working set: {temp_bytes / 2**30:.2f} GiB, {per_row / 2**20:.1f} MiB a row "
            f"(max_batch budgets {budget / 2**20:.1f})"
            + (": over budget, a BATCH=max run may not fit" if per_row > budget else ""),
            flush=True,
        )
    for c in range(num_chunks):
        t0 = time.perf_counter()
        cache, token = compiled(params, cache, token, jnp.int32(c * chunk))
        token.block_until_ready()
        chunk_seconds.append(time.perf_counter() - t0)
        # As it goes: a run the caller's time limit cuts short still shows its rate so far.
        print(f"    step {(c + 1) * chunk}: {batch * chunk / chunk_seconds[-1]:.0f} tok/s", flush=True)
    decoded, steady = num_chunks * chunk, chunk_seconds[1:] or chunk_seconds
    kv_bytes, peak = cache_bytes(cache), memory_stat("peak_bytes_in_use")
    del cache
    whole = {}
    if args.generate:
        whole = time_generate(params, config, comp, impl, ids, lengths, new_tokens, rows, args.mesh)
    return dict(
        policy=comp.policy, kv_quant=comp.kv_quant, impl=impl, batch=batch, new_tokens=new_tokens,
        kv_quant_group=comp.kv_quant_group if comp.kv_quant else None,
        decoded_steps=decoded, budget=comp.budget if comp.policy != "full" else None, capacity=capacity,
        prompt_len=prompt_len, kv_cache_bytes=kv_bytes, peak_bytes=peak,
        decode_tokens_per_s=batch * decoded / sum(chunk_seconds),
        decode_tokens_per_s_after_first_chunk=batch * chunk * len(steady) / sum(steady),
        ms_per_step=1e3 * sum(chunk_seconds) / decoded, chunk=chunk,
        chunk_tokens_per_s=[batch * chunk / s for s in chunk_seconds],
        compile_s=compile_s, prefill_s_incl_compile=prefill_s, step_temp_bytes=temp_bytes,
        step_temp_budget_bytes=budget * batch, **whole,
    )  # fmt: skip


def time_generate(params, config, comp, impl, ids, lengths, new_tokens, prefill_rows, mesh_shape=None):
    """`lf.compile_generate` for the run's shape (on a mesh of mesh_shape (data, model) if given), then
    one timed call: prefill and every step (EOS ignored), as a user's `generate` runs them."""
    mesh = None if mesh_shape is None else make_mesh(*mesh_shape)
    if mesh is not None:
        params = jax.block_until_ready(jax.device_put(params, param_shardings(config, mesh)))
    run, compile_s = compile_generate(
        params, config, batch=ids.shape[0], prompt_len=ids.shape[1], max_new_tokens=new_tokens,
        compression=comp, sampling=SamplingConfig(ignore_eos=True), attention_impl=impl,
        prefill_rows_per_chunk=prefill_rows, mesh=mesh,
    )  # fmt: skip
    t0 = time.perf_counter()
    jax.block_until_ready(run(params, ids, lengths).tokens)
    seconds = time.perf_counter() - t0
    mesh_name = None if mesh_shape is None else "data={},model={}".format(*mesh_shape)
    return dict(generate_compile_s=compile_s, generate_s=seconds, generate_mesh=mesh_name,
                generate_tokens_per_s=ids.shape[0] * new_tokens / seconds)  # fmt: skip


def buffer_full_tokens_per_s(r):
    """Tokens/s over the timed chunks that start once a compressed buffer is full, when every step reads
    the same C slots; for SETTLING policies over the last chunks whose rates lie within STEADY_TOLERANCE
    of the last one's (at least STEADY_CHUNKS of them). None for UNPROJECTED policies, or a rate that
    has not settled."""
    rates = r["chunk_tokens_per_s"]
    if r["policy"] in UNPROJECTED:
        return None
    if r["policy"] in SETTLING:
        steady = []
        for t in reversed(rates):
            if abs(t - rates[-1]) > STEADY_TOLERANCE * rates[-1]:
                break
            steady.append(t)
        if len(steady) < STEADY_CHUNKS:
            return None
    else:
        fill = r["capacity"] - r["prompt_len"]  # decode steps until every slot holds a token
        steady = [t for i, t in enumerate(rates) if i * r["chunk"] >= fill]
    return len(steady) / sum(1.0 / t for t in steady) if steady else None


def whole_run_tokens_per_s(r):
    """(tokens/s over all NEW_TOKENS steps, projected): measured when every step was timed, else the
    timed steps plus the untimed ones at the buffer-full rate; (None, False) when the untimed steps have
    no rate to be projected at."""
    untimed = r["new_tokens"] - r["decoded_steps"]
    steady = buffer_full_tokens_per_s(r)
    if untimed == 0:
        return r["decode_tokens_per_s"], False
    if steady is None:
        return None, False
    seconds = r["batch"] * r["decoded_steps"] / r["decode_tokens_per_s"] + r["batch"] * untimed / steady
    return r["batch"] * r["new_tokens"] / seconds, True


def run_name(r):
    name = r["policy"] if r["policy"] == "full" else f"{r['policy']} C={r['budget']}"
    if not r.get("kv_quant"):
        return name
    group = r.get("kv_quant_group")
    return f"{name} {r['kv_quant']}" + (f"/{group}" if group and group != DEFAULT_GROUP else "")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        x = [(i + 1) * r["chunk"] for i in range(len(r["chunk_tokens_per_s"]))]
        label = f"{run_name(r)}, batch {r['batch']} ({r['impl']})"
        (line,) = ax.plot(x, r["chunk_tokens_per_s"], marker=".", label=label)
        if r["decoded_steps"] < r["new_tokens"] and (steady := buffer_full_tokens_per_s(r)):
            label = f"{run_name(r)}: buffer-full rate, untimed steps"
            ax.plot([x[-1], r["new_tokens"]], [steady] * 2, "--", color=line.get_color(), label=label)
    first = results[0]
    ax.set(xlabel="generated tokens per row", ylabel="decode tokens/s (all rows)")
    ax.set_title(f"{first['model']} on {first['device']}, {first['date']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def append_rows(path, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def child_flags(args) -> list[str]:
    """The flags every --isolate child runs with: all of the parent's but the runs and the output."""
    shared = ("model", "prompt_len", "chunk", "memory_gib", "prefill_rows")
    flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in shared if getattr(args, k) is not None]
    flags += [f"--{flag.replace('_', '-')}" for flag in ("generate", "fit_batch") if getattr(args, flag)]
    return flags + ([] if args.mesh is None else ["--mesh", "data={},model={}".format(*args.mesh)])


def run_isolated(args, command, retries=2):
    """Each configuration in a child process (an out-of-memory BATCH=max retried at 90%)."""
    base = child_flags(args)
    results = []
    for spec in args.runs:
        scale = 1.0
        for attempt in range(retries + 1):
            with tempfile.TemporaryDirectory() as tmp:
                part = os.path.join(tmp, "row.jsonl")
                cmd = [sys.executable, os.path.abspath(__file__), *base, "--runs", spec, "--out", part]
                # stdout streams through (the per-chunk rates), stderr is kept to spot out-of-memory.
                proc = subprocess.run(
                    cmd + ["--batch-scale", f"{scale:.4f}"], stderr=subprocess.PIPE, text=True
                )
                if proc.returncode == 0:
                    rows = [json.loads(line) for line in Path(part).read_text().splitlines()]
                    break
            sys.stderr.write(proc.stderr[-3000:])
            oom = any(s in proc.stderr for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))
            if not (oom and spec.split(":")[1] == "max" and attempt < retries):
                raise RuntimeError(f"run {spec} failed (exit {proc.returncode})")
            scale *= 0.9
            print(f"  {spec}: out of memory, retrying at {scale:.2f} x the largest batch", flush=True)
        for row in rows:  # the command a reader reruns is the parent's
            row["run_command"], row["command"] = row["command"], command
        if args.out:
            append_rows(args.out, rows)
        results += rows
    return results


def run_in_process(args, command):
    config, device = MODELS[args.model], jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}; model {args.model}")
    params = jax.block_until_ready(init_random_params(config))
    results = []
    for spec in args.runs:
        comp, batch, new, impl, steps = parse_run(spec)
        limit = None
        if batch == "max":
            limit = args.memory_gib * 2**30 if args.memory_gib else 0.9 * (memory_stat("bytes_limit") or 0)
            if not limit:
                raise ValueError("BATCH=max needs --memory-gib on a device that reports no memory limit")
            if args.fit_batch:
                fit = max_batch(config, comp, new, args.prompt_len, limit, attention_impl=impl,
                                prefill_rows_per_chunk=args.prefill_rows)  # fmt: skip
            else:
                fit = max_batch(config, comp, new, args.prompt_len, limit)
            batch = max(1, int(fit * args.batch_scale))
            how = "fitted to the compiled program" if args.fit_batch else "estimated"
            gib = limit / 2**30
            print(f"  {spec}: largest batch in {gib:.1f} GiB ({how}, x{args.batch_scale:.2f}) is {batch}")
        row = run_one(params, config, args, comp, batch, new, impl, steps)
        row.update(memory_limit_bytes=limit, batch_scale=args.batch_scale if limit else None,
                   batch_fitted=bool(limit and args.fit_batch),
                   model=args.model, device=device.device_kind, jax=jax.__version__,
                   date=datetime.date.today().isoformat(), command=command)  # fmt: skip
        print(
            f"  {spec}: {row['decode_tokens_per_s']:.0f} tok/s, {row['ms_per_step']:.2f} ms/step, "
            f"KV {row['kv_cache_bytes'] / 2**30:.2f} GiB, compile {row['compile_s']:.0f}s"
            + (f"; generate {row['generate_tokens_per_s']:.0f} tok/s" if args.generate else ""),
            flush=True,
        )
        if args.out:
            append_rows(args.out, [row])
        results.append(row)
    return results


def print_table(results):
    print(
        "\n| policy | impl | batch | new tokens | timed steps | KV GiB | peak GiB | ms/step | "
        "tok/s timed | tok/s buffer full | tok/s over new tokens | generate tok/s (compile s) |\n"
        + "|---" * 12
        + "|"
    )
    for r in results:
        peak = f"{r['peak_bytes'] / 2**30:.1f}" if r["peak_bytes"] else "n/a"
        steady = buffer_full_tokens_per_s(r)
        whole, projected = whole_run_tokens_per_s(r)
        generate = "-"
        if r.get("generate_tokens_per_s"):
            generate = f"{r['generate_tokens_per_s']:.0f} ({r['generate_compile_s']:.0f})"
            generate += f" on mesh {r['generate_mesh']}" if r.get("generate_mesh") else ""
        print(
            f"| {run_name(r)} | {r['impl']} | {r['batch']} | {r['new_tokens']} | {r['decoded_steps']} | "
            f"{r['kv_cache_bytes'] / 2**30:.2f} | {peak} | {r['ms_per_step']:.2f} | "
            f"{r['decode_tokens_per_s']:.0f} | {f'{steady:.0f}' if steady else '-'} | "
            f"{'not settled' if whole is None else f'{whole:.0f}'}{' (projected)' if projected else ''} | "
            f"{generate} |"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-4b", choices=sorted(MODELS))
    ap.add_argument("--runs", nargs="+", help="POLICY:BATCH:NEW_TOKENS[:BUDGET[:IMPL[:STEPS]]]")
    ap.add_argument("--from-jsonl", nargs="+", help="no runs: table (and --plot) of rows saved by --out")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--out", help="append one JSON line per run")
    ap.add_argument("--memory-gib", type=float, help="memory for BATCH=max (default: 90%% of the device's)")
    ap.add_argument("--plot", help="PNG: decode tokens/s vs generated length, one line per run")
    ap.add_argument("--isolate", action="store_true", help="one process per run (own peak memory)")
    ap.add_argument("--prefill-rows", type=int, help="rows per prefill slice (default: one pass)")
    ap.add_argument("--generate", action="store_true", help="also time lf.compile_generate's whole run")
    ap.add_argument("--fit-batch", action="store_true", help="BATCH=max fitted to the compiled program")
    ap.add_argument("--mesh", type=parse_mesh_shape, help="data=D,model=M: --generate's run on that mesh")
    ap.add_argument("--batch-scale", type=float, default=1.0, help=argparse.SUPPRESS)  # isolate's retry
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    command = " ".join(["python3", "scripts/benchmark_generate.py", *argv])
    if args.mesh is not None and not args.generate:
        ap.error("--mesh applies to the --generate timing: pass --generate too")
    if args.from_jsonl:
        lines = [line for path in args.from_jsonl for line in Path(path).read_text().splitlines()]
        results = [json.loads(line) for line in lines if line.strip()]
    else:
        if not args.runs:
            ap.error("--runs is required (or --from-jsonl)")
        for spec in args.runs:  # bad specs fail before any work
            steps = parse_run(spec)[4]
            if steps % args.chunk:  # only whole chunks are timed
                ap.error(f"run {spec!r}: its {steps} timed steps are not a multiple of --chunk {args.chunk}")
        results = (run_isolated if args.isolate else run_in_process)(args, command)
    if args.plot:
        plot(results, args.plot)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
