"""The Pallas fused decode kernel against the plain-jnp reference.

On CPU both kernel bodies run in Pallas interpret mode ("triton" is the GPU body, "mosaic" the TPU one),
on small shapes. Inputs are fresh normal draws per test (seeded by the test's name, never zeros).

Tolerances:
  * out: ||out - ref|| / ||ref|| <= 1e-5 for float32 inputs, <= 1e-2 for bfloat16 (the kernel feeds the
    probabilities to the P.V product in the input dtype, as flash kernels do; the output is bf16 too).
  * evict_slot: float32 -> exactly the reference argmin. bfloat16 -> the reference is computed on the
    same bf16 values upcast to f32, and the kernel's logits are f32 sums of the same exact bf16 products,
    so the importances agree to f32 summation-order rounding (~1e-6 relative). Two slots whose
    importances are that close make "the" argmin ill-posed, so for bf16 we accept the reference argmin
    or a slot whose reference importance is within 1e-5 (relative) of the minimum.
  * kv_quant (bf16 / fp16 q): against the quantized reference (which dequantizes to float32). The
    kernels dot q with the exact codes and scale the products in float32, so the same two rules hold,
    over the dequantized buffer's importances.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import bounded_mask

from pallas_kernels import longflow_decode_attention as _kernel
from pallas_kernels import quant
from pallas_kernels.reference import (
    decode_attention_probs,
    dequantized_kv,
    evict_argmin,
    evict_argmin_of_chunks,
    longflow_decode_attention_reference,
    longflow_importance,
)

ON_CPU = jax.devices()[0].platform == "cpu"
# Interpret-mode kernels are large XLA programs; on CPU a low backend optimisation level halves their
# compile time, which is most of this file's run time.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def longflow_decode_attention(*args, kv_len=None, **kwargs):
    # kv_len is traced (a runtime value, as in the decode loop); everything else is static.
    fn = functools.partial(_kernel, **kwargs)
    return jax.jit(fn, compiler_options=_FAST_COMPILE if ON_CPU else None)(*args, kv_len=kv_len)


OUT_RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 5e-3}
BF16_EVICT_RTOL = 1e-5


def _seed(request) -> int:
    return zlib.crc32(request.node.name.encode())


def make_inputs(seed, *, batch, num_q_heads, num_kv_heads, slots, head_dim, dtype, valid="all"):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, num_q_heads, head_dim))
    k = rng.standard_normal((batch, num_kv_heads, slots, head_dim))
    # Spread the value norms so the importance has a clear minimum (still never zero).
    v = rng.standard_normal((batch, num_kv_heads, slots, head_dim)) * rng.uniform(
        0.2, 2.0, (batch, num_kv_heads, slots, 1)
    )
    if valid == "all":
        kv_valid = np.ones((batch, slots), bool)
    elif valid == "random":
        kv_valid = rng.uniform(size=(batch, slots)) < 0.7
        kv_valid[:, -1] = True
    elif valid == "few":
        kv_valid = np.zeros((batch, slots), bool)
        for b in range(batch):
            kv_valid[b, rng.choice(slots, size=3, replace=False)] = True
    elif valid == "one":
        kv_valid = np.zeros((batch, slots), bool)
        kv_valid[np.arange(batch), rng.integers(0, slots, batch)] = True
    elif valid == "none":
        kv_valid = np.zeros((batch, slots), bool)
    else:
        raise ValueError(valid)
    cast = lambda x: jnp.asarray(x, jnp.float32).astype(dtype)
    return cast(q), cast(k), cast(v), jnp.asarray(kv_valid)


def reference_importance(q, k, v, kv_valid, scale, granularity):
    _, probs = decode_attention_probs(q, k, v, kv_valid, scale)
    return np.asarray(longflow_importance(probs, v, kv_valid, granularity))


def assert_matches_reference(q, k, v, kv_valid, out, evict, *, scale, granularity):
    ref_out, ref_evict = longflow_decode_attention_reference(
        q, k, v, kv_valid, scale=scale, granularity=granularity
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert evict.shape == ref_evict.shape and evict.dtype == jnp.int32
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref_out, np.float32)
    assert np.all(np.isfinite(out32))
    denom = max(np.linalg.norm(ref32), 1e-30)
    rel = np.linalg.norm(out32 - ref32) / denom
    assert rel <= OUT_RTOL[q.dtype.type], f"out rel err {rel:.2e} > {OUT_RTOL[q.dtype.type]}"
    evict, ref_evict = np.asarray(evict), np.asarray(ref_evict)
    if q.dtype == jnp.float32 or np.array_equal(evict, ref_evict):
        np.testing.assert_array_equal(evict, ref_evict)
        return
    importance = reference_importance(q, k, v, kv_valid, scale, granularity)  # [B, G, C]
    chosen = np.take_along_axis(importance, evict.reshape(importance.shape[:2])[..., None], -1)[..., 0]
    best = importance.min(axis=-1)
    np.testing.assert_allclose(chosen, best, rtol=BF16_EVICT_RTOL, atol=0)


def run_and_check(
    seed,
    *,
    batch=2,
    num_q_heads,
    num_kv_heads,
    slots,
    head_dim,
    dtype,
    valid="all",
    granularities=("sequence", "kv_head"),
    **kernel_kwargs,
):
    q, k, v, kv_valid = make_inputs(
        seed,
        batch=batch,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        slots=slots,
        head_dim=head_dim,
        dtype=dtype,
        valid=valid,
    )
    scale = head_dim**-0.5
    for granularity in granularities:
        out, evict = longflow_decode_attention(
            q, k, v, kv_valid, scale=scale, granularity=granularity, **kernel_kwargs
        )
        assert_matches_reference(q, k, v, kv_valid, out, evict, scale=scale, granularity=granularity)


# ---- the main matrix: dtype x head dim x GQA ratio, both granularities (Triton body, interpreted) ----


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_matches_reference(request, dtype, head_dim, ratio):
    # Each (dtype, ratio) pair sees both granularities across the two head dims (keeps CPU time down).
    run_and_check(
        _seed(request),
        num_q_heads=2 * ratio,
        num_kv_heads=2,
        slots=96,
        head_dim=head_dim,
        dtype=dtype,
        block_c=32,
        granularities=("sequence",) if head_dim == 64 else ("kv_head",),
    )


def test_a_cpu_default_device_on_an_accelerator_host_runs_interpreted(request, monkeypatch):
    """Inside `with jax.default_device(cpu)` on a GPU host the call runs on the CPU, so its Pallas body
    must be interpreted: the default backend alone (here made to say "gpu") would compile it for
    Triton, which the CPU refuses."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with jax.default_device(jax.devices("cpu")[0]):
        run_and_check(
            _seed(request), num_q_heads=4, num_kv_heads=2, slots=32, head_dim=64, dtype=jnp.float32,
            granularities=("sequence",),
        )  # fmt: skip


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_mosaic_body_matches_reference(request, dtype, ratio):
    run_and_check(
        _seed(request),
        num_q_heads=2 * ratio,
        num_kv_heads=2,
        slots=256,
        head_dim=128,
        dtype=dtype,
        backend="mosaic",
        block_c=128,
        granularities=("sequence",) if dtype == jnp.float32 else ("kv_head",),
    )


