"""generate(): compile-once decode loop, row independence, stopping, use inside user jit, prefill slices,
input errors; the generation controls (penalties against transformers, stop rules, log-probs against a
float reference), compile_generate, and the full cache's blocked reference attention."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import count_decode_step_traces, make_prompts
from helpers import generate_module as gen

import longflow_jax as lf
from longflow_jax.config import CompressionConfig, SamplingConfig


@pytest.fixture(scope="module")
def qwen3(tiny_checkpoints):
    return lf.load(tiny_checkpoints["qwen3"][1])


def test_decode_step_traced_once_per_shape(qwen3, monkeypatch):
    config, params = qwen3
    calls = count_decode_step_traces(monkeypatch)
    ids, lengths = make_prompts(config, [5, 11])
    comp = CompressionConfig(policy="longflow", budget=8)
    # a configuration no other test compiles, so the jit cache starts empty for it
    out = lf.generate(params, config, ids, lengths, max_new_tokens=37, compression=comp)
    assert int(out.lengths.min()) == 37
    assert calls["n"] == 1, "the decode loop body must be traced once for the whole generation"
    ids2, lengths2 = make_prompts(config, [3, 11])  # same shapes, other values: no retrace
    lf.generate(params, config, ids2, lengths2, max_new_tokens=37, compression=comp)
    assert calls["n"] == 1


def test_rows_are_independent(qwen3):
    config, params = qwen3
    ids, lengths = make_prompts(config, [7, 12, 5], seed=11)
    other, _ = make_prompts(config, [7, 12, 5], seed=12)
    mixed = ids.copy()
    mixed[1:] = other[1:]
    comp = CompressionConfig(policy="longflow", budget=8)
    a = lf.generate(params, config, ids, lengths, max_new_tokens=24, compression=comp)
    b = lf.generate(params, config, mixed, [7, 9, 3], max_new_tokens=24, compression=comp)
    np.testing.assert_array_equal(np.asarray(a.tokens[0]), np.asarray(b.tokens[0]))
    assert not np.array_equal(np.asarray(a.tokens[1]), np.asarray(b.tokens[1]))


def test_rows_stop_at_eos_and_pad_after(qwen3):
    config, params = qwen3
    ids, lengths = make_prompts(config, [6, 9, 4], seed=3)
    free = lf.generate(params, config, ids, lengths, max_new_tokens=24)
    tokens = np.asarray(free.tokens)
    eos = int(tokens[0, 5])  # make row 0's sixth token the EOS id
    first_hit = [int(np.argmax(r == eos)) if (r == eos).any() else None for r in tokens]
    stopped = lf.generate(
        params, config.replace(eos_token_ids=(eos,), pad_token_id=0), ids, lengths, max_new_tokens=24
    )
    for row in range(3):
        n = 24 if first_hit[row] is None else first_hit[row] + 1
        assert int(stopped.lengths[row]) == n
        np.testing.assert_array_equal(np.asarray(stopped.tokens[row, :n]), tokens[row, :n])
        assert (np.asarray(stopped.tokens[row, n:]) == 0).all()


def test_generate_inside_user_jit(qwen3):
    config, params = qwen3
    ids, lengths = make_prompts(config, [5, 8])
    comp = CompressionConfig(policy="longflow", budget=6)

    @jax.jit
    def user_fn(params, ids, lengths):
        out = lf.generate(params, config, ids, lengths, max_new_tokens=10, compression=comp)
        return out.tokens, out.lengths

    tokens, _ = user_fn(params, jnp.asarray(ids), jnp.asarray(lengths))
    direct = lf.generate(params, config, ids, lengths, max_new_tokens=10, compression=comp)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(direct.tokens))


def test_generate_outside_a_trace_compiles_with_the_compiler_options(qwen3, monkeypatch):
    """Called on arrays, generate runs the top-level program (COMPILER_OPTIONS); inside a user's jit
    (above) its ops join the user's program, as JAX takes compiler options only on the outermost jit."""
    config, params = qwen3
    ids, lengths = make_prompts(config, [5, 8])
    calls = []
    top_level = gen._generate_top_level
    monkeypatch.setattr(gen, "_generate_top_level", lambda *a, **k: calls.append(1) or top_level(*a, **k))
    out = lf.generate(params, config, ids, lengths, max_new_tokens=4)
    assert calls == [1] and int(out.lengths.min()) == 4
    assert lf.COMPILER_OPTIONS == {"xla_gpu_dot_merger_threshold_mb": 0}


