"""Checkpoint conversion: sharded input, and every way a checkpoint can disagree with its config."""

import json
import os
import shutil
import struct

import jax
import numpy as np
import pytest

import longflow_jax as lf
from longflow_jax.convert import MARKER, iter_safetensors, main
from longflow_jax.testing import make_tiny_hf_checkpoint


def _params_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _write_safetensors(path, tensors):
    """Minimal safetensors writer (float32) so tests can craft broken checkpoints."""
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr, np.float32).tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


@pytest.fixture
def hf_copy(tiny_checkpoints, tmp_path):
    """A fresh copy of the tiny qwen3 HF checkpoint as an editable dict of tensors."""
    src = tiny_checkpoints["qwen3"][0]
    dst = tmp_path / "hf"
    shutil.copytree(src, dst)
    tensors = {n: np.array(a) for n, a in iter_safetensors(str(dst / "model.safetensors"))}
    return dst, tensors


def test_sharded_checkpoint_converts_to_same_params(tiny_checkpoints, tmp_path):
    single_hf, single_lf = tiny_checkpoints["qwen3"]
    sharded = make_tiny_hf_checkpoint(str(tmp_path / "sharded"), "qwen3", max_shard_size="20KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    lf.convert(sharded, str(tmp_path / "out"))
    _, a = lf.load(single_lf)
    _, b = lf.load(str(tmp_path / "out"))
    _params_equal(a, b)


def test_convert_to_bfloat16(tiny_checkpoints, tmp_path):
    lf.convert(tiny_checkpoints["qwen2"][0], str(tmp_path / "bf16"), dtype="bfloat16")
    config, params = lf.load(str(tmp_path / "bf16"))
    assert config.dtype == "bfloat16"
    assert all(x.dtype == np.dtype("bfloat16") for x in jax.tree_util.tree_leaves(params))


def _expect_failure(hf_dir, out_dir, match):
    with pytest.raises(ValueError, match=match):
        lf.convert(str(hf_dir), str(out_dir))
    assert not os.path.exists(out_dir), "a failed conversion must not leave an output directory"
    assert not any(
        p.name.startswith(os.path.basename(out_dir) + ".partial") for p in out_dir.parent.iterdir()
    )


def test_missing_tensor_is_named(hf_copy, tmp_path):
    hf_dir, tensors = hf_copy
    del tensors["model.layers.1.mlp.up_proj.weight"]
    _write_safetensors(hf_dir / "model.safetensors", tensors)
    _expect_failure(hf_dir, tmp_path / "out", r"missing .*model\.layers\.1\.mlp\.up_proj\.weight")


def test_extra_tensor_is_named(hf_copy, tmp_path):
    hf_dir, tensors = hf_copy
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.ones(64, np.float32)
    _write_safetensors(hf_dir / "model.safetensors", tensors)
    _expect_failure(
        hf_dir, tmp_path / "out", r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"
    )


def test_tensor_for_a_layer_beyond_config_is_unexpected(hf_copy, tmp_path):
    hf_dir, tensors = hf_copy
    tensors["model.layers.7.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"]
    _write_safetensors(hf_dir / "model.safetensors", tensors)
    _expect_failure(hf_dir, tmp_path / "out", r"unexpected tensor 'model\.layers\.7\.mlp\.up_proj\.weight'")


def test_wrong_shape_is_named(hf_copy, tmp_path):
    hf_dir, tensors = hf_copy
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.ones((8, 64), np.float32)
    _write_safetensors(hf_dir / "model.safetensors", tensors)
    _expect_failure(
        hf_dir, tmp_path / "out", r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(8, 64\)"
    )


def test_unknown_model_type(hf_copy, tmp_path):
    hf_dir, _ = hf_copy
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    _expect_failure(hf_dir, tmp_path / "out", r"unsupported model_type 'mistral'")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"use_sliding_window": True}, "use_sliding_window"),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
            "rope scaling type 'yarn'",
        ),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ],
)
def test_unsupported_options_fail_clearly(hf_copy, tmp_path, change, match):
    hf_dir, _ = hf_copy
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(change)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    _expect_failure(hf_dir, tmp_path / "out", match)


def test_no_weights_and_missing_shard(hf_copy, tmp_path):
    hf_dir, _ = hf_copy
    os.remove(hf_dir / "model.safetensors")
    _expect_failure(hf_dir, tmp_path / "out", r"no \*\.safetensors")
    (hf_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "part-1.safetensors"}})
    )
    _expect_failure(hf_dir, tmp_path / "out2", r"missing: \['part-1\.safetensors'\]")


def test_existing_output_needs_overwrite_and_load_needs_marker(tiny_checkpoints, tmp_path):
    hf_dir, lf_dir = tiny_checkpoints["llama"]
    with pytest.raises(ValueError, match="already exists"):
        lf.convert(hf_dir, lf_dir)
    broken = tmp_path / "incomplete"
    shutil.copytree(lf_dir, broken)
    os.remove(broken / MARKER)
    with pytest.raises(ValueError, match="not a complete longflow-jax checkpoint"):
        lf.load(str(broken))


def test_cli_converts_and_reports_errors(tiny_checkpoints, tmp_path, capsys):
    hf_dir, _ = tiny_checkpoints["qwen3"]
    assert main([hf_dir, str(tmp_path / "cli"), "--dtype", "float16"]) == 0
    assert lf.load(str(tmp_path / "cli"))[0].dtype == "float16"
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
