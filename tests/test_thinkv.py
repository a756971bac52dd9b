"""thinkv: sparsity, classification, the eviction planner and the k-means selection against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longflow_jax import thinkv
from longflow_jax.thinkv import EXECUTION, REASONING, TRANSITION

T, E, R = TRANSITION, EXECUTION, REASONING
SCHEDULE = thinkv.DEFAULT_SCHEDULE
TAU = 128
S = 12  # segment table entries
# Jitted once per shape: the planner's loop and Lloyd's iterations run op by op otherwise.
attention_sparsity = jax.jit(thinkv.attention_sparsity)
classify = jax.jit(thinkv.classify)
plan_levels = jax.jit(thinkv.plan_levels)
kmeans_keep = jax.jit(thinkv.kmeans_keep, static_argnames=("k", "iters"))


def numpy_sparsity(probs, valid, rel=0.01):
    out = np.zeros(probs.shape[:-1])
    for idx in np.ndindex(*probs.shape[:-1]):
        row = probs[idx][valid[idx]]
        out[idx] = np.mean(row < rel * row.max()) if row.size else 0.0
    return out


def test_sparsity_matches_numpy():
    """Rows with a known share of tiny weights; invalid entries larger than any valid one are ignored."""
    rng = np.random.default_rng(0)
    shape, c = (4, 3, 5), 40
    logits = rng.standard_normal((*shape, c)) * rng.choice([0.5, 4.0, 12.0], size=(*shape, 1))
    valid = rng.random((*shape, c)) < 0.8
    valid[0, 0, 0] = False  # a row with no valid entry
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    probs = np.where(valid, probs, 5.0)
    got = np.asarray(attention_sparsity(jnp.asarray(probs, jnp.float32), jnp.asarray(valid)))
    want = numpy_sparsity(probs, valid)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got[0, 0, 0] == 0.0
    assert want.min() < 0.1 and want.max() > 0.5  # the rows span sparse and dense


def test_sparsity_hand_checked():
    """A weight of exactly 1% of the row's max is not below it; the masked 9.0 is not the max."""
    probs = jnp.asarray([[0.5, 0.005, 0.004, 0.2, 9.0]], jnp.float32)
    valid = jnp.asarray([[True, True, True, True, False]])
    np.testing.assert_allclose(attention_sparsity(probs, valid), [0.25])


def test_logit_sparsity_is_the_sparsity_of_the_softmax():
    """From the logits alone: numpy's count over the softmax's probabilities (rows away from the 1%
    boundary), with invalid entries, larger than any valid one, ignored."""
    rng = np.random.default_rng(2)
    shape, c = (4, 3, 5), 40
    logits = rng.standard_normal((*shape, c)) * rng.choice([0.5, 4.0, 12.0], size=(*shape, 1))
    valid = rng.random((*shape, c)) < 0.8
    valid[0, 0, 0] = False
    masked = np.where(valid, logits, -np.inf)
    probs = np.exp(masked - masked.max(-1, keepdims=True))
    probs = np.where(valid, probs / probs.sum(-1, keepdims=True), 0.0)
    gap = np.abs(probs / np.where(valid, probs, 0).max(-1, keepdims=True) - 0.01)
    assert gap[valid].min() > 1e-5  # no weight sits on the boundary
    got = np.asarray(
        jax.jit(thinkv.logit_sparsity)(jnp.asarray(np.where(valid, logits, 50.0), jnp.float32), valid)
    )
    np.testing.assert_allclose(got, numpy_sparsity(probs, valid), atol=1e-6)
    assert got[0, 0, 0] == 0.0


def test_classify_matches_numpy():
    rng = np.random.default_rng(1)
    lo, hi = 0.3, 0.7
    sparsity = np.concatenate([rng.random(60), [lo, hi, 0.0, 1.0]]).astype(np.float32)
    got = np.asarray(classify(jnp.asarray(sparsity), (lo, hi)))
    want = [E if s < np.float32(lo) else R if s < np.float32(hi) else T for s in sparsity]
    np.testing.assert_array_equal(got, want)
    assert set(got.tolist()) == {T, E, R}


def test_classify_rejects_inverted_thresholds():
    with pytest.raises(ValueError, match="lo <= hi"):
        thinkv.classify(jnp.zeros(3), (0.7, 0.3))
    with pytest.raises(ValueError, match="lo <= hi"):  # concrete arrays too (0.5 was typed EXECUTION)
        thinkv.classify(jnp.zeros(3), (jnp.float32(0.9), jnp.float32(0.1)))


@pytest.mark.parametrize("clusters", [0, 5, [1, 4]])
def test_kmeans_keep_rejects_clusters_outside_one_to_k(clusters):
    # 0 kept nothing, 5 > k gave k outputs seeded as if for 5 clusters.
    keys = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 4)), jnp.float32)
    with pytest.raises(ValueError, match=r"clusters must be in \[1, k=3\]"):
        thinkv.kmeans_keep(keys, jnp.ones((2, 8), bool), k=3, clusters=jnp.asarray(clusters))


