"""Benchmark the fused LongFlow decode kernels on a GPU: correctness first, then median time per call.

Columns, at B in {1, 16, 64} x C in {2048, 8192}, Hq/Hkv 32/8, D 128, bf16, every slot valid:
  xla_attn        plain decode attention through XLA (no scoring)
  xla_longflow    the jnp reference (attention + importance + argmin through XLA)
  pallas          pallas_kernels.longflow_decode_attention (attention + importance + evict slot)
  triton          cuda_triton_bridge.longflow_decode_attention_triton, one kernel_state threaded through
                  its calls as generate does; omitted where triton, jax_triton or a CUDA device is missing
  *_noevict       the same kernel with compute_evict=False: the eviction overhead is the difference
  *_int8, *_int4  the same call on a quantized buffer (kv_quant, group 32 or --group): payloads + f32
                  scales, and zero points for int4; the reference dequantizes in XLA, the kernels in
                  registers
Each column is checked against the jnp reference, then timed as a chain of dependent calls over K/V
sets far larger than the L2, run --loops times in a lax.fori_loop as a decode loop runs its step, and
set against a bandwidth ceiling measured in a child process (the method: docs/BENCHMARKS.md). A column's
TB/s and % of the ceiling count the K/V bytes it reads: a quantized column its payloads and scales (and
the Triton kernel the stored value norms); the side output t (B x Hq x C f32, written and read back by
the scoring columns) is not counted.

  python3 scripts/bench_kernels.py [--interleave] [--columns a,b] [--sizes 1x2048,...] [--out FILE.md]

--launch COLUMN:FIELD=VALUE,... (repeatable) adds a Triton column run with those LaunchConfig fields
(cuda_triton_bridge/config.py) beside the tuned defaults, named COLUMN[FIELD=VALUE,...]: how the launch
table is tuned, e.g. --launch triton_int4:block_c=32,num_warps=4.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import longflow_decode_attention, quant, reference

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, jnp.bfloat16
SIZES = [(b, c) for b in (1, 16, 64) for c in (2048, 8192)]
QUANT_KINDS, QUANT_GROUP = ("int8", "int4"), 32  # the quantized columns' buffers
COLUMNS = (
    "xla_attn", "xla_longflow", "xla_longflow_int8", "xla_longflow_int4",
    "pallas", "pallas_noevict", "pallas_int8", "pallas_int4",
    "triton", "triton_noevict", "triton_int8", "triton_int4",
)  # fmt: skip
# The input sets of a size span 8x a 50 MB L2, or MAX_SETS sets where those span less (B 1, C 2048:
# bf16 5.4x, int8 3.1x, int4 2.1x).
ROTATE_BYTES = 8 * 50e6
MAX_SETS, MIN_CALLS_PER_PROGRAM = 32, 32


def xla_attention(q, k, v, kv_valid, *, scale):
    """Plain decode attention over the slot buffer through XLA: no scoring."""
    batch, num_q_heads, head_dim = q.shape
    qg = q.reshape(batch, k.shape[1], num_q_heads // k.shape[1], head_dim)
    s = jnp.einsum("bkgd,bkcd->bkgc", qg, k, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(jnp.where(kv_valid[:, None, None, :], s, -jnp.inf), axis=-1)
    out = jnp.einsum("bkgc,bkcd->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, num_q_heads, head_dim).astype(q.dtype), None


def column_kind(name):
    """The kv_quant kind of the buffer a column reads (its name's suffix, before any [launch]), or None."""
    kind = name.split("[")[0].rsplit("_", 1)[-1]
    return kind if kind in quant.KV_QUANT_KINDS else None


def parse_launch(text):
    """ "triton_int4:block_c=32,num_warps=4" -> ("triton_int4", {"block_c": 32, "num_warps": 4})."""
    from cuda_triton_bridge.config import LaunchConfig  # no triton import: the checks run anywhere

    base, _, spec = text.partition(":")
    fields = {f.name for f in dataclasses.fields(LaunchConfig)}
    if not base.startswith("triton") or base not in COLUMNS or not spec:
        raise ValueError(
            f"--launch {text!r}: expected TRITON_COLUMN:FIELD=VALUE,... (a triton column of {COLUMNS})"
        )
    launch = {}
    for item in spec.split(","):
        name, _, value = item.partition("=")
        if name not in fields or not value:
            raise ValueError(
                f"--launch {text!r}: {item!r} is not FIELD=VALUE with FIELD one of {sorted(fields)}"
            )
        launch[name] = int(value) if value.isdigit() else {"true": True, "false": False}.get(value, value)
    return base, launch


@dataclasses.dataclass(frozen=True)
class StatefulColumn:
    """A column that threads a state, as a decode loop threads the Triton kernel's kernel_state:
    call(q, k, v, kv_valid, [kv_scales,] kernel_state=state) -> (out, evict, state), the first state
    init_state(q, k). Called with the inputs alone it makes one call from a fresh state."""

    call: object
    init_state: object

    def __call__(self, q, k, *inputs):
        out, evict, _ = self.call(q, k, *inputs, kernel_state=self.init_state(q, k))
        return out, evict


def on_quantized(fn, kind, **kw):
    """fn (the reference or a kernel, taking the contract's kv_quant / kv_scales keywords) as a column
    over a quantized set's inputs (q, k, v, kv_valid, kv_scales)."""

    def column(q, k, v, kv_valid, kv_scales, **state):
        return fn(q, k, v, kv_valid, kv_quant=kind, kv_scales=kv_scales, **kw, **state)

    return column


def load_triton_bridge():
    """((entry point, init_kernel_state), "") when the Triton kernel can run here, else (None, why)."""
    try:
        from cuda_triton_bridge import init_kernel_state, longflow_decode_attention_triton, triton_available
    except ImportError as e:
        return None, f"cuda_triton_bridge does not import ({e})"
    if not triton_available():
        return None, "triton, jax_triton or a CUDA device is missing"
    return (longflow_decode_attention_triton, init_kernel_state), ""


def columns(scale, triton=None, granularity="sequence", launches=()):
    """{name: fn(q, k, v, kv_valid) -> (out, evict)}, a quantized column's fn(q, k, v, kv_valid,
    kv_scales) on make_sets(kv_quant=column_kind(name))'s inputs; triton: load_triton_bridge()'s pair,
    or None; launches: parse_launch results, each one more Triton column."""
    kw = dict(scale=scale, granularity=granularity)
    ref = reference.longflow_decode_attention_reference
    cols = {
        "xla_attn": functools.partial(xla_attention, scale=scale),
        "xla_longflow": functools.partial(ref, **kw),
        **{f"xla_longflow_{kind}": on_quantized(ref, kind, **kw) for kind in QUANT_KINDS},
        "pallas": functools.partial(longflow_decode_attention, **kw),
        "pallas_noevict": functools.partial(longflow_decode_attention, compute_evict=False, **kw),
        **{f"pallas_{kind}": on_quantized(longflow_decode_attention, kind, **kw) for kind in QUANT_KINDS},
    }
    if triton is not None:
        from cuda_triton_bridge.config import LaunchConfig

        entry, init_kernel_state = triton
        init_state = lambda q, k: init_kernel_state(q.shape[0], k.shape[1])

        def triton_column(name, **launch):
            call = functools.partial(entry, compute_evict=name != "triton_noevict", **launch)
            kind = column_kind(name)
            return StatefulColumn(
                on_quantized(call, kind, **kw) if kind else functools.partial(call, **kw), init_state
            )

        for name in (n for n in COLUMNS if n.startswith("triton")):
            cols[name] = triton_column(name)
        for name, launch in launches:
            spec = ",".join(f"{k}={v}" for k, v in launch.items())
            cols[f"{name}[{spec}]"] = triton_column(name, launch=LaunchConfig(**launch))
    return cols


def make_sets(batch, slots, n_sets, seed=0, kv_quant=None, group=QUANT_GROUP):
    """n_sets input sets (q, k, v, kv_valid); with kv_quant, k and v quantized per slot, `group`
    elements a scale, as the cache stores them: (q, k payload, v payload, kv_valid, KVScales)."""
    sets, key = [], jax.random.PRNGKey(seed)
    for _ in range(n_sets):
        key, kq, kk, kv = jax.random.split(key, 4)
        q = jax.random.normal(kq, (batch, NUM_Q_HEADS, HEAD_DIM), jnp.float32).astype(DTYPE)
        k = jax.random.normal(kk, (batch, NUM_KV_HEADS, slots, HEAD_DIM), jnp.float32).astype(DTYPE)
        v = jax.random.normal(kv, (batch, NUM_KV_HEADS, slots, HEAD_DIM), jnp.float32).astype(DTYPE)
        valid = jnp.ones((batch, slots), bool)
        if kv_quant is None:
            sets.append((q, k, v, valid))
            continue
        k_payload, v_payload, side = quant.quantize_kv(k, v, kv_quant, group)
        sets.append((q, k_payload, v_payload, valid, side))
    return jax.block_until_ready(sets)


def kv_bytes(batch, slots, kv_quant=None, group=QUANT_GROUP, value_norms=True):
    """Bytes of K and V a call reads: with kv_quant, the payloads, their f32 scales (and zero points) and,
    where the column reads them (value_norms: the Triton kernel; the Pallas kernel and the reference sum
    their own), the stored value norms. The side output t is not counted."""
    per_slot = quant.slot_bytes(HEAD_DIM, jnp.dtype(DTYPE).itemsize, kv_quant, group)
    if kv_quant is not None and not value_norms:
        per_slot -= quant.VALUE_NORM_BYTES
    return batch * NUM_KV_HEADS * slots * per_slot


def column_bytes(name, batch, slots, group=QUANT_GROUP):
    """`kv_bytes` of the buffer the column reads, as it reads it."""
    return kv_bytes(batch, slots, column_kind(name), group, value_norms=name.startswith("triton"))


def check_column(name, fn, inputs, scale, granularity="sequence"):
    """Raise if the column disagrees with the reference on these inputs (a quantized column's: the
    reference on the same payloads and scales); return a short summary."""
    kind, kw = column_kind(name), dict(scale=scale, granularity=granularity)
    ref = reference.longflow_decode_attention_reference
    ref = functools.partial(ref, **kw) if kind is None else on_quantized(ref, kind, **kw)
    out, evict = jax.jit(fn)(*inputs)
    ref_out, ref_evict = jax.jit(ref)(*inputs)
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref_out, np.float32)
    rel = float(np.linalg.norm(out32 - ref32) / np.linalg.norm(ref32))
    if not np.all(np.isfinite(out32)) or rel > 2e-2:
        raise AssertionError(f"{name}: out rel err {rel:.2e}")
    if evict is None:
        return f"out rel {rel:.1e}"
    if name.split("[")[0].endswith("noevict"):  # compute_evict=False: the contract's placeholder, -1
        if not np.all(np.asarray(evict) == -1):
            raise AssertionError(f"{name}: evict_slot should be all -1, got {evict}")
        return f"out rel {rel:.1e}, evict -1"
    evict, ref_evict = np.asarray(evict), np.asarray(ref_evict)
    if np.array_equal(evict, ref_evict):
        return f"out rel {rel:.1e}, evict equal"
    q, k, v, kv_valid = inputs[:4]
    if kind is not None:  # the values the buffer holds
        k, v = reference.dequantized_kv(k, v, kind, inputs[4])
    _, probs = reference.decode_attention_probs(q, k, v, kv_valid, scale)
    imp = np.asarray(reference.longflow_importance(probs, v, kv_valid, granularity))
    chosen = np.take_along_axis(imp, evict.reshape(imp.shape[:2])[..., None], -1)[..., 0]
    gap = float(np.max((chosen - imp.min(-1)) / np.abs(imp.min(-1))))
    if gap > 1e-5:
        raise AssertionError(f"{name}: evict {evict} vs reference {ref_evict}, importance gap {gap:.1e}")
    return f"out rel {rel:.1e}, evict within {gap:.0e} of min (near-tie)"


