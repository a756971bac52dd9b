"""The Triton decode kernel (cuda_triton_bridge) against the jnp reference.

CPU: the package imports without triton and rejects bad inputs before touching triton; the launch
defaults, the kernels' sm_90 / sm_75 compile (tests/offline_compile.py) and the XLA-launch lowering need
only the triton package. Where triton and torch are installed (no GPU needed), the kernels also run in
Triton's interpreter, through the same config and launch plan (tests/triton_interpret.py, which makes
the interpreter's bf16 arithmetic match the GPU's).
GPU (marked `gpu`, skipped without a CUDA GPU, triton and jax-triton): random inputs, fresh per test
(a key from the test's parameters; never zeros), against `pallas_kernels.reference` computed in float32
on the same rounded inputs. A quantized cache (kv_quant) is checked against the reference on the same
payloads and scales, that is against float32 attention over the values the buffer holds.

Evict slot: must equal the reference argmin. For float32 exactly. For bf16/fp16 the kernel's importance
is computed in float32 from the same rounded inputs, so it differs from the reference only by the order
of the float32 sums (tensor-core vs XLA dot): two slots whose importances agree to ~1e-6 relative can
swap. There the chosen slot's reference importance must be within IMPORTANCE_RTOL of the minimum. The
quantized kernel keeps this: its key codes are exact in q's dtype and each group's scale multiplies an
f32 dot, and ||v||_1 sums the dequantized values in f32.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import bounded_mask

import cuda_triton_bridge as ctb
from cuda_triton_bridge import LaunchConfig, tuned_launch
from cuda_triton_bridge.config import DecodeShape, kernel_state_shape, resolve_launch, shared_memory_bytes
from cuda_triton_bridge.launch import plan_launch
from pallas_kernels import quant
from pallas_kernels.reference import (
    decode_attention_probs,
    dequantized_kv,
    longflow_decode_attention_reference,
    longflow_importance,
)

IMPORTANCE_RTOL = 1e-5
# ||out - ref|| / ||ref||: fp32 runs exact (ieee) dots; 16-bit rounds p for the PV product and the output.
OUT_RTOL = {"float32": 1e-5, "bfloat16": 1.5e-2, "float16": 2e-3}
SMS = 132  # H100 / H200 SXM: the launch defaults below are checked at this SM count

needs_triton = pytest.mark.skipif(
    not ctb.triton_available(), reason="needs triton, jax-triton and a CUDA GPU (triton_available() is False)"
)
needs_triton_package = functools.partial(
    pytest.importorskip, "triton", reason="needs the triton package (no GPU)"
)


def gpu(test):
    return pytest.mark.gpu(needs_triton(test))


def _seed(*params) -> int:
    return zlib.crc32(repr(params).encode())


def make_inputs(seed, batch, num_q_heads, num_kv_heads, num_slots, head_dim, dtype, valid="mixed"):
    """q, k, v ~ N(0, 1) in `dtype`; kv_valid rows cycle through: all valid, ~half valid, 3 valid slots,
    and only the last slot valid (all-but-one invalid). Drawn by numpy: jax.random compiles per shape,
    and the interpreter fixture alone draws 58 shapes."""
    rng = np.random.default_rng(seed)
    cast = lambda x: jnp.asarray(x, jnp.float32).astype(dtype)
    q = cast(rng.standard_normal((batch, num_q_heads, head_dim), np.float32))
    k, v = (cast(rng.standard_normal((batch, num_kv_heads, num_slots, head_dim), np.float32)) for _ in "kv")
    if valid == "all":
        return q, k, v, jnp.ones((batch, num_slots), bool)
    half = rng.uniform(size=num_slots) < 0.5
    few = np.zeros((num_slots,), bool)
    few[rng.choice(num_slots, 3, replace=False)] = True
    one = np.arange(num_slots) == num_slots - 1
    rows = [np.ones((num_slots,), bool), half, few, one]
    return q, k, v, jnp.asarray(np.stack([rows[i % 4] for i in range(batch)]))


# One compile per shape instead of one per op (the interpreter fixture quantizes 20 shapes).
_quantize_kv = jax.jit(quant.quantize_kv, static_argnums=(2, 3))


def quantize_kv(k, v, kind, group=32):
    """k, v quantized per slot as the cache stores them: (k payload, v payload, KVScales)."""
    return _quantize_kv(k, v, kind, group)


def reference_importance(q, k, v, kv_valid, scale, granularity):
    _, probs = decode_attention_probs(q, k, v, kv_valid, scale)
    return longflow_importance(probs, v, kv_valid, granularity)  # [B, G, C] f32


def assert_matches_reference(
    q, k, v, kv_valid, out, evict_slot, *, scale, granularity, kv_quant=None, kv_scales=None
):
    _, ref_evict = longflow_decode_attention_reference(
        q, k, v, kv_valid, scale=scale, granularity=granularity, kv_quant=kv_quant, kv_scales=kv_scales
    )
    if kv_quant is not None:  # from here on, the values the buffer holds
        k, v = dequantized_kv(k, v, kv_quant, kv_scales)
    ref_out, _ = decode_attention_probs(q, k, v, kv_valid, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    out32 = np.asarray(out.astype(jnp.float32))
    ref32 = np.asarray(ref_out)
    assert np.isfinite(out32).all()
    rel = np.linalg.norm(out32 - ref32) / np.linalg.norm(ref32)
    tol = OUT_RTOL[jnp.dtype(q.dtype).name]
    assert rel <= tol, f"out rel err {rel:.2e} > {tol}"

    assert evict_slot.shape == ref_evict.shape and evict_slot.dtype == jnp.int32
    got, want = np.asarray(evict_slot), np.asarray(ref_evict)
    if q.dtype == jnp.float32:
        np.testing.assert_array_equal(got, want)
        return
    scores = np.asarray(reference_importance(q, k, v, kv_valid, scale, granularity))  # [B, G, C]
    got_g = got.reshape(scores.shape[:2])
    chosen = np.take_along_axis(scores, got_g[..., None], axis=-1)[..., 0]
    best = scores.min(axis=-1)
    np.testing.assert_array_less(chosen, best + IMPORTANCE_RTOL * np.abs(best) + 1e-30)
    # Empty slots (-1) never tie with valid ones (>= 0): where the minimum is an empty slot, exact match.
    np.testing.assert_array_equal(got_g[best < 0], want.reshape(got_g.shape)[best < 0])


def assert_attention_only(
    q, k, v, kv_valid, out, evict_slot, *, scale, granularity, kv_quant=None, kv_scales=None
):
    """compute_evict=False: the attention output, and -1 for every evict slot."""
    if kv_quant is not None:
        k, v = dequantized_kv(k, v, kv_quant, kv_scales)
    ref_out, _ = decode_attention_probs(q, k, v, kv_valid, scale)
    rel = np.linalg.norm(np.asarray(out, np.float32) - np.asarray(ref_out)) / np.linalg.norm(ref_out)
    assert rel <= OUT_RTOL[jnp.dtype(q.dtype).name], rel
    batch, num_kv_heads = k.shape[:2]
    assert evict_slot.shape == ((batch,) if granularity == "sequence" else (batch, num_kv_heads))
    assert (np.asarray(evict_slot) == -1).all()


def reference_lse(q, k, v, kv_valid, scale, kv_quant=None, kv_scales=None):
    """log(sum over the valid slots of exp(scale * q.k)) per query head, in float64 numpy: [B, Hq], -inf
    for a row with no valid slot. A quantized cache's keys are the values it holds."""
    if kv_quant is not None:
        k, _ = dequantized_kv(k, v, kv_quant, kv_scales)
    q, k = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k))
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)  # query head h reads KV head h // group
    logits = np.where(np.asarray(kv_valid)[:, None, :], scale * np.einsum("bhd,bhcd->bhc", q, k), -np.inf)
    top = logits.max(axis=-1)
    top = np.where(np.isfinite(top), top, 0.0)
    total = np.exp(logits - top[..., None]).sum(axis=-1)
    return np.where(total > 0, top + np.log(np.where(total > 0, total, 1.0)), -np.inf)


def assert_lse_matches(lse, q, k, v, kv_valid, *, scale, kv_quant=None, kv_scales=None):
    # lse comes from the f32 softmax statistics (16-bit products are exact there): ~1e-6 relative.
    assert lse.shape == q.shape[:2] and lse.dtype == jnp.float32
    want = reference_lse(q, k, v, kv_valid, scale, kv_quant, kv_scales)
    np.testing.assert_allclose(np.asarray(lse), want, rtol=1e-5, atol=1e-4)  # -inf exactly where want is


def resolved(
    batch, slots, launch=None, *, num_q_heads=32, num_kv_heads=8, head_dim=128, itemsize=2, kv_quant=None,
    quant_group=32, **kw,
):  # fmt: skip
    """The resolved launch at Qwen3-8B's attention shape (by default) on an sm_90 GPU with SMS SMs."""
    group = quant_group if kv_quant else 0
    shape = DecodeShape(batch, num_q_heads, num_kv_heads, slots, head_dim, itemsize, kv_quant, group)
    return resolve_launch(shape, launch, **{"sms": SMS, "capability": 90, **kw})


# ---------------------------------------------------------------- CPU: import and argument checks


def test_package_imports_and_reports_availability():
    assert isinstance(ctb.triton_available(), bool)


def _small(dtype=jnp.bfloat16, head_dim=64, num_slots=100):
    q = jnp.ones((1, 4, head_dim), dtype)
    k = jnp.ones((1, 2, num_slots, head_dim), dtype)
    return q, k, k, jnp.ones((1, num_slots), bool)


@pytest.mark.parametrize(
    "launch, match",
    [
        (dict(block_c=48), "block_c must be a power of two in .16, 512., got 48"),
        (dict(block_c=8), "block_c must be a power of two in .16, 512., got 8"),
        (dict(block_c="64"), "block_c must be a power of two .*got '64'"),
        (dict(block_c=64.0), "block_c must be a power of two .*got 64.0"),
        (dict(block_c=64, num_splits=10), "num_splits=10 exceeds the 2 blocks"),
        (dict(num_splits=0), "num_splits must be an int in .1, 256., got 0"),
        (dict(num_splits=True), "num_splits must be an int .*got True"),
        (dict(num_warps=3), "num_warps must be a power of two .*got 3"),
        (dict(num_warps=4.5), "num_warps must be a power of two .*got 4.5"),
        (dict(num_stages=0), "num_stages must be an int in .1, 8., got 0"),
        (dict(num_stages="3"), "num_stages must be an int .*got '3'"),
        (dict(epilogue="both"), "epilogue must be one of .*got 'both'"),
        (dict(epilogue=3), "epilogue must be one of .*got 3"),
        (dict(xla_launch=1), "LaunchConfig.xla_launch must be a bool or None, got 1"),
        (dict(discard_t="yes"), "LaunchConfig.discard_t must be a bool or None, got 'yes'"),
        (dict(convert_after_unpack=1), "LaunchConfig.convert_after_unpack must be a bool or None, got 1"),
    ],
)
def test_rejects_bad_launch_config_values_naming_them(launch, match):
    with pytest.raises(ValueError, match=match):
        ctb.longflow_decode_attention_triton(*_small(), scale=0.125, launch=LaunchConfig(**launch))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(granularity="head"), "granularity must be one of"),
        (dict(scale=float("nan")), "scale must be a finite"),
        (dict(launch=dict(block_c=64)), "launch must be a cuda_triton_bridge.LaunchConfig or None"),
    ],
)
def test_rejects_bad_call_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ctb.longflow_decode_attention_triton(*_small(), **{"scale": 0.125, **kwargs})


@pytest.mark.parametrize("return_lse", [1, "yes", None, np.bool_(True), jnp.asarray(True)])
def test_rejects_return_lse_that_is_not_a_python_bool(return_lse):
    with pytest.raises(ValueError, match="return_lse must be a Python bool, got"):
        ctb.longflow_decode_attention_triton(*_small(), scale=0.125, return_lse=return_lse)


@pytest.mark.parametrize("compute_evict", ["False", None, 0, np.bool_(True), jnp.asarray(True)])
def test_rejects_compute_evict_that_is_not_a_python_bool(compute_evict):
    # "False" scored (truthy), None did not, a traced one died in a TracerBoolConversionError.
    with pytest.raises(ValueError, match="compute_evict must be a Python bool, got"):
        ctb.longflow_decode_attention_triton(*_small(), scale=0.125, compute_evict=compute_evict)


