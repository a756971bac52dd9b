"""The one plain-jnp reference for decode attention, LongFlow importance and eviction.

Every fast path (pallas_kernels/, cuda_triton_bridge/) is tested against these functions, and the
`attention_impl="reference"` decode path calls them directly.

Layout (the cache buffer's, see kv_cache.py):
  q         [B, Hq, D]          the current token's queries, post-RoPE
  k, v      [B, Hkv, C, D]      post-RoPE keys and values, one row per slot
  kv_valid  [B, C] bool         filled slots (the new token's slot included)
Query head h reads KV head h // (Hq // Hkv) (Hugging Face `repeat_kv` order).

Importance of slot i for KV group g (LONGFLOW.md, step 3), with only the current query:
  I[g, i] = sum_{h in group g} alpha[h, i] * ||v[kv(h), i]||_1
`granularity="sequence"` sums over all query heads (one slot per sequence, the paper's choice);
`granularity="kv_head"` keeps one score and one evict slot per KV head.
Invalid slots score EMPTY_SLOT_SCORE (-1), strictly below any valid slot (>= 0), so empty slots are
always filled first even if a valid slot's probability underflows to 0. The evict slot is the argmin;
ties go to the lowest slot index (what `jnp.argmin` does), and every kernel must break them the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GRANULARITIES = ("sequence", "kv_head")
EMPTY_SLOT_SCORE = -1.0


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def num_score_groups(num_kv_heads: int, granularity: str) -> int:
    """How many evict slots a sequence has per layer: 1, or one per KV head."""
    check_granularity(granularity)
    return 1 if granularity == "sequence" else num_kv_heads


def decode_attention_probs(q, k, v, kv_valid, scale):
    """Attention of one query token over all slots, in float32.

    Returns (out [B, Hq, D] f32, probs [B, Hq, C] f32); invalid slots get probability 0.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    qg = q.astype(jnp.float32).reshape(batch, num_kv_heads, group, head_dim)
    logits = jnp.einsum("bkgd,bkcd->bkgc", qg, k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    logits = logits * scale
    mask = kv_valid[:, None, None, :]
    logits = jnp.where(mask, logits, -jnp.inf)
    # A row with no valid slot would give NaN; decode always has the new token's slot valid, but keep
    # the reference total so kernels can be compared on any mask.
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    unnorm = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(unnorm, axis=-1, keepdims=True)
    probs = unnorm / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgc,bkcd->bkgd", probs, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (
        out.reshape(batch, num_q_heads, head_dim),
        probs.reshape(batch, num_q_heads, -1),
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


def check_kv_len(kv_len, batch: int) -> None:
    """The kernels' optional filled-prefix bound: an integer array [B] (clamped to [0, C] by them)."""
    shape, dtype = getattr(kv_len, "shape", None), getattr(kv_len, "dtype", None)
    if shape != (batch,) or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"kv_len must be an integer array of shape [B] = ({batch},) (filled slots per row), got "
            + (f"{dtype} {shape}" if dtype is not None else type(kv_len).__name__)
        )


def check_decode_inputs(q, k, v, kv_valid) -> None:
    """Shape and dtype contract shared by the reference and every kernel entry point."""
    if q.ndim != 3 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"expected q [B, Hq, D] and k, v [B, Hkv, C, D]; got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    batch, num_q_heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k {k.shape} and v {v.shape} must both be [B={batch}, Hkv, C, D={head_dim}]")
    if num_q_heads % k.shape[1]:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({k.shape[1]})")
    if kv_valid.shape != (batch, k.shape[2]) or kv_valid.dtype != jnp.bool_:
        raise ValueError(
            f"kv_valid must be bool [B, C] = {(batch, k.shape[2])}, got {kv_valid.dtype} {kv_valid.shape}"
        )
    floats = (jnp.float32, jnp.bfloat16, jnp.float16)
    if any(x.dtype not in floats for x in (q, k, v)):
        raise ValueError(f"q, k, v must be float32/bfloat16/float16, got {q.dtype}, {k.dtype}, {v.dtype}")


def longflow_decode_attention_reference(q, k, v, kv_valid, *, scale, granularity="sequence"):
    """The kernel contract in plain jnp.

    Returns (out [B, Hq, D] in q's dtype, evict_slot int32 [B] for "sequence" or [B, Hkv] for "kv_head").
    """
    check_decode_inputs(q, k, v, kv_valid)
    check_granularity(granularity)
    out, probs = decode_attention_probs(q, k, v, kv_valid, scale)
    evict = evict_argmin(longflow_importance(probs, v, kv_valid, granularity))
    if granularity == "sequence":
        evict = evict[:, 0]
    return out.astype(q.dtype), evict
