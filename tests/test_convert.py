"""Checkpoint conversion: sharded input, and every way a checkpoint can disagree with its config."""

import json
import math
import os
import shutil
import struct

import jax
import numpy as np
import pytest

import longflow_jax as lf
from longflow_jax.config import CompressionConfig, SamplingConfig
from longflow_jax.convert import GGUF_MAGIC, MARKER, _is_gguf_source, iter_safetensors, main
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


@pytest.mark.parametrize(
    "index, got",
    [
        ({"metadata": {}}, "got 'weight_map' = None"),
        ({"weight_map": ["model.safetensors"]}, "got 'weight_map' = ['model.safetensors']"),
        ({"weight_map": {"lm_head.weight": 1}}, "got 'weight_map' = {'lm_head.weight': 1}"),
        (["weight_map"], "got list"),
    ],
    ids=["no weight_map", "weight_map a list", "shard not a string", "index a list"],
)
def test_a_malformed_shard_index_is_a_checkpoint_error(hf_copy, tmp_path, index, got):
    hf_dir, _ = hf_copy
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    expected = r"model\.safetensors\.index\.json: expected a JSON object whose 'weight_map' maps tensor names"
    with pytest.raises(lf.CheckpointError, match=expected) as error:
        lf.convert(str(hf_dir), str(tmp_path / "out"))
    assert got in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_shard_index_that_is_not_json_is_a_checkpoint_error(hf_copy, tmp_path):
    hf_dir, _ = hf_copy
    (hf_dir / "model.safetensors.index.json").write_text("{weight_map: ")
    with pytest.raises(lf.CheckpointError, match=r"model\.safetensors\.index\.json is not valid JSON"):
        lf.convert(str(hf_dir), str(tmp_path / "out"))


def _hub_cache_link(path, name="model.gguf"):
    """Lay `path` out as a Hugging Face hub cache does: snapshots/REV/name -> ../../blobs/HASH."""
    root = path.parent / "hub"
    (root / "blobs").mkdir(parents=True)
    (root / "snapshots" / "rev").mkdir(parents=True)
    os.rename(path, root / "blobs" / "0123abcd")
    os.symlink("../../blobs/0123abcd", root / "snapshots" / "rev" / name)
    return root / "snapshots" / "rev" / name


def test_a_source_is_classified_by_the_path_given_or_the_gguf_magic(tmp_path):
    gguf_blob, other_blob = tmp_path / "a", tmp_path / "b"
    gguf_blob.write_bytes(GGUF_MAGIC + b"\x03\x00\x00\x00")
    other_blob.write_bytes(b"PK\x03\x04")
    assert _is_gguf_source(str(_hub_cache_link(other_blob)))  # the name given says GGUF
    assert _is_gguf_source(str(gguf_blob))  # no .gguf name, but the GGUF magic
    assert not _is_gguf_source(str(tmp_path))
    (tmp_path / "c").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="is a file but not a GGUF file"):
        _is_gguf_source(str(tmp_path / "c"))
    with pytest.raises(ValueError, match="does not exist"):
        _is_gguf_source(str(tmp_path / "missing.gguf"))


def test_a_gguf_linked_to_an_extensionless_blob_converts(tmp_path):
    from test_gguf import tiny_gguf

    path, _, _ = tiny_gguf(tmp_path, "qwen3")
    linked = _hub_cache_link(tmp_path / os.path.basename(path))
    lf.convert(str(linked), str(tmp_path / "out"))
    config, _ = lf.load(str(tmp_path / "out"))
    assert config.model_type == "qwen3" and config.dtype == "float32"


def test_existing_output_needs_overwrite_and_load_needs_marker(tiny_checkpoints, tmp_path):
    hf_dir, lf_dir = tiny_checkpoints["llama"]
    with pytest.raises(ValueError, match="already exists"):
        lf.convert(hf_dir, lf_dir)
    broken = tmp_path / "incomplete"
    shutil.copytree(lf_dir, broken)
    os.remove(broken / MARKER)
    with pytest.raises(lf.CheckpointError, match="not a complete longflow-jax checkpoint"):
        lf.load(str(broken))


def test_cli_converts_and_reports_errors(tiny_checkpoints, tmp_path, capsys):
    hf_dir, _ = tiny_checkpoints["qwen3"]
    assert main([hf_dir, str(tmp_path / "cli"), "--dtype", "float16"]) == 0
    assert lf.load(str(tmp_path / "cli"))[0].dtype == "float16"
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_overwrite_replaces_a_complete_checkpoint(hf_copy, tmp_path):
    hf_dir, _ = hf_copy
    out = tmp_path / "out"
    lf.convert(str(hf_dir), str(out))
    lf.convert(str(hf_dir), str(out), dtype="bfloat16", overwrite=True)
    assert lf.load(str(out))[0].dtype == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"], "no staging or aside copy is left"


