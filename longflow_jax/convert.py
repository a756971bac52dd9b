"""Hugging Face safetensors checkpoint (or a GGUF file, read by gguf_import) -> orbax-checkpoint directory,
and the loader back.

A converted directory holds the HF config, generation config and tokenizer files, `params/` (orbax) and,
written last to mark it complete, `longflow_checkpoint.json`. Every tensor is checked (offsets, shape,
finite values) before anything is written; the new directory is assembled as OUT.partial-PID and swapped
in atomically, so OUT always holds the old complete checkpoint or the new one. A killed conversion leaves
at most OUT.partial-PID or OUT.old-PID, each marked with STAGING_MARK, swept by the next conversion to OUT
once that PID is dead; a directory of that name without the mark is someone else's and is left alone.
Tensors stream one at a time from memory-mapped files: one copy of the model in memory, in the target dtype.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import re
import shutil
import struct
import sys
import time

import jax
import ml_dtypes
import numpy as np

from .config import DTYPES, ModelConfig, dtype_from_name
from .model import param_shapes
from .sharding import param_shardings

MARKER = "longflow_checkpoint.json"
# In OUT.partial-PID and OUT.old-PID, holding the PID: the sweep deletes only directories this tool made.
STAGING_MARK = ".longflow_convert_staging"
GGUF_MAGIC = b"GGUF"  # the first bytes of every GGUF file
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


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def iter_safetensors(path: str):
    """Yield (name, memory-mapped array) from one .safetensors file. A truncated, empty or foreign file, or
    a tensor whose offsets disagree with its dtype and shape, raises CheckpointError naming it."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is {size} bytes: too short for a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: header length {header_len} exceeds the file's {size} bytes "
                f"(truncated, or not a safetensors file)"
            )
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:  # also UnicodeDecodeError
            raise CheckpointError(f"{path}: the safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is a {type(header).__name__}, not an object")
    data_len = size - 8 - header_len
    data = np.memmap(path, np.uint8, "r", 8 + header_len) if data_len else np.zeros(0, np.uint8)
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {name!r} in {path}"
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
            raise CheckpointError(
                f"{where}: expected an object with dtype, shape, data_offsets, got {meta!r}"
            )
        if meta["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where} has unsupported dtype {meta['dtype']}")
        dtype = np.dtype(_SAFETENSORS_DTYPES[meta["dtype"]])
        shape, offsets = meta["shape"], meta["data_offsets"]
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise CheckpointError(f"{where}: data_offsets must be [start, end], got {offsets!r}")
        start, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if not start <= end <= data_len or end - start != nbytes:
            raise CheckpointError(
                f"{where}: data_offsets {offsets} do not fit {meta['dtype']} {shape} ({nbytes} bytes) "
                f"in a data section of {data_len} bytes (truncated or corrupt file)"
            )
        yield name, data[start:end].view(dtype).reshape(shape)


def safetensors_files(hf_dir: str) -> list[str]:
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(_weight_map(index).values()))
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


def _weight_map(index: str) -> dict:
    """The {tensor name: shard file} map of a shard index, checked before any shard is opened."""
    try:
        with open(index) as f:
            content = json.load(f)
    except ValueError as e:  # UnicodeDecodeError included
        raise CheckpointError(f"{index} is not valid JSON ({e})") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        got = f"'weight_map' = {weight_map!r}" if isinstance(content, dict) else type(content).__name__
        raise CheckpointError(
            f"{index}: expected a JSON object whose 'weight_map' maps tensor names to shard file names "
            f"(strings), got {got[:200]}"
        )
    return weight_map


def _safetensors_tensors(hf_dir: str):
    """(file, HF tensor name, memory-mapped array) for every tensor of a HF checkpoint directory."""
    for path in safetensors_files(hf_dir):
        for name, arr in iter_safetensors(path):
            yield path, name, arr


