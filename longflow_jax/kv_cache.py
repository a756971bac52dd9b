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
  thinkv      "thinkv" only: the layer's precision tiers and segment slots (thinkv.LayerSegments); k, v
              then hold the prompt and the segment being written, at the model's dtype
With kv_quant set (a static field, with kv_quant_group), k and v hold each slot's quantized payload
[B, Hkv, C, D / codes per byte], keys Hadamard-rotated, and k_scale, v_scale [B, Hkv, C, D / group] f32
(k_zero, v_zero likewise for int4 / int2) their scales, and v_norm [B, Hkv, C, 1] f32 each value's
||v||_1 (pallas_kernels/quant.py). Everything that reads K/V reads `dequantized_kv`, with queries in the
keys' basis (`queries_for_keys`).
G = 1 ("sequence": one evict slot shared by all KV heads) or Hkv ("kv_head").
Every policy fills empty slots first, lowest index first, so the filled slots of a row are always the
prefix [0, n) and the same in every group: `kv_valid` reads it off group 0. ("rkv" keeps the prefix by
compacting the tokens it keeps into slots [0, budget).) ThinKV is the exception: its main buffer holds
a row's prompt in [0, length) and its window from the padded prompt width P on (a gap between them for
a shorter prompt), and a tier reuses a freed slot where it is (thinkv.py), so their filled slots are a
set, not a prefix; thinkv.py reads each buffer up to its highest filled slot.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels import quant, reference


@flax.struct.dataclass
class LayerCache:
    k: jax.Array
    v: jax.Array
    slot_pos: jax.Array
    evict_slot: jax.Array
    score: jax.Array
    kernel_state: Any = None
    recent_queries: jax.Array | None = None
    thinkv: Any = None
    k_scale: jax.Array | None = None
    k_zero: jax.Array | None = None
    v_scale: jax.Array | None = None
    v_zero: jax.Array | None = None
    v_norm: jax.Array | None = None
    kv_quant: str | None = flax.struct.field(pytree_node=False, default=None)
    kv_quant_group: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


@flax.struct.dataclass
class KVCache:
    layers: list[LayerCache]
    segments: Any = None  # "thinkv" only: the segment table all layers share (thinkv.SegmentTable)


def kv_valid(layer: LayerCache):
    """[B, C] bool: which slots hold a token."""
    return layer.slot_pos[:, 0, :] >= 0


def occupancy(layer: LayerCache):
    """[B] int32: filled slots per row."""
    return jnp.sum(kv_valid(layer), axis=-1, dtype=jnp.int32)


_QUANT_FIELDS = quant.KVScales._fields


def quantized_fields(layer: LayerCache) -> dict:
    """The layer's per-slot side data (quant.KVScales: scales, zero points, value norms) by field name
    (none without kv_quant)."""
    return {name: getattr(layer, name) for name in _QUANT_FIELDS if getattr(layer, name) is not None}


def _buffers(layer: LayerCache) -> list[LayerCache]:
    """The layer and ThinKV's tier regions: every buffer of slots it holds."""
    return [layer, *(layer.thinkv.tiers if layer.thinkv is not None else ())]


def tokens_held(layer: LayerCache):
    """[B] int32: tokens a row's layer holds, over all its buffers."""
    return sum(jnp.sum(kv_valid(buffer), axis=-1, dtype=jnp.int32) for buffer in _buffers(layer))


def bytes_held(cache: KVCache):
    """[B] float32: bytes of the K/V (with scales) of the tokens a row holds, over every layer and
    buffer: what a paged store would occupy, where `cache_bytes` counts what the buffers reserve."""
    total = 0.0
    for layer in cache.layers:
        for buffer in _buffers(layer):
            batch, _, capacity = buffer.k.shape[:3]
            fields = (buffer.k, buffer.v, *quantized_fields(buffer).values())
            per_slot = sum(x.size * x.dtype.itemsize for x in fields) / (batch * capacity)
            total = total + per_slot * jnp.sum(kv_valid(buffer), axis=-1, dtype=jnp.float32)
    return total


def cache_bytes(cache: KVCache) -> int:
    """Bytes of the K and V buffers with their scales (the part that grows with capacity)."""
    return sum(
        x.nbytes
        for layer in cache.layers
        for buffer in _buffers(layer)
        for x in (buffer.k, buffer.v, *quantized_fields(buffer).values())
    )


