"""Run generate on 8 simulated CPU devices and print the results as JSON (test helper, not shipped).

JAX fixes the device count when it starts, so tests/test_sharding.py runs this file in a subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=8 and compares its output there. Usage:
python tests/sharded_runs.py CKPT_DIR CHAT_CKPT_DIR WORK_DIR: CKPT_DIR a converted tiny checkpoint with 8
query and 4 KV heads (a "model" axis of 8 replicates the KV heads, 2 and 4 split them), CHAT_CKPT_DIR one
with a tokenizer for longflow-batch, which reads WORK_DIR/in.jsonl and writes WORK_DIR/{one,mesh}.jsonl;
the results go to WORK_DIR/result.json.
"""

from __future__ import annotations

import functools
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import longflow_jax as lf
from longflow_jax.config import CompressionConfig
from longflow_jax.sharding import make_mesh, param_partition_specs, per_chip_param_bytes

MESH_SHAPES = [(1, 8), (2, 4), (4, 2), (8, 1)]
# Replicated and split KV heads: what a policy's sums over heads meet. The other two shapes add nothing
# policy-specific (a "model" axis of 2, and none), so "full" and "longflow" alone run them.
KV_HEADS_REPLICATED_AND_SPLIT = [(1, 8), (2, 4)]
BUDGET = 12
# (name, compression, attention_impl, mesh shapes): each against the one-device reference run.
CASES = [
    ("full", CompressionConfig(policy="full"), "reference", MESH_SHAPES),
    ("longflow", CompressionConfig(policy="longflow", budget=BUDGET), "reference", MESH_SHAPES),
    (
        "longflow_kv_head",
        CompressionConfig(policy="longflow", budget=BUDGET, granularity="kv_head"),
        "reference",
        KV_HEADS_REPLICATED_AND_SPLIT,
    ),
    ("h2o", CompressionConfig(policy="h2o", budget=BUDGET), "reference", KV_HEADS_REPLICATED_AND_SPLIT),
    # The Pallas kernel (interpret mode) under shard_map over split KV heads ("sequence": the importance
    # all-reduced over "model"; "kv_head" reading int8 payloads and their scales), and replicated ones.
    (
        "pallas_kv_head_int8",
        CompressionConfig(
            policy="longflow", budget=BUDGET, granularity="kv_head", kv_quant="int8", kv_quant_group=16
        ),
        "pallas",
        [(2, 4)],
    ),
    ("pallas", CompressionConfig(policy="longflow", budget=BUDGET), "pallas", [(2, 4), (1, 8)]),
    # R-KV's compaction of a whole buffer, over int4 payloads and scales split by KV heads.
    (
        "rkv_int4",
        CompressionConfig(policy="rkv", budget=BUDGET, rkv_buffer=2, kv_quant="int4", kv_quant_group=16),
        "reference",
        [(4, 2)],
    ),
]
MAX_NEW_TOKENS = 10


def generate_runs(config, params) -> dict:
    """{case: {"one_device" or "DxM": {"tokens", "evicted"}}} for greedy runs of every case."""
    rng = np.random.default_rng(0)
    ids = rng.integers(5, config.vocab_size, (8, 16)).astype(np.int32)
    lengths = rng.integers(6, 17, 8).astype(np.int32)
    runs = {}
    for name, compression, impl, shapes in CASES:
        kw = dict(max_new_tokens=MAX_NEW_TOKENS, compression=compression, return_debug=True)
        got = {"one_device": lf.generate(params, config, ids, lengths, **kw)}
        for data, model in shapes:
            mesh = make_mesh(data, model)
            got[f"{data}x{model}"] = lf.generate(
                params, config, ids, lengths, mesh=mesh, attention_impl=impl, **kw
            )
        runs[name] = {
            k: {"tokens": o.tokens.tolist(), "evicted": o.evicted_positions.tolist()} for k, o in got.items()
        }
    return runs


def load_layout(ckpt) -> dict:
    """Per mesh shape: whether `load(mesh=)` put every param on its partition spec with the values of a
    one-device load, and device 0's bytes against `per_chip_param_bytes`."""
    config, whole = lf.load(ckpt)
    out = {}
    for data, model in [(2, 4), (1, 8)]:
        mesh = make_mesh(data, model)
        _, params = lf.load(ckpt, mesh=mesh)
        specs = jax.tree.leaves(param_partition_specs(config, model), is_leaf=lambda x: isinstance(x, P))
        leaves = jax.tree.leaves(params)
        device0 = sum(next(s.data.nbytes for s in x.addressable_shards if s.device == mesh.devices.flat[0])
                      for x in leaves)  # fmt: skip
        out[f"{data}x{model}"] = {
            "on_spec": all(x.sharding.spec == s for x, s in zip(leaves, specs, strict=True)),
            "values_equal": all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(whole))),
            "device0_bytes": device0,
            "per_chip_param_bytes": per_chip_param_bytes(config, model),
        }
    return out


