"""score_trajectory: teacher-forced comparison of a compressed cache with the full cache."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import generate_module, make_prompts

import longflow_jax as lf
from longflow_jax.model import forward, logits_from_hidden

CONFIG = lf.ModelConfig(
    model_type="qwen3", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=256,
    qk_norm=True,
)  # fmt: skip
PARAMS = lf.init_random_params(CONFIG, seed=3, scale=0.2)
STEPS = 24


def trajectory(prompt_ids, prompt_lengths, **kw):
    out = lf.generate(PARAMS, CONFIG, prompt_ids, prompt_lengths, max_new_tokens=STEPS, **kw)
    return np.asarray(out.tokens), np.asarray(out.lengths)


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(CONFIG, [9, 5, 12], seed=1)


@pytest.mark.parametrize("policy", ["longflow", "h2o", "rkv"])
def test_budget_covering_the_trajectory_is_exactly_the_full_cache(prompts, policy):
    ids, lengths = prompts
    traj, traj_len = trajectory(ids, lengths, sampling=lf.SamplingConfig(temperature=1.0), seed=5)
    comp = lf.CompressionConfig(policy=policy, budget=ids.shape[1] + STEPS)
    s = lf.score_trajectory(PARAMS, CONFIG, ids, lengths, traj, traj_len, compression=comp, seed=5)
    assert np.all(np.asarray(s.kl) == 0.0)
    assert np.asarray(s.top1_agree)[np.asarray(s.mask)].all()
    np.testing.assert_array_equal(np.asarray(s.nll), np.asarray(s.reference_nll))


def test_reference_nll_equals_one_forward_pass(prompts):
    """The full cache's teacher-forced NLL equals a causal forward over prompt + trajectory."""
    ids, lengths = prompts
    traj, traj_len = trajectory(ids, lengths)
    s = lf.score_trajectory(
        PARAMS, CONFIG, ids, lengths, traj, traj_len, compression=lf.CompressionConfig(policy="h2o", budget=8)
    )
    # One causal forward over each row's prompt + trajectory, right-padded (padding comes after: unseen).
    seqs = [np.concatenate([ids[b, : lengths[b]], traj[b]]) for b in range(ids.shape[0])]
    padded = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for b, seq in enumerate(seqs):
        padded[b, : len(seq)] = seq
    hidden = jax.jit(forward, static_argnums=1)(PARAMS, CONFIG, jnp.asarray(padded))[0]
    lp = np.asarray(jax.nn.log_softmax(logits_from_hidden(PARAMS, CONFIG, hidden), -1))
    for b in range(ids.shape[0]):
        want = -lp[b, lengths[b] - 1 + np.arange(STEPS), traj[b]]
        n = traj_len[b]
        np.testing.assert_allclose(np.asarray(s.reference_nll)[b, :n], want[:n], atol=2e-4)
        assert np.all(np.asarray(s.reference_nll)[b, n:] == 0) and not np.asarray(s.mask)[b, n:].any()