def kv_bytes_for(
    num_layers, batch, num_kv_heads, capacity, head_dim, dtype, kv_quant=None, kv_quant_group=32
) -> int:
    """`cache_bytes` of a cache of this shape, K/V in `dtype` or quantized by `kv_quant`."""
    per_slot = quant.slot_bytes(head_dim, jnp.dtype(dtype).itemsize, kv_quant, kv_quant_group)
    return num_layers * batch * num_kv_heads * capacity * per_slot


def _stored(k, v, kv_quant, group) -> dict:
    """LayerCache fields holding tokens k, v [..., D]: k and v themselves, or their quantized payloads
    (keys rotated) and scales."""
    if kv_quant is None:
        return dict(k=k, v=v)
    k_payload, v_payload, side = quant.quantize_kv(quant.hadamard_rotate(k), v, kv_quant, group)
    fields = dict(k=k_payload, v=v_payload, **side._asdict())
    return {name: x for name, x in fields.items() if x is not None}


def dequantized_kv(layer: LayerCache):
    """(k, v) [B, Hkv, C, D] as attention and the policies read them: the buffers themselves, or with
    kv_quant the dequantized payloads in float32, keys in the rotated basis (`queries_for_keys`)."""
    if layer.kv_quant is None:
        return layer.k, layer.v
    return reference.dequantized_kv(layer.k, layer.v, layer.kv_quant, kv_scales(layer))


def kv_scales(layer: LayerCache) -> quant.KVScales | None:
    """The layer's scales and zero points as the kernels take them (None without kv_quant)."""
    if layer.kv_quant is None:
        return None
    return quant.KVScales(*(getattr(layer, name) for name in quant.KVScales._fields))


def queries_for_keys(layer: LayerCache, q):
    """Queries [..., D] in the basis of `dequantized_kv`'s keys: rotated (float32) with kv_quant."""
    return q if layer.kv_quant is None else quant.hadamard_rotate(q)


def prompt_view(q, k, kv_quant=None, kv_quant_group=32):
    """Prompt q [B, P, Hq, D], k [B, P, Hkv, D] as prefill's selection reads them: what the buffer will
    hold, so with kv_quant the rotated queries (in q's dtype) and the dequantized rotated keys."""
    if kv_quant is None:
        return q, k
    payload, scale, zero = quant.quantize(quant.hadamard_rotate(k), kv_quant, kv_quant_group)
    keys = quant.dequantize(payload, scale, zero, kv_quant, kv_quant_group)
    return quant.hadamard_rotate(q).astype(q.dtype), keys


def layer_from_kept(k_seq, v_seq, kept_pos, capacity: int, kv_quant=None, kv_quant_group=32) -> LayerCache:
    """Build a layer's buffer from prompt keys/values and the positions prefill decided to keep.

    k_seq, v_seq [B, P, Hkv, D] (post-RoPE, position = index); kept_pos [B, G, K] int32 with K <= C - 1,
    valid entries first in increasing position order, -1 after them. Slots K..C-1 start empty, and the
    first empty slot is where the first generated token goes. kv_quant: the kept rows are quantized.
    """
    batch, _, num_kv_heads, head_dim = k_seq.shape
    groups, kept = kept_pos.shape[1], kept_pos.shape[2]
    if kept >= capacity:
        raise ValueError(f"prefill keeps {kept} tokens but the buffer has only {capacity} slots")
    per_head = jnp.broadcast_to(kept_pos, (batch, num_kv_heads, kept)) if groups == 1 else kept_pos
    idx = jnp.maximum(per_head, 0)[..., None]  # [B, Hkv, K, 1]

    # The prompt's tokens are stored (quantized) first, then gathered into slots: each token is
    # quantized on its own, so both orders give the same buffer (a stored zero is zero in every field),
    # and this one never makes a float [B, Hkv, C, D] copy of the slots, which XLA's schedule of the
    # prompt pass kept alive for every layer at once (2 x 204 MiB a layer at 51 rows of Qwen3-4B).
    def gather(x):  # [B, P, Hkv, X] -> [B, Hkv, C, X]
        picked = jnp.take_along_axis(jnp.swapaxes(x, 1, 2), idx, axis=2)
        picked = jnp.where(per_head[..., None] >= 0, picked, jnp.zeros((), x.dtype))
        return jnp.pad(picked, ((0, 0), (0, 0), (0, capacity - kept), (0, 0)))

    slot_pos = jnp.pad(kept_pos, ((0, 0), (0, 0), (0, capacity - kept)), constant_values=-1)
    quantized = {} if kv_quant is None else dict(kv_quant=kv_quant, kv_quant_group=kv_quant_group)
    return LayerCache(
        **{name: gather(x) for name, x in _stored(k_seq, v_seq, kv_quant, kv_quant_group).items()},
        slot_pos=slot_pos.astype(jnp.int32),
        evict_slot=jnp.sum(kept_pos >= 0, axis=-1, dtype=jnp.int32),
        score=jnp.zeros(slot_pos.shape, jnp.float32),
        **quantized,
    )


