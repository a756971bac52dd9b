"""ThinKV as a cache policy: generate against the full cache, the cache's bookkeeping against a plain
Python simulation of the method, a long run with eviction, and the config's checks."""

import dataclasses
import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import generate_module, make_prompts

import longflow_jax as lf
from longflow_jax import kv_cache, thinkv
from longflow_jax.config import ThinKVConfig
from longflow_jax.kv_cache import KVCache, write_slots, write_token
from longflow_jax.thinkv import EXECUTION, REASONING, TRANSITION
from pallas_kernels import longflow_decode_attention, quant

T, E, R = TRANSITION, EXECUTION, REASONING
CONFIG = lf.ModelConfig(
    model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=1024,
)  # fmt: skip
GROUP = 16  # kv_quant_group: head_dim 16


# The Pallas kernel's GPU body (interpreted on CPU) dots 16-column slices of a payload row: an int2 row of
# head_dim 64 is 16 bytes.
KERNEL_CONFIG = dataclasses.replace(CONFIG, head_dim=64)


def random_params(config):
    """Random weights drawn in numpy (no per-tensor compile), large: no near-ties in greedy decoding."""
    rng = np.random.default_rng(0)
    draw = lambda sd: (1.0 if len(sd.shape) == 1 else 0.0) + 0.2 * rng.standard_normal(sd.shape)
    return jax.tree.map(lambda sd: jnp.asarray(draw(sd), sd.dtype), lf.param_shapes(config))


@pytest.fixture(scope="module")
def params():
    return random_params(CONFIG)


def test_thinkv_without_loss_equals_the_full_cache(params):
    """Segments kept whole (schedule starts at tau) at the model's dtype, a budget that holds them all,
    and no transition segment (hi = 1: no row is all tiny weights), so nothing is dropped: the tokens
    move from the window into the tier every tau steps and generate matches the full cache."""
    ids, lengths = make_prompts(CONFIG, [10, 7], seed=1)
    tk = ThinKVConfig(tau=8, schedule=(8, 4, 1), precisions="R16E16T16", layers=(1,), thresholds=(0.4, 1.0))
    comp = lf.CompressionConfig(policy="thinkv", budget=1000, thinkv=tk)
    full = lf.generate(params, CONFIG, ids, lengths, max_new_tokens=40)
    out = lf.generate(params, CONFIG, ids, lengths, max_new_tokens=40, compression=comp)
    np.testing.assert_array_equal(out.tokens, full.tokens)
    np.testing.assert_array_equal(out.cache_occupancy, full.cache_occupancy)  # 4 segments in the tier
    # Teacher-forced along the same tokens (the fidelity harness's path), the distributions agree too.
    scores = lf.score_trajectory(params, CONFIG, ids, lengths, full.tokens, full.lengths, compression=comp)
    assert np.asarray(scores.top1_agree)[np.asarray(scores.mask)].all()
    assert np.abs(np.asarray(scores.kl)).max() < 1e-5
    # The budget counts the classified segments' tokens only, so one past the model's length still
    # compresses (it was refused: "use policy='full'"); here it keeps the same tokens.
    over = dataclasses.replace(comp, budget=CONFIG.max_position_embeddings + 1)
    out = lf.generate(params, CONFIG, ids, lengths, max_new_tokens=40, compression=over)
    np.testing.assert_array_equal(out.tokens, full.tokens)


# The step-by-step API's cases: tau 4 over a 6-token prompt.
STEP_BY_STEP = lf.CompressionConfig(
    policy="thinkv", budget=8, kv_quant_group=GROUP,
    thinkv=ThinKVConfig(tau=4, schedule=(2, 1), layers=(0,), thresholds=(0.2, 0.5)),
)  # fmt: skip


def test_decode_step_names_a_cache_that_skipped_ready_to_decode(params):
    ids, lengths = make_prompts(CONFIG, [6], seed=2)
    comp = STEP_BY_STEP
    cache, logits = lf.prefill(params, CONFIG, ids, lengths, comp, ids.shape[1] + 4)
    with pytest.raises(ValueError, match="generate.ready_to_decode"):
        lf.decode_step(
            params, CONFIG, cache, jnp.argmax(logits, -1), lengths, jax.random.PRNGKey(0), compression=comp
        )