def chain_program(fn, sets, min_calls=MIN_CALLS_PER_PROGRAM, loops=1):
    """(jitted program, calls per run), run as program(q0, sets): max(min_calls, len(sets)) calls of fn,
    each call's q the previous call's output (as layer l+1 waits for layer l), K/V rotating over the sets,
    a StatefulColumn's state made once and threaded through. loops > 1 runs the chain as the body of a
    lax.fori_loop; every iteration's evicts go into the carry, so no call is dead code, and the outputs
    are the last iteration's. Each call's K/V pass an optimization barrier with its q: the sets repeat
    over the calls and the loop, and XLA would otherwise do a column's K/V-only work (f32 conversions,
    ||v||_1, unpacking codes) once per set outside the loop, which no decode step can (its cache changes
    every step): it made the XLA columns up to 2x too fast (CPU)."""
    n_calls = max(min_calls, len(sets))
    stateful = isinstance(fn, StatefulColumn)
    call = fn.call if stateful else lambda q, *inputs, kernel_state: (*fn(q, *inputs), kernel_state)

    def step(q, *inputs, kernel_state):
        q, inputs = jax.lax.optimization_barrier((q, inputs))
        return call(q, *inputs, kernel_state=kernel_state)

    def chain(q, state, sets):
        evicts = []
        for i in range(n_calls):
            q, evict, state = step(q, *sets[i % len(sets)][1:], kernel_state=state)
            evicts.append(evict)
        return q, state, evicts

    def calls(q, sets):
        state = fn.init_state(q, sets[0][1]) if stateful else None
        if loops == 1:
            q, _, evicts = chain(q, state, sets)
            return q, evicts
        shapes = jax.eval_shape(lambda q, state: chain(q, state, sets)[2], q, state)
        evicts = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        q, _, evicts = jax.lax.fori_loop(0, loops, lambda _, c: chain(c[0], c[1], sets), (q, state, evicts))
        return q, evicts

    return jax.jit(calls), n_calls * loops


