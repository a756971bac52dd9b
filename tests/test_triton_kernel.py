"""The Triton decode kernel (cuda_triton_bridge) against the jnp reference.

CPU: the package imports without triton and rejects bad inputs before touching triton. Where triton and
torch are installed (no GPU needed), the kernels also run in Triton's interpreter, through the same
config and launch plan (cuda_triton_bridge/interpret.py), float32 and float16 only: the Triton 3.6
interpreter computes a bf16 tl.dot on the raw bits.
GPU (marked `gpu`, skipped without a CUDA GPU, triton and jax-triton): random inputs, fresh per test
(a key from the test's parameters; never zeros), against `longflow_jax.reference` computed in float32 on
the same rounded inputs.

Evict slot: must equal the reference argmin. For float32 exactly. For bf16/fp16 the kernel's importance
is computed in float32 from the same rounded inputs, so it differs from the reference only by the order
of the float32 sums (tensor-core vs XLA dot): two slots whose importances agree to ~1e-6 relative can
swap. There the chosen slot's reference importance must be within IMPORTANCE_RTOL of the minimum.
"""

from __future__ import annotations

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
from cuda_triton_bridge.launch import plan_launch
from longflow_jax.reference import (
    decode_attention_probs,
    longflow_decode_attention_reference,
    longflow_importance,
)

IMPORTANCE_RTOL = 1e-5
# ||out - ref|| / ||ref||: fp32 runs exact (ieee) dots; 16-bit rounds p for the PV product and the output.
OUT_RTOL = {"float32": 1e-5, "bfloat16": 1.5e-2, "float16": 2e-3}

needs_triton = pytest.mark.skipif(
    not ctb.triton_available(), reason="needs triton, jax-triton and a CUDA GPU (triton_available() is False)"
)


def gpu(test):
    return pytest.mark.gpu(needs_triton(test))


def _key(*params):
    return jax.random.key(zlib.crc32(repr(params).encode()))


def make_inputs(key, batch, num_q_heads, num_kv_heads, num_slots, head_dim, dtype, valid="mixed"):
    """q, k, v ~ N(0, 1) in `dtype`; kv_valid rows cycle through: all valid, ~half valid, 3 valid slots,
    and only the last slot valid (all-but-one invalid)."""
    kq, kk, kv, km, kf = jax.random.split(key, 5)
    q = jax.random.normal(kq, (batch, num_q_heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, num_kv_heads, num_slots, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, num_kv_heads, num_slots, head_dim), jnp.float32).astype(dtype)
    if valid == "all":
        return q, k, v, jnp.ones((batch, num_slots), bool)
    half = jax.random.bernoulli(km, 0.5, (batch, num_slots))
    few_at = jax.random.choice(kf, num_slots, (3,), replace=False)
    few = jnp.zeros((num_slots,), bool).at[few_at].set(True)
    one = jnp.arange(num_slots) == num_slots - 1
    rows = [jnp.ones((num_slots,), bool), half[1], few, one]
    return q, k, v, jnp.stack([rows[i % 4] for i in range(batch)])


def reference_importance(q, k, v, kv_valid, scale, granularity):
    _, probs = decode_attention_probs(q, k, v, kv_valid, scale)
    return longflow_importance(probs, v, kv_valid, granularity)  # [B, G, C] f32


def assert_matches_reference(q, k, v, kv_valid, out, evict_slot, *, scale, granularity):
    ref_out, _ = decode_attention_probs(q, k, v, kv_valid, scale)
    _, ref_evict = longflow_decode_attention_reference(
        q, k, v, kv_valid, scale=scale, granularity=granularity
    )
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


# ---------------------------------------------------------------- CPU: import and argument checks


def test_package_imports_and_reports_availability():
    assert isinstance(ctb.triton_available(), bool)


def _small(dtype=jnp.bfloat16, head_dim=64, num_slots=100):
    q = jnp.ones((1, 4, head_dim), dtype)
    k = jnp.ones((1, 2, num_slots, head_dim), dtype)
    return q, k, k, jnp.ones((1, num_slots), bool)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_c=48), "block_c must be a power of two"),
        (dict(block_c=8), "block_c must be an int in"),
        (dict(block_c=64, num_splits=10), "num_splits=10 exceeds the 2 blocks"),
        (dict(num_splits=0), "num_splits must be an int in"),
        (dict(num_warps=3), "num_warps must be a power of two"),
        (dict(num_stages=0), "num_stages must be an int in"),
        (dict(granularity="head"), "granularity must be one of"),
        (dict(scale=float("nan")), "scale must be a finite"),
        (dict(vnorm="fast"), "vnorm must be one of"),
    ],
)
def test_rejects_bad_launch_arguments(kwargs, match):
    kwargs = {"scale": 0.125, **kwargs}
    with pytest.raises(ValueError, match=match):
        ctb.longflow_decode_attention_triton(*_small(), **kwargs)


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


def test_splits_round_to_whole_blocks():
    shape = ctb.config.DecodeShape(1, 4, 2, 7 * 64, 64)
    cfg = ctb.resolve_config(shape, block_c=64, num_splits=3)
    assert (cfg.num_splits, cfg.blocks_per_split) == (3, 3)
    cfg = ctb.resolve_config(shape, block_c=64, num_splits=6)
    assert (cfg.num_splits, cfg.blocks_per_split) == (4, 2)


def test_default_splits_follow_the_measured_choice():
    # H100 (132 SMs), Qwen3-8B attention: the epilogue, split count and block size that measured fastest
    # (KERNEL_NOTES_triton.md, config.py): coop with 64-slot blocks at a small batch, one split of
    # 128-slot blocks with the separate epilogue at B = 9-32, fused with 512-slot splits of 32-slot
    # blocks at B = 64.
    want = {
        (1, 2048): ("coop", 16, 64),
        (1, 8192): ("coop", 16, 64),
        (8, 8192): ("coop", 2, 64),
        (9, 2048): ("separate", 2, 128),
        (16, 2048): ("separate", 1, 128),
        (16, 8192): ("separate", 1, 128),
        (32, 8192): ("separate", 1, 128),
        (64, 2048): ("fused", 4, 32),
        (64, 8192): ("fused", 16, 32),
    }
    for (batch, slots), expected in want.items():
        cfg = ctb.resolve_config(ctb.config.DecodeShape(batch, 32, 8, slots, 128), sms=132)
        assert (cfg.epilogue, cfg.num_splits, cfg.block_c) == expected, (batch, slots, cfg)
        assert cfg.blocks_per_split * cfg.block_c >= ctb.config.MIN_SLOTS_PER_SPLIT
    # Without scoring: the same structure at a small batch (for the eviction overhead), else the
    # separate path, which is one launch with one split.
    for batch, expected in ((1, ("coop", 16)), (16, ("separate", 1)), (64, ("separate", 1))):
        shape = ctb.config.DecodeShape(batch, 32, 8, 8192, 128)
        cfg = ctb.resolve_config(shape, sms=132, compute_evict=False)
        assert (cfg.epilogue, cfg.num_splits) == expected, (batch, cfg)
    # float32 keeps its spill-free 32-slot blocks whatever the batch, and so does a pre-Hopper GPU
    # (128-slot blocks were measured on Hopper only, and need more shared memory than Turing has).
    assert ctb.resolve_config(ctb.config.DecodeShape(16, 32, 8, 2048, 128, 4), sms=132).block_c == 32
    pre_hopper = ctb.resolve_config(ctb.config.DecodeShape(16, 32, 8, 2048, 128), sms=108, capability=80)
    assert (pre_hopper.epilogue, pre_hopper.num_splits, pre_hopper.block_c) == ("separate", 1, 32)