@pytest.mark.gpu
def test_decode_loop_holds_no_merged_weight_copies():
    """On a GPU, at a few hundred rows: without COMPILER_OPTIONS XLA merges the q / k / v and the
    gate / up matmuls over concatenated weights (the precondition, checked), and with them (generate's
    own program) no weight is concatenated. Two layers of the Qwen3-4B shape at 400 rows, compiled
    only (no weights allocated)."""
    config = lf.ModelConfig(
        model_type="qwen3", vocab_size=1024, hidden_size=2560, intermediate_size=9728, num_layers=2,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=4096, dtype="bfloat16",
    )  # fmt: skip
    options = gen._options(
        64, CompressionConfig(policy="longflow", budget=32), None, "reference", False, 0, None
    )
    shapes = lf.param_shapes(config)
    merged = ("bf16[2560,19456]", "bf16[2560,6144]")  # gate|up, q|k|v

    def concatenated_weights(compiled):
        return [
            line
            for line in compiled.as_text().splitlines()
            if "concatenate(" in line and any(m in line for m in merged)
        ]

    compiled, _, _ = gen._compiled_generate(shapes, config, 400, 16, options)
    assert concatenated_weights(compiled) == []
    static = gen._static_options(config, False, **options)
    ids = jax.ShapeDtypeStruct((400, 16), jnp.int32)
    lengths = jax.ShapeDtypeStruct((400,), jnp.int32)
    key = jax.eval_shape(jax.random.PRNGKey, 0)
    plain = jax.jit(functools.partial(gen._generate, **static)).lower(shapes, ids, lengths, key).compile()
    assert concatenated_weights(plain), "XLA no longer merges these matmuls: the options may be moot"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lengths=[4, 0]), r"row 1 has 0 \(zero-length"),
        (dict(lengths=[4, 9]), r"prompt_lengths must be in \[1, 6\]"),
        (dict(max_new_tokens=600), "exceeds the model's max_position_embeddings 512"),
        (dict(prompt_len=513), "prompt length 513 exceeds"),
        (dict(compression=CompressionConfig(policy="longflow", budget=1024)), "budget 1024 is larger"),
        (dict(compression=CompressionConfig(policy="streaming", budget=6, num_sinks=5)), "num_sinks"),
        (dict(attention_impl="cuda"), "attention_impl must be one of"),
        (
            dict(attention_impl="pallas", compression=CompressionConfig(policy="h2o", budget=8)),
            "needs attention_impl='reference'",
        ),
        (dict(float_ids=True), "integer token ids"),
        (dict(max_new_tokens=0), "positive int"),
        (dict(max_new_tokens=True), "positive int"),
        (dict(lengths=[6.0, 5.5]), "integer token counts"),
        (dict(top_logprobs=2), "top_logprobs needs return_logprobs=True"),
        (dict(return_logprobs=True, top_logprobs=-1), "top_logprobs must be an int >= 0"),
        (dict(return_logprobs=True, top_logprobs=129), "top_logprobs must be <= vocab_size 128"),
        (dict(sampling=SamplingConfig(stop_token_ids=(128,))), "stop_token_ids must be < vocab_size 128"),
        (dict(seed=1.5), r"seed must be an int or a jax PRNG key .*got 1.5"),
        (dict(seed="3"), "seed must be an int or a jax PRNG key"),
        (dict(seed=jnp.zeros(3, jnp.uint32)), "seed must be an int or a jax PRNG key"),
    ],
)
def test_bad_inputs_fail_clearly(qwen3, kwargs, match):
    config, params = qwen3
    prompt_len = kwargs.pop("prompt_len", 6)
    ids = np.ones((2, prompt_len), np.int32)
    if kwargs.pop("float_ids", False):
        ids = ids.astype(np.float32)
    lengths = kwargs.pop("lengths", [prompt_len, 3])
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError, match=match):
        lf.generate(params, config, ids, lengths, **kwargs)


def test_empty_batch_fails_clearly(qwen3):
    config, params = qwen3
    with pytest.raises(ValueError, match="the batch is empty"):
        lf.generate(params, config, np.ones((0, 4), np.int32), np.ones((0,), np.int32), max_new_tokens=2)