@pytest.mark.parametrize(
    "kv_len", [np.array([3.0], np.float32), np.array([1, 2], np.int32), np.array(4, np.int32), [4]]
)
def test_rejects_bad_kv_len(kv_len):
    with pytest.raises(ValueError, match="kv_len must be an integer array of shape"):
        ctb.longflow_decode_attention_triton(*_small(), scale=0.125, kv_len=kv_len)


def test_rejects_mixed_dtypes():
    q, k, v, valid = _small()
    with pytest.raises(ValueError, match="share one dtype"):
        ctb.longflow_decode_attention_triton(q.astype(jnp.float32), k, v, valid, scale=0.125)


def test_rejects_head_dim_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="head_dim must be one of"):
        ctb.longflow_decode_attention_triton(*_small(head_dim=96), scale=0.125)


def test_rejects_reference_contract_violations():
    q, k, v, valid = _small()
    with pytest.raises(ValueError, match="kv_valid must be bool"):
        ctb.longflow_decode_attention_triton(q, k, v, valid.astype(jnp.int32), scale=0.125)


def test_rejects_quantized_inputs_outside_the_contract():
    q, k, v, valid = _small(num_slots=64)
    kp, vp, scales = quantize_kv(k, v, "int4")
    call = functools.partial(ctb.longflow_decode_attention_triton, q, kp, vp, valid, scale=0.125)
    with pytest.raises(ValueError, match="needs kv_scales=KVScales"):
        call(kv_quant="int4")
    k8, v8, scales8 = quantize_kv(k, v, "int8")
    with pytest.raises(ValueError, match="kv_quant='fp8' needs float8_e4m3fn payloads"):
        ctb.longflow_decode_attention_triton(q, k8, v8, valid, scale=0.1, kv_quant="fp8", kv_scales=scales8)
    with pytest.raises(ValueError, match="kv_scales given without kv_quant"):
        ctb.longflow_decode_attention_triton(q, k, v, valid, scale=0.125, kv_scales=scales)
    # A key chunk is one tl.dot's reduction: at least 16 elements of one plane and one scale group.
    _, _, small_groups = quantize_kv(k, v, "int4", group=8)
    with pytest.raises(ValueError, match="kv_quant_group >= 16 and head_dim / 2 >= 16, got group 8"):
        call(kv_quant="int4", kv_scales=small_groups)
    q32, k32, v32, valid32 = _small(head_dim=32, num_slots=64)
    kp, vp, scales = quantize_kv(k32, v32, "int2", group=16)
    with pytest.raises(ValueError, match="head_dim / 4 >= 16, got group 16 at head_dim 32"):
        ctb.longflow_decode_attention_triton(
            q32, kp, vp, valid32, scale=0.1, kv_quant="int2", kv_scales=scales
        )
    with pytest.raises(ValueError, match="kv_quant='fp8' needs an sm_89\\+ GPU"):
        resolved(16, 2048, kv_quant="fp8", capability=80)
    # A misspelt kind was read as one code a byte and failed on the payload's shape or dtype instead.
    for kind in ("INT4", "Int8"):
        with pytest.raises(ValueError, match=f"kv_quant must be None or one of .*got '{kind}'"):
            call(kv_quant=kind, kv_scales=scales)
    with pytest.raises(ValueError, match="at least one KV head"):  # was a ZeroDivisionError
        ctb.longflow_decode_attention_triton(q, k[:, :0], v[:, :0], valid, scale=0.125)


def test_init_kernel_state_and_rejects_bad_state():
    state = ctb.init_kernel_state(2, 2)
    assert state.shape == kernel_state_shape(2, 2) == (2, 4) and state.dtype == jnp.int32
    np.testing.assert_array_equal(state, 0)
    q, k, v, kv_valid = make_inputs(_seed("state"), 2, 8, 2, 64, 32, jnp.float32, "all")
    for bad in (
        jnp.zeros((2, 5), jnp.int32),
        jnp.zeros(kernel_state_shape(2, 2), jnp.float32),
        jnp.zeros((2, 2, 2), jnp.int32),
        [[0] * 4] * 2,
    ):
        with pytest.raises(ValueError, match=r"kernel_state must be int32 \(2, 4\)"):
            ctb.longflow_decode_attention_triton(q, k, v, kv_valid, scale=0.1, kernel_state=bad)


def test_with_kernel_state_gives_the_triton_kernel_its_state_per_layer():
    # generate passes each layer's kernel_state to the Triton kernel: it must be what the bridge expects.
    from longflow_jax.attention import with_kernel_state
    from longflow_jax.kv_cache import KVCache, layer_from_kept

    k_seq = jnp.zeros((3, 5, 2, 16), jnp.float32)  # [B, P, Hkv, D]
    kept = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (3, 1, 5))
    cache = KVCache(layers=[layer_from_kept(k_seq, k_seq, kept, capacity=8) for _ in range(2)])
    assert all(layer.kernel_state is None for layer in cache.layers)
    for impl in ("reference", "pallas"):
        assert with_kernel_state(cache, impl) is cache
    triton_cache = with_kernel_state(cache, "triton")
    assert len(triton_cache.layers) == 2
    for layer, before in zip(triton_cache.layers, cache.layers):
        state = layer.kernel_state
        assert state.shape == kernel_state_shape(3, 2) and state.dtype == jnp.int32
        np.testing.assert_array_equal(state, 0)
        assert all(
            getattr(layer, f) is getattr(before, f) for f in ("k", "v", "slot_pos", "evict_slot", "score")
        )


# ---------------------------------------------------------------- CPU: launch defaults


def test_tuned_table_rows_give_the_documented_regimes():
    # At 132 SMs: coop below SMs / 2 programs (B * Hkv < 66), the separate epilogue with 128-slot blocks
    # below 2 x SMs (264), then fused with 512-slot splits (with scoring) or one split kernel with about
    # four programs per SM (attention only). XLA's launch only for the coop rows.
    def regime(programs, evict, capability=90):
        row = tuned_launch.tuned_row(tuned_launch.tuned_rows(capability, evict), programs, SMS)
        return row.epilogue, row.block_c, row.xla_launch

    for evict in (True, False):
        assert regime(1, evict) == regime(65, evict) == ("coop", 64, True)
        assert regime(66, evict) == regime(263, evict) == ("separate", 128, False)
    assert regime(264, True) == regime(10**6, True) == ("fused", 32, False)
    assert tuned_launch.tuned_row(tuned_launch.tuned_rows(90, True), 264, SMS).slots_per_split == 512
    assert regime(264, False) == ("separate", 32, False)
    assert tuned_launch.tuned_row(tuned_launch.tuned_rows(90, False), 264, SMS).programs_per_sm == 4.0
    # Before Hopper: the same epilogues, 32-slot blocks.
    for programs, epilogue in ((1, "coop"), (66, "separate"), (264, "fused")):
        assert regime(programs, True, capability=80)[:2] == (epilogue, 32)


def test_default_launch_per_batch_and_cache_size():
    # Qwen3-8B attention (32 / 8 heads, D 128, bf16) on 132 SMs: (epilogue, splits, block_c).
    want = {
        (1, 2048): ("coop", 16, 64),
        (1, 8192): ("coop", 16, 64),
        (8, 8192): ("coop", 2, 64),
        (9, 2048): ("separate", 2, 128),
        (16, 2048): ("separate", 1, 128),
        (16, 8192): ("separate", 1, 128),
        (32, 8192): ("separate", 1, 128),
        (33, 2048): ("fused", 4, 32),
        (64, 2048): ("fused", 4, 32),
        (64, 8192): ("fused", 16, 32),
    }
    for (batch, slots), expected in want.items():
        cfg = resolved(batch, slots)
        assert (cfg.epilogue, cfg.num_splits, cfg.block_c) == expected, (batch, slots, cfg)
        assert cfg.blocks_per_split * cfg.block_c >= tuned_launch.MIN_SLOTS_PER_SPLIT
    # Without scoring: the same structure at a small batch, else the separate path with one split (one
    # launch).
    for batch, expected in ((1, ("coop", 16)), (16, ("separate", 1)), (64, ("separate", 1))):
        cfg = resolved(batch, 8192, compute_evict=False)
        assert (cfg.epilogue, cfg.num_splits) == expected, (batch, cfg)
    # float32 keeps its spill-free 32-slot blocks whatever the batch, and so does a pre-Hopper GPU.
    assert resolved(16, 2048, itemsize=4).block_c == 32
    pre_hopper = resolved(16, 2048, sms=108, capability=80)
    assert (pre_hopper.epilogue, pre_hopper.num_splits, pre_hopper.block_c) == ("separate", 1, 32)
    # A forced epilogue takes its own row's block size.
    assert resolved(1, 2048, LaunchConfig(epilogue="separate")).block_c == 128
    assert resolved(16, 2048, LaunchConfig(epilogue="coop")).block_c == 64


def test_quantized_launch_defaults():
    # A quantized cache keeps each batch's epilogue, with 64-slot blocks (its codes are unpacked in
    # registers), 8 warps and the row's split rule, except where timed: int4 2 warps, int8 4 (1 warp and
    # 32-slot blocks from 3.5 programs an SM), and their own programs-per-SM targets; float32 q keeps
    # its own 32-slot blocks; a launch field wins.
    for kind in quant.KV_QUANT_KINDS:
        for batch, slots in ((1, 2048), (16, 2048), (48, 2048), (64, 8192)):
            plain, cfg = resolved(batch, slots), resolved(batch, slots, kv_quant=kind)
            assert cfg.epilogue == plain.epilogue and cfg.xla_launch == plain.xla_launch, (kind, batch)
            block_c, warps = (
                (32, 1) if (kind, batch) == ("int8", 64) else (64, {"int4": 2, "int8": 4}.get(kind, 8))
            )
            assert (cfg.block_c, cfg.num_warps, cfg.num_stages) == (block_c, warps, tuned_launch.NUM_STAGES)
    # int8's many-programs launch: from 3.5 programs an SM (B 64 x Hkv 8 = 512 >= 462 on 132 SMs, B 48's
    # 384 below), with the fused epilogue's own splits; not where the epilogue is forced, q is float32
    # or nothing is scored.
    assert SMS == 132
    many = resolved(128, 2048, kv_quant="int8")
    assert (many.epilogue, many.block_c, many.num_warps, many.num_splits) == ("fused", 32, 1, 4)
    assert resolved(64, 2048, LaunchConfig(epilogue="separate"), kv_quant="int8").num_warps == 4
    assert resolved(64, 2048, compute_evict=False, kv_quant="int8").num_warps == 4  # untimed without scoring
    assert resolved(64, 2048, itemsize=4, kv_quant="int8").num_warps == tuned_launch.F32_NUM_WARPS
    assert resolved(64, 2048, LaunchConfig(num_warps=4), kv_quant="int8").block_c == 32
    # B 16 x Hkv 8 = 128 programs on 132 SMs: the separate epilogue, split to about 2 (int4) and 4 (int8)
    # programs per SM; fp8 and int2 keep the row's one.
    splits = {kind: resolved(16, 2048, kv_quant=kind).num_splits for kind in quant.KV_QUANT_KINDS}
    assert splits == {"int8": 4, "fp8": 1, "int4": 2, "int2": 1}
    assert resolved(64, 2048, kv_quant="int4").num_splits == resolved(64, 2048).num_splits == 4  # fused
    assert resolved(1, 2048, kv_quant="int4").num_splits == 16  # coop: one program per SM
    assert resolved(2, 40, kv_quant="int8").block_c == 64  # next_pow2(C)
    assert resolved(2, 20, kv_quant="int8").block_c == 32
    wide = resolved(16, 2048, itemsize=4, kv_quant="int8")
    assert (wide.block_c, wide.num_warps) == (tuned_launch.F32_BLOCK_C, tuned_launch.F32_NUM_WARPS)
    forced = resolved(16, 2048, LaunchConfig(block_c=128, num_warps=8), kv_quant="int4")
    assert (forced.block_c, forced.num_warps) == (128, 8)


@pytest.mark.parametrize("kind", quant.KV_QUANT_KINDS)
@pytest.mark.parametrize("head_dim, group", [(128, 32), (64, 16), (128, 128)])
def test_a_quantized_slot_is_its_payloads_scales_and_value_norm(kind, head_dim, group):
    # The bytes of one slot's K and V for one KV head, which the shared-memory estimate and the
    # benchmark's bytes count: what quant.quantize stores for its key and its value, and the value's norm.
    payload, scale, zero = quant.quantize(jnp.ones((1, head_dim)), kind, group)
    norm = quant.value_norms(payload, scale, zero, kind, group)
    stored = 2 * (payload.nbytes + scale.nbytes + (0 if zero is None else zero.nbytes)) + norm.nbytes
    shape = DecodeShape(1, 8, 2, 64, head_dim, 2, kind, group)
    assert shape.kv_slot_bytes == stored
    assert DecodeShape(1, 8, 2, 64, head_dim).kv_slot_bytes == 2 * 2 * head_dim