def empty_layer(batch, num_kv_heads, capacity, head_dim, dtype, kv_quant=None, kv_quant_group=32):
    """A one-group buffer of `capacity` empty slots, K/V in `dtype` or quantized by `kv_quant`."""
    # One empty slot stored, then broadcast: every slot holds the same (quantized) zeros, and XLA would
    # spend seconds constant-folding the quantization of a whole [B, Hkv, C, D] zero buffer.
    zero = jnp.zeros((1, 1, 1, head_dim), dtype)
    stored = {
        name: jnp.broadcast_to(x, (batch, num_kv_heads, capacity) + x.shape[3:])
        for name, x in _stored(zero, zero, kv_quant, kv_quant_group).items()
    }
    quantized = {} if kv_quant is None else dict(kv_quant=kv_quant, kv_quant_group=kv_quant_group)
    return LayerCache(
        **stored,
        slot_pos=jnp.full((batch, 1, capacity), -1, jnp.int32),
        evict_slot=jnp.zeros((batch, 1), jnp.int32),
        score=jnp.zeros((batch, 1, capacity), jnp.float32),
        **quantized,
    )


def take_slots(layer: LayerCache, slots) -> LayerCache:
    """The one-group buffer of slots [B, n] of `layer` (their K/V, scales and positions); a slot index
    of -1 reads slot 0. `dequantized_kv` reads the result as it reads `layer`."""
    index = jnp.maximum(slots, 0)
    take = lambda x: jnp.take_along_axis(x, index[:, None, :, None], axis=2)
    return layer.replace(
        k=take(layer.k),
        v=take(layer.v),
        slot_pos=jnp.take_along_axis(layer.slot_pos, index[:, None, :], axis=2),
        **{name: take(x) for name, x in quantized_fields(layer).items()},
    )


def write_slots(layer: LayerCache, k_rows, v_rows, pos, slots) -> LayerCache:
    """Write tokens k_rows, v_rows [B, Hkv, n, D] at true positions pos [B, n] into slots [B, n] of a
    one-group buffer (quantized there with kv_quant); a slot index >= capacity writes nothing."""
    b, h = jnp.arange(k_rows.shape[0])[:, None, None], jnp.arange(k_rows.shape[1])[None, :, None]
    rows = _stored(k_rows, v_rows, layer.kv_quant, layer.kv_quant_group)
    return layer.replace(
        **{
            name: getattr(layer, name)
            .at[b, h, slots[:, None, :]]
            .set(x.astype(getattr(layer, name).dtype), mode="drop")
            for name, x in rows.items()
        },
        slot_pos=layer.slot_pos.at[b[:, 0], 0, slots].set(pos.astype(jnp.int32), mode="drop"),
    )


def free_slots(layer: LayerCache, slots) -> LayerCache:
    """Mark slots [B, n] of a one-group buffer empty; a slot index >= capacity frees nothing."""
    rows = jnp.arange(slots.shape[0])[:, None]
    return layer.replace(slot_pos=layer.slot_pos.at[rows, 0, slots].set(-1, mode="drop"))


def write_token(layer: LayerCache, k_new, v_new, pos) -> LayerCache:
    """Write the new token (k_new, v_new [B, Hkv, D], true position pos [B]) into evict_slot (quantized
    there with kv_quant).

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
    rows = _stored(k_new, v_new, layer.kv_quant, layer.kv_quant_group)
    return layer.replace(
        **{
            name: getattr(layer, name).at[b, h, slot].set(x.astype(getattr(layer, name).dtype))
            for name, x in rows.items()
        },
        slot_pos=layer.slot_pos.at[gb, g, layer.evict_slot].set(
            jnp.broadcast_to(pos[:, None], (batch, groups)).astype(jnp.int32)
        ),
        score=layer.score.at[gb, g, layer.evict_slot].set(0.0),
    )


def evicted_positions(layer: LayerCache):
    """[B, G]: the position about to be overwritten at evict_slot (-1 when the slot is empty)."""
    return jnp.take_along_axis(layer.slot_pos, layer.evict_slot[..., None], axis=-1)[..., 0]
