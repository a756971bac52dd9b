"""rkv: R-KV's selection against an independent numpy R-KV, its buffer and compaction, then end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import generate_module, make_prompts

import longflow_jax as lf
from longflow_jax import rkv
from longflow_jax.attention import check_attention_impl
from longflow_jax.kv_cache import layer_from_kept, occupancy

W = rkv.WINDOW
HQ, HKV, D = 4, 2, 16
# Jitted once per shape: op by op, the selection's many small ops take longer than compiling them.
kept_slots = jax.jit(rkv.kept_slots, static_argnames=("budget", "groups"))
prefill_layer = jax.jit(rkv.prefill_layer, static_argnames=("budget", "capacity", "groups"))
decode_update = jax.jit(rkv.decode_update, static_argnames=("budget",))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_rkv(queries, keys, budget, groups):
    """Independent R-KV for one row, after the reference's R1KV.update_kv and cal_similarity.

    queries [W, Hq, D]; keys [Hkv, n, D] in position order (the last W are the window's). Returns the
    kept indices [G, budget]: the top budget - W earlier tokens by score, ascending, then the window.
    """
    q, k = np.asarray(queries, np.float64), np.asarray(keys, np.float64)
    hkv, n, d = k.shape
    rep = q.shape[1] // hkv
    scores = []
    for h in range(hkv):
        logits = np.einsum("wgd,nd->gwn", q[:, h * rep : (h + 1) * rep], k[h]).max(0) / np.sqrt(d)
        attention = _softmax(logits[:, : n - W]).mean(0)
        half = rkv.POOL_KERNEL // 2
        pooled = np.array([attention[max(0, i - half) : i + half + 1].max() for i in range(n - W)])
        unit = k[h] / (np.linalg.norm(k[h], axis=-1, keepdims=True) + 1e-8)
        sim = unit @ unit.T
        np.fill_diagonal(sim, 0.0)
        newest = [
            max((j for j in range(n) if sim[i, j] > rkv.SIMILARITY_THRESHOLD), default=0) for i in range(n)
        ]
        sim[np.arange(n), newest] = 0.0
        redundancy = _softmax(sim.mean(0))[: n - W]
        scores.append(rkv.MIX_LAMBDA * pooled - (1 - rkv.MIX_LAMBDA) * redundancy)
    if groups == 1:
        scores = [np.sum(scores, axis=0)]
    top = [np.sort(np.argsort(-s, kind="stable")[: budget - W]) for s in scores]
    return np.stack([np.concatenate([t, np.arange(n - W, n)]) for t in top])


def _keys_with_repeats(rng, batch, n):
    """Random keys [B, Hkv, n, D] where some tokens repeat an earlier one with a little noise, so the
    similarity threshold matters."""
    k = rng.standard_normal((batch, HKV, n, D))
    for b in range(batch):
        for h in range(HKV):
            src = rng.choice(n, 6, replace=False)
            dst = rng.choice(n, 6, replace=False)
            k[b, h, dst] = k[b, h, src] + 0.2 * rng.standard_normal((6, D))
    return k


@pytest.mark.parametrize("groups, similarity_rows", [(1, 256), (HKV, 256), (HKV, 5)])
def test_kept_slots_match_numpy(groups, similarity_rows, monkeypatch):
    """Also with the similarity matrix built a few rows at a time (5 rows: the last chunk padded)."""
    monkeypatch.setattr(rkv, "SIMILARITY_ROWS", similarity_rows)
    select = jax.jit(lambda q, k, n: rkv.kept_slots(q, k, n, budget, groups))  # traced with the patch
    rng = np.random.default_rng(groups)
    batch, n, budget = 3, 26, 14
    k = _keys_with_repeats(rng, batch, n)
    queries = 2 * rng.standard_normal((batch, W, HQ, D))
    filled = np.array([26, 21, 17])
    got = np.asarray(select(jnp.asarray(queries, jnp.float32), jnp.asarray(k, jnp.float32), filled))
    assert got.shape == (batch, groups, budget)
    for b in range(batch):
        want = numpy_rkv(queries[b], k[b, :, : filled[b]], budget, groups)
        np.testing.assert_array_equal(got[b], want)


def test_of_repeated_keys_only_the_newest_copy_stays():
    """With uniform attention (zero queries) the redundancy decides: of four copies of a key only the
    newest stays."""
    rng = np.random.default_rng(0)
    n, budget = 24, 21  # 16 candidates, 13 stay: three go
    k = rng.standard_normal((1, HKV, n, 64))
    k[:, :, [3, 7, 12]] = k[:, :, [1, 1, 1]]  # positions 1, 3, 7, 12 share a key
    kept = kept_slots(jnp.zeros((1, W, HQ, 64)), jnp.asarray(k, jnp.float32), jnp.asarray([n]), budget, 1)
    assert set(range(n)) - set(np.asarray(kept)[0, 0].tolist()) == {1, 3, 7}


@pytest.mark.parametrize("groups", [1, HKV])
def test_prefill_keeps_the_rkv_selection_of_long_prompts(groups):
    rng = np.random.default_rng(3)
    lengths = np.array([30, 12, 20])  # budget 12: rows 0 and 2 are compressed, row 1 fits exactly
    budget, capacity, seq = 12, 16, 30
    q = (2 * rng.standard_normal((3, seq, HQ, D))).astype(np.float32)
    k = _keys_with_repeats(rng, 3, seq).transpose(0, 2, 1, 3).astype(np.float32)  # [B, P, Hkv, D]
    v = rng.standard_normal(k.shape).astype(np.float32)
    layer = prefill_layer(*map(jnp.asarray, (q, k, v)), jnp.asarray(lengths), budget, capacity, groups)
    slot_pos = np.asarray(layer.slot_pos)
    for b, n in enumerate(lengths):
        if n > budget:
            want = numpy_rkv(q[b, n - W : n], k[b, :n].transpose(1, 0, 2), budget, groups)
        else:
            want = np.broadcast_to(np.arange(n), (groups, n))
        np.testing.assert_array_equal(slot_pos[b, :, : want.shape[1]], want)
        assert (slot_pos[b, :, want.shape[1] :] == -1).all()
        for h in range(HKV):  # the kept tokens' keys and values, in slot order
            np.testing.assert_array_equal(
                np.asarray(layer.k)[b, h, : want.shape[1]], k[b, want[h % groups], h]
            )
            np.testing.assert_array_equal(
                np.asarray(layer.v)[b, h, : want.shape[1]], v[b, want[h % groups], h]
            )
        # The query ring holds position p's queries at p % W for the newest W positions.
        ring = np.asarray(layer.recent_queries)[b]
        for p in range(n - W, n):
            np.testing.assert_array_equal(ring[p % W], q[b, p])
    np.testing.assert_array_equal(
        np.asarray(layer.evict_slot), np.minimum(lengths, budget)[:, None].repeat(groups, 1)
    )


FILLED = (16, 13, 16, 9)  # capacity 16: rows 0 and 2 are full


def _layer_with_history(rng, groups):
    """A layer of capacity 16 after some compressions, its rows filled to FILLED: a full row holds per
    group its own older positions in order, then the newest W positions, which end at a different
    position in each row; the others hold positions 0, 1, ...; returns it and each row's newest position."""
    capacity, batch = 16, len(FILLED)
    slot_pos = np.full((batch, groups, capacity), -1, np.int32)
    newest = np.empty(batch, np.int32)
    for b, n in enumerate(FILLED):
        first_window = 30 + 5 * b if n == capacity else n - W
        for g in range(groups):
            older = (
                np.sort(rng.choice(first_window, n - W, replace=False)) if n == capacity else np.arange(n - W)
            )
            slot_pos[b, g, :n] = np.concatenate([older, np.arange(first_window, first_window + W)])
        newest[b] = first_window + W - 1
    seq = jnp.zeros((batch, 1, HKV, D), jnp.float32)
    empty = jnp.full((batch, groups, 1), -1, jnp.int32)
    layer = layer_from_kept(seq, seq, empty, capacity).replace(
        k=jnp.asarray(_keys_with_repeats(rng, batch, capacity), jnp.float32),
        v=jnp.asarray(rng.standard_normal((batch, HKV, capacity, D)), jnp.float32),
        slot_pos=jnp.asarray(slot_pos),
        evict_slot=jnp.asarray(np.array(FILLED)[:, None].repeat(groups, 1) - 1, jnp.int32),
        recent_queries=jnp.asarray(2 * rng.standard_normal((batch, W, HQ, D)), jnp.float32),
    )
    return layer, newest


@pytest.mark.parametrize("groups", [1, HKV])
def test_each_full_row_is_compacted_to_its_own_selection_and_the_others_are_left(groups):
    """Rows at different fill levels, two of them full at once: each full row gets the selection of
    its own keys and queries alone (numpy), the other rows keep everything."""
    rng = np.random.default_rng(5)
    layer, pos = _layer_with_history(rng, groups)
    budget, batch = 12, len(FILLED)
    q = jnp.asarray(2 * rng.standard_normal((batch, HQ, D)), jnp.float32)
    new = decode_update(layer, q, jnp.asarray(pos), budget)
    ring = np.asarray(layer.recent_queries).copy()
    ring[np.arange(batch), pos % W] = q
    np.testing.assert_array_equal(np.asarray(new.recent_queries), ring)
    old_pos, new_pos = np.asarray(layer.slot_pos), np.asarray(new.slot_pos)
    for b, n in enumerate(FILLED):
        if n < layer.capacity:
            for x_new, x_old in ((new.k, layer.k), (new.v, layer.v), (new.slot_pos, layer.slot_pos)):
                np.testing.assert_array_equal(np.asarray(x_new)[b], np.asarray(x_old)[b])
            continue
        want = numpy_rkv(ring[b], np.asarray(layer.k)[b], budget, groups)  # slot indices of row b
        for g in range(groups):
            np.testing.assert_array_equal(new_pos[b, g, :budget], old_pos[b, g, want[g]])
        assert (new_pos[b, :, budget:] == -1).all()
        for h in range(HKV):
            for x_new, x_old in ((new.k, layer.k), (new.v, layer.v)):
                np.testing.assert_array_equal(
                    np.asarray(x_new)[b, h, :budget], np.asarray(x_old)[b, h, want[h % groups]]
                )
                assert (np.asarray(x_new)[b, h, budget:] == 0).all()  # evicted keys and values are gone
    want_filled = np.where(np.array(FILLED) == layer.capacity, budget, FILLED)
    np.testing.assert_array_equal(np.asarray(new.evict_slot), want_filled[:, None].repeat(groups, 1))


CONFIG = lf.ModelConfig(
    model_type="qwen3", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=HQ,
    num_kv_heads=HKV, head_dim=D, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=256,
    qk_norm=True,
)  # fmt: skip
PARAMS = lf.init_random_params(CONFIG, seed=3, scale=0.2)


def test_budget_covering_everything_equals_full():
    """A budget of prompt + new tokens never compresses: "rkv" gives the full cache's tokens."""
    ids, lengths = make_prompts(CONFIG, [6, 13, 9], seed=0)
    new = 20
    full = lf.generate(PARAMS, CONFIG, ids, lengths, max_new_tokens=new)
    comp = lf.CompressionConfig(policy="rkv", budget=ids.shape[1] + new, rkv_buffer=4)
    assert generate_module.buffer_capacity(comp, ids.shape[1], new) == ids.shape[1] + new
    got = lf.generate(PARAMS, CONFIG, ids, lengths, max_new_tokens=new, compression=comp)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(full.tokens))
    np.testing.assert_array_equal(np.asarray(got.cache_occupancy), np.asarray(full.cache_occupancy))