def test_splits_round_to_whole_blocks():
    shape = DecodeShape(1, 4, 2, 7 * 64, 64)
    cfg = resolve_launch(shape, LaunchConfig(block_c=64, num_splits=3), sms=SMS, capability=90)
    assert (cfg.num_splits, cfg.blocks_per_split) == (3, 3)
    cfg = resolve_launch(shape, LaunchConfig(block_c=64, num_splits=6), sms=SMS, capability=90)
    assert (cfg.num_splits, cfg.blocks_per_split) == (4, 2)


def test_default_launch_is_xlas_triton_call_at_a_small_batch_only():
    # XLA's Triton custom call while B * Hkv < SMs / 2 (the launch cost decides), jax-triton above (the
    # kernel's speed decides); LaunchConfig.xla_launch forces either.
    for batch, want in [(1, True), (8, True), (9, False), (16, False), (64, False)]:
        assert resolved(batch, 2048).xla_launch is want, batch
        for forced in (True, False):
            assert resolved(batch, 2048, LaunchConfig(xla_launch=forced)).xla_launch is forced


def test_t_is_discarded_only_above_four_mib():
    # B x 32 heads x C x 4 bytes of t: 16x2048 is exactly 4 MiB (kept in L2), 8x8192 and 16x8192 above.
    def discard(batch, slots, **launch):
        return resolved(batch, slots, LaunchConfig(**launch)).discard_t

    assert not discard(1, 8192) and not discard(4, 8192) and not discard(16, 2048)
    assert discard(8, 8192) and discard(16, 8192) and discard(64, 2048) and discard(32, 2048)
    assert discard(16, 2048, discard_t=True) and not discard(64, 2048, discard_t=False)


@pytest.mark.parametrize("epilogue", ["separate", "fused", "coop"])
def test_discard_needs_sm80_and_a_gpu(epilogue):
    # discard.global.L2 is PTX for sm_80+; the interpreter (native=False) runs no PTX at all.
    shape = DecodeShape(8, 32, 8, 8192, 128)
    cfg = resolve_launch(shape, LaunchConfig(epilogue=epilogue, num_splits=2), sms=SMS, capability=90)
    assert cfg.discard_t
    kw = dict(granularity="sequence", compute_evict=True, is_f32=False)
    reader = "combine" if epilogue == "separate" else "split"

    def discard(cfg=cfg, **extra):
        return getattr(plan_launch(shape, cfg, **kw, **extra), reader).meta["DISCARD_T"]

    assert discard(capability=90) and discard(capability=80)
    assert not discard(capability=75)
    assert not discard(capability=90, native=False)
    assert not discard(dataclasses.replace(cfg, discard_t=False), capability=90)


def test_coop_grid_must_fit_one_program_per_sm():
    # Its programs wait for each other: a grid larger than the SM count could deadlock, so it is refused.
    coop = LaunchConfig(epilogue="coop")
    assert resolved(16, 2048, coop).num_splits == 1
    with pytest.raises(ValueError, match="one program per SM: num_splits=2 x 8 KV heads x batch 16"):
        resolved(16, 2048, LaunchConfig(epilogue="coop", num_splits=2))
    with pytest.raises(ValueError, match="at most 32 splits"):
        resolved(1, 8192, LaunchConfig(epilogue="coop", num_splits=64), num_q_heads=8, num_kv_heads=1)
    # The default never asks for more than fits: 132 // (3 * 8) = 5 splits.
    assert resolved(3, 8192, coop).num_splits == 5
    # Above one program per SM the default is not coop.
    assert resolved(17, 2048).epilogue != "coop"


def test_launches_over_the_shared_memory_limit_are_rejected_or_get_fewer_stages():
    # 256-slot blocks at D 128: 3 stages need 276 KiB (the H100 allows 227), 2 stages 148 KiB.
    with pytest.raises(ValueError, match="needs about 276 KiB of shared memory"):
        resolved(16, 2048, LaunchConfig(block_c=256, num_stages=3))
    assert resolved(16, 2048, LaunchConfig(block_c=256)).num_stages == 2  # the default, reduced to fit
    assert resolved(16, 2048, LaunchConfig(block_c=128)).num_stages == tuned_launch.NUM_STAGES
    with pytest.raises(ValueError, match="even with num_stages=1"):
        resolved(1, 4096, LaunchConfig(block_c=512), num_q_heads=8, head_dim=256)
    q = jnp.zeros((1, 32, 128), jnp.bfloat16)
    kv = jnp.zeros((1, 8, 1024, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="shared memory"):  # the public entry point, before any triton import
        ctb.longflow_decode_attention_triton(
            q, kv, kv, jnp.ones((1, 1024), bool), scale=0.1, launch=LaunchConfig(block_c=512, num_stages=2)
        )


# ---------------------------------------------------------------- CPU: the XLA launch, lowered for CUDA


def test_xla_call_lowers_to_xlas_triton_custom_call():
    """The XLA launch path (xla_call.py), lowered for CUDA on any machine: XLA's own Triton custom call
    with the kernel's TTIR (scalars folded in as constants, pointers 16-byte aligned), the grid, the
    launch parameters and the aliases."""
    triton = needs_triton_package()
    import triton.language as tl

    from cuda_triton_bridge.xla_call import XLA_TRITON_TARGET, xla_triton_call

    @triton.jit
    def scale_add(x_ptr, y_ptr, alpha, out_ptr, out2_ptr, N: tl.constexpr):
        i = tl.program_id(0) * N + tl.arange(0, N)
        tl.store(out_ptr + i, tl.load(x_ptr + i) * alpha + tl.load(y_ptr + i))
        tl.store(out2_ptr + i, tl.load(y_ptr + i))

    def f(x, y):
        return xla_triton_call(
            x, y,
            kernel=scale_add,
            out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)] * 2,
            grid=(x.shape[0] // 64,),
            num_warps=2,
            num_stages=1,
            capability=90,
            input_output_aliases={1: 1},
            alpha=0.375,
            N=64,
        )  # fmt: skip

    x = jax.ShapeDtypeStruct((256,), jnp.float32)
    text = jax.jit(f).trace(x, x).lower(lowering_platforms=("cuda",)).as_text()
    assert f"stablehlo.custom_call @{XLA_TRITON_TARGET}" in text
    for attr in ("grid_x = 4 : i32", "grid_y = 1 : i32", "grid_z = 1 : i32", "num_warps = 2 : i32",
                 "num_stages = 1 : i32", 'name = "scale_add"'):  # fmt: skip
        assert attr in text, attr
    assert "output_operand_alias<output_tuple_indices = [1], operand_index = 1," in text
    ttir = re.search(r'ir = "(.*?)", name', text).group(1)
    assert "tt.func public @scale_add(" in ttir
    assert ttir.count("!tt.ptr<f32> {tt.divisibility = 16 : i32}") == 4  # x, y, out, out2; alpha folded
    assert "3.750000e-01" in ttir
    with pytest.raises(ValueError, match="takes 4 buffers"):
        xla_triton_call(
            jnp.zeros(4), kernel=scale_add, out_shape=[x], grid=(1,), num_warps=1, num_stages=1,
            capability=90, alpha=1.0, N=64,
        )  # fmt: skip


@pytest.fixture
def lowered_for_cuda(monkeypatch):
    """Lower the public entry point for CUDA with cuda_triton_bridge.decode imported against a stand-in
    jax_triton that only reports sm_90 (no launch through it may happen), so the XLA-launch path lowers
    on a machine without jax-triton or a GPU. The module is dropped again afterwards, so other tests see
    the package as it was. Returns lower(fn, *args) -> StableHLO text."""
    import types

    needs_triton_package()
    if ctb.triton_available():
        pytest.skip("the GPU tests run the real decode path")

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel went through jax-triton")

    stub = types.SimpleNamespace(get_compute_capability=lambda device: 90, triton_call=no_launch)
    monkeypatch.setitem(sys.modules, "jax_triton", stub)
    monkeypatch.delitem(sys.modules, "cuda_triton_bridge.decode", raising=False)
    import cuda_triton_bridge.decode as decode

    def lower(fn, *args):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    yield lower
    sys.modules.pop("cuda_triton_bridge.decode", None)
    if getattr(ctb, "decode", None) is decode:
        delattr(ctb, "decode")


def _sds(batch, slots=2048):
    """Abstract bf16 inputs at Qwen3-8B's attention shape: q, k, v, kv_valid."""
    sds = jax.ShapeDtypeStruct
    kv = sds((batch, 8, slots, 128), jnp.bfloat16)
    return sds((batch, 32, 128), jnp.bfloat16), kv, kv, sds((batch, slots), bool)


@pytest.mark.parametrize(
    "batch, epilogue, kernels, alias",
    [
        # (batch, forced epilogue, kernels, the aliased (operand, output) of the launch that has one)
        (1, None, ["decode_coop_kernel"], (5, 8)),  # the default at a small batch: XLA's call
        (4, "fused", ["decode_fused_kernel"], (5, 7)),
        (4, "separate", ["decode_split_kernel", "decode_combine_kernel"], (6, 4)),
    ],
)
def test_decode_lowers_through_xlas_triton_call(lowered_for_cuda, batch, epilogue, kernels, alias):
    """The real decode path (decode.py's wiring, the real kernels' TTIR) lowered for CUDA on any
    machine: every kernel is one XLA Triton custom call, and the tickets / counter buffers are aliased."""
    launch = None if epilogue is None else LaunchConfig(epilogue=epilogue, xla_launch=True)
    fn = functools.partial(ctb.longflow_decode_attention_triton, scale=0.088, launch=launch)
    text = lowered_for_cuda(fn, *_sds(batch))
    assert re.findall(r'name = "(\w+)", num_stages', text) == kernels
    assert text.count("stablehlo.custom_call") == len(kernels)
    # One-kernel epilogues: the kernel state aliased to the tickets output; separate: the split kernel's
    # counter to the combine kernel's.
    operand, output = alias
    aliases = re.findall(r"stablehlo\.output_operand_alias<[^>]*>", text)
    assert aliases == [
        f"stablehlo.output_operand_alias<output_tuple_indices = [{output}], operand_index = {operand}, "
        "operand_tuple_indices = []>"
    ]


