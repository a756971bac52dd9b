"""The plain-jnp reference of the decode kernels: attention, LongFlow importance and eviction.

Every kernel (pallas_kernels, cuda_triton_bridge) is tested against these functions, and the model's
reference attention path calls them directly. Layout and rules: contract.py.

Importance of slot i for score group g (LONGFLOW.md, step 3), with only the current query:
  I[g, i] = sum_{h in group g} alpha[h, i] * ||v[kv(h), i]||_1
`granularity="sequence"` sums over all query heads (one slot per sequence, the paper's choice);
`granularity="kv_head"` keeps one score and one evict slot per KV head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import quant
from pallas_kernels.contract import EMPTY_SLOT_SCORE, check_decode_inputs, check_granularity


def _masked_logits(q, k, kv_valid, scale):
    """Scaled logits [B, Hkv, Hq / Hkv, C] float32, -inf at invalid slots."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    qg = q.astype(jnp.float32).reshape(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    logits = jnp.einsum("bkgd,bkcd->bkgc", qg, k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return jnp.where(kv_valid[:, None, None, :], logits * scale, -jnp.inf)


def decode_attention_lse(q, k, kv_valid, scale):
    """log sum over valid slots of exp(scale * q . k): [B, Hq] float32, -inf for a row with no valid slot."""
    return jax.nn.logsumexp(_masked_logits(q, k, kv_valid, scale), axis=-1).reshape(q.shape[:2])


def decode_attention_probs(q, k, v, kv_valid, scale):
    """Attention of one query token over all slots, in float32.

    Returns (out [B, Hq, D] f32, probs [B, Hq, C] f32); invalid slots get probability 0.
    """
    batch, num_q_heads, head_dim = q.shape
    mask = kv_valid[:, None, None, :]
    logits = _masked_logits(q, k, kv_valid, scale)
    # A row with no valid slot would give NaN; decode always has the new token's slot valid, but keep
    # the reference total so kernels can be compared on any mask.
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    unnorm = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(unnorm, axis=-1, keepdims=True)
    probs = unnorm / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgc,bkcd->bkgd", probs, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(batch, num_q_heads, head_dim), probs.reshape(batch, num_q_heads, -1)


def dequantized_kv(k, v, kv_quant, kv_scales):
    """The float32 keys and values [B, Hkv, C, D] a quantized buffer holds."""
    group = k.shape[-1] * quant.codes_per_byte(kv_quant) // kv_scales.k_scale.shape[-1]
    return (
        quant.dequantize(k, kv_scales.k_scale, kv_scales.k_zero, kv_quant, group),
        quant.dequantize(v, kv_scales.v_scale, kv_scales.v_zero, kv_quant, group),
    )


def value_l1_norms(v):
    """||v_i||_1 per KV head and slot: [B, Hkv, C] float32."""
    return jnp.sum(jnp.abs(v.astype(jnp.float32)), axis=-1)


def group_head_sum(per_q_head, num_kv_heads: int, granularity: str):
    """Sum a [B, Hq, C] quantity over query heads into score groups: [B, G, C]."""
    batch, num_q_heads, slots = per_q_head.shape
    by_kv = per_q_head.reshape(batch, num_kv_heads, num_q_heads // num_kv_heads, slots).sum(axis=2)
    if granularity == "sequence":
        return by_kv.sum(axis=1, keepdims=True)
    return by_kv


def importance_from_vnorm(probs, vnorm, kv_valid, granularity: str):
    """LongFlow importance [B, G, C] float32 from probs [B, Hq, C] and ||v||_1 [B, Hkv, C].

    Invalid slots get EMPTY_SLOT_SCORE. Kernels that already hold ||v||_1 (and rebuild probs from their
    logits) call this too, so the scoring rule lives in one place.
    """
    batch, num_q_heads, slots = probs.shape
    num_kv_heads = vnorm.shape[1]
    group = num_q_heads // num_kv_heads
    contrib = (probs.reshape(batch, num_kv_heads, group, slots) * vnorm[:, :, None, :]).reshape(probs.shape)
    return importance_from_terms(contrib, num_kv_heads, kv_valid, granularity)


def importance_from_terms(contrib, num_kv_heads: int, kv_valid, granularity: str):
    """LongFlow importance [B, G, C] from per-query-head terms alpha * ||v||_1 [B, Hq, C].

    Summed into score groups; invalid slots get EMPTY_SLOT_SCORE.
    """
    check_granularity(granularity)
    importance = group_head_sum(contrib, num_kv_heads, granularity)
    return jnp.where(kv_valid[:, None, :], importance, EMPTY_SLOT_SCORE)


def longflow_importance(probs, v, kv_valid, granularity: str):
    """LongFlow importance [B, G, C] float32; invalid slots get EMPTY_SLOT_SCORE."""
    return importance_from_vnorm(probs, value_l1_norms(v), kv_valid, granularity)


def evict_argmin(scores):
    """Lowest-scoring slot per group, ties to the lowest index: [B, G] int32."""
    return jnp.argmin(scores, axis=-1).astype(jnp.int32)


def evict_argmin_of_chunks(chunk_min, chunk_slot):
    """The evict slot from a kernel's per-chunk minima: [B, G, chunks] minima and their slots (each the
    lowest slot among its chunk's equal minima, chunks in slot order) -> [B, G] int32, the slot of the
    least minimum, ties to the lowest slot as in `evict_argmin`. One reduction over (minimum, slot)."""

    def lexmin(a, b):
        (a_val, a_slot), (b_val, b_slot) = a, b
        take_b = (b_val < a_val) | ((b_val == a_val) & (b_slot < a_slot))
        return jnp.where(take_b, b_val, a_val), jnp.where(take_b, b_slot, a_slot)

    init = (jnp.array(jnp.inf, chunk_min.dtype), jnp.array(jnp.iinfo(jnp.int32).max, jnp.int32))
    _, slot = jax.lax.reduce((chunk_min, chunk_slot.astype(jnp.int32)), init, lexmin, (chunk_min.ndim - 1,))
    return slot


def longflow_decode_attention_reference(
    q, k, v, kv_valid, *, scale, granularity="sequence", kv_quant=None, kv_scales=None, return_lse=False
):
    """The kernel contract in plain jnp.

    kv_quant, kv_scales: k and v are quantized payloads (contract.check_decode_inputs), dequantized here
    to float32 first; q is in the keys' basis.
    Returns (out [B, Hq, D] in q's dtype, evict_slot int32 [B] for "sequence" or [B, Hkv] for "kv_head"),
    and with return_lse a third output, `decode_attention_lse` [B, Hq] float32 (contract.py).
    """
    check_decode_inputs(q, k, v, kv_valid, kv_quant, kv_scales)
    check_granularity(granularity)
    if kv_quant is not None:
        k, v = dequantized_kv(k, v, kv_quant, kv_scales)
    out, probs = decode_attention_probs(q, k, v, kv_valid, scale)
    evict = evict_argmin(longflow_importance(probs, v, kv_valid, granularity))
    if granularity == "sequence":
        evict = evict[:, 0]
    if return_lse:
        return out.astype(q.dtype), evict, decode_attention_lse(q, k, kv_valid, scale)
    return out.astype(q.dtype), evict