def test_decoding_fills_the_buffer_then_compresses_to_the_budget():
    """Step by step through the public pieces: occupancy climbs to budget + buffer and drops to the
    budget, an evicted position never comes back, and every kept slot still holds its token's key."""
    budget, buffer, steps = 12, 4, 24
    comp = lf.CompressionConfig(policy="rkv", budget=budget, rkv_buffer=buffer, granularity="kv_head")
    ids, lengths = make_prompts(CONFIG, [5, 20], seed=1)  # row 1 is compressed at prefill
    capacity = generate_module.buffer_capacity(comp, ids.shape[1], steps + 1)
    assert capacity == budget + buffer
    prefill = jax.jit(lf.prefill, static_argnums=(1, 4, 5))
    cache, logits = prefill(PARAMS, CONFIG, jnp.asarray(ids), jnp.asarray(lengths), comp, capacity)
    step = jax.jit(
        lambda c, t, p: lf.decode_step(PARAMS, CONFIG, c, t, p, jax.random.PRNGKey(0), compression=comp)
    )
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    key_of = {}  # (layer, row, head, position) -> its key, from the step that wrote it

    def check(cache, present_before, new_pos):
        present = []
        for i, layer in enumerate(cache.layers):
            slot_pos, k = np.asarray(layer.slot_pos), np.asarray(layer.k)
            rows = []
            for b in range(2):
                heads = []
                for h in range(HKV):
                    held = slot_pos[b, h][slot_pos[b, h] >= 0]
                    assert (np.diff(held) > 0).all()  # position order
                    for s, p in enumerate(held):
                        np.testing.assert_array_equal(k[b, h, s], key_of.setdefault((i, b, h, p), k[b, h, s]))
                    if present_before is not None:
                        allowed = present_before[i][b][h] | {int(new_pos[b])}
                        assert set(held.tolist()) <= allowed
                    heads.append(set(held.tolist()))
                rows.append(heads)
            present.append(rows)
        return present

    present = check(cache, None, None)
    occupancies, tokens = [np.asarray(occupancy(cache.layers[0]))], [np.asarray(token)]
    for t in range(steps):
        positions = jnp.asarray(lengths) + t
        logits, cache, _ = step(cache, token, positions)
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        present = check(cache, present, np.asarray(positions))
        occupancies.append(np.asarray(occupancy(cache.layers[0])))
        tokens.append(np.asarray(token))
    # Each write adds a token; the write that fills the 16 slots compresses the row back to 12 (row 0
    # after 11 writes, row 1, compressed to 12 at prefill, after 4), then every 4th write again.
    want = [np.minimum(lengths, budget)]
    for _ in range(steps):
        want.append(np.where(want[-1] + 1 < capacity, want[-1] + 1, budget))
    np.testing.assert_array_equal(np.stack(occupancies, 1), np.stack(want, 1))
    # generate's while_loop takes the same path.
    out = lf.generate(PARAMS, CONFIG, ids, lengths, max_new_tokens=steps + 1, compression=comp)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.stack(tokens, 1))
    np.testing.assert_array_equal(np.asarray(out.cache_occupancy), want[-1])


def test_bad_rkv_settings_fail_clearly():
    with pytest.raises(ValueError, match=r"policy 'rkv' needs budget > its observation window \(8\), got 8"):
        lf.CompressionConfig(policy="rkv", budget=8)
    with pytest.raises(ValueError, match="rkv_buffer must be >= 1, got 0"):
        lf.CompressionConfig(policy="rkv", budget=16, rkv_buffer=0)
    with pytest.raises(ValueError, match="rkv_buffer must be an int"):
        lf.CompressionConfig(policy="rkv", budget=16, rkv_buffer=2.0)
    with pytest.raises(ValueError, match="policy 'rkv' needs attention_impl='reference'"):
        check_attention_impl("pallas", lf.CompressionConfig(policy="rkv", budget=16))