@pytest.mark.parametrize(
    "kind, payload_type, convert_after_unpack",
    [("int8", "i8", False), ("fp8", "f8E4M3FN", False), ("int4", "i8", False), ("int4", "i8", True)],
)
def test_quantized_decode_lowers_with_payload_pointers_and_no_dequantized_cache(
    lowered_for_cuda, kind, payload_type, convert_after_unpack
):
    """A quantized cache lowers to the same custom calls: the payloads go in as they are (u8 is i8 in
    TTIR), then the scale rows; the zero points of int8 / fp8 are the one f32 placeholder. No tensor of
    the cache's float shape appears anywhere: nothing dequantizes outside the kernel. Converting after
    unpacking adds one opaque (not pure) `mov` a unpacked tile to the TTIR, and nothing else."""
    q, *_, valid = _sds(4)
    payload = jax.ShapeDtypeStruct((4, 8, 2048, 128 // quant.codes_per_byte(kind)), quant.payload_dtype(kind))
    rows = jax.ShapeDtypeStruct((4, 8, 2048, 4), jnp.float32)
    zero = rows if quant.has_zero_point(kind) else None
    scales = quant.KVScales(rows, zero, rows, zero, jax.ShapeDtypeStruct((4, 8, 2048, 1), jnp.float32))
    launch = LaunchConfig(epilogue="coop", xla_launch=True, convert_after_unpack=convert_after_unpack)

    def fn(q, k, v, valid, scales):
        return ctb.longflow_decode_attention_triton(
            q, k, v, valid, scale=0.088, launch=launch, kv_quant=kind, kv_scales=scales
        )

    text = lowered_for_cuda(fn, q, payload, payload, valid, scales)
    pinned = re.findall(r"tt\.elementwise_inline_asm \\22mov\.b32 \$0, \$1;\\22 \{[^}]*pure = false", text)
    # Per block: 4 key and 4 value chunks (group 32, two planes of 64), each unpacked once.
    assert len(pinned) == (8 if convert_after_unpack else 0), pinned
    assert re.findall(r'name = "(\w+)", num_stages', text) == ["decode_coop_kernel"]
    ttir = re.search(r'ir = "(.*?)", name', text).group(1)
    params = re.search(r"tt\.func public @decode_coop_kernel\((.*?)\) attributes", ttir).group(1)
    types = re.findall(r"!tt\.ptr<(\w+)>", params)
    # q, k, v, valid, kv_len, tickets, then the four scale rows and the value norms, then the outputs
    assert types[:11] == ["bf16", payload_type, payload_type, "i1", "i32", "i32"] + ["f32"] * 5, types
    call = re.search(r"stablehlo\.custom_call @__gpu\$xla\.gpu\.triton\(([^)]*)\)", text).group(1)
    assert len(call.split(", ")) == 11
    operands = re.search(r"@__gpu\$xla\.gpu\.triton\(.*\} : \(([^()]*)\) -> ", text).group(1)
    assert ("tensor<1xf32>" in operands) != quant.has_zero_point(kind)
    for dtype in ("bf16", "f32", "f16"):
        assert f"tensor<4x8x2048x128x{dtype}>" not in text


def test_kernel_state_replaces_the_zero_fill(lowered_for_cuda):
    """With the caller's kernel state the coop launch (XLA's call, B = 1) takes that buffer, aliased to
    its tickets output and returned, instead of a zero buffer of its own."""
    state = jax.ShapeDtypeStruct(kernel_state_shape(1, 8), jnp.int32)
    fn = functools.partial(ctb.longflow_decode_attention_triton, scale=0.088)

    def with_state(q, k, v, valid, state):
        return fn(q, k, v, valid, kernel_state=state)

    fresh = lowered_for_cuda(fn, *_sds(1))
    persistent = lowered_for_cuda(with_state, *_sds(1), state)
    zeros = re.compile(r"stablehlo\.(constant|broadcast_in_dim)[^\n]*tensor<1x16xi32>")
    assert zeros.search(fresh) and not zeros.search(persistent)
    assert re.findall(r'name = "(\w+)", num_stages', persistent) == ["decode_coop_kernel"]
    call = re.search(r"stablehlo\.custom_call @__gpu\$xla\.gpu\.triton\(([^)]*)\)", persistent)
    assert call.group(1).split(", ")[5] == "%arg4"  # the state argument itself is operand 5
    assert "operand_index = 5" in persistent
    assert len(jax.eval_shape(fn, *_sds(1))) == 2
    outs = jax.eval_shape(with_state, *_sds(1), state)
    assert len(outs) == 3 and outs[2].shape == state.shape and outs[2].dtype == jnp.int32


@pytest.mark.parametrize(
    "epilogue, num_splits, compute_evict",
    [("separate", 4, True), ("separate", 1, False), ("fused", 4, True), ("coop", 1, False)],
)
def test_lse_lowers_in_output_order_and_only_when_asked(
    lowered_for_cuda, epilogue, num_splits, compute_evict
):
    """return_lse through decode.py's wiring, lowered for CUDA on any machine: lse [B, Hq] f32 after the
    evict slots, before the kernel state, taken from the kernel that holds the final statistics (every
    other kernel's lse buffer is a (1,) placeholder); the same kernels launch, and without it none of
    them computes a log."""
    launch = LaunchConfig(epilogue=epilogue, num_splits=num_splits, xla_launch=True)
    fn = functools.partial(
        ctb.longflow_decode_attention_triton, scale=0.088, launch=launch, compute_evict=compute_evict
    )
    args = _sds(4)
    state = jax.ShapeDtypeStruct(kernel_state_shape(4, 8), jnp.int32)
    out, evict_slot, lse, new_state = jax.eval_shape(
        lambda *a: fn(*a[:4], kernel_state=a[4], return_lse=True), *args, state
    )
    assert (lse.shape, lse.dtype) == ((4, 32), jnp.float32)
    assert (out.shape, evict_slot.shape, new_state.shape) == ((4, 32, 128), (4,), state.shape)
    assert [x.shape for x in jax.eval_shape(functools.partial(fn, return_lse=True), *args)] == [
        (4, 32, 128),
        (4,),
        (4, 32),
    ]

    def kernels_and_ttir(text):
        names = re.findall(r'name = "(\w+)", num_stages', text)
        return names, "".join(re.findall(r'ir = "(.*?)", name', text))

    plain_names, plain_ttir = kernels_and_ttir(lowered_for_cuda(fn, *args))
    lse_names, lse_ttir = kernels_and_ttir(lowered_for_cuda(functools.partial(fn, return_lse=True), *args))
    assert plain_names == lse_names
    assert "math.log " not in plain_ttir and "math.log " in lse_ttir


# ---------------------------------------------------------------- CPU: offline compile for sm_90 / sm_75


@pytest.fixture
def compile_plan(tmp_path, monkeypatch):
    """tests/offline_compile.compile_plan with a private Triton cache."""
    needs_triton_package()
    from offline_compile import compile_plan

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    return compile_plan


MAIN_KERNEL = {
    "separate": "decode_split_kernel",
    "fused": "decode_fused_kernel",
    "coop": "decode_coop_kernel",
}


@pytest.mark.parametrize(
    "batch, compute_evict, epilogue",
    [
        (16, True, "separate"),
        (1, True, "separate"),
        (64, False, "separate"),
        (4, True, "fused"),
        (4, True, "coop"),
        (64, True, None),  # the default at B = 64: fused, 4 splits of 512 slots
    ],
)
def test_kernels_compile_for_sm90_without_spills(compile_plan, batch, compute_evict, epilogue):
    """The GPU compiler (not the interpreter) accepts the kernels at Qwen3-8B shapes: K/V stream through
    16-byte cp.async copies into tensor-core dots, no register spills (ptxas bundled with triton)."""
    reports = compile_plan(batch, 32, 8, 2048, 128, compute_evict=compute_evict, epilogue=epilogue)
    main = reports[MAIN_KERNEL[epilogue or "fused"]]
    assert main["sass_ops"].get("LDGSTS.E.BYPASS.128", 0) > 0, main
    # With scoring, t is stored evict_last, and whoever reads it back drops its lines from L2 where t is
    # over 4 MiB (the discard_t default): at B = 64 here, not at B <= 16.
    if compute_evict:
        reader = reports["decode_combine_kernel"] if epilogue == "separate" else main
        assert main["sass_ops"].get("STG.E.EL.128", 0) > 0, main["sass_ops"]
        discards = reader["sass_ops"].get("CCTL.E.RML2", 0)
        assert (discards > 0) == (batch == 64), reader["sass_ops"]
    assert any(op.startswith("HMMA") for op in main["sass_ops"]), main
    # With scoring, ||v||_1 is ones @ |V|^T on the tensor cores: 24 HMMAs per 32 slots of the block
    # (16 for q k^T and p v).
    if compute_evict and epilogue == "separate":
        hmma = sum(n for op, n in main["sass_ops"].items() if op.startswith("HMMA"))
        block_c = resolved(batch, 2048, LaunchConfig(epilogue=epilogue)).block_c
        assert hmma == 24 * block_c // 32, (block_c, main["sass_ops"])
    for name, report in reports.items():
        assert report["stack_bytes"] == 0 and report["local_bytes"] == 0, (name, report)
        assert report["shared_bytes"] <= 227 * 1024, (name, report)


@pytest.mark.parametrize(
    "num_q_heads, head_dim, block_c, num_stages, dtype, epilogue",
    [
        (32, 128, 32, 3, "bfloat16", "separate"),
        (32, 128, 128, 3, "bfloat16", "fused"),
        (32, 64, 256, 2, "bfloat16", "separate"),
        (8, 256, 64, 3, "float16", "fused"),  # group 1
        (64, 128, 64, 2, "bfloat16", "separate"),  # group 8
        (32, 64, 32, 2, "float32", "separate"),
        (32, 128, 16, 3, "float32", "fused"),
        (32, 128, 64, 1, "bfloat16", "separate"),  # no cp.async ring
    ],
)
def test_shared_memory_estimate_matches_the_compiled_kernel(
    compile_plan, num_q_heads, head_dim, block_c, num_stages, dtype, epilogue
):
    # resolve_launch rejects a launch by config.shared_memory_bytes before it can fail on the GPU: the
    # estimate must never be below what the compiler allocates.
    reports = compile_plan(
        16, num_q_heads, 8, 2048, head_dim, dtype=dtype, epilogue=epilogue, block_c=block_c,
        num_stages=num_stages, num_splits=1,
    )  # fmt: skip
    compiled = reports[MAIN_KERNEL[epilogue]]
    shape = DecodeShape(16, num_q_heads, 8, 2048, head_dim, 4 if dtype == "float32" else 2)
    estimate = shared_memory_bytes(shape, block_c, num_stages)
    assert compiled["shared_bytes"] <= estimate, compiled
    if num_stages >= 2:  # exact there; with one stage the compiler needs less than the estimate
        assert estimate == compiled["shared_bytes"], compiled
    else:
        assert estimate <= 1.5 * compiled["shared_bytes"], compiled


@pytest.mark.parametrize(
    "kind, batch, epilogue",
    [
        ("int8", 16, "separate"),
        ("int8", 64, "fused"),
        ("int4", 64, "fused"),
        ("fp8", 4, "coop"),
        ("int2", 16, None),
    ],
)
def test_quantized_kernels_compile_for_sm90_without_spills(compile_plan, kind, batch, epilogue):
    """The default quantized launch at the benchmark's shape (Hq/Hkv 32/8, D 128, group 32): payloads
    stream through 8- or 16-byte cp.async copies into tensor-core dots, nothing spills in the slot
    loop, and the shared-memory estimate bounds the compiled kernel (exactly for one-byte codes).
    Outside the loop int4's 2-warp launch keeps a few registers on the stack (24 bytes, stored once a
    program); every other kernel has none."""
    reports = compile_plan(batch, 32, 8, 2048, 128, kv_quant=kind, epilogue=epilogue)
    main = reports[MAIN_KERNEL[epilogue or "separate"]]
    assert {"LDGSTS.E.64", "LDGSTS.E.BYPASS.128"} & set(main["sass_ops"]), main["sass_ops"]
    assert any(op.startswith("HMMA") for op in main["sass_ops"]), main
    assert not [op for op in main["loop_ops"] if op.startswith(("LDL", "STL"))], main["loop_ops"]
    for name, report in reports.items():
        stack = 32 if kind == "int4" and report is main else 0
        assert report["stack_bytes"] <= stack and report["local_bytes"] == 0, (name, report)
    cfg = resolved(batch, 2048, LaunchConfig(epilogue=epilogue), kv_quant=kind)
    shape = DecodeShape(batch, 32, 8, 2048, 128, 2, kind, 32)
    estimate = shared_memory_bytes(shape, cfg.block_c, cfg.num_stages)
    assert main["shared_bytes"] <= estimate, (main["shared_bytes"], estimate)
    if quant.codes_per_byte(kind) == 1 and cfg.num_warps > 1:
        assert main["shared_bytes"] == estimate
    if cfg.num_warps == 1:  # one warp keeps the query tile out of shared memory: the estimate less q
        assert main["shared_bytes"] == estimate - 16 * 128 * 2


@pytest.mark.parametrize("kind", ["int8", "int4", "int2"])
def test_quantized_slot_loop_has_no_i2f(compile_plan, kind):
    """The slot loop turns codes into q's dtype with integer ops and packed FMAs (int4 / int2: the PTX
    of `_unpack_asm`), never with I2F, a quarter-rate conversion; nor does it convert any value to f32
    for its norm, which it reads (KVScales.v_norm)."""
    loop = compile_plan(16, 32, 8, 2048, 128, kv_quant=kind)["decode_split_kernel"]["loop_ops"]
    assert any(op.startswith("HMMA") for op in loop), loop  # the slot loop, with its dots
    assert not [op for op in loop if op.startswith("I2F")], loop
    if kind != "int8":
        assert loop.get("HFMA2.BF16_V2", 0) > 0, loop


@pytest.mark.parametrize(
    "kind, batch, group",
    [("int8", 16, 32), ("int8", 64, 32), ("int8", 64, 128), ("int4", 16, 32), ("int4", 64, 32),
     ("int4", 64, 128), ("fp8", 64, 32), ("int2", 16, 32)],
)  # fmt: skip
def test_converting_after_unpacking_compiles_to_fewer_instructions(compile_plan, kind, batch, group):
    """LaunchConfig.convert_after_unpack at each kind's default launch: the codes reach the dots through
    16-byte shared stores and ldmatrix instead of a byte-by-byte gather (LDS.U8: 64 a trip at int4, 128
    at int8, before), the slot loop has fewer instructions than the default's and no spill, and the
    shared-memory estimate (one more [block_c, D] tile of codes) bounds the compiled kernel."""
    name = "decode_split_kernel" if batch == 16 else "decode_fused_kernel"
    default = compile_plan(batch, 32, 8, 2048, 128, kv_quant=kind, quant_group=group)[name]
    reports = compile_plan(
        batch, 32, 8, 2048, 128, kv_quant=kind, quant_group=group, convert_after_unpack=True
    )
    after = reports[name]
    loop = after["loop_ops"]
    assert loop.get("LDSM.16.MT88.4", 0) > 0, loop  # the values' codes, transposed by ldmatrix
    assert loop.get("LDS.U8", 0) <= 8 < default["loop_ops"].get("LDS.U8", 0), (loop, default["loop_ops"])
    assert sum(loop.values()) < 0.9 * sum(default["loop_ops"].values()), (loop, default["loop_ops"])
    assert not [op for op in loop if op.startswith(("LDL", "STL"))], loop
    for kernel, report in reports.items():
        stack = 32 if report is after and report["registers"] >= 254 else 0
        assert report["stack_bytes"] <= stack and report["local_bytes"] == 0, (kernel, report)
    cfg = resolved(batch, 2048, LaunchConfig(convert_after_unpack=True), kv_quant=kind, quant_group=group)
    assert cfg.convert_after_unpack
    shape = DecodeShape(batch, 32, 8, 2048, 128, 2, kind, group)
    estimate = shared_memory_bytes(shape, cfg.block_c, cfg.num_stages, convert_after_unpack=True)
    logits_tile = 16 * cfg.block_c * 4
    assert estimate - logits_tile <= after["shared_bytes"] <= estimate, (after["shared_bytes"], estimate)


@pytest.mark.parametrize("kind", ["int4", "int2"])
def test_packed_kernels_compile_for_float32_queries(compile_plan, kind):
    """float32 q (ThinKV's tiers under a float32 model) takes the compiler's code conversion: the PTX
    unpacking only makes 16-bit floats, and forcing it on f32 aborts the compile."""
    reports = compile_plan(16, 4, 2, 64, 64, dtype="float32", kv_quant=kind, quant_group=16, with_ptx=True)
    for name, report in reports.items():
        assert "prmt.b32" not in report["ptx"], name
        assert report["stack_bytes"] == 0 and report["local_bytes"] == 0, (name, report)


@pytest.mark.parametrize("epilogue", ["separate", "fused"])
def test_kernels_compile_for_sm75_without_the_discard(compile_plan, epilogue):
    # Turing has no discard.global.L2: the plan leaves it out and the kernels still compile.
    reports = compile_plan(16, 32, 8, 2048, 128, dtype="float16", capability=75, epilogue=epilogue)
    for name, report in reports.items():
        assert "CCTL.E.RML2" not in report["sass_ops"], (name, report["sass_ops"])
        assert report["stack_bytes"] == 0, (name, report)


# ---------------------------------------------------------------- CPU: Triton interpreter

LAUNCH_FIELDS = {f.name for f in dataclasses.fields(LaunchConfig)}


def _case(name, dtype, shape, valid="mixed", **kwargs):
    """An interpreter case on inputs of `shape` (B, Hq, Hkv, C, D): LaunchConfig fields among `kwargs`
    go to its "launch" dict (the separate epilogue unless it says otherwise; epilogue=None: the tuned
    choice), the rest are call arguments (or triton_interpret.py's "sms" and "repeat")."""
    launch = {"epilogue": "separate", **{f: kwargs.pop(f) for f in LAUNCH_FIELDS & set(kwargs)}}
    return name, dtype, shape, valid, {"launch": launch, **kwargs}


F32, F16, BF16 = "float32", "float16", "bfloat16"
FUSED = dict(epilogue="fused")
COOP = dict(epilogue="coop", sms=64)  # the grid must fit the "SMs" (one program each)
KV_HEAD = dict(granularity="kv_head")
NO_EVICT = dict(compute_evict=False)
# The reference is jnp on the same rounded inputs. "repeat": the case runs twice, the second time on the
# kernel state the first call returned; the second call's results are checked.
# fmt: off
INTERPRETER_CASES = [
    _case("f32-mha", F32, (4, 2, 2, 300, 64), block_c=32),
    _case("f32-gqa4", F32, (4, 8, 2, 300, 64), **FUSED, block_c=32, num_splits=3),
    _case("f32-gqa4-separate", F32, (4, 8, 2, 300, 64), block_c=32, num_splits=3, discard_t=True),
    _case("f32-gqa8", F32, (4, 16, 2, 300, 64), block_c=64),
    _case("f32-kvhead", F32, (4, 8, 2, 300, 64), **FUSED, **KV_HEAD, block_c=32),
    _case("f32-kvhead-1split", F32, (4, 8, 2, 200, 64), "all", **KV_HEAD, block_c=64, num_splits=1),
    _case("f32-separate-splits", F32, (2, 8, 2, 700, 64), "all", block_c=64, num_splits=4),
    _case("f16-separate-1split", F16, (4, 8, 2, 300, 128), num_splits=1),
    _case("noevict-separate", F32, (3, 8, 2, 300, 64), **NO_EVICT, num_splits=3),
    _case("f32-fused-splits-kvhead", F32, (2, 8, 2, 700, 64),
          "all", **FUSED, **KV_HEAD, block_c=32, num_splits=7),
    _case("f32-fused-many-splits", F32, (2, 8, 4, 600, 32), **FUSED, block_c=16, num_splits=37),
    _case("f32-block16", F32, (2, 4, 1, 77, 16), block_c=16, num_splits=5),
    _case("f32-gqa3-kvhead", F32, (2, 9, 3, 150, 32), **FUSED, **KV_HEAD, block_c=16),
    _case("f16-mqa32", F16, (2, 32, 1, 130, 64), "all", block_c=32, num_splits=2),
    _case("f16-gqa4-d128", F16, (4, 8, 2, 300, 128), block_c=64, num_splits=2),
    _case("f16-kvhead-d128", F16, (4, 8, 2, 300, 128), **FUSED, **KV_HEAD),
    _case("noevict-fused", F32, (3, 8, 2, 300, 64), **NO_EVICT, **FUSED, block_c=32, num_splits=4),
    # kv_len: empty row, one slot, a block boundary inside split 0, the whole buffer; 3 splits of 4
    # blocks, so rows 0-2 leave whole splits unread.
    _case("f32-kvlen", F32, (4, 8, 2, 300, 64), "all", block_c=32, num_splits=3, kv_len=[0, 1, 96, 300]),
    _case("f32-kvlen-mixed-kvhead", F32, (4, 8, 2, 300, 64),
          **KV_HEAD, block_c=32, num_splits=3, kv_len=[129, 300, 257, 31]),
    _case("f32-kvlen-fused", F32, (3, 8, 2, 300, 64), "all", **FUSED, block_c=32, kv_len=[0, 200, 33]),
    _case("noevict-kvlen", F32, (3, 8, 2, 300, 64),
          "all", **NO_EVICT, block_c=32, num_splits=1, kv_len=[0, 64, 299]),
    # The tuned epilogue choice: with 4 "SMs", B * Hkv = 8 picks "fused".
    _case("f16-auto", F16, (4, 16, 2, 256, 128), epilogue=None, kv_len=[0, 1, 129, 256]),
    # The coop epilogue: in the interpreter the last program to reach the barrier does every share
    # (same code as the GPU's parallel shares, which the GPU tests cover).
    _case("f32-coop", F32, (4, 8, 2, 300, 64), "all", **COOP, block_c=32, num_splits=3),
    _case("f32-coop-1split", F32, (4, 8, 2, 300, 64), "all", **COOP, block_c=64, num_splits=1),
    _case("f32-coop-kvhead", F32, (4, 8, 2, 300, 64), **COOP, **KV_HEAD, block_c=32, num_splits=4),
    _case("f32-coop-mqa", F32, (2, 8, 1, 600, 32), "all", **COOP, block_c=16, num_splits=9),
    _case("f16-coop-kvlen", F16, (3, 8, 2, 320, 128),
          "all", **COOP, block_c=32, num_splits=2, kv_len=[0, 130, 320]),
    _case("noevict-coop", F32, (3, 8, 2, 300, 64), **COOP, **NO_EVICT, num_splits=4),
    # The tuned choice with 64 "SMs": B * Hkv = 8 < 32 picks "coop".
    _case("f32-auto-coop", F32, (4, 8, 2, 1024, 64), "all", epilogue=None, sms=64),
    _case("repeat-coop", F32, (4, 8, 2, 300, 64), **COOP, block_c=32, num_splits=3, repeat=True),
    _case("repeat-coop-kvhead", F32, (2, 8, 2, 300, 64),
          **COOP, **KV_HEAD, block_c=32, num_splits=2, repeat=True),
    _case("repeat-coop-noevict", F32, (3, 8, 2, 300, 64), **COOP, **NO_EVICT, num_splits=4, repeat=True),
    _case("repeat-fused", F32, (3, 8, 2, 300, 64), **FUSED, block_c=32, num_splits=3, repeat=True),
    _case("repeat-separate", F32, (2, 8, 2, 300, 64), block_c=32, num_splits=3, repeat=True),
    # A quantized cache (group 32 unless quant_group says otherwise): every kind with bf16 and f16 q
    # at both granularities, across the epilogues. Key chunks: int8 / fp8 at D 64 two of 32 elements;
    # int4 two planes of 32 (group 16: two payload chunks x two planes); int2 four planes of 16, each
    # group spanning two planes (at D 128, four of 32); int4 with one scale a head (group = D).
    _case("int8-bf16", BF16, (4, 8, 2, 100, 64), kv_quant="int8", block_c=32, num_splits=2),
    _case("int8-bf16-kvhead", BF16, (4, 8, 2, 100, 64), kv_quant="int8", **FUSED, **KV_HEAD, block_c=16),
    _case("int8-f16", F16, (4, 8, 2, 100, 64), kv_quant="int8", **COOP, block_c=32, num_splits=3),
    _case("int8-f16-kvhead", F16, (4, 8, 2, 100, 64),
          kv_quant="int8", quant_group=64, **KV_HEAD, block_c=64, num_splits=1),
    _case("fp8-bf16", BF16, (4, 4, 2, 100, 64), kv_quant="fp8", quant_group=16, **FUSED, num_splits=2),
    _case("fp8-bf16-kvhead", BF16, (4, 8, 2, 100, 64), kv_quant="fp8", **COOP, **KV_HEAD, num_splits=2),
    _case("fp8-f16", F16, (4, 8, 2, 100, 64), kv_quant="fp8", block_c=32, num_splits=2),
    _case("fp8-f16-kvhead", F16, (4, 8, 2, 100, 64), kv_quant="fp8", **FUSED, **KV_HEAD, block_c=32),
    _case("int4-bf16", BF16, (4, 8, 2, 100, 64), kv_quant="int4", **FUSED, block_c=32, num_splits=2),
    _case("int4-bf16-kvhead", BF16, (4, 8, 2, 100, 64), kv_quant="int4", **KV_HEAD, num_splits=2),
    _case("int4-f16", F16, (4, 8, 2, 100, 64), kv_quant="int4", quant_group=16, **COOP, block_c=32),
    _case("int4-f16-kvhead", F16, (4, 8, 2, 100, 64),
          kv_quant="int4", quant_group=16, **KV_HEAD, block_c=32, num_splits=3),
    _case("int4-bf16-wholehead", BF16, (4, 8, 2, 100, 64), kv_quant="int4", quant_group=64, num_splits=2),
    _case("int2-bf16", BF16, (4, 8, 2, 100, 64), kv_quant="int2", **COOP, num_splits=2),
    _case("int2-bf16-kvhead", BF16, (4, 8, 2, 100, 64), kv_quant="int2", **KV_HEAD, block_c=32),
    _case("int2-f16", F16, (4, 8, 2, 100, 128), kv_quant="int2", block_c=32, num_splits=2),
    _case("int2-f16-kvhead", F16, (4, 8, 2, 100, 64), kv_quant="int2", **FUSED, **KV_HEAD, num_splits=2),
    # float32 q: the evict slot exactly; no scoring; a kv_len bound; the quantized launch defaults; the
    # kernel state through a second call.
    _case("int8-f32", F32, (4, 8, 2, 100, 64), kv_quant="int8", block_c=32, num_splits=2),
    _case("int4-f32-kvhead", F32, (4, 8, 2, 100, 64), kv_quant="int4", **COOP, **KV_HEAD, num_splits=2),
    _case("fp8-f32-kvhead", F32, (4, 8, 2, 100, 64), kv_quant="fp8", quant_group=16, **FUSED, **KV_HEAD),
    _case("int4-noevict", BF16, (3, 8, 2, 100, 64), kv_quant="int4", **NO_EVICT, **FUSED, num_splits=2),
    _case("int8-kvlen", F16, (4, 8, 2, 100, 64),
          "all", kv_quant="int8", block_c=32, num_splits=3, kv_len=[0, 1, 70, 100]),
    _case("int4-auto", BF16, (4, 8, 2, 256, 64), "all", kv_quant="int4", epilogue=None),
    _case("repeat-coop-int2", F16, (2, 8, 2, 100, 64), kv_quant="int2", **COOP, num_splits=2, repeat=True),
    # LaunchConfig.convert_after_unpack: the values unpacked after the softmax (the interpreter runs no
    # PTX, so this checks the loop's order, not the GPU's layout conversion).
    _case("int4-bf16-after", BF16, (4, 8, 2, 100, 64),
          kv_quant="int4", **FUSED, block_c=32, num_splits=2, convert_after_unpack=True),
    _case("int8-f16-kvhead-after", F16, (4, 8, 2, 100, 64),
          kv_quant="int8", **COOP, **KV_HEAD, num_splits=2, convert_after_unpack=True),
    _case("int2-bf16-after", BF16, (3, 8, 2, 100, 64),
          "all", kv_quant="int2", block_c=32, num_splits=3, kv_len=[0, 57, 100], convert_after_unpack=True),
    # The log-sum-exp output: split kernel + combine kernel, an empty row (kv_len 0) and a quantized cache.
    _case("lse-int8-kvlen", F16, (3, 8, 2, 100, 64),
          kv_quant="int8", block_c=32, num_splits=2, kv_len=[0, 70, 100], return_lse=True),
]
# fmt: on


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Run every INTERPRETER_CASES entry in one TRITON_INTERPRET=1 subprocess (it must import triton):
    {name: (inputs, kwargs, out, evict_slot, the state the first call left, lse or None)}."""
    pytest.importorskip("triton", reason="the interpreter tests need triton (no GPU)")
    pytest.importorskip("torch", reason="the interpreter tests need torch (CPU)")
    tmp = tmp_path_factory.mktemp("interp")
    arrays, cases, inputs = {}, [], []
    for i, (name, dtype, shape, valid, kwargs) in enumerate(INTERPRETER_CASES):
        kwargs = dict(kwargs)
        group = kwargs.pop("quant_group", 32)
        q, k, v, kv_valid = make_inputs(_seed("interp", name), *shape, jnp.dtype(dtype), valid)
        scales = None
        if kwargs.get("kv_quant"):  # payloads as their raw bytes (fp8's bits as uint8), and the scales
            k, v, scales = quantize_kv(k, v, kwargs["kv_quant"], group)
            for n, x in (("k", k), ("v", v)):
                x = np.asarray(x)
                arrays[f"{n}_{i}"] = x.view(np.uint8) if x.dtype == jnp.float8_e4m3fn else x
            arrays.update({f"{n}_{i}": np.asarray(x) for n, x in scales._asdict().items() if x is not None})
        else:
            arrays.update({f"{n}_{i}": np.asarray(x, np.float32) for n, x in zip("kv", (k, v))})
        inputs.append((q, k, v, kv_valid, scales))
        arrays[f"q_{i}"] = np.asarray(q, np.float32)
        arrays[f"valid_{i}"] = np.asarray(kv_valid)
        cases.append({"dtype": dtype, "kwargs": {"scale": 1 / math.sqrt(shape[-1]), "sms": 4, **kwargs}})
    np.savez(tmp / "cases.npz", cases=json.dumps(cases), **arrays)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "tests", "triton_interpret.py"),
            str(tmp / "cases.npz"),
            str(tmp / "out.npz"),
        ],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = np.load(tmp / "out.npz")
    return {
        case[0]: (
            inputs[i],
            cases[i]["kwargs"],
            *(results[f"{n}_{i}"] for n in ("out", "evict", "state")),
            results[f"lse_{i}"] if f"lse_{i}" in results else None,
        )
        for i, case in enumerate(INTERPRETER_CASES)
    }


@pytest.mark.parametrize("name", [case[0] for case in INTERPRETER_CASES])
def test_interpreter_matches_reference(interpreted, name):
    (q, k, v, kv_valid, kv_scales), kwargs, out, evict_slot, *_ = interpreted[name]
    if "kv_len" in kwargs:
        kv_valid = bounded_mask(kv_valid, kwargs["kv_len"])
    check = assert_matches_reference if kwargs.get("compute_evict", True) else assert_attention_only
    out = jnp.asarray(out).astype(q.dtype)
    evict_slot = jnp.asarray(evict_slot, jnp.int32)
    check(
        q,
        k,
        v,
        kv_valid,
        out,
        evict_slot,
        scale=kwargs["scale"],
        granularity=kwargs.get("granularity", "sequence"),
        kv_quant=kwargs.get("kv_quant"),
        kv_scales=kv_scales,
    )


@pytest.mark.parametrize("name", [case[0] for case in INTERPRETER_CASES])
def test_interpreter_leaves_the_kernel_state_zero(interpreted, name):
    # The one-launch epilogues count their programs in the state and must leave it zero (a repeated
    # case's second call, checked above, ran on it); the separate epilogue passes it through.
    (q, k, *_), _, _, _, state, _ = interpreted[name]
    assert state.dtype == np.int32 and state.shape == kernel_state_shape(q.shape[0], k.shape[1])
    np.testing.assert_array_equal(state, 0)


def _run_ptx(asm: str, word: int) -> tuple[int, int]:
    """Execute the unpacking PTX (`kernels._unpack_asm`) on one input register, bit for bit: a simulator
    of the instructions it uses (mov, prmt, shr, lop3, and fma.rn on packed 16-bit floats)."""
    regs = {"$2": word}
    val = lambda a: regs[a] if a in regs else int(a, 0)  # noqa: E731
    for ins in asm.strip("{} ").split(";"):
        if not ins.strip() or ins.strip().startswith(".reg"):
            continue
        op, rest = ins.split(None, 1)
        dst, *args = (a.strip() for a in rest.split(","))
        if op == "mov.b32":
            regs[dst] = val(args[0])
        elif op == "prmt.b32":  # byte i of the result is byte (selector nibble i) of {b, a}
            pool, sel = val(args[0]) | val(args[1]) << 32, val(args[2])
            regs[dst] = sum((pool >> 8 * (sel >> 4 * i & 7) & 0xFF) << 8 * i for i in range(4))
        elif op == "shr.u32":
            regs[dst] = val(args[0]) >> val(args[1])
        elif op == "lop3.b32":  # bit i: the table's bit at index (a << 2 | b << 1 | c)
            a, b, c, table = (val(x) for x in args)
            regs[dst] = sum(
                (table >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1)) & 1) << i for i in range(32)
            )
        elif op.startswith("fma.rn."):
            dtype = jnp.bfloat16 if "bf16" in op else jnp.float16
            a, b, c = (
                np.array([val(x) & 0xFFFF, val(x) >> 16], np.uint16).view(dtype).astype(np.float64)
                for x in args
            )
            r = (a * b + c).astype(dtype).view(np.uint16)  # the products here are exact: one rounding
            regs[dst] = int(r[0]) | int(r[1]) << 16
        else:
            raise AssertionError(f"the simulator does not know {op}")
    return regs["$0"], regs["$1"]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["int4", "int2"])
def test_ptx_unpacking_gives_each_plane_s_codes(dtype, kind):
    """The GPU path's PTX (the interpreter runs none) turns four payload bytes into the four codes of a
    plane as exact 16-bit floats, in element order: every byte value, at every byte position."""
    kernels = pytest.importorskip("cuda_triton_bridge.kernels", reason="needs triton")
    per_byte = quant.codes_per_byte(kind)
    bits = 8 // per_byte
    rng = np.random.default_rng(per_byte)
    words = rng.integers(0, 256, (256, 4))
    for position in range(4):
        words[:, position] = np.roll(np.arange(256), 37 * position)
    np_dtype = jnp.bfloat16 if dtype == "bf16" else jnp.float16
    for plane in range(per_byte):
        asm = kernels._unpack_asm(dtype, plane, per_byte)
        for word in words:
            lo, hi = _run_ptx(asm, int(sum(int(b) << 8 * i for i, b in enumerate(word))))
            got = np.array([lo & 0xFFFF, lo >> 16, hi & 0xFFFF, hi >> 16], np.uint16).view(np_dtype)
            want = (word >> plane * bits) & ((1 << bits) - 1)
            np.testing.assert_array_equal(
                got.astype(np.float64), want, err_msg=f"plane {plane}, bytes {word}"
            )


_COLUMN_SCRIPT = """
import json, sys
import numpy as np, torch, triton, triton.language as tl
from cuda_triton_bridge.kernels import _column

@triton.jit
def column(x_ptr, o_ptr, B: tl.constexpr, N: tl.constexpr, G: tl.constexpr):
    r, c = tl.arange(0, B), tl.arange(0, N)
    tl.store(o_ptr + r, _column(tl.load(x_ptr + r[:, None] * N + c[None, :]), G, N))

got = {}
for n in (1, 2, 4, 8):
    x = torch.from_numpy(np.random.default_rng(n).standard_normal((16, n)).astype(np.float32))
    for g in range(n):
        o = torch.zeros(16)
        column[(1,)](x, o, 16, n, g)
        got[f"{n},{g}"] = bool(torch.equal(o, x[:, g]))
print(json.dumps(got))
"""


def test_scale_column_is_that_column_for_every_group_count():
    """The kernel takes a chunk's scales out of the slots' scale rows [BLOCK_C, D / group] by splits of
    the last axis (`_column`): for 1, 2, 4 and 8 groups a head, every column is the one asked for."""
    pytest.importorskip("triton", reason="the interpreter tests need triton (no GPU)")
    pytest.importorskip("torch", reason="the interpreter tests need torch (CPU)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-c", _COLUMN_SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(got) == 1 + 2 + 4 + 8 and all(got.values()), got


def test_interpreter_lse_matches_numpy(interpreted):
    (q, k, v, kv_valid, kv_scales), kwargs, *_, lse = interpreted["lse-int8-kvlen"]
    bounded = bounded_mask(kv_valid, kwargs["kv_len"])
    assert not np.asarray(bounded[0]).any()  # the empty row: lse -inf
    assert_lse_matches(
        lse, q, k, v, bounded, scale=kwargs["scale"], kv_quant=kwargs["kv_quant"], kv_scales=kv_scales
    )


def test_interpreter_cases_cover_every_epilogue_and_repeat():
    def epilogue(case):
        _, dtype, (b, hq, hkv, c, d), _, kwargs = case
        kind = kwargs.get("kv_quant")
        group = kwargs.get("quant_group", 32) if kind else 0
        shape = DecodeShape(b, hq, hkv, c, d, jnp.dtype(dtype).itemsize, kind, group)
        return resolve_launch(
            shape, LaunchConfig(**kwargs["launch"]), sms=kwargs.get("sms", 4),
            compute_evict=kwargs.get("compute_evict", True), capability=90,
        ).epilogue  # fmt: skip

    assert {epilogue(case) for case in INTERPRETER_CASES} == {"separate", "fused", "coop"}
    assert {epilogue(case) for case in INTERPRETER_CASES if case[-1].get("repeat")} == {
        "separate",
        "fused",
        "coop",
    }
    assert {epilogue(case) for case in INTERPRETER_CASES if case[-1]["launch"]["epilogue"] is None} == {
        "fused",
        "coop",
    }
    quantized = [case for case in INTERPRETER_CASES if case[-1].get("kv_quant")]
    covered = {(case[-1]["kv_quant"], case[1], case[-1].get("granularity", "sequence")) for case in quantized}
    assert covered >= {
        (kind, dtype, granularity)
        for kind in quant.KV_QUANT_KINDS
        for dtype in (BF16, F16)
        for granularity in ("sequence", "kv_head")
    }
    assert {epilogue(case) for case in quantized} == {"separate", "fused", "coop"}


# ---------------------------------------------------------------- GPU: against the reference


# bf16 and fp32 over every head dim x GQA ratio ("sequence"); "kv_head" in bf16; fp16 spot checks.
# Each case compiles its own kernels (shapes are constexprs), so the cross product is kept to 20.
MATCH_CASES = (
    [(dt, d, g, "sequence") for dt in ("bfloat16", "float32") for d in (64, 128) for g in (1, 4, 8)]
    + [("bfloat16", d, g, "kv_head") for d in (64, 128) for g in (1, 4, 8)]
    + [("float16", 128, 4, "sequence"), ("float16", 64, 8, "kv_head")]
)
EPILOGUES = ["fused", "separate", "coop"]


@pytest.mark.parametrize("xla_launch", [False, True])
@pytest.mark.parametrize("dtype, head_dim, group, granularity", MATCH_CASES)
@gpu
def test_matches_reference(dtype, head_dim, group, granularity, xla_launch):
    num_kv_heads, num_slots = 2, 300  # 300: not a multiple of any block size
    dtype = jnp.dtype(dtype)
    q, k, v, valid = make_inputs(
        _seed(dtype, head_dim, group, granularity),
        4,
        num_kv_heads * group,
        num_kv_heads,
        num_slots,
        head_dim,
        dtype,
    )
    scale = 1.0 / math.sqrt(head_dim)
    out, evict_slot = ctb.longflow_decode_attention_triton(
        q, k, v, valid, scale=scale, granularity=granularity, launch=LaunchConfig(xla_launch=xla_launch)
    )
    assert_matches_reference(q, k, v, valid, out, evict_slot, scale=scale, granularity=granularity)


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize(
    "dtype, head_dim, group", [("bfloat16", 128, 4), ("float16", 64, 8), ("bfloat16", 64, 1)]
)
@gpu
def test_importance_with_fast_log2_matches_reference(num_splits, dtype, head_dim, group):
    """||v||_1 on the tensor cores and lg2.approx give the reference's slot over 1000 slots."""
    dtype = jnp.dtype(dtype)
    q, k, v, valid = make_inputs(
        _seed("fast_log2", dtype, head_dim, group), 4, 2 * group, 2, 1000, head_dim, dtype
    )
    scale = 1.0 / math.sqrt(head_dim)
    out, evict_slot = ctb.longflow_decode_attention_triton(
        q, k, v, valid, scale=scale, launch=LaunchConfig(num_splits=num_splits)
    )
    assert_matches_reference(q, k, v, valid, out, evict_slot, scale=scale, granularity="sequence")


@pytest.mark.parametrize("block_c, num_splits", [(16, 1), (32, 3), (64, 16), (128, 2), (256, 1), (32, 32)])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@gpu
def test_block_and_split_choices(block_c, num_splits, epilogue):
    q, k, v, valid = make_inputs(_seed("blocks", block_c, num_splits), 4, 8, 2, 1000, 64, jnp.bfloat16)
    launch = LaunchConfig(block_c=block_c, num_splits=num_splits, epilogue=epilogue)
    if epilogue == "coop" and 4 * 2 * num_splits > ctb.config.num_sms():
        with pytest.raises(ValueError, match="one program per SM"):  # a grid that could deadlock
            ctb.longflow_decode_attention_triton(q, k, v, valid, scale=0.125, launch=launch)
        return
    out, evict_slot = ctb.longflow_decode_attention_triton(q, k, v, valid, scale=0.125, launch=launch)
    assert_matches_reference(q, k, v, valid, out, evict_slot, scale=0.125, granularity="sequence")


@pytest.mark.parametrize("epilogue", EPILOGUES)
@gpu
def test_large_blocks_at_head_dim_128_get_stages_that_fit(epilogue):
    # 256-slot blocks at D 128 with the default 3 stages would ask for 276 KiB of shared memory and fail
    # at launch; resolve_launch gives them 2 stages, and the result is right.
    q, k, v, valid = make_inputs(_seed("big blocks", epilogue), 2, 32, 8, 1000, 128, jnp.bfloat16)
    out, evict_slot = ctb.longflow_decode_attention_triton(
        q, k, v, valid, scale=0.088, launch=LaunchConfig(block_c=256, num_splits=2, epilogue=epilogue)
    )
    assert_matches_reference(q, k, v, valid, out, evict_slot, scale=0.088, granularity="sequence")


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@gpu
def test_kv_len_bound_matches_reference(granularity, num_splits, epilogue):
    # Rows: empty, one slot, a block boundary, mid-block, the whole buffer; the valid mask is random.
    q, k, v, valid = make_inputs(_seed("kvlen", granularity, num_splits), 5, 8, 2, 1000, 128, jnp.bfloat16)
    kv_len = jnp.asarray([0, 1, 256, 517, 1000], jnp.int32)
    launch = LaunchConfig(num_splits=num_splits, epilogue=epilogue, block_c=64)
    out, evict_slot = ctb.longflow_decode_attention_triton(
        q, k, v, valid, scale=0.125, granularity=granularity, kv_len=kv_len, launch=launch
    )
    bounded = bounded_mask(valid, kv_len)
    assert_matches_reference(q, k, v, bounded, out, evict_slot, scale=0.125, granularity=granularity)


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
@pytest.mark.parametrize("discard_t", [True, False])
@pytest.mark.parametrize(
    "num_splits, epilogue",
    # 5 x 8 x 3 = 120 programs: the most coop splits that fit one program per SM (H100).
    [(1, "separate"), (4, "separate"), (1, "fused"), (4, "fused"), (1, "coop"), (3, "coop")],
)
@gpu
def test_discard_t_matches_reference(granularity, discard_t, num_splits, epilogue):
    # A partly filled buffer; C a multiple of 32, so discard_t (where on) drops t's lines. t is 1.3 MB
    # here, under the default's bound: the discard is forced either way.
    q, k, v, valid = make_inputs(
        _seed("switches", granularity, num_splits, epilogue, discard_t), 5, 32, 8, 2048, 128, jnp.bfloat16
    )
    kv_len = jnp.asarray([0, 1, 700, 2047, 2048], jnp.int32)
    launch = LaunchConfig(num_splits=num_splits, epilogue=epilogue, discard_t=discard_t)
    out, evict_slot = ctb.longflow_decode_attention_triton(
        q, k, v, valid, scale=0.088, granularity=granularity, kv_len=kv_len, launch=launch
    )
    bounded = bounded_mask(valid, kv_len)
    assert_matches_reference(q, k, v, bounded, out, evict_slot, scale=0.088, granularity=granularity)


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@gpu
def test_without_eviction_returns_minus_one(granularity, num_splits, epilogue):
    q, k, v, valid = make_inputs(_seed("noevict", granularity, num_splits), 3, 8, 2, 500, 128, jnp.bfloat16)
    out, evict_slot = ctb.longflow_decode_attention_triton(
        q, k, v, valid, scale=0.088, granularity=granularity, compute_evict=False,
        launch=LaunchConfig(num_splits=num_splits, epilogue=epilogue),
    )  # fmt: skip
    assert_attention_only(q, k, v, valid, out, evict_slot, scale=0.088, granularity=granularity)


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
@gpu
def test_epilogues_agree(granularity):
    q, k, v, valid = make_inputs(_seed("final", granularity), 4, 16, 4, 3000, 128, jnp.bfloat16, valid="all")
    results = [
        ctb.longflow_decode_attention_triton(
            q,
            k,
            v,
            valid,
            scale=0.088,
            granularity=granularity,
            launch=LaunchConfig(epilogue=e, num_splits=8),
        )
        for e in EPILOGUES
    ]
    for out, ev in results[1:]:
        np.testing.assert_array_equal(np.asarray(ev), np.asarray(results[0][1]))
        np.testing.assert_allclose(
            np.asarray(out, np.float32), np.asarray(results[0][0], np.float32), rtol=1e-2, atol=1e-2
        )
    assert_matches_reference(q, k, v, valid, *results[0], scale=0.088, granularity=granularity)


@pytest.mark.parametrize("batch, num_slots", [(1, 8192), (16, 2048), (16, 8192), (32, 2048), (64, 2048)])
@gpu
def test_benchmark_shapes_with_default_launch_are_deterministic(batch, num_slots):
    # Qwen3-8B's attention (32 query / 8 KV heads, D 128), bf16, all slots valid: the importance argmin
    # is over real scores, not over empty slots.
    q, k, v, valid = make_inputs(
        _seed("bench", batch, num_slots), batch, 32, 8, num_slots, 128, jnp.bfloat16, "all"
    )
    fn = jax.jit(lambda *a: ctb.longflow_decode_attention_triton(*a, scale=1 / math.sqrt(128)))
    out, evict_slot = fn(q, k, v, valid)
    assert_matches_reference(
        q, k, v, valid, out, evict_slot, scale=1 / math.sqrt(128), granularity="sequence"
    )
    for _ in range(3):
        out2, evict2 = fn(q, k, v, valid)
        np.testing.assert_array_equal(np.asarray(evict2), np.asarray(evict_slot))
        np.testing.assert_array_equal(np.asarray(out2), np.asarray(out))


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize(
    "epilogue, xla_launch", [("fused", True), ("separate", True), ("coop", True), ("separate", False)]
)
@gpu
def test_xla_launch_matches_reference(granularity, num_splits, epilogue, xla_launch):
    # XLA compiles the same TTIR with its own Triton: the results must match the reference, with and
    # without scoring and with a kv_len bound. The combine kernel always goes through XLA's call; with
    # xla_launch=False the main kernel goes through jax-triton's.
    q, k, v, valid = make_inputs(
        _seed("xla", granularity, num_splits, epilogue), 4, 32, 8, 1500, 128, jnp.bfloat16
    )
    kv_len = jnp.asarray([1500, 700, 1, 0], jnp.int32)
    launch = LaunchConfig(num_splits=num_splits, epilogue=epilogue, xla_launch=xla_launch)
    kw = dict(scale=0.088, granularity=granularity, launch=launch)

    def call(**extra):
        return jax.jit(functools.partial(ctb.longflow_decode_attention_triton, **kw, **extra))

    hlo = call().lower(q, k, v, valid).as_text(dialect="hlo")
    assert 'custom_call_target="__gpu$xla.gpu.triton"' in hlo
    assert ('custom_call_target="triton_kernel_call"' in hlo) is not xla_launch
    out, evict_slot = call()(q, k, v, valid)
    assert_matches_reference(q, k, v, valid, out, evict_slot, scale=0.088, granularity=granularity)
    out, evict_slot = call()(q, k, v, valid, kv_len=kv_len)
    bounded = bounded_mask(valid, kv_len)
    assert_matches_reference(q, k, v, bounded, out, evict_slot, scale=0.088, granularity=granularity)
    out, evict_slot = call(compute_evict=False)(q, k, v, valid)
    assert_attention_only(q, k, v, valid, out, evict_slot, scale=0.088, granularity=granularity)


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
@pytest.mark.parametrize(
    "epilogue, xla_launch, compute_evict",
    [
        ("coop", True, True),
        ("coop", True, False),
        ("coop", False, True),
        ("fused", True, True),
        ("fused", False, True),
        ("separate", True, True),
    ],
)
@gpu
def test_kernel_state_stays_zero_across_calls(granularity, epilogue, xla_launch, compute_evict):
    # One kernel state threaded through a jitted scan of calls on different queries: every call must
    # match the reference (a ticket left non-zero would hang the coop barrier or skip a finisher), and
    # the state must come back all zeros.
    calls, batch = 4, 4
    q, k, v, valid = make_inputs(
        _seed("state", granularity, epilogue, xla_launch, compute_evict),
        batch,
        32,
        8,
        1500,
        128,
        jnp.bfloat16,
    )
    qs = jax.random.normal(jax.random.key(_seed("state-q")), (calls,) + q.shape, jnp.float32)
    qs = qs.astype(q.dtype)
    launch = LaunchConfig(num_splits=3, epilogue=epilogue, xla_launch=xla_launch)
    kw = dict(scale=0.088, granularity=granularity, compute_evict=compute_evict, launch=launch)
    check = assert_matches_reference if compute_evict else assert_attention_only

    @jax.jit
    def run(state):
        def body(state, q_i):
            out, evict_slot, state = ctb.longflow_decode_attention_triton(
                q_i, k, v, valid, kernel_state=state, **kw
            )
            return state, (out, evict_slot)

        return jax.lax.scan(body, state, qs)

    state, (outs, evicts) = run(ctb.init_kernel_state(batch, 8))
    np.testing.assert_array_equal(np.asarray(state), 0)
    for i in range(calls):
        check(qs[i], k, v, valid, outs[i], evicts[i], scale=0.088, granularity=granularity)
    # The same state again, outside the loop: still usable.
    out, evict_slot, state = jax.jit(
        lambda s: ctb.longflow_decode_attention_triton(qs[0], k, v, valid, kernel_state=s, **kw)
    )(state)
    np.testing.assert_array_equal(np.asarray(evict_slot), np.asarray(evicts[0]))
    np.testing.assert_array_equal(np.asarray(state), 0)


@pytest.mark.parametrize("kv_quant", [None, *quant.KV_QUANT_KINDS])
@pytest.mark.parametrize("compute_evict", [True, False])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@gpu
def test_lse_matches_numpy(epilogue, compute_evict, kv_quant):
    # Every epilogue x scoring x cache kind, jitted with a kernel state: one split (the main kernel's
    # statistics are final) and three (merged by the epilogue), with a kv_len bound that empties a row.
    q, k, v, valid = make_inputs(
        _seed("lse", epilogue, compute_evict, kv_quant), 4, 8, 2, 500, 64, jnp.bfloat16
    )
    kw = dict(scale=0.125, kv_quant=kv_quant, kv_scales=None)
    if kv_quant is not None:
        k, v, kw["kv_scales"] = quantize_kv(k, v, kv_quant, group=16)
    kv_len = jnp.asarray([500, 257, 1, 0], jnp.int32)
    bounded = bounded_mask(valid, kv_len)
    check = assert_matches_reference if compute_evict else assert_attention_only
    for num_splits in (1, 3):
        fn = functools.partial(
            ctb.longflow_decode_attention_triton, compute_evict=compute_evict, return_lse=True,
            launch=LaunchConfig(epilogue=epilogue, num_splits=num_splits), **kw,
        )  # fmt: skip
        out, evict_slot, lse, state = jax.jit(fn)(
            q, k, v, valid, kv_len=kv_len, kernel_state=ctb.init_kernel_state(4, 2)
        )
        check(q, k, v, bounded, out, evict_slot, granularity="sequence", **kw)
        assert_lse_matches(lse, q, k, v, bounded, **kw)
        np.testing.assert_array_equal(np.asarray(state), 0)


# ---------------------------------------------------------------- GPU: a quantized cache

QUANT_MATCH_CASES = [
    (kind, dtype, granularity)
    for kind in quant.KV_QUANT_KINDS
    for dtype in ("bfloat16", "float16")
    for granularity in ("sequence", "kv_head")
] + [(kind, "float32", "sequence") for kind in ("int4", "int2")]  # no PTX unpacking for f32 q
# float32 q at kv_head granularity: the setting in which `scripts/kernel_drift.py` (a float32 model,
# fp8) found Triton's evict slot apart from the reference's on an H100.
QUANT_MATCH_CASES += [(kind, "float32", "kv_head") for kind in quant.KV_QUANT_KINDS]


@pytest.mark.parametrize("kind, dtype, granularity", QUANT_MATCH_CASES)
@gpu
def test_quantized_matches_reference(kind, dtype, granularity):
    # Every kind, q dtype and granularity, each case on another epilogue, launch path and head size
    # (group 32 at D 128, 16 at D 64), with a kv_len bound that leaves splits unread.
    i = QUANT_MATCH_CASES.index((kind, dtype, granularity))
    head_dim, group = (128, 32) if i % 4 < 2 else (64, 16)
    launch = LaunchConfig(epilogue=EPILOGUES[i % 3], xla_launch=bool(i % 2))
    q, k, v, valid = make_inputs(_seed("quant", kind, dtype, granularity), 4, 8, 2, 1000, head_dim, dtype)
    kp, vp, scales = quantize_kv(k, v, kind, group)
    kv_len = jnp.asarray([1000, 517, 1, 0], jnp.int32)
    kw = dict(scale=head_dim**-0.5, granularity=granularity, kv_quant=kind, kv_scales=scales)
    out, evict_slot = ctb.longflow_decode_attention_triton(
        q, kp, vp, valid, kv_len=kv_len, launch=launch, **kw
    )
    assert_matches_reference(q, kp, vp, bounded_mask(valid, kv_len), out, evict_slot, **kw)
    out, evict_slot = ctb.longflow_decode_attention_triton(q, kp, vp, valid, compute_evict=False, **kw)
    assert_attention_only(q, kp, vp, valid, out, evict_slot, **kw)


AFTER_UNPACK_CASES = [
    (kind, dtype, granularity, group)
    for kind in quant.KV_QUANT_KINDS
    for dtype, granularity, group in (("bfloat16", "sequence", 32), ("float16", "kv_head", 128))
]


@pytest.mark.parametrize("kind, dtype, granularity, group", AFTER_UNPACK_CASES)
@gpu
def test_converting_after_unpacking_matches_reference(kind, dtype, granularity, group):
    # LaunchConfig.convert_after_unpack on the GPU (its layout conversion is GPU-only): every kind, both
    # 16-bit q dtypes and granularities, a tuned and a 1-warp launch, a kv_len bound.
    i = AFTER_UNPACK_CASES.index((kind, dtype, granularity, group))
    launch = LaunchConfig(convert_after_unpack=True, **(dict(num_warps=1, block_c=32) if i % 2 else {}))
    q, k, v, valid = make_inputs(_seed("after unpack", kind, dtype, granularity), 16, 32, 8, 1000, 128, dtype)
    kp, vp, scales = quantize_kv(k, v, kind, group)
    kv_len = jnp.asarray(np.random.default_rng(i).integers(0, 1001, 16), jnp.int32)
    kw = dict(scale=128**-0.5, granularity=granularity, kv_quant=kind, kv_scales=scales)
    out, evict_slot = ctb.longflow_decode_attention_triton(
        q, kp, vp, valid, kv_len=kv_len, launch=launch, **kw
    )
    assert_matches_reference(q, kp, vp, bounded_mask(valid, kv_len), out, evict_slot, **kw)


@pytest.mark.parametrize("dtype, granularity, group", [
    ("bfloat16", "sequence", 128), ("float16", "kv_head", 32), ("bfloat16", "kv_head", 64),
])  # fmt: skip
@gpu
def test_int8_many_programs_launch_matches_reference(dtype, granularity, group):
    # int8 at 1 warp with 32-slot blocks (tuned_launch.QUANT_MANY_PROGRAMS) where B * Hkv fills 3.5
    # programs an SM, with mixed valid rows and a kv_len bound that leaves slots unread.
    batch, slots = 64, 640
    launch = LaunchConfig(num_warps=1, block_c=32)
    q, k, v, valid = make_inputs(_seed("int8 many", dtype, granularity), batch, 32, 8, slots, 128, dtype)
    kp, vp, scales = quantize_kv(k, v, "int8", group)
    kv_len = jnp.asarray(np.random.default_rng(group).integers(0, slots + 1, batch), jnp.int32)
    kw = dict(scale=128**-0.5, granularity=granularity, kv_quant="int8", kv_scales=scales)
    out, evict_slot = ctb.longflow_decode_attention_triton(
        q, kp, vp, valid, kv_len=kv_len, launch=launch, **kw
    )
    assert_matches_reference(q, kp, vp, bounded_mask(valid, kv_len), out, evict_slot, **kw)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("batch, num_slots", [(1, 8192), (16, 2048), (64, 2048)])
@gpu
def test_quantized_benchmark_shapes_with_default_launch(kind, batch, num_slots):
    # The benchmark's shape (32 / 8 heads, D 128, group 32, every slot valid) with the default launch,
    # jitted with a kernel state: right, deterministic, and no buffer the size of a dequantized cache.
    q, k, v, valid = make_inputs(
        _seed("quant bench", kind, batch, num_slots), batch, 32, 8, num_slots, 128, jnp.bfloat16, "all"
    )
    kp, vp, scales = quantize_kv(k, v, kind)
    kw = dict(scale=128**-0.5, kv_quant=kind)

    def call(q, kp, vp, valid, scales, state):
        return ctb.longflow_decode_attention_triton(
            q, kp, vp, valid, kv_scales=scales, kernel_state=state, **kw
        )

    args = (q, kp, vp, valid, scales, ctb.init_kernel_state(batch, 8))
    compiled = jax.jit(call).lower(*args).compile()
    mem = compiled.memory_analysis()
    if mem is not None:
        assert mem.temp_size_in_bytes < k.nbytes // 4, mem
    out, evict_slot, state = compiled(*args)
    assert_matches_reference(
        q, kp, vp, valid, out, evict_slot, granularity="sequence", kv_scales=scales, **kw
    )
    np.testing.assert_array_equal(np.asarray(state), 0)
    for _ in range(2):
        out2, evict2, _ = compiled(*args)
        np.testing.assert_array_equal(np.asarray(evict2), np.asarray(evict_slot))
        np.testing.assert_array_equal(np.asarray(out2), np.asarray(out))


# ---------------------------------------------------------------- GPU: inside a jitted decode loop


def _decode_loop(attention, steps, scale):
    """Per step: write the new token's K/V into the evict slot, mark it valid, attend, pick the next slot."""

    def loop(k_cache, v_cache, kv_valid, evict_slot, q_seq, k_seq, v_seq):
        batch = k_cache.shape[0]
        rows = jnp.arange(batch)

        def body(carry):
            i, k_cache, v_cache, kv_valid, slot, outs, slots = carry
            k_cache = k_cache.at[rows, :, slot].set(k_seq[i])
            v_cache = v_cache.at[rows, :, slot].set(v_seq[i])
            kv_valid = kv_valid.at[rows, slot].set(True)
            out, slot = attention(q_seq[i], k_cache, v_cache, kv_valid, scale=scale)
            return i + 1, k_cache, v_cache, kv_valid, slot, outs.at[i].set(out), slots.at[i].set(slot)

        outs = jnp.zeros((steps,) + q_seq.shape[1:], q_seq.dtype)
        slots = jnp.zeros((steps, batch), jnp.int32)
        carry = (0, k_cache, v_cache, kv_valid, evict_slot, outs, slots)
        _, k_cache, v_cache, kv_valid, _, outs, slots = jax.lax.while_loop(
            lambda c: c[0] < steps, body, carry
        )
        return k_cache, v_cache, kv_valid, outs, slots

    return jax.jit(loop, donate_argnums=(0, 1, 2))


@pytest.mark.parametrize(
    "launch",
    [
        LaunchConfig(xla_launch=False),  # the default coop epilogue at this batch, through jax-triton
        LaunchConfig(xla_launch=True),
        LaunchConfig(xla_launch=False, epilogue="separate"),  # split via jax-triton, combine via XLA
    ],
)
@gpu
def test_decode_loop_under_jit_while_loop_with_donated_cache(launch):
    batch, hq, hkv, slots_, d, steps, prompt = 2, 8, 2, 256, 64, 6, 250
    dtype = jnp.float32  # exact argmin, so the two trajectories must agree step by step
    q, k, v, _ = make_inputs(_seed("loop"), batch, hq, hkv, slots_, d, dtype)
    key = jax.random.key(_seed("loop"))
    valid = jnp.broadcast_to(jnp.arange(slots_) < prompt, (batch, slots_))
    ks = jax.random.split(jax.random.fold_in(key, 1), 3)
    q_seq = jax.random.normal(ks[0], (steps, batch, hq, d), dtype)
    k_seq = jax.random.normal(ks[1], (steps, batch, hkv, d), dtype)
    v_seq = jax.random.normal(ks[2], (steps, batch, hkv, d), dtype)
    first = jnp.full((batch,), prompt, jnp.int32)
    scale = 1 / math.sqrt(d)

    attention = functools.partial(ctb.longflow_decode_attention_triton, launch=launch)
    triton_loop = _decode_loop(attention, steps, scale)
    ref_loop = _decode_loop(longflow_decode_attention_reference, steps, scale)

    args = (k, v, valid, first, q_seq, k_seq, v_seq)
    compiled = triton_loop.lower(*args).compile()
    hlo = compiled.as_text()
    cache_type = f"f32[{batch},{hkv},{slots_},{d}]"
    copies = [line for line in hlo.splitlines() if re.search(rf"= {re.escape(cache_type)}\S* copy\(", line)]
    assert not copies, "cache copied inside the decode loop:\n" + "\n".join(copies)
    mem = compiled.memory_analysis()
    cache_bytes = k.size * k.dtype.itemsize
    if mem is not None:
        assert mem.alias_size_in_bytes >= 2 * cache_bytes  # both caches updated in place
        assert mem.temp_size_in_bytes < cache_bytes  # no cache-sized scratch

    ref = ref_loop(jnp.copy(k), jnp.copy(v), jnp.copy(valid), first, q_seq, k_seq, v_seq)
    k_in = jnp.copy(k)
    got = triton_loop(k_in, jnp.copy(v), jnp.copy(valid), first, q_seq, k_seq, v_seq)
    assert k_in.is_deleted()  # donated
    np.testing.assert_array_equal(np.asarray(got[4]), np.asarray(ref[4]))  # evict slot per step
    np.testing.assert_allclose(np.asarray(got[3]), np.asarray(ref[3]), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ref[0]))  # same slots overwritten
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(ref[2]))