def test_decode_step_refuses_a_window_or_segment_table_it_would_lose_tokens_in(params):
    # A larger capacity split the first segment wrongly (typed from tau of its steps, the rest left in
    # the main buffer for good); a segment past the table that ready_to_decode sized was dropped.
    ids, lengths = make_prompts(CONFIG, [6], seed=2)
    comp = STEP_BY_STEP
    with pytest.raises(ValueError, match="capacity must be prompt_len \\+ tau = 10 for policy 'thinkv'"):
        lf.prefill(params, CONFIG, ids, lengths, comp, ids.shape[1] + 5)
    cache, logits = lf.prefill(params, CONFIG, ids, lengths, comp, ids.shape[1] + 4)
    cache = generate_module.ready_to_decode(cache, comp, "reference", 5)  # one segment: 4 writes
    key, token, positions = jax.random.PRNGKey(0), jnp.argmax(logits, -1), lengths
    for _ in range(7):  # the first segment closes at the 4th; 3 more fill the window but for one token
        _, cache, _ = lf.decode_step(params, CONFIG, cache, token, positions, key, compression=comp)
        positions = positions + 1
    assert int(cache.segments.count[0]) == 1
    with pytest.raises(ValueError, match="segment table holds 1 segments, all closed"):
        lf.decode_step(params, CONFIG, cache, token, positions, key, compression=comp)


# ---- the bookkeeping against a simulation ----

TAU, SCHEDULE, BUDGET = 6, (4, 2, 1), 12
SCRIPT = ("RETRRTE", "EERTTRR")  # one thought type per segment, per row
SPARSITY = {E: 0.1, R: 0.5, T: 0.9}  # with thresholds (0.3, 0.7)
IMPORTANCE = {T: 0, E: 1, R: 2}  # demoted first to last


def simulate(script, budget=BUDGET, schedule=SCHEDULE):
    """The levels after each segment in plain Python (docs/THINKV.md): a new T steps the older ones
    down; then, over budget, the weakest type's oldest segment steps down, never below the last."""
    levels, last = [], len(schedule) - 1
    for i, kind in enumerate(script):
        if kind == T:
            levels = [min(lv + 1, last) for lv in levels]
        levels.append(0)
        while sum(schedule[lv] for lv in levels) > budget:
            movable = [j for j in range(i + 1) if levels[j] < last]
            if not movable:
                break
            levels[min(movable, key=lambda j: (IMPORTANCE[script[j]], j))] += 1
    return levels


stored_kv = jax.jit(lf.kv_cache.dequantized_kv)


def numpy_quantized(x, kind):
    """x [..., D] as an asymmetric int4 / int2 slot stores it (pallas_kernels/quant.py's rule), in numpy."""
    levels = {"int4": 15, "int2": 3}[kind]
    g = x.reshape(*x.shape[:-1], -1, GROUP).astype(np.float32)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    scale = (hi - lo) / np.float32(levels)
    codes = np.clip(np.round((g - lo) / np.where(scale > 0, scale, 1)), 0, levels)
    return (codes * scale + lo).reshape(x.shape)


def _scripted_step(cache, k_new, v_new, positions, step_sparsity, comp):
    """One decode step's cache work with a scripted sparsity: each layer writes its token and counts
    it as `thinkv.attend` does, then the window closes when full."""
    layers = []
    for layer, k, v in zip(cache.layers, k_new, v_new):
        layer = write_token(layer, k, v, positions)
        state = layer.thinkv
        if state.sparsity_sum is not None:
            state = state.replace(sparsity_sum=state.sparsity_sum + step_sparsity)
        layers.append(layer.replace(evict_slot=layer.evict_slot + 1, thinkv=state))
    return thinkv.close_full_segment(cache.replace(layers=layers), comp)


