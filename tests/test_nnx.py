"""longflow_jax.nnx: the Decoder runs the functional core on its own weights (logits, greedy tokens,
`lf.generate(decoder, ...)`, from a checkpoint, split/merge), the attention layer runs the functional
generate path step by step, the partition specs follow the Megatron layout, and the README's Flax
example runs."""

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys

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
from longflow_jax.config import Llama3RopeScaling
from longflow_jax.convert import FORMAT_VERSION, MARKER
from longflow_jax.kv_cache import evicted_positions, occupancy
from longflow_jax.model import forward, logits_from_hidden, mlp, rms_norm

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
    want = lf.generate(params, config, ids, lengths, max_new_tokens=6)  # policies: the next test
    got = lf.generate(decoder, ids, lengths, max_new_tokens=6)
    np.testing.assert_array_equal(got.tokens, want.tokens)


def test_generate_and_compile_generate_on_a_decoder_under_nnx_jit():
    config = FAMILIES["qwen3"]
    params = lf.init_random_params(config, seed=1, scale=0.2)
    decoder = lnx.Decoder.from_params(config, params)
    ids, lengths = make_prompts(config, [11, 6], seed=2)
    options = dict(
        max_new_tokens=8,
        compression=lf.CompressionConfig("longflow", budget=8, snapkv_window=3),
        return_debug=True,
    )
    want = lf.generate(params, config, ids, lengths, **options)
    assert (np.asarray(want.evicted_positions) >= 0).any()  # the budget evicted
    jitted = nnx.jit(functools.partial(lf.generate, **options))(decoder, ids, lengths)
    run, _ = lf.compile_generate(decoder, batch=2, prompt_len=11, **options)
    for got in (jitted, run(decoder, ids, lengths)):
        for field in ("tokens", "lengths", "evicted_positions"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    other = lnx.Decoder.from_params(dataclasses.replace(config, rope_theta=5e3), params)
    with pytest.raises(ValueError, match="compiled for ModelConfig"):
        run(other, ids, lengths)


def test_generate_refuses_what_is_neither_params_nor_a_model():
    config = FAMILIES["qwen3"]
    ids, lengths = make_prompts(config, [3], seed=0)
    with pytest.raises(ValueError, match=r"a model with params_and_config\(\).*got dict"):
        lf.generate({}, ids, lengths, max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_lengths is missing"):
        lf.generate(lf.init_random_params(config), config, ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="got NoneType"):
        lf.compile_generate(None, batch=1, prompt_len=3, max_new_tokens=2)


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
functional_prefill = jax.jit(lf.prefill, static_argnums=(1, 4, 5))
functional_decode = jax.jit(lf.decode_step, static_argnames=("config", "compression"))


@functools.partial(jax.jit, static_argnums=1)
def layer_logits(params, config, x, attention_out):
    """The rest of a one-layer decoder after its attention (`model.decoder_layer`), then the head."""
    layer, eps = params["layers"][0], config.rms_norm_eps
    x = x + attention_out
    x = x + mlp(layer, rms_norm(x, layer["post_norm"], eps))
    return logits_from_hidden(params, config, rms_norm(x, params["final_norm"], eps))


def assert_same_cache(got, want):
    """The same LayerCache: fields (kv_quant and its group included), dtypes and values."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-5)


FULL_INT8 = lf.CompressionConfig("full", kv_quant="int8", kv_quant_group=8)


@pytest.mark.parametrize(
    "compression, functional",
    [
        (lf.CompressionConfig("longflow", budget=8, snapkv_window=3), None),
        (lf.CompressionConfig("h2o", budget=8, granularity="kv_head", snapkv_window=3), None),
        (lf.CompressionConfig("rkv", budget=10, rkv_buffer=3), None),
        (
            lf.CompressionConfig("longflow", budget=8, snapkv_window=3, kv_quant="int4", kv_quant_group=4),
            None,
        ),
        # a budget that holds the prompt and every new token is the full cache (h2o's scores stay 0)
        (lf.CompressionConfig("h2o", budget=18), lf.CompressionConfig("full")),
        (lf.CompressionConfig("rkv", budget=30, kv_quant="int8", kv_quant_group=8), FULL_INT8),
    ],
    ids=["longflow", "h2o", "rkv", "longflow-int4", "h2o-fits", "rkv-int8-fits"],
)
def test_attention_layer_runs_the_functional_generate_path(compression, functional):
    """A one-layer model around the attention layer gives `lf.prefill` / `lf.decode_step`'s logits,
    caches and evict decisions, greedy step by step. functional: the policy those run under (None:
    the layer's own)."""
    functional = functional or compression
    config, prompt, steps = dataclasses.replace(FAMILIES["qwen3"], num_layers=1), 12, 6
    att = lnx.CompressedAttention(config, compression=compression, rngs=nnx.Rngs(3))
    params = lf.init_random_params(config, seed=1, scale=0.2)
    params["layers"][0].update(attention_weights(att))
    embed, input_norm = params["embed"], params["layers"][0]["input_norm"]
    normed = lambda x: rms_norm(x, input_norm, config.rms_norm_eps)
    ids, lengths = make_prompts(config, [prompt, 7], seed=2)
    positions = jnp.broadcast_to(jnp.arange(prompt), (2, prompt))

    capacity = generate_module.buffer_capacity(functional, prompt, steps)
    cache, want = functional_prefill(params, config, ids, lengths, functional, capacity)
    x = embed[ids]
    out = prefill_of(att, normed(x), positions, lengths, steps)
    last = jnp.take_along_axis(layer_logits(params, config, x, out), (lengths - 1)[:, None, None], 1)[:, 0]
    np.testing.assert_allclose(last, want, atol=1e-4)
    assert att.cache_compression == functional
    assert_same_cache(att.cache.get_value(), cache.layers[0])
    for step in range(steps):
        token, pos = jnp.argmax(want, axis=-1), lengths + step
        evicting = evicted_positions(att.cache.get_value())
        want, cache, evicted = functional_decode(
            params, config, cache, token, pos, jax.random.PRNGKey(0), compression=functional
        )
        x = embed[token][:, None]
        got = layer_logits(params, config, x, decode_of(att, normed(x), pos))[:, 0]
        np.testing.assert_allclose(got, want, atol=1e-4)
        np.testing.assert_array_equal(evicting, evicted[0])
        assert_same_cache(att.cache.get_value(), cache.layers[0])
    dropped = np.asarray(occupancy(cache.layers[0])) < lengths + steps
    assert dropped.all() if functional.policy != "full" else not dropped.any()


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
    # Its prefill made room for `steps` tokens: one more was dropped, and attended without.
    with pytest.raises(ValueError, match=f"the 'full' cache holds {prompt + steps} tokens a row"):
        att.decode(x[:, -1:], positions[:, -1] + 1)


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
    # A row of 0 tokens built an empty cache, one past the prompt's width a cache of the padding.
    x2, pos2 = jnp.zeros((2, 6, 32)), jnp.tile(jnp.arange(6), (2, 1))
    for lengths, match in (
        ([6, 0], r"lengths must be in \[1, 6\] \(the prompt's width\); row 1 has 0"),
        ([6, 9], r"row 1 has 9"),
        ([6.0, 3.0], r"lengths must be \[2\] integer token counts, got float"),
        ([6], r"lengths must be \[2\] integer token counts, got int\d+ \(1,\)"),
    ):
        with pytest.raises(ValueError, match=match):
            att.prefill(x2, pos2, jnp.asarray(lengths), 4)


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


# Built under a (2, 4) mesh of 8 simulated devices: every annotation is `lf.param_partition_specs`' own.
_MESH_SPECS = """
import json, jax
from flax import nnx
import longflow_jax as lf, longflow_jax.nnx as lnx
from longflow_jax.sharding import make_mesh, param_partition_specs
config = lf.ModelConfig(
    model_type="llama", vocab_size=130, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
    num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=128,
)
with jax.set_mesh(make_mesh(2, 4)):
    decoder = lnx.Decoder(config, rngs=nnx.Rngs(0))
got = jax.tree.map(lambda v: str(v.get_value().sharding.spec), decoder.param_variables(),
                   is_leaf=lambda x: isinstance(x, nnx.Variable))
want = jax.tree.map(str, param_partition_specs(config, 4), is_leaf=lambda x: isinstance(x, jax.P))
print(json.dumps([got, want]))
"""


def test_weights_built_under_a_mesh_take_the_planners_specs():
    # 2 KV heads and a vocabulary of 130 on a "model" axis of 4: wk, wv and the embedding replicated
    # (a split inside a head, or a raw IndivisibleError, before), wq, wo and the MLP split.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    run = subprocess.run(
        [sys.executable, "-c", _MESH_SPECS], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got, want = json.loads(run.stdout.strip().splitlines()[-1])
    flat = lambda tree: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys()
    for name, spec in got.items():  # split where the planner splits (replicated: P() or P(None, ...))
        assert ("model" in spec) == ("model" in want[name]), (name, spec, want[name])
    assert "model" not in got["['layers'][0]['wk']"] and "model" not in got["['embed']"]
    assert "model" in got["['layers'][0]['wq']"] and "model" in got["['layers'][0]['w_down']"]


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
