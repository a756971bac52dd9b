"""longflow_jax.nnx: the Decoder runs the functional core on its own weights (logits, greedy tokens,
from a checkpoint, split/merge), the attention layer matches the functional decode attention step by
step, the partition specs follow the Megatron layout, and the README's Flax example runs."""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import generate_module, make_prompts
from jax.sharding import PartitionSpec as P

import longflow_jax as lf
import longflow_jax.nnx as lnx
from longflow_jax import rkv
from longflow_jax.attention import decode_attention
from longflow_jax.config import Llama3RopeScaling
from longflow_jax.convert import FORMAT_VERSION, MARKER
from longflow_jax.kv_cache import layer_from_kept, occupancy, write_token
from longflow_jax.model import (
    attention_scale,
    causal_attention,
    forward,
    logits_from_hidden,
    project_out,
    project_qkv,
)
from longflow_jax.snapkv import prefill_keep_positions

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def tiny(model_type, **extra):
    return lf.ModelConfig(
        model_type=model_type, vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4,
        max_position_embeddings=128, **extra,
    )  # fmt: skip


FAMILIES = {
    # llama with attention_bias (q/k/v and o biases), llama3 rope scaling and tied embeddings
    "llama": tiny(
        "llama",
        qkv_bias=True,
        o_bias=True,
        tie_word_embeddings=True,
        rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 32),
    ),  # fmt: skip
    "qwen2": tiny("qwen2", qkv_bias=True),
    "qwen3": tiny("qwen3", qk_norm=True),
}


def reference_logits(params, config, ids):
    return logits_from_hidden(params, config, forward(params, config, jnp.asarray(ids))[0])


logits_of = nnx.jit(lambda module, tokens: module(tokens))


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_logits_and_greedy_tokens_equal_the_functional_path(family):
    config = FAMILIES[family]
    params = lf.init_random_params(config, seed=1, scale=0.2)
    decoder = lnx.Decoder.from_params(config, params)
    held, given = jax.tree.leaves(decoder.params()), jax.tree.leaves(params)
    assert len(held) == len(given) and all(a is b for a, b in zip(held, given)), "the module copied weights"
    ids, lengths = make_prompts(config, [11, 6], seed=2)
    logits = logits_of(decoder, jnp.asarray(ids))
    np.testing.assert_allclose(logits, reference_logits(params, config, ids), rtol=1e-5, atol=1e-5)
    want = lf.generate(
        params, config, ids, lengths, max_new_tokens=6
    )  # the policies: test_generate_under_nnx_jit
    got = lnx.generate(decoder, ids, lengths, max_new_tokens=6)
    np.testing.assert_array_equal(got.tokens, want.tokens)


def test_generate_under_nnx_jit():
    config = FAMILIES["qwen3"]
    params = lf.init_random_params(config, seed=1, scale=0.2)
    ids, lengths = make_prompts(config, [11, 6], seed=2)
    want = lf.generate(params, config, ids, lengths, max_new_tokens=6)
    got = nnx.jit(functools.partial(lnx.generate, max_new_tokens=6))(
        lnx.Decoder.from_params(config, params), ids, lengths
    )
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)


