"""The fixed-capacity KV slot buffer: a pytree of fixed-shape arrays, updated functionally.

Per layer, per sequence b:
  k, v        [B, Hkv, C, D]  post-RoPE keys / values, one row per slot (slot-major per KV head, so a
                              kernel streams one KV head's slots contiguously)
  slot_pos    [B, G, C] int32 the true position of the token held in each slot, -1 for an empty slot
  evict_slot  [B, G] int32    the slot the next token is written to (LONGFLOW.md step 1)
  score       [B, G, C] f32   policy state that outlives a step (H2O's accumulated attention); zeros
                              for the other policies
  kernel_state  pytree or None  state the attention kernel carries from step to step (opaque here:
                              attention.with_kernel_state makes it for the kernel in use)
  recent_queries  [B, W, Hq, D] or None  "rkv" only: the newest W tokens' post-RoPE queries, position p
                              at index p % W (rkv.py)
G = 1 ("sequence": one evict slot shared by all KV heads) or Hkv ("kv_head").
Every policy fills empty slots first, lowest index first, so the filled slots of a row are always the
prefix [0, n) and the same in every group: `kv_valid` reads it off group 0. ("rkv" keeps the prefix by
compacting the tokens it keeps into slots [0, budget).)
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class LayerCache:
    k: jax.Array
    v: jax.Array
    slot_pos: jax.Array
    evict_slot: jax.Array
    score: jax.Array
    kernel_state: Any = None
    recent_queries: jax.Array | None = None

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


@flax.struct.dataclass
class KVCache:
    layers: list[LayerCache]


def kv_valid(layer: LayerCache):
    """[B, C] bool: which slots hold a token."""
    return layer.slot_pos[:, 0, :] >= 0


def occupancy(layer: LayerCache):
    """[B] int32: filled slots per row."""
    return jnp.sum(kv_valid(layer), axis=-1, dtype=jnp.int32)


def cache_bytes(cache: KVCache) -> int:
    """Bytes of the K and V buffers (the part that grows with capacity)."""
    return sum(layer.k.nbytes + layer.v.nbytes for layer in cache.layers)


def kv_bytes_for(num_layers, batch, num_kv_heads, capacity, head_dim, dtype) -> int:
    return 2 * num_layers * batch * num_kv_heads * capacity * head_dim * jnp.dtype(dtype).itemsize


def layer_from_kept(k_seq, v_seq, kept_pos, capacity: int) -> LayerCache:
    """Build a layer's buffer from prompt keys/values and the positions prefill decided to keep.

    k_seq, v_seq [B, P, Hkv, D] (post-RoPE, position = index); kept_pos [B, G, K] int32 with K <= C - 1,
    valid entries first in increasing position order, -1 after them. Slots K..C-1 start empty, and the
    first empty slot is where the first generated token goes.
    """
    batch, _, num_kv_heads, head_dim = k_seq.shape
    groups, kept = kept_pos.shape[1], kept_pos.shape[2]
    if kept >= capacity:
        raise ValueError(f"prefill keeps {kept} tokens but the buffer has only {capacity} slots")
    per_head = jnp.broadcast_to(kept_pos, (batch, num_kv_heads, kept)) if groups == 1 else kept_pos
    idx = jnp.maximum(per_head, 0)[..., None]  # [B, Hkv, K, 1]

    def gather(x):
        xt = jnp.swapaxes(x, 1, 2)  # [B, Hkv, P, D]
        picked = jnp.take_along_axis(xt, idx, axis=2)
        picked = jnp.where(per_head[..., None] >= 0, picked, jnp.zeros((), x.dtype))
        return jnp.pad(picked, ((0, 0), (0, 0), (0, capacity - kept), (0, 0)))

    slot_pos = jnp.pad(kept_pos, ((0, 0), (0, 0), (0, capacity - kept)), constant_values=-1)
    return LayerCache(
        k=gather(k_seq),
        v=gather(v_seq),
        slot_pos=slot_pos.astype(jnp.int32),
        evict_slot=jnp.sum(kept_pos >= 0, axis=-1, dtype=jnp.int32),
        score=jnp.zeros(slot_pos.shape, jnp.float32),
    )


def write_token(layer: LayerCache, k_new, v_new, pos) -> LayerCache:
    """Write the new token (k_new, v_new [B, Hkv, D], true position pos [B]) into evict_slot.

    A scatter of B*Hkv rows: with the cache carried through a while_loop (or donated) XLA updates the
    buffer in place instead of copying it.
    """
    batch, num_kv_heads = k_new.shape[:2]
    groups = layer.evict_slot.shape[1]
    slot = jnp.broadcast_to(layer.evict_slot, (batch, num_kv_heads)) if groups == 1 else layer.evict_slot
    b = jnp.arange(batch)[:, None]
    h = jnp.arange(num_kv_heads)[None, :]
    gb = jnp.arange(batch)[:, None]
    g = jnp.arange(groups)[None, :]
    return layer.replace(
        k=layer.k.at[b, h, slot].set(k_new.astype(layer.k.dtype)),
        v=layer.v.at[b, h, slot].set(v_new.astype(layer.v.dtype)),
        slot_pos=layer.slot_pos.at[gb, g, layer.evict_slot].set(
            jnp.broadcast_to(pos[:, None], (batch, groups)).astype(jnp.int32)
        ),
        score=layer.score.at[gb, g, layer.evict_slot].set(0.0),
    )


def evicted_positions(layer: LayerCache):
    """[B, G]: the position about to be overwritten at evict_slot (-1 when the slot is empty)."""
    return jnp.take_along_axis(layer.slot_pos, layer.evict_slot[..., None], axis=-1)[..., 0]