def _without_last_layer(params):
    return {**params, "layers": params["layers"][:-1]}


def _reshaped_wq(params):
    layers = [dict(layer) for layer in params["layers"]]
    layers[1]["wq"] = layers[1]["wq"][:, :-1]
    return {**params, "layers": layers}


def _extra_tensor(params):
    return {**params, "rope_freqs": jnp.zeros(4)}


@pytest.mark.parametrize(
    "edit, match",
    [
        (_without_last_layer, r"params must hold 2 layers \(config.num_layers\), got 1"),
        (_reshaped_wq, r"params\['layers'\]\[1\]\['wq'\] has shape"),
        (_extra_tensor, r"params\['rope_freqs'\] is not a tensor"),
    ],
)
def test_params_that_do_not_match_the_config_fail_clearly(qwen3, edit, match):
    config, params = qwen3
    ids, lengths = make_prompts(config, [4, 3])
    with pytest.raises(ValueError, match=match):
        lf.generate(edit(params), config, ids, lengths, max_new_tokens=2)


def test_rows_whose_logits_turn_nonfinite_stop_and_are_reported(qwen3):
    """A NaN in the weights of one row's path is not hidden behind pad tokens: the row stops at the step
    whose logits are not finite and `nonfinite` says so; the other rows are untouched."""
    config, params = qwen3
    ids, lengths = make_prompts(config, [5, 4], seed=3)
    clean = lf.generate(params, config, ids, lengths, max_new_tokens=6)
    assert not np.asarray(clean.nonfinite).any()
    # Poison the embedding of a token row 0 never reads, in its prompt or its generated tokens (the tiny
    # vocabulary is small: a fixed id would sometimes be on row 0's path); row 1's prompt starts with it,
    # so row 1 goes NaN from the prefill on.
    want = lf.generate(params, config, ids[:1], lengths[:1], max_new_tokens=6)
    read_by_row0 = set(ids[0, : lengths[0]].tolist()) | set(np.asarray(want.tokens[0]).tolist())
    poison = next(t for t in range(1, config.vocab_size) if t not in read_by_row0)
    poisoned_ids = np.array(ids)
    poisoned_ids[1, 0] = poison
    embed = params["embed"].at[poison].set(jnp.nan)
    out = lf.generate({**params, "embed": embed}, config, poisoned_ids, lengths, max_new_tokens=6)
    assert np.asarray(out.nonfinite).tolist() == [False, True]
    assert int(out.lengths[1]) == 0
    np.testing.assert_array_equal(np.asarray(out.tokens[1]), config.pad_token_id)
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), np.asarray(want.tokens[0]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(policy="snap"), "unknown policy 'snap'"),
        (dict(policy="longflow", budget=1), "budget must be >= 2"),
        (dict(granularity="layer"), "granularity"),
    ],
)
def test_bad_compression_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionConfig(**kwargs)


