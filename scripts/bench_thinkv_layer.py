"""Where ThinKV's decode step goes: one layer's attention of each kind against LongFlow's, on a GPU.

ThinKV's step (docs/THINKV.md) calls the fused kernel once per buffer (the bf16 prompt and window, then
each tier at its own precision) and merges the calls by log-sum-exp; a layer in L* also needs its
sparsity, which it takes from the logits alone in jnp. At one batch and the Qwen3-4B layer shape (Hq/Hkv
32/8, D 128, bf16), every buffer full, this times:
  thinkv_kernel   a layer outside L*: `thinkv.attend` with the kernel (the calls and their merge)
  thinkv_lstar    a layer in L*: the same, and the jnp logits over every key for its sparsity
  lstar_jnp       a layer in L* read wholly in jnp (`thinkv.attend` without a kernel: logits, softmax,
                  p @ v, the sparsity from the probabilities)
  one_call_int4   one kernel call over an int4 buffer holding all of ThinKV's slots: about what one
                  kernel over every buffer would cost at 4 bits (its int2 part would read less), with
                  no merge and no further launches; the issue's "one call per tier or one kernel over
                  all tiers: measure"
  longflow        LongFlow's layer: one kernel call over its C bf16 slots, with the evict slot
Each is checked against the jnp reference first, then timed as bench_kernels times a column (a chain of
dependent calls over input sets larger than the L2, in a fori_loop). The step model at the end weighs
the layer kinds by their counts: ThinKV's LAYERS - LSTAR kernel layers and LSTAR L* layers against
LongFlow's LAYERS layers, per row.

  python3 scripts/bench_thinkv_layer.py --impl triton --batch 64 --budget 2048 --layers 36 --lstar 4
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_kernels as bk  # noqa: E402

from longflow_jax import thinkv  # noqa: E402
from longflow_jax.attention import _kernel  # noqa: E402
from longflow_jax.config import CompressionConfig, ThinKVConfig  # noqa: E402
from longflow_jax.kv_cache import layer_from_kept  # noqa: E402
from pallas_kernels import reference  # noqa: E402

COLUMNS = ("thinkv_kernel", "thinkv_lstar", "lstar_jnp", "one_call_int4", "longflow")


def full_buffer(key, batch, capacity, kind=None, group=bk.QUANT_GROUP):
    """A one-group buffer of `capacity` slots, all but the last holding random tokens (quantized by kind)."""
    kk, kv = jax.random.split(key)
    shape = (batch, capacity - 1, bk.NUM_KV_HEADS, bk.HEAD_DIM)
    k, v = (jax.random.normal(x, shape, jnp.float32).astype(bk.DTYPE) for x in (kk, kv))
    kept = jnp.broadcast_to(jnp.arange(capacity - 1, dtype=jnp.int32), (batch, 1, capacity - 1))
    return layer_from_kept(k, v, kept, capacity, kind, group)


def thinkv_layer(key, batch, comp: CompressionConfig, prompt_len, max_new_tokens, in_lstar: bool):
    """One ThinKV layer with every buffer full: the main buffer (prompt + window) and each tier."""
    cfg = comp.thinkv
    keys = jax.random.split(key, 1 + len(thinkv.tier_kinds(cfg)))
    main = full_buffer(keys[0], batch, prompt_len + cfg.tau)
    capacity = thinkv.tier_capacity(comp, max_new_tokens)
    tiers = [
        full_buffer(k, batch, capacity, kind, comp.kv_quant_group)
        for k, kind in zip(keys[1:], thinkv.tier_kinds(cfg))
    ]
    state = thinkv.LayerSegments(
        tiers=tiers,
        segment_slots=jnp.full((batch, 1, cfg.schedule[0]), -1, jnp.int32),
        sparsity_sum=jnp.zeros(batch, jnp.float32) if in_lstar else None,
    )
    return main.replace(thinkv=state)


def thinkv_column(kernel, scale):
    """fn(q, layer) -> (out in q's dtype, a placeholder evict) through `thinkv.attend`."""

    def fn(q, layer):
        out, _ = thinkv.attend(q, layer, scale, kernel)
        return out.astype(q.dtype), jnp.zeros(q.shape[:1], jnp.int32)

    return fn


def lstar_jnp_column(scale):
    """fn(q, layer) -> (out in q's dtype, the step's sparsity [B]) wholly in jnp."""

    def fn(q, layer):
        out, after = thinkv.attend(q, layer, scale, None)
        return out.astype(q.dtype), after.thinkv.sparsity_sum

    return fn


def thinkv_lstar_column(kernel, scale):
    """fn(q, layer) -> (out in q's dtype, the step's sparsity [B]) through the kernels."""

    def fn(q, layer):
        out, after = thinkv.attend(q, layer, scale, kernel)
        return out.astype(q.dtype), after.thinkv.sparsity_sum

    return fn


def slots_of(layer) -> int:
    return layer.capacity + sum(t.capacity for t in layer.thinkv.tiers)


def make_columns(impl, batch, comp, prompt_len, max_new_tokens, n_sets):
    """{name: (fn, input sets)} for COLUMNS."""
    kernel, scale = _kernel(impl), bk.HEAD_DIM**-0.5
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * n_sets)
    q = [
        jax.random.normal(k, (batch, bk.NUM_Q_HEADS, bk.HEAD_DIM), jnp.float32).astype(bk.DTYPE) for k in keys
    ]
    outside = [thinkv_layer(k, batch, comp, prompt_len, max_new_tokens, False) for k in keys[:n_sets]]
    inside = [thinkv_layer(k, batch, comp, prompt_len, max_new_tokens, True) for k in keys[n_sets:]]
    one_call = bk.make_sets(batch, slots_of(outside[0]), n_sets, kv_quant="int4", group=comp.kv_quant_group)

    def int4_call(q, k, v, kv_valid, kv_scales):
        out, _ = kernel(
            q, k, v, kv_valid, scale=scale, compute_evict=False, kv_quant="int4", kv_scales=kv_scales
        )
        return out, jnp.zeros(q.shape[:1], jnp.int32)

    return {
        "thinkv_kernel": (thinkv_column(kernel, scale), [(q[i], outside[i]) for i in range(n_sets)]),
        "thinkv_lstar": (thinkv_lstar_column(kernel, scale), [(q[i], inside[i]) for i in range(n_sets)]),
        "lstar_jnp": (lstar_jnp_column(scale), [(q[i], inside[i]) for i in range(n_sets)]),
        "one_call_int4": (int4_call, one_call),
        # bench_kernels' column: the Triton kernel's state threaded through its calls, as generate does
        "longflow": (
            bk.columns(scale, bk.load_triton_bridge()[0])[impl],
            bk.make_sets(batch, comp.budget, n_sets),
        ),
    }