IMPORTANCE = {T: 0, E: 1, R: 2}  # evicted first to last


def numpy_plan(types, levels, starts, num_tokens, newest, budget):
    """The planner's rules, one segment at a time in plain Python."""
    levels = list(levels)
    last = len(SCHEDULE) - 1
    filled = [n > 0 for n in num_tokens]
    if types[newest] == T:
        for i in range(len(levels)):
            if filled[i] and starts[i] < starts[newest]:
                levels[i] = min(levels[i] + 1, last)

    def total():
        return sum(min(SCHEDULE[lv], n) for lv, n in zip(levels, num_tokens))

    while total() > budget:
        candidates = [i for i in range(len(levels)) if filled[i] and levels[i] < last]
        if not candidates:
            break
        levels[min(candidates, key=lambda i: (IMPORTANCE[types[i]], starts[i], i))] += 1
    return levels


def _plan(types, levels, starts, num_tokens, newest, budget):
    args = [jnp.asarray(a, jnp.int32) for a in (types, levels, starts, num_tokens)]
    return np.asarray(plan_levels(*args, jnp.int32(newest), jnp.int32(budget)))


def test_plan_hand_checked():
    """R, E, then a new T: R and E step down to 32 each; 32 + 32 + 64 is over 100, so T (the weakest)
    steps down to 32."""
    pad = S - 3
    got = _plan([R, E, T] + [0] * pad, [0] * S, [0, 128, 256] + [0] * pad, [128] * 3 + [0] * pad, 2, 100)
    np.testing.assert_array_equal(got[:3], [1, 1, 1])
    np.testing.assert_array_equal(got[3:], 0)


@pytest.mark.parametrize(
    "script, budget",
    [("REETRETERRTE", 200), ("EERRTRREEETR", 90), ("TTTTTEEEERRR", 40), ("RRRRRRRRRRRR", 30)],
)
def test_plan_scripted_sequence_matches_numpy(script, budget):
    """Segments arrive one by one (the last one partial); after each, the planner matches numpy, meets
    the budget unless every segment is at the floor, never goes below it, and demotes in order."""
    code = {"T": T, "E": E, "R": R}
    types, levels, starts, num_tokens = [0] * S, [0] * S, [0] * S, [0] * S
    last = len(SCHEDULE) - 1
    for i, letter in enumerate(script):
        types[i], levels[i], starts[i] = code[letter], 0, i * TAU
        num_tokens[i] = TAU if i < len(script) - 1 else 40
        want = numpy_plan(types, levels, starts, num_tokens, i, budget)
        got = _plan(types, levels, starts, num_tokens, i, budget)
        np.testing.assert_array_equal(got, want, err_msg=f"after segment {i} ({script[: i + 1]})")
        assert got.max() <= last and (got >= np.asarray(levels)).all()
        stepped = [min(lv + 1, last) if code[letter] == T and j < i else lv for j, lv in enumerate(levels)]
        for j in np.flatnonzero(got > np.asarray(stepped)):  # demoted for the budget: weaker ones first
            weaker = [
                h
                for h in range(i + 1)
                if (IMPORTANCE[types[h]], starts[h]) < (IMPORTANCE[types[j]], starts[j])
            ]
            assert all(got[h] == last for h in weaker), (i, j, got)
        kept = np.minimum(np.asarray(SCHEDULE)[got], num_tokens).sum()
        filled = np.asarray(num_tokens) > 0
        assert kept <= budget or (got[filled] == last).all()
        np.testing.assert_array_equal(
            thinkv.kept_tokens(jnp.asarray(got), jnp.asarray(num_tokens)).sum(), kept
        )
        levels = got.tolist()