def time_interleaved(runs, reps, queued=0):
    """{name: (median, (min, max)) seconds per call} for runs = {name: (run, calls per run)}, after two
    warm-ups each, the repetitions round-robin over the runs. queued=0: one run() per host sync
    (latency); queued=Q: Q runs queued per sync, so the host's launches overlap the GPU's work."""
    for run, _ in runs.values():
        jax.block_until_ready([run(), run()])
    per_rep = max(queued, 1)
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, (run, n_calls) in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready([run() for _ in range(per_rep)])
            times[name].append((time.perf_counter() - t0) / per_rep / n_calls)
    return {name: (statistics.median(ts), (min(ts), max(ts))) for name, ts in times.items()}


# ---- The bandwidth ceiling ----


@dataclasses.dataclass(frozen=True)
class Ceiling:
    """The device's streaming bandwidth in bytes/s and the kernel that measured it."""

    bytes_per_s: float
    method: str

    @property
    def note(self):
        if self.method == "jnp copy":  # XLA's copy streams well below a kernel
            return "a jnp copy: neither Triton nor torch with CUDA runs here, so it under-measures"
        return self.method


def _seconds_per_launch(launch, sync, reps=5, per_sync=16):
    """Median seconds per launch() over batches of per_sync launches and one host sync (after a warm-up),
    so neither launch nor sync latency counts; at most two output buffers live at once."""
    sync(launch())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(per_sync):
            result = launch()
        sync(result)
        times.append((time.perf_counter() - t0) / per_sync)
    return statistics.median(times)


