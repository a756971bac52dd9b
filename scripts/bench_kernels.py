"""Benchmark the fused LongFlow decode kernels on a GPU (correctness first, then median latency).

Columns, for B in {1, 16, 64}, C in {2048, 8192}, Hq/Hkv 32/8, D 128, bf16, a full buffer (all slots valid,
the steady state of LongFlow decoding):
  pallas          pallas_kernels.longflow_decode_attention (attention + importance + evict slot)
  pallas_noevict  the same kernel with compute_evict=False (attention only: the eviction overhead is the
                  difference)
  xla_attn        plain decode attention through XLA (jnp einsums + softmax, jitted, no scoring)
  xla_longflow    the jnp reference (attention + importance + argmin through XLA)
  triton          cuda_triton_bridge.longflow_decode_attention_triton, when that package imports and
                  triton + jax_triton are there (the TRITON HOOK below); otherwise omitted. As generate
                  calls it: one persistent ticket buffer threaded through the chain (a Stateful column)
  triton_fresh    the same with a fresh zeroed ticket buffer per call (sessions 1-11); _noevict without
                  scoring
  triton_tickets_{fused1,coop,xla,xla_noevict,nodiscard,nohints}  on persistent tickets: a one-launch
                  epilogue, XLA's launch for every kernel, or t's L2 switches off
  triton_reduce   the same with vnorm="reduce" (||v||_1 as a row sum, not on the tensor cores)
  triton_noevict  the same with compute_evict=False
  triton_ffi      the same launched through jaxlib's typed-FFI Triton target (ffi_call override)
  triton_xla      the same launched through XLA's own Triton custom call at every size (the default
                  takes it at a small batch only); triton_xla_noevict without scoring,
                  triton_xla_{fused,separate,coop} with that epilogue
  triton_jt       the same with every kernel launched through jax-triton; triton_jt_noevict without scoring
  triton_xlacomb  the main kernel through jax-triton, the combine kernel through XLA's Triton call
  triton_fused / triton_separate / triton_coop  the same with the epilogue forced to "fused" (one
                  launch, last-arriving programs finish), "separate" (split + combine kernels) or "coop"
                  (one launch, a barrier, every program finishes a share; only where the grid fits one
                  program per SM); the triton column takes the measured choice
  copy            the copy-bandwidth ceiling measured in this run (device-to-device, read + write)

Method: every column is first checked against the jnp reference on the same inputs (out by relative
L2 error; evict slot exactly, or within 1e-5 of the minimum importance for bf16 near-ties). Timing jits
one program that makes a chain of at least 32 calls (each call's q is the previous call's output, so
XLA can neither merge nor overlap calls), rotating K/V over several input sets (distinct buffers,
together well over the 50 MB L2, so no call finds its K/V in cache); the per-call time is the median
over repetitions of that program's wall time (after jax.block_until_ready) divided by the number of
calls (latency, the default). With --queued Q each repetition queues Q executions before one sync
(throughput: the host's launches overlap the GPU's previous execution, so what remains is the GPU's
time per call when the host keeps ahead). With --loops N the program runs its chain N times inside a
lax.fori_loop, as a decode loop runs its step: the loop body's buffers stay the same, where each program
execution gets new output buffers and XLA updates its CUDA graph for them (most of the time per call at
B = 1 without it; docs/BENCHMARKS.md, session 12). With --interleave the repetitions of one size go
round-robin over the columns, so the machine's drift hits all columns alike. Achieved bandwidth =
bytes of K + V read / time.

  python3 scripts/bench_kernels.py [--out FILE.md] [--sweep] [--deadline SECONDS]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from longflow_jax.reference import (
    decode_attention_probs,
    longflow_decode_attention_reference,
    longflow_importance,
)
from pallas_kernels import decode_attention as pk
from pallas_kernels import longflow_decode_attention

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, jnp.bfloat16
SIZES = [(b, c) for b in (1, 16, 64) for c in (2048, 8192)]
L2_BYTES = 50e6
ROTATE_BYTES = 8 * L2_BYTES  # input sets per size span at least this many bytes
MAX_SETS = 32

# ---- TRITON HOOK: the native-Triton column (cuda_triton_bridge), omitted when it cannot run ----
try:
    from cuda_triton_bridge import longflow_decode_attention_triton

    try:
        from cuda_triton_bridge import triton_available
    except ImportError:  # an older bridge without the probe: try it and let the check below decide
        triton_available = lambda: True  # noqa: E731
except ImportError:
    longflow_decode_attention_triton = None
    triton_available = lambda: False  # noqa: E731


def xla_attention(q, k, v, kv_valid, *, scale):
    """Plain decode attention over the slot buffer through XLA: no scoring."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    qg = q.reshape(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    s = jnp.einsum("bkgd,bkcd->bkgc", qg, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(kv_valid[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bkgc,bkcd->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, num_q_heads, head_dim).astype(q.dtype), None