def tpu_export(granularity: str) -> dict:
    """The decode step of Qwen3-8B's layer shapes (one layer, bf16, batch 8, 2048 slots), tensor
    parallel over an abstract (2, 4) mesh with the Pallas kernel per KV-head shard, exported for TPU.
    The all-reduces XLA places over "model" come at compile time; the module holds those placed by
    hand (the kernel's "sequence" importance)."""
    from longflow_jax import attention
    from longflow_jax.kv_cache import KVCache, LayerCache
    from longflow_jax.sharding import param_shardings
    from pallas_kernels import longflow_decode_attention

    config = lf.ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=1,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=40960, qk_norm=True, dtype="bfloat16",
    )  # fmt: skip
    # The kernel attention.py picks is the default device's (CPU: interpret); lower TPU's Mosaic body.
    attention._kernel = lambda impl: functools.partial(
        longflow_decode_attention, backend="mosaic", interpret=False
    )
    mesh = make_mesh(2, 4)
    batch, slots = 8, 2048
    groups = config.num_kv_heads if granularity == "kv_head" else 1
    sds = jax.ShapeDtypeStruct
    on = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
    kv = sds((batch, config.num_kv_heads, slots, config.head_dim), jnp.bfloat16, sharding=on("data", "model"))
    per_slot = lambda dtype: sds((batch, groups, slots), dtype, sharding=on("data"))  # noqa: E731
    layer = LayerCache(k=kv, v=kv, slot_pos=per_slot(jnp.int32), score=per_slot(jnp.float32),
                       evict_slot=sds((batch, groups), jnp.int32, sharding=on("data")))  # fmt: skip
    params = jax.tree.map(lambda x, s: sds(x.shape, x.dtype, sharding=s), lf.param_shapes(config),
                          param_shardings(config, mesh))  # fmt: skip
    rows = sds((batch,), jnp.int32, sharding=on("data"))
    compression = CompressionConfig(policy="longflow", granularity=granularity)

    def step(params, cache, tokens, positions, key):
        return lf.decode_step(
            params, config, cache, tokens, positions, key, compression=compression, attention_impl="pallas"
        )

    # As generate runs it: rows split by shard_map over "data", "model" left to XLA but for the kernel.
    by_row = P("data")
    sharded = jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(P(), by_row, by_row, by_row, P()),
        out_specs=(by_row, by_row, P(None, "data")),
        axis_names={"data"},
        check_vma=False,
    )
    key = sds((2,), jnp.uint32, sharding=on())
    exported = jax.export.export(jax.jit(sharded), platforms=["tpu"])(
        params, KVCache([layer]), rows, rows, key
    )
    text = exported.mlir_module()
    main_signature = next(line for line in text.splitlines() if "func public @main" in line)
    return {
        "nr_devices": exported.nr_devices,
        "tpu_custom_call": "tpu_custom_call" in text,
        # Arguments split over "model", by the Shardy annotations of the exported main function.
        "model_split_args": main_signature.count('"model"'),
        "all_reduce_types": re.findall(r'"stablehlo.all_reduce".*?\}\) : \((tensor<[^>]+>)\)', text, re.S),
    }


def batch_runs(chat_ckpt: str, work: str) -> dict:
    """longflow-batch's exit codes on one device and on --mesh data=2,model=2."""
    from longflow_jax import batch

    args = ["--ckpt", chat_ckpt, "--input", f"{work}/in.jsonl", "--max-new-tokens", "8", "--budget", "32"]
    args += ["--batch-size", "2", "--quiet"]
    return {
        "one": batch.main(args + ["--output", f"{work}/one.jsonl", "--mesh", "data=1,model=1"]),
        "mesh": batch.main(args + ["--output", f"{work}/mesh.jsonl", "--mesh", "data=2,model=2"]),
    }


def main(ckpt: str, chat_ckpt: str, work: str) -> None:
    config, params = lf.load(ckpt)
    result = {"devices": jax.device_count(), "runs": generate_runs(config, params), "load": load_layout(ckpt)}
    result["tpu_export"] = {g: tpu_export(g) for g in ("kv_head", "sequence")}
    result["batch"] = batch_runs(chat_ckpt, work)
    with open(f"{work}/result.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