# ---- slot counts that are not a multiple of the block: the tail is masked ----


@pytest.mark.parametrize(
    "backend,slots,block_c", [("triton", 100, 32), ("triton", 40, 64), ("mosaic", 300, 128)]
)
def test_ragged_tail_is_masked(request, backend, slots, block_c):
    run_and_check(
        _seed(request),
        num_q_heads=8,
        num_kv_heads=2,
        slots=slots,
        head_dim=64,
        dtype=jnp.float32,
        backend=backend,
        block_c=block_c,
    )


# ---- split-K (flash-decoding) partials merged in the epilogue ----


@pytest.mark.parametrize(
    "backend,slots,block_c,num_splits",
    [("triton", 100, 16, 7), ("triton", 128, 16, 4), ("mosaic", 512, 128, 2), ("mosaic", 300, 128, 3)],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_split_k_matches_reference(request, backend, slots, block_c, num_splits, dtype):
    run_and_check(
        _seed(request),
        num_q_heads=8,
        num_kv_heads=2,
        slots=slots,
        head_dim=64,
        dtype=dtype,
        backend=backend,
        block_c=block_c,
        num_splits=num_splits,
    )


# ---- validity masks ----


@pytest.mark.parametrize("valid", ["random", "few", "one", "none"])
@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_masks_match_reference(request, valid, backend):
    block_c, num_splits = (32, 2) if backend == "triton" else (128, 1)
    run_and_check(
        _seed(request),
        batch=3,
        num_q_heads=8,
        num_kv_heads=2,
        slots=128,
        head_dim=64,
        dtype=jnp.float32,
        valid=valid,
        backend=backend,
        block_c=block_c,
        num_splits=num_splits,
    )


def test_all_but_one_invalid_returns_that_value(request):
    q, k, v, kv_valid = make_inputs(
        _seed(request),
        batch=2,
        num_q_heads=8,
        num_kv_heads=2,
        slots=64,
        head_dim=64,
        dtype=jnp.float32,
        valid="one",
    )
    out, evict = longflow_decode_attention(q, k, v, kv_valid, scale=0.125, block_c=16, num_splits=2)
    kept = np.argmax(np.asarray(kv_valid), axis=1)
    expected = np.repeat(np.asarray(v)[np.arange(2), :, kept], 4, axis=1)  # [B, Hq, D]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(evict), np.where(kept == 0, 1, 0))


def test_exact_ties_go_to_lowest_slot(request):
    q, k, v, kv_valid = make_inputs(
        _seed(request),
        batch=1,
        num_q_heads=8,
        num_kv_heads=2,
        slots=64,
        head_dim=64,
        dtype=jnp.float32,
    )
    # Slots 37 and 5 hold the same key and a tiny value: identical, smallest importance.
    k = k.at[:, :, 37].set(k[:, :, 5])
    v = v.at[:, :, 5].multiply(1e-3).at[:, :, 37].set(v[:, :, 5] * 1e-3)
    for granularity, want in (("sequence", [5]), ("kv_head", [[5, 5]])):
        _, ref_evict = longflow_decode_attention_reference(
            q, k, v, kv_valid, scale=0.125, granularity=granularity
        )
        np.testing.assert_array_equal(np.asarray(ref_evict), want)
        for num_splits in (1, 4):  # the tied slots in one split, and in different splits
            _, evict = longflow_decode_attention(
                q,
                k,
                v,
                kv_valid,
                scale=0.125,
                granularity=granularity,
                block_c=16,
                num_splits=num_splits,
            )
            np.testing.assert_array_equal(np.asarray(evict), want)


def test_exact_ties_across_epilogue_chunks_go_to_lowest_slot(request):
    """The GPU epilogue scores slots in chunks, then reduces the chunks' minima: a tie between chunks
    must still go to the lowest slot."""
    from pallas_kernels.decode_attention import _combine_chunk

    slots, tied = 1200, (1100, 700)  # chunks 2 and 1 of 512 slots
    assert _combine_chunk(8, slots) == 512 and _combine_chunk(4, slots) == 512  # 3 chunks per group
    q, k, v, kv_valid = make_inputs(
        _seed(request), batch=1, num_q_heads=8, num_kv_heads=2, slots=slots, head_dim=64, dtype=jnp.float32
    )
    k = k.at[:, :, tied[0]].set(k[:, :, tied[1]])
    v = v.at[:, :, tied[1]].multiply(1e-3).at[:, :, tied[0]].set(v[:, :, tied[1]] * 1e-3)
    for granularity, want in (("sequence", [700]), ("kv_head", [[700, 700]])):
        _, ref_evict = longflow_decode_attention_reference(
            q, k, v, kv_valid, scale=0.125, granularity=granularity
        )
        np.testing.assert_array_equal(np.asarray(ref_evict), want)
        _, evict = longflow_decode_attention(
            q, k, v, kv_valid, scale=0.125, granularity=granularity, backend="triton", num_splits=2
        )
        np.testing.assert_array_equal(np.asarray(evict), want)


def test_argmin_of_chunks_is_lexicographic():
    """(minimum, slot) pairs -> the slot of the least minimum, the lowest slot among equal minima."""

    rng = np.random.default_rng(0)
    minima = rng.integers(0, 3, (4, 3, 7)).astype(np.float32)  # many exact ties
    minima[0, 0] = -1.0  # all empty: the first chunk's slot
    slots = np.arange(7, dtype=np.int32)[None, None, :] * 16 + rng.integers(0, 16, (4, 3, 7)).astype(np.int32)
    got = np.asarray(evict_argmin_of_chunks(jnp.asarray(minima), jnp.asarray(slots)))
    want = np.take_along_axis(slots, np.argmin(minima, axis=-1)[..., None], axis=-1)[..., 0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_compute_evict_false_skips_scoring(request, backend):
    q, k, v, kv_valid = make_inputs(
        _seed(request),
        batch=2,
        num_q_heads=8,
        num_kv_heads=2,
        slots=256,
        head_dim=64,
        dtype=jnp.bfloat16,
        valid="random",
    )
    block_c = 32 if backend == "triton" else 128
    for granularity, shape in (("sequence", (2,)), ("kv_head", (2, 2))):
        out, evict = longflow_decode_attention(
            q,
            k,
            v,
            kv_valid,
            scale=0.125,
            granularity=granularity,
            compute_evict=False,
            backend=backend,
            block_c=block_c,
        )
        np.testing.assert_array_equal(np.asarray(evict), np.full(shape, -1, np.int32))
        ref_out, _ = longflow_decode_attention_reference(q, k, v, kv_valid, scale=0.125)
        rel = np.linalg.norm(np.asarray(out, np.float32) - np.asarray(ref_out, np.float32))
        assert rel / np.linalg.norm(np.asarray(ref_out, np.float32)) <= OUT_RTOL[jnp.bfloat16]


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_importance_shares_sum_to_the_evict_slot(request, backend):
    """return_importance on each half of the heads (as tensor-parallel shards run it): each share is
    the reference importance of its heads, and the argmin of their sum is the reference's evict slot
    over all heads."""
    q, k, v, kv_valid = make_inputs(
        _seed(request), batch=2, num_q_heads=8, num_kv_heads=4, slots=256, head_dim=64, dtype=jnp.float32
    )
    kv_len = jnp.array([256, 150], jnp.int32)  # row 0 evicts its least important slot, row 1 slot 150
    mask = bounded_mask(kv_valid, kv_len)
    run_kw = dict(scale=0.125, backend=backend, num_splits=2, block_c=32 if backend == "triton" else 128)
    shares = []
    for heads, kv_heads in ((slice(0, 4), slice(0, 2)), (slice(4, 8), slice(2, 4))):
        qh, kh, vh = q[:, heads], k[:, kv_heads], v[:, kv_heads]
        for granularity in ("kv_head", "sequence"):
            out, importance = longflow_decode_attention(
                qh, kh, vh, kv_valid, kv_len=kv_len, granularity=granularity, return_importance=True, **run_kw
            )
            want_out, _ = longflow_decode_attention_reference(qh, kh, vh, mask, scale=0.125)
            np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=1e-5, atol=1e-6)
            want = reference_importance(qh, kh, vh, mask, 0.125, granularity)
            np.testing.assert_allclose(np.asarray(importance), want, rtol=1e-5, atol=1e-7)
        shares.append(importance)  # the "sequence" share [B, 1, C]
    _, want_evict = longflow_decode_attention_reference(q, k, v, mask, scale=0.125)
    assert int(want_evict[1]) == 150
    summed_evict = evict_argmin(shares[0] + shares[1])[:, 0]
    np.testing.assert_array_equal(np.asarray(summed_evict), np.asarray(want_evict))


def test_runs_inside_jitted_while_loop(request):
    """A miniature decode loop: write the new token into the evict slot, attend, pick the next slot."""
    batch, heads, kv_heads, slots, dim, steps = 2, 8, 2, 64, 64, 5
    q0, k0, v0, _ = make_inputs(
        _seed(request),
        batch=batch,
        num_q_heads=heads,
        num_kv_heads=kv_heads,
        slots=slots,
        head_dim=dim,
        dtype=jnp.float32,
    )
    valid0 = jnp.arange(slots)[None, :] < jnp.array([[40], [64]])
    scale = dim**-0.5

    def loop(attend):
        def body(i, state):
            k, v, valid, slot, acc = state
            rows = jnp.arange(batch)
            k = k.at[rows, :, slot].set(jnp.roll(k0[:, :, 3], i, axis=-1))
            v = v.at[rows, :, slot].set(jnp.roll(v0[:, :, 7], i, axis=-1))
            valid = valid.at[rows, slot].set(True)
            out, slot = attend(jnp.roll(q0, i, axis=-1), k, v, valid)
            return k, v, valid, slot, acc + out

        init = (k0, v0, valid0, jnp.array([40, 0], jnp.int32), jnp.zeros_like(q0))
        return jax.jit(lambda s: jax.lax.fori_loop(0, steps, body, s))(init)

    got = loop(functools.partial(_kernel, scale=scale, block_c=16, num_splits=2))
    want = loop(functools.partial(longflow_decode_attention_reference, scale=scale))
    np.testing.assert_array_equal(np.asarray(got[3]), np.asarray(want[3]))
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))
    np.testing.assert_allclose(np.asarray(got[4]), np.asarray(want[4]), rtol=1e-5, atol=1e-5)


