"""ThinKV (arXiv 2510.01290; docs/THINKV.md): its building blocks, and the cache policy built on them.

Building blocks: thought types from attention sparsity (`attention_sparsity`, `classify`), the
progressive-eviction planner over a fixed-capacity segment table (`plan_levels`, `kept_tokens`), and the
k-means choice of the tokens a segment keeps (`kmeans_keep`).

The policy ("thinkv", `generate` with any attention_impl). Per layer, the main buffer (LayerCache k, v at
the model's dtype) holds the prompt in slots [0, P) and the segment being written, the window, in
[P, P + tau). Beside it (`LayerSegments`), one tier region per distinct precision of
ThinKVConfig.precisions, each of `tier_capacity` slots, and each classified segment's slots there. The
segment table (`SegmentTable`: types, levels, count) is shared by all layers. Each step `attend` reads
every buffer (through the fused kernels when given, one call per buffer merged by log-sum-exp) and adds
the step's attention sparsity on the layers L* (from jnp logits); once the window is full (every tau
steps, all rows at once), `close_full_segment` types the segment, plans the levels, re-clusters the
demoted segments (freeing the slots of the tokens k-means drops), moves the new segment's kept tokens
into the lowest free slots of its tier, and empties the window. Shapes are fixed and no Python branches
on traced values, so everything runs inside the jitted decode loop.
"""

from __future__ import annotations

import functools
import itertools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .config import CompressionConfig
from .kv_cache import (
    KVCache,
    LayerCache,
    dequantized_kv,
    empty_layer,
    free_slots,
    kv_scales,
    kv_valid,
    layer_from_kept,
    queries_for_keys,
    take_slots,
    write_slots,
)

# Thought-type codes. The code is the importance (R > E > T), so eviction takes the smallest code first.
TRANSITION, EXECUTION, REASONING = 0, 1, 2
DEFAULT_SCHEDULE = (64, 32, 16, 8, 4)  # tokens a segment keeps at each retention level
SPARSITY_REL = 0.01  # a weight below this fraction of its row's largest counts as sparse
KMEANS_TIE_RTOL = 1e-4  # kmeans_keep: squared distances this close (relative) to the nearest tie
_HIGHEST = jax.lax.Precision.HIGHEST


def attention_sparsity(probs, valid, rel: float = SPARSITY_REL):
    """The fraction of each row's valid weights below `rel` times the row's largest valid weight.

    Args:
      probs: [..., C] attention probabilities.
      valid: [..., C] bool, the entries that take part (an invalid entry counts neither way).
    Returns:
      [...] float32 in [0, 1]; 0 for a row with no valid entry. A step's sparsity is the mean over the
      calibrated layers and their query heads, and a segment's the mean over its steps: the caller's.
    """
    p = probs.astype(jnp.float32)
    row_max = jnp.max(jnp.where(valid, p, -jnp.inf), axis=-1, keepdims=True)
    below = jnp.sum(valid & (p < rel * row_max), axis=-1)
    return (below / jnp.maximum(jnp.sum(valid, axis=-1), 1)).astype(jnp.float32)


def logit_sparsity(logits, valid, rel: float = SPARSITY_REL):
    """`attention_sparsity` of softmax(logits) from the logits alone: a weight is below `rel` times
    its row's largest exactly where its logit is below the row's largest plus log(rel)."""
    row_max = jnp.max(jnp.where(valid, logits, -jnp.inf), axis=-1, keepdims=True)
    below = jnp.sum(valid & (logits < row_max + math.log(rel)), axis=-1)
    return (below / jnp.maximum(jnp.sum(valid, axis=-1), 1)).astype(jnp.float32)


def classify(sparsity, thresholds):
    """Thought type of each segment from its mean sparsity, which orders T > R > E.

    Args:
      sparsity: [...] float, the segments' mean sparsity.
      thresholds: (lo, hi), lo <= hi: below lo is EXECUTION, [lo, hi) REASONING, hi and above TRANSITION.
    Returns:
      [...] int32 codes (TRANSITION, EXECUTION, REASONING).
    """
    lo, hi = thresholds
    if not any(isinstance(t, jax.core.Tracer) for t in (lo, hi)) and np.any(np.asarray(lo) > np.asarray(hi)):
        raise ValueError(f"thresholds must be (lo, hi) with lo <= hi, got {thresholds!r}")
    code = jnp.where(sparsity < lo, EXECUTION, jnp.where(sparsity < hi, REASONING, TRANSITION))
    return code.astype(jnp.int32)