def check(name, fn, inputs, scale):
    """Raise if the column's output leaves the jnp reference's (relative L2 error over 2e-2)."""
    q = inputs[0]
    if name == "thinkv_lstar":  # its sparsity (from the logits) against the jnp path's (probabilities)
        _, layer = thinkv.attend(q, inputs[1], scale, None)
        gap = float(jnp.max(jnp.abs(jax.jit(fn)(*inputs)[1] - layer.thinkv.sparsity_sum)))
        if gap > 1e-3:
            raise AssertionError(f"{name}: sparsity off the jnp path's by {gap:.1e}")
    if name in ("thinkv_kernel", "thinkv_lstar", "lstar_jnp"):
        # The jnp path over every buffer (an L* layer's own path: its check is the sparsity's range).
        want, layer = thinkv.attend(q, inputs[1], scale, None)
        sparsity = layer.thinkv.sparsity_sum
        if sparsity is not None and not bool(jnp.all((sparsity >= 0) & (sparsity <= 1))):
            raise AssertionError(f"{name}: sparsity {sparsity} outside [0, 1]")
    elif name == "one_call_int4":
        k, v = reference.dequantized_kv(inputs[1], inputs[2], "int4", inputs[4])
        want, _ = reference.decode_attention_probs(q, k, v, inputs[3], scale)
    else:
        want, _ = reference.decode_attention_probs(q, *inputs[1:4], scale)
    got = np.asarray(jax.jit(fn)(*inputs)[0], np.float32)
    want = np.asarray(want, np.float32)
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    if not np.all(np.isfinite(got)) or rel > 2e-2:
        raise AssertionError(f"{name}: out rel err {rel:.2e}")
    return rel