@dataclasses.dataclass(frozen=True)
class Stateful:
    """A column whose calls thread a state, as a decode loop threads the Triton kernel's persistent
    tickets: fn(q, k, v, kv_valid, state) -> (out, evict, state), the first state init(q). Called with
    the four inputs alone it makes one call from a fresh state (what check_column runs);
    `chain_program` threads the state from call to call."""

    fn: object
    init: object

    def __call__(self, q, k, v, kv_valid):
        out, evict, _ = self.fn(q, k, v, kv_valid, self.init(q))
        return out, evict


def _with_tickets(fn):
    """The Triton entry point as a Stateful column: one persistent ticket buffer through the chain."""
    from cuda_triton_bridge import new_tickets

    return Stateful(
        fn=lambda q, k, v, kv_valid, tickets: fn(q, k, v, kv_valid, tickets=tickets),
        init=lambda q: new_tickets(q.shape[0], NUM_KV_HEADS),
    )


# The Triton columns: name -> the entry point's keyword arguments (TRITON HOOK). "tickets": True makes
# the column thread a persistent ticket buffer through its calls (Stateful).
_JAX_TRITON_ONLY = dict(xla_call=False, xla_combine=False)  # every kernel through jax-triton
TRITON_COLUMNS = {
    # As generate calls it: each layer's persistent tickets threaded through its calls (since session 12).
    "triton": dict(tickets=True),
    "triton_noevict": dict(tickets=True, compute_evict=False),  # scoring off, for the eviction overhead
    # A fresh zeroed ticket buffer per call (the one-launch epilogues' zero fill; sessions 1-11).
    "triton_fresh": {},
    "triton_fresh_noevict": dict(compute_evict=False),
    # One launch at B = 9-32 (the default there is the separate epilogue): fused with one 128-slot split,
    # or coop, both on persistent tickets; and every kernel through XLA's launch with them.
    "triton_tickets_fused1": dict(tickets=True, epilogue="fused", block_c=128, num_splits=1),
    "triton_tickets_coop": dict(tickets=True, epilogue="coop"),
    "triton_tickets_xla": dict(tickets=True, overrides=dict(xla_call=True)),
    "triton_tickets_xla_noevict": dict(tickets=True, compute_evict=False, overrides=dict(xla_call=True)),
    # The t-traffic switches off (docs/KERNEL_NOTES_triton.md, session 4), on persistent tickets.
    "triton_tickets_nodiscard": dict(tickets=True, overrides=dict(discard_t=False)),
    "triton_tickets_nohints": dict(tickets=True, overrides=dict(discard_t=False, cache_hints=False)),
    "triton_reduce": dict(vnorm="reduce"),  # ||v||_1 as a row sum (the pre-session-3 method)
    # jaxlib's typed-FFI target, not jax-triton's legacy call
    "triton_ffi": dict(overrides=dict(ffi_call=True, **_JAX_TRITON_ONLY)),
    "triton_ffi_noevict": dict(compute_evict=False, overrides=dict(ffi_call=True, **_JAX_TRITON_ONLY)),
    # The combine kernel alone through XLA's Triton call, the main kernel through jax-triton (the default
    # at B * Hkv >= SMs / 2 since session 10).
    "triton_xlacomb": dict(overrides=dict(xla_call=False, xla_combine=True)),
    # jax-triton's launch for every kernel at every size (the default takes XLA's at a small batch, and
    # XLA's for the combine kernel everywhere).
    "triton_jt": dict(overrides=_JAX_TRITON_ONLY),
    "triton_jt_noevict": dict(compute_evict=False, overrides=_JAX_TRITON_ONLY),
    # XLA's own Triton custom call for every kernel: the measured epilogue, or a forced one.
    "triton_xla": dict(overrides=dict(xla_call=True)),
    "triton_xla_noevict": dict(compute_evict=False, overrides=dict(xla_call=True)),
    **{
        f"triton_xla_{e}": dict(epilogue=e, overrides=dict(xla_call=True))
        for e in ("fused", "separate", "coop")
    },
    **{f"triton_{e}": dict(epilogue=e) for e in ("fused", "separate", "coop")},
}