def test_from_checkpoint_restores_the_converted_params(tmp_path):
    config = FAMILIES["qwen3"]
    params = lf.init_random_params(config, seed=4, scale=0.2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(tmp_path / "params"), params)
    checkpointer.wait_until_finished()
    hf = dict(
        model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4,
        max_position_embeddings=128, dtype="float32",
    )  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(hf))
    (tmp_path / MARKER).write_text(json.dumps({"format_version": FORMAT_VERSION, "dtype": "float32"}))
    decoder = lnx.Decoder.from_checkpoint(str(tmp_path))
    assert decoder.config == config
    for got, want in zip(jax.tree.leaves(decoder.params()), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(got, want)


def test_from_params_rejects_params_of_another_config():
    params = lf.init_random_params(FAMILIES["qwen2"])
    with pytest.raises(
        ValueError, match=r"params\['layers'\]\[0\]\['bk'\] is not a tensor of this config's model"
    ):
        lnx.Decoder.from_params(FAMILIES["qwen3"], params)


def test_split_merge_round_trips_the_decoder():
    config = FAMILIES["qwen2"]
    decoder = lnx.Decoder.from_params(config, lf.init_random_params(config, seed=1, scale=0.2))
    graphdef, state = nnx.split(decoder)
    merged = nnx.merge(graphdef, jax.tree.map(np.array, state))  # through host copies
    ids, _ = make_prompts(config, [7], seed=5)
    np.testing.assert_array_equal(logits_of(merged, jnp.asarray(ids)), logits_of(decoder, jnp.asarray(ids)))
    num_params = len(jax.tree.leaves(lf.param_shapes(config)))
    assert len(jax.tree.leaves(nnx.state(merged, nnx.Param))) == num_params


def attention_weights(att):
    """The layer dict `model.project_qkv` reads, taken from the module's submodules by hand."""
    return {
        "wq": att.wq.kernel[...], "wk": att.wk.kernel[...], "wv": att.wv.kernel[...],
        "wo": att.wo.kernel[...], "q_norm": att.q_norm.scale[...], "k_norm": att.k_norm.scale[...],
    }  # fmt: skip


prefill_of = nnx.jit(lnx.CompressedAttention.prefill, static_argnums=4)
decode_of = nnx.jit(lnx.CompressedAttention.decode)


@functools.partial(jax.jit, static_argnames=("config", "compression", "capacity"))
def reference_prefill(layer, x, positions, lengths, *, config, compression, capacity):
    """The core's prefill of one attention layer: (output [B, P, Dm], LayerCache)."""
    q, k, v = project_qkv(layer, config, x, positions)
    out = project_out(layer, config, causal_attention(q, k, v, attention_scale(config)))
    groups = 1 if compression.granularity == "sequence" else config.num_kv_heads
    if compression.policy == "rkv":
        return out, rkv.prefill_layer(q, k, v, lengths, compression.budget, capacity, groups)
    c = compression
    kept = prefill_keep_positions(q, k, lengths, capacity, c.snapkv_window, c.snapkv_pool, groups)
    return out, layer_from_kept(k, v, kept, capacity)


@functools.partial(jax.jit, static_argnames=("config", "compression"))
def reference_decode(layer, cache, token, pos, key, *, config, compression):
    """The core's decode step of one attention layer: (output [B, 1, Dm], LayerCache)."""
    q, k, v = project_qkv(layer, config, token, pos[:, None])
    cache = write_token(cache, k[:, 0], v[:, 0], pos)
    scale = attention_scale(config)
    attn, cache = decode_attention(q[:, 0], cache, pos, scale, compression, "reference", key)
    return project_out(layer, config, attn[:, None]), cache


@pytest.mark.parametrize(
    "compression",
    [
        lf.CompressionConfig(policy="longflow", budget=8, snapkv_window=3),
        lf.CompressionConfig(policy="h2o", budget=8, granularity="kv_head", snapkv_window=3),
        lf.CompressionConfig(policy="rkv", budget=10, rkv_buffer=3),
    ],
    ids=lambda c: c.policy,
)
def test_attention_layer_matches_the_functional_decode_attention(compression):
    config, batch, prompt, steps = FAMILIES["qwen3"], 2, 12, 6
    att = lnx.CompressedAttention(config, compression=compression, rngs=nnx.Rngs(3))
    layer = attention_weights(att)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, prompt + steps, 32)), jnp.float32)
    lengths = jnp.asarray([prompt, 7], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(prompt), (batch, prompt))
    static = dict(config=config, compression=compression)

    out = prefill_of(att, x[:, :prompt], positions, lengths, steps)
    capacity = generate_module.buffer_capacity(compression, prompt, steps)
    want, cache = reference_prefill(layer, x[:, :prompt], positions, lengths, capacity=capacity, **static)
    np.testing.assert_allclose(out, want, atol=1e-5)
    for step in range(steps):
        pos, key, token = lengths + step, jax.random.PRNGKey(step), x[:, prompt + step][:, None]
        out = decode_of(att, token, pos, key)
        want, cache = reference_decode(layer, cache, token, pos, key, **static)
        np.testing.assert_allclose(out, want, atol=1e-5)
        held = att.cache.get_value()
        np.testing.assert_array_equal(held.slot_pos, cache.slot_pos)
        np.testing.assert_array_equal(held.evict_slot, cache.evict_slot)
        np.testing.assert_allclose(held.score, cache.score, atol=1e-5)
    assert (np.asarray(occupancy(cache)) < lengths + steps).all()  # every row dropped tokens