@pytest.mark.parametrize("epilogue", ["separate", "fused"])
def test_discard_needs_sm80_and_a_gpu(epilogue):
    # discard.global.L2 is PTX for sm_80+; the interpreter (fast_log2=False) runs no PTX at all.
    shape = ctb.config.DecodeShape(64, 32, 8, 2048, 128)
    cfg = ctb.resolve_config(shape, sms=132, epilogue=epilogue)
    kw = dict(granularity="sequence", compute_evict=True, final_reduce="atomic", is_f32=False)
    main = "split" if epilogue == "fused" else "combine"

    def discard(**extra):
        plan = plan_launch(shape, cfg, **kw, **extra)
        return getattr(plan, main).meta["DISCARD_T"]

    assert discard(capability=90) and discard(capability=80)
    assert not discard(capability=75)
    assert not discard(capability=90, fast_log2=False)
    off = ctb.resolve_config(shape, sms=132, epilogue=epilogue, overrides=dict(discard_t=False))
    assert not getattr(plan_launch(shape, off, **kw), main).meta["DISCARD_T"]


def test_t_is_discarded_only_above_four_mib():
    # B x 32 heads x C x 4 bytes of t: 16x2048 is exactly 4 MiB (kept in L2), 8x8192 and 16x8192 above.
    def discard(batch, slots, **kw):
        return ctb.resolve_config(ctb.config.DecodeShape(batch, 32, 8, slots, 128), sms=132, **kw).discard_t

    assert not discard(1, 8192) and not discard(4, 8192) and not discard(16, 2048)
    assert discard(8, 8192) and discard(16, 8192) and discard(64, 2048) and discard(32, 2048)
    assert discard(16, 2048, overrides=dict(discard_t=True)) and not discard(
        64, 2048, overrides=dict(discard_t=False)
    )


def test_coop_grid_must_fit_one_program_per_sm():
    # Its programs wait for each other: a grid larger than the SM count could deadlock, so it is refused.
    shape = ctb.config.DecodeShape(16, 32, 8, 2048, 128)
    assert ctb.resolve_config(shape, sms=132, epilogue="coop").num_splits == 1
    with pytest.raises(ValueError, match="one program per SM: num_splits=2 x 8 KV heads x batch 16"):
        ctb.resolve_config(shape, sms=132, epilogue="coop", num_splits=2)
    with pytest.raises(ValueError, match="at most 32 splits"):
        ctb.resolve_config(ctb.config.DecodeShape(1, 8, 1, 8192, 64), sms=132, epilogue="coop", num_splits=64)
    # The default never asks for more than fits: 132 // (3 * 8) = 5 splits.
    cfg = ctb.resolve_config(ctb.config.DecodeShape(3, 32, 8, 8192, 128), sms=132, epilogue="coop")
    assert cfg.num_splits == 5
    # Above one program per SM the default is not coop.
    assert ctb.resolve_config(ctb.config.DecodeShape(17, 32, 8, 2048, 128), sms=132).epilogue != "coop"


def test_rejects_bad_overrides_and_epilogue():
    shape = ctb.config.DecodeShape(1, 4, 2, 128, 64)
    with pytest.raises(ValueError, match="unknown overrides"):
        ctb.resolve_config(shape, overrides=dict(store_t=False))
    with pytest.raises(ValueError, match="must be a bool"):
        ctb.resolve_config(shape, overrides=dict(cache_hints=1))
    with pytest.raises(ValueError, match="epilogue must be one of"):
        ctb.resolve_config(shape, epilogue="both")
    assert ctb.resolve_config(shape, overrides=dict(discard_t=False)).discard_t is False


def _custom_calls(module):
    found = []

    def walk(op):
        if op.operation.name == "stablehlo.custom_call":
            found.append(op.operation)
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    walk(child)

    walk(module.operation)
    return found


def test_typed_ffi_rewrite_equals_what_jax_ffi_emits():
    # ffi_target.to_typed_ffi turns jax-triton's legacy call (API 2, opaque bytes) into exactly the op
    # jax.ffi emits for a typed-FFI call carrying those bytes as the attribute `opaque`.
    from cuda_triton_bridge.ffi_target import is_legacy_call, to_typed_ffi

    blob = zlib.compress(os.urandom(64))  # arbitrary bytes, NULs and non-UTF-8 included
    x = jnp.ones((4, 3), jnp.float32)
    out = (jax.ShapeDtypeStruct((4, 3), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32))

    def legacy(x):
        return jax.ffi.ffi_call("target", out, custom_call_api_version=2, legacy_backend_config=blob)(x)

    def typed(x):
        return jax.ffi.ffi_call("target", out)(x, opaque=blob)

    (op,) = _custom_calls(jax.jit(legacy).lower(x).compiler_ir())
    (want,) = _custom_calls(jax.jit(typed).lower(x).compiler_ir())
    assert str(op) != str(want)
    assert is_legacy_call(op) and not is_legacy_call(want)
    to_typed_ffi(op)
    assert str(op) == str(want)
    with pytest.raises(RuntimeError, match="cannot rewrite"):
        to_typed_ffi(op)  # already typed: not a legacy call any more


def test_custom_call_target_follows_the_switch_and_the_jax_version(monkeypatch):
    from cuda_triton_bridge import ffi_target

    assert ffi_target.custom_call_target(False) == "triton_kernel_call"
    monkeypatch.setattr(jax, "__version_info__", (0, 10, 0))
    assert ffi_target.custom_call_target(True) == "triton_kernel_call"
    monkeypatch.setattr(jax, "__version_info__", (0, 10, 1))
    assert ffi_target.custom_call_target(True) == "triton_kernel_call_ffi"
    shape = ctb.config.DecodeShape(1, 4, 2, 128, 64)
    assert ctb.resolve_config(shape).ffi_call is False  # measured slower on jax 0.11.2
    assert ctb.resolve_config(shape, overrides=dict(ffi_call=True)).ffi_call is True


def test_default_launch_is_xlas_triton_call_at_a_small_batch_only():
    # The measured choice (docs/BENCHMARKS.md, session 10): XLA's Triton custom call while B * Hkv < SMs / 2
    # (the launch cost decides), jax-triton above for the main kernel (the kernel's speed decides) with
    # the combine kernel through XLA's; overrides force either.
    for batch, want in [(1, True), (8, True), (9, False), (16, False), (64, False)]:
        shape = ctb.config.DecodeShape(batch, 32, 8, 2048, 128)
        assert ctb.resolve_config(shape, sms=132).xla_call is want, batch
        assert ctb.resolve_config(shape, sms=132).xla_combine is True  # the combine kernel: always XLA's
        for forced in (True, False):
            assert ctb.resolve_config(shape, sms=132, overrides=dict(xla_call=forced)).xla_call is forced


