"""How each policy picks the slot the next token overwrites, from one decode step's attention.

All policies score empty slots EMPTY_SLOT_SCORE (below any filled slot) so the buffer fills first, and
evict the argmin (ties: lowest slot). One line each:
  longflow  LongFlow (Su et al. 2026): current query's attention times ||v||_1, summed over heads.
  tova      TOVA (Oren et al. 2024): current query's attention alone, summed over heads.
  h2o       H2O (Zhang et al. 2023): attention accumulated over all steps; the newest
            `recent_window` positions are protected.
  streaming StreamingLLM (Xiao et al. 2023): keep `num_sinks` first positions, evict the oldest other
            (while decoding; the prompt passes SnapKV's prefill as every policy's does).
  random    a uniformly random filled slot: the floor any scoring must beat.
"rkv" (R-KV) picks no single slot: it compresses a full buffer at once (rkv.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.contract import EMPTY_SLOT_SCORE
from pallas_kernels.reference import evict_argmin, group_head_sum, longflow_importance

from .config import CompressionConfig
from .kv_cache import LayerCache, dequantized_kv

_PROTECTED = jnp.inf


def select_evict_slot(probs, layer: LayerCache, valid, pos, compression: CompressionConfig, key):
    """probs [B, Hq, C] of this step; returns (evict_slot [B, G], updated policy score [B, G, C])."""
    policy = compression.policy
    num_kv_heads = layer.k.shape[1]
    groups = layer.slot_pos.shape[1]
    granularity = "sequence" if groups == 1 else "kv_head"
    valid_g = valid[:, None, :]
    score = layer.score
    if policy == "longflow":
        ranking = longflow_importance(probs, dequantized_kv(layer)[1], valid, granularity)
    elif policy == "tova":
        ranking = jnp.where(valid_g, group_head_sum(probs, num_kv_heads, granularity), EMPTY_SLOT_SCORE)
    elif policy == "h2o":
        score = score + group_head_sum(probs, num_kv_heads, granularity)
        recent = layer.slot_pos > (pos[:, None, None] - compression.h2o_recent)
        ranking = jnp.where(valid_g, jnp.where(recent, _PROTECTED, score), EMPTY_SLOT_SCORE)
    elif policy == "streaming":
        sink = layer.slot_pos < compression.num_sinks
        ranking = jnp.where(
            valid_g, jnp.where(sink, _PROTECTED, layer.slot_pos.astype(jnp.float32)), EMPTY_SLOT_SCORE
        )
    elif policy == "random":
        ranking = jnp.where(valid_g, jax.random.uniform(key, layer.slot_pos.shape), EMPTY_SLOT_SCORE)
    else:
        raise ValueError(f"policy {policy!r} does not evict")
    return evict_argmin(ranking), score
