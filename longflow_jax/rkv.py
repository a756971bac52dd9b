"""R-KV (Cai et al. 2025, arXiv 2505.24133): redundancy-aware compression of a decode-time buffer.

The buffer holds `budget + rkv_buffer` slots. New tokens fill it in order; when a row's buffer is full
(right after the step's attention), the row is compressed back to `budget` tokens. The newest WINDOW
tokens always stay; of the older ones (the candidates) the top `budget - WINDOW` by

    score = MIX_LAMBDA * importance - (1 - MIX_LAMBDA) * redundancy

stay, per KV head. importance: the newest WINDOW queries' attention logits, maxed over the query heads
of a KV head, softmaxed over the candidates, averaged over the window, then max-pooled along the slots
(kernel POOL_KERNEL, -inf padding). redundancy: the keys' cosine similarity matrix with a zero diagonal;
in each row the entry of the newest key more similar than SIMILARITY_THRESHOLD (slot 0 when there is
none) is zeroed, so the newest of a set of repeats counts as the least redundant; then the mean over the
rows, softmaxed over the keys. "sequence" granularity sums the per-head scores and keeps one selection.
The kept tokens move to slots [0, budget) in position order, the other slots become empty. A prompt
longer than the budget gets the same selection at prefill (the reference does too), so every row
starts decoding with at most `budget` tokens.

Where this differs from the reference code (github.com/Zefan-Cai/R-KV, rkv/compression/r1_kv.py and
rkv/utils.py):
  * The trigger is the row's buffer being full (its serving path's rule). Its Hugging Face path
    compresses whenever prompt + generated length is a multiple of 128, so its first compression can
    come with a partly filled buffer.
  * Kept tokens stay in position order; the reference stores the kept candidates in score order, so
    after its first compression the max pooling and the "newest similar key" no longer follow positions.
  * Scores are float32 throughout (the reference casts the attention term to the model dtype) and each
    batch row uses its own keys (the redundancy in the reference's main branch reads batch row 0).
  * MIX_LAMBDA is 0.1, the paper's and the serving config's value; the R1KV class defaults to 0.07.
  * top-k ties go to the lower slot; "sequence" granularity is ours (the reference selects per KV head).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import RKV_WINDOW as WINDOW  # the newest tokens: their queries score the rest; they stay
from .kv_cache import LayerCache, dequantized_kv, layer_from_kept, occupancy, prompt_view, quantized_fields

POOL_KERNEL = 7
MIX_LAMBDA = 0.1
SIMILARITY_THRESHOLD = 0.5
SIMILARITY_ROWS = 256
_HIGHEST = jax.lax.Precision.HIGHEST


def _max_pool(x, kernel: int):
    """Max over a centred window of `kernel` along the last axis, stride 1, -inf padding."""
    pad = kernel // 2
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], constant_values=-jnp.inf)
    return jnp.max(jnp.stack([padded[..., i : i + x.shape[-1]] for i in range(kernel)]), axis=0)


def _importance(queries, k, candidate):
    """[B, Hkv, N]: the window's attention to each candidate slot, pooled; -inf elsewhere."""
    batch, window, num_q_heads, head_dim = queries.shape
    num_kv_heads = k.shape[1]
    qg = queries.reshape(batch, window, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    logits = jnp.einsum(
        "bwkgd,bknd->bkgwn", qg.astype(jnp.float32), k.astype(jnp.float32), precision=_HIGHEST
    ) * (head_dim**-0.5)
    logits = jnp.where(candidate[:, None, None, :], logits.max(axis=2), -jnp.inf)  # [B, Hkv, W, N]
    attention = jax.nn.softmax(logits, axis=-1).mean(axis=2)
    return jnp.where(candidate[:, None, :], _max_pool(attention, POOL_KERNEL), -jnp.inf)


def _redundancy(k, filled):
    """[B, Hkv, N]: softmax over the filled slots of each key's mean cosine similarity to the others.

    The similarity matrix is built SIMILARITY_ROWS rows at a time, so its memory is B * Hkv * rows * N
    floats rather than B * Hkv * N^2 (10 GB at N = 2,176, B = 64, Hkv = 8)."""
    num_slots = k.shape[2]
    kf = k.astype(jnp.float32)
    unit = kf / (jnp.linalg.norm(kf, axis=-1, keepdims=True) + 1e-8)
    slots = jnp.arange(num_slots)
    rows = min(SIMILARITY_ROWS, num_slots)
    num_chunks = -(-num_slots // rows)
    pad = num_chunks * rows - num_slots  # padded rows are unfilled: they add nothing
    unit_rows = jnp.pad(unit, ((0, 0), (0, 0), (0, pad), (0, 0)))
    filled_rows = jnp.pad(filled, ((0, 0), (0, pad)))

    def add_rows(i, column_sums):
        row_slots = i * rows + jnp.arange(rows)
        sim = jnp.einsum(
            "bhnd,bhmd->bhnm", jax.lax.dynamic_slice_in_dim(unit_rows, i * rows, rows, axis=2), unit,
            precision=_HIGHEST,
        )  # fmt: skip
        row_filled = jax.lax.dynamic_slice_in_dim(filled_rows, i * rows, rows, axis=1)
        pair = row_filled[:, None, :, None] & filled[:, None, None, :] & (row_slots[:, None] != slots)
        sim = jnp.where(pair, sim, 0.0)
        newest_similar = jnp.max(jnp.where(sim > SIMILARITY_THRESHOLD, slots, 0), axis=-1)  # [B, Hkv, rows]
        sim = jnp.where(slots == newest_similar[..., None], 0.0, sim)
        return column_sums + sim.sum(axis=2)

    column_sums = jax.lax.fori_loop(0, num_chunks, add_rows, jnp.zeros(k.shape[:3], jnp.float32))
    mean = column_sums / jnp.sum(filled, axis=-1)[:, None, None]
    return jax.nn.softmax(jnp.where(filled[:, None, :], mean, -jnp.inf), axis=-1)


def kept_slots(queries, k, num_filled, budget: int, groups: int):
    """The slots R-KV keeps: [B, G, budget] int32, ascending.

    queries [B, WINDOW, Hq, D]: the newest WINDOW tokens' queries, any order. k [B, Hkv, N, D]: slots
    [0, num_filled[b]) of row b hold its tokens in position order (the last WINDOW of them are the
    window's); num_filled [B] must exceed budget for the result to mean anything.
    """
    slots = jnp.arange(k.shape[2])[None, :]
    filled = slots < num_filled[:, None]
    window = filled & (slots >= (num_filled - WINDOW)[:, None])
    importance = _importance(queries, k, filled & ~window)
    score = MIX_LAMBDA * importance - (1 - MIX_LAMBDA) * _redundancy(k, filled)  # -inf off the candidates
    if groups == 1:
        score = score.sum(axis=1, keepdims=True)
    score = jnp.where(window[:, None, :], jnp.inf, score)  # the window always stays
    _, top = jax.lax.top_k(score, budget)  # ties: lower slot first
    return jnp.sort(top, axis=-1).astype(jnp.int32)


def window_queries(q, lengths):
    """The query ring after prefill: [B, WINDOW, Hq, D], index p % WINDOW holds position p's query for
    the newest WINDOW prompt positions (indices of positions below 0 hold position 0's)."""
    last = (lengths - 1)[:, None]
    pos = last - (last - jnp.arange(WINDOW)[None, :]) % WINDOW
    return jnp.take_along_axis(q, jnp.maximum(pos, 0)[:, :, None, None], axis=1)


def prefill_layer(
    q, k, v, lengths, budget: int, capacity: int, groups: int, kv_quant=None, kv_quant_group=32
) -> LayerCache:
    """A layer's buffer after prefill: rows longer than `budget` keep R-KV's selection, the others all.

    q [B, P, Hq, D], k, v [B, P, Hkv, D] post-RoPE (position = index), lengths [B]. With kv_quant the
    selection reads the dequantized keys and the ring holds queries in their basis (kv_cache.py).
    """
    batch, seq = q.shape[:2]
    q_read, k_read = prompt_view(q, k, kv_quant, kv_quant_group)
    queries = window_queries(q_read, lengths)
    plain = jnp.arange(min(seq, budget), dtype=jnp.int32)[None, None, :]
    plain = jnp.where(plain < lengths[:, None, None], plain, -1)
    kept = jnp.broadcast_to(plain, (batch, groups, plain.shape[-1]))
    if seq > budget:  # traced only when some row may need it; applied where it does
        selected = kept_slots(queries, jnp.swapaxes(k_read, 1, 2), lengths, budget, groups)
        kept = jnp.where((lengths > budget)[:, None, None], selected, kept)
    return layer_from_kept(k, v, kept, capacity, kv_quant, kv_quant_group).replace(recent_queries=queries)


def _compress(layer: LayerCache, budget: int) -> LayerCache:
    """Compress every row of `layer` to its R-KV selection in slots [0, budget)."""
    batch, num_kv_heads, capacity = layer.k.shape[:3]
    groups = layer.slot_pos.shape[1]
    keys = dequantized_kv(layer)[0]
    kept = kept_slots(layer.recent_queries, keys, occupancy(layer), budget, groups)  # [B, G, budget]
    source = jnp.pad(kept, ((0, 0), (0, 0), (0, capacity - budget)))  # [B, G, C]
    stays = jnp.arange(capacity) < budget
    per_head = jnp.broadcast_to(source, (batch, num_kv_heads, capacity))

    def compact(x):
        picked = jnp.take_along_axis(x, per_head[..., None], axis=2)
        return jnp.where(stays[:, None], picked, jnp.zeros((), x.dtype))

    return layer.replace(
        k=compact(layer.k),
        v=compact(layer.v),
        slot_pos=jnp.where(stays, jnp.take_along_axis(layer.slot_pos, source, axis=-1), -1),
        **{name: compact(x) for name, x in quantized_fields(layer).items()},
    )


def _compress_row(layer: LayerCache, row, budget: int) -> LayerCache:
    """`layer` with batch row `row` (a traced index) compressed by `_compress`, the others as they are."""
    written = ("k", "v", "slot_pos", *quantized_fields(layer))  # what `_compress` changes
    row_of = {
        name: jax.lax.dynamic_slice_in_dim(getattr(layer, name), row, 1)
        for name in (*written, "recent_queries")
    }
    one = _compress(layer.replace(**row_of), budget)  # it reads no other field
    return layer.replace(
        **{
            name: jax.lax.dynamic_update_slice_in_dim(getattr(layer, name), getattr(one, name), row, 0)
            for name in written
        }
    )


def decode_update(layer: LayerCache, q, pos, budget: int) -> LayerCache:
    """After a decode step's attention: record the step's queries q [B, Hq, D] (position pos [B]; in the
    keys' basis, kv_cache.queries_for_keys) in the ring, compress the rows whose buffer is full, one at
    a time, and point evict_slot at each row's first empty slot.
    """
    batch = q.shape[0]
    ring = layer.recent_queries.at[jnp.arange(batch), pos % WINDOW].set(q.astype(layer.recent_queries.dtype))
    layer = layer.replace(recent_queries=ring)

    def compress_next(state):
        layer, pending = state
        row = jnp.argmax(pending)
        return _compress_row(layer, row, budget), pending.at[row].set(False)

    # A row's buffer fills once per rkv_buffer of its steps, and rows of different lengths fill at
    # different steps: compressing the full rows one at a time makes a step's O(Hkv * C^2 * D) work
    # proportional to the rows that are full (mostly none or one), not to the batch.
    full = occupancy(layer) == layer.capacity
    layer, _ = jax.lax.while_loop(lambda state: jnp.any(state[1]), compress_next, (layer, full))
    return layer.replace(evict_slot=jnp.broadcast_to(occupancy(layer)[:, None], layer.evict_slot.shape))