def test_xla_call_lowers_to_xlas_triton_custom_call():
    """The XLA launch path (xla_call.py), lowered for CUDA on any machine: XLA's own Triton custom call
    with the kernel's TTIR (scalars folded in as constants, pointers 16-byte aligned), the grid, the
    launch parameters and the aliases."""
    triton = pytest.importorskip("triton", reason="building the TTIR needs the triton package (no GPU)")
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
def decode_without_jax_triton(monkeypatch):
    """cuda_triton_bridge.decode imported with a stand-in jax_triton that only reports sm_90 (no launch
    through it may happen), so the XLA-launch path lowers on a machine without jax-triton or a GPU. The
    module is dropped again afterwards, so other tests see the package as it was."""
    import types

    pytest.importorskip("triton", reason="building the TTIR needs the triton package (no GPU)")
    if ctb.triton_available():
        pytest.skip("the GPU tests run the real decode path")

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel went through jax-triton")

    stub = types.SimpleNamespace(get_compute_capability=lambda device: 90, triton_call=no_launch)
    monkeypatch.setitem(sys.modules, "jax_triton", stub)
    monkeypatch.delitem(sys.modules, "cuda_triton_bridge.decode", raising=False)
    import cuda_triton_bridge.decode as decode

    yield decode
    sys.modules.pop("cuda_triton_bridge.decode", None)
    if getattr(ctb, "decode", None) is decode:
        delattr(ctb, "decode")


