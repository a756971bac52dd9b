"""Hugging Face safetensors checkpoint -> orbax-checkpoint directory, and the loader back.

Layout of a converted directory:
  config.json, generation_config.json, tokenizer files   copied from the HF directory
  params/                                                 orbax checkpoint of the params pytree
  longflow_checkpoint.json                                written last: marks the conversion complete
The directory is assembled under a temporary name and renamed into place at the end, so a failed or
interrupted conversion never leaves something that looks complete.

Memory: tensors are read one at a time from memory-mapped safetensors files and converted straight into
the output params (one copy of the model in the target dtype, plus one tensor in flight).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys

import jax
import ml_dtypes
import numpy as np

from .config import DTYPES, ModelConfig, dtype_from_name
from .model import param_shapes

MARKER = "longflow_checkpoint.json"
FORMAT_VERSION = 1
TOKENIZER_FILES = (
    "generation_config.json tokenizer.json tokenizer_config.json special_tokens_map.json added_tokens.json "
    "vocab.json merges.txt tokenizer.model chat_template.jinja chat_template.json"
).split()
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
# Buffers some older exports carry that are not weights (recomputed from the config here).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")

# Our param name -> (Hugging Face tensor name, whether HF stores it transposed: [out, in] against our
# [in, out]). Layer names sit under "model.layers.{i}.".
HF_NAMES = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}
HF_LAYER_NAMES = {
    "input_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "bo": ("self_attn.o_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "post_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config (missing, unexpected or mis-shaped tensors)."""


def hf_name_for(path) -> tuple[str, bool]:
    """A params key path (from jax.tree_util.tree_flatten_with_path) -> (HF tensor name, transposed?)."""
    keys = [getattr(p, "key", getattr(p, "idx", None)) for p in path]
    if keys[0] == "layers":
        name, transpose = HF_LAYER_NAMES[keys[2]]
        return f"model.layers.{keys[1]}.{name}", transpose
    return HF_NAMES[keys[0]]


def iter_safetensors(path: str):
    """Yield (name, array view) from one .safetensors file, memory-mapped (no full read)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {path} has unsupported dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        arr = data[start:end].view(_SAFETENSORS_DTYPES[meta["dtype"]]).reshape(meta["shape"])
        yield name, arr


def safetensors_files(hf_dir: str) -> list[str]:
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [fn for fn in files if not os.path.isfile(os.path.join(hf_dir, fn))]
        if missing:
            raise CheckpointError(f"shards listed in {index} are missing: {missing}")
        return [os.path.join(hf_dir, fn) for fn in files]
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(fn for fn in os.listdir(hf_dir) if fn.endswith(".safetensors"))
    if not found:
        raise CheckpointError(
            f"no *.safetensors files in {hf_dir!r} (only safetensors checkpoints are supported)"
        )
    return [os.path.join(hf_dir, fn) for fn in found]


def read_params(hf_dir: str, config: ModelConfig, dtype: str) -> dict:
    """Stream every tensor of the HF checkpoint into a params pytree of numpy arrays in `dtype`."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config))
    expected = {}  # HF name -> (leaf index, transposed?, the shape HF stores)
    for i, (path, leaf) in enumerate(leaves):
        name, transpose = hf_name_for(path)
        expected[name] = (i, transpose, leaf.shape[::-1] if transpose else leaf.shape)
    values = [None] * len(leaves)
    for path in safetensors_files(hf_dir):
        for name, arr in iter_safetensors(path):
            if _IGNORED.match(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
                continue  # tied: the embedding serves as the head; some exports still save a copy
            if name not in expected:
                raise CheckpointError(
                    f"unexpected tensor {name!r} in {os.path.basename(path)}: it has no place in a "
                    f"{config.model_type} model with this config (e.g. a bias with attention_bias=false, "
                    f"or a layer beyond num_hidden_layers)"
                )
            i, transpose, hf_shape = expected[name]
            if arr.shape != hf_shape:
                raise CheckpointError(
                    f"tensor {name!r} has shape {arr.shape}, expected {hf_shape} from config.json"
                )
            if values[i] is not None:
                raise CheckpointError(f"tensor {name!r} appears twice in the checkpoint")
            values[i] = np.ascontiguousarray(arr.T if transpose else arr).astype(DTYPES[dtype])
    missing = [name for name, (i, _, _) in expected.items() if values[i] is None]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {missing[:10]}")
    return jax.tree_util.tree_unflatten(treedef, values)


def convert(hf_dir: str, out_dir: str, dtype: str = "auto", overwrite: bool = False) -> ModelConfig:
    """Convert a HF checkpoint directory; returns the config of the written checkpoint."""
    import orbax.checkpoint as ocp

    hf_dir, out_dir = os.path.abspath(hf_dir), os.path.abspath(out_dir)
    if not os.path.isdir(hf_dir):
        raise ValueError(f"HF checkpoint directory {hf_dir!r} does not exist")
    if os.path.exists(out_dir) and not overwrite:
        raise ValueError(f"output {out_dir!r} already exists (pass overwrite=True / --overwrite)")
    config = ModelConfig.from_pretrained_dir(hf_dir)  # raises on a missing config or unknown model
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_config = json.load(f)
    dtype = config.dtype if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    config = config.replace(dtype=dtype)

    params = read_params(hf_dir, config, dtype)

    staging = f"{out_dir}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(staging, "params"), params)
        checkpointer.wait_until_finished()
        del params
        hf_config = dict(hf_config, dtype=dtype)
        hf_config.pop("torch_dtype", None)
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        for name in TOKENIZER_FILES:
            src = os.path.join(hf_dir, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(staging, name))
        with open(os.path.join(staging, MARKER), "w") as f:
            json.dump({"format_version": FORMAT_VERSION, "dtype": dtype, "source": hf_dir}, f)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return config


def load(ckpt_dir: str, dtype: str | None = None, sharding: jax.sharding.Sharding | None = None):
    """Load a converted checkpoint: returns (ModelConfig, params pytree of jax arrays).

    dtype: cast the params on load (e.g. "bfloat16"); default keeps the converted dtype.
    sharding: where the params go (default: the first device); e.g. a replicated NamedSharding for
    data-parallel generation. Tensors are restored straight onto it.
    """
    import orbax.checkpoint as ocp

    ckpt_dir = os.path.abspath(ckpt_dir)
    if not os.path.isfile(os.path.join(ckpt_dir, MARKER)):
        raise ValueError(
            f"{ckpt_dir!r} is not a complete longflow-jax checkpoint (no {MARKER}); "
            f"convert a Hugging Face directory with `longflow-convert HF_DIR OUT_DIR`"
        )
    config = ModelConfig.from_pretrained_dir(ckpt_dir)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), param_shapes(config)
    )
    params = ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir, "params"), target)
    if dtype is not None and dtype != config.dtype:
        cast = dtype_from_name(dtype)
        params = jax.tree_util.tree_map(lambda x: x.astype(cast), params)
        config = config.replace(dtype=dtype)
    return config, params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="longflow-convert",
        description="Convert a Hugging Face Llama/Qwen2/Qwen3 safetensors checkpoint to a longflow-jax "
        "(orbax) checkpoint.",
    )
    parser.add_argument("hf_dir", help="directory with config.json and *.safetensors")
    parser.add_argument("out_dir", help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)])
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        config = convert(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    except ValueError as e:
        print(f"longflow-convert: error: {e}", file=sys.stderr)
        return 2
    print(
        f"converted {config.model_type} ({config.num_layers} layers, hidden {config.hidden_size}, "
        f"{config.dtype}) -> {args.out_dir}"
    )
    return 0
