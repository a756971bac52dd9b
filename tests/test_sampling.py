"""sampling.sample_next: greedy, temperature, top-k and top-p against numpy-built masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_prompts

import longflow_jax as lf
from longflow_jax.config import SamplingConfig
from longflow_jax.sampling import sample_next


@pytest.fixture(scope="module")
def qwen3(tiny_checkpoints):
    return lf.load(tiny_checkpoints["qwen3"][1])


def _logits(seed=0, batch=64, vocab=50):
    return np.random.default_rng(seed).standard_normal((batch, vocab)).astype(np.float32) * 2


def _numpy_filtered(logits, temperature, top_k=0, top_p=1.0):
    """The logits sample_next draws from: scaled, then -inf outside the top k, then outside the nucleus
    (the smallest most-probable prefix whose probability reaches top_p, computed in float64)."""
    x = logits / np.float32(temperature)
    if top_k:
        kth = np.sort(x, -1)[:, -min(top_k, x.shape[-1])][:, None]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(-x, -1, kind="stable")
        srt = np.take_along_axis(x.astype(np.float64), order, -1)
        p = np.exp(srt - srt[:, :1])
        cum = np.cumsum(p / p.sum(-1, keepdims=True), -1)
        # float32 and float64 cumulative sums agree away from top_p: keep the data away from it
        assert np.abs(cum - top_p).min() > 1e-4
        keep_sorted = np.arange(x.shape[-1])[None, :] <= (cum < top_p).sum(-1, keepdims=True)
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        x = np.where(keep, x, -np.inf)
    return x


def test_greedy_is_argmax_lowest_index_on_ties():
    logits = _logits()
    logits[0, [3, 17]] = logits[0].max() + 1  # a tie: the lower index wins
    got = np.asarray(sample_next(jnp.asarray(logits), jax.random.PRNGKey(0), SamplingConfig()))
    np.testing.assert_array_equal(got, logits.argmax(-1))
    assert got[0] == 3 and got.dtype == np.int32


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 1, 1.0), (1.0, 100, 1.0), (0.8, 0, 0.6), (1.5, 10, 0.45)],
)
def test_draws_from_the_numpy_filtered_distribution(temperature, top_k, top_p):
    """The same key through jax.random.categorical on the numpy-filtered logits draws the same tokens."""
    logits = _logits(seed=1)
    key = jax.random.PRNGKey(7)
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    got = np.asarray(sample_next(jnp.asarray(logits), key, sampling))
    filtered = _numpy_filtered(logits, temperature, top_k, top_p)
    want = np.asarray(jax.random.categorical(key, jnp.asarray(filtered), axis=-1))
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(filtered[np.arange(len(got)), got]).all()  # every draw is inside the filter
    if top_k and top_p == 1.0:
        assert (np.isfinite(filtered).sum(-1) == min(top_k, logits.shape[-1])).all()


def test_top_k_draws_follow_the_renormalised_top_k_probabilities():
    logits = np.log(np.array([[0.4, 0.1, 0.3, 0.2]] * 8000, np.float32))
    draws = np.asarray(
        sample_next(jnp.asarray(logits), jax.random.PRNGKey(1), SamplingConfig(temperature=1.0, top_k=2))
    )
    assert set(np.unique(draws)) == {0, 2}
    assert abs((draws == 0).mean() - 0.4 / 0.7) < 0.03


def test_top_p_keeps_the_smallest_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    draws = np.asarray(
        sample_next(logits, jax.random.PRNGKey(0), SamplingConfig(temperature=1.0, top_p=0.75))
    )
    assert set(np.unique(draws)) == {0, 1}  # 0.5 + 0.3 >= 0.75: tokens 2 and 3 are cut
    assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.03


def test_sampling_is_seeded_and_respects_top_k(qwen3):
    config, params = qwen3
    ids, lengths = make_prompts(config, [7, 7])
    s = SamplingConfig(temperature=1.0, top_k=1)
    greedy = lf.generate(params, config, ids, lengths, max_new_tokens=12)
    top1 = lf.generate(params, config, ids, lengths, max_new_tokens=12, sampling=s, seed=5)
    np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(greedy.tokens))
    s = SamplingConfig(temperature=1.5, top_p=0.9)
    a = lf.generate(params, config, ids, lengths, max_new_tokens=12, sampling=s, seed=1)
    b = lf.generate(params, config, ids, lengths, max_new_tokens=12, sampling=s, seed=1)
    c = lf.generate(params, config, ids, lengths, max_new_tokens=12, sampling=s, seed=2)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(temperature=-1.0), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p")],
)
def test_bad_sampling_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)