def step_model(seconds: dict, layers: int, lstar: int, batch: int) -> dict:
    """Attention seconds a decode step spends per row: ThinKV's (kernel and L* layers) and LongFlow's."""
    thinkv_s = (layers - lstar) * seconds["thinkv_kernel"] + lstar * seconds["thinkv_lstar"]
    model = dict(
        thinkv_ms_per_row=1e3 * thinkv_s / batch,
        longflow_ms_per_row=1e3 * layers * seconds["longflow"] / batch,
        lstar_share=lstar * seconds["thinkv_lstar"] / thinkv_s,
    )
    if "lstar_jnp" in seconds:  # the same step with the L* layers read wholly in jnp
        alternative = (layers - lstar) * seconds["thinkv_kernel"] + lstar * seconds["lstar_jnp"]
        model["thinkv_lstar_jnp_ms_per_row"] = 1e3 * alternative / batch
    return model


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", default="triton", choices=["pallas", "triton"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--budget", type=int, default=2048, help="ThinKV's budget and LongFlow's C")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16384, help="sizes ThinKV's tiers (tier_capacity)")
    ap.add_argument("--group", type=int, default=bk.QUANT_GROUP)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--lstar", type=int, default=4, help="layers in L*")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--loops", type=int, default=4)
    ap.add_argument("--columns", default=",".join(COLUMNS))
    args = ap.parse_args(argv)
    names = args.columns.split(",")
    if unknown := set(names) - set(COLUMNS):
        ap.error(f"unknown columns {sorted(unknown)}; have {list(COLUMNS)}")
    comp = CompressionConfig(
        policy="thinkv", budget=args.budget, kv_quant_group=args.group, thinkv=ThinKVConfig()
    )
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}; impl {args.impl}", flush=True)
    per_row = bk.kv_bytes(1, args.budget)  # LongFlow's bf16 buffer, the largest of the columns' a row
    n_sets = int(min(bk.MAX_SETS, max(2, math.ceil(bk.ROTATE_BYTES / (args.batch * per_row)))))
    made = make_columns(args.impl, args.batch, comp, args.prompt_len, args.new_tokens, n_sets)
    cols = {name: made[name] for name in names}
    runs = {}
    for name, (fn, sets) in cols.items():
        rel = check(name, fn, sets[0], bk.HEAD_DIM**-0.5)
        program, n_calls = bk.chain_program(fn, sets, loops=args.loops)
        runs[name] = (functools.partial(program, sets[0][0], sets), n_calls)
        print(f"  {name}: checked (out rel {rel:.1e})", flush=True)
    seconds = {name: t for name, (t, _) in bk.time_interleaved(runs, args.reps).items()}
    slots = slots_of(cols["thinkv_kernel"][1][0][1]) if "thinkv_kernel" in cols else None
    print(f"\nB {args.batch}, ThinKV budget {args.budget} ({slots} slots a layer), LongFlow C {args.budget}")
    print("| layer | us a call | us a call a row |\n|---|---|---|")
    for name, t in seconds.items():
        print(f"| {name} | {t * 1e6:.1f} | {t * 1e6 / args.batch:.3f} |")
    result = dict(seconds=seconds)
    if set(seconds) >= {"thinkv_kernel", "thinkv_lstar", "longflow"}:
        result.update(step_model(seconds, args.layers, args.lstar, args.batch))
        print(
            f"\nattention a step, per row: ThinKV {result['thinkv_ms_per_row']:.3f} ms "
            f"({args.layers - args.lstar} kernel layers, {args.lstar} L* layers: "
            f"{100 * result['lstar_share']:.0f}% of it), LongFlow {result['longflow_ms_per_row']:.3f} ms "
            f"({args.layers} layers)"
        )
        if "thinkv_lstar_jnp_ms_per_row" in result:
            print(f"with the L* layers wholly in jnp: {result['thinkv_lstar_jnp_ms_per_row']:.3f} ms")
    return result


if __name__ == "__main__":
    main()