def test_cli_reports_os_errors_in_one_line(hf_copy, tmp_path, capsys):
    hf_dir, _ = hf_copy
    (tmp_path / "a_file").write_text("x")
    assert main([str(hf_dir), str(tmp_path / "a_file" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longflow-convert: error: ") and err.count("\n") == 1 and "Traceback" not in err


# Bad inputs: each (setup, action, match). setup(hf_dir, tensors, tmp_path) breaks something before the
# action runs; the action must raise a ValueError matching `match` and leave every file as it was.
UP = "model.layers.0.mlp.up_proj.weight"
_DELETE = object()


def _convert(hf, tmp, out="out", **kw):
    return lf.convert(str(hf), str(tmp / out) if isinstance(out, str) else str(out), **kw)


def _config(**change):
    def setup(hf, tensors, tmp):
        cfg = json.loads((hf / "config.json").read_text())
        cfg.update(change)
        cfg = {k: v for k, v in cfg.items() if v is not _DELETE}
        (hf / "config.json").write_text(json.dumps(cfg))

    return setup


def _raw(name, data):
    def setup(hf, tensors, tmp):
        (hf / name).write_bytes(data(hf / name) if callable(data) else data)

    return setup


def _weights(edit):
    def setup(hf, tensors, tmp):
        edit(tensors)
        _write_safetensors(hf / "model.safetensors", tensors)

    return setup


def _header(edit):
    """Rewrite the safetensors header (data section kept) after edit(header)."""

    def data(path):
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        edit(header)
        new = json.dumps(header).encode()
        return struct.pack("<Q", len(new)) + new + raw[8 + n :]

    return _raw("model.safetensors", data)


def _set(**kv):
    return lambda d: d.update(kv)


def _set_value(name, index, value):
    return lambda t: t[name].__setitem__(index, value)


def _half_checkpoint(hf, tensors, tmp):
    lf.convert(str(hf), str(tmp / "out"))
    os.remove(tmp / "out" / "params" / "commit_success.txt")
    os.remove(tmp / "out" / "params" / "_CHECKPOINT_METADATA")


def _nothing(hf, tensors, tmp):
    pass


def _mkdir_with_file(hf, tensors, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "mine.txt").write_text("keep me")


BAD_INPUTS = {
    # where the output goes
    "out is the source": (
        _nothing,
        lambda hf, tmp: _convert(hf, tmp, hf, overwrite=True),
        "outside the source",
    ),
    "out inside the source": (_nothing, lambda hf, tmp: _convert(hf, tmp, hf / "sub"), "outside the source"),
    "out contains the source": (
        _raw("../notes.txt", b"unrelated"),
        lambda hf, tmp: _convert(hf, tmp, tmp, overwrite=True),
        "must not contain it",
    ),
    "out a symlink to the source": (
        lambda hf, t, tmp: os.symlink(hf, tmp / "link"),
        lambda hf, tmp: _convert(hf, tmp, "link", overwrite=True),
        "outside the source",
    ),
    "out exists": (_half_checkpoint, lambda hf, tmp: _convert(hf, tmp), "already exists"),
    "overwrite a file": (
        _raw("../out", b"a file"),
        lambda hf, tmp: _convert(hf, tmp, overwrite=True),
        "refusing to overwrite .* is a file",
    ),
    "overwrite a plain dir": (
        _mkdir_with_file,
        lambda hf, tmp: _convert(hf, tmp, overwrite=True),
        f"refusing to overwrite .*no {MARKER}",
    ),
    "overwrite a half checkpoint": (
        _half_checkpoint,
        lambda hf, tmp: _convert(hf, tmp, overwrite=True),
        "refusing to overwrite .*no orbax commit marker",
    ),
    "no source dir": (_nothing, lambda hf, tmp: _convert(tmp / "nope", tmp), "does not exist"),
    "bad dtype": (
        _nothing,
        lambda hf, tmp: _convert(hf, tmp, dtype="int8"),
        "dtype must be 'auto' or one of",
    ),
    # the safetensors file
    "empty safetensors": (_raw("model.safetensors", b""), None, "0 bytes: too short"),
    "safetensors cut in the header": (
        _raw("model.safetensors", lambda p: p.read_bytes()[:100]),
        None,
        "header length .* exceeds the file's 100 bytes",
    ),
    "safetensors cut in the data": (
        _raw("model.safetensors", lambda p: p.read_bytes()[:-10]),
        None,
        "data_offsets .* do not fit",
    ),
    "random bytes": (
        _raw("model.safetensors", np.random.default_rng(0).bytes(5000)),
        None,
        "exceeds the file",
    ),
    "absurd header length": (_raw("model.safetensors", struct.pack("<Q", 2**62) + b"{}"), None, "exceeds"),
    "header not JSON": (
        _raw("model.safetensors", struct.pack("<Q", 4) + b"\xff\xfe{x" + b"0" * 64),
        None,
        "not JSON",
    ),
    "header a list": (
        _raw("model.safetensors", struct.pack("<Q", 2) + b"[]"),
        None,
        "is a list, not an object",
    ),
    "wrong data offsets": (
        _header(lambda h: h[UP].update(data_offsets=[0, 100])),
        None,
        rf"'{UP}' in .*model\.safetensors: data_offsets \[0, 100\] do not fit F32 \[96, 64\]",
    ),
    "offsets past the data": (
        _header(lambda h: h[UP].update(data_offsets=[10**9, 10**9 + 96 * 64 * 4])),
        None,
        "do not fit",
    ),
    "negative shape": (_header(lambda h: h[UP].update(shape=[-96, -64])), None, "shape must be a list of"),
    "tensor without dtype": (_header(lambda h: h[UP].pop("dtype")), None, "expected an object with dtype"),
    "unsupported tensor dtype": (_header(lambda h: h[UP].update(dtype="I8")), None, "unsupported dtype I8"),
    # config.json
    "config without hidden_size": (
        _config(hidden_size=_DELETE),
        None,
        "missing the required field 'hidden_size'",
    ),
    "config a list": (_raw("config.json", b"[1, 2]"), None, "must hold a JSON object, got a list"),
    # transformers applies a rope_scaling beside 5.x's default rope_parameters (it was dropped: plain RoPE)
    "yarn beside default rope_parameters": (
        _config(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}),
        None,
        "rope scaling type 'yarn'",
    ),
    "rope_scaling a string": (
        _config(rope_parameters=_DELETE, rope_scaling="llama3"),
        None,
        "'rope_scaling' must be a JSON object, got 'llama3'",
    ),
    "llama3 factor 0": (  # every logit was NaN
        _config(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 0.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),  # fmt: skip
        None,
        "'factor' must be a finite number >= 1, got 0.0",
    ),
    "llama3 high <= low": (
        _config(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 4.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),  # fmt: skip
        None,
        "'high_freq_factor' must be a finite number > low_freq_factor 4.0",
    ),
    "tie_word_embeddings a string": (  # bool("false") is True: the trained head was dropped
        _config(tie_word_embeddings="false"),
        None,
        "'tie_word_embeddings' must be true or false, got 'false'",
    ),
    "tied with a different lm_head": (  # transformers unties it; dropping it computed another model
        _config(tie_word_embeddings=True),
        None,
        "'lm_head.weight' in model.safetensors differs from model.embed_tokens.weight",
    ),
    "config not JSON": (_raw("config.json", b"{model_type: qwen3"), None, r"config\.json is not valid JSON"),
    "0 attention heads": (
        _config(num_attention_heads=0),
        None,
        "'num_attention_heads' must be a positive int, got 0",
    ),
    "0 kv heads": (
        _config(num_key_value_heads=0),
        None,
        "'num_key_value_heads' must be a positive int, got 0",
    ),
    "negative layers": (
        _config(num_hidden_layers=-2),
        None,
        "'num_hidden_layers' must be a positive int, got -2",
    ),
    "bool layers": (
        _config(num_hidden_layers=True),
        None,
        "'num_hidden_layers' must be a positive int, got True",
    ),
    "string vocab": (_config(vocab_size="128"), None, "'vocab_size' must be a positive int, got '128'"),
    "0 intermediate": (_config(intermediate_size=0), None, "'intermediate_size' must be a positive int"),
    "0 head_dim": (_config(head_dim=0), None, "'head_dim' must be a positive int"),
    "hidden not a multiple of heads": (
        _config(head_dim=_DELETE, num_attention_heads=3, num_key_value_heads=1),
        None,
        r"hidden_size \(64\) is not a multiple of num_attention_heads \(3\)",
    ),
    "NaN rope_theta": (
        _config(rope_parameters={"rope_type": "default", "rope_theta": float("nan")}),
        None,
        "config.json field 'rope_theta' must be a finite number, got nan",
    ),
    # tensor values
    "NaN weight": (_weights(_set_value(UP, (0, 0), np.nan)), None, rf"'{UP}' .* has 1 NaN and 0 inf value"),
    "inf weights": (
        _weights(_set_value(UP, (slice(0, 2), 0), np.inf)),
        None,
        r"0 NaN and 2 inf value\(s\) in float32 \(the checkpoint itself holds them\)",
    ),
    "float16 overflow": (
        _weights(_set_value(UP, (3, 3), 1e6)),
        lambda hf, tmp: _convert(hf, tmp, dtype="float16"),
        rf"'{UP}' .* has 0 NaN and 1 inf value\(s\) in float16 \(its values overflow float16",
    ),
    # loading
    "load a missing dir": (_nothing, lambda hf, tmp: lf.load(str(tmp / "nope")), "does not exist"),
    "load a file": (_raw("../f", b"x"), lambda hf, tmp: lf.load(str(tmp / "f")), "is a file"),
    "load a half checkpoint": (
        _half_checkpoint,
        lambda hf, tmp: lf.load(str(tmp / "out")),
        "no orbax commit",
    ),
    "load the HF dir": (_nothing, lambda hf, tmp: lf.load(str(hf)), f"no {MARKER}"),
}
_CONFIGS = {
    "temperature nan": (
        SamplingConfig,
        dict(temperature=float("nan")),
        r"temperature must be 0 \(greedy\) or a finite number >= 1e-06, got nan",
    ),
    "temperature inf": (SamplingConfig, dict(temperature=math.inf), "temperature"),
    "temperature str": (SamplingConfig, dict(temperature="0.7"), "temperature"),
    "top_p nan": (SamplingConfig, dict(top_p=float("nan")), r"top_p must be a number in \(0, 1\], got nan"),
    "top_p 1.5": (SamplingConfig, dict(top_p=1.5), "top_p"),
    "top_k bool": (SamplingConfig, dict(top_k=True), "top_k must be an int >= 0, got True"),
    "top_k float": (SamplingConfig, dict(top_k=2.0), "top_k must be an int"),
    "budget bool": (CompressionConfig, dict(budget=True), "budget must be an int, got True"),
    "budget float": (CompressionConfig, dict(budget=64.0), "budget must be an int, got 64.0"),
    "recent_window float": (
        CompressionConfig,
        dict(budget=8, recent_window=2.5),
        "recent_window must be an int",
    ),
    "num_sinks bool": (CompressionConfig, dict(num_sinks=False), "num_sinks must be an int"),
    "policy None": (CompressionConfig, dict(policy=None), "unknown policy None"),
}
for _name, (_cls, _kwargs, _match) in _CONFIGS.items():
    BAD_INPUTS[_name] = (_nothing, lambda hf, tmp, c=_cls, k=_kwargs: c(**k), _match)


def _tree(root):
    """Every path under root with its bytes (a directory as None, a link as its target)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            if os.path.islink(p):
                out[p] = os.readlink(p)
            else:
                out[p] = None if os.path.isdir(p) else open(p, "rb").read()
    return out


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_a_clear_error_and_touches_nothing(hf_copy, tmp_path, case):
    setup, action, match = BAD_INPUTS[case]
    hf_dir, tensors = hf_copy
    setup(hf_dir, tensors, tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match=match):
        (action or _convert)(hf_dir, tmp_path)
    assert _tree(tmp_path) == before


def test_a_tied_checkpoint_that_saves_a_copy_of_the_embedding_converts(hf_copy, tmp_path):
    hf_dir, tensors = hf_copy
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    _write_safetensors(hf_dir / "model.safetensors", tensors)
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    config = _convert(hf_dir, tmp_path)
    assert config.tie_word_embeddings
    _, params = lf.load(str(tmp_path / "out"))
    assert "lm_head" not in params


@pytest.mark.parametrize("model_type, positions", [("llama", 2048), ("qwen2", 32768), ("qwen3", 32768)])
def test_a_missing_max_position_embeddings_takes_transformers_default(model_type, positions):
    hf = dict(model_type=model_type, vocab_size=128, hidden_size=64, intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
    assert lf.ModelConfig.from_hf_dict(hf).max_position_embeddings == positions


def test_a_float64_config_converts_at_float32():
    # safetensors F64 tensors read; the dtype in config.json was refused even with --dtype float32.
    hf = dict(model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=4, dtype="float64")  # fmt: skip
    assert lf.ModelConfig.from_hf_dict(hf).dtype == "float32"