def test_memory_planning_refuses_what_generate_refuses(qwen3):
    # kv_cache_bytes and max_batch size jobs `generate` can run: the same checks, the same messages,
    # and compression None is the full cache there as it is in generate.
    config, params = qwen3
    limit = config.max_position_embeddings
    streaming = CompressionConfig(policy="streaming", budget=6, num_sinks=5)
    for call, match in [
        (
            lambda: lf.max_batch(config, None, limit, 4, 1 << 30),
            "exceeds the model's max_position_embeddings",
        ),
        (lambda: lf.kv_cache_bytes(config, None, -3, 4, 8), "batch and prompt_len must be positive ints"),
        (lambda: lf.kv_cache_bytes(config, None, 2, 4, -8), "max_new_tokens must be a positive int"),
        (lambda: lf.max_batch(config, None, -8, 4, 1 << 30), "max_new_tokens must be a positive int"),
        (lambda: lf.max_batch(config, streaming, 8, 4, 1 << 30), "streaming needs num_sinks <= budget - 2"),
        # NaN and inf died in int() (inf an OverflowError), a string of digits was taken as a number
        *[
            (
                lambda bad=bad: lf.max_batch(config, None, 8, 4, bad),
                f"device_bytes must be a finite number > 0.*{bad!r}",
            )
            for bad in (float("nan"), float("inf"), "1000000", None, 0)
        ],
        (
            lambda: lf.max_batch(config, CompressionConfig(kv_quant="int8", kv_quant_group=7), 8, 4, 1 << 30),
            "kv_quant_group",
        ),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
    full = CompressionConfig(policy="full")
    assert lf.kv_cache_bytes(config, None, 3, 4, 8) == lf.kv_cache_bytes(config, full, 3, 4, 8) > 0
    assert lf.max_batch(config, None, 8, 4, 1 << 30) == lf.max_batch(config, full, 8, 4, 1 << 30) > 0
    # generate refuses each of these as well (the planner is not stricter than the run)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        lf.generate(params, config, np.ones((1, 4), np.int32), [4], max_new_tokens=limit)


HF_CONFIG = dict(
    model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4,
)  # fmt: skip


@pytest.mark.parametrize(
    "fields, match",
    [
        (
            dict(max_position_embeddings=4096.9),
            "'max_position_embeddings' must be a positive int, got 4096.9",
        ),
        (dict(max_position_embeddings=True), "'max_position_embeddings' must be a positive int"),
        (dict(pad_token_id=3.5), "'pad_token_id' must be a token id"),
        # a string iterated would be the ids 1 and 2
        (dict(eos_token_id="12"), "'eos_token_id' must be a token id or a list of them"),
        (dict(eos_token_id=[2.7]), "'eos_token_id' must be a token id or a list of them"),
        (dict(rms_norm_eps=None), "'rms_norm_eps' must be a finite number, got None"),
        (dict(rope_theta="1e4"), "'rope_theta' must be a finite number"),
        (dict(eos_token_id=[1, 200]), r"eos_token_ids must be a tuple of token ids in \[0, 128\)"),
        (dict(pad_token_id=1000), r"pad_token_id must be a token id in \[0, 128\), got 1000"),
    ],
)
def test_config_json_fields_are_checked(fields, match):
    with pytest.raises(ValueError, match=match):
        lf.ModelConfig.from_hf_dict({**HF_CONFIG, **fields})


def test_config_json_ids():
    # A negative pad id means none (some Llama configs): the first eos id pads, as when it is absent.
    config = lf.ModelConfig.from_hf_dict({**HF_CONFIG, "eos_token_id": [2, 5], "pad_token_id": -1})
    assert (config.eos_token_ids, config.pad_token_id) == ((2, 5), 2)
    config = lf.ModelConfig.from_hf_dict({**HF_CONFIG, "eos_token_id": 7}, {"eos_token_id": [7, 9]})
    assert config.eos_token_ids == (7, 9)
    with pytest.raises(
        ValueError, match=r"eos_token_ids must be a tuple of token ids in \[0, 128\), got \[5, 7\]"
    ):
        config.replace(eos_token_ids=[5, 7])  # a list would make the static config unhashable
    with pytest.raises(ValueError, match="pad_token_id must be a token id"):
        config.replace(pad_token_id=128)


@pytest.mark.parametrize(
    "comp",
    [CompressionConfig(policy="longflow", budget=8), None],
    ids=["longflow-snapkv-prefill", "full"],
)
def test_prefill_in_row_slices_equals_whole_batch(qwen3, comp):
    """Slicing the prompt pass over rows (to bound prefill activations at large batch) builds the
    same cache and logits as one pass; generate gives the same tokens with it."""
    from longflow_jax.generate import buffer_capacity, prefill, prefill_in_slices, prefill_rows_divisor

    config, params = qwen3
    comp_ = CompressionConfig() if comp is None else comp
    ids, lengths = make_prompts(config, [5, 14, 9, 12, 3, 10], seed=7)  # 14 > budget: SnapKV selects
    capacity = buffer_capacity(comp_, ids.shape[1], 16)
    ids, lengths = jnp.asarray(ids), jnp.asarray(lengths)
    assert (
        prefill_rows_divisor(6, 4) == 3
        and prefill_rows_divisor(7, 4) == 1
        and prefill_rows_divisor(6, None) == 6
    )
    with jax.default_matmul_precision("highest"):
        whole = jax.jit(lambda i, n: prefill(params, config, i, n, comp_, capacity))(ids, lengths)
        sliced = jax.jit(lambda i, n: prefill_in_slices(params, config, i, n, comp_, capacity, 4))(
            ids, lengths
        )
        for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(sliced), strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
            np.testing.assert_allclose(
                np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-5
            )
        want = lf.generate(params, config, ids, lengths, max_new_tokens=16, compression=comp)
        got = lf.generate(
            params, config, ids, lengths, max_new_tokens=16, compression=comp, prefill_rows_per_chunk=2
        )
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_prefill_rows_per_chunk_raises(qwen3, bad):
    config, params = qwen3
    ids, lengths = make_prompts(config, [4, 3])
    with pytest.raises(ValueError, match="prefill_rows_per_chunk must be a positive int"):
        lf.generate(params, config, ids, lengths, max_new_tokens=4, prefill_rows_per_chunk=bad)


# --- Generation controls: penalties and stop rules in the loop, log-probs, ahead-of-time compile, and the
# full cache's reference attention over the filled prefix.


@pytest.mark.parametrize(
    "controls",
    [dict(repetition_penalty=1.2), dict(repetition_penalty=1.2, no_repeat_ngram_size=2, min_new_tokens=6)],
)
def test_greedy_with_penalties_matches_transformers(tiny_checkpoints, qwen3, controls):
    import torch
    from test_model_parity import hf_model

    config, params = qwen3
    ids, lengths = make_prompts(config, [9, 17, 4], seed=5)
    sampling, new = SamplingConfig(**controls), 24
    eos = None
    with jax.default_matmul_precision("highest"):
        if sampling.min_new_tokens:
            # The EOS row 0 would emit second without min_new_tokens, so the ban changes the output.
            unbanned = dataclasses.replace(sampling, min_new_tokens=0)
            first = lf.generate(params, config, ids, lengths, max_new_tokens=2, sampling=unbanned)
            eos = int(first.tokens[0, 1])
        out = lf.generate(
            params,
            config.replace(eos_token_ids=() if eos is None else (eos,)),
            ids,
            lengths,
            max_new_tokens=new,
            sampling=sampling,
        )
    model = hf_model(tiny_checkpoints["qwen3"][0])
    for row, n in enumerate(lengths):
        with torch.no_grad():
            prompt = torch.tensor(ids[row : row + 1, :n]).long()
            ref = model.generate(
                prompt, max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0, **controls
            )
        want = ref[0, n:].numpy()  # up to its EOS, included
        assert int(out.lengths[row]) == len(want) >= min(sampling.min_new_tokens, new)
        np.testing.assert_array_equal(np.asarray(out.tokens[row, : len(want)]), want, err_msg=f"row {row}")


def test_stop_token_ids_end_rows_and_ignore_eos_does_not(qwen3):
    config, params = qwen3
    ids, lengths = make_prompts(config, [6, 9, 4], seed=3)  # test_rows_stop_at_eos's: compiled already
    free = np.asarray(lf.generate(params, config, ids, lengths, max_new_tokens=24).tokens)
    stop = int(free[0, 5])
    stopped = lf.generate(
        params,
        config,
        ids,
        lengths,
        max_new_tokens=24,
        sampling=SamplingConfig(stop_token_ids=(stop,)),
        return_logprobs=True,
    )
    for row in range(3):
        n = int(np.argmax(free[row] == stop)) + 1 if (free[row] == stop).any() else 24
        assert int(stopped.lengths[row]) == n
        np.testing.assert_array_equal(np.asarray(stopped.tokens[row, :n]), free[row, :n])
        logprobs = np.asarray(stopped.logprobs[row])
        assert (logprobs[:n] < 0).all() and (logprobs[n:] == 0).all()  # 0 once the row has stopped
    assert int(stopped.lengths[0]) == 6 and stopped.top_logprobs is None
    ignoring = lf.generate(
        params,
        config.replace(eos_token_ids=(stop,)),
        ids,
        lengths,
        max_new_tokens=24,
        sampling=SamplingConfig(ignore_eos=True),
    )
    np.testing.assert_array_equal(np.asarray(ignoring.tokens), free)
    assert (np.asarray(ignoring.lengths) == 24).all()


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=5)])
def test_logprobs_equal_the_float_reference(qwen3, sampling):
    """Each token's log-prob is log_softmax(logits / temperature) of a full forward pass over the prompt
    and the tokens before it (top-k truncation does not enter); the top 3 are its 3 largest."""
    from longflow_jax.model import forward, logits_from_hidden

    config, params = qwen3
    ids, lengths = make_prompts(config, [6, 11], seed=2)
    new = 10
    with jax.default_matmul_precision("highest"):
        out = lf.generate(
            params,
            config,
            ids,
            lengths,
            max_new_tokens=new,
            sampling=sampling,
            seed=3,
            return_logprobs=True,
            top_logprobs=3,
        )
        # Right-padded prompt + output rows: causal attention keeps the pad after them out of the way.
        tokens = np.asarray(out.tokens)
        sequences = np.zeros((2, ids.shape[1] + new), np.int32)
        for row, n in enumerate(lengths):
            sequences[row, : n + new] = np.concatenate([ids[row, :n], tokens[row]])
        hidden, _ = jax.jit(lambda s: forward(params, config, s))(sequences)
        logits = np.asarray(logits_from_hidden(params, config, hidden), np.float64)
    for row, n in enumerate(lengths):
        x = logits[row, n - 1 : n - 1 + new] / (sampling.temperature or 1.0)
        logp = x - x.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        np.testing.assert_allclose(
            np.asarray(out.logprobs[row]), logp[np.arange(new), tokens[row]], atol=2e-4
        )
        best = np.argsort(-logp, -1)[:, :3]
        np.testing.assert_array_equal(np.asarray(out.top_token_ids[row]), best)
        np.testing.assert_allclose(
            np.asarray(out.top_logprobs[row]), np.take_along_axis(logp, best, -1), atol=2e-4
        )
    if sampling.temperature == 0:  # greedy: the chosen token is the best one
        np.testing.assert_array_equal(np.asarray(out.logprobs), np.asarray(out.top_logprobs[..., 0]))