def kept_tokens(levels, num_tokens, schedule=DEFAULT_SCHEDULE):
    """[...] int32: tokens each segment keeps, schedule[level] capped by the tokens it holds."""
    return jnp.minimum(jnp.asarray(schedule, jnp.int32)[levels], num_tokens).astype(jnp.int32)


def plan_levels(types, levels, starts, num_tokens, newest, budget, schedule=DEFAULT_SCHEDULE):
    """The segments' retention levels after segment `newest` has been classified (ThinKV's TBE).

    One row's segment table of S entries; vmap it for a batch.
      1. If `newest` is a TRANSITION segment, every older segment steps down one level.
      2. Then, while the kept total exceeds `budget`, one segment steps down one level: among those
         above the last level, the least important type (T, then E, then R), the oldest of that type
         (smallest start; equal starts: lowest table index).
    No level goes past the last, so the total stays above `budget` only where every segment is there.

    Args:
      types: [S] int32 thought-type codes.
      levels: [S] int32 indices into `schedule`.
      starts: [S] int32 each segment's first position; smaller is older.
      num_tokens: [S] int32 tokens each segment holds; 0 marks an empty entry, which never changes.
      newest: int32 scalar, the table index of the segment just classified.
      budget: int scalar, the most tokens the table's segments keep together.
      schedule: tokens kept per level, decreasing (static).
    Returns:
      [S] int32 levels, none below the old ones.
    """
    last = len(schedule) - 1
    filled = num_tokens > 0
    trajectory_change = types[newest] == TRANSITION
    older = filled & (starts < starts[newest])
    levels = jnp.where(trajectory_change & older, jnp.minimum(levels + 1, last), levels).astype(jnp.int32)
    never = jnp.iinfo(jnp.int32).max

    def demotable(lv):
        return filled & (lv < last)

    def over_budget(lv):
        return (jnp.sum(kept_tokens(lv, num_tokens, schedule)) > budget) & jnp.any(demotable(lv))

    def demote_one(lv):
        can = demotable(lv)
        weakest = can & (types == jnp.min(jnp.where(can, types, never)))
        oldest = weakest & (starts == jnp.min(jnp.where(weakest, starts, never)))
        return lv.at[jnp.argmax(oldest)].add(1)

    return jax.lax.while_loop(over_budget, demote_one, levels)