def columns(scale, granularity="sequence", extra=None):
    cols = {
        "pallas": functools.partial(
            longflow_decode_attention, scale=scale, granularity=granularity, **(extra or {})
        ),
        "pallas_noevict": functools.partial(
            longflow_decode_attention,
            scale=scale,
            granularity=granularity,
            compute_evict=False,
            **(extra or {}),
        ),
        "xla_attn": functools.partial(xla_attention, scale=scale),
        "xla_longflow": functools.partial(
            longflow_decode_attention_reference, scale=scale, granularity=granularity
        ),
    }
    if longflow_decode_attention_triton is not None and triton_available():
        for name, kwargs in TRITON_COLUMNS.items():
            kwargs = dict(kwargs)
            tickets = kwargs.pop("tickets", False)
            fn = functools.partial(
                longflow_decode_attention_triton, scale=scale, granularity=granularity, **kwargs
            )
            cols[name] = _with_tickets(fn) if tickets else fn
    return cols


def make_sets(batch, slots, n_sets, seed=0):
    sets = []
    key = jax.random.PRNGKey(seed)
    for _ in range(n_sets):
        key, kq, kk, kv = jax.random.split(key, 4)
        q = jax.random.normal(kq, (batch, NUM_Q_HEADS, HEAD_DIM), jnp.float32).astype(DTYPE)
        k = jax.random.normal(kk, (batch, NUM_KV_HEADS, slots, HEAD_DIM), jnp.float32).astype(DTYPE)
        v = jax.random.normal(kv, (batch, NUM_KV_HEADS, slots, HEAD_DIM), jnp.float32).astype(DTYPE)
        sets.append((q, k, v, jnp.ones((batch, slots), bool)))
    return jax.block_until_ready(sets)


def kv_bytes(batch, slots):
    return 2 * batch * NUM_KV_HEADS * slots * HEAD_DIM * jnp.dtype(DTYPE).itemsize


def check_column(name, fn, inputs, scale, granularity="sequence"):
    """Raise if the column disagrees with the reference on these inputs; return a short summary."""
    q, k, v, kv_valid = inputs
    out, evict = jax.jit(fn)(*inputs)
    ref_out, ref_evict = jax.jit(
        functools.partial(longflow_decode_attention_reference, scale=scale, granularity=granularity)
    )(*inputs)
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref_out, np.float32)
    rel = float(np.linalg.norm(out32 - ref32) / np.linalg.norm(ref32))
    if not np.all(np.isfinite(out32)) or rel > 2e-2:
        raise AssertionError(f"{name}: out rel err {rel:.2e}")
    if evict is None:
        return f"out rel {rel:.1e}"
    if name.endswith("noevict"):  # compute_evict=False: the contract's placeholder, -1 everywhere
        if not np.all(np.asarray(evict) == -1):
            raise AssertionError(f"{name}: evict_slot should be all -1, got {evict}")
        return f"out rel {rel:.1e}, evict -1"
    evict, ref_evict = np.asarray(evict), np.asarray(ref_evict)
    if np.array_equal(evict, ref_evict):
        return f"out rel {rel:.1e}, evict equal"
    _, probs = decode_attention_probs(q, k, v, kv_valid, scale)
    imp = np.asarray(longflow_importance(probs, v, kv_valid, granularity))
    chosen = np.take_along_axis(imp, evict.reshape(imp.shape[:2])[..., None], -1)[..., 0]
    gap = float(np.max((chosen - imp.min(-1)) / np.abs(imp.min(-1))))
    if gap > 1e-5:
        raise AssertionError(f"{name}: evict {evict} vs reference {ref_evict}, importance gap {gap:.1e}")
    return f"out rel {rel:.1e}, evict within {gap:.0e} of min (near-tie)"