# ---- kv_len: only the filled prefix of each row takes part ----


# Per row: an empty row, one slot, inside a split (mid-block), a split boundary, a block boundary inside
# a split, the full buffer. Triton: C 128 in 4 splits of 2 blocks of 16 (splits wholly past the bound for
# all but the last row); Mosaic: C 512 in 2 splits of two 128-slot blocks (skipped blocks inside a live
# split, and wholly skipped splits).
KV_LEN_CASES = {
    "triton": dict(slots=128, block_c=16, num_splits=4, kv_len=[0, 1, 45, 64, 80, 128]),
    "mosaic": dict(slots=512, block_c=128, num_splits=2, kv_len=[0, 1, 130, 256, 300, 512]),
}


def _kv_len_case(request, backend, dtype, **make_kw):
    """KV_LEN_CASES[backend], its kv_len array and fresh inputs (8/2 heads, D 64) for one row per bound."""
    case = KV_LEN_CASES[backend]
    inputs = make_inputs(
        _seed(request),
        batch=len(case["kv_len"]),
        num_q_heads=8,
        num_kv_heads=2,
        slots=case["slots"],
        head_dim=64,
        dtype=dtype,
        **make_kw,
    )
    return case, jnp.asarray(case["kv_len"], jnp.int32), inputs


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_kv_len_matches_reference(request, backend, dtype):
    case, kv_len, (q, k, v, kv_valid) = _kv_len_case(request, backend, dtype)
    # Every slot is marked valid, so the bound alone decides which slots take part.
    mask = bounded_mask(kv_valid, kv_len)
    for granularity in ("sequence", "kv_head"):
        out, evict = longflow_decode_attention(
            q,
            k,
            v,
            kv_valid,
            kv_len=kv_len,
            scale=0.125,
            granularity=granularity,
            backend=backend,
            block_c=case["block_c"],
            num_splits=case["num_splits"],
        )
        assert_matches_reference(q, k, v, mask, out, evict, scale=0.125, granularity=granularity)
        _, ref_evict = longflow_decode_attention_reference(
            q, k, v, mask, scale=0.125, granularity=granularity
        )
        np.testing.assert_array_equal(np.asarray(evict), np.asarray(ref_evict))  # exact, bf16 too
        # Row 0 (kv_len 0) is empty: zero output, and slot 0 is evicted (all slots tie at -1).
        np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)
        np.testing.assert_array_equal(np.asarray(evict[0]), 0)


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_kv_len_combines_with_kv_valid(request, backend):
    case, kv_len, (q, k, v, kv_valid) = _kv_len_case(request, backend, jnp.float32, valid="random")
    run_kw = dict(backend=backend, block_c=case["block_c"], num_splits=case["num_splits"])
    out, evict = longflow_decode_attention(
        q, k, v, kv_valid, kv_len=kv_len, scale=0.125, granularity="kv_head", **run_kw
    )
    mask = bounded_mask(kv_valid, kv_len)
    assert_matches_reference(q, k, v, mask, out, evict, scale=0.125, granularity="kv_head")