def triton_read_bandwidth(nbytes, block=4096, iters=8, num_warps=8):
    """Bytes read per second by a Triton kernel that sums the buffer. A read, not a copy: decode
    attention reads far more than it writes, and a copy's reads and writes share the memory bus."""
    import jax_triton as jt
    import triton
    import triton.language as tl

    @triton.jit
    def read_kernel(src, dst, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
        acc = tl.zeros([BLOCK], tl.int32)
        for i in tl.range(0, ITERS, num_stages=2):
            acc += tl.load(src + base + i * BLOCK + tl.arange(0, BLOCK))
        tl.store(dst + tl.program_id(0), tl.sum(acc, axis=0))

    grid = max(1, nbytes // (4 * block * iters))
    x = jnp.ones((grid * block * iters,), jnp.int32)
    read = jax.jit(
        lambda x: jt.triton_call(x, kernel=read_kernel, out_shape=jax.ShapeDtypeStruct((grid,), jnp.int32),
                                 grid=(grid,), num_warps=num_warps, BLOCK=block, ITERS=iters)
    )  # fmt: skip
    return x.nbytes / _seconds_per_launch(lambda: read(x), jax.block_until_ready)


def torch_copy_bandwidth(nbytes):
    """Bytes read + written per second by torch's device-to-device copy_."""
    import torch

    x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.nbytes / _seconds_per_launch(lambda: y.copy_(x), lambda _: torch.cuda.synchronize())


def jnp_copy_bandwidth(nbytes):
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    neg = jax.jit(lambda x: -x)  # read once, write once; a copy XLA cannot elide
    return 2 * x.nbytes / _seconds_per_launch(lambda: neg(x), jax.block_until_ready)


def can_run_torch_cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def ceiling_measurers(triton_ok, torch_cuda_ok):
    """{method: measure(nbytes) -> bytes/s}: the kernels that run here; the jnp copy only when none
    does (it streams slower than the kernels it would bound)."""
    found = {"triton read kernel": triton_read_bandwidth} if triton_ok else {}
    if torch_cuda_ok:
        found["torch copy_"] = torch_copy_bandwidth
    return found or {"jnp copy": jnp_copy_bandwidth}


def measure_ceiling(measurers, nbytes, log=print):
    """The best bandwidth among the measurers (one that fails is reported and skipped)."""
    rates = {}
    for method, measure in measurers.items():
        try:
            rates[method] = measure(nbytes)
            log(f"ceiling: {method} {rates[method] / 1e12:.2f} TB/s ({nbytes >> 20} MiB)")
        except Exception as e:
            log(f"ceiling: {method} FAILED {type(e).__name__}: {str(e)[:200]}")
    if not rates:
        rates["jnp copy"] = jnp_copy_bandwidth(nbytes)
    best = max(rates, key=rates.get)
    return Ceiling(rates[best], best)


def ceiling_in_child(nbytes, log=print):
    """measure_ceiling in a child process (this script with --ceiling-only): torch or the ceiling
    kernels loaded in the process that times the columns slow the B = 1 columns (about 10%, H200)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # the parent may hold the memory pool
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    cmd = [sys.executable, os.path.abspath(__file__), "--ceiling-only", "--copy-mb", str(nbytes >> 20)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the ceiling's child process failed:\n{proc.stderr[-2000:]}")
    *lines, result = proc.stdout.strip().splitlines()
    for line in lines:
        log(line)
    return Ceiling(**json.loads(result))


def _cell(seconds, nbytes, ceiling):
    """A timed call that reads nbytes: median us (TB/s, % of the bandwidth ceiling); n/a if untimed."""
    if seconds is None:
        return "n/a"
    rate = nbytes / seconds
    return f"{seconds * 1e6:.1f} ({rate / 1e12:.2f}, {100 * rate / ceiling.bytes_per_s:.0f}%)"


def format_table(header, ceiling, rows, names, group=QUANT_GROUP):
    """Markdown: one row per size, each column as median us (TB/s, % of the bandwidth ceiling), the
    rates over the bytes that column reads; a quantized buffer's MB (payloads + scales) per kind shown."""
    kinds = list(dict.fromkeys(k for n in names if (k := column_kind(n))))
    lines = [
        f"{header}; bandwidth ceiling {ceiling.bytes_per_s / 1e12:.2f} TB/s ({ceiling.note})",
        "",
        "Hq/Hkv 32/8, D 128, bf16, all slots valid (*_int8 / *_int4: K/V quantized per slot in groups of "
        f"{group}); median us per call (TB/s of the K/V bytes the column reads, % of the bandwidth "
        "ceiling); ceiling us = bf16 K+V bytes / ceiling; overhead = the kernel / the same kernel without "
        "scoring - 1",
        "",
        "| B | C | K+V MB | ceiling us | " + "".join(f"{k} MB | " for k in kinds) + " | ".join(names)
        + " | pallas overhead | triton overhead |",
        "|" + "---|" * (6 + len(kinds) + len(names)),
    ]  # fmt: skip
    for r in rows:
        nbytes = kv_bytes(r["batch"], r["slots"])
        cells = [_cell(r.get(n), column_bytes(n, r["batch"], r["slots"], group), ceiling) for n in names]
        for kernel in ("pallas", "triton"):
            t, base = r.get(kernel), r.get(kernel + "_noevict")
            cells.append("n/a" if t is None or base is None else f"{100 * (t / base - 1):.1f}%")
        sizes = [r["batch"], r["slots"], f"{nbytes / 1e6:.0f}", f"{nbytes / ceiling.bytes_per_s * 1e6:.1f}"]
        sizes += [f"{kv_bytes(r['batch'], r['slots'], k, group) / 1e6:.0f}" for k in kinds]
        lines.append("| " + " | ".join(map(str, sizes + cells)) + " |")
    return "\n".join(lines)


def time_size(batch, slots, cols, args, scale, ceiling, log):
    """{batch, slots, column: median seconds per call} for the columns that pass their check."""
    sets = {}  # per buffer kind (None: bf16), each kind's sets spanning ROTATE_BYTES of its own bytes
    for kind in dict.fromkeys(column_kind(name) for name in cols):
        nbytes = kv_bytes(batch, slots, kind, args.group)
        n_sets = int(min(MAX_SETS, max(2, math.ceil(ROTATE_BYTES / nbytes))))
        sets[kind] = make_sets(batch, slots, n_sets, kv_quant=kind, group=args.group)
    row, summaries, runs = dict(batch=batch, slots=slots), {}, {}
    for name, fn in cols.items():
        inputs = sets[column_kind(name)]
        try:  # a column that fails its check or compile is reported and never timed
            summaries[name] = check_column(name, fn, inputs[0], scale)
            program, n_calls = chain_program(fn, inputs, loops=args.loops)
            runs[name] = (functools.partial(program, inputs[0][0], inputs), n_calls)
            jax.block_until_ready(runs[name][0]())  # compiles here, so a failure is this column's
        except Exception as e:  # one broken column must not hide the rest
            log(f"B={batch} C={slots} {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
    for together in [runs] if args.interleave else [{n: r} for n, r in runs.items()]:
        for name, (t, (tmin, tmax)) in time_interleaved(together, args.reps, args.queued).items():
            row[name] = t
            rate = column_bytes(name, batch, slots, args.group) / t
            log(
                f"B={batch:3d} C={slots:5d} {name:17s} {t * 1e6:9.1f} us (min {tmin * 1e6:.1f}, max "
                f"{tmax * 1e6:.1f}) {rate / 1e12:5.2f} TB/s "
                f"{100 * rate / ceiling.bytes_per_s:4.0f}% of ceiling  [{summaries[name]}]"
            )
    return row  # this size's buffers go on return, before the next size's


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", help="write the table as markdown here")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sizes", default=",".join(f"{b}x{c}" for b, c in SIZES), help="BxC,...")
    parser.add_argument("--columns", help=f"comma-separated subset of {','.join(COLUMNS)} (default: all)")
    parser.add_argument("--loops", type=int, default=8, help="chains per program, in a lax.fori_loop")
    parser.add_argument("--interleave", action="store_true", help="repetitions round-robin over columns")
    parser.add_argument("--queued", type=int, default=0, help="executions queued per sync (0: latency)")
    parser.add_argument(
        "--group", type=int, default=QUANT_GROUP, help="head elements per scale of the quantized columns"
    )
    parser.add_argument("--copy-mb", type=int, default=4096, help="buffer MiB for the bandwidth ceiling")
    parser.add_argument(
        "--launch", action="append", default=[], help="TRITON_COLUMN:FIELD=VALUE,... (docstring)"
    )
    parser.add_argument("--ceiling-only", action="store_true", help=argparse.SUPPRESS)  # ceiling_in_child
    args = parser.parse_args(argv)
    try:
        launches = [parse_launch(text) for text in args.launch]
        for kind in QUANT_KINDS:
            quant.check_kv_quant(kind, args.group, HEAD_DIM)
    except ValueError as e:
        parser.error(str(e))
    if args.ceiling_only:
        measurers = ceiling_measurers(load_triton_bridge()[0] is not None, can_run_torch_cuda())
        print(json.dumps(dataclasses.asdict(measure_ceiling(measurers, args.copy_mb << 20))))
        return
    start, log = time.time(), functools.partial(print, flush=True)
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
    triton, why = load_triton_bridge()
    if triton is None:
        log(f"triton columns omitted: {why}")
    cols = columns(scale, triton, launches=launches)
    if args.columns:
        wanted = args.columns.split(",") + [n for n in cols if "[" in n]
        if unknown := set(wanted) - set(cols):
            raise SystemExit(f"unknown or unavailable columns {sorted(unknown)}; have {sorted(cols)}")
        cols = {n: cols[n] for n in wanted}
    ceiling = ceiling_in_child(args.copy_mb << 20, log)
    log(f"bandwidth ceiling: {ceiling.bytes_per_s / 1e12:.2f} TB/s ({ceiling.note})")

    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    rows = [time_size(batch, slots, cols, args, scale, ceiling, log) for batch, slots in sizes]
    table = format_table(
        header, ceiling, rows, [n for n in COLUMNS if n in cols] + [n for n in cols if "[" in n], args.group
    )
    log("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    log(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