def test_bookkeeping_matches_a_simulation():
    """After a scripted run of 7 segments (plus 2 tokens in the window) in two rows with different types:
    the types, levels, tokens kept per segment and slots used per tier are the simulation's, and every
    kept token's slot holds that token's own K/V (quantized as its tier quantizes)."""
    tk = ThinKVConfig(tau=TAU, schedule=SCHEDULE, precisions="R4E4T2", layers=(0,), thresholds=(0.3, 0.7))
    comp = lf.CompressionConfig(policy="thinkv", budget=BUDGET, kv_quant_group=GROUP, thinkv=tk)
    code = {"T": T, "E": E, "R": R}
    script = [[code[c] for c in row] for row in SCRIPT]
    batch, kv_heads, dim, prompt_len, num_layers = 2, 2, 16, 3, 2
    lengths = np.array([3, 2])
    steps = len(SCRIPT[0]) * TAU + 2
    rng = np.random.default_rng(0)
    prompt_k, prompt_v = rng.standard_normal((2, num_layers, batch, prompt_len, kv_heads, dim))
    new_k, new_v = rng.standard_normal((2, steps, num_layers, batch, kv_heads, dim)).astype(np.float32)

    @jax.jit
    def start(prompt_k, prompt_v):
        layers = [
            thinkv.prefill_layer(k, v, jnp.asarray(lengths), prompt_len + TAU)
            for k, v in zip(prompt_k, prompt_v)
        ]
        return thinkv.attach(KVCache(layers=layers), comp, max_new_tokens=steps + 1)

    cache = start(prompt_k.astype(np.float32), prompt_v.astype(np.float32))
    step = jax.jit(functools.partial(_scripted_step, comp=comp))
    for g in range(steps):
        sparsity = jnp.asarray([SPARSITY[row[min(g // TAU, len(row) - 1)]] for row in script], jnp.float32)
        cache = step(cache, jnp.asarray(new_k[g]), jnp.asarray(new_v[g]), jnp.asarray(lengths + g), sparsity)

    segments = len(SCRIPT[0])
    table = cache.segments
    np.testing.assert_array_equal(table.count, [segments] * batch)
    np.testing.assert_array_equal(table.types, script)
    want_levels = [simulate(row) for row in script]
    np.testing.assert_array_equal(table.levels, want_levels)
    kept = np.asarray(SCHEDULE)[np.asarray(want_levels)]  # [B, S]
    assert all(set(row) == {0, 1, 2} for row in want_levels)  # the script reaches every level
    assert thinkv.tier_kinds(tk) == ("int2", "int4")  # in type-code order: T's, then E's and R's
    tier_of = {T: 0, E: 1, R: 1}
    for layer_index, layer in enumerate(cache.layers):
        main_pos = np.asarray(layer.slot_pos[:, 0])
        for b in range(batch):  # the prompt stays, the window holds the last 2 tokens
            want_main = list(range(lengths[b])) + [lengths[b] + steps - 2, lengths[b] + steps - 1]
            assert sorted(main_pos[b][main_pos[b] >= 0].tolist()) == want_main
        slots = np.asarray(layer.thinkv.segment_slots)
        for t, tier in enumerate(layer.thinkv.tiers):
            pos = np.asarray(tier.slot_pos[:, 0])
            where = []  # (row, slot, generated index) of every kept token in this tier
            for b in range(batch):
                mine = [j for j in range(segments) if tier_of[script[b][j]] == t]
                assert (pos[b] >= 0).sum() == kept[b, mine].sum()  # slots used in this tier
                held = []
                for j in mine:
                    seg = slots[b, j][slots[b, j] >= 0]
                    assert seg.size == kept[b, j] and np.unique(seg).size == seg.size
                    held += seg.tolist()
                    gen = pos[b, seg] - lengths[b]  # the generated index of each kept token
                    assert ((gen >= j * TAU) & (gen < (j + 1) * TAU)).all(), (b, j, gen)
                    where += [(b, slot, g) for slot, g in zip(seg, gen)]
                assert sorted(held) == sorted(np.flatnonzero(pos[b] >= 0).tolist())
            b, slot, g = np.asarray(where).T
            k_deq, v_deq = (np.asarray(x)[b, :, slot] for x in stored_kv(tier))
            k_own = new_k[g, layer_index, b] @ quant.hadamard_matrix(dim)  # [n, Hkv, D], rotated
            for stored, own in ((k_deq, k_own), (v_deq, new_v[g, layer_index, b])):
                np.testing.assert_allclose(stored, numpy_quantized(own, tier.kv_quant), atol=1e-5)


# ---- a long run ----


def test_long_run_with_eviction_keeps_its_memory(params):
    """300 tokens with a budget of 60: the run compiles once (a second prompt reuses it), the tokens held
    stay within prompt + window + the tiers' bound, and kv_cache_bytes is what the cache allocates."""
    tk = ThinKVConfig(tau=8, schedule=(4, 2, 1), layers=(0, 1), thresholds=(0.3, 0.6))
    comp = lf.CompressionConfig(policy="thinkv", budget=60, kv_quant_group=GROUP, thinkv=tk)
    new_tokens, batch, prompt_len = 300, 2, 10
    run, _ = lf.compile_generate(
        params, CONFIG, batch=batch, prompt_len=prompt_len, max_new_tokens=new_tokens, compression=comp,
        sampling=lf.SamplingConfig(ignore_eos=True),
    )  # fmt: skip
    segments = thinkv.num_segments(tk.tau, new_tokens)
    window = (new_tokens - 1) % tk.tau
    for seed in (1, 2):
        ids, lengths = make_prompts(CONFIG, [10, 6], seed=seed)
        out = run(params, ids, lengths)
        assert not np.asarray(out.nonfinite).any()
        np.testing.assert_array_equal(out.lengths, [new_tokens] * batch)
        held = np.asarray(out.cache_occupancy) - lengths - window  # in the tiers
        assert (held >= segments * tk.schedule[-1]).all()  # every segment keeps its floor
        assert (held <= max(comp.budget, segments * tk.schedule[-1])).all()
        assert (held < segments * tk.schedule[0]).all()  # eviction happened

    eff = generate_module.effective_compression(comp, prompt_len, new_tokens)
    capacity = generate_module.buffer_capacity(eff, prompt_len, new_tokens)

    def start():
        ids, lengths = jnp.zeros((batch, prompt_len), jnp.int32), jnp.full(batch, prompt_len)
        cache, _ = lf.prefill(params, CONFIG, ids, lengths, eff, capacity)
        return thinkv.attach(cache, eff, new_tokens)

    cache = jax.eval_shape(start)
    allocated = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
    assert lf.kv_cache_bytes(CONFIG, comp, batch, prompt_len, new_tokens) == allocated
    full_bytes = lf.kv_cache_bytes(CONFIG, lf.CompressionConfig(policy="full"), batch, prompt_len, new_tokens)
    assert allocated < full_bytes / 3


# ---- attention through the kernels ----


def numpy_attention(q, k, v, valid, scale):
    """Softmax attention in float64 numpy: q [B, Hq, D], k, v [B, Hkv, C, D], valid [B, C]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    logits = np.where(np.asarray(valid)[:, None, :], np.einsum("bhd,bhcd->bhc", q, k) * scale, -np.inf)
    with np.errstate(invalid="ignore"):  # a row with no valid slot: NaN
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        return np.einsum("bhc,bhcd->bhd", probs / probs.sum(-1, keepdims=True), v)


def test_merge_by_log_sum_exp_is_attention_over_the_concatenation():
    """Three buffers, one of them empty in row 1: merging each buffer's attention by its log-sum-exp
    equals attention over all of them at once."""
    rng = np.random.default_rng(0)
    batch, num_q_heads, num_kv_heads, dim, scale = 2, 4, 2, 8, 0.3
    q = rng.standard_normal((batch, num_q_heads, dim))
    sizes = (5, 3, 7)
    ks, vs = ([rng.standard_normal((batch, num_kv_heads, n, dim)) for n in sizes] for _ in range(2))
    valids = [rng.uniform(size=(batch, n)) < 0.7 for n in sizes]
    valids[0][:, 0] = True
    valids[1][1] = False
    outs, lses = [], []
    for k, v, valid in zip(ks, vs, valids):
        keys = np.repeat(k, num_q_heads // num_kv_heads, axis=1)
        logits = np.where(valid[:, None, :], np.einsum("bhd,bhcd->bhc", q, keys) * scale, -np.inf)
        with np.errstate(divide="ignore"):
            lses.append(jnp.asarray(np.log(np.exp(logits).sum(-1)), jnp.float32))  # -inf: empty
        outs.append(jnp.asarray(np.nan_to_num(numpy_attention(q, k, v, valid, scale)), jnp.float32))
    merged = thinkv.merge_attention(outs, lses)
    whole = numpy_attention(
        q, *(np.concatenate(x, axis=2) for x in (ks, vs)), np.concatenate(valids, 1), scale
    )
    np.testing.assert_allclose(np.asarray(merged), whole, rtol=1e-5, atol=1e-6)


def scattered_layer(index):
    """Layer `index` (0: in L*, 1: outside it) with a short prompt row, a half-full window and tokens
    scattered over an int4 and an int2 tier (and an empty model-dtype one), and a query for it."""
    tk = ThinKVConfig(tau=8, schedule=(4, 2, 1), precisions="R4E16T2", layers=(0,), thresholds=(0.3, 0.6))
    comp = lf.CompressionConfig(policy="thinkv", budget=12, kv_quant_group=GROUP, thinkv=tk)
    rng = np.random.default_rng(1)
    batch, num_q_heads, num_kv_heads, dim, prompt_len = 2, 8, 2, 64, 5
    prompt_k, prompt_v = rng.standard_normal((2, batch, prompt_len, num_kv_heads, dim)).astype(np.float32)
    lengths = jnp.asarray([5, 3])
    main = thinkv.prefill_layer(prompt_k, prompt_v, lengths, prompt_len + tk.tau)
    layer = thinkv.attach(KVCache(layers=[main, main]), comp, max_new_tokens=33).layers[index]
    assert [t.kv_quant for t in layer.thinkv.tiers] == ["int2", None, "int4"]
    for step in range(4):  # the window: 3 tokens before this step's, then this step's
        k, v = rng.standard_normal((2, batch, num_kv_heads, dim)).astype(np.float32)
        layer = write_token(layer, k, v, lengths + step).replace(evict_slot=layer.evict_slot + 1)
    layer = layer.replace(evict_slot=layer.evict_slot - 1)  # the step's token is at evict_slot
    tiers = list(layer.thinkv.tiers)
    for t, slots in ((0, [[1, 4, 6], [0, 2, 9]]), (2, [[3, 7, 8], [5, 10, 11]])):
        k, v = rng.standard_normal((2, batch, num_kv_heads, 3, dim)).astype(np.float32)
        tiers[t] = write_slots(tiers[t], k, v, jnp.full((batch, 3), 2), jnp.asarray(slots))
    layer = layer.replace(thinkv=layer.thinkv.replace(tiers=tiers))
    return layer, jnp.asarray(rng.standard_normal((batch, num_q_heads, dim)), jnp.float32)


def test_attend_through_the_kernel_matches_jnp():
    """A layer outside L*: the Pallas kernel per buffer, merged, gives the jnp path's attention, and the
    same layer."""
    layer, q = scattered_layer(1)
    assert layer.thinkv.sparsity_sum is None
    kernel = functools.partial(longflow_decode_attention, block_c=16)
    attend = jax.jit(thinkv.attend, static_argnums=(2, 3))
    out, after = attend(q, layer, 0.125, kernel)
    want, want_layer = attend(q, layer, 0.125, None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(after.evict_slot, want_layer.evict_slot)


def test_lstar_layer_on_the_kernel_adds_the_jnp_paths_sparsity():
    """A layer in L* with a kernel: the kernels' attention (as outside L*) and, from the logits alone,
    the sparsity the jnp path takes from the probabilities. Scale 0.5 makes the rows sparse enough to
    count (0.75 and 0.63 of their slots)."""
    layer, q = scattered_layer(0)
    assert layer.thinkv.sparsity_sum is not None
    kernel = functools.partial(longflow_decode_attention, block_c=16)
    attend = jax.jit(thinkv.attend, static_argnums=(2, 3))
    out, after = attend(q, layer, 0.5, kernel)
    want, want_layer = attend(q, layer, 0.5, None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(after.thinkv.sparsity_sum, want_layer.thinkv.sparsity_sum, rtol=1e-6)
    assert float(jnp.min(after.thinkv.sparsity_sum)) > 0.5
    np.testing.assert_array_equal(after.evict_slot, want_layer.evict_slot)


@pytest.mark.parametrize("block_slots", [3, 256])
def test_jnp_attend_in_blocks_is_attention_over_every_buffer(monkeypatch, block_slots):
    """A layer in L*, read in blocks of 3 slots (no buffer a multiple of it) and in one block: the
    output is float64 numpy attention over the buffers' dequantized K/V end to end, and the step's
    sparsity is numpy's count over those probabilities."""
    layer, q = scattered_layer(0)
    monkeypatch.setattr(thinkv, "JNP_BLOCK_SLOTS", block_slots)
    out, after = jax.jit(thinkv.attend, static_argnums=(2, 3))(q, layer, 0.125)
    buffers = [layer, *layer.thinkv.tiers]
    assert max(b.capacity for b in buffers) > block_slots or block_slots == 256
    # Keys in each buffer's basis (rotated in a quantized tier); q rotated alike there.
    qs = [np.asarray(kv_cache.queries_for_keys(b, q), np.float64) for b in buffers]
    k, v = ([np.asarray(kv_cache.dequantized_kv(b)[i], np.float64) for b in buffers] for i in (0, 1))
    valid = np.concatenate([np.asarray(kv_cache.kv_valid(b)) for b in buffers], axis=-1)
    group = q.shape[1] // layer.k.shape[1]
    logits = (
        np.concatenate(
            [np.einsum("bhd,bhcd->bhc", qb, np.repeat(kb, group, axis=1)) for qb, kb in zip(qs, k)], axis=-1
        )
        * 0.125
    )
    logits = np.where(valid[:, None, :], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.einsum("bhc,bhcd->bhd", probs, np.repeat(np.concatenate(v, axis=2), group, axis=1))
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    below = (probs < thinkv.SPARSITY_REL * probs.max(-1, keepdims=True)) & valid[:, None, :]
    sparsity = (below.sum(-1) / valid.sum(-1)[:, None]).mean(-1)
    np.testing.assert_allclose(np.asarray(after.thinkv.sparsity_sum), sparsity, rtol=1e-6)


@pytest.mark.parametrize("impl", ["pallas", pytest.param("triton", marks=pytest.mark.gpu)])
def test_generate_on_the_kernels_matches_reference(impl):
    """generate with a kernel (both layers on the kernel, layer 0 in L* adding its sparsity) gives the
    reference path's
    tokens over 4 classified segments that fill the int4 and int2 tiers."""
    if impl == "triton":
        from cuda_triton_bridge import triton_available

        if not triton_available():
            pytest.skip("needs triton, jax-triton and a CUDA GPU")
    params = random_params(KERNEL_CONFIG)
    ids, lengths = make_prompts(KERNEL_CONFIG, [9, 5], seed=3)
    tk = ThinKVConfig(tau=6, schedule=(4, 2, 1), precisions="R4E4T2", layers=(0,), thresholds=(0.2, 0.5))
    comp = lf.CompressionConfig(policy="thinkv", budget=10, kv_quant_group=GROUP, thinkv=tk)
    run = functools.partial(
        lf.generate, params, KERNEL_CONFIG, ids, lengths, max_new_tokens=26, compression=comp
    )
    ref, kernel = run(attention_impl="reference"), run(attention_impl=impl)
    np.testing.assert_array_equal(kernel.tokens, ref.tokens)
    np.testing.assert_array_equal(kernel.cache_occupancy, ref.cache_occupancy)
    held = np.asarray(ref.cache_occupancy) - lengths - (26 - 1) % tk.tau  # in the tiers
    assert (held >= thinkv.num_segments(tk.tau, 26) * tk.schedule[-1]).all()


# ---- the config's checks ----


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(tau=0), "tau must be a positive int"),
        (dict(schedule=(64, 64, 4)), "strictly decreasing"),
        (dict(schedule=(256, 4)), "the first <= tau"),
        (dict(schedule=()), "thinkv schedule"),
        (dict(precisions="R4E4T3"), "R<bits>E<bits>T<bits>"),
        (dict(precisions="E4R4T2"), "R<bits>E<bits>T<bits>"),
        (dict(layers=(1, 1)), "distinct layer indices"),
        (dict(layers=(-1,)), "distinct layer indices"),
        (dict(thresholds=(0.8, 0.2)), "0 <= lo <= hi <= 1"),
        (dict(thresholds=(0.2, 1.5)), "0 <= lo <= hi <= 1"),
        (dict(thresholds=(0.2,)), "0 <= lo <= hi <= 1"),
    ],
)
def test_thinkv_config_rejects_bad_values(fields, match):
    with pytest.raises(ValueError, match=match):
        ThinKVConfig(**fields)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(policy="thinkv", kv_quant="int4"), "kv_quant must be None for policy 'thinkv'"),
        (dict(policy="thinkv", granularity="kv_head"), "'sequence' for policy 'thinkv'"),
        (dict(policy="thinkv", thinkv="R4E4T2"), "a ThinKVConfig"),
        (dict(policy="longflow", thinkv=ThinKVConfig()), "policy 'thinkv' only"),
    ],
)
def test_compression_config_rejects_bad_thinkv_settings(fields, match):
    with pytest.raises(ValueError, match=match):
        lf.CompressionConfig(**fields)