def test_kv_len_is_clamped_to_the_buffer(request):
    q, k, v, kv_valid = make_inputs(
        _seed(request), batch=2, num_q_heads=4, num_kv_heads=2, slots=64, head_dim=64, dtype=jnp.float32
    )
    got = longflow_decode_attention(
        q, k, v, kv_valid, kv_len=jnp.array([-5, 1000], jnp.int32), scale=0.125, block_c=16, num_splits=2
    )
    want = longflow_decode_attention_reference(
        q, k, v, bounded_mask(kv_valid, jnp.array([0, 64])), scale=0.125
    )
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


# Garbage from kv_len on. The GPU body masks its K/V loads at kv_len itself; the TPU body skips whole
# blocks from the first one that starts at or past kv_len (its pipeline copies none of them) and masks
# the slots past the bound inside the last live block (logits, and value rows zeroed: NaN there reached
# the output before). Mosaic: blocks skipped inside a live split, wholly skipped splits, and a bound
# inside a block (130, 300).
NAN_PAST_BOUND = {
    "triton": dict(slots=128, block_c=16, num_splits=4, kv_len=[0, 1, 45, 80]),
    "mosaic": dict(slots=512, block_c=128, num_splits=2, kv_len=[0, 1, 130, 256, 300]),
}


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_bodies_read_nothing_past_kv_len(request, backend):
    """NaN keys and values past the bound (a partly filled buffer's garbage) never reach the result. If
    a body used them it would show: 0 * NaN is NaN in the P @ V product."""
    case = NAN_PAST_BOUND[backend]
    slots, block_c, kv_len = case["slots"], case["block_c"], jnp.asarray(case["kv_len"], jnp.int32)
    q, k, v, kv_valid = make_inputs(
        _seed(request), batch=len(kv_len), num_q_heads=8, num_kv_heads=2, slots=slots, head_dim=64,
        dtype=jnp.float32,
    )  # fmt: skip
    garbage = (jnp.arange(slots)[None, :] >= kv_len[:, None])[:, None, :, None]
    out, evict = longflow_decode_attention(
        q,
        jnp.where(garbage, jnp.nan, k),
        jnp.where(garbage, jnp.nan, v),
        kv_valid,
        kv_len=kv_len,
        scale=0.125,
        backend=backend,
        block_c=block_c,
        num_splits=case["num_splits"],
    )
    mask = bounded_mask(kv_valid, kv_len)
    assert_matches_reference(q, k, v, mask, out, evict, scale=0.125, granularity="sequence")