def read_params(tensors, config: ModelConfig, dtype: str) -> dict:
    """Stream (file, HF tensor name, array) triples into a params pytree of numpy arrays in `dtype`."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config))
    expected = {}  # HF name -> (leaf index, transposed?, the shape HF stores)
    for i, (path, leaf) in enumerate(leaves):
        name, transpose = hf_name_for(path)
        expected[name] = (i, transpose, leaf.shape[::-1] if transpose else leaf.shape)
    values = [None] * len(leaves)
    tied_head = None
    for path, name, arr in tensors:
        if _IGNORED.match(name):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            # Tied: the embedding serves as the head. Some exports still save a copy, checked below
            # (transformers unties a head that differs, so dropping it would compute another model).
            tied_head = (path, arr)
            continue
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
        values[i] = _finite_cast(arr.T if transpose else arr, dtype, f"tensor {name!r} in {path}")
    missing = [name for name, (i, _, _) in expected.items() if values[i] is None]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {missing[:10]}")
    if tied_head is not None:
        path, arr = tied_head
        embed = values[expected["model.embed_tokens.weight"][0]]
        if arr.shape != embed.shape or not np.array_equal(_finite_cast(arr, dtype, path), embed):
            raise CheckpointError(
                f"tensor 'lm_head.weight' in {os.path.basename(path)} differs from model.embed_tokens.weight "
                "while config.json has tie_word_embeddings=true: set it to false to convert the separate head"
            )
    return jax.tree_util.tree_unflatten(treedef, values)


def _finite_cast(arr: np.ndarray, dtype: str, where: str) -> np.ndarray:
    """arr in `dtype`, refused if any value is NaN or inf after the cast (a float16 overflow included):
    such a weight turns every logit non-finite, and the model would only emit pad tokens."""
    with np.errstate(over="ignore"):
        value = np.ascontiguousarray(arr).astype(DTYPES[dtype])
    if np.isfinite(value).all():
        return value
    num_nan, num_inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
    cause = (
        f"its values overflow {dtype}: convert with --dtype bfloat16 or float32"
        if np.isfinite(arr).all()
        else "the checkpoint itself holds them"
    )
    raise CheckpointError(f"{where} has {num_nan} NaN and {num_inf} inf value(s) in {dtype} ({cause})")


def _orbax_committed(params_dir: str) -> bool:
    """Orbax's own mark of a finished save: commit_success.txt, or (versions that write it only on
    object stores) a commit timestamp in _CHECKPOINT_METADATA."""
    if os.path.isfile(os.path.join(params_dir, "commit_success.txt")):
        return True
    try:
        with open(os.path.join(params_dir, "_CHECKPOINT_METADATA")) as f:
            return bool(json.load(f).get("commit_timestamp_nsecs"))
    except (OSError, ValueError, AttributeError):
        return False


def incomplete_reason(ckpt_dir: str) -> str | None:
    """None for a complete converted checkpoint, else what is wrong with `ckpt_dir`."""
    if not os.path.exists(ckpt_dir):
        return "it does not exist"
    if not os.path.isdir(ckpt_dir):
        return "it is a file, not a checkpoint directory"
    if not os.path.isfile(os.path.join(ckpt_dir, MARKER)):
        return f"it has no {MARKER}, so it is not a complete longflow-jax checkpoint"
    if not _orbax_committed(os.path.join(ckpt_dir, "params")):
        return "its params/ has no orbax commit marker (commit_success.txt): the save did not finish"
    return None


_LEFTOVER = re.compile(r"\.(partial|old)-(\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass  # another user's process, or not a PID we can judge: keep its directory
    return True


def _mark_ours(path: str) -> None:
    """Mark a staging or set-aside directory as this process's, so that a later sweep may delete it."""
    with open(os.path.join(path, STAGING_MARK), "w") as f:
        f.write(str(os.getpid()))


