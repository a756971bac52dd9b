"""ThinKV's building blocks (arXiv 2510.01290; docs/THINKV.md), as pure jnp functions that jit.

Thought types from attention sparsity (`attention_sparsity`, `classify`), the progressive-eviction
planner over a fixed-capacity segment table (`plan_levels`, `kept_tokens`), and the k-means choice of
the tokens a segment keeps (`kmeans_keep`). Shapes are fixed and no Python branches on traced values,
so each runs inside the jitted decode loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Thought-type codes. The code is the importance (R > E > T), so eviction takes the smallest code first.
TRANSITION, EXECUTION, REASONING = 0, 1, 2
DEFAULT_SCHEDULE = (64, 32, 16, 8, 4)  # tokens a segment keeps at each retention level
SPARSITY_REL = 0.01  # a weight below this fraction of its row's largest counts as sparse
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


def classify(sparsity, thresholds):
    """Thought type of each segment from its mean sparsity, which orders T > R > E.

    Args:
      sparsity: [...] float, the segments' mean sparsity.
      thresholds: (lo, hi), lo <= hi: below lo is EXECUTION, [lo, hi) REASONING, hi and above TRANSITION.
    Returns:
      [...] int32 codes (TRANSITION, EXECUTION, REASONING).
    """
    lo, hi = thresholds
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo > hi:
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


def _kmeans_keep_row(keys, valid, k: int, iters: int):
    """kmeans_keep for one segment: keys [n, D], valid [n] -> [k] int32."""
    n = keys.shape[0]
    x = keys.astype(jnp.float32)
    count = jnp.sum(valid, dtype=jnp.int32)
    valid_first = jnp.argsort(~valid, stable=True)  # the valid tokens, in index order, then the rest
    centroids = x[valid_first[(jnp.arange(k) * count) // k]]  # k evenly spaced valid tokens

    def distances(c):  # [n, k] squared Euclidean, as a difference (no cancellation)
        return jnp.sum(jnp.square(x[:, None, :] - c[None, :, :]), axis=-1)

    def lloyd_step(_, c):
        members = (jnp.argmin(distances(c), axis=-1)[:, None] == jnp.arange(k)) & valid[:, None]
        sizes = jnp.sum(members, axis=0)
        sums = jnp.einsum("nk,nd->kd", members.astype(jnp.float32), x, precision=_HIGHEST)
        return jnp.where(sizes[:, None] > 0, sums / jnp.maximum(sizes, 1)[:, None], c)  # empty: stays

    final = distances(jax.lax.fori_loop(0, iters, lloyd_step, centroids))
    final = jnp.where(valid[:, None], final, jnp.inf)

    def take_nearest_free(i, taken):
        free = jnp.where(taken, jnp.inf, final[:, i])
        t = jnp.argmin(free)
        return taken.at[t].set(taken[t] | (free[t] < jnp.inf))

    taken = jax.lax.fori_loop(0, k, take_nearest_free, jnp.zeros(n, bool))
    kept = jnp.sort(jnp.where(taken, jnp.arange(n), n))[:k]
    return jnp.where(kept < n, kept, -1).astype(jnp.int32)


def kmeans_keep(keys, valid, k: int, iters: int = 10):
    """The tokens a segment keeps: the real token nearest each of k k-means centroids of its keys.

    Lloyd's algorithm with a fixed number of iterations over the valid tokens, starting from k evenly
    spaced valid tokens (rank floor(j * m / k) of the m valid ones for centroid j); a token joins its
    nearest centroid (ties: the lower centroid), a centroid with no member stays where it is. Then
    centroid 0, 1, ... in turn takes its nearest valid token that no earlier centroid took (ties: the
    lower token index), so the kept tokens are distinct. With m <= k every valid token is kept.

    Args:
      keys: [..., n, D] post-RoPE keys of one segment per leading index.
      valid: [..., n] bool, the segment's real tokens.
      k: tokens to keep (the segment's retention target), static.
      iters: Lloyd iterations, static.
    Returns:
      [..., k] int32 kept token indices, ascending, padded with -1 where fewer than k tokens are valid.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    lead, (n, d) = keys.shape[:-2], keys.shape[-2:]
    rows = jax.vmap(lambda x, m: _kmeans_keep_row(x, m, k, iters))
    return rows(keys.reshape(-1, n, d), valid.reshape(-1, n)).reshape(*lead, k)