def test_triton_body_stops_at_kv_len(request):
    """The GPU body's slot loop visits only the blocks that start below kv_len.

    Read through the (private) side output t = logit + log ||v||_1: a visited block stores t for every
    slot (-inf past the bound, where the V rows load as zeros), a block the loop skips is never stored
    to, so it keeps the output buffer's initial contents (NaN in interpret mode; anything but -inf is
    enough here).
    """
    from pallas_kernels.decode_attention import MASK_VALUE, _triton_call

    block_c, num_splits, kv_len = 16, 4, [0, 1, 45, 80, 128]
    q, k, v, kv_valid = make_inputs(
        _seed(request), batch=5, num_q_heads=8, num_kv_heads=2, slots=128, head_dim=64, dtype=jnp.float32
    )
    call = functools.partial(
        _triton_call,
        scale=0.125,
        block_c=block_c,
        num_splits=num_splits,
        compute_evict=True,
        interpret=True,
        num_warps=4,
        num_stages=3,
    )
    _, _, t = jax.jit(call)(q, k, v, kv_valid, jnp.asarray(kv_len, jnp.int32))
    t = np.asarray(t)  # [B, Hq, C]
    for b, n in enumerate(kv_len):
        visited_end = -(-n // block_c) * block_c
        assert np.all(np.isfinite(t[b, :, :n])) and np.all(t[b, :, :n] > MASK_VALUE / 2)
        assert np.all(np.isneginf(t[b, :, n:visited_end]))
        assert not np.any(np.isneginf(t[b, :, visited_end:])), f"row {b}: a block past {n} was read"


@pytest.mark.parametrize(
    "slots,head_dim,dtype,want",
    [
        (2048, 128, jnp.bfloat16, 128),  # the benchmark shape: 32 KiB K and V tiles
        (2048, 128, jnp.float32, 64),  # a 128-slot f32 tile would be 64 KiB
        (2048, 256, jnp.bfloat16, 64),
        (2048, 64, jnp.bfloat16, 128),  # capped at TRITON_BLOCK_C
        (100, 128, jnp.bfloat16, 128),  # a ragged C keeps the full block (the tail is masked)
        (8, 64, jnp.float32, 16),  # tl.dot's minimum
    ],
)
def test_default_gpu_block_keeps_tiles_in_shared_memory(slots, head_dim, dtype, want):
    from pallas_kernels.decode_attention import TRITON_TILE_BYTES, _default_block_c

    block_c = _default_block_c("triton", slots, head_dim, jnp.dtype(dtype).itemsize)
    assert block_c == want
    assert block_c == 16 or block_c * head_dim * jnp.dtype(dtype).itemsize <= TRITON_TILE_BYTES


# ---- errors ----


def _small(dtype=jnp.float32, slots=64):
    return make_inputs(0, batch=1, num_q_heads=4, num_kv_heads=2, slots=slots, head_dim=64, dtype=dtype)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_c=24), "block_c=24"),
        (dict(block_c=8), "block_c=8"),
        (dict(backend="mosaic", block_c=100), "block_c=100"),
        (dict(block_c=16, num_splits=3), "num_splits=3"),
        (dict(granularity="token"), "granularity"),
        (dict(backend="cuda_graph"), "backend"),
        (dict(scale=float("nan")), "scale"),
        (dict(compute_evict=False, return_importance=True), "needs compute_evict=True"),
        (dict(return_lse="yes"), "return_lse must be a Python bool, got 'yes'"),
        (dict(compute_evict=1), "compute_evict must be a Python bool"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    q, k, v, kv_valid = _small()
    kwargs = {"scale": 0.125, **kwargs}
    with pytest.raises(ValueError, match=match):
        longflow_decode_attention(q, k, v, kv_valid, **kwargs)


def test_bad_shapes_raise_value_error():
    q, k, v, kv_valid = _small()
    with pytest.raises(ValueError, match="kv_valid"):
        longflow_decode_attention(q, k, v, kv_valid.astype(jnp.int32), scale=0.125)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        longflow_decode_attention(q[:, :3], k, v, kv_valid, scale=0.125)
    with pytest.raises(ValueError, match="share a dtype"):
        longflow_decode_attention(q.astype(jnp.bfloat16), k, v, kv_valid, scale=0.125)


@pytest.mark.parametrize(
    "kv_len",
    [
        jnp.array([3.0], jnp.float32),
        jnp.array([3, 4], jnp.int32),
        jnp.array([[3]], jnp.int32),
        jnp.array(3, jnp.int32),
        jnp.array([True]),
        [3],
    ],
    ids=["float", "too_long", "2d", "scalar", "bool", "list"],
)
@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_bad_kv_len_raises_value_error(kv_len, backend):
    q, k, v, kv_valid = _small()  # B = 1
    with pytest.raises(ValueError, match="kv_len must be an integer array of shape"):
        longflow_decode_attention(q, k, v, kv_valid, kv_len=kv_len, scale=0.125, backend=backend)


# ---- kv_quant: the bodies read the quantized payloads and dequantize in registers ----

# A scale group per kind that exercises each slicing: several groups a plane (int8, int4), one group for
# the whole head (fp8), one group spanning several planes (int2: 16-column planes, 32-element groups).
QUANT_GROUP = {"int8": 16, "fp8": 64, "int4": 16, "int2": 32}
# Per body: C, block and splits with a ragged tail and split-K.
QUANT_CASES = {
    "triton": dict(slots=100, block_c=32, num_splits=2),
    "mosaic": dict(slots=300, block_c=128, num_splits=3),
}


def quantized_inputs(seed, kind, dtype, **shape):
    """make_inputs' draws with K and V quantized by quant.quantize: (q, k payload, v payload, kv_valid,
    KVScales), q in `dtype`."""
    q, k, v, kv_valid = make_inputs(seed, dtype=jnp.float32, **shape)
    group = QUANT_GROUP[kind]
    k_pay, v_pay, scales = quant.quantize_kv(k, v, kind, group)
    return q.astype(dtype), k_pay, v_pay, kv_valid, scales


def assert_matches_quantized_reference(q, k, v, kv_valid, scales, kind, out, evict, *, scale, granularity):
    """out within OUT_RTOL of the quantized reference; the evict slot (unless None) its argmin, or at a
    near-tie one whose importance over the dequantized buffer is within BF16_EVICT_RTOL of the minimum."""
    ref_out, ref_evict = longflow_decode_attention_reference(
        q, k, v, kv_valid, scale=scale, granularity=granularity, kv_quant=kind, kv_scales=scales
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref_out, np.float32)
    rel = np.linalg.norm(out32 - ref32) / np.linalg.norm(ref32)
    assert rel <= OUT_RTOL[q.dtype.type], f"out rel err {rel:.2e} > {OUT_RTOL[q.dtype.type]}"
    if evict is None:
        return
    evict, ref_evict = np.asarray(evict), np.asarray(ref_evict)
    assert evict.shape == ref_evict.shape and evict.dtype == np.int32
    if np.array_equal(evict, ref_evict):
        return
    importance = reference_importance(q, *dequantized_kv(k, v, kind, scales), kv_valid, scale, granularity)
    chosen = np.take_along_axis(importance, evict.reshape(importance.shape[:2])[..., None], -1)[..., 0]
    np.testing.assert_allclose(chosen, importance.min(axis=-1), rtol=BF16_EVICT_RTOL, atol=0)


@pytest.mark.parametrize("kind", quant.KV_QUANT_KINDS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_quantized_buffer_matches_reference(request, kind, dtype):
    # Both bodies; each kind sees both granularities across the two q dtypes.
    granularity = "kv_head" if dtype == jnp.bfloat16 else "sequence"
    for backend, case in QUANT_CASES.items():
        q, k, v, kv_valid, scales = quantized_inputs(
            _seed(request),
            kind,
            dtype,
            batch=2,
            num_q_heads=8,
            num_kv_heads=2,
            slots=case["slots"],
            head_dim=64,
        )
        out, evict = longflow_decode_attention(
            q, k, v, kv_valid, scale=0.125, kv_quant=kind, kv_scales=scales, granularity=granularity,
            backend=backend, block_c=case["block_c"], num_splits=case["num_splits"],
        )  # fmt: skip
        assert_matches_quantized_reference(
            q, k, v, kv_valid, scales, kind, out, evict, scale=0.125, granularity=granularity
        )


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_quantized_buffer_with_kv_len(request, backend):
    """kv_len bounds a quantized buffer as a float one (here with a GQA group of 8), NaN scales where a
    body may find garbage (NAN_PAST_BOUND) never reach the result, and compute_evict=False still attends."""
    case = NAN_PAST_BOUND[backend]
    kv_len = jnp.asarray(case["kv_len"], jnp.int32)
    q, k, v, kv_valid, scales = quantized_inputs(
        _seed(request), "int4", jnp.bfloat16, batch=len(kv_len), num_q_heads=16, num_kv_heads=2,
        slots=case["slots"], head_dim=64,
    )  # fmt: skip
    garbage = (jnp.arange(case["slots"])[None, :] >= kv_len[:, None])[:, None, :, None]
    nan_scales = quant.KVScales(*(jnp.where(garbage, jnp.nan, x) for x in scales))
    run = dict(kv_len=kv_len, scale=0.125, kv_quant="int4", kv_scales=nan_scales, backend=backend,
               block_c=case["block_c"], num_splits=case["num_splits"])  # fmt: skip
    mask = bounded_mask(kv_valid, kv_len)
    out, evict = longflow_decode_attention(q, k, v, kv_valid, granularity="kv_head", **run)
    assert_matches_quantized_reference(
        q, k, v, mask, scales, "int4", out, evict, scale=0.125, granularity="kv_head"
    )
    out_only, no_evict = longflow_decode_attention(q, k, v, kv_valid, compute_evict=False, **run)
    np.testing.assert_array_equal(np.asarray(no_evict), -1)
    assert_matches_quantized_reference(
        q, k, v, mask, scales, "int4", out_only, None, scale=0.125, granularity="kv_head"
    )


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_quantized_near_ties_resolve_in_float32(request, backend):
    """Twin slots whose dequantized values differ by a factor 1 -+ 2^-10, which float32 resolves and bf16
    rounding erases (their payload values are bf16-exact). KV head 0: values only (5 and 37); KV head 1:
    keys only (9 and 20, the factor's sign chosen so the later slot scores lower). The reference evicts
    the later twin; a kernel that rounded the dequantized K or V to bf16 would see a tie and evict the
    earlier one."""
    q, k, v, kv_valid, scales = quantized_inputs(
        _seed(request), "int4", jnp.bfloat16, batch=1, num_q_heads=8, num_kv_heads=2, slots=64, head_dim=64
    )
    k_scale, k_zero, v_scale, v_zero, _ = scales
    tiny = (2.0**-13, -(2.0**-10))  # small values: the twins are each head's least important slots
    for head, (first, later) in enumerate([(5, 37), (9, 20)]):
        k, v = (x.at[:, head, later].set(x[:, head, first]) for x in (k, v))
        k_scale, k_zero = (
            k_scale.at[:, head, (first, later)].set(0.125),
            k_zero.at[:, head, (first, later)].set(-1.0),
        )
        v_scale, v_zero = (
            v_scale.at[:, head, (first, later)].set(tiny[0]),
            v_zero.at[:, head, (first, later)].set(tiny[1]),
        )
    v_scale, v_zero = v_scale.at[:, 0, 37].multiply(1 - 2.0**-10), v_zero.at[:, 0, 37].multiply(1 - 2.0**-10)
    for factor in (1 + 2.0**-10, 1 - 2.0**-10):
        twins = quant.KVScales(
            k_scale.at[:, 1, 20].multiply(factor),
            k_zero.at[:, 1, 20].multiply(factor),
            v_scale,
            v_zero,
            quant.value_norms(v, v_scale, v_zero, "int4", QUANT_GROUP["int4"]),
        )
        _, ref_evict = longflow_decode_attention_reference(
            q, k, v, kv_valid, scale=0.125, granularity="kv_head", kv_quant="int4", kv_scales=twins
        )
        if ref_evict[0, 1] == 20:
            break
    np.testing.assert_array_equal(np.asarray(ref_evict), [[37, 20]])
    importance = reference_importance(q, *dequantized_kv(k, v, "int4", twins), kv_valid, 0.125, "kv_head")
    gaps = importance[0, [0, 1], [5, 9]] / importance[0, [0, 1], [37, 20]] - 1
    assert np.all(gaps > 10 * BF16_EVICT_RTOL), gaps  # not a near-tie: the kernel must match exactly
    _, evict = longflow_decode_attention(
        q, k, v, kv_valid, scale=0.125, kv_quant="int4", kv_scales=twins, granularity="kv_head",
        backend=backend, block_c=32 if backend == "triton" else 64,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(evict), [[37, 20]])


def test_bad_quantized_inputs_raise_value_error():
    q, k, v, kv_valid, scales = quantized_inputs(
        0, "int4", jnp.bfloat16, batch=1, num_q_heads=4, num_kv_heads=2, slots=32, head_dim=64
    )
    # 8-element groups: the Triton body's slices would be narrower than tl.dot's 16 columns.
    narrow = quant.KVScales(*(jnp.zeros((1, 2, 32, 8), jnp.float32) for _ in range(4)), scales.v_norm)
    cases = [
        (dict(kv_quant="int4"), "needs kv_scales=KVScales"),
        (dict(kv_quant="int4", kv_scales=scales._replace(k_zero=None)), "kv_scales.k_zero must be given"),
        (
            dict(kv_quant="int8", kv_scales=scales),
            r"k \(1, 2, 32, 32\) and v .* must both be \[B=1, Hkv, C, 64\]",
        ),
        (dict(kv_quant="int4", kv_scales=narrow), "power of two >= 16"),
        (
            dict(kv_quant="int4", kv_scales=scales._replace(v_scale=scales.v_scale[:, :, :16])),
            r"kv_scales.v_scale must be float32 \[1, 2, 32, 4\]",
        ),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            longflow_decode_attention(q, k, v, kv_valid, scale=0.125, backend="triton", **kwargs)
    with pytest.raises(ValueError, match="needs uint8 payloads"):
        longflow_decode_attention(
            q, k.astype(jnp.int8), v, kv_valid, scale=0.125, kv_quant="int4", kv_scales=scales
        )
    floats = jnp.zeros((1, 2, 32, 64), q.dtype)
    with pytest.raises(ValueError, match="kv_scales given without kv_quant"):
        longflow_decode_attention(q, floats, floats, kv_valid, scale=0.125, kv_scales=scales)


# ---- the log-sum-exp output (return_lse) ----


def numpy_lse(q, k, kv_valid, kv_len, scale):
    """log sum over the slots that take part of exp(scale * q . k) in float64 numpy: [B, Hq], -inf for a
    row with none. k [B, Hkv, C, D] as the kernel reads it (dequantized)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    keys = np.repeat(k, q.shape[1] // k.shape[1], axis=1)  # query head h reads KV head h // group
    logits = np.einsum("bhd,bhcd->bhc", q, keys) * scale
    takes_part = np.asarray(kv_valid) & (np.arange(k.shape[2])[None, :] < np.asarray(kv_len)[:, None])
    lse = np.full(q.shape[:2], -np.inf)
    for b in np.flatnonzero(takes_part.any(axis=1)):
        row = logits[b][:, takes_part[b]]
        peak = row.max(axis=1)
        lse[b] = peak + np.log(np.exp(row - peak[:, None]).sum(axis=1))
    return lse


@pytest.mark.parametrize(
    "backend, kind, num_splits, compute_evict",
    [
        ("triton", None, 1, False),
        ("triton", "int4", 2, True),
        ("mosaic", None, 2, True),
        ("mosaic", "int4", 1, False),
    ],
)  # fmt: skip
def test_lse_matches_numpy(request, backend, kind, num_splits, compute_evict):
    """bf16 q: the kernel's and the reference's lse against numpy, on a row with every slot valid, a row
    with none (lse -inf, out 0) and a row with kv_len < C; the out beside it is the reference's."""
    slots, block_c = 200, 64 if backend == "triton" else 128
    shape = dict(batch=3, num_q_heads=8, num_kv_heads=2, slots=slots, head_dim=64)
    if kind is None:
        q, k, v, kv_valid = make_inputs(_seed(request), dtype=jnp.bfloat16, **shape)
        quantized, keys = {}, k
    else:
        q, k, v, kv_valid, scales = quantized_inputs(_seed(request), kind, jnp.bfloat16, **shape)
        quantized, keys = dict(kv_quant=kind, kv_scales=scales), dequantized_kv(k, v, kind, scales)[0]
    kv_valid = kv_valid.at[1].set(False)
    kv_len = jnp.asarray([slots, slots, 77], jnp.int32)
    out, _, lse = longflow_decode_attention(
        q, k, v, kv_valid, kv_len=kv_len, scale=0.125, compute_evict=compute_evict, return_lse=True,
        backend=backend, block_c=block_c, num_splits=num_splits, **quantized,
    )  # fmt: skip
    want = numpy_lse(q.astype(jnp.float32), keys, kv_valid, kv_len, 0.125)
    assert lse.shape == q.shape[:2] and lse.dtype == jnp.float32
    assert np.isneginf(want[1]).all() and np.isfinite(want[[0, 2]]).all()
    np.testing.assert_allclose(np.asarray(lse), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out[1], np.float32), 0.0)
    mask = bounded_mask(kv_valid, kv_len)
    ref_out, _, ref_lse = longflow_decode_attention_reference(
        q, k, v, mask, scale=0.125, return_lse=True, **quantized
    )
    np.testing.assert_allclose(np.asarray(ref_lse), want, rtol=1e-5, atol=1e-5)
    out32, ref32 = (np.asarray(x, np.float32)[[0, 2]] for x in (out, ref_out))
    assert np.linalg.norm(out32 - ref32) / np.linalg.norm(ref32) <= OUT_RTOL[jnp.bfloat16]


def test_lse_comes_after_the_importance(request):
    """return_importance and return_lse together: (out, importance, lse), each as when asked alone."""
    q, k, v, kv_valid = make_inputs(_seed(request), batch=2, num_q_heads=4, num_kv_heads=2, slots=64,
                                    head_dim=32, dtype=jnp.float32)  # fmt: skip
    run = dict(scale=0.2, backend="triton", block_c=32, num_splits=1)
    out, importance, lse = longflow_decode_attention(
        q, k, v, kv_valid, return_importance=True, return_lse=True, **run
    )
    alone = longflow_decode_attention(q, k, v, kv_valid, return_importance=True, **run)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(alone[0]))
    np.testing.assert_array_equal(np.asarray(importance), np.asarray(alone[1]))
    np.testing.assert_allclose(np.asarray(lse), numpy_lse(q, k, kv_valid, [64, 64], 0.2), rtol=1e-5)


# ---- lowering for the real targets at Qwen3-8B-like shapes (no accelerator needed) ----

QWEN3_8B = dict(batch=8, num_q_heads=32, num_kv_heads=8, slots=2048, head_dim=128)


def _abstract_inputs(batch, num_q_heads, num_kv_heads, slots, head_dim, dtype=jnp.bfloat16):
    sds = jax.ShapeDtypeStruct
    return (
        sds((batch, num_q_heads, head_dim), dtype),
        sds((batch, num_kv_heads, slots, head_dim), dtype),
        sds((batch, num_kv_heads, slots, head_dim), dtype),
        sds((batch, slots), jnp.bool_),
    )


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
@pytest.mark.parametrize("compute_evict", [True, False], ids=["evict", "no_evict"])
def test_lowers_for_tpu(granularity, compute_evict):
    fn = functools.partial(
        _kernel,
        scale=128**-0.5,
        granularity=granularity,
        compute_evict=compute_evict,
        backend="mosaic",
        interpret=False,
    )
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*_abstract_inputs(**QWEN3_8B))
    assert "tpu_custom_call" in exported.mlir_module()


