"""Tune and time the Triton decode kernel on a GPU: `python -m cuda_triton_bridge.tune --out DIR`.

Checks each configuration against the jnp reference first, then times it. Timing: one jit holds N calls
on N distinct K/V copies (N chosen so their bytes exceed the L2 cache), dispatched R times back to back;
time per call = wall time / (R * N), median of 3. The bandwidth column counts the bytes that must move:
K and V read once, q read, out written (the floor of any decode attention).

Phase A sweeps (block_c, num_warps, num_stages) on probe shapes with the default split count; phase B
sweeps the split count per benchmark shape with the best phase-A config, with and without eviction.
Results stream to DIR/tune.jsonl; a summary table goes to DIR/tune.md and stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cuda_triton_bridge import longflow_decode_attention_triton
from cuda_triton_bridge.config import cdiv
from longflow_jax.reference import longflow_decode_attention_reference

HQ, HKV, D = 32, 8, 128
SHAPES = [(b, c) for b in (1, 16, 64) for c in (2048, 8192)]
PROBE_SHAPES = [(16, 8192), (64, 2048), (1, 8192)]
PHASE_A = [
    (32, 4, 3),
    (32, 4, 4),
    (64, 4, 2),
    (64, 4, 3),
    (64, 4, 4),
    (64, 8, 3),
    (128, 4, 2),
    (128, 8, 2),
    (128, 8, 3),
]
SPLIT_SIZES = (128, 256, 512, 1024, 2048, 4096, 8192)
L2_BYTES = 50 * 2**20


def kv_bytes(batch, slots):
    return 2 * batch * HKV * slots * D * 2


def floor_bytes(batch, slots):
    return kv_bytes(batch, slots) + 2 * batch * HQ * D * 2


def make_sets(batch, slots, seed):
    n = int(min(32, max(2, cdiv(8 * L2_BYTES, kv_bytes(batch, slots)))))
    key = jax.random.key(seed)
    sets = []
    for i in range(n):
        kq, kk, kv = jax.random.split(jax.random.fold_in(key, i), 3)
        q = jax.random.normal(kq, (batch, HQ, D), jnp.bfloat16)
        k = jax.random.normal(kk, (batch, HKV, slots, D), jnp.bfloat16)
        v = jax.random.normal(kv, (batch, HKV, slots, D), jnp.bfloat16)
        sets.append((q, k, v, jnp.ones((batch, slots), bool)))
    return sets


def time_per_call(fn, sets, target_s=0.08):
    n = len(sets)

    def many(*flat):
        return [fn(*flat[4 * i : 4 * i + 4]) for i in range(n)]

    jf = jax.jit(many)
    flat = [x for s in sets for x in s]
    jax.block_until_ready(jf(*flat))
    t0 = time.perf_counter()
    jax.block_until_ready(jf(*flat))
    est = time.perf_counter() - t0
    reps = max(2, min(300, int(target_s / max(est, 1e-6))))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        res = None
        for _ in range(reps):
            res = jf(*flat)
        jax.block_until_ready(res)
        times.append((time.perf_counter() - t0) / (reps * n))
    return statistics.median(times), (max(times) - min(times)) / statistics.median(times)


def kernel_times(fn, sets, reps=5):
    """GPU time per call from a profiler trace: {kernel name: us per call} plus the busy span per call."""
    n = len(sets)
    jf = jax.jit(lambda *flat: [fn(*flat[4 * i : 4 * i + 4]) for i in range(n)])
    flat = [x for s in sets for x in s]
    jax.block_until_ready(jf(*flat))
    per, span, devs, _ = profile_kernels(lambda: jf(*flat), reps, n)
    return per, span, devs


def trace_events(run, reps):
    """Trace `reps` runs of `run()` (already compiled) with jax.profiler: (complete events, the pids of
    the GPU tracks, {pid: process name})."""
    import glob
    import gzip
    import tempfile

    logdir = tempfile.mkdtemp()
    jax.profiler.start_trace(logdir, create_perfetto_trace=True)
    res = None
    for _ in range(reps):
        res = run()
    jax.block_until_ready(res)
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(logdir, "**", "*.json.gz"), recursive=True)[0]
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    pnames = {
        e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    gpu = {p for p, name in pnames.items() if "GPU" in name or "gpu" in name}
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    return complete, gpu, pnames


def profile_kernels(run, reps, calls_per_run):
    """Trace `reps` runs of `run()` (already compiled) with jax.profiler.

    Returns ({kernel name: us per call}, busy span per call in us, GPU track names, idle us per call):
    the span runs from the first kernel's start to the last one's end; idle is the span minus the union
    of kernel intervals (gaps where the GPU waited, e.g. on the host's launches)."""
    events, gpu, pnames = trace_events(run, reps)
    kern = [e for e in events if e.get("pid") in gpu]
    calls = reps * calls_per_run
    per = {}
    for e in kern:
        per[e["name"]] = per.get(e["name"], 0.0) + e["dur"] / calls
    if not kern:
        return per, 0.0, sorted({pnames[p] for p in gpu}), 0.0
    start = min(e["ts"] for e in kern)
    end = max(e["ts"] + e["dur"] for e in kern)
    busy, cur_start, cur_end = 0.0, None, None
    for e in sorted(kern, key=lambda e: e["ts"]):
        if cur_end is None or e["ts"] > cur_end:
            busy += 0.0 if cur_end is None else cur_end - cur_start
            cur_start, cur_end = e["ts"], e["ts"] + e["dur"]
        else:
            cur_end = max(cur_end, e["ts"] + e["dur"])
    busy += cur_end - cur_start
    return per, (end - start) / calls, sorted({pnames[p] for p in gpu}), (end - start - busy) / calls


def profile_host(run, reps, calls_per_run, top=12):
    """[(host event name, us per call, count per call)] of the `top` host-side events by total time:
    where the CPU spends each call (thunk execution, driver API calls such as cuLaunchKernel)."""
    events, gpu, _ = trace_events(run, reps)
    calls = reps * calls_per_run
    total, count = {}, {}
    for e in events:
        if e.get("pid") in gpu:
            continue
        name = e["name"]
        total[name] = total.get(name, 0.0) + e["dur"] / calls
        count[name] = count.get(name, 0) + 1 / calls
    ranked = sorted(total, key=lambda n: -total[n])[:top]
    return [(n, total[n], count[n]) for n in ranked]


@functools.cache
def touch_kernel():
    """The smallest jax-triton launch: one thread loads an int32, adds 1, stores it. Host launch-cost
    probes use it (here and scripts/probe_launch_cost.py)."""
    import triton
    import triton.language as tl

    @triton.jit
    def touch(x_ptr, o_ptr):
        tl.store(o_ptr, tl.load(x_ptr) + 1)

    return touch


def launch_overhead():
    """Wall time per call of an empty jax-triton kernel, 64 calls in one jit (host launch cost)."""
    import jax_triton as jt

    xs = [jnp.full((1,), i, jnp.int32) for i in range(64)]
    call = lambda x: jt.triton_call(
        x, kernel=touch_kernel(), out_shape=jax.ShapeDtypeStruct((1,), jnp.int32), grid=(1,)
    )
    jf = jax.jit(lambda *a: [call(x) for x in a])
    jax.block_until_ready(jf(*xs))
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(20):
            r = jf(*xs)
        jax.block_until_ready(r)
        ts.append((time.perf_counter() - t0) / (20 * 64))
    per, span, _ = kernel_times(lambda *a: call(a[0]), [(x, x, x, x) for x in xs[:32]])
    return statistics.median(ts), per, span


def copy_ceiling():
    x = jax.random.normal(jax.random.key(0), (2**29,), jnp.bfloat16)  # 1 GiB
    out = {}
    for name, f in [("copy", lambda a: jnp.copy(a)), ("x+1", lambda a: a + 1)]:
        jf = jax.jit(f)
        jax.block_until_ready(jf(x))
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(jf(x))
            ts.append(time.perf_counter() - t0)
        out[name] = 2 * x.nbytes / min(ts) / 1e12
    return out


def check(sets, scale, **kw):
    q, k, v, valid = sets[0]
    out, ev = longflow_decode_attention_triton(q, k, v, valid, scale=scale, **kw)
    ref_out, ref_ev = longflow_decode_attention_reference(q, k, v, valid, scale=scale)
    rel = float(
        jnp.linalg.norm(out.astype(jnp.float32) - ref_out.astype(jnp.float32)) / jnp.linalg.norm(ref_out)
    )
    same = bool((ev == ref_ev).all()) if kw.get("compute_evict", True) else bool((ev == -1).all())
    return rel, same


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget", type=float, default=240.0, help="seconds; stop starting new timings after")
    ap.add_argument("--phases", default="ab")
    ap.add_argument("--configs", default="", help="phase A configs 'bc:w:st,...' (default: built-in list)")
    ap.add_argument(
        "--diag", default="", help="phase d: 'B:C:block_c:warps:stages:splits,...' traced with the profiler"
    )
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    deadline = time.time() + args.budget
    log = open(os.path.join(args.out, "tune.jsonl"), "a")
    scale = 1 / math.sqrt(D)
    dev = jax.devices()[0]
    print(f"device {dev.device_kind} sms={getattr(dev, 'core_count', '?')} jax {jax.__version__}", flush=True)
    ceil = copy_ceiling()
    print(f"ceiling TB/s: {ceil}", flush=True)
    log.write(json.dumps({"ceiling_tbs": ceil, "device": dev.device_kind}) + "\n")

    rows = []
    sets_cache = {}

    def sets_for(shape):
        if shape not in sets_cache:
            sets_cache.clear()  # hold one shape's copies at a time
            sets_cache[shape] = make_sets(*shape, seed=hash(shape) % 1000)
        return sets_cache[shape]

    def run(shape, tag, **kw):
        if time.time() > deadline:
            return None
        batch, slots = shape
        sets = sets_for(shape)
        try:
            rel, same = check(sets, scale, **kw)
            t, spread = time_per_call(
                lambda *a: longflow_decode_attention_triton(*a, scale=scale, **kw), sets
            )
        except Exception as e:  # a config that fails to compile is a result, not a crash
            print(f"  {shape} {tag} {kw}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            return None
        tbs = floor_bytes(batch, slots) / t / 1e12
        row = dict(
            B=batch, C=slots, tag=tag, us=t * 1e6, tbs=tbs, spread=spread, rel=rel, evict_ok=same, **kw
        )
        rows.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(
            f"  B={batch:3d} C={slots:5d} {tag:8s} {kw}: {t * 1e6:8.1f} us {tbs:5.2f} TB/s "
            f"(spread {spread:.1%}) rel={rel:.1e} evict_ok={same}",
            flush=True,
        )
        return row

    if "d" in args.phases:
        wall, per, span = launch_overhead()
        print(
            f"empty jax-triton kernel: {wall * 1e6:.1f} us wall per call; GPU {per} span {span:.1f} us",
            flush=True,
        )
        log.write(json.dumps({"empty_kernel_wall_us": wall * 1e6, "gpu": per, "span_us": span}) + "\n")
        for spec in filter(None, args.diag.split(",")):
            # B:C:block_c:warps:stages:splits[:f|s|c|a[:e|n|en[:overrides]]] (splits "d": the default;
            # epilogue fused/separate/coop/a = the default; evict, no-evict, both; overrides: LaunchConfig
            # switches joined by "+", "name" or "name=0")
            fields = spec.split(":")
            batch, slots, bc, w, st = (int(x) for x in fields[:5])
            sp = None if fields[5] == "d" else int(fields[5])
            epilogue = {"f": "fused", "s": "separate", "c": "coop", "a": None}[
                fields[6] if len(fields) > 6 else "f"
            ]
            evicts = [{"e": True, "n": False}[x] for x in (fields[7] if len(fields) > 7 else "en")]
            overrides = {}
            for item in filter(None, (fields[8] if len(fields) > 8 else "").split("+")):
                name, _, value = item.partition("=")
                overrides[name] = value != "0"
            sets = sets_for((batch, slots))
            for ev in evicts:
                kw = dict(
                    block_c=bc, num_warps=w, num_stages=st, num_splits=sp, compute_evict=ev, epilogue=epilogue
                )
                if overrides:
                    kw["overrides"] = overrides
                fn = lambda *a, kw=kw: longflow_decode_attention_triton(*a, scale=scale, **kw)  # noqa: E731
                try:
                    rel, same = check(sets, scale, **kw)
                    wall_t, _ = time_per_call(fn, sets)
                    per, span, devs = kernel_times(fn, sets)
                except Exception as e:
                    print(f"  diag {spec} ev={ev}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                gpu_total = sum(per.values())
                row = dict(
                    B=batch,
                    C=slots,
                    tag="D",
                    wall_us=wall_t * 1e6,
                    gpu_us=gpu_total,
                    span_us=span,
                    kernels=per,
                    devices=devs,
                    rel=rel,
                    evict_ok=same,
                    **kw,
                )
                log.write(json.dumps(row) + "\n")
                log.flush()
                ks = ", ".join(f"{k[:40]} {v:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:4])
                print(
                    f"  diag B={batch:3d} C={slots:5d} {kw}: wall {wall_t * 1e6:.1f} us, GPU kernels "
                    f"{gpu_total:.1f} us ({floor_bytes(batch, slots) / gpu_total / 1e6:.2f} TB/s), span "
                    f"{span:.1f} us [{ks}] rel={rel:.1e} evict_ok={same}",
                    flush=True,
                )

    best_cfg = (64, 4, 3)
    if "a" in args.phases:
        configs = PHASE_A
        if args.configs:
            configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
        score = {}
        for shape in PROBE_SHAPES:
            for bc, w, st in configs:
                r = run(shape, "A", block_c=bc, num_warps=w, num_stages=st)
                if r:
                    score.setdefault((bc, w, st), []).append(r["tbs"])
        full = {c: s for c, s in score.items() if len(s) == len(PROBE_SHAPES)}
        if full:
            best_cfg = max(full, key=lambda c: sum(full[c]))
        print(f"phase A best (block_c, num_warps, num_stages) = {best_cfg}", flush=True)

    if "b" in args.phases:
        bc, w, st = best_cfg
        for shape in SHAPES:
            batch, slots = shape
            best = None
            for size in SPLIT_SIZES:
                if size > slots or size < bc:
                    continue
                splits = slots // size
                r = run(shape, "B", block_c=bc, num_warps=w, num_stages=st, num_splits=splits)
                if r and (best is None or r["us"] < best["us"]):
                    best = r
            r = run(shape, "B-dflt", block_c=bc, num_warps=w, num_stages=st)
            if best:
                run(
                    shape,
                    "B-noev",
                    block_c=bc,
                    num_warps=w,
                    num_stages=st,
                    num_splits=best["num_splits"],
                    compute_evict=False,
                )
                if best["num_splits"] > 1:
                    run(
                        shape,
                        "B-noev1",
                        block_c=bc,
                        num_warps=w,
                        num_stages=st,
                        num_splits=1,
                        compute_evict=False,
                    )
                if batch == 1:
                    run(
                        shape,
                        "B-xla",
                        block_c=bc,
                        num_warps=w,
                        num_stages=st,
                        num_splits=best["num_splits"],
                        final_reduce="xla",
                    )

    with open(os.path.join(args.out, "tune.md"), "w") as f:
        f.write(f"device {dev.device_kind}; copy ceiling {ceil}\n\n")
        f.write(
            "| B | C | tag | config | us | TB/s | rel err | evict ok |\n|---|---|---|---|---|---|---|---|\n"
        )
        for r in rows:
            cfg = {
                k: r[k]
                for k in r
                if k in ("block_c", "num_warps", "num_stages", "num_splits", "compute_evict", "final_reduce")
            }
            f.write(
                f"| {r['B']} | {r['C']} | {r['tag']} | {cfg} | {r['us']:.1f} | {r['tbs']:.2f} | "
                f"{r['rel']:.1e} | {r['evict_ok']} |\n"
            )
    print(open(os.path.join(args.out, "tune.md")).read())


if __name__ == "__main__":
    np.set_printoptions(linewidth=150)
    main()