@pytest.mark.parametrize(
    "batch, epilogue, overrides, kernels, alias",
    [
        # (batch, epilogue, overrides, kernels, the aliased (operand, output) of the launch that has one)
        (1, None, None, ["decode_coop_kernel"], (5, 8)),  # the default at a small batch: XLA's call
        (4, "fused", dict(xla_call=True), ["decode_fused_kernel"], (5, 7)),
        (4, "separate", dict(xla_call=True), ["decode_split_kernel", "decode_combine_kernel"], (6, 4)),
    ],
)
def test_decode_lowers_through_xlas_triton_call(
    decode_without_jax_triton, batch, epilogue, overrides, kernels, alias
):
    """The real decode path (decode.py's wiring, the real kernels' TTIR) lowered for CUDA on any
    machine: every kernel is one XLA Triton custom call, and the tickets / counter buffers are aliased."""
    q = jax.ShapeDtypeStruct((batch, 32, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((batch, 8, 2048, 128), jnp.bfloat16)
    valid = jax.ShapeDtypeStruct((batch, 2048), jnp.bool_)
    fn = functools.partial(
        decode_without_jax_triton.longflow_decode_attention_triton,
        scale=0.088,
        epilogue=epilogue,
        overrides=overrides,
    )
    text = jax.jit(fn).trace(q, kv, kv, valid).lower(lowering_platforms=("cuda",)).as_text()
    assert re.findall(r'name = "(\w+)", num_stages', text) == kernels
    assert text.count("stablehlo.custom_call") == len(kernels)
    # One-kernel epilogues: zeros aliased to the tickets; separate: the split kernel's counter to the
    # combine kernel's.
    operand, output = alias
    aliases = re.findall(r"stablehlo\.output_operand_alias<[^>]*>", text)
    assert aliases == [
        f"stablehlo.output_operand_alias<output_tuple_indices = [{output}], operand_index = {operand}, "
        "operand_tuple_indices = []>"
    ]


def test_persistent_tickets_replace_the_zero_fill(decode_without_jax_triton):
    """With the caller's tickets the coop launch (XLA's call, B = 1) takes that buffer, aliased to its
    tickets output and returned, instead of a zero fill of its own."""
    q = jax.ShapeDtypeStruct((1, 32, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 8, 2048, 128), jnp.bfloat16)
    valid = jax.ShapeDtypeStruct((1, 2048), jnp.bool_)
    tickets = jax.ShapeDtypeStruct(ctb.ticket_shape(1, 8), jnp.int32)
    fn = decode_without_jax_triton.longflow_decode_attention_triton

    def with_tickets(q, k, v, valid, tickets):
        return fn(q, k, v, valid, scale=0.088, tickets=tickets)

    def lowered(f, *args):
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    fresh = lowered(functools.partial(fn, scale=0.088), q, kv, kv, valid)
    persistent = lowered(with_tickets, q, kv, kv, valid, tickets)
    # Without tickets: a broadcast of zeros to the kernel's 2 tickets; with them: none of that shape.
    assert "tensor<2xi32>" in fresh and "tensor<2xi32>" not in persistent
    assert re.findall(r'name = "(\w+)", num_stages', persistent) == ["decode_coop_kernel"]
    call = re.search(r"stablehlo\.custom_call @__gpu\$xla\.gpu\.triton\(([^)]*)\)", persistent)
    assert call.group(1).split(", ")[5] == "%arg4"  # the tickets argument itself is operand 5
    assert "operand_index = 5" in persistent and "tensor<1x16xi32>" in persistent
    assert len(jax.eval_shape(functools.partial(fn, scale=0.088), q, kv, kv, valid)) == 2
    outs = jax.eval_shape(with_tickets, q, kv, kv, valid, tickets)
    assert len(outs) == 3 and outs[2].shape == tickets.shape and outs[2].dtype == jnp.int32


# ---------------------------------------------------------------- CPU: offline compile for sm_90


@pytest.mark.parametrize(
    "batch, compute_evict, epilogue, vnorm",
    [
        (16, True, "separate", "mma"),
        (16, True, "separate", "reduce"),
        (1, True, "separate", "mma"),
        (64, False, "separate", "mma"),
        (4, True, "fused", "mma"),
        (4, True, "coop", "mma"),
        (64, True, None, "mma"),  # the measured choice at B = 64: fused, 4 splits of 512 slots
    ],
)
def test_kernels_compile_for_sm90_without_spills(
    batch, compute_evict, epilogue, vnorm, tmp_path, monkeypatch
):
    """The GPU compiler (not the interpreter) accepts the kernels at Qwen3-8B shapes: K/V stream through
    16-byte cp.async copies into tensor-core dots, no register spills (ptxas bundled with triton)."""
    pytest.importorskip("triton", reason="the offline compile needs triton (no GPU)")
    from cuda_triton_bridge.offline import compile_plan

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    reports = compile_plan(
        batch, 32, 8, 2048, 128, compute_evict=compute_evict, epilogue=epilogue, vnorm=vnorm
    )
    names = {"separate": "decode_split_kernel", "coop": "decode_coop_kernel"}
    main = reports[names.get(epilogue, "decode_fused_kernel")]
    assert main["sass_ops"].get("LDGSTS.E.BYPASS.128", 0) > 0, main
    # With scoring, t is stored evict_last, and whoever reads it back drops its lines from L2 where t is
    # over 4 MiB (config.default_discard_t): at B = 64 here, not at B <= 16.
    if compute_evict:
        reader = reports["decode_combine_kernel"] if epilogue == "separate" else main
        assert main["sass_ops"].get("STG.E.EL.128", 0) > 0, main["sass_ops"]
        discards = reader["sass_ops"].get("CCTL.E.RML2", 0)
        assert (discards > 0) == (batch == 64), reader["sass_ops"]
    assert any(op.startswith("HMMA") for op in main["sass_ops"]), main
    # With scoring, vnorm="mma" adds ones @ |V|^T: one more tensor-core dot than the row reduction
    # (24 against 16 HMMAs per 32 slots of the block).
    hmma = sum(n for op, n in main["sass_ops"].items() if op.startswith("HMMA"))
    if compute_evict and epilogue == "separate":
        shape = ctb.config.DecodeShape(batch, 32, 8, 2048, 128)
        block_c = ctb.resolve_config(shape, sms=132, epilogue=epilogue).block_c
        assert hmma == (24 if vnorm == "mma" else 16) * block_c // 32, (block_c, main["sass_ops"])
    for name, report in reports.items():
        assert report["stack_bytes"] == 0 and report["local_bytes"] == 0, (name, report)
        assert report["shared_bytes"] <= 227 * 1024, (name, report)


@pytest.mark.parametrize(
    "num_q_heads, head_dim, block_c, num_stages, dtype, epilogue",
    [
        (32, 128, 32, 3, "bfloat16", "separate"),  # the default at Qwen3-8B shapes
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
    num_q_heads, head_dim, block_c, num_stages, dtype, epilogue, tmp_path, monkeypatch
):
    # resolve_config rejects a launch by config.shared_memory_bytes before it can fail on the GPU: the
    # estimate must never be below what the compiler allocates.
    pytest.importorskip("triton", reason="the offline compile needs triton (no GPU)")
    from cuda_triton_bridge.offline import compile_plan

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    reports = compile_plan(
        16, num_q_heads, 8, 2048, head_dim, dtype=dtype, epilogue=epilogue, block_c=block_c,
        num_stages=num_stages, num_splits=1,
    )  # fmt: skip
    compiled = reports["decode_split_kernel" if epilogue == "separate" else "decode_fused_kernel"]
    itemsize = 4 if dtype == "float32" else 2
    shape = ctb.config.DecodeShape(16, num_q_heads, 8, 2048, head_dim, itemsize)
    estimate = ctb.config.shared_memory_bytes(shape, block_c, num_stages)
    assert compiled["shared_bytes"] <= estimate, compiled
    if num_stages >= 2:  # exact there; with one stage the compiler needs less than the estimate
        assert estimate == compiled["shared_bytes"], compiled
    else:
        assert estimate <= 1.5 * compiled["shared_bytes"], compiled


def test_launches_over_the_shared_memory_limit_are_rejected_or_get_fewer_stages():
    shape = ctb.config.DecodeShape(16, 32, 8, 2048, 128)
    # 256-slot blocks at D 128: 3 stages need 276 KiB (the H100 allows 227), 2 stages 148 KiB.
    with pytest.raises(ValueError, match="needs about 276 KiB of shared memory"):
        ctb.resolve_config(shape, block_c=256, num_stages=3)
    assert ctb.resolve_config(shape, block_c=256).num_stages == 2  # the default, reduced to fit
    assert ctb.resolve_config(shape, block_c=128).num_stages == ctb.config.NUM_STAGES
    with pytest.raises(ValueError, match="even with num_stages=1"):
        ctb.resolve_config(ctb.config.DecodeShape(1, 8, 8, 4096, 256), block_c=512)
    q = jnp.zeros((1, 32, 128), jnp.bfloat16)
    kv = jnp.zeros((1, 8, 1024, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="shared memory"):  # the public entry point, before any triton import
        ctb.longflow_decode_attention_triton(
            q, kv, kv, jnp.ones((1, 1024), bool), scale=0.1, block_c=512, num_stages=2
        )


@pytest.mark.parametrize("epilogue", ["separate", "fused"])
def test_kernels_compile_for_sm75_without_the_discard(epilogue, tmp_path, monkeypatch):
    # Turing has no discard.global.L2: the plan leaves it out and the kernels still compile.
    pytest.importorskip("triton", reason="the offline compile needs triton (no GPU)")
    from cuda_triton_bridge.offline import compile_plan

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    reports = compile_plan(16, 32, 8, 2048, 128, dtype="float16", capability=75, epilogue=epilogue)
    for name, report in reports.items():
        assert "CCTL.E.RML2" not in report["sass_ops"], (name, report["sass_ops"])
        assert report["stack_bytes"] == 0, (name, report)


# ---------------------------------------------------------------- CPU: Triton interpreter

SEPARATE = dict(epilogue="separate")
FUSED = dict(epilogue="fused")
COOP = dict(epilogue="coop", sms=64)  # the grid must fit the "SMs" (one program each)
PERSIST = dict(persistent_tickets=True)  # interpret.main: two calls, the second on the first's tickets
# (name, dtype, B, Hq, Hkv, C, D, valid, kwargs); the reference is jnp on the same rounded inputs.
# Cases run the separate (two-kernel) epilogue unless they say otherwise; FUSED: the single launch.
INTERPRETER_CASES = [
    ("f32-mha", "float32", 4, 2, 2, 300, 64, "mixed", dict(block_c=32)),
    ("f32-gqa4", "float32", 4, 8, 2, 300, 64, "mixed", dict(**FUSED, block_c=32, num_splits=3)),
    ("f32-gqa8", "float32", 4, 16, 2, 300, 64, "mixed", dict(block_c=64)),
    (
        "f32-gqa4-vnorm-reduce",
        "float32",
        4,
        8,
        2,
        300,
        64,
        "mixed",
        dict(block_c=32, num_splits=3, vnorm="reduce"),
    ),
    ("f32-kvhead", "float32", 4, 8, 2, 300, 64, "mixed", dict(**FUSED, block_c=32, granularity="kv_head")),
    (
        "f32-kvhead-1split",
        "float32",
        4,
        8,
        2,
        200,
        64,
        "all",
        dict(block_c=64, num_splits=1, granularity="kv_head"),
    ),
    (
        "f32-xla-final",
        "float32",
        2,
        8,
        2,
        700,
        64,
        "all",
        dict(block_c=64, num_splits=4, **SEPARATE, final_reduce="xla"),
    ),
    ("f32-atomic-final", "float32", 2, 8, 2, 700, 64, "all", dict(block_c=64, num_splits=4, **SEPARATE)),
    (
        "f32-separate-kvhead",
        "float32",
        4,
        8,
        2,
        300,
        64,
        "mixed",
        dict(block_c=32, granularity="kv_head", **SEPARATE),
    ),
    ("f16-separate-1split", "float16", 4, 8, 2, 300, 128, "mixed", dict(num_splits=1, **SEPARATE)),
    (
        "noevict-separate",
        "float32",
        3,
        8,
        2,
        300,
        64,
        "mixed",
        dict(num_splits=3, compute_evict=False, **SEPARATE),
    ),
    (
        "f32-fused-splits-kvhead",
        "float32",
        2,
        8,
        2,
        700,
        64,
        "all",
        dict(**FUSED, block_c=32, num_splits=7, granularity="kv_head"),
    ),
    ("f32-fused-many-splits", "float32", 2, 8, 4, 600, 32, "mixed", dict(**FUSED, block_c=16, num_splits=37)),
    ("f32-block16", "float32", 2, 4, 1, 77, 16, "mixed", dict(block_c=16, num_splits=5)),
    (
        "f32-gqa3-kvhead",
        "float32",
        2,
        9,
        3,
        150,
        32,
        "mixed",
        dict(**FUSED, block_c=16, granularity="kv_head"),
    ),
    ("f16-mqa32", "float16", 2, 32, 1, 130, 64, "all", dict(block_c=32, num_splits=2)),
    ("f16-gqa4-d128", "float16", 4, 8, 2, 300, 128, "mixed", dict(block_c=64, num_splits=2)),
    ("f16-kvhead-d128", "float16", 4, 8, 2, 300, 128, "mixed", dict(**FUSED, granularity="kv_head")),
    (
        "noevict-1split",
        "float32",
        3,
        8,
        2,
        300,
        64,
        "mixed",
        dict(block_c=64, num_splits=1, compute_evict=False),
    ),
    (
        "noevict-splits",
        "float32",
        3,
        8,
        2,
        300,
        64,
        "mixed",
        dict(**FUSED, block_c=32, num_splits=4, compute_evict=False),
    ),
    (
        "noevict-kvhead",
        "float32",
        3,
        8,
        2,
        300,
        64,
        "mixed",
        dict(num_splits=2, compute_evict=False, granularity="kv_head"),
    ),
    # kv_len: empty row, one slot, a block boundary inside split 0, the whole buffer; 3 splits of 4
    # blocks, so rows 0-2 leave whole splits unread.
    ("f32-kvlen", "float32", 4, 8, 2, 300, 64, "all", dict(block_c=32, num_splits=3, kv_len=[0, 1, 96, 300])),
    (
        "f32-kvlen-mixed-kvhead",
        "float32",
        4,
        8,
        2,
        300,
        64,
        "mixed",
        dict(block_c=32, num_splits=3, granularity="kv_head", kv_len=[129, 300, 257, 31]),
    ),
    ("f32-kvlen-fused", "float32", 3, 8, 2, 300, 64, "all", dict(**FUSED, block_c=32, kv_len=[0, 200, 33])),
    (
        "noevict-kvlen",
        "float32",
        3,
        8,
        2,
        300,
        64,
        "all",
        dict(block_c=32, num_splits=1, compute_evict=False, kv_len=[0, 64, 299]),
    ),
    # The t-traffic switches off (the GPU-only parts are no-ops in the interpreter: plumbing), and the
    # measured epilogue choice (None): with the interpreter's 4 "SMs", B * Hkv = 8 picks "fused".
    (
        "f32-hints-off",
        "float32",
        4,
        8,
        2,
        300,
        64,
        "mixed",
        dict(block_c=32, num_splits=3, overrides=dict(cache_hints=False, discard_t=False)),
    ),
    ("f16-auto", "float16", 4, 16, 2, 256, 128, "mixed", dict(epilogue=None, kv_len=[0, 1, 129, 256])),
    # The coop epilogue: in the interpreter the last program to reach the barrier does every share
    # (same code as the GPU's parallel shares, which the GPU tests cover).
    ("f32-coop", "float32", 4, 8, 2, 300, 64, "all", dict(**COOP, block_c=32, num_splits=3)),
    ("f32-coop-1split", "float32", 4, 8, 2, 300, 64, "all", dict(**COOP, block_c=64, num_splits=1)),
    (
        "f32-coop-kvhead",
        "float32",
        4,
        8,
        2,
        300,
        64,
        "mixed",
        dict(**COOP, block_c=32, num_splits=4, granularity="kv_head"),
    ),
    ("f32-coop-mqa", "float32", 2, 8, 1, 600, 32, "all", dict(**COOP, block_c=16, num_splits=9)),
    (
        "f16-coop-kvlen",
        "float16",
        3,
        8,
        2,
        320,
        128,
        "all",
        dict(**COOP, block_c=32, num_splits=2, kv_len=[0, 130, 320]),
    ),
    ("noevict-coop", "float32", 3, 8, 2, 300, 64, "mixed", dict(**COOP, num_splits=4, compute_evict=False)),
    # The measured choice with 64 "SMs": B * Hkv = 8 <= 64 picks "coop".
    ("f32-auto-coop", "float32", 4, 8, 2, 1024, 64, "all", dict(epilogue=None, sms=64)),
    # Persistent tickets: each case runs twice, the second time on the buffer the first call returned
    # (which must be all zeros again); the second call's results are checked.
    ("tickets-coop", "float32", 4, 8, 2, 300, 64, "mixed", dict(**COOP, **PERSIST, block_c=32, num_splits=3)),
    (
        "tickets-coop-kvhead",
        "float32",
        2,
        8,
        2,
        300,
        64,
        "mixed",
        dict(**COOP, **PERSIST, block_c=32, num_splits=2, granularity="kv_head"),
    ),
    (
        "tickets-coop-noevict",
        "float32",
        3,
        8,
        2,
        300,
        64,
        "mixed",
        dict(**COOP, **PERSIST, num_splits=4, compute_evict=False),
    ),
    (
        "tickets-fused",
        "float32",
        3,
        8,
        2,
        300,
        64,
        "mixed",
        dict(**FUSED, **PERSIST, block_c=32, num_splits=3),
    ),
    ("tickets-separate", "float32", 2, 8, 2, 300, 64, "mixed", dict(**PERSIST, block_c=32, num_splits=3)),
]


def bounded_valid(kv_valid, kwargs):
    """The mask the kernel applies: kv_valid and slot < kv_len (when given)."""
    return bounded_mask(kv_valid, kwargs["kv_len"]) if "kv_len" in kwargs else kv_valid


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Run every INTERPRETER_CASES entry in one TRITON_INTERPRET=1 subprocess (it must import triton)."""
    pytest.importorskip("triton", reason="the interpreter tests need triton (no GPU)")
    pytest.importorskip("torch", reason="the interpreter tests need torch (CPU)")
    tmp = tmp_path_factory.mktemp("interp")
    arrays, cases, inputs = {}, [], []
    for i, (name, dtype, b, hq, hkv, c, d, valid, kwargs) in enumerate(INTERPRETER_CASES):
        q, k, v, kv_valid = make_inputs(_key("interp", name), b, hq, hkv, c, d, jnp.dtype(dtype), valid)
        inputs.append((q, k, v, kv_valid))
        for n, x in zip("qkv", (q, k, v)):
            arrays[f"{n}_{i}"] = np.asarray(x, np.float32)
        arrays[f"valid_{i}"] = np.asarray(kv_valid)
        # Cases without an epilogue run the separate one (None: the measured choice, tested on its own).
        base = {"scale": 1 / math.sqrt(d), "sms": 4, "epilogue": "separate"}
        cases.append({"dtype": dtype, "kwargs": {**base, **kwargs}})
    np.savez(tmp / "cases.npz", cases=json.dumps(cases), **arrays)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-m", "cuda_triton_bridge.interpret", str(tmp / "cases.npz"), str(tmp / "out.npz")],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = np.load(tmp / "out.npz")
    return {
        case[0]: (
            inputs[i],
            cases[i]["kwargs"],
            results[f"out_{i}"],
            results[f"evict_{i}"],
            results[f"tickets_{i}"] if f"tickets_{i}" in results else None,
        )
        for i, case in enumerate(INTERPRETER_CASES)
    }


@pytest.mark.parametrize("name", [case[0] for case in INTERPRETER_CASES])
def test_interpreter_matches_reference(interpreted, name):
    (q, k, v, kv_valid), kwargs, out, evict_slot, _ = interpreted[name]
    kv_valid = bounded_valid(kv_valid, kwargs)
    granularity = kwargs.get("granularity", "sequence")
    out = jnp.asarray(out).astype(q.dtype)
    evict_slot = jnp.asarray(evict_slot, jnp.int32)
    if kwargs.get("compute_evict", True):
        assert_matches_reference(
            q, k, v, kv_valid, out, evict_slot, scale=kwargs["scale"], granularity=granularity
        )
    else:
        ref_out, _ = decode_attention_probs(q, k, v, kv_valid, kwargs["scale"])
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-4, atol=1e-5)
        assert evict_slot.shape == ((q.shape[0],) if granularity == "sequence" else (q.shape[0], k.shape[1]))
        assert (np.asarray(evict_slot) == -1).all()


@pytest.mark.parametrize(
    "name", [case[0] for case in INTERPRETER_CASES if case[-1].get("persistent_tickets")]
)
def test_interpreter_leaves_persistent_tickets_zero(interpreted, name):
    # The first call's returned buffer (its second call's results are checked above against the reference).
    (q, k, _, _), _, _, _, tickets = interpreted[name]
    assert tickets is not None and tickets.dtype == np.int32
    assert tickets.shape == ctb.ticket_shape(q.shape[0], k.shape[1])
    np.testing.assert_array_equal(tickets, 0)


def test_layer_cache_holds_the_bridges_ticket_buffer():
    # generate passes each layer's tickets to the Triton kernel: they must be what the bridge expects.
    from longflow_jax.kv_cache import layer_from_kept

    k_seq = jnp.zeros((3, 5, 2, 16), jnp.float32)  # [B, P, Hkv, D]
    kept = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (3, 1, 5))
    layer = layer_from_kept(k_seq, k_seq, kept, capacity=8)
    assert layer.tickets.shape == ctb.ticket_shape(3, 2) and layer.tickets.dtype == jnp.int32
    assert not np.asarray(layer.tickets).any()


def test_rejects_bad_tickets():
    q, k, v, kv_valid = make_inputs(_key("tickets"), 2, 8, 2, 64, 32, jnp.float32, "all")
    good = ctb.new_tickets(2, 2)
    assert good.shape == ctb.ticket_shape(2, 2) and good.dtype == jnp.int32 and not np.asarray(good).any()
    for bad, match in [
        (jnp.zeros((2, 5), jnp.int32), "tickets must be int32"),
        (jnp.zeros((2, 4), jnp.float32), "tickets must be int32"),
        (jnp.zeros((2, 2, 2), jnp.int32), "tickets must be int32"),
        ([[0] * 4] * 2, "tickets must be int32"),
    ]:
        with pytest.raises(ValueError, match=match):
            ctb.longflow_decode_attention_triton(q, k, v, kv_valid, scale=0.1, tickets=bad)


# ---------------------------------------------------------------- GPU: against the reference


# bf16 and fp32 over every head dim x GQA ratio ("sequence"); "kv_head" in bf16; fp16 spot checks.
# Each case compiles its own kernels (shapes are constexprs), so the cross product is kept to 20.
MATCH_CASES = (
    [(dt, d, g, "sequence") for dt in ("bfloat16", "float32") for d in (64, 128) for g in (1, 4, 8)]
    + [("bfloat16", d, g, "kv_head") for d in (64, 128) for g in (1, 4, 8)]
    + [("float16", 128, 4, "sequence"), ("float16", 64, 8, "kv_head")]
)


# The two launches of every kernel: jax-triton's custom call, or XLA's own Triton call.
LAUNCHES = {"jax_triton": dict(xla_call=False, xla_combine=False), "xla": dict(xla_call=True)}


@pytest.mark.parametrize("launch", list(LAUNCHES))
@pytest.mark.parametrize("dtype, head_dim, group, granularity", MATCH_CASES)
@gpu
def test_matches_reference(dtype, head_dim, group, granularity, launch):
    num_kv_heads, num_slots = 2, 300  # 300: not a multiple of any block size
    dtype = jnp.dtype(dtype)
    q, k, v, valid = make_inputs(
        _key(dtype, head_dim, group, granularity),
        4,
        num_kv_heads * group,
        num_kv_heads,
        num_slots,
        head_dim,
        dtype,
    )
    scale = 1.0 / math.sqrt(head_dim)
    out, evict_slot = ctb.longflow_decode_attention_triton(
        q, k, v, valid, scale=scale, granularity=granularity, overrides=LAUNCHES[launch]
    )
    assert_matches_reference(q, k, v, valid, out, evict_slot, scale=scale, granularity=granularity)


@pytest.mark.parametrize("vnorm", ["mma", "reduce"])
@pytest.mark.parametrize(
    "dtype, head_dim, group", [("bfloat16", 128, 4), ("float16", 64, 8), ("bfloat16", 64, 1)]
)
@gpu
def test_vnorm_modes_match_reference(vnorm, dtype, head_dim, group):
    """Both ways of taking ||v||_1 (tensor cores, row sum), with lg2.approx, give the reference's slot."""
    dtype = jnp.dtype(dtype)
    q, k, v, valid = make_inputs(
        _key("vnorm", vnorm, dtype, head_dim, group), 4, 2 * group, 2, 1000, head_dim, dtype
    )
    scale = 1.0 / math.sqrt(head_dim)
    for num_splits in (1, 4):
        out, evict_slot = ctb.longflow_decode_attention_triton(
            q, k, v, valid, scale=scale, vnorm=vnorm, num_splits=num_splits
        )
        assert_matches_reference(q, k, v, valid, out, evict_slot, scale=scale, granularity="sequence")


@pytest.mark.parametrize("block_c, num_splits", [(16, 1), (32, 3), (64, 16), (128, 2), (256, 1), (32, 32)])
@pytest.mark.parametrize("epilogue", ["fused", "separate", "coop"])
@gpu
def test_block_and_split_choices(block_c, num_splits, epilogue):
    q, k, v, valid = make_inputs(_key("blocks", block_c, num_splits), 4, 8, 2, 1000, 64, jnp.bfloat16)
    kw = dict(scale=0.125, block_c=block_c, num_splits=num_splits, epilogue=epilogue)
    if epilogue == "coop" and 4 * 2 * num_splits > ctb.config.num_sms():
        with pytest.raises(ValueError, match="one program per SM"):  # a grid that could deadlock
            ctb.longflow_decode_attention_triton(q, k, v, valid, **kw)
        return
    out, evict_slot = ctb.longflow_decode_attention_triton(q, k, v, valid, **kw)
    assert_matches_reference(q, k, v, valid, out, evict_slot, scale=0.125, granularity="sequence")


@pytest.mark.parametrize("epilogue", ["fused", "separate", "coop"])
@gpu
def test_large_blocks_at_head_dim_128_get_stages_that_fit(epilogue):
    # 256-slot blocks at D 128 with the default 3 stages would ask for 276 KiB of shared memory and fail
    # at launch; resolve_config gives them 2 stages, and the result is right.
    q, k, v, valid = make_inputs(_key("big blocks", epilogue), 2, 32, 8, 1000, 128, jnp.bfloat16)
    out, evict_slot = ctb.longflow_decode_attention_triton(
        q, k, v, valid, scale=0.088, block_c=256, num_splits=2, epilogue=epilogue
    )
    assert_matches_reference(q, k, v, valid, out, evict_slot, scale=0.088, granularity="sequence")


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("epilogue", ["fused", "separate", "coop"])
@gpu
def test_kv_len_bound_matches_reference(granularity, num_splits, epilogue):
    # Rows: empty, one slot, a block boundary, mid-block, the whole buffer; the valid mask is random.
    q, k, v, valid = make_inputs(_key("kvlen", granularity, num_splits), 5, 8, 2, 1000, 128, jnp.bfloat16)
    kv_len = jnp.asarray([0, 1, 256, 517, 1000], jnp.int32)
    out, evict_slot = ctb.longflow_decode_attention_triton(
        q, k, v, valid, scale=0.125, granularity=granularity, num_splits=num_splits, epilogue=epilogue,
        block_c=64, kv_len=kv_len,
    )  # fmt: skip
    bounded = bounded_mask(valid, kv_len)
    assert_matches_reference(q, k, v, bounded, out, evict_slot, scale=0.125, granularity=granularity)


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
@pytest.mark.parametrize(
    "overrides, num_splits, epilogue",
    [
        # (t is 1.3 MB here, under default_discard_t's bound: the discard is forced on where it is tested.)
        (dict(discard_t=True), 1, "separate"),
        (dict(discard_t=True), 4, "separate"),
        (None, 4, "separate"),
        (dict(discard_t=True), 1, "fused"),
        (dict(discard_t=True), 4, "fused"),
        (dict(cache_hints=False, discard_t=False), 1, "separate"),
        (dict(cache_hints=False, discard_t=False), 4, "fused"),
        (dict(discard_t=False), 4, "separate"),
        (dict(cache_hints=False), 4, "fused"),
        (dict(discard_t=True), 1, "coop"),
        (dict(discard_t=True), 3, "coop"),  # 5 x 8 x 3 = 120 programs: the most that fit one per SM (H100)
        (dict(cache_hints=False, discard_t=False), 3, "coop"),
    ],
)
@gpu
def test_t_traffic_switches_match_reference(granularity, overrides, num_splits, epilogue):
    # A partly filled buffer; C a multiple of 32, so discard_t (where on) drops t's lines.
    key = _key("switches", granularity, num_splits, epilogue, sorted((overrides or {}).items()))
    q, k, v, valid = make_inputs(key, 5, 32, 8, 2048, 128, jnp.bfloat16)
    kv_len = jnp.asarray([0, 1, 700, 2047, 2048], jnp.int32)
    out, evict_slot = ctb.longflow_decode_attention_triton(
        q, k, v, valid, scale=0.088, granularity=granularity, num_splits=num_splits, kv_len=kv_len,
        overrides=overrides, epilogue=epilogue,
    )  # fmt: skip
    bounded = bounded_mask(valid, kv_len)
    assert_matches_reference(q, k, v, bounded, out, evict_slot, scale=0.088, granularity=granularity)


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("epilogue", ["fused", "separate", "coop"])
@gpu
def test_without_eviction_returns_minus_one(granularity, num_splits, epilogue):
    q, k, v, valid = make_inputs(_key("noevict", granularity, num_splits), 3, 8, 2, 500, 128, jnp.bfloat16)
    out, evict_slot = ctb.longflow_decode_attention_triton(
        q,
        k,
        v,
        valid,
        scale=0.088,
        granularity=granularity,
        compute_evict=False,
        num_splits=num_splits,
        epilogue=epilogue,
    )
    ref_out, _ = decode_attention_probs(q, k, v, valid, 0.088)
    rel = jnp.linalg.norm(out.astype(jnp.float32) - ref_out) / jnp.linalg.norm(ref_out)
    assert rel <= OUT_RTOL["bfloat16"]
    assert evict_slot.shape == ((3,) if granularity == "sequence" else (3, 2))
    assert (np.asarray(evict_slot) == -1).all()


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
@gpu
def test_fused_and_separate_epilogues_agree(granularity):
    q, k, v, valid = make_inputs(_key("final", granularity), 4, 16, 4, 3000, 128, jnp.bfloat16, valid="all")
    kw = dict(scale=0.088, granularity=granularity, num_splits=8)
    results = [
        ctb.longflow_decode_attention_triton(q, k, v, valid, epilogue="fused", **kw),
        ctb.longflow_decode_attention_triton(q, k, v, valid, epilogue="coop", **kw),
        ctb.longflow_decode_attention_triton(
            q, k, v, valid, epilogue="separate", final_reduce="atomic", **kw
        ),
        ctb.longflow_decode_attention_triton(q, k, v, valid, epilogue="separate", final_reduce="xla", **kw),
    ]
    for out, ev in results[1:]:
        np.testing.assert_array_equal(np.asarray(ev), np.asarray(results[0][1]))
        np.testing.assert_allclose(
            np.asarray(out, np.float32), np.asarray(results[0][0], np.float32), rtol=1e-2, atol=1e-2
        )
    assert_matches_reference(q, k, v, valid, *results[0], scale=0.088, granularity=granularity)


@pytest.mark.parametrize("batch, num_slots", [(1, 8192), (16, 2048), (16, 8192), (32, 2048)])
@gpu
def test_benchmark_shapes_with_default_config_are_deterministic(batch, num_slots):
    # Qwen3-8B's attention (32 query / 8 KV heads, D 128), bf16, all slots valid: the importance argmin
    # is over real scores, not over empty slots.
    q, k, v, valid = make_inputs(
        _key("bench", batch, num_slots), batch, 32, 8, num_slots, 128, jnp.bfloat16, "all"
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


@pytest.mark.parametrize("epilogue", ["fused", "separate", "coop"])
@gpu
def test_typed_ffi_and_legacy_launches_agree(epilogue):
    # The same compiled kernels through either custom call: bit-identical results; the override lowers
    # to the typed-FFI target (jax >= 0.10.1), the default to jax-triton's legacy one.
    from cuda_triton_bridge.ffi_target import ffi_target_available

    q, k, v, valid = make_inputs(_key("ffi", epilogue), 4, 32, 8, 1500, 128, jnp.bfloat16)
    kw = dict(scale=0.088, num_splits=3, epilogue=epilogue)
    # Both through jax-triton only (at this batch the default would take XLA's Triton call).
    jax_triton = LAUNCHES["jax_triton"]
    typed = jax.jit(
        lambda *a: ctb.longflow_decode_attention_triton(*a, overrides=dict(ffi_call=True, **jax_triton), **kw)
    )
    legacy = jax.jit(lambda *a: ctb.longflow_decode_attention_triton(*a, overrides=jax_triton, **kw))
    typed_hlo = typed.lower(q, k, v, valid).as_text(dialect="hlo")
    legacy_hlo = legacy.lower(q, k, v, valid).as_text(dialect="hlo")
    assert 'custom_call_target="triton_kernel_call"' in legacy_hlo
    assert "triton_kernel_call_ffi" not in legacy_hlo
    if ffi_target_available():
        assert 'custom_call_target="triton_kernel_call_ffi"' in typed_hlo
        assert "API_VERSION_TYPED_FFI" in typed_hlo
    for a, b in zip(typed(q, k, v, valid), legacy(q, k, v, valid)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert_matches_reference(q, k, v, valid, *typed(q, k, v, valid), scale=0.088, granularity="sequence")


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize(
    "epilogue, launch",
    [("fused", "xla"), ("separate", "xla"), ("coop", "xla"), ("separate", "combine_xla")],
)
@gpu
def test_xla_launch_matches_reference(granularity, num_splits, epilogue, launch):
    # XLA compiles the same TTIR with its own Triton: the results must match the reference, with and
    # without scoring and with a kv_len bound. "xla": every kernel through XLA's Triton call;
    # "combine_xla" (the default at B * Hkv >= SMs / 2): the split kernel through jax-triton, the combine
    # kernel through XLA's call.
    q, k, v, valid = make_inputs(
        _key("xla", granularity, num_splits, epilogue), 4, 32, 8, 1500, 128, jnp.bfloat16
    )
    kv_len = jnp.asarray([1500, 700, 1, 0], jnp.int32)
    kw = dict(scale=0.088, num_splits=num_splits, epilogue=epilogue, granularity=granularity)

    overrides = dict(xla_call=launch == "xla", xla_combine=True)

    def via_xla(**extra):
        return jax.jit(
            functools.partial(ctb.longflow_decode_attention_triton, overrides=overrides, **kw, **extra)
        )

    hlo = via_xla().lower(q, k, v, valid).as_text(dialect="hlo")
    assert 'custom_call_target="__gpu$xla.gpu.triton"' in hlo
    assert ('custom_call_target="triton_kernel_call"' in hlo) is (launch == "combine_xla")
    out, evict_slot = via_xla()(q, k, v, valid)
    assert_matches_reference(q, k, v, valid, out, evict_slot, scale=0.088, granularity=granularity)
    out, evict_slot = via_xla()(q, k, v, valid, kv_len=kv_len)
    bounded = valid & (jnp.arange(valid.shape[1]) < kv_len[:, None])
    assert_matches_reference(q, k, v, bounded, out, evict_slot, scale=0.088, granularity=granularity)
    out, evict_slot = via_xla(compute_evict=False)(q, k, v, valid)
    ref_out, _ = decode_attention_probs(q, k, v, valid, 0.088)
    rel = np.linalg.norm(np.asarray(out, np.float32) - np.asarray(ref_out)) / np.linalg.norm(ref_out)
    assert rel <= OUT_RTOL["bfloat16"]
    assert (np.asarray(evict_slot) == -1).all()


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
@pytest.mark.parametrize(
    "epilogue, launch, compute_evict",
    [
        ("coop", "xla", True),
        ("coop", "xla", False),
        ("coop", "jax_triton", True),
        ("fused", "xla", True),
        ("fused", "jax_triton", True),
        ("separate", "xla", True),
    ],
)
@gpu
def test_persistent_tickets_stay_zero_across_calls(granularity, epilogue, launch, compute_evict):
    # One ticket buffer threaded through a jitted loop of calls on different queries: every call must
    # match the reference (a ticket left non-zero would hang the coop barrier or skip a finisher), and
    # the buffer must come back all zeros.
    calls, batch, slots_ = 4, 4, 1500
    q, k, v, valid = make_inputs(
        _key("tickets", granularity, epilogue, launch, compute_evict), batch, 32, 8, slots_, 128, jnp.bfloat16
    )
    qs = jax.random.normal(_key("tickets-q"), (calls,) + q.shape, jnp.float32).astype(q.dtype)
    kw = dict(
        scale=0.088, num_splits=3, epilogue=epilogue, granularity=granularity, compute_evict=compute_evict,
        overrides=LAUNCHES[launch],
    )  # fmt: skip

    @jax.jit
    def run(tickets):
        def body(tickets, q_i):
            out, evict_slot, tickets = ctb.longflow_decode_attention_triton(
                q_i, k, v, valid, tickets=tickets, **kw
            )
            return tickets, (out, evict_slot)

        return jax.lax.scan(body, tickets, qs)

    tickets, (outs, evicts) = run(ctb.new_tickets(batch, 8))
    np.testing.assert_array_equal(np.asarray(tickets), 0)
    for i in range(calls):
        if compute_evict:
            assert_matches_reference(
                qs[i], k, v, valid, outs[i], evicts[i], scale=0.088, granularity=granularity
            )
        else:
            ref_out, _ = decode_attention_probs(qs[i], k, v, valid, 0.088)
            rel = np.linalg.norm(np.asarray(outs[i], np.float32) - np.asarray(ref_out)) / np.linalg.norm(
                ref_out
            )
            assert rel <= OUT_RTOL["bfloat16"]
            assert (np.asarray(evicts[i]) == -1).all()
    # The same buffer again, outside the loop: still usable.
    out, evict_slot, tickets = jax.jit(
        lambda t: ctb.longflow_decode_attention_triton(qs[0], k, v, valid, tickets=t, **kw)
    )(tickets)
    np.testing.assert_array_equal(np.asarray(evict_slot), np.asarray(evicts[0]))
    np.testing.assert_array_equal(np.asarray(tickets), 0)


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


@pytest.mark.parametrize("launch", [*LAUNCHES, "combine_xla"])
@gpu
def test_decode_loop_under_jit_while_loop_with_donated_cache(launch):
    batch, hq, hkv, slots_, d, steps, prompt = 2, 8, 2, 256, 64, 6, 250
    dtype = jnp.float32  # exact argmin, so the two trajectories must agree step by step
    key = _key("loop")
    q, k, v, _ = make_inputs(key, batch, hq, hkv, slots_, d, dtype)
    valid = jnp.broadcast_to(jnp.arange(slots_) < prompt, (batch, slots_))
    ks = jax.random.split(jax.random.fold_in(key, 1), 3)
    q_seq = jax.random.normal(ks[0], (steps, batch, hq, d), dtype)
    k_seq = jax.random.normal(ks[1], (steps, batch, hkv, d), dtype)
    v_seq = jax.random.normal(ks[2], (steps, batch, hkv, d), dtype)
    first = jnp.full((batch,), prompt, jnp.int32)
    scale = 1 / math.sqrt(d)

    if launch == "combine_xla":  # the split kernel through jax-triton, the combine kernel through XLA
        kw = dict(overrides=dict(xla_call=False, xla_combine=True), epilogue="separate")
    else:
        kw = dict(overrides=LAUNCHES[launch])
    attention = functools.partial(ctb.longflow_decode_attention_triton, **kw)
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