def test_lse_lowers_for_tpu():
    fn = functools.partial(
        _kernel, scale=128**-0.5, compute_evict=False, return_lse=True, backend="mosaic", interpret=False
    )
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*_abstract_inputs(**QWEN3_8B))
    assert "tpu_custom_call" in exported.mlir_module()
    assert [o.shape for o in exported.out_avals][-1] == (QWEN3_8B["batch"], QWEN3_8B["num_q_heads"])


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_lowers_for_gpu(granularity, num_splits):
    fn = functools.partial(
        _kernel,
        scale=128**-0.5,
        granularity=granularity,
        num_splits=num_splits,
        backend="triton",
        interpret=False,
    )
    # Pallas-Triton kernels are a custom call without export compatibility guarantees; we only check
    # that the kernel lowers to Triton IR (shapes, dtypes, masks), not that the artifact is portable.
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(
        *_abstract_inputs(**QWEN3_8B)
    )
    assert "xla.gpu.triton" in exported.mlir_module()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers_with_kv_len(platform):
    backend = "triton" if platform == "cuda" else "mosaic"

    def fn(q, k, v, kv_valid, kv_len):
        return _kernel(q, k, v, kv_valid, kv_len=kv_len, scale=128**-0.5, backend=backend, interpret=False)

    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    args = (*_abstract_inputs(**QWEN3_8B), jax.ShapeDtypeStruct((QWEN3_8B["batch"],), jnp.int32))
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
    assert ("xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in exported.mlir_module()


@pytest.mark.parametrize("kind", quant.KV_QUANT_KINDS)
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_quantized_buffer_lowers(platform, kind):
    """Both bodies lower reading a quantized buffer (payloads, scales, kv_len), and no cache-shaped float
    array is computed around the kernel: the buffer is never dequantized into a copy."""
    batch, num_kv_heads, slots, head_dim = (
        QWEN3_8B[key] for key in ("batch", "num_kv_heads", "slots", "head_dim")
    )
    sds = jax.ShapeDtypeStruct
    payload = sds(
        (batch, num_kv_heads, slots, head_dim // quant.codes_per_byte(kind)), quant.payload_dtype(kind)
    )
    scale = sds((batch, num_kv_heads, slots, head_dim // 32), jnp.float32)
    zero = scale if quant.has_zero_point(kind) else None
    backend = "triton" if platform == "cuda" else "mosaic"

    def fn(q, k, v, kv_valid, kv_scales, kv_len):
        return _kernel(
            q, k, v, kv_valid, kv_len=kv_len, scale=head_dim**-0.5, kv_quant=kind, kv_scales=kv_scales,
            backend=backend, interpret=False,
        )  # fmt: skip

    q, _, _, kv_valid = _abstract_inputs(**QWEN3_8B)
    norm = sds((batch, num_kv_heads, slots, 1), jnp.float32)
    args = (
        q,
        payload,
        payload,
        kv_valid,
        quant.KVScales(scale, zero, scale, zero, norm),
        sds((batch,), jnp.int32),
    )
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    text = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args).mlir_module()
    assert ("xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in text
    cache_shaped = f"tensor<{batch}x{num_kv_heads}x{slots}x{head_dim}x"
    assert not any(f"{cache_shaped}{t}>" in text for t in ("bf16", "f16", "f32")), "a dequantized copy"


# ---- on a GPU: compiled, at realistic shapes ----

on_gpu = pytest.mark.skipif(
    jax.devices()[0].platform != "gpu", reason="needs a CUDA GPU (Pallas Triton backend)"
)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("slots,num_splits", [(2048, None), (2000, None), (4096, 8)])
@pytest.mark.parametrize("valid", ["all", "random"])
def test_gpu_matches_reference(request, dtype, slots, num_splits, valid):
    run_and_check(
        _seed(request),
        batch=4,
        num_q_heads=32,
        num_kv_heads=8,
        slots=slots,
        head_dim=128,
        dtype=dtype,
        valid=valid,
        num_splits=num_splits,
    )


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("ratio,head_dim", [(1, 64), (8, 128), (16, 64)])
def test_gpu_gqa_ratios(request, ratio, head_dim):
    run_and_check(
        _seed(request),
        batch=2,
        num_q_heads=4 * ratio,
        num_kv_heads=4,
        slots=1000,
        head_dim=head_dim,
        dtype=jnp.bfloat16,
    )


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("slots", [2048, 2000])
def test_gpu_kv_len_matches_reference(request, dtype, slots):
    # Default block and splits (8 splits at this shape on an H100): whole splits lie past most bounds.
    kv_len = jnp.array([0, 1, 700, 1024, slots - 1, slots], jnp.int32)
    q, k, v, kv_valid = make_inputs(
        _seed(request),
        batch=6,
        num_q_heads=32,
        num_kv_heads=8,
        slots=slots,
        head_dim=128,
        dtype=dtype,
        valid="random",
    )
    mask = bounded_mask(kv_valid, kv_len)
    for granularity in ("sequence", "kv_head"):
        out, evict = longflow_decode_attention(
            q, k, v, kv_valid, kv_len=kv_len, scale=128**-0.5, granularity=granularity
        )
        assert_matches_reference(q, k, v, mask, out, evict, scale=128**-0.5, granularity=granularity)


def test_triton_body_compiles_for_sm90_without_spills(tmp_path, monkeypatch):
    """Compile the GPU kernel with the triton package (no GPU needed); skipped where triton is absent."""
    pytest.importorskip("triton")
    # Triton needs a writable cache, which the default location is not on every machine.
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    from offline_compile import compile_report, triton_ir

    report = compile_report(triton_ir(**QWEN3_8B, num_splits=4))
    assert report["local_bytes"] == 0 and report["stack_bytes"] == 0, report
    assert report["shared_bytes"] <= 227 * 1024, report
    ops = report["sass_ops"]
    assert any(op.startswith("HMMA") for op in ops), ops  # bf16 tensor-core dots
    assert any(op.startswith("LDGSTS") and op.endswith(".128") for op in ops), ops  # 16 B async copies


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
def test_triton_epilogue_kernel_compiles_for_sm90_without_spills(tmp_path, monkeypatch, granularity):
    """The GPU epilogue (split merge + chunk scoring) at the benchmark's largest tile: no spills."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    from offline_compile import compile_report, triton_ir

    from pallas_kernels.decode_attention import COMBINE_NUM_WARPS

    ir_text = triton_ir(**QWEN3_8B, num_splits=4, granularity=granularity, kernel="combine")
    report = compile_report(ir_text, num_warps=COMBINE_NUM_WARPS, num_stages=1)
    assert report["local_bytes"] == 0 and report["stack_bytes"] == 0, report


def test_triton_body_with_kv_len_compiles_for_sm90_without_spills(tmp_path, monkeypatch):
    """The bounded loop (a runtime trip count) keeps the unbounded kernel's properties."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    from offline_compile import compile_report, triton_ir

    kv_len = jnp.full((QWEN3_8B["batch"],), 1000, jnp.int32)  # a kernel input; its value is not compiled in
    ir_text = triton_ir(**QWEN3_8B, num_splits=4, kv_len=kv_len)
    assert "scf.for" in ir_text and "scf.while" not in ir_text  # the fori_loop kept its for-loop form
    report = compile_report(ir_text)
    assert report["local_bytes"] == 0 and report["stack_bytes"] == 0, report
    assert report["shared_bytes"] <= 227 * 1024, report
    ops = report["sass_ops"]
    assert any(op.startswith("HMMA") for op in ops), ops
    assert any(op.startswith("LDGSTS") and op.endswith(".128") for op in ops), ops