def test_generate_checks_thinkv_against_the_model(params):
    """Checked before anything is traced: the layers exist, the tiers' kinds fit head_dim, and a run
    without calibration warns; the fused kernels take the policy."""
    ids, lengths = make_prompts(CONFIG, [4], seed=0)
    calibrated = ThinKVConfig(tau=4, schedule=(2, 1), layers=(0,), thresholds=(0.3, 0.6))

    def check(tk, group=GROUP, attention_impl="reference"):
        comp = lf.CompressionConfig(policy="thinkv", budget=8, kv_quant_group=group, thinkv=tk)
        generate_module.check_generate_inputs(
            CONFIG, ids, lengths, 9, comp, lf.SamplingConfig(), attention_impl
        )

    with pytest.raises(ValueError, match="thinkv layers must be < num_layers 2"):
        check(ThinKVConfig(layers=(2,), thresholds=(0.3, 0.6)))
    with pytest.raises(ValueError, match="kv_quant_group 32 must divide head_dim 16"):
        check(calibrated, group=32)
    with pytest.warns(UserWarning, match="without calibration"):
        check(ThinKVConfig(tau=4, schedule=(2, 1), thresholds=(0.3, 0.6)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(calibrated)
        check(calibrated, attention_impl="pallas")


def test_attention_layer_refuses_thinkv():
    """The segment table spans the layers, so the one-layer nnx attention cannot hold it."""
    from flax import nnx

    from longflow_jax.nnx import CompressedAttention

    with pytest.raises(ValueError, match="not in CompressedAttention"):
        CompressedAttention(CONFIG, compression=lf.CompressionConfig(policy="thinkv"), rngs=nnx.Rngs(0))


def test_from_calibration_reads_layers_and_thresholds(tmp_path):
    path = tmp_path / "thinkv.json"
    path.write_text(json.dumps({"layers": [5, 2, 9, 7], "thresholds": [0.41, 0.77]}))
    tk = ThinKVConfig.from_calibration(str(path), tau=64, schedule=(32, 8))
    assert (tk.layers, tk.thresholds, tk.tau, tk.schedule) == ((2, 5, 7, 9), (0.41, 0.77), 64, (32, 8))
    path.write_text(json.dumps({"layers": [1]}))
    with pytest.raises(ValueError, match="with 'layers' and 'thresholds'"):
        ThinKVConfig.from_calibration(str(path))
