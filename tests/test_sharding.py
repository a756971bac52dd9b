"""Tensor-parallel generate on a ("data", "model") mesh (sharding.py, generate's mesh, load(mesh=),
longflow-batch --mesh).

The 8-device runs happen in one subprocess (tests/sharded_runs.py; JAX fixes its device count at start)
and are compared here against that process's own one-device runs.
"""

import json
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx
from helpers import write_jsonl
from jax.sharding import PartitionSpec as P

from longflow_jax import nnx as lf_nnx
from longflow_jax.attention import check_kernel_on_model_axis
from longflow_jax.config import CompressionConfig, ModelConfig
from longflow_jax.model import param_shapes
from longflow_jax.sharding import (
    default_mesh_shape,
    make_mesh,
    param_partition_specs,
    parse_mesh_shape,
    per_chip_bytes,
    per_chip_param_bytes,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("full", "longflow", "longflow_kv_head", "h2o", "pallas_kv_head_int8", "pallas", "rkv_int4")
TINY = dict(
    model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=8,
    num_kv_heads=4, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=512,
    qkv_bias=True, o_bias=True, qk_norm=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, chat_ckpt):
    """tests/sharded_runs.py's results on 8 simulated devices, and its work directory."""
    from longflow_jax.convert import convert
    from longflow_jax.testing import make_tiny_hf_checkpoint

    work = tmp_path_factory.mktemp("sharded")
    hf = make_tiny_hf_checkpoint(
        str(work / "hf"), "qwen3", num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=1
    )
    convert(hf, str(work / "ckpt"))
    write_jsonl(work / "in.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(["What is 2+2?", "Hi!"])])
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    # Compile time dominates these runs; the comparisons are within one process, so its flags apply to both.
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tests", "sharded_runs.py"),
        str(work / "ckpt"),
        chat_ckpt,
        str(work),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(work / "result.json") as f:
        return json.load(f), work


@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_and_evictions_equal_one_device(sharded, case):
    result, _ = sharded
    assert result["devices"] == 8
    runs = dict(result["runs"][case])
    one = runs.pop("one_device")
    assert runs, "no mesh run"
    for shape, got in runs.items():
        assert got["tokens"] == one["tokens"], shape
        assert got["evicted"] == one["evicted"], shape


def test_compressed_cases_change_the_tokens(sharded):
    """Each compressed case's one-device tokens differ from the full cache's, so the equal tokens above
    check its evictions (R-KV's included, whose evicted positions are all -1: it compresses whole
    buffers)."""
    runs = sharded[0]["runs"]
    full = runs["full"]["one_device"]["tokens"]
    for case in CASES[1:]:
        assert runs[case]["one_device"]["tokens"] != full, case


def test_load_restores_each_param_into_its_shards(sharded):
    for shape, got in sharded[0]["load"].items():
        assert got["on_spec"] and got["values_equal"], shape
        assert got["device0_bytes"] == got["per_chip_param_bytes"], shape


@pytest.mark.parametrize("granularity", ["kv_head", "sequence"])
def test_sharded_decode_step_lowers_for_tpu(sharded, granularity):
    """Qwen3-8B's layer on a (2, 4) mesh: the Mosaic kernel under shard_map, the weights split."""
    export = sharded[0]["tpu_export"][granularity]
    assert export["nr_devices"] == 8 and export["tpu_custom_call"]
    # wq, wk, wv, wo, w_gate, w_up, w_down, embed, lm_head, and the KV buffer's k and v
    assert export["model_split_args"] == 11
    # "sequence": one all-reduce of the kernel's importance shares, B / data = 4 rows x 2048 slots.
    want = ["tensor<4x1x2048xf32>"] if granularity == "sequence" else []
    assert export["all_reduce_types"] == want


def test_batch_on_a_mesh_writes_what_one_device_writes(sharded):
    result, work = sharded
    assert result["batch"] == {"one": 0, "mesh": 0}
    rows = {}
    for name in ("one", "mesh"):
        with open(work / f"{name}.jsonl") as f:
            rows[name] = sorted((r["id"], r["text"], r["completion_tokens"]) for r in map(json.loads, f))
    assert len(rows["one"]) == 2 and rows["mesh"] == rows["one"]


def test_specs_agree_with_the_nnx_annotations():
    config = ModelConfig(**TINY)
    decoder = nnx.eval_shape(lambda: lf_nnx.Decoder(config, rngs=nnx.Rngs(0)))
    # A spec's trailing Nones (unsplit dimensions) may be written or left out.
    trimmed = lambda spec: tuple(spec)[: max((i + 1 for i, a in enumerate(spec) if a), default=0)]  # noqa: E731
    annotated = jax.tree.map(
        lambda v: trimmed(v.get_metadata()["out_sharding"]),
        decoder.param_variables(),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    ours = jax.tree.map(trimmed, param_partition_specs(config, 2), is_leaf=lambda x: isinstance(x, P))
    assert ours == annotated


def test_dimensions_that_do_not_divide_are_replicated():
    config = ModelConfig(**dict(TINY, num_kv_heads=2, vocab_size=126))
    layer = param_partition_specs(config, 4)["layers"][0]
    assert layer["wq"] == P(None, "model") and layer["wo"] == P("model", None)
    assert layer["wk"] == layer["wv"] == layer["bk"] == P()  # 2 KV heads on 4 devices
    assert param_partition_specs(config, 4)["embed"] == P()  # vocab 126
    assert layer["w_gate"] == P(None, "model")


def test_per_chip_bytes():
    config = ModelConfig(**dict(TINY, num_layers=2))
    full_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(param_shapes(config)))
    assert per_chip_param_bytes(config, 1) == full_bytes
    # At 4 devices every matrix divides; the norms (Dm or D each) and the o bias stay whole.
    whole = (2 * 64 + 64 + 2 * 16) * 2 + 64
    assert per_chip_param_bytes(config, 4) == (full_bytes - 4 * whole) // 4 + 4 * whole
    comp = CompressionConfig(policy="longflow", budget=64, granularity="kv_head")
    kw = dict(batch=8, prompt_len=100, max_new_tokens=100)
    _, kv_one = per_chip_bytes(config, comp, data=1, model=1, **kw)
    # K and V: layers x 2 x rows x KV heads x slots x D x 4 bytes; slot_pos, score, evict_slot per group.
    kv = 2 * 2 * 8 * 4 * 64 * 16 * 4
    assert kv_one == kv + 2 * 8 * 4 * (2 * 64 + 1) * 4
    assert per_chip_bytes(config, comp, data=2, model=4, **kw)[1] == kv // 8 + 2 * 4 * 4 * (2 * 64 + 1) * 4


def test_mesh_flag_and_default_shape():
    assert parse_mesh_shape("data=2,model=4") == (2, 4)
    assert parse_mesh_shape("model=8") == (1, 8)
    for bad in ("data=0", "rows=2", "data=2;model=4", "data=2,data=4"):  # the repeat was read as (4, 1)
        with pytest.raises(ValueError, match="--mesh must look like"):
            parse_mesh_shape(bad)
    # A zero axis gave an empty mesh (generate then divided by zero); negatives and floats numpy errors.
    for data, model in ((0, 4), (-2, -4), (2.0, 4), (True, 1)):
        with pytest.raises(ValueError, match="make_mesh: (data|model) must be a positive int"):
            make_mesh(data, model)
    config = ModelConfig(**TINY)
    assert default_mesh_shape(config, 8, None) == (8, 1)
    assert default_mesh_shape(config, 8, per_chip_param_bytes(config, 1) + 1) == (8, 1)
    assert default_mesh_shape(config, 8, per_chip_param_bytes(config, 2) + 1) == (4, 2)
    with pytest.raises(ValueError, match="do not fit 8 device"):
        default_mesh_shape(config, 8, 100)


def test_triton_kernel_needs_one_device():
    check_kernel_on_model_axis("pallas", model_size=2)
    check_kernel_on_model_axis("triton", model_size=1)
    with pytest.raises(ValueError, match="one GPU"):
        check_kernel_on_model_axis("triton", model_size=2)