MIN_CALLS_PER_PROGRAM = 32


def chain_program(fn, sets, min_calls=MIN_CALLS_PER_PROGRAM, loops=1):
    """(jitted program, calls per run): >= min_calls calls of fn chained through q, K/V rotating, run
    `loops` times.

    The calls form a chain: each call's query is the previous call's output (same shape and dtype,
    so no extra op), as in a decode step where layer l+1 waits for layer l. XLA then cannot merge or
    overlap two calls that share K/V; the 2026-11-23 16:24 run, whose calls were independent, let XLA
    read one K/V for several calls and showed xla_attn above the copy ceiling. K/V rotate over the
    input sets (> 8x L2 together), so no call finds its K/V in cache. Run it as program(q0, sets).

    loops > 1 runs the chain as the body of a `lax.fori_loop`, as a decode loop runs its step: the body's
    buffers stay the same from one iteration to the next, where each execution of a program gets new
    output buffers (and XLA updates its CUDA graph for them). The outputs are the last iteration's.
    """
    n_calls = max(min_calls, len(sets))
    stateful = isinstance(fn, Stateful)

    def chain(q, state, sets):
        evicts = []
        for i in range(n_calls):
            if stateful:  # one state through the whole chain
                q, evict, state = fn.fn(q, *sets[i % len(sets)][1:], state)
            else:
                q, evict = fn(q, *sets[i % len(sets)][1:])
            evicts.append(evict)
        return q, state, evicts

    def calls(q, sets):
        state = fn.init(q) if stateful else None  # made once per program
        if loops == 1:
            q, _, evicts = chain(q, state, sets)
            return q, evicts
        shapes = jax.eval_shape(lambda q, state: chain(q, state, sets)[2], q, state)
        evicts = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        # Every iteration's evicts go into the carry, so no call of any iteration is dead code.
        q, _, evicts = jax.lax.fori_loop(0, loops, lambda _, c: chain(c[0], c[1], sets), (q, state, evicts))
        return q, evicts

    return jax.jit(calls), n_calls * loops


def interleave_entry(name, fn, sets, scale, *, compile_now=False, loops=1):
    """(check summary, (run, calls per run)): column `fn` checked against the reference on sets[0]
    (`check_column`), then its `chain_program` as an entry for `time_interleaved`. compile_now traces and
    compiles it at once, for sweeps that change module constants between columns."""
    summary = check_column(name, fn, sets[0], scale)
    program, n_calls = chain_program(fn, sets, loops=loops)
    run = functools.partial(program, sets[0][0], sets)
    if compile_now:
        jax.block_until_ready(run())
    return summary, (run, n_calls)


def time_column(fn, sets, reps, min_calls=MIN_CALLS_PER_PROGRAM, queued=0, loops=1):
    """Median seconds per call over `reps` runs of `chain_program`. Many calls per host sync keep
    dispatch and sync out of the per-call time."""
    return time_program(*chain_program(fn, sets, min_calls, loops=loops), sets, reps, queued=queued)