def test_compile_generate_equals_generate(qwen3):
    from jax.sharding import Mesh

    config, params = qwen3
    ids, lengths = make_prompts(config, [5, 11], seed=8)
    options = dict(
        max_new_tokens=12,
        compression=CompressionConfig(policy="longflow", budget=8),
        sampling=SamplingConfig(temperature=0.9, repetition_penalty=1.1),
        return_logprobs=True,
        return_debug=True,
    )
    want = lf.generate(params, config, ids, lengths, seed=4, **options)
    shapes = lf.param_shapes(config)
    run, seconds = lf.compile_generate(shapes, config, batch=2, prompt_len=11, **options)
    got = run(params, ids, lengths, seed=4)
    assert seconds > 0
    fields = ("tokens", "lengths", "cache_occupancy", "nonfinite", "logprobs", "evicted_positions")
    for field in fields:
        np.testing.assert_array_equal(np.asarray(getattr(got, field)), np.asarray(getattr(want, field)))
    with pytest.raises(ValueError, match=r"compiled for prompt_ids \(2, 11\)"):
        run(params, ids[:1], lengths[:1])
    with pytest.raises(ValueError, match=r"prompt_lengths must be in \[1, 11\]"):
        run(params, ids, np.asarray([0, 3]))
    # Over a mesh: each device's rows are drawn with the seed folded with its index.
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    on_mesh, _ = lf.compile_generate(params, config, batch=2, prompt_len=11, mesh=mesh, **options)
    got = on_mesh(params, ids, lengths, seed=4)
    want = run(params, ids, lengths, seed=jax.random.fold_in(jax.random.PRNGKey(4), 0))
    for field in fields:
        np.testing.assert_array_equal(np.asarray(getattr(got, field)), np.asarray(getattr(want, field)))
    two_axes = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("rows", "heads"))
    with pytest.raises(ValueError, match="mesh must be 1-D"):
        lf.compile_generate(shapes, config, batch=2, prompt_len=11, mesh=two_axes, **options)