@pytest.mark.parametrize("policy", ["longflow", "random"])
def test_compressed_scores_equal_a_step_by_step_loop(prompts, policy):
    """A Python loop over decode_step, with generate's keys, and the metrics in numpy; two compressions
    scored in one pass."""
    ids, lengths = prompts
    traj, traj_len = trajectory(ids, lengths, sampling=lf.SamplingConfig(temperature=1.0), seed=2)
    comp = lf.CompressionConfig(policy=policy, budget=10)
    # Scored in one pass with a budget that holds everything: each cache is still scored on its own.
    covering = lf.CompressionConfig(policy=policy, budget=ids.shape[1] + STEPS)
    s, s_covering = lf.score_trajectory(
        PARAMS, CONFIG, ids, lengths, traj, traj_len, compression=[comp, covering], seed=2
    )
    assert np.all(np.asarray(s_covering.kl) == 0.0)

    def logits_along(compression):
        capacity = generate_module.buffer_capacity(compression, ids.shape[1], STEPS)
        cache, logits = lf.prefill(
            PARAMS, CONFIG, jnp.asarray(ids), jnp.asarray(lengths), compression, capacity
        )
        out, key = [np.asarray(logits)], jax.random.PRNGKey(2)
        step = jax.jit(functools.partial(lf.decode_step, PARAMS, CONFIG, compression=compression))
        for t in range(1, STEPS):
            k = jax.random.fold_in(jax.random.fold_in(key, t), 1)
            logits, cache, _ = step(cache, jnp.asarray(traj[:, t - 1]), jnp.asarray(lengths + t - 1), k)
            out.append(np.asarray(logits))
        return np.stack(out, 1).astype(np.float64)  # [B, T, V]

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ref, got = log_softmax(logits_along(lf.CompressionConfig(policy="full"))), log_softmax(logits_along(comp))
    mask = np.arange(STEPS)[None] < traj_len[:, None]
    kl = np.where(mask, (np.exp(ref) * (ref - got)).sum(-1), 0)
    nll = np.where(mask, -np.take_along_axis(got, traj[..., None], -1)[..., 0], 0)
    agree = mask & (ref.argmax(-1) == got.argmax(-1))
    np.testing.assert_allclose(np.asarray(s.kl), kl, atol=1e-4)
    np.testing.assert_allclose(np.asarray(s.nll), nll, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(s.top1_agree), agree)
    assert kl[mask].max() > 1e-3  # the budget really evicts
    # K/V bytes held at step t: the prompt and the t tokens fed, at most the budget (a prompt over it
    # is cut to budget - 1 at prefill, leaving the first token a free slot); float32 rows.
    per_token = 2 * CONFIG.num_layers * CONFIG.num_kv_heads * CONFIG.head_dim * 4
    held = np.minimum(lengths[:, None] + np.arange(STEPS)[None], 10)
    held[:, 0] = np.minimum(lengths, 9)
    held = held * per_token
    np.testing.assert_array_equal(np.asarray(s.kv_bytes), np.where(mask, held, 0))


def test_bad_trajectory_is_named(prompts):
    ids, lengths = prompts
    traj = np.zeros((3, 4), np.int32)
    comp = lf.CompressionConfig(policy="longflow", budget=8)
    with pytest.raises(ValueError, match="token ids in"):
        lf.score_trajectory(PARAMS, CONFIG, ids, lengths, traj + 500, [4, 4, 4], compression=comp)
    with pytest.raises(ValueError, match="trajectory_lengths must be in"):
        lf.score_trajectory(PARAMS, CONFIG, ids, lengths, traj, [4, 5, 4], compression=comp)
    with pytest.raises(ValueError, match="batch"):
        lf.score_trajectory(PARAMS, CONFIG, ids, lengths, traj[:2], [4, 4], compression=comp)
    # Fractional lengths were truncated (2.9 -> 2 tokens scored), as generate refuses them.
    with pytest.raises(ValueError, match="trajectory_lengths must be integer token counts, got dtype float"):
        lf.score_trajectory(PARAMS, CONFIG, ids, lengths, traj, [2.9, 4.0, 1.5], compression=comp)
    with pytest.raises(ValueError, match="seed must be an int or a jax PRNG key"):
        lf.score_trajectory(PARAMS, CONFIG, ids, lengths, traj, [4, 4, 4], compression=comp, seed=1.5)


def test_seed_takes_generates_forms(prompts):
    # An integer scalar array is a seed, as in generate (it crashed inside JAX as a raw key).
    ids, lengths = prompts
    comp = lf.CompressionConfig(policy="random", budget=8)
    traj, traj_len = trajectory(ids, lengths, sampling=lf.SamplingConfig(temperature=1.0), seed=3)
    kw = dict(compression=comp, reference=comp)
    got = lf.score_trajectory(PARAMS, CONFIG, ids, lengths, traj, traj_len, seed=jnp.int32(3), **kw)
    want = lf.score_trajectory(PARAMS, CONFIG, ids, lengths, traj, traj_len, seed=3, **kw)
    np.testing.assert_array_equal(np.asarray(got.nll), np.asarray(want.nll))
