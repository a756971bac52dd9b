"""sampling: greedy, temperature, top-k and top-p against numpy-built masks; the penalties and stop rules
against Hugging Face's logits processors (and numpy for vLLM's presence / frequency penalties)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import make_prompts
from transformers.generation import logits_process as hf

import longflow_jax as lf
from longflow_jax.config import SamplingConfig
from longflow_jax.sampling import (
    TokenHistory,
    init_history,
    ngram_bans,
    process_logits,
    record_token,
    sample_next,
    token_logprobs,
)


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
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0, got 0.0"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(presence_penalty=float("nan")), "presence_penalty must be a finite number, got nan"),
        (dict(frequency_penalty="1"), "frequency_penalty"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an int >= 0, got -1"),
        (dict(min_new_tokens=1.5), "min_new_tokens must be an int >= 0, got 1.5"),
        (dict(ignore_eos=1), "ignore_eos must be a bool"),
        (dict(stop_token_ids=(3, -1)), "stop_token_ids must be a sequence of token ids >= 0"),
        (dict(stop_token_ids=5), "stop_token_ids"),
        (dict(temperature=1e-9), r"temperature must be 0 \(greedy\) or a finite number >= 1e-06, got 1e-09"),
    ],
)
def test_bad_sampling_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_smallest_temperature_samples_the_best_token():
    # Logits whose best one divided by the temperature overflows float32: the row max comes off first,
    # so the best token is drawn every time and its log-prob is 0 (finite), as the limit T -> 0 says.
    logits = jnp.asarray([[0.5, 3.0, 1.0, -2.0], [-1.0, -4.0, 2.0, 2.5]], jnp.float32) * 1e33
    sampling = SamplingConfig(temperature=1e-6)
    for seed in range(5):
        tokens = sample_next(logits, jax.random.PRNGKey(seed), sampling)
        np.testing.assert_array_equal(np.asarray(tokens), [1, 3])
    chosen, best, ids = token_logprobs(logits, jnp.asarray([1, 3]), sampling, 2)
    np.testing.assert_array_equal(np.asarray(chosen), [0.0, 0.0])
    assert np.isfinite(np.asarray(best)[:, 0]).all() and np.asarray(ids)[:, 0].tolist() == [1, 3]


def test_stop_ids():
    s = SamplingConfig(stop_token_ids=[7, 2])  # a list is kept as a tuple: the config stays hashable
    assert s.stop_token_ids == (7, 2) and hash(s) == hash(SamplingConfig(stop_token_ids=(7, 2)))
    assert s.stop_ids((2, 4)) == (2, 4, 7)
    assert SamplingConfig(ignore_eos=True, stop_token_ids=(7,)).stop_ids((2, 4)) == (7,)


# Rows of different prompt lengths (right-padded), then the same number of generated tokens each. A vocab
# of 12 over random tokens drawn from 0..5 makes repeats, so every rule has something to act on.
VOCAB, STOP_IDS = 12, (4, 9)
PROMPT_LENGTHS = [5, 1, 8, 3]


def _history_case(num_generated, seed=0):
    rng = np.random.default_rng(seed)
    prompts = np.zeros((len(PROMPT_LENGTHS), max(PROMPT_LENGTHS)), np.int32)
    for row, n in enumerate(PROMPT_LENGTHS):
        prompts[row, :n] = rng.integers(0, 6, n)
    outputs = rng.integers(0, 6, (len(PROMPT_LENGTHS), num_generated)).astype(np.int32)
    logits = rng.standard_normal((len(PROMPT_LENGTHS), VOCAB)).astype(np.float32) * 3
    return prompts, outputs, logits


def _ours(sampling, prompts, outputs, logits, max_new_tokens=10):
    history = init_history(jnp.asarray(prompts), jnp.asarray(PROMPT_LENGTHS), VOCAB, max_new_tokens, sampling)
    for t in range(outputs.shape[1]):
        history = record_token(history, jnp.asarray(outputs[:, t]))
    processed = process_logits(jnp.asarray(logits), sampling, STOP_IDS, outputs.shape[1], history)
    return np.asarray(processed)


def _hugging_face(sampling, prompts, outputs, logits):
    """Hugging Face's processors, in its order, one row at a time on prompt + output; vLLM's
    frequency and presence penalties in numpy after the repetition penalty, on output counts only."""
    rows = []
    for row, n in enumerate(PROMPT_LENGTHS):
        ids = torch.tensor(np.concatenate([prompts[row, :n], outputs[row]]))[None].long()
        scores = torch.tensor(logits[row : row + 1])
        if sampling.repetition_penalty != 1.0:
            scores = hf.RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)(ids, scores)
        counts = np.bincount(outputs[row], minlength=VOCAB)
        scores = scores - torch.tensor(
            sampling.frequency_penalty * counts + sampling.presence_penalty * (counts > 0),
            dtype=torch.float32,
        )
        if sampling.no_repeat_ngram_size:
            scores = hf.NoRepeatNGramLogitsProcessor(sampling.no_repeat_ngram_size)(ids, scores)
        if sampling.min_new_tokens:
            processor = hf.MinNewTokensLengthLogitsProcessor(n, sampling.min_new_tokens, list(STOP_IDS))
            scores = processor(ids, scores)
        rows.append(scores[0].numpy())
    return np.stack(rows)


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(repetition_penalty=1.3),
        SamplingConfig(repetition_penalty=0.7),  # < 1 favours repeats: the same rule, inverted
        SamplingConfig(presence_penalty=0.8, frequency_penalty=0.3),
        SamplingConfig(presence_penalty=-0.5),
        SamplingConfig(no_repeat_ngram_size=1),
        SamplingConfig(no_repeat_ngram_size=2),
        SamplingConfig(no_repeat_ngram_size=3),
        SamplingConfig(no_repeat_ngram_size=7),  # longer than some rows' history: nothing banned there
        SamplingConfig(min_new_tokens=3),
        SamplingConfig(
            repetition_penalty=1.2, frequency_penalty=0.5, no_repeat_ngram_size=2, min_new_tokens=4
        ),
    ],
    ids=lambda s: ",".join(f"{k}={v}" for k, v in vars(s).items() if v != SamplingConfig.__dict__[k]),
)
@pytest.mark.parametrize("num_generated", [0, 3, 6])
def test_penalties_and_bans_match_hugging_face(sampling, num_generated):
    prompts, outputs, logits = _history_case(num_generated, seed=num_generated)
    want = _hugging_face(sampling, prompts, outputs, logits)
    got = _ours(sampling, prompts, outputs, logits)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_ngram_bans_by_hand():
    """History 1 2 3 1 2: the last n - 1 tokens were followed by 3 before, for n = 2 and n = 3."""
    history = TokenHistory(None, None, jnp.asarray([[1, 2, 3, 1, 2, 0, 0]]), jnp.asarray([5]))
    banned = lambda n: np.flatnonzero(ngram_bans(history.tokens, history.length, n, 6)[0]).tolist()
    assert banned(1) == [1, 2, 3] and banned(2) == [3] and banned(3) == [3] and banned(4) == []
    # no earlier window starts with the last 4 tokens, and no 6-gram fits in 5 tokens (the pad never counts)
    assert banned(5) == [] and banned(6) == []


def test_controls_that_are_off_add_no_operation():
    prompts, outputs, logits = _history_case(3)
    off = SamplingConfig(temperature=0.7, top_k=5)
    assert init_history(jnp.asarray(prompts), jnp.asarray(PROMPT_LENGTHS), VOCAB, 8, off) is None
    jaxpr = jax.make_jaxpr(lambda x: process_logits(x, off, STOP_IDS, 3, None))(logits)
    assert not jaxpr.eqns


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_token_logprobs_are_the_scaled_log_softmax(temperature):
    logits = _logits(seed=4, batch=6, vocab=30)
    tokens = np.random.default_rng(5).integers(0, 30, 6).astype(np.int32)
    sampling = SamplingConfig(temperature=temperature, top_k=3)  # top-k does not truncate the log-probs
    chosen, best, ids = token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), sampling, 4)
    x = logits.astype(np.float64) / (temperature or 1.0)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(chosen), logp[np.arange(6), tokens], rtol=1e-5, atol=1e-5)
    order = np.argsort(-logp, axis=-1)[:, :4]
    np.testing.assert_array_equal(np.asarray(ids), order)
    np.testing.assert_allclose(np.asarray(best), np.take_along_axis(logp, order, -1), rtol=1e-5, atol=1e-5)