def _kmeans_keep_row(keys, valid, k: int, iters: int, clusters):
    """kmeans_keep for one segment: keys [n, D], valid [n], clusters <= k -> [k] int32."""
    n = keys.shape[0]
    x = keys.astype(jnp.float32)
    count = jnp.sum(valid, dtype=jnp.int32)
    active = jnp.arange(k) < clusters  # centroids past `clusters` take part in nothing
    valid_first = jnp.argsort(~valid, stable=True)  # the valid tokens, in index order, then the rest
    ranks = jnp.minimum((jnp.arange(k) * count) // clusters, n - 1)
    centroids = x[valid_first[ranks]]  # `clusters` evenly spaced valid tokens

    def distances(c):  # [n, k] squared Euclidean, as a difference (no cancellation); inf to inactive ones
        d = jnp.sum(jnp.square(x[:, None, :] - c[None, :, :]), axis=-1)
        return jnp.where(active[None, :], d, jnp.inf)

    def lloyd_step(_, c):
        members = (jnp.argmin(distances(c), axis=-1)[:, None] == jnp.arange(k)) & valid[:, None]
        sizes = jnp.sum(members, axis=0)
        sums = jnp.einsum("nk,nd->kd", members.astype(jnp.float32), x, precision=_HIGHEST)
        return jnp.where(sizes[:, None] > 0, sums / jnp.maximum(sizes, 1)[:, None], c)  # empty: stays

    final = distances(jax.lax.fori_loop(0, iters, lloyd_step, centroids))
    final = jnp.where(valid[:, None], final, jnp.inf)

    def take_nearest_free(i, taken):
        free = jnp.where(taken, jnp.inf, final[:, i])
        nearest = jnp.min(free)
        t = jnp.argmax(free <= nearest * (1 + KMEANS_TIE_RTOL))  # the lowest index among the tied
        return taken.at[t].set(taken[t] | (free[t] < jnp.inf))

    taken = jax.lax.fori_loop(0, k, take_nearest_free, jnp.zeros(n, bool))
    kept = jnp.sort(jnp.where(taken, jnp.arange(n), n))[:k]
    return jnp.where(kept < n, kept, -1).astype(jnp.int32)


def kmeans_keep(keys, valid, k: int, iters: int = 10, clusters=None):
    """The tokens a segment keeps: the real token nearest each of k k-means centroids of its keys.

    Lloyd's algorithm with a fixed number of iterations over the valid tokens, starting from k evenly
    spaced valid tokens (rank floor(j * m / k) of the m valid ones for centroid j); a token joins its
    nearest centroid (ties: the lower centroid), a centroid with no member stays where it is. Then
    centroid 0, 1, ... in turn takes its nearest valid token that no earlier centroid took, so the kept
    tokens are distinct. Squared distances within KMEANS_TIE_RTOL (relative) of the nearest tie, and the
    tie goes to the lower token index: a two-member cluster's centroid is their midpoint, equally far
    from both, and float32 rounding alone would pick one, so a last-bit difference in the keys (a
    kernel's against the reference's) would change what the segment keeps. With m <= k every valid
    token is kept.

    Args:
      keys: [..., n, D] post-RoPE keys of one segment per leading index.
      valid: [..., n] bool, the segment's real tokens.
      k: tokens to keep (the segment's retention target), static.
      iters: Lloyd iterations, static.
      clusters: None, or [...] int in [1, k] (traced): run with that many clusters instead, as
        kmeans_keep(..., k=clusters) would, padded with -1 to k.
    Returns:
      [..., k] int32 kept token indices, ascending, padded with -1 where fewer than k tokens are valid.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if clusters is not None and not isinstance(clusters, jax.core.Tracer):
        bad = np.asarray(clusters)[(np.asarray(clusters) < 1) | (np.asarray(clusters) > k)]
        if bad.size:
            raise ValueError(f"clusters must be in [1, k={k}], got {int(bad.flat[0])}")
    lead, (n, d) = keys.shape[:-2], keys.shape[-2:]
    if k > n:  # every valid token is kept (m <= n < k): k-means over n clusters at most, padded to k
        kept = jnp.full((*lead, 0), -1, jnp.int32)
        if n:
            fewer = None if clusters is None else jnp.minimum(jnp.asarray(clusters, jnp.int32), n)
            kept = kmeans_keep(keys, valid, n, iters, fewer)
        return jnp.pad(kept, [(0, 0)] * len(lead) + [(0, k - n)], constant_values=-1)
    clusters = jnp.broadcast_to(jnp.asarray(k if clusters is None else clusters, jnp.int32), lead)
    rows = jax.vmap(lambda x, m, c: _kmeans_keep_row(x, m, k, iters, c))
    return rows(keys.reshape(-1, n, d), valid.reshape(-1, n), clusters.reshape(-1)).reshape(*lead, k)


# ---- the cache policy ----


@flax.struct.dataclass
class LayerSegments:
    """A layer's ThinKV state beside its main buffer (LayerCache.thinkv).

    tiers: one-group buffers of tier_capacity slots, one per `tier_kinds`, quantized at that kind.
    segment_slots: [B, S, schedule[0]] int32, the tier slots of each segment's kept tokens, -1 after them.
    sparsity_sum: [B] float32, the window's summed step sparsity (mean over this layer's query heads);
      None on a layer outside L*.
    """

    tiers: list[LayerCache]
    segment_slots: jax.Array
    sparsity_sum: jax.Array | None


@flax.struct.dataclass
class SegmentTable:
    """The classified segments, in order (segment j holds generated tokens [j * tau, (j + 1) * tau)).

    types, levels: [B, S] int32 thought-type codes and retention levels (0 for unused entries).
    count: [B] int32 segments classified so far; rows advance in lockstep, so it is the same in every row.
    """

    types: jax.Array
    levels: jax.Array
    count: jax.Array


def num_segments(tau: int, max_new_tokens: int) -> int:
    """Segments a run classifies: the decode loop writes max_new_tokens - 1 tokens (the last is only
    sampled), and only full segments are classified."""
    return (max_new_tokens - 1) // tau


def tier_capacity(compression: CompressionConfig, max_new_tokens: int) -> int:
    """Slots per tier region: the most tokens the classified segments keep together. The planner keeps
    the total within the budget unless every segment is at the floor, and no segment keeps more than
    schedule[0]; any one tier may hold all of them."""
    cfg = compression.thinkv
    segments = num_segments(cfg.tau, max_new_tokens)
    return min(max(compression.budget, cfg.schedule[-1] * segments), cfg.schedule[0] * segments)


def tier_kinds(cfg) -> tuple:
    """The distinct kv_quant kinds of ThinKVConfig.precisions (None: the model's dtype), one tier each."""
    return tuple(dict.fromkeys(cfg.type_precisions))


def _tier_of_type(cfg):
    """[3] int32: the tier index of each thought-type code."""
    kinds = tier_kinds(cfg)
    return jnp.asarray([kinds.index(kind) for kind in cfg.type_precisions], jnp.int32)


def prefill_layer(k, v, lengths, capacity: int) -> LayerCache:
    """A layer's main buffer after prefill: every prompt token at the model's dtype in slots [0, P), the
    window [P, capacity) empty. k, v [B, P, Hkv, D] post-RoPE (position = index), lengths [B]."""
    batch, prompt_len = k.shape[:2]
    positions = jnp.arange(prompt_len, dtype=jnp.int32)[None, None, :]
    kept = jnp.where(positions < lengths[:, None, None], positions, -1)
    layer = layer_from_kept(k, v, kept, capacity)
    return layer.replace(evict_slot=jnp.full((batch, 1), prompt_len, jnp.int32))


def attach(cache: KVCache, compression: CompressionConfig, max_new_tokens: int) -> KVCache:
    """The prefilled cache with empty tier regions, segment slots and segment table."""
    cfg = compression.thinkv
    sparsity_layers, _ = cfg.calibrated(len(cache.layers))
    segments, capacity = num_segments(cfg.tau, max_new_tokens), tier_capacity(compression, max_new_tokens)
    batch, num_kv_heads, _, head_dim = cache.layers[0].k.shape
    layers = []
    for i, layer in enumerate(cache.layers):
        tiers = [
            empty_layer(
                batch, num_kv_heads, capacity, head_dim, layer.k.dtype, kind, compression.kv_quant_group
            )
            for kind in tier_kinds(cfg)
        ]
        state = LayerSegments(
            tiers=tiers,
            segment_slots=jnp.full((batch, segments, cfg.schedule[0]), -1, jnp.int32),
            sparsity_sum=jnp.zeros(batch, jnp.float32) if i in sparsity_layers else None,
        )
        layers.append(layer.replace(thinkv=state))
    table = jnp.zeros((batch, segments), jnp.int32)
    return KVCache(layers=layers, segments=SegmentTable(table, table, jnp.zeros(batch, jnp.int32)))


def merge_attention(outs, lses):
    """Attention over several buffers from each one's: out_i [B, Hq, D] weighted by softmax over the
    buffers of lse_i [B, Hq] (the log of buffer i's softmax denominator, -inf where it has no valid
    slot, which then weighs 0). Returns [B, Hq, D] float32."""
    lse = jnp.stack(lses)  # [N, B, Hq]
    peak = jnp.max(lse, axis=0)
    weight = jnp.exp(lse - jnp.where(jnp.isfinite(peak), peak, 0.0))
    weight = weight / jnp.maximum(jnp.sum(weight, axis=0), jnp.finfo(jnp.float32).tiny)
    return sum(w[..., None] * out.astype(jnp.float32) for w, out in zip(weight, outs))


def _attend_by_kernel(q, layer: LayerCache, scale, kernel):
    """`attend`'s output through a decode kernel, one call per buffer at its own precision, merged by
    log-sum-exp (`merge_attention`). Filled slots need not be a prefix (a short prompt's row leaves a
    gap before the window; a tier's are a set), so the kernel reads each buffer up to its highest filled
    slot: tiers fill their lowest free slots first, so that bound stays near what they hold."""
    outs, lses = [], []
    for buffer in [layer, *layer.thinkv.tiers]:
        valid = kv_valid(buffer)
        kv_len = jnp.max(jnp.where(valid, jnp.arange(1, buffer.capacity + 1), 0), axis=-1).astype(jnp.int32)
        kw = dict(scale=scale, granularity="sequence", compute_evict=False, return_lse=True, kv_len=kv_len)
        q_buffer = q
        if buffer.kv_quant is not None:  # rotated queries back in the model's dtype, as the kernels take
            q_buffer = queries_for_keys(buffer, q).astype(q.dtype)
            kw.update(kv_quant=buffer.kv_quant, kv_scales=kv_scales(buffer))
        out, _, lse = kernel(q_buffer, buffer.k, buffer.v, valid, **kw)
        outs.append(out)
        lses.append(lse)
    return merge_attention(outs, lses)


# Slots per block where the jnp path reads a buffer: one block's float32 K or V at a time, in a loop.
JNP_BLOCK_SLOTS = 256


def _slot_blocks(buffer: LayerCache):
    """(number of blocks, slots per block) of a buffer for the blocked jnp read."""
    block = min(JNP_BLOCK_SLOTS, buffer.capacity)
    return -(-buffer.capacity // block), block


def _block_kv(buffer: LayerCache, i, block: int):
    """Slots [i * block, (i + 1) * block) of a buffer as `dequantized_kv` reads them, float32
    [B, Hkv, block, D] each; slots past the capacity read the last slot (the caller masks them)."""
    slots = jnp.minimum(i * block + jnp.arange(block), buffer.capacity - 1)
    k, v = dequantized_kv(take_slots(buffer, jnp.broadcast_to(slots, (buffer.k.shape[0], block))))
    return k.astype(jnp.float32), v.astype(jnp.float32)


def _blocked_logits(qg, buffer: LayerCache, scale):
    """qg [B, Hkv, G, D] (float32, in the buffer's key basis) against every slot of the buffer:
    [B, Hkv, G, C] float32, read block by block."""
    blocks, block = _slot_blocks(buffer)

    def one(_, i):
        k, _ = _block_kv(buffer, i, block)
        return None, jnp.einsum("bkgd,bkcd->bkgc", qg, k, precision=_HIGHEST) * scale

    _, logits = jax.lax.scan(one, None, jnp.arange(blocks))  # [blocks, B, Hkv, G, block]
    logits = jnp.moveaxis(logits, 0, 3)
    return logits.reshape(*logits.shape[:3], blocks * block)[..., : buffer.capacity]


def _blocked_weighted_values(p, buffer: LayerCache, head_dim: int):
    """p [B, Hkv, G, C] @ the buffer's values: [B, Hkv, G, D] float32, read block by block."""
    blocks, block = _slot_blocks(buffer)
    pad = blocks * block - buffer.capacity
    p = jnp.pad(p, [(0, 0)] * 3 + [(0, pad)]).reshape(*p.shape[:3], blocks, block)

    def one(acc, i):
        _, v = _block_kv(buffer, i, block)
        p_block = jax.lax.dynamic_index_in_dim(p, i, axis=3, keepdims=False)
        return acc + jnp.einsum("bkgc,bkcd->bkgd", p_block, v, precision=_HIGHEST), None

    zero = jnp.zeros((*p.shape[:3], head_dim), jnp.float32)  # buffer.k holds packed codes
    return jax.lax.scan(one, zero, jnp.arange(blocks))[0]


def _all_logits(q, buffers, scale):
    """q [B, Hq, D] against every slot of the buffers, each in its own key basis: ([B, Hkv, G, slots]
    float32 logits, -inf at an empty slot; [B, slots] valid), read block by block."""
    batch, _, head_dim = q.shape
    num_kv_heads = buffers[0].k.shape[1]
    logits = []
    for buffer in buffers:
        qg = queries_for_keys(buffer, q).astype(jnp.float32).reshape(batch, num_kv_heads, -1, head_dim)
        logits.append(_blocked_logits(qg, buffer, scale))
    valid = jnp.concatenate([kv_valid(buffer) for buffer in buffers], axis=-1)
    return jnp.where(valid[:, None, None, :], jnp.concatenate(logits, axis=-1), -jnp.inf), valid


def attend(q, layer: LayerCache, scale, kernel=None):
    """Attention of q [B, Hq, D] (its token already written into the window) over the main buffer and
    every tier, each read at its own precision; returns (out [B, Hq, D] f32, the layer with the next
    window slot and, on L*, the step's sparsity added).

    kernel: None, or a decode kernel of pallas_kernels' contract taking return_lse (attention._kernel's),
    which then gives every layer's output (`_attend_by_kernel`); a layer in L* adds its sparsity from
    the logits alone, in jnp (`logit_sparsity`): the values are not read twice. Without a kernel every
    layer reads every buffer in jnp. The jnp reads go in blocks of JNP_BLOCK_SLOTS slots inside a loop:
    a float32 copy of a whole buffer depends only on the cache, so XLA could make every layer's at once
    and hold them together.
    """
    batch, num_q_heads, head_dim = q.shape
    buffers = [layer, *layer.thinkv.tiers]
    state = layer.thinkv
    if kernel is not None:
        out = _attend_by_kernel(q, layer, scale, kernel)
        if state.sparsity_sum is not None:
            logits, valid = _all_logits(q, buffers, scale)
            step = logit_sparsity(logits, valid[:, None, None, :]).reshape(batch, num_q_heads).mean(axis=-1)
            state = state.replace(sparsity_sum=state.sparsity_sum + step)
        return out, layer.replace(evict_slot=layer.evict_slot + 1, thinkv=state)
    logits, valid = _all_logits(q, buffers, scale)
    probs = jax.nn.softmax(logits, axis=-1)  # the new token's slot is always valid
    bounds = [0, *itertools.accumulate(buffer.capacity for buffer in buffers)]
    out = sum(
        _blocked_weighted_values(probs[..., lo:hi], buffer, head_dim)
        for lo, hi, buffer in zip(bounds, bounds[1:], buffers)
    )
    if state.sparsity_sum is not None:
        step = attention_sparsity(probs.reshape(batch, num_q_heads, -1), valid[:, None, :]).mean(axis=-1)
        state = state.replace(sparsity_sum=state.sparsity_sum + step)
    return out.reshape(batch, num_q_heads, head_dim), layer.replace(
        evict_slot=layer.evict_slot + 1, thinkv=state
    )


def check_segment_room(cache: KVCache) -> None:
    """Before a decode step on a concrete cache: if the step fills the window, the segment table (sized by
    `attach`'s max_new_tokens) has an entry for the segment it closes; past it the segment's tokens
    would be dropped."""
    first, table = cache.layers[0], cache.segments
    if any(isinstance(x, jax.core.Tracer) for x in (first.evict_slot, table.count)):
        return
    closes = int(np.asarray(first.evict_slot)[0, 0]) + 1 >= first.capacity
    segments = table.types.shape[1]
    if closes and int(np.max(np.asarray(table.count))) >= segments:
        raise ValueError(
            f"the ThinKV cache's segment table holds {segments} segments, all closed, and this step would "
            f"close another: attach (generate.ready_to_decode) sizes it for max_new_tokens; make the cache "
            f"for more new tokens"
        )


def close_full_segment(cache: KVCache, compression: CompressionConfig) -> KVCache:
    """After a decode step: once the window holds tau tokens, classify it and compress (`_close_segment`);
    otherwise the cache as it is. Rows advance in lockstep, so one scalar decides for all."""
    first = cache.layers[0]
    full = first.evict_slot[0, 0] == first.capacity
    return jax.lax.cond(full, functools.partial(_close_segment, compression=compression), lambda c: c, cache)


def _close_segment(cache: KVCache, compression: CompressionConfig) -> KVCache:
    """Type the full window's segment, plan every level, and compress each layer (`_compress_layers`)."""
    cfg = compression.thinkv
    _, thresholds = cfg.calibrated(len(cache.layers))
    measured = [layer.thinkv.sparsity_sum for layer in cache.layers if layer.thinkv.sparsity_sum is not None]
    sparsity = sum(measured) / (len(measured) * cfg.tau)
    table = cache.segments
    batch, segments = table.types.shape
    rows, newest = jnp.arange(batch), table.count
    types = table.types.at[rows, newest].set(classify(sparsity, thresholds))
    num_tokens = jnp.where(jnp.arange(segments)[None, :] <= newest[:, None], cfg.tau, 0).astype(jnp.int32)
    starts = jnp.broadcast_to(jnp.arange(segments, dtype=jnp.int32), (batch, segments))
    plan = functools.partial(plan_levels, budget=compression.budget, schedule=cfg.schedule)
    levels = jax.vmap(plan)(types, table.levels, starts, num_tokens, newest)
    layers = _compress_layers(cache.layers, types, table.levels, levels, newest, cfg)
    return KVCache(layers=layers, segments=SegmentTable(types=types, levels=levels, count=newest + 1))


def _segment_keys(buffer: LayerCache, slots):
    """[B, n, Hkv * D] float32: the keys at slots [B, n] of a one-group buffer, as k-means reads them
    (rotated in a quantized tier: a rotation keeps distances)."""
    k = dequantized_kv(take_slots(buffer, slots))[0].astype(jnp.float32)  # [B, Hkv, n, D]
    return jnp.swapaxes(k, 1, 2).reshape(*slots.shape, -1)


def _kmeans_over_layers(keys, valid, k: int, clusters):
    """kmeans_keep over every layer's keys [B, n, F] (a list) in one call, so the decode loop compiles
    one k-means, not one per layer; clusters [B]. Returns [L, B, k]."""
    keys, valid = jnp.stack(keys), jnp.stack(valid)
    return kmeans_keep(keys, valid, k=k, clusters=jnp.broadcast_to(clusters, valid.shape[:2]))


def _compress_layers(layers, types, old_levels, levels, newest, cfg) -> list[LayerCache]:
    """The layers' part of `_close_segment`: demoted segments first (they only free slots), then the new
    segment into its tier, then the window emptied."""
    tier_of = _tier_of_type(cfg)
    batch, segments, entry = layers[0].thinkv.segment_slots.shape
    rows = jnp.arange(batch)

    def kept(lv):
        return kept_tokens(lv, cfg.tau, cfg.schedule)

    def demote(j, carry):
        stepped = (levels[:, j] != old_levels[:, j]) & (j < newest)  # [B]
        tier = tier_of[types[:, j]]  # [B]

        def recluster(carry):
            slots = [table[:, j] for _, table in carry]  # per layer [B, E]
            keys = [
                sum(
                    jnp.where((tier == t)[:, None, None], _segment_keys(b, s), 0.0)
                    for t, b in enumerate(tiers)
                )
                for (tiers, _), s in zip(carry, slots)
            ]
            keep = _kmeans_over_layers(keys, [s >= 0 for s in slots], entry, kept(levels[:, j]))
            out = []
            for (tiers, table), s, kp in zip(carry, slots, keep):
                new = jnp.where(kp >= 0, jnp.take_along_axis(s, jnp.maximum(kp, 0), axis=1), -1)
                new = jnp.where(stepped[:, None], new, s)
                dropped = (s >= 0) & ~jnp.any(s[:, :, None] == new[:, None, :], axis=-1)
                tiers = [
                    free_slots(b, jnp.where(dropped & (tier == t)[:, None], s, b.capacity))
                    for t, b in enumerate(tiers)
                ]
                out.append((tiers, table.at[:, j].set(new)))
            return out

        return jax.lax.cond(jnp.any(stepped), recluster, lambda c: c, carry)

    carry = [(layer.thinkv.tiers, layer.thinkv.segment_slots) for layer in layers]
    carry = jax.lax.fori_loop(0, segments, demote, carry)

    # The new segment: its kept window tokens go to the lowest free slots of its tier.
    start = layers[0].capacity - cfg.tau
    windows = [
        layer.replace(k=layer.k[:, :, start:], v=layer.v[:, :, start:], slot_pos=layer.slot_pos[:, :, start:])
        for layer in layers
    ]
    window_slots = jnp.broadcast_to(jnp.arange(cfg.tau), (batch, cfg.tau))
    keep = _kmeans_over_layers(
        [_segment_keys(w, window_slots) for w in windows], [kv_valid(w) for w in windows], entry,
        kept(levels[rows, newest]),
    )  # fmt: skip
    tier = tier_of[types[rows, newest]]
    out = []
    for layer, window, (tiers, table), kp in zip(layers, windows, carry, keep):
        picked = take_slots(window, kp)
        dest, new_tiers = jnp.full((batch, entry), -1, jnp.int32), []
        for t, buffer in enumerate(tiers):
            free = jax.vmap(functools.partial(jnp.nonzero, size=entry, fill_value=buffer.capacity))
            free = free(~kv_valid(buffer))[0]
            mine = (kp >= 0) & (tier == t)[:, None]
            slots = jnp.where(mine, free, buffer.capacity)
            new_tiers.append(write_slots(buffer, picked.k, picked.v, picked.slot_pos[:, 0], slots))
            dest = jnp.where(mine, free, dest)
        state = layer.thinkv
        state = state.replace(
            tiers=new_tiers,
            segment_slots=table.at[rows, newest].set(dest),
            sparsity_sum=None if state.sparsity_sum is None else jnp.zeros_like(state.sparsity_sum),
        )
        out.append(
            layer.replace(
                slot_pos=layer.slot_pos.at[:, :, start:].set(-1),
                evict_slot=jnp.full_like(layer.evict_slot, start),
                thinkv=state,
            )
        )
    return out
