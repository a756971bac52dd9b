"""Quantized slot buffer (kv_quant): the quantizer and the rotation against numpy, the buffer's writes,
generation on the reference path, its fidelity against the full cache, and the memory planner."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import scipy.linalg
from helpers import generate_module, make_prompts

import longflow_jax as lf
from longflow_jax.attention import check_attention_impl
from longflow_jax.kv_cache import dequantized_kv, layer_from_kept, write_token
from pallas_kernels import quant

KINDS = ("int8", "fp8", "int4", "int2")
CONFIG = lf.ModelConfig(
    model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
    qk_norm=True,
)  # fmt: skip
GROUP = 16


@pytest.fixture(scope="module")
def params():
    """Random weights (std 0.2, norms near 1) drawn with numpy: no per-shape compiles."""
    rng = np.random.default_rng(0)
    draw = lambda sd: jnp.asarray(0.2 * rng.standard_normal(sd.shape) + (len(sd.shape) == 1), jnp.float32)
    return jax.tree_util.tree_map(draw, lf.param_shapes(CONFIG))


def numpy_quantize(x, kind, group):
    """The quantizer of pallas_kernels/quant.py's docstring, one group at a time in float32 numpy."""
    x = np.asarray(x, np.float32)
    head_dim = x.shape[-1]
    rows = x.reshape(-1, head_dim)
    bits = {"int4": 4, "int2": 2}.get(kind, 8)
    per_byte = 8 // bits
    codes = np.zeros(rows.shape, np.float32)
    scales = np.zeros((rows.shape[0], head_dim // group), np.float32)
    zeros = np.zeros_like(scales)
    for r, row in enumerate(rows):
        for g in range(head_dim // group):
            seg = row[g * group : (g + 1) * group]
            if kind in ("int8", "fp8"):
                limit = np.float32(127.0 if kind == "int8" else 448.0)
                s = np.abs(seg).max() * np.float32(1.0 / limit)
                y = np.clip(seg / s if s > 0 else seg, -limit, limit)
                y = np.round(y) if kind == "int8" else y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
                z = np.float32(0)
            else:
                levels = np.float32(2**bits - 1)
                z = seg.min()
                s = (seg.max() - z) * np.float32(1.0 / levels)
                y = np.clip(np.round((seg - z) / s if s > 0 else seg - z), 0, levels)
            codes[r, g * group : (g + 1) * group], scales[r, g], zeros[r, g] = y, s, z
    if kind == "int8":
        payload = codes.astype(np.int8)
    elif kind == "fp8":
        payload = codes.astype(ml_dtypes.float8_e4m3fn)
    else:
        plane = head_dim // per_byte
        payload = np.zeros((rows.shape[0], plane), np.uint8)
        for e in range(head_dim):  # element e sits in byte e % plane, bits (e // plane) * bits onwards
            payload[:, e % plane] |= codes[:, e].astype(np.uint8) << np.uint8(bits * (e // plane))
    lead = x.shape[:-1]
    return payload.reshape(*lead, -1), scales.reshape(*lead, -1), zeros.reshape(*lead, -1)


def numpy_dequantize(payload, scale, zero, kind, group):
    """numpy_quantize's payload back to float32 [..., D]: codes (unpacked by plane) * scale + zero."""
    payload = np.asarray(payload)
    if kind in ("int4", "int2"):
        bits = int(kind[3])
        codes = np.stack([(payload >> np.uint8(bits * i)) & ((1 << bits) - 1) for i in range(8 // bits)], -2)
        payload = codes.reshape(*payload.shape[:-1], -1)
    scale, zero = np.asarray(scale), np.asarray(zero) if zero is not None else 0.0
    grouped = payload.astype(np.float32).reshape(*scale.shape, group) * scale[..., None]
    return (grouped + (zero[..., None] if np.ndim(zero) else zero)).reshape(*payload.shape[:-1], -1)


def _heads(seed=0, shape=(2, 3, 5, 64)):
    """Random rows with a few outlier channels, an all-zero row (an empty slot) and a constant row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., [3, 40]] *= 20.0
    x[0, 0, 0] = 0.0
    x[0, 0, 1] = 1.5
    return x


@pytest.mark.parametrize("group", [16, 64])
@pytest.mark.parametrize("kind", KINDS)
def test_quantize_matches_numpy_and_dequantizes_within_half_a_step(kind, group):
    x = _heads()
    payload, scale, zero = quant.quantize(jnp.asarray(x), kind, group)
    want_payload, want_scale, want_zero = numpy_quantize(x, kind, group)
    assert payload.dtype == want_payload.dtype and scale.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(payload).view(np.uint8), want_payload.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(scale), want_scale)
    if kind in ("int4", "int2"):
        np.testing.assert_array_equal(np.asarray(zero), want_zero)
    else:
        assert zero is None
    back = np.asarray(quant.dequantize(payload, scale, zero, kind, group))
    step = np.repeat(want_scale, group, axis=-1)  # [.., D]: each element's group scale
    if kind == "fp8":  # e4m3: half an ulp is 2^-4 of the value, or 2^-10 (subnormals), times the scale
        half = np.maximum(np.abs(x) * 2.0**-4, step * 2.0**-10)
    else:
        half = step / 2
    tol = 1e-6 * (np.abs(x) + np.repeat(np.abs(want_zero), group, axis=-1))  # float32 rounding
    assert np.all(np.abs(back - x) <= half + tol)
    np.testing.assert_array_equal(back[0, 0, 0], 0.0)  # an empty slot stays exactly empty
    np.testing.assert_allclose(back[0, 0, 1], 1.5, rtol=1e-6)


@pytest.mark.parametrize("head_dim", [64, 48])
def test_hadamard_rotation_is_orthogonal_and_keeps_q_dot_k(head_dim):
    h = quant.hadamard_matrix(head_dim)
    block = 64 if head_dim == 64 else 16  # the largest power of two dividing head_dim
    want = np.kron(np.eye(head_dim // block), scipy.linalg.hadamard(block) / np.sqrt(block))
    np.testing.assert_allclose(h, want, rtol=1e-7)
    np.testing.assert_allclose(h @ h.T, np.eye(head_dim), atol=1e-6)
    rng = np.random.default_rng(1)
    q, k = (rng.standard_normal((4, head_dim)).astype(np.float32) for _ in range(2))
    rq, rk = (np.asarray(quant.hadamard_rotate(jnp.asarray(a))) for a in (q, k))
    np.testing.assert_allclose(rq @ rk.T, q @ k.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(quant.hadamard_rotate(jnp.asarray(rq))), q, atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_prefill_and_write_token_store_quantized_rotated_keys(kind):
    # Multiples of 2^-8 and head_dim 16 (Hadamard entries +-1/4) make the rotation exact in float32, so
    # the numpy quantizer sees exactly the values the buffer quantized.
    rng = np.random.default_rng(2)
    batch, prompt, heads, head_dim, capacity, group = 2, 6, 2, 16, 8, 8
    draw = lambda *shape: rng.integers(-(2**10), 2**10, shape).astype(np.float32) / 2**8
    k_seq, v_seq = draw(batch, prompt, heads, head_dim), draw(batch, prompt, heads, head_dim)
    kept = np.array([[[0, 2, 5, -1]], [[1, 2, 3, 4]]], np.int32)
    layer = layer_from_kept(jnp.asarray(k_seq), jnp.asarray(v_seq), jnp.asarray(kept), capacity, kind, group)
    k_new, v_new = draw(batch, heads, head_dim), draw(batch, heads, head_dim)
    new = write_token(layer, jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray([7, 9]))
    rot = lambda x: np.asarray(quant.hadamard_rotate(jnp.asarray(x)))
    empty = np.zeros((heads, head_dim), np.float32)
    for b in range(batch):
        slot = int(layer.evict_slot[b, 0])
        rows = [(layer, s, k_seq[b, p] if p >= 0 else empty, v_seq[b, p] if p >= 0 else empty)
                for s, p in enumerate(kept[b, 0])]  # fmt: skip
        for source, at, k_row, v_row in [*rows, (new, slot, k_new[b], v_new[b])]:
            for name, x in (("k", rot(k_row)), ("v", v_row)):
                payload, scale, zero = numpy_quantize(x, kind, group)
                got = np.asarray(getattr(source, name)[b, :, at])
                np.testing.assert_array_equal(got.view(np.uint8), payload.view(np.uint8), err_msg=name)
                np.testing.assert_array_equal(np.asarray(getattr(source, f"{name}_scale")[b, :, at]), scale)
                if kind == "int4":
                    np.testing.assert_array_equal(np.asarray(getattr(source, f"{name}_zero")[b, :, at]), zero)
                if name == "v":  # the value's L1 norm, stored with it
                    norm = np.abs(numpy_dequantize(payload, scale, zero, kind, group)).sum(-1, keepdims=True)
                    np.testing.assert_allclose(np.asarray(source.v_norm[b, :, at]), norm, rtol=1e-6)
        others = np.arange(capacity) != slot
        for name in ("k", "v", "k_scale", "v_scale", "v_norm"):  # the write touches only the evict slot
            np.testing.assert_array_equal(
                np.asarray(getattr(new, name))[b, :, others].view(np.uint8),
                np.asarray(getattr(layer, name))[b, :, others].view(np.uint8),
            )
    k_read, v_read = dequantized_kv(new)
    assert k_read.shape == v_read.shape == (batch, heads, capacity, head_dim)
    np.testing.assert_array_equal(np.asarray(v_read[:, :, -1]), 0.0)  # the still empty slot


def test_kv_quant_is_validated():
    with pytest.raises(ValueError, match="kv_quant must be None or one of"):
        lf.CompressionConfig(kv_quant="int3")
    with pytest.raises(ValueError, match="kv_quant_group must be a positive int"):
        lf.CompressionConfig(kv_quant="int8", kv_quant_group=0)
    ids, lengths = make_prompts(CONFIG, [4])
    bad_group = lf.CompressionConfig(policy="full", kv_quant="int4", kv_quant_group=24)
    with pytest.raises(ValueError, match="kv_quant_group 24 must divide head_dim 32"):
        lf.generate({}, CONFIG, ids, lengths, max_new_tokens=2, compression=bad_group)
    for impl in ("pallas", "triton"):
        check_attention_impl(impl, lf.CompressionConfig(kv_quant="int8"))  # the kernels read it
    with pytest.raises(ValueError, match="fuses only the policies"):
        check_attention_impl("pallas", lf.CompressionConfig(policy="h2o", kv_quant="int8"))


def test_no_kv_quant_keeps_the_plain_buffer(params):
    ids, lengths = make_prompts(CONFIG, [5, 7], seed=3)
    comp = lf.CompressionConfig(policy="longflow", budget=6)
    cache, _ = jax.eval_shape(
        lambda: lf.prefill(params, CONFIG, jnp.asarray(ids), jnp.asarray(lengths), comp, 6)
    )
    assert len(jax.tree_util.tree_leaves(cache)) == 5 * CONFIG.num_layers  # k, v, slot_pos, evict, score
    assert cache.layers[0].k.dtype == jnp.float32 and cache.layers[0].kv_quant is None
    key = jax.random.PRNGKey(0)
    step = jax.make_jaxpr(
        lambda c: lf.decode_step(params, CONFIG, c, ids[:, 0], lengths, key, compression=comp)
    )(cache)
    assert not any(t in str(step) for t in ("i8[", "u8[", "f8_e4m3fn"))  # no quantization traced


@pytest.mark.parametrize(
    "policy, kind, granularity",
    [("full", "int4", "sequence"), ("longflow", "int8", "kv_head"), ("rkv", "int2", "sequence")],
)  # fmt: skip
def test_generate_runs_on_the_quantized_buffer(params, policy, kind, granularity):
    ids, lengths = make_prompts(CONFIG, [6, 13], seed=4)
    budget = 10 if policy == "rkv" else 8
    comp = lf.CompressionConfig(
        policy=policy,
        budget=budget,
        granularity=granularity,
        kv_quant=kind,
        kv_quant_group=GROUP,
        rkv_buffer=4,
    )
    out = lf.generate(params, CONFIG, ids, lengths, max_new_tokens=12, compression=comp)
    np.testing.assert_array_equal(np.asarray(out.lengths), [12, 12])
    occupancy = np.asarray(out.cache_occupancy)
    if policy == "rkv":  # compresses back to the budget whenever its 4 extra slots fill
        assert (occupancy <= budget + 4).all()
    else:
        want = lengths + 11 if policy == "full" else np.minimum(lengths + 11, budget)
        np.testing.assert_array_equal(occupancy, want)
    assert not np.asarray(out.nonfinite).any()


def test_int8_is_close_to_the_full_cache_and_int4_further(params):
    ids, lengths = make_prompts(CONFIG, [9, 14], seed=5)
    steps = 12
    trajectory, _ = make_prompts(CONFIG, [steps, steps], seed=6)  # teacher forcing takes any tokens
    full = lf.CompressionConfig(policy="full")

    def kl(kind):
        comp = lf.CompressionConfig(policy="full", kv_quant=kind, kv_quant_group=GROUP)
        scores = lf.score_trajectory(
            params, CONFIG, ids, lengths, trajectory, np.full(2, steps), compression=comp, reference=full
        )
        # The K/V bytes held: every prompt and fed token, at the quantized slot size.
        per_token = (
            CONFIG.num_layers * CONFIG.num_kv_heads * quant.slot_bytes(CONFIG.head_dim, 4, kind, GROUP)
        )
        held = (lengths[:, None] + np.arange(steps)[None]) * per_token
        np.testing.assert_allclose(np.asarray(scores.kv_bytes), held, rtol=1e-6)
        return float(np.asarray(scores.kl).mean()), float(np.asarray(scores.top1_agree).mean())

    (kl8, agree8), (kl4, _) = kl("int8"), kl("int4")
    assert kl8 < 1e-3 and agree8 >= 0.9
    assert kl4 > kl8


@pytest.mark.parametrize(
    "policy, kind",
    [("full", None), ("longflow", "int4"), ("longflow", "fp8"), ("rkv", "int8"), ("full", "int2")],
)
def test_kv_cache_bytes_is_what_prefill_allocates(params, policy, kind):
    ids, lengths = make_prompts(CONFIG, [5, 11], seed=6)
    new_tokens = 9
    comp = lf.CompressionConfig(policy=policy, budget=10, kv_quant=kind, kv_quant_group=GROUP, rkv_buffer=3)
    eff = generate_module.effective_compression(comp, ids.shape[1], new_tokens)
    capacity = generate_module.buffer_capacity(eff, ids.shape[1], new_tokens)
    # The cache lf.prefill returns, its shapes and dtypes evaluated without running the model.
    cache, _ = jax.eval_shape(
        lambda: lf.prefill(params, CONFIG, jnp.asarray(ids), jnp.asarray(lengths), eff, capacity)
    )
    want = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
    assert lf.kv_cache_bytes(CONFIG, comp, 2, ids.shape[1], new_tokens) == want


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_reference_reads_quantized_payloads(kind):
    """The kernels' reference on payloads + KVScales equals float attention over numpy's dequantization,
    and the contract names what is off."""
    from pallas_kernels.reference import longflow_decode_attention_reference as reference

    k, v = _heads(1, (2, 2, 8, 64)), _heads(2, (2, 2, 8, 64))
    q = np.random.default_rng(3).standard_normal((2, 4, 64)).astype(np.float32)
    valid = np.arange(8)[None, :] < np.array([[8], [5]])
    (kp, ks, kz), (vp, vs, vz) = numpy_quantize(k, kind, 32), numpy_quantize(v, kind, 32)
    zero = quant.has_zero_point(kind)

    def deq(payload, s, z):
        return numpy_dequantize(payload, s, z, kind, 32)

    norms = np.abs(deq(vp, vs, vz)).sum(-1, keepdims=True)
    scales = quant.KVScales(*(jnp.asarray(x) for x in (ks, kz, vs, vz, norms)))
    scales = scales._replace(k_zero=scales.k_zero if zero else None, v_zero=scales.v_zero if zero else None)
    # The stored norm is ||v||_1 of the dequantized value, as quantize_kv computes it.
    stored = quant.quantize_kv(jnp.asarray(k), jnp.asarray(v), kind, 32)[2].v_norm
    np.testing.assert_allclose(np.asarray(stored), norms, rtol=1e-6)

    out, evict = reference(
        jnp.asarray(q), jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(valid), scale=0.125,
        granularity="kv_head", kv_quant=kind, kv_scales=scales,
    )  # fmt: skip
    logits = np.einsum("bkgd,bkcd->bkgc", q.reshape(2, 2, 2, 64), deq(kp, ks, kz)) * 0.125
    logits = np.where(valid[:, None, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.einsum("bkgc,bkcd->bkgd", probs, deq(vp, vs, vz)).reshape(2, 4, 64)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-4)
    importance = probs.sum(2) * np.abs(deq(vp, vs, vz)).sum(-1)
    np.testing.assert_array_equal(np.asarray(evict), np.where(valid[:, None], importance, -1).argmin(-1))
    with pytest.raises(ValueError, match="needs kv_scales=KVScales"):
        reference(
            jnp.asarray(q), jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(valid), scale=0.1, kv_quant=kind
        )
    bad = scales._replace(v_scale=scales.v_scale[..., :1])
    with pytest.raises(ValueError, match=r"kv_scales.v_scale must be float32 \[2, 2, 8, 2\]"):
        reference(jnp.asarray(q), jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(valid), scale=0.1,
                  kv_quant=kind, kv_scales=bad)  # fmt: skip
    bad = scales._replace(v_norm=scales.v_norm[..., 0])
    with pytest.raises(ValueError, match=r"kv_scales.v_norm must be float32 \[2, 2, 8, 1\]"):
        reference(jnp.asarray(q), jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(valid), scale=0.1,
                  kv_quant=kind, kv_scales=bad)  # fmt: skip
