"""snapkv: the positions prefill keeps, against an independent float64 numpy SnapKV."""

import jax.numpy as jnp
import numpy as np
import pytest

from longflow_jax.snapkv import avg_pool_same, observation_scores, prefill_keep_positions

BATCH, SEQ, HQ, HKV, D = 3, 100, 8, 2, 16


def _numpy_votes(q, k, length, window, groups):
    """Window queries' softmaxed attention to the earlier keys, summed over the window and the query
    heads of each score group: [G, length - window]."""
    q, k = np.asarray(q, np.float64)[:length], np.asarray(k, np.float64)[:length]
    hq, hkv = q.shape[1], k.shape[1]
    k_rep = np.repeat(k, hq // hkv, axis=1)
    qw = q[length - window :]  # [W, Hq, D]
    logits = np.einsum("whd,phd->hwp", qw, k_rep) / np.sqrt(q.shape[-1])
    qpos = np.arange(length - window, length)
    logits = np.where(np.arange(length)[None, None, :] <= qpos[None, :, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    per_head = probs.sum(1)[:, : length - window]  # [Hq, P']
    return per_head.reshape(groups, hq // groups, -1).sum(1)


def _numpy_snapkv(q, k, length, capacity, window, pool, groups=1):
    """Independent SnapKV for one row: [G, C - 1] kept positions (top earlier tokens, sorted, then window)."""
    kept = []
    for votes in _numpy_votes(q, k, length, window, groups):
        padded = np.pad(votes, pool // 2)
        pooled = np.array([padded[i : i + pool].sum() / pool for i in range(len(votes))])
        top = np.sort(np.argsort(-pooled, kind="stable")[: capacity - 1 - window])
        kept.append(np.concatenate([top, np.arange(length - window, length)]))
    return np.stack(kept)


def _qk(seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((BATCH, SEQ, HQ, D)), jnp.float32) * 2
    k = jnp.asarray(rng.standard_normal((BATCH, SEQ, HKV, D)), jnp.float32) * 2
    return q, k


@pytest.mark.parametrize("groups", [1, HKV])
def test_snapkv_prefill_matches_numpy(groups):
    q, k = _qk()
    lengths = jnp.asarray([100, 40, 70])
    capacity, window, pool = 48, 32, 5
    kept = np.asarray(prefill_keep_positions(q, k, lengths, capacity, window, pool, groups=groups))
    assert kept.shape == (BATCH, groups, capacity - 1)
    for row in (0, 2):
        want = _numpy_snapkv(q[row], k[row], int(lengths[row]), capacity, window, pool, groups)
        np.testing.assert_array_equal(kept[row], want)
        for g in range(groups):
            np.testing.assert_array_equal(
                kept[row, g, -window:], np.arange(lengths[row] - window, lengths[row])
            )
    # 40 <= C - 1: the short row keeps its whole prompt, -1 after it
    assert (kept[1, :, :40] == np.arange(40)).all() and (kept[1, :, 40:] == -1).all()
    if groups > 1:
        assert not np.array_equal(kept[0, 0], kept[0, 1]), "KV heads should vote differently"


@pytest.mark.parametrize("groups", [1, HKV])
def test_observation_scores_are_the_window_votes(groups):
    q, k = _qk(seed=1)
    lengths = jnp.asarray([100, 60, 33])
    window = 32
    got = np.asarray(observation_scores(q, k, lengths, window, groups))
    assert got.shape == (BATCH, groups, SEQ)
    for row, length in enumerate(np.asarray(lengths)):
        want = _numpy_votes(q[row], k[row], int(length), window, groups)
        np.testing.assert_allclose(got[row, :, : length - window], want, rtol=1e-5, atol=1e-6)
        assert (got[row, :, length - window :] == 0).all()  # the window and the padding do not vote


def test_avg_pool_same_is_zero_padded_and_divided_by_pool():
    x = jnp.asarray([[1.0, 2.0, 3.0, 4.0, 5.0]])
    np.testing.assert_allclose(np.asarray(avg_pool_same(x, 3)), [[1.0, 2.0, 3.0, 4.0, 3.0]])
    np.testing.assert_allclose(np.asarray(avg_pool_same(x, 1)), np.asarray(x))


def test_window_wider_than_the_buffer_keeps_the_newest_tokens():
    q, k = _qk(seed=2)
    lengths = jnp.asarray([100, 80, 20])
    capacity = 48
    kept = np.asarray(prefill_keep_positions(q, k, lengths, capacity, window=64, pool=5, groups=1))
    for row, length in enumerate((100, 80)):
        np.testing.assert_array_equal(kept[row, 0], np.arange(length - capacity + 1, length))
    np.testing.assert_array_equal(kept[2, 0, :20], np.arange(20))
    assert (kept[2, 0, 20:] == -1).all()


@pytest.mark.parametrize("groups", [1, HKV])
def test_prompt_that_fits_keeps_every_token(groups):
    q, k = _qk(seed=3)
    lengths = jnp.asarray([100, 57, 1])
    kept = np.asarray(prefill_keep_positions(q, k, lengths, 128, window=32, pool=5, groups=groups))
    assert kept.shape == (BATCH, groups, SEQ)
    for row, length in enumerate((100, 57, 1)):
        want = np.where(np.arange(SEQ) < length, np.arange(SEQ), -1)
        np.testing.assert_array_equal(kept[row], np.broadcast_to(want, (groups, SEQ)))
