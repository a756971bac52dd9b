"""SnapKV prefill compression (Li et al. 2024), as LongFlow uses it when a prompt exceeds C - 1 tokens.

The last `window` prompt queries vote: their softmaxed attention to the earlier keys is summed over the
window and over the query heads of a score group, average-pooled along the keys (kernel `pool`, zero
padding, divided by `pool` like torch's avg_pool1d), and the top C - 1 - window earlier tokens are kept in
their original order, followed by the window itself. Rows whose prompt fits in C - 1 keep every token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def observation_scores(q, k, lengths, window: int, groups: int):
    """Window attention mass per earlier key: [B, G, P] float32 (keys in the window or beyond: 0).

    q [B, P, Hq, D], k [B, P, Hkv, D] post-RoPE; lengths [B].
    """
    batch, seq, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q_pos = jnp.maximum(lengths[:, None] - window + jnp.arange(window)[None, :], 0)  # [B, W]
    q_win = jnp.take_along_axis(q, q_pos[:, :, None, None], axis=1)  # [B, W, Hq, D]
    q_win = q_win.reshape(batch, window, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    logits = jnp.einsum(
        "bwkgd,bpkd->bkgwp",
        q_win.astype(jnp.float32),
        k.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    ) * (head_dim**-0.5)
    key_pos = jnp.arange(seq)
    causal = key_pos[None, None, :] <= q_pos[:, :, None]  # [B, W, P]
    logits = jnp.where(causal[:, None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).sum(axis=3)  # [B, Hkv, G', P] summed over the window
    per_kv = probs.sum(axis=2)  # [B, Hkv, P]
    scores = per_kv.sum(axis=1, keepdims=True) if groups == 1 else per_kv
    earlier = key_pos[None, None, :] < (lengths - window)[:, None, None]
    return jnp.where(earlier, scores, 0.0)


def avg_pool_same(x, pool: int):
    """Average pool along the last axis, stride 1, zero padding pool // 2, divide by pool."""
    pad = pool // 2
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])
    windows = sum(padded[..., i : i + x.shape[-1]] for i in range(pool))
    return windows / pool


def prefill_keep_positions(q, k, lengths, capacity: int, window: int, pool: int, groups: int):
    """Positions each row keeps after prefill: [B, G, K] int32, K = min(P, C - 1), -1 padded.

    Shapes are static: the SnapKV branch is traced only when the padded prompt P exceeds C - 1, and
    then applies per row where that row's length exceeds C - 1.
    """
    batch, seq = q.shape[:2]
    keep_len = capacity - 1
    plain = jnp.arange(min(seq, keep_len), dtype=jnp.int32)[None, None, :]
    plain = jnp.where(plain < lengths[:, None, None], plain, -1)
    plain = jnp.broadcast_to(plain, (batch, groups, plain.shape[-1]))
    if seq <= keep_len:
        return plain
    window = min(window, keep_len)
    pooled = avg_pool_same(observation_scores(q, k, lengths, window, groups), pool)
    earlier = jnp.arange(seq)[None, None, :] < (lengths - window)[:, None, None]
    pooled = jnp.where(earlier, pooled, -jnp.inf)
    _, top = jax.lax.top_k(pooled, keep_len - window)  # ties: lower index first
    top = jnp.sort(top, axis=-1).astype(jnp.int32)
    win = (lengths[:, None] - window + jnp.arange(window)[None, :]).astype(jnp.int32)
    snap = jnp.concatenate([top, jnp.broadcast_to(win[:, None, :], (batch, groups, window))], axis=-1)
    return jnp.where((lengths > keep_len)[:, None, None], snap, plain)