def time_runs(run, reps, queued=0):
    """(median, (min, max)) seconds per run() over `reps` repetitions, after two warm-ups.

    queued=0 (latency): each repetition is one run() followed by a host sync. queued=Q (throughput):
    each repetition queues Q runs back to back and syncs once, so the host's launches of one run overlap
    the GPU's work on the previous one: the time per run when the host keeps ahead."""
    jax.block_until_ready(run())
    jax.block_until_ready(run())
    per_rep = max(queued, 1)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready([run() for _ in range(per_rep)])
        times.append((time.perf_counter() - t0) / per_rep)
    return statistics.median(times), (min(times), max(times))


def time_interleaved(runs, reps, queued=0):
    """{name: (median, (min, max)) seconds per call} for runs = {name: (run, calls per run)}, with the
    repetitions taken round-robin over the columns (after two warm-ups each): a slow drift of the
    machine (clocks, a neighbour's load) then falls on every column alike, which matters at B = 1,
    where whole tables moved by up to 2x between runs."""
    for run, _ in runs.values():
        jax.block_until_ready(run())
        jax.block_until_ready(run())
    per_rep = max(queued, 1)
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, (run, n_calls) in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready([run() for _ in range(per_rep)])
            times[name].append((time.perf_counter() - t0) / per_rep / n_calls)
    return {name: (statistics.median(ts), (min(ts), max(ts))) for name, ts in times.items()}


def time_program(program, n_calls, sets, reps, queued=0):
    """(median, (min, max)) seconds per call of a `chain_program`: `time_runs` of one execution, divided
    by its calls."""
    median, (lo, hi) = time_runs(lambda: program(sets[0][0], sets), reps, queued)
    return median / n_calls, (lo / n_calls, hi / n_calls)