def _unmark(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(os.path.join(path, STAGING_MARK))


def _marked_by(path: str, pid: int) -> bool:
    """Whether `path` is a directory (not a link) that this tool, running as process `pid`, marked."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    try:
        with open(os.path.join(path, STAGING_MARK)) as f:
            return f.read().strip() == str(pid)
    except (OSError, UnicodeDecodeError):
        return False


def _remove_checkpoint(path: str) -> None:
    """Delete a checkpoint directory, its marker first, so a half-deleted one never reads as complete.
    A directory that cannot be deleted now is left for the next conversion's sweep."""
    with contextlib.suppress(OSError):
        os.remove(os.path.join(path, MARKER))
    shutil.rmtree(path, ignore_errors=True)


def _dead_leftovers(out_dir: str, hf_dir: str):
    """(kind, path) of each OUT.partial-PID / OUT.old-PID that a conversion, now dead, made and marked with
    its PID. A directory of that name without the mark, or one holding the source, is not ours to touch."""
    parent, base = os.path.split(out_dir)
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        match = _LEFTOVER.match(entry[len(base) :]) if entry.startswith(base) else None
        path = os.path.join(parent, entry)
        if not match or os.path.commonpath([path, hf_dir]) == path:
            continue
        pid = int(match[2])
        if _marked_by(path, pid) and not _pid_alive(pid):
            yield match[1], path


def _restore_set_aside(out_dir: str, hf_dir: str) -> None:
    """Put back a complete OUT.old-PID while OUT is missing: the old checkpoint, caught between the two
    renames of a non-atomic swap."""
    if os.path.lexists(out_dir):
        return
    for kind, path in _dead_leftovers(out_dir, hf_dir):
        if kind == "old" and incomplete_reason(path) is None:
            os.rename(path, out_dir)
            _unmark(out_dir)
            return


def _sweep_leftovers(out_dir: str, hf_dir: str) -> None:
    """Delete the OUT.partial-PID / OUT.old-PID that killed conversions to OUT left."""
    for _, path in _dead_leftovers(out_dir, hf_dir):
        _remove_checkpoint(path)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(a: str, b: str, flags: int) -> bool:
    """Linux renameat2(a, b, flags); False where the OS or the file system does not offer it."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (RENAME_EXCHANGE); False where not offered."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def _rename_noreplace(a: str, b: str) -> bool:
    """Rename a to b, raising FileExistsError if b exists (RENAME_NOREPLACE); False where not offered."""
    return _renameat2(a, b, _RENAME_NOREPLACE)


def _fault_point(stage: str) -> None:
    """Test hook: LONGFLOW_FAULT_PAUSE=stage makes the converter say so on stdout and sleep at that
    point, so a fault-injection test can SIGKILL it at a known moment."""
    if os.environ.get("LONGFLOW_FAULT_PAUSE") == stage:
        print(f"paused at {stage}", flush=True)
        time.sleep(3600)


def _is_gguf_source(source: str) -> bool:
    """Whether the source is a GGUF file (else a HF checkpoint directory). Judged from the path as given,
    before links are resolved: a Hugging Face cache links snapshots/REV/x.gguf to an extensionless blob.
    A file without the .gguf name counts when it starts with the GGUF magic."""
    if os.path.isdir(source):
        return False
    if not os.path.isfile(source):
        raise ValueError(f"HF checkpoint directory or GGUF file {source!r} does not exist")
    if source.endswith(".gguf"):
        return True
    with open(source, "rb") as f:
        if f.read(len(GGUF_MAGIC)) == GGUF_MAGIC:
            return True
    raise ValueError(
        f"source {source!r} is a file but not a GGUF file (no .gguf name, no GGUF magic); expected a HF "
        f"checkpoint directory or a .gguf file"
    )


def _check_paths(hf_dir: str, out_dir: str, overwrite: bool) -> None:
    """Refuse an output that overlaps the source or that --overwrite must not replace, then sweep the
    leftovers of killed conversions to the same output. An old checkpoint that a killed swap set aside is
    put back first, so the checks judge it as OUT."""
    if os.path.commonpath([hf_dir, out_dir]) in (hf_dir, out_dir):
        raise ValueError(
            f"output {out_dir!r} must lie outside the source {hf_dir!r} and must not contain it "
            f"(replacing it would delete the source)"
        )
    _restore_set_aside(out_dir, hf_dir)
    if os.path.lexists(out_dir):
        if not overwrite:
            raise ValueError(f"output {out_dir!r} already exists (pass overwrite=True / --overwrite)")
        reason = incomplete_reason(out_dir)
        if reason:
            raise ValueError(
                f"refusing to overwrite {out_dir!r}: {reason}; --overwrite only replaces a complete "
                f"converted checkpoint (delete it yourself if it is yours)"
            )
    _sweep_leftovers(out_dir, hf_dir)


def _install_new(staging: str, out_dir: str) -> None:
    """Rename the finished staging directory to OUT, which must not exist. An OUT that appeared during the
    conversion is left as it is, and so is the converted copy, handed over to the user."""
    try:
        if not _rename_noreplace(staging, out_dir):
            if os.path.lexists(out_dir):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), out_dir)
            os.rename(staging, out_dir)  # fails on a file or a non-empty directory created since the check
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _unmark(staging)  # the user's now: no sweep may delete it
        raise ValueError(
            f"output {out_dir!r} appeared during the conversion and is left as it is; the converted "
            f"checkpoint is at {staging!r} (move it where you want it)"
        ) from None
    _unmark(out_dir)


def _replace(staging: str, out_dir: str, aside: str) -> None:
    """Swap the finished staging directory in for OUT, a complete converted checkpoint (checked again: OUT
    may have changed during the conversion). The old checkpoint goes to `aside`, then is deleted."""
    reason = incomplete_reason(out_dir)
    if reason:
        _unmark(staging)  # the user's now: no sweep may delete it
        raise ValueError(
            f"refusing to overwrite {out_dir!r}, changed during the conversion: {reason}; the converted "
            f"checkpoint is at {staging!r} (move it where you want it)"
        )
    try:
        _mark_ours(out_dir)  # once set aside, the old checkpoint is this process's to delete
        if _exchange(staging, out_dir):
            os.rename(staging, aside)  # staging now holds the old checkpoint
        else:
            os.rename(out_dir, aside)
            _fault_point("aside")
            try:
                os.rename(staging, out_dir)
            except BaseException:
                os.rename(aside, out_dir)
                raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _unmark(out_dir)
        raise
    _unmark(out_dir)
    _fault_point("swapped")
    _remove_checkpoint(aside)


def convert(hf_dir: str, out_dir: str, dtype: str = "auto", overwrite: bool = False) -> ModelConfig:
    """Convert a HF checkpoint directory, or a llama.cpp .gguf file (`gguf_import`: dequantized, dtype
    "auto" is float32); returns the written config. overwrite replaces OUT only when it is a complete
    converted checkpoint. Paths are compared after resolving symlinks."""
    import orbax.checkpoint as ocp

    source = os.path.abspath(hf_dir)
    is_gguf = _is_gguf_source(source)
    hf_dir, out_dir = os.path.realpath(hf_dir), os.path.realpath(out_dir)
    _check_paths(hf_dir, out_dir, overwrite)  # before reading: a wrong OUT fails fast
    tokenizer = None
    if is_gguf:
        from .gguf_import import read_gguf

        # By the name given: the tokenizer is read from the GGUF file by its directory and file name.
        hf_config, gguf_tensors, tokenizer = read_gguf(source)
        config = ModelConfig.from_hf_dict(hf_config)
        tensors = ((source, name, arr) for name, arr in gguf_tensors)
    else:
        config = ModelConfig.from_pretrained_dir(hf_dir)  # raises on a missing config or unknown model
        with open(os.path.join(hf_dir, "config.json")) as f:
            hf_config = json.load(f)
        tensors = _safetensors_tensors(hf_dir)
    dtype = config.dtype if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    config = config.replace(dtype=dtype)

    params = read_params(tensors, config, dtype)  # every check that can fail happens before any write

    pid = os.getpid()
    staging, aside = f"{out_dir}.partial-{pid}", f"{out_dir}.old-{pid}"
    for path in (staging, aside):  # left by a killed conversion whose PID this process now has
        if _marked_by(path, pid):
            _remove_checkpoint(path)
    os.makedirs(staging)
    try:
        _mark_ours(staging)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(staging, "params"), params)
        checkpointer.wait_until_finished()
        del params
        _fault_point("staging")
        hf_config = dict(hf_config, dtype=dtype)
        hf_config.pop("torch_dtype", None)
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        for name in TOKENIZER_FILES:
            src = os.path.join(hf_dir, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(staging, name))
        if tokenizer is not None:  # with its chat template in tokenizer_config.json, where all versions look
            tokenizer.save_pretrained(staging, save_jinja_files=False)
        with open(os.path.join(staging, MARKER), "w") as f:
            json.dump({"format_version": FORMAT_VERSION, "dtype": dtype, "source": hf_dir}, f)
        _fault_point("staged")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if overwrite and os.path.lexists(out_dir):
        _replace(staging, out_dir, aside)
    else:
        _install_new(staging, out_dir)
    return config


def load(
    ckpt_dir: str,
    dtype: str | None = None,
    sharding: jax.sharding.Sharding | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
):
    """Load a converted checkpoint: returns (ModelConfig, params pytree of jax arrays).

    dtype: cast the params on load (e.g. "bfloat16"); default keeps the converted dtype.
    sharding: where the params go (default: the first device): one Sharding for all of them (e.g. a
    replicated NamedSharding for data-parallel generation), or a pytree of them in the params' layout.
    mesh: instead of sharding, a mesh for `generate(..., mesh=)`: each param split as
    `sharding.param_shardings` splits it. Tensors are restored straight into their shards, with no
    full copy of the model on the host or on any one device.
    """
    import orbax.checkpoint as ocp

    if sharding is not None and mesh is not None:
        raise ValueError("pass sharding or mesh, not both")
    ckpt_dir = os.path.abspath(ckpt_dir)
    reason = incomplete_reason(ckpt_dir)
    if reason:
        raise CheckpointError(
            f"cannot load {ckpt_dir!r}: {reason}; convert a Hugging Face directory with "
            f"`longflow-convert HF_DIR OUT_DIR`"
        )
    config = ModelConfig.from_pretrained_dir(ckpt_dir)
    shapes = param_shapes(config)
    if mesh is not None:
        sharding = param_shardings(config, mesh)
    elif not isinstance(sharding, dict):
        one = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        sharding = jax.tree.map(lambda _: one, shapes)
    target = jax.tree.map(
        lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), shapes, sharding
    )
    try:
        params = ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir, "params"), target)
    except (ValueError, OSError, KeyError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot load {ckpt_dir!r}: its params/ does not match config.json or is damaged "
            f"({type(e).__name__}: {first_line[:300]}); convert it again"
        ) from e
    if dtype is not None and dtype != config.dtype:
        cast = dtype_from_name(dtype)
        params = jax.tree_util.tree_map(lambda x: x.astype(cast), params)
        config = config.replace(dtype=dtype)
    return config, params


def main(argv=None) -> int:
    from .runner import cli_main

    parser = argparse.ArgumentParser(
        prog="longflow-convert",
        description="Convert a Hugging Face Llama/Qwen2/Qwen3 safetensors checkpoint, or a llama.cpp GGUF "
        "file of those families, to a longflow-jax (orbax) checkpoint.",
    )
    parser.add_argument("hf_dir", help="directory with config.json and *.safetensors, or a .gguf file")
    parser.add_argument(
        "out_dir", help="output directory (must not exist unless --overwrite; never the source)"
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)])
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT_DIR if it is a complete converted checkpoint"
    )

    def run(args) -> None:
        config = convert(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
        print(
            f"converted {config.model_type} ({config.num_layers} layers, hidden {config.hidden_size}, "
            f"{config.dtype}) -> {args.out_dir}"
        )

    return cli_main(run, parser, "longflow-convert", argv)


if __name__ == "__main__":
    sys.exit(main())
