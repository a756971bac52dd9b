"""Converted JAX model vs Hugging Face transformers (PyTorch, CPU) on tiny random checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import longflow_jax as lf
from longflow_jax.model import forward, logits_from_hidden

FAMILIES = ["llama", "qwen2", "qwen3"]


def hf_model(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny_checkpoints, family):
    hf_dir, lf_dir = tiny_checkpoints[family]
    config, params = lf.load(lf_dir)
    tokens = np.random.default_rng().integers(0, config.vocab_size, (3, 48))
    with torch.no_grad():
        want = hf_model(hf_dir)(torch.tensor(tokens)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        hidden, _ = forward(params, config, jnp.asarray(tokens, jnp.int32))
        got = np.asarray(logits_from_hidden(params, config, hidden))
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_transformers(tiny_checkpoints, family):
    hf_dir, lf_dir = tiny_checkpoints[family]
    config, params = lf.load(lf_dir)
    rng = np.random.default_rng()
    lengths = [9, 17, 4]
    prompt = np.zeros((3, max(lengths)), np.int32)
    for row, n in enumerate(lengths):
        prompt[row, :n] = rng.integers(1, config.vocab_size, n)
    new = 32
    with jax.default_matmul_precision("highest"):
        out = lf.generate(params, config, prompt, lengths, max_new_tokens=new)
    model = hf_model(hf_dir)
    for row, n in enumerate(lengths):
        with torch.no_grad():
            ref = model.generate(
                torch.tensor(prompt[row : row + 1, :n]).long(),
                max_new_tokens=new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        np.testing.assert_array_equal(np.asarray(out.tokens[row]), ref[0, n:].numpy(), err_msg=f"row {row}")
    np.testing.assert_array_equal(np.asarray(out.lengths), [new] * 3)


@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", 3e-2), ("float16", 5e-3)])
def test_half_precision_params_track_float32(tiny_checkpoints, dtype, tolerance):
    _, lf_dir = tiny_checkpoints["qwen2"]
    config32, params32 = lf.load(lf_dir)
    config, params = lf.load(lf_dir, dtype=dtype)
    tokens = jnp.asarray(np.random.default_rng().integers(0, config.vocab_size, (2, 32)), jnp.int32)
    want = logits_from_hidden(params32, config32, forward(params32, config32, tokens)[0])
    got = logits_from_hidden(params, config, forward(params, config, tokens)[0])
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) <= tolerance
    comp = lf.CompressionConfig(policy="longflow", budget=12)
    cache, _ = lf.prefill(params, config, tokens, jnp.asarray([32, 20]), comp, 12)
    assert cache.layers[0].k.dtype == jnp.dtype(dtype) and cache.layers[0].v.dtype == jnp.dtype(dtype)
    out = lf.generate(params, config, np.asarray(tokens), [32, 20], max_new_tokens=8, compression=comp)
    assert out.tokens.shape == (2, 8) and (np.asarray(out.cache_occupancy) == 12).all()


def test_llama3_rope_scaling_beside_default_rope_parameters_matches_transformers(tiny_checkpoints, tmp_path):
    # transformers 5 saves a default rope_parameters in every config; a rope_scaling block added to it
    # wins there, and was ignored here (plain RoPE).
    import json
    import shutil

    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny_checkpoints["llama"][0], hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_parameters"]["rope_theta"]}
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    config = lf.convert(str(hf_dir), str(tmp_path / "ckpt"))
    assert config.rope_scaling is not None
    config, params = lf.load(str(tmp_path / "ckpt"))
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 64))
    with torch.no_grad():
        want = hf_model(str(hf_dir))(torch.tensor(tokens)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        hidden, _ = forward(params, config, jnp.asarray(tokens, jnp.int32))
        got = np.asarray(logits_from_hidden(params, config, hidden))
    assert np.abs(got - want).max() <= 1e-4
