"""kv_cache: the slot buffer built from prefill, written per token, and read, against numpy."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import count_decode_step_traces, generate_module, make_prompts

import longflow_jax as lf
from longflow_jax.config import CompressionConfig, SamplingConfig
from longflow_jax.kv_cache import (
    KVCache,
    cache_bytes,
    evicted_positions,
    kv_bytes_for,
    kv_valid,
    layer_from_kept,
    occupancy,
    write_token,
)
from pallas_kernels import quant

BATCH, PROMPT, KV_HEADS, HEAD_DIM, CAPACITY = 2, 9, 2, 3, 7


@pytest.fixture(scope="module")
def qwen3(tiny_checkpoints):
    return lf.load(tiny_checkpoints["qwen3"][1])


def _kept(groups):
    """kept_pos [B, G, 5]: row 0 keeps 5 positions (per group its own), row 1 keeps 3 then -1."""
    kept = np.array([[[0, 2, 3, 6, 8], [1, 2, 4, 5, 7]], [[0, 1, 4, -1, -1], [2, 3, 4, -1, -1]]], np.int32)
    return kept[:, :groups]


def _prompt_kv(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shape = (BATCH, PROMPT, KV_HEADS, HEAD_DIM)
    return (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))


@pytest.mark.parametrize("groups", [1, KV_HEADS])
def test_layer_from_kept_gathers_kept_positions_then_empty_slots(groups):
    k_seq, v_seq = _prompt_kv()
    kept = _kept(groups)
    layer = layer_from_kept(k_seq, v_seq, jnp.asarray(kept), CAPACITY)
    for name, seq in (("k", k_seq), ("v", v_seq)):
        want = np.zeros((BATCH, KV_HEADS, CAPACITY, HEAD_DIM), np.float32)
        for b in range(BATCH):
            for h in range(KV_HEADS):
                for j, p in enumerate(kept[b, 0 if groups == 1 else h]):
                    if p >= 0:
                        want[b, h, j] = np.asarray(seq)[b, p, h]
        np.testing.assert_array_equal(np.asarray(getattr(layer, name)), want, err_msg=name)
    want_pos = np.full((BATCH, groups, CAPACITY), -1, np.int32)
    want_pos[:, :, : kept.shape[2]] = kept
    np.testing.assert_array_equal(np.asarray(layer.slot_pos), want_pos)
    np.testing.assert_array_equal(np.asarray(layer.evict_slot), (kept >= 0).sum(-1))  # first empty slot
    np.testing.assert_array_equal(np.asarray(layer.score), np.zeros((BATCH, groups, CAPACITY)))
    assert layer.capacity == CAPACITY and layer.slot_pos.dtype == jnp.int32


@pytest.mark.parametrize("kv_quant", ["int8", "fp8", "int4", "int2"])
@pytest.mark.parametrize("groups", [1, KV_HEADS])
def test_layer_from_kept_quantized_equals_quantizing_the_gathered_slots(kv_quant, groups):
    """The prompt is quantized before its tokens are gathered into slots: the buffer must equal the
    slots gathered in numpy (empty ones zero), keys rotated, then quantized as a whole."""
    head_dim, group = 32, 16
    rng = np.random.default_rng(3)
    shape = (BATCH, PROMPT, KV_HEADS, head_dim)
    k_seq, v_seq = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in "kv")
    kept = _kept(groups)
    layer = layer_from_kept(k_seq, v_seq, jnp.asarray(kept), CAPACITY, kv_quant, group)
    slots = {name: np.zeros((BATCH, KV_HEADS, CAPACITY, head_dim), np.float32) for name in "kv"}
    for b in range(BATCH):
        for h in range(KV_HEADS):
            for j, p in enumerate(kept[b, 0 if groups == 1 else h]):
                if p >= 0:
                    slots["k"][b, h, j] = np.asarray(k_seq, np.float32)[b, p, h]
                    slots["v"][b, h, j] = np.asarray(v_seq, np.float32)[b, p, h]
    k_slots, v_slots = (jnp.asarray(slots[name], jnp.bfloat16) for name in "kv")
    k_payload, v_payload, side = quant.quantize_kv(quant.hadamard_rotate(k_slots), v_slots, kv_quant, group)
    want = dict(k=k_payload, v=v_payload, **side._asdict())
    for name, x in want.items():
        if x is not None:
            np.testing.assert_array_equal(np.asarray(getattr(layer, name)), np.asarray(x), err_msg=name)
    assert layer.kv_quant == kv_quant and layer.kv_quant_group == group


def test_layer_from_kept_needs_a_free_slot():
    k_seq, v_seq = _prompt_kv()
    kept = jnp.asarray(np.tile(np.arange(5, dtype=np.int32), (BATCH, 1, 1)))
    with pytest.raises(ValueError, match="prefill keeps 5 tokens but the buffer has only 5 slots"):
        layer_from_kept(k_seq, v_seq, kept, 5)


def _scrambled_layer(groups, seed=1):
    """A layer with random contents, a random H2O score and an evict slot per group."""
    rng = np.random.default_rng(seed)
    k_seq, v_seq = _prompt_kv()
    layer = layer_from_kept(k_seq, v_seq, jnp.asarray(_kept(groups)), CAPACITY)
    shape = (BATCH, KV_HEADS, CAPACITY, HEAD_DIM)
    return layer.replace(
        k=jnp.asarray(rng.standard_normal(shape), jnp.float32),
        v=jnp.asarray(rng.standard_normal(shape), jnp.float32),
        score=jnp.asarray(rng.uniform(0.1, 1.0, layer.score.shape), jnp.float32),
        evict_slot=jnp.asarray(rng.integers(0, CAPACITY, (BATCH, groups)), jnp.int32),
    )


@pytest.mark.parametrize("groups", [1, KV_HEADS])
def test_write_token_writes_only_the_evict_slot(groups):
    layer = _scrambled_layer(groups)
    rng = np.random.default_rng(2)
    k_new = rng.standard_normal((BATCH, KV_HEADS, HEAD_DIM)).astype(np.float32)
    v_new = rng.standard_normal((BATCH, KV_HEADS, HEAD_DIM)).astype(np.float32)
    pos = np.array([11, 20], np.int32)
    new = write_token(layer, jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(pos))
    slot = np.asarray(layer.evict_slot)
    want = {name: np.array(getattr(layer, name)) for name in ("k", "v", "slot_pos", "score")}
    for b in range(BATCH):
        for h in range(KV_HEADS):
            s = slot[b, 0 if groups == 1 else h]
            want["k"][b, h, s], want["v"][b, h, s] = k_new[b, h], v_new[b, h]
        for g in range(groups):
            want["slot_pos"][b, g, slot[b, g]] = pos[b]
            want["score"][b, g, slot[b, g]] = 0.0
    for name, value in want.items():
        np.testing.assert_array_equal(np.asarray(getattr(new, name)), value, err_msg=name)
    np.testing.assert_array_equal(np.asarray(new.evict_slot), slot)  # the policy moves it, not the write


def test_write_token_casts_to_the_buffer_dtype():
    k_seq, v_seq = _prompt_kv(dtype=jnp.bfloat16)
    layer = layer_from_kept(k_seq, v_seq, jnp.asarray(_kept(1)), CAPACITY)
    k_new = jnp.full((BATCH, KV_HEADS, HEAD_DIM), 1.0 / 3.0, jnp.float32)
    new = write_token(layer, k_new, k_new, jnp.asarray([5, 3]))
    assert new.k.dtype == new.v.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(new.k[0, :, 5], np.float32), np.asarray(k_new[0].astype(jnp.bfloat16), np.float32)
    )


@pytest.mark.parametrize("groups", [1, KV_HEADS])
def test_evicted_positions_reads_slot_pos_at_evict_slot(groups):
    layer = _scrambled_layer(groups)
    slot_pos, slot = np.asarray(layer.slot_pos), np.asarray(layer.evict_slot)
    want = np.array([[slot_pos[b, g, slot[b, g]] for g in range(groups)] for b in range(BATCH)])
    np.testing.assert_array_equal(np.asarray(evicted_positions(layer)), want)


def test_kv_valid_and_occupancy_read_group_zero():
    k_seq, v_seq = _prompt_kv()
    layer = layer_from_kept(k_seq, v_seq, jnp.asarray(_kept(KV_HEADS)), CAPACITY)
    want_valid = np.zeros((BATCH, CAPACITY), bool)
    want_valid[0, :5] = want_valid[1, :3] = True
    np.testing.assert_array_equal(np.asarray(kv_valid(layer)), want_valid)
    np.testing.assert_array_equal(np.asarray(occupancy(layer)), [5, 3])
    assert occupancy(layer).dtype == jnp.int32


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cache_bytes_counts_k_and_v(dtype):
    k_seq, v_seq = _prompt_kv(dtype=dtype)
    layer = layer_from_kept(k_seq, v_seq, jnp.asarray(_kept(1)), CAPACITY)
    cache = KVCache(layers=[layer, layer, layer])
    want = 3 * 2 * BATCH * KV_HEADS * CAPACITY * HEAD_DIM * np.dtype(dtype).itemsize
    assert cache_bytes(cache) == want == kv_bytes_for(3, BATCH, KV_HEADS, CAPACITY, HEAD_DIM, dtype)


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
def test_long_run_keeps_exactly_budget_slots(qwen3, monkeypatch, granularity):
    config, params = qwen3
    calls = count_decode_step_traces(monkeypatch)
    budget = 8
    comp = CompressionConfig(policy="longflow", budget=budget, granularity=granularity)
    ids, lengths = make_prompts(config, [3, 10])
    out = lf.generate(
        params, config, ids, lengths, max_new_tokens=4 * budget + 1, compression=comp, return_debug=True
    )
    assert calls["n"] == 1
    np.testing.assert_array_equal(np.asarray(out.cache_occupancy), [budget, budget])
    ev = np.asarray(out.evicted_positions)  # [T, L, B, G]
    # Row 0 (prompt 3) fills slots 3..7 with its first 5 decode writes, then every write evicts.
    assert (ev[1:6, :, 0] == -1).all() and (ev[6:, :, 0] >= 0).all()
    # An evicted position is always older than the token being written.
    steps = np.arange(ev.shape[0])[:, None, None, None]
    assert (ev < (np.asarray(lengths)[None, None, :, None] + steps - 1)).all()


def test_a_stopped_rows_pad_writes_are_not_reported_as_evictions(qwen3):
    config, params = qwen3
    comp = CompressionConfig(policy="longflow", budget=8)
    ids, lengths = make_prompts(config, [3, 10], seed=1)
    options = dict(max_new_tokens=20, compression=comp, return_debug=True)
    free = lf.generate(params, config, ids, lengths, **options)
    stop = int(free.tokens[0, 7])
    stopped = lf.generate(
        params, config, ids, lengths, sampling=SamplingConfig(stop_token_ids=(stop,)), **options
    )
    for row in range(2):
        n = int(stopped.lengths[row])  # its last token, the stop id or the 20th, is index n - 1
        ev_free, ev = (
            np.asarray(free.evicted_positions)[:, :, row],
            np.asarray(stopped.evicted_positions)[:, :, row],
        )
        np.testing.assert_array_equal(ev[:n], ev_free[:n])  # its own writes, as before
        assert (ev[n:] == -1).all(), ev[n:]
    # Row 0 stops at its 8th token: the buffer was full by then, so every write there evicted (a
    # stopped row's pads did, before), and its last own write (step 7) is still reported.
    assert int(stopped.lengths[0]) == 8 and (np.asarray(free.evicted_positions)[7:, :, 0] >= 0).all()


def test_budget_beyond_the_generation_allocates_no_more_than_full(qwen3):
    config, params = qwen3
    ids, lengths = make_prompts(config, [6, 10])
    comp = CompressionConfig(policy="longflow", budget=256)
    capacity = generate_module.buffer_capacity(comp, ids.shape[1], 12)
    assert capacity == ids.shape[1] + 12
    assert generate_module.buffer_capacity(CompressionConfig(policy="longflow", budget=16), 10, 12) == 16
    cache, _ = lf.prefill(params, config, jnp.asarray(ids), jnp.asarray(lengths), comp, capacity)
    assert cache.layers[0].k.shape[2] == capacity