def measure_copy_bandwidth(nbytes=4 << 30, reps=20):
    x = jax.random.normal(jax.random.PRNGKey(1), (nbytes // 2,), jnp.float32).astype(jnp.bfloat16)
    neg = jax.jit(lambda x: -x)  # read once, write once; a copy XLA cannot elide
    jax.block_until_ready(neg(x))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(neg(x))
        times.append(time.perf_counter() - t0)
    del x
    return 2 * nbytes / statistics.median(times)


def measure_matmul_rate(n=8192, reps=10):
    a = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.float32).astype(jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(3), (n, n), jnp.float32).astype(jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(mm(a, b))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(mm(a, b))
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def n_sets_for(batch, slots):
    return int(min(MAX_SETS, max(2, math.ceil(ROTATE_BYTES / kv_bytes(batch, slots)))))


SWEEP_LAUNCHES = [
    (64, 4, 3),
    (32, 4, 3),
    (128, 4, 3),
    (128, 8, 3),
    (64, 4, 2),
    (64, 4, 4),
    (64, 8, 3),
    (128, 4, 2),
    (32, 2, 4),
]


def sweep(sizes, scale, reps, deadline, log, splits_list=None, queued=0, launches=None):
    """Tuning sweep of the Pallas kernel's launch parameters (block_c, warps, stages, splits).

    splits_list: the split counts to try (those that divide the block count); default: the rule's
    choice, half and double it. launches: (block_c, num_warps, num_stages) triples (default
    SWEEP_LAUNCHES)."""
    results = []
    for batch, slots in sizes:
        n_sets = n_sets_for(batch, slots)
        sets = make_sets(batch, slots, n_sets, seed=7)
        configs = []
        for block_c, warps, stages in launches or SWEEP_LAUNCHES:
            n_blocks = math.ceil(slots / block_c)
            auto = pk._default_num_splits("triton", batch, NUM_KV_HEADS, n_blocks, block_c)
            candidates = splits_list or {auto, max(1, auto // 2), min(auto * 2, slots // block_c)}
            for splits in sorted(x for x in set(candidates) if n_blocks % x == 0):
                configs.append(dict(block_c=block_c, num_warps=warps, num_stages=stages, num_splits=splits))
        for cfg in configs:
            if time.time() > deadline:
                log(f"sweep: deadline reached, skipping the rest at B={batch} C={slots}")
                break
            fn = functools.partial(longflow_decode_attention, scale=scale, **cfg)
            try:
                t, _ = time_column(fn, sets, reps, queued=queued)
            except Exception as e:  # a config Triton cannot compile: record it, go on
                log(f"sweep B={batch} C={slots} {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}")
                continue
            bw = kv_bytes(batch, slots) / t
            results.append(dict(batch=batch, slots=slots, **cfg, us=t * 1e6, tbps=bw / 1e12))
            log(f"sweep B={batch:3d} C={slots:5d} {cfg} {t * 1e6:9.1f} us {bw / 1e12:5.2f} TB/s")
        del sets
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", help="write the table as markdown here")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--sweep", action="store_true", help="also sweep the Pallas launch parameters")
    parser.add_argument("--sweep-sizes", default="1x8192,16x8192,64x2048")
    parser.add_argument(
        "--sweep-splits", help="comma-separated split counts for the sweep (default: rule, /2, x2)"
    )
    parser.add_argument("--sweep-launches", help="block_c:num_warps:num_stages,... for the sweep")
    parser.add_argument("--deadline", type=float, default=1e9, help="seconds from start for the sweep")
    parser.add_argument("--sizes", default=",".join(f"{b}x{c}" for b, c in SIZES))
    parser.add_argument("--copy-mb", type=int, default=4096, help="buffer size for the copy ceiling")
    parser.add_argument("--matmul-n", type=int, default=8192)
    parser.add_argument("--columns", help="comma-separated subset of the columns (default: all)")
    parser.add_argument(
        "--queued",
        type=int,
        default=0,
        help="time throughput: queue this many executions per sync (default 0: latency, one per sync)",
    )
    parser.add_argument(
        "--loops",
        type=int,
        default=1,
        help="run each program's chain of calls this many times in a lax.fori_loop (default 1: once)",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="take each size's repetitions round-robin over the columns (default: column after column)",
    )
    args = parser.parse_args(argv)
    start = time.time()
    log = functools.partial(print, flush=True)
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        log(f"warning: running on {dev.platform}, not a GPU: the numbers mean nothing")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    timing = f"throughput, {args.queued} executions queued per sync" if args.queued else "latency"
    timing += ", columns interleaved" if args.interleave else ""
    timing += f", the chain run {args.loops} times in a fori_loop" if args.loops > 1 else ""
    header = f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, {stamp}, timing: {timing}"
    log(header)
    log(f"command: {' '.join([sys.executable.split('/')[-1]] + sys.argv)}")
    scale = HEAD_DIM**-0.5
    copy_bw = measure_copy_bandwidth(args.copy_mb << 20)
    mm_rate = measure_matmul_rate(args.matmul_n)
    log(f"ceilings: copy {copy_bw / 1e12:.2f} TB/s (read+write), bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s")

    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    rows = []
    for batch, slots in sizes:
        n_sets = n_sets_for(batch, slots)
        sets = make_sets(batch, slots, n_sets)
        cols = columns(scale)
        if args.columns:
            wanted = args.columns.split(",")
            unknown = set(wanted) - set(cols)
            if unknown:
                raise SystemExit(f"unknown or unavailable columns {sorted(unknown)}; have {sorted(cols)}")
            cols = {n: cols[n] for n in wanted}
        nbytes = kv_bytes(batch, slots)
        flops = 4 * batch * NUM_Q_HEADS * slots * HEAD_DIM
        row = dict(
            batch=batch,
            slots=slots,
            kv_mb=nbytes / 1e6,
            n_sets=n_sets,
            bytes_floor_us=nbytes / copy_bw * 1e6,
            flop_floor_us=flops / mm_rate * 1e6,
        )
        summaries, timings, runs = {}, {}, {}
        for name, fn in cols.items():
            try:
                if args.interleave:
                    summaries[name], runs[name] = interleave_entry(name, fn, sets, scale, loops=args.loops)
                else:
                    summaries[name] = check_column(name, fn, sets[0], scale)
                    timings[name] = time_column(fn, sets, args.reps, queued=args.queued, loops=args.loops)
            except Exception as e:  # report and keep going: one broken column must not hide the rest
                log(f"B={batch} C={slots} {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
                row[name] = None
        if runs:
            timings.update(time_interleaved(runs, args.reps, queued=args.queued))
        for name, (t, (tmin, tmax)) in timings.items():
            summary = summaries[name]
            row[name] = t * 1e6
            row[name + "_tbps"] = nbytes / t / 1e12
            log(
                f"B={batch:3d} C={slots:5d} {name:15s} {t * 1e6:9.1f} us (min {tmin * 1e6:.1f}, max "
                f"{tmax * 1e6:.1f}) {nbytes / t / 1e12:5.2f} TB/s  [{summary}]"
            )
        rows.append(row)
        del sets

    sweep_rows = []
    if args.sweep:
        sweep_sizes = [tuple(int(x) for x in s.split("x")) for s in args.sweep_sizes.split(",")]
        splits_list = [int(x) for x in args.sweep_splits.split(",")] if args.sweep_splits else None
        launches = None
        if args.sweep_launches:
            launches = [tuple(int(x) for x in t.split(":")) for t in args.sweep_launches.split(",")]
        sweep_rows = sweep(
            sweep_sizes,
            scale,
            max(10, args.reps // 2),
            start + args.deadline,
            log,
            splits_list,
            args.queued,
            launches,
        )

    names = [
        n
        for n in (
            "pallas",
            "pallas_noevict",
            "xla_attn",
            "xla_longflow",
            "triton",
            "triton_reduce",
            "triton_noevict",
            "triton_ffi",
            "triton_ffi_noevict",
            "triton_jt",
            "triton_jt_noevict",
            "triton_xlacomb",
            "triton_xla",
            "triton_xla_noevict",
            "triton_xla_fused",
            "triton_xla_separate",
            "triton_xla_coop",
            "triton_fused",
            "triton_separate",
            "triton_coop",
        )
        if any(n in r for r in rows)
    ]
    lines = [
        f"{header}; copy ceiling {copy_bw / 1e12:.2f} TB/s, bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s",
        "",
        "Hq/Hkv 32/8, D 128, bf16, all slots valid; median us per call (TB/s of K+V read); "
        "% ceil = bandwidth / copy ceiling; overhead = fused kernel / the same kernel with scoring off - 1",
        "",
        "| B | C | K+V MB | bytes floor us | flop floor us | "
        + " | ".join(names)
        + " | pallas % ceil | pallas vs xla_attn | triton % ceil | triton overhead |",
        "|" + "---|" * (9 + len(names)),
    ]

    def overhead(x):
        return f"{100 * (x - 1):.1f}%"

    def ratio(r, num, den, fmt):
        return "n/a" if r.get(num) is None or r.get(den) is None else fmt(r[num] / r[den])

    for r in rows:
        cells = []
        for n in names:
            cells.append("n/a" if r.get(n) is None else f"{r[n]:.1f} ({r[n + '_tbps']:.2f})")
        pct = {
            n: "n/a" if r.get(n) is None else f"{100 * r[n + '_tbps'] * 1e12 / copy_bw:.0f}%"
            for n in ("pallas", "triton")
        }
        lines.append(
            f"| {r['batch']} | {r['slots']} | {r['kv_mb']:.0f} | {r['bytes_floor_us']:.1f} | "
            f"{r['flop_floor_us']:.1f} | "
            + " | ".join(cells)
            + f" | {pct['pallas']} | {ratio(r, 'xla_attn', 'pallas', lambda x: f'{x:.2f}x')}"
            + f" | {pct['triton']} | {ratio(r, 'triton', 'triton_noevict', overhead)} |"
        )
    table = "\n".join(lines)
    log("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
            if sweep_rows:
                f.write("\n<!-- sweep\n" + json.dumps(sweep_rows, indent=0) + "\n-->\n")
    log(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