@pytest.mark.parametrize("kv_len, capacity", [([1, 129, 200], 640), ([5, 300, 700], 700), ([3, 7, 20], 20)])
def test_full_cache_reference_attention_reads_only_the_filled_prefix(kv_len, capacity):
    """Equal to the plain reference over the same mask; slots past the blocks the longest row needs
    are never read (NaN there would show)."""
    from longflow_jax.attention import PREFIX_BLOCK, filled_prefix_attention
    from pallas_kernels.reference import decode_attention_probs

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((3, 4, 16)), jnp.float32)
    k, v = (rng.standard_normal((3, 2, capacity, 16)).astype(np.float32) for _ in range(2))
    valid = jnp.arange(capacity)[None, :] < jnp.asarray(kv_len)[:, None]
    want = decode_attention_probs(q, jnp.asarray(k), jnp.asarray(v), valid, 0.25)[0]
    read = -(-max(kv_len) // PREFIX_BLOCK) * PREFIX_BLOCK
    k[:, :, read:], v[:, :, read:] = np.nan, np.nan
    got = filled_prefix_attention(q, jnp.asarray(k), jnp.asarray(v), valid, jnp.asarray(kv_len), 0.25)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_full_cache_blocked_and_single_pass_attention_decode_alike(qwen3, monkeypatch):
    """generate's full cache through the blocked prefix path (forced here) gives the single pass's tokens."""
    import longflow_jax.attention as attention

    config, params = qwen3
    ids, lengths = make_prompts(config, [12, 5], seed=9)
    with jax.default_matmul_precision("highest"):
        single = lf.generate(params, config, ids, lengths, max_new_tokens=150)
        monkeypatch.setattr(attention, "SINGLE_PASS_MAX_SLOTS", 0)
        monkeypatch.setattr(attention, "PREFIX_BLOCK", 32)  # several blocks, the last one shifted
        jax.clear_caches()  # the jitted generate would reuse its trace of the single pass
        blocked = lf.generate(params, config, ids, lengths, max_new_tokens=150)
    jax.clear_caches()
    np.testing.assert_array_equal(np.asarray(single.tokens), np.asarray(blocked.tokens))


@pytest.mark.parametrize(
    "lengths, policy, capacity, match",
    [
        ([0], "longflow", 6, r"prompt_lengths must be in \[1, 8\]; row 0 has 0"),  # read the last pad
        ([20], "longflow", 6, r"prompt_lengths must be in \[1, 8\]; row 0 has 20"),  # NaN logits
        ([8], "full", 8, "capacity must be an int >= 9 for policy 'full'"),  # SnapKV compressed "full"
        ([8], "rkv", 9, "capacity must be an int >= 10 for policy 'rkv'"),
        ([8], "longflow", 1, "capacity must be an int >= 2"),
    ],
)
def test_prefill_checks_what_generate_checks(qwen3, lengths, policy, capacity, match):
    # prefill is public (README: for callers who drive the loop) and checked nothing.
    config, params = qwen3
    ids, _ = make_prompts(config, [8])
    comp = CompressionConfig(policy=policy, budget=9)  # R-KV needs more than its window of 8
    with pytest.raises(ValueError, match=match):
        lf.prefill(params, config, ids, jnp.asarray(lengths), comp, capacity)


def test_decode_step_checks_what_generate_checks(qwen3):
    # decode_step is public (for callers who drive the loop) and ran a kernel without the policy's
    # scoring (h2o's evict slot -1 wrapped to the last slot), embedded ids past the vocabulary as its
    # last token, and wrote past a full cache's capacity (the writes were dropped).
    config, params = qwen3
    ids, lengths = make_prompts(config, [8])
    key = jax.random.PRNGKey(0)
    h2o = CompressionConfig(policy="h2o", budget=6)
    cache, logits = lf.prefill(params, config, ids, lengths, h2o, 6)
    nxt = jnp.argmax(logits, -1)
    step = functools.partial(lf.decode_step, params, config, compression=h2o)
    with pytest.raises(ValueError, match="policy 'h2o' needs attention_impl='reference'"):
        step(cache, nxt, lengths, key, attention_impl="pallas")
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        step(cache, nxt, lengths, key, attention_impl="refrence")
    with pytest.raises(
        ValueError, match=r"tokens must hold token ids in \[0, 128\), got dtype int32, range \[128"
    ):
        step(cache, jnp.full_like(nxt, config.vocab_size), lengths, key)
    full = CompressionConfig(policy="full")
    cache, logits = lf.prefill(params, config, ids, lengths, full, 9)
    logits, cache, _ = lf.decode_step(
        params, config, cache, jnp.argmax(logits, -1), lengths, key, compression=full
    )
    assert int(cache.layers[0].slot_pos[0, 0, 8]) == 8  # the one free slot took it
    with pytest.raises(ValueError, match="the 'full' cache holds 9 tokens a row"):
        lf.decode_step(params, config, cache, jnp.argmax(logits, -1), lengths + 1, key, compression=full)


@pytest.mark.parametrize("budget", [None, 6])
def test_cache_occupancy_is_what_a_row_held_when_it_stopped(qwen3, budget):
    # A stopped row is fed pad tokens while others run: they were counted (full cache) or evicted real
    # tokens (longflow), so the number depended on the rest of the batch.
    config, params = qwen3
    ids, lengths = make_prompts(config, [7, 3, 5, 6], seed=1)
    comp = None if budget is None else CompressionConfig(policy="longflow", budget=budget)
    alone = lambda row, sampling: lf.generate(
        params, config, ids[row : row + 1], lengths[row : row + 1], max_new_tokens=12, compression=comp,
        sampling=sampling,
    )  # fmt: skip
    stop = int(alone(1, SamplingConfig(ignore_eos=True)).tokens[0, 1])  # row 1 stops after 2 tokens
    sampling = SamplingConfig(stop_token_ids=(stop,))
    out = lf.generate(params, config, ids, lengths, max_new_tokens=12, compression=comp, sampling=sampling)
    assert int(out.lengths[1]) == 2 and int(out.lengths.max()) > 2
    for row in range(4):
        assert int(out.cache_occupancy[row]) == int(alone(row, sampling).cache_occupancy[0]), row
    assert int(out.cache_occupancy[1]) == min(3 + 1, budget or 99)  # the prompt and the first new token


def test_a_row_whose_every_token_is_banned_stops_and_is_reported(qwen3):
    # no_repeat_ngram_size=1 uses the vocabulary up; argmax over all -inf gave id 0 with a NaN logprob.
    config, params = qwen3
    ids, lengths = make_prompts(config, [2], seed=3)
    sampling = SamplingConfig(no_repeat_ngram_size=1, ignore_eos=True)
    new = config.vocab_size + 4
    out = lf.generate(
        params, config, ids, lengths, max_new_tokens=new, sampling=sampling, return_logprobs=True
    )
    n = int(out.lengths[0])
    assert bool(out.nonfinite[0]) and n <= config.vocab_size - 2
    assert np.isfinite(np.asarray(out.logprobs)).all()
    assert len(set(np.asarray(out.tokens[0, :n]).tolist()) | set(np.asarray(ids[0]).tolist())) == n + 2
    assert (np.asarray(out.tokens[0, n:]) == config.pad_token_id).all()


def test_compiled_run_takes_a_typed_key_as_generate_does(qwen3):
    config, params = qwen3
    ids, lengths = make_prompts(config, [5, 3], seed=4)
    sampling = SamplingConfig(temperature=1.0)
    want = lf.generate(
        params, config, ids, lengths, max_new_tokens=4, sampling=sampling, seed=jax.random.key(1)
    )
    run, _ = lf.compile_generate(
        lf.param_shapes(config), config, batch=2, prompt_len=ids.shape[1], max_new_tokens=4, sampling=sampling
    )
    np.testing.assert_array_equal(run(params, ids, lengths, seed=jax.random.key(1)).tokens, want.tokens)
    np.testing.assert_array_equal(run(params, ids, lengths, seed=1).tokens, want.tokens)


def test_generate_and_score_trajectory_name_more_bad_arguments(qwen3):
    config, params = qwen3
    ids, lengths = make_prompts(config, [5, 3], seed=4)
    with pytest.raises(ValueError, match="return_debug must be a bool, got 'no'"):
        lf.generate(params, config, ids, lengths, max_new_tokens=3, return_debug="no")
    with pytest.raises(ValueError, match=r"seed must be an int in \[-2\*\*63, 2\*\*64\)"):
        lf.generate(params, config, ids, lengths, max_new_tokens=3, seed=2**64)
    with pytest.raises(ValueError, match="reference must be a CompressionConfig or None, got 'full'"):
        lf.score_trajectory(
            params, config, ids, lengths, np.ones((2, 4), np.int32), [4, 2],
            compression=CompressionConfig(policy="longflow", budget=4), reference="full",
        )  # fmt: skip
