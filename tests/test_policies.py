"""policies.select_evict_slot: each policy's choice on hand-made buffers against numpy, then end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import generate_module, make_prompts

import longflow_jax as lf
from longflow_jax.config import CompressionConfig, SamplingConfig
from longflow_jax.kv_cache import kv_valid, layer_from_kept
from longflow_jax.policies import select_evict_slot
from longflow_jax.testing import make_tiny_hf_checkpoint

POLICIES = ["longflow", "tova", "h2o", "streaming", "random"]


@pytest.fixture(scope="module")
def qwen3(tiny_checkpoints):
    return lf.load(tiny_checkpoints["qwen3"][1])


# A hand-made buffer: B = 2, Hkv = 2, Hq = 4, C = 6. Row 0 is full, row 1 has 4 filled slots (the filled
# slots are a prefix, the same in every group). Per-KV-head groups hold different positions.
SLOT_POS = np.array(
    [
        [[0, 1, 9, 4, 12, 7], [0, 5, 9, 2, 12, 10]],
        [[3, 0, 6, 1, -1, -1], [2, 0, 6, 5, -1, -1]],
    ],
    np.int32,
)
POS = np.array([12, 6], np.int32)  # the token just written (it is in the buffer)
NUM_Q_HEADS = 4


def _hand_made(granularity, seed=0):
    """(layer, probs [B, Hq, C], valid [B, C]) with random k, v, H2O score and attention probabilities."""
    rng = np.random.default_rng(seed)
    slot_pos = SLOT_POS[:, :1] if granularity == "sequence" else SLOT_POS
    batch, num_kv_heads, capacity, head_dim = 2, 2, 6, 4
    valid = SLOT_POS[:, 0] >= 0
    seq = jnp.zeros((batch, 1, num_kv_heads, head_dim), jnp.float32)
    empty = jnp.full((batch, slot_pos.shape[1], 1), -1, jnp.int32)
    layer = layer_from_kept(seq, seq, empty, capacity).replace(
        k=jnp.asarray(rng.standard_normal((batch, num_kv_heads, capacity, head_dim)), jnp.float32),
        v=jnp.asarray(rng.standard_normal((batch, num_kv_heads, capacity, head_dim)), jnp.float32),
        slot_pos=jnp.asarray(slot_pos),
        score=jnp.asarray(np.where(valid[:, None], rng.uniform(0, 3, slot_pos.shape), 0), jnp.float32),
    )
    logits = np.where(valid[:, None], rng.standard_normal((batch, NUM_Q_HEADS, capacity)), -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    assert bool(np.all(np.asarray(kv_valid(layer)) == valid))
    return layer, jnp.asarray(probs, jnp.float32), jnp.asarray(valid)


def _select(policy, granularity, **comp):
    layer, probs, valid = _hand_made(granularity)
    comp = CompressionConfig(policy=policy, budget=6, granularity=granularity, **comp)
    evict, score = select_evict_slot(probs, layer, valid, jnp.asarray(POS), comp, jax.random.PRNGKey(0))
    return layer, np.asarray(probs, np.float64), np.asarray(valid), np.asarray(evict), np.asarray(score)


def _group_sum(per_q_head, groups):
    """[B, Hq, C] -> [B, G, C]: query heads summed per score group (repeat_kv order)."""
    b, hq, c = per_q_head.shape
    return per_q_head.reshape(b, groups, hq // groups, c).sum(2)


def _argmin_with_empty_first(ranking, valid):
    return np.where(valid[:, None, :], ranking, -1.0).argmin(-1)


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
def test_longflow_evicts_least_attention_times_value_norm(granularity):
    layer, probs, valid, evict, score = _select("longflow", granularity)
    groups = layer.slot_pos.shape[1]
    vnorm = np.abs(np.asarray(layer.v, np.float64)).sum(-1)  # [B, Hkv, C]
    contrib = probs * np.repeat(vnorm, NUM_Q_HEADS // 2, axis=1)
    np.testing.assert_array_equal(evict, _argmin_with_empty_first(_group_sum(contrib, groups), valid))
    np.testing.assert_array_equal(score, np.asarray(layer.score))  # no state carried over
    assert (evict[1] == 4).all()  # row 1 fills its first empty slot


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
def test_tova_evicts_least_current_attention(granularity):
    layer, probs, valid, evict, score = _select("tova", granularity)
    ranking = _group_sum(probs, layer.slot_pos.shape[1])
    np.testing.assert_array_equal(evict, _argmin_with_empty_first(ranking, valid))
    np.testing.assert_array_equal(score, np.asarray(layer.score))


@pytest.mark.parametrize("recent_window", [0, 2, None])
@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
def test_h2o_accumulates_attention_and_protects_recent(granularity, recent_window):
    layer, probs, valid, evict, score = _select("h2o", granularity, recent_window=recent_window)
    slot_pos = np.asarray(layer.slot_pos)
    recent = 6 // 2 if recent_window is None else recent_window
    want_score = np.asarray(layer.score, np.float64) + _group_sum(probs, slot_pos.shape[1])
    np.testing.assert_allclose(score, want_score, rtol=1e-6)
    protected = slot_pos > POS[:, None, None] - recent
    ranking = np.where(protected, np.inf, want_score)
    np.testing.assert_array_equal(evict, _argmin_with_empty_first(ranking, valid))
    # Row 0 is full: the victim is never one of the `recent` newest positions.
    victim = np.take_along_axis(slot_pos[0], evict[0][:, None], -1)[:, 0]
    assert (victim <= POS[0] - recent).all()


@pytest.mark.parametrize("num_sinks", [0, 1, 2])
@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
def test_streaming_evicts_oldest_non_sink(granularity, num_sinks):
    layer, _, valid, evict, _ = _select("streaming", granularity, num_sinks=num_sinks)
    slot_pos = np.asarray(layer.slot_pos)
    for g in range(slot_pos.shape[1]):
        row = slot_pos[0, g]
        oldest = min(p for p in row if p >= num_sinks)
        assert row[evict[0, g]] == oldest
    assert (evict[1] == 4).all()
    ranking = np.where(slot_pos < num_sinks, np.inf, slot_pos.astype(np.float64))
    np.testing.assert_array_equal(evict, _argmin_with_empty_first(ranking, valid))


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
def test_random_picks_any_filled_slot_uniformly_and_fills_empty_first(granularity):
    layer, probs, valid = _hand_made(granularity)
    comp = CompressionConfig(policy="random", budget=6, granularity=granularity)
    keys = jax.random.split(jax.random.PRNGKey(3), 3000)
    evict = np.asarray(
        jax.vmap(lambda key: select_evict_slot(probs, layer, valid, jnp.asarray(POS), comp, key)[0])(keys)
    )  # [N, B, G]
    assert (evict[:, 1] == 4).all()
    counts = np.stack([(evict[:, 0] == c).mean(0) for c in range(6)])  # [C, G]
    assert np.abs(counts - 1 / 6).max() < 0.03


def test_full_policy_does_not_select():
    layer, probs, valid = _hand_made("sequence")
    with pytest.raises(ValueError, match="policy 'full' does not evict"):
        select_evict_slot(probs, layer, valid, jnp.asarray(POS), CompressionConfig(policy="full"), None)


def _run_steps(params, config, ids, lengths, comp, steps):
    """Prefill + `steps` greedy decode steps through the public pieces; returns the final cache."""
    capacity = generate_module.buffer_capacity(comp, ids.shape[1], steps + 1)
    cache, logits = lf.prefill(params, config, jnp.asarray(ids), jnp.asarray(lengths), comp, capacity)
    step = jax.jit(lambda c, t, p, k: lf.decode_step(params, config, c, t, p, k, compression=comp))
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    for i in range(steps):
        logits, cache, _ = step(cache, token, jnp.asarray(lengths) + i, jax.random.PRNGKey(i))
        token = jnp.argmax(logits, -1).astype(jnp.int32)
    return cache


GREEDY_NO_EOS = SamplingConfig(ignore_eos=True)


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
@pytest.mark.parametrize("policy", POLICIES)
def test_budget_covering_everything_equals_full(qwen3, policy, granularity):
    # The policy's own path (prefill and decode_step take the compression as given; `generate` runs a
    # budget this large as the full cache) scores and picks slots every step, but while empty slots
    # remain it fills them: greedy tokens equal the full cache's, and every prompt and generated
    # position is still held.
    config, params = qwen3
    ids, lengths = make_prompts(config, [6, 13, 9])
    steps = 20
    full = lf.generate(params, config, ids, lengths, max_new_tokens=steps + 1, sampling=GREEDY_NO_EOS)
    comp = CompressionConfig(policy=policy, budget=ids.shape[1] + steps, granularity=granularity)
    capacity = generate_module.buffer_capacity(comp, ids.shape[1], steps + 1)
    cache, logits = lf.prefill(params, config, jnp.asarray(ids), jnp.asarray(lengths), comp, capacity)
    step = jax.jit(
        lambda c, t, p: lf.decode_step(params, config, c, t, p, jax.random.PRNGKey(0), compression=comp)
    )
    token, tokens = jnp.argmax(logits, -1).astype(jnp.int32), []
    for i in range(steps):
        tokens.append(token)
        logits, cache, _ = step(cache, token, jnp.asarray(lengths) + i)
        token = jnp.argmax(logits, -1).astype(jnp.int32)
    tokens.append(token)
    np.testing.assert_array_equal(np.stack(tokens, 1), np.asarray(full.tokens))
    held = np.sort(np.asarray(cache.layers[0].slot_pos), -1)
    for row, n in enumerate(lengths):  # positions 0 .. n + steps - 1, then empty slots (-1) first
        want = np.arange(n + steps)
        np.testing.assert_array_equal(
            held[row, :, -(n + steps) :], np.broadcast_to(want, held[row, :, -(n + steps) :].shape)
        )


def _numpy_longflow_evict(q, k, v, valid, scale, granularity):
    """Independent float64 LongFlow: attention probs, importance sum_h alpha*||v||_1, argmin."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    valid = np.asarray(valid)
    b, hq, _ = q.shape
    hkv = k.shape[1]
    rep = hq // hkv
    k_rep, v_rep = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # [B, Hq, C, D]
    logits = np.einsum("bhd,bhcd->bhc", q, k_rep) * scale
    logits = np.where(valid[:, None, :], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    contrib = probs * np.abs(v_rep).sum(-1)  # [B, Hq, C]
    if granularity == "sequence":
        imp = contrib.sum(1, keepdims=True)
    else:
        imp = contrib.reshape(b, hkv, rep, -1).sum(2)
    imp = np.where(valid[:, None, :], imp, -1.0)
    return imp, imp.argmin(-1)


# GQA (8 query heads on 2 KV heads) only: the numpy reference's head grouping covers MHA as groups of
# one, and the kernels' tests run MHA shapes (this eager-mode check is among CI's slowest).
@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
@pytest.mark.parametrize("heads, kv_heads", [(8, 2)])
def test_evicted_slot_matches_numpy_float64(tmp_path, monkeypatch, granularity, heads, kv_heads):
    hf = make_tiny_hf_checkpoint(
        str(tmp_path / "hf"), "qwen3", num_attention_heads=heads, num_key_value_heads=kv_heads, seed=heads
    )
    lf.convert(hf, str(tmp_path / "lf"))
    config, params = lf.load(str(tmp_path / "lf"))
    records = []
    original = generate_module.decode_attention

    def recording(q, layer, pos, scale, compression, impl, key):
        out, new_layer = original(q, layer, pos, scale, compression, impl, key)
        records.append((q, layer, pos, scale, new_layer.evict_slot))
        return out, new_layer

    monkeypatch.setattr(generate_module, "decode_attention", recording)
    ids, lengths = make_prompts(config, [3, 9, 5])  # row 1 is SnapKV-compressed at prefill, the others not
    comp = CompressionConfig(policy="longflow", budget=7, granularity=granularity)
    with jax.disable_jit():
        _run_steps(params, config, ids, lengths, comp, steps=7)
    assert len(records) == 7 * config.num_layers
    evicted_while_full = 0
    for i, (q, layer, pos, scale, evict) in enumerate(records):
        valid = np.asarray(layer.slot_pos[:, 0, :] >= 0)
        imp, want = _numpy_longflow_evict(q, layer.k, layer.v, valid, scale, granularity)
        got = np.asarray(evict)
        for idx in zip(*np.nonzero(got != want)):  # only a float tie may differ
            chosen, best = imp[idx][got[idx]], imp[idx][want[idx]]
            assert abs(chosen - best) <= 1e-6 * abs(best), f"record {i} {idx}: {got[idx]} vs {want[idx]}"
        evicted_while_full += int(valid.all(-1).sum())
        if i >= config.num_layers:  # this step's write went to the slot the previous step chose
            prev = records[i - config.num_layers][4]
            written = np.take_along_axis(np.asarray(layer.slot_pos), np.asarray(prev)[..., None], -1)[..., 0]
            np.testing.assert_array_equal(written, np.broadcast_to(np.asarray(pos)[:, None], written.shape))
    assert evicted_while_full > 0, "the test must reach real evictions, not only empty-slot fills"


def test_streaming_keeps_sinks_and_most_recent(qwen3):
    config, params = qwen3
    ids, lengths = make_prompts(config, [4, 6])
    comp = CompressionConfig(policy="streaming", budget=10, num_sinks=2)
    cache = _run_steps(params, config, ids, lengths, comp, steps=25)
    for layer in cache.layers:
        for row in range(2):
            last = int(lengths[row]) + 25 - 1  # newest position written
            want = {0, 1} | set(range(last - 7, last + 1))
            assert set(np.asarray(layer.slot_pos[row, 0]).tolist()) == want


def test_h2o_protects_recent_window(qwen3):
    config, params = qwen3
    ids, lengths = make_prompts(config, [5, 5])
    comp = CompressionConfig(policy="h2o", budget=10, recent_window=4)
    cache = _run_steps(params, config, ids, lengths, comp, steps=20)
    for layer in cache.layers:
        for row in range(2):
            last = int(lengths[row]) + 20 - 1
            kept = set(np.asarray(layer.slot_pos[row, 0]).tolist())
            assert set(range(last - 3, last + 1)) <= kept and -1 not in kept


def test_kv_head_granularity_keeps_per_head_tokens(qwen3):
    config, params = qwen3
    ids, lengths = make_prompts(config, [12, 12], seed=4)
    comp = CompressionConfig(policy="longflow", budget=6, granularity="kv_head")
    cache = _run_steps(params, config, ids, lengths, comp, steps=12)
    pos = np.asarray(cache.layers[0].slot_pos)  # [B, Hkv, C]
    assert pos.shape == (2, config.num_kv_heads, 6) and (pos >= 0).all()
    assert any(set(pos[b, 0]) != set(pos[b, 1]) for b in range(2)), "heads should keep different tokens"