def numpy_kmeans_keep(keys, valid, k, iters, tie_rtol=thinkv.KMEANS_TIE_RTOL):
    """Lloyd's loop in float64 with the same start and the same rules (kmeans_keep's docstring): a
    centroid's free tokens within tie_rtol (relative, squared distances) of its nearest are tied, and
    the lowest index among them is kept.

    Also returns the smallest relative distance of a free token's squared distance from that tie
    bound: near 0, float32 may put the token on either side.
    """
    x = np.asarray(keys, np.float64)
    idx = np.flatnonzero(valid)
    m = idx.size
    if m == 0:
        return np.full(k, -1), np.inf
    c = x[idx[[j * m // k for j in range(k)]]]
    for _ in range(iters):
        d = ((x[idx, None, :] - c[None]) ** 2).sum(-1)
        assign = d.argmin(-1)
        c = np.stack([x[idx[assign == j]].mean(0) if (assign == j).any() else c[j] for j in range(k)])
    d = ((x[idx, None, :] - c[None]) ** 2).sum(-1)
    taken, gap = [], np.inf
    for j in range(k):
        free = [t for t in range(m) if idx[t] not in taken]
        if free:
            bound = min(d[t, j] for t in free) * (1 + tie_rtol)
            taken.append(idx[min(t for t in free if d[t, j] <= bound)])
            gap = min([gap] + [abs(d[t, j] - bound) / bound for t in free if bound > 0])
    return np.array(sorted(taken) + [-1] * (k - len(taken))), gap


def _clustered_keys(rng, lead, n, d, clusters):
    centres = 6 * rng.standard_normal((*lead, clusters, d))
    which = rng.integers(0, clusters, size=(*lead, n))
    return np.take_along_axis(centres, which[..., None], axis=-2) + rng.standard_normal((*lead, n, d))


def test_kmeans_keep_matches_numpy_lloyd():
    """Batched over two leading dims; invalid tokens sit far away and must never be kept; one row has
    fewer valid tokens than k (all kept, then -1)."""
    rng = np.random.default_rng(2)
    lead, n, d, k, iters = (2, 3), TAU, 16, 8, 6
    keys = _clustered_keys(rng, lead, n, d, clusters=3)
    valid = rng.random((*lead, n)) < 0.75
    valid[1, 2] = False
    valid[1, 2, [3, 10, 20]] = True
    keys = np.where(valid[..., None], keys, 100.0)
    got = np.asarray(kmeans_keep(jnp.asarray(keys, jnp.float32), jnp.asarray(valid), k=k, iters=iters))
    assert got.shape == (*lead, k)
    for idx in np.ndindex(*lead):
        want, gap = numpy_kmeans_keep(keys[idx], valid[idx], k, iters)
        assert gap > 1e-5, f"the data has a token on the tie bound at {idx}: pick another seed"
        np.testing.assert_array_equal(got[idx], want, err_msg=idx)
    np.testing.assert_array_equal(got[1, 2], [3, 10, 20] + [-1] * (k - 3))


def test_kmeans_keep_breaks_a_midpoint_tie_by_the_lower_index():
    """Two tokens and one centroid: their midpoint is equally far from both in exact arithmetic, and
    the lower index is kept however float32 rounds, also with either token moved by 1e-6 (a kernel's
    last bits); a token nearer than the tolerance is kept."""
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((2, 16))
    for shift in (0.0, 1e-6, -1e-6):
        for first, second in ((a + shift, b), (a, b + shift), (b + shift, a)):
            keys = jnp.asarray(np.stack([first, second]), jnp.float32)
            assert np.asarray(kmeans_keep(keys, jnp.ones(2, bool), k=1, iters=3)).tolist() == [0]
    with_middle = jnp.asarray(np.stack([a, b, (a + b) / 2]), jnp.float32)  # the centroid: token 2
    assert np.asarray(kmeans_keep(with_middle, jnp.ones(3, bool), k=1, iters=3)).tolist() == [2]


def test_kmeans_keep_one_token_per_run():
    """A segment made of k runs of similar keys (a thought's tokens resemble their neighbours) keeps one
    real token from each run: the evenly spaced start puts one centroid in each."""
    rng = np.random.default_rng(3)
    n, d, runs = TAU, 32, 4
    centres = 6 * rng.standard_normal((runs, d))
    run = np.repeat(np.arange(runs), n // runs)
    keys = centres[run] + rng.standard_normal((n, d))
    got = np.asarray(kmeans_keep(jnp.asarray(keys, jnp.float32), jnp.ones(n, bool), k=runs, iters=10))
    assert sorted(run[got].tolist()) == list(range(runs))


def test_kmeans_keep_with_fewer_clusters_matches_a_smaller_k():
    """clusters=c per segment (traced) keeps what k=c keeps, padded with -1 to k."""
    rng = np.random.default_rng(4)
    n, d, k = 24, 8, 6
    keys = _clustered_keys(rng, (3,), n, d, clusters=4).astype(np.float32)
    valid = rng.random((3, n)) < 0.8
    clusters = np.array([2, 6, 3])
    got = np.asarray(kmeans_keep(jnp.asarray(keys), jnp.asarray(valid), k=k, clusters=jnp.asarray(clusters)))
    for row, c in enumerate(clusters):
        want = np.asarray(kmeans_keep(jnp.asarray(keys[row]), jnp.asarray(valid[row]), k=int(c)))
        np.testing.assert_array_equal(got[row], np.concatenate([want, np.full(k - c, -1)]))


def test_kmeans_keep_with_k_past_the_tokens_keeps_every_valid_one():
    """k above the segment's n tokens (it died in a reshape): every valid token, padded with -1 to k."""
    keys = jnp.arange(12.0).reshape(2, 3, 2)
    valid = jnp.asarray([[True, True, True], [True, False, True]])
    got = np.asarray(kmeans_keep(keys, valid, k=5, clusters=jnp.asarray([5, 1])))
    np.testing.assert_array_equal(got[0], [0, 1, 2, -1, -1])
    assert got[1, 0] in (0, 2) and (got[1, 1:] == -1).all()  # one cluster: one of its two tokens
    np.testing.assert_array_equal(kmeans_keep(keys[1], valid[1], k=4), [0, 2, -1, -1])


def test_kmeans_keep_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be a positive int"):
        thinkv.kmeans_keep(jnp.zeros((4, 2)), jnp.ones(4, bool), k=0)