def test_full_cache_decode_under_nnx_jit_equals_one_causal_pass():
    """Prefill then token-by-token decode (jitted, the cache carried as nnx state) gives what one
    causal pass over the whole sequence gives; a split/merge copy of the layer decodes the same."""
    config, prompt, steps = FAMILIES["qwen3"], 9, 5
    att = lnx.CompressedAttention(config, rngs=nnx.Rngs(7))
    whole = nnx.clone(att)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, prompt + steps, 32)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(prompt + steps), (2, prompt + steps))
    want = prefill_of(whole, x, positions, jnp.full((2,), prompt + steps), 1)[:, prompt:]

    prefill_of(att, x[:, :prompt], positions[:, :prompt], jnp.full((2,), prompt), steps)
    copy = nnx.merge(*nnx.split(att), copy=True)
    got = [decode_of(att, x[:, prompt + t][:, None], positions[:, prompt + t]) for t in range(steps)]
    np.testing.assert_allclose(jnp.concatenate(got, axis=1), want, atol=2e-5)
    np.testing.assert_allclose(
        decode_of(copy, x[:, prompt][:, None], positions[:, prompt]), got[0], atol=1e-6
    )
    np.testing.assert_array_equal(occupancy(att.cache.get_value()), [prompt + steps] * 2)


def test_bad_calls_are_refused():
    config = FAMILIES["qwen3"]
    x, pos = jnp.zeros((1, 1, 32)), jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="call prefill first"):
        lnx.CompressedAttention(config, rngs=nnx.Rngs(0)).decode(x, pos)
    att = lnx.CompressedAttention(config, compression=lf.CompressionConfig("random", 4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        att.decode(x, pos)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int, got 0"):
        att.prefill(jnp.zeros((1, 2, 32)), jnp.zeros((1, 2), jnp.int32), jnp.array([2]), 0)
    with pytest.raises(ValueError, match="config must be a longflow_jax.ModelConfig"):
        lnx.Decoder({"vocab_size": 64}, rngs=nnx.Rngs(0))


# (module attribute, param name) -> its spec on a ("data", "model") mesh
MEGATRON = {
    **{(w, "kernel"): P(None, "model") for w in ("wq", "wk", "wv", "w_gate", "w_up", "lm_head")},
    **{(w, "bias"): P("model") for w in ("wq", "wk", "wv")},
    **{(w, "kernel"): P("model", None) for w in ("wo", "w_down")},
    ("wo", "bias"): P(None),
    ("embed", "embedding"): P("model", None),
    **{(n, "scale"): P(None) for n in ("input_norm", "post_norm", "q_norm", "k_norm", "final_norm")},
}


def test_partition_specs_follow_the_megatron_layout():
    config = tiny("llama", qkv_bias=True, o_bias=True, qk_norm=True)  # every kind of weight
    decoder = nnx.eval_shape(lambda: lnx.Decoder(config, rngs=nnx.Rngs(0)))
    params = [(path, v) for path, v in nnx.iter_graph(decoder) if isinstance(v, nnx.Param)]
    assert len(params) == len(jax.tree.leaves(lf.param_shapes(config)))
    for path, variable in params:
        assert P(*variable.get_metadata()["out_sharding"]) == MEGATRON[path[-2:]], path
    # Under a mesh the weights are sharded as they are created.
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    with jax.set_mesh(mesh):
        att = lnx.CompressedAttention(config, rngs=nnx.Rngs(0))
    assert att.wq.kernel[...].sharding.spec == P(None, "model")
    assert att.wo.kernel[...].sharding.spec == P("model", None)


def test_readme_flax_example_runs():
    with open(README) as f:
        section = f.read().split("## Using it from Flax")[1].split("\n## ")[0]
    example = re.findall(r"```python\n(.*?)```", section, re.S)[1]
    scope = {}
    exec(example, scope)
    tokens, lengths, budget = np.asarray(scope["tokens"]), np.asarray(scope["prompt_lengths"]), 16
    assert tokens.shape == (2, scope["max_new_tokens"]) and 0 <= tokens.min() and tokens.max() < 128
    newest = lengths + scope["max_new_tokens"] - 1
    for block in scope["model"].blocks:
        cache = block.attention.cache.get_value()
        np.testing.assert_array_equal(occupancy(cache), [budget, budget])
        assert (np.asarray(cache.slot_pos[:, 0]) == newest[:, None]).any(axis=-1).all()
