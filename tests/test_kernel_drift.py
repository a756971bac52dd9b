"""scripts/kernel_drift.py on CPU: the stored-bytes comparison, and a run through the Pallas kernel
(interpret mode), which follows the reference step for step."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import kernel_drift  # noqa: E402


def test_stored_byte_differences_counts_the_bytes_per_layer_and_buffer():
    k = np.zeros((2, 3), np.float32)
    moved = k.copy()
    moved[1, 2] = np.nextafter(np.float32(0), np.float32(1))  # one float: its lowest byte differs
    codes = np.arange(6, dtype=np.int8).reshape(2, 3)
    layer = lambda k, v: SimpleNamespace(k=k, v=v)
    a = SimpleNamespace(layers=[layer(k, codes), layer(k, codes)])
    b = SimpleNamespace(layers=[layer(k, codes), layer(moved, -codes)])
    # -codes differs from codes wherever a code is not 0: 5 bytes.
    assert kernel_drift.stored_byte_differences(a, b) == {(1, "k"): 1, (1, "v"): 5}
    assert kernel_drift.stored_byte_differences(a, a) == {}


def test_pallas_follows_the_reference_step_for_step_at_fp8():
    (r,) = kernel_drift.main(
        ["--impl", "pallas", "--kv-quant", "fp8", "--granularity", "kv_head", "--seeds", "1", "--steps", "6"]
    )
    assert r["generate_equal"]
    assert r["first_argmax"] is None and r["first_evict"] is None and r["stored"] == {}
    assert r["max_dlogits"] < 1e-4
    assert r["fresh_state_sides_with"] is None and r["first_state_left"] is None  # Pallas keeps no state


def test_replay_on_cpu_gives_each_paths_evict_slots_from_the_same_inputs():
    import tempfile

    import jax
    import jax.numpy as jnp

    import longflow_jax as lf
    from longflow_jax import sharding
    from longflow_jax.config import CompressionConfig
    from longflow_jax.convert import convert
    from longflow_jax.testing import make_tiny_hf_checkpoint, random_prompts

    gen = kernel_drift.gen
    root = tempfile.mkdtemp()
    convert(make_tiny_hf_checkpoint(os.path.join(root, "hf"), "qwen3"), os.path.join(root, "lf"))
    config, params = lf.load(os.path.join(root, "lf"))
    comp = CompressionConfig(
        policy="longflow", budget=8, granularity="kv_head", kv_quant="int8", kv_quant_group=16
    )
    ids, lengths = random_prompts(config.vocab_size, [5, 14, 9], 3)
    cache, logits = gen.prefill(params, config, jnp.asarray(ids), jnp.asarray(lengths), comp, 8)
    # As on a GPU: the cache carries the Triton kernel's state, which the CPU paths must not be handed.
    cache = gen.ready_to_decode(sharding.split_kv_heads(cache), comp, "triton", 4)
    step = jax.jit(gen.decode_step, static_argnames=("config", "compression", "attention_impl"))
    args = (
        params,
        config,
        cache,
        jnp.argmax(logits, -1).astype(jnp.int32),
        jnp.asarray(lengths),
        jax.random.key(0),
    )
    with jax.default_matmul_precision("highest"):
        got = kernel_drift.replay_on_cpu(step, args, comp)
        want = kernel_drift.evict_slots(step(*args, compression=comp, attention_impl="reference")[1])
        # The importance gap: none where the slots agree. With layer 0's slot of row 0, KV head 0 moved off
        # the reference's argmin to each other slot in turn: never negative, and not one value for all.
        assert kernel_drift.importance_gap(args, comp, want, want) is None
        gaps = []
        for slot in range(8):
            if slot != want[0][0, 0]:
                moved = [want[0].copy(), *want[1:]]
                moved[0][0, 0] = slot
                gaps.append(kernel_drift.importance_gap(args, comp, want, moved))
    assert min(gaps) >= 0 and max(gaps) > min(gaps) and len(gaps) == 7
    assert set(got) == {"reference", "pallas"}
    assert len(want) == config.num_layers and want[0].shape == (3, config.num_kv_heads)
    assert kernel_drift._same(got["reference"], want) and kernel_drift._same(got["pallas"], want)
    # Full slots and fresh evict choices: not every layer and head evicts slot 0 (the prefill's start).
    assert any(np.any(e != 0) for e in want)


def test_isolate_names_the_kernel_calls_that_disagree_and_saves_their_inputs(tmp_path, monkeypatch):
    import jax
    import jax.numpy as jnp

    import longflow_jax as lf
    from longflow_jax import attention, sharding
    from longflow_jax.config import CompressionConfig
    from longflow_jax.convert import convert
    from longflow_jax.testing import make_tiny_hf_checkpoint, random_prompts

    gen = kernel_drift.gen
    convert(make_tiny_hf_checkpoint(str(tmp_path / "hf"), "qwen3"), str(tmp_path / "lf"))
    config, params = lf.load(str(tmp_path / "lf"))
    comp = CompressionConfig(
        policy="longflow", budget=8, granularity="kv_head", kv_quant="fp8", kv_quant_group=16
    )
    ids, lengths = random_prompts(config.vocab_size, [5, 14, 9], 1)
    cache, logits = gen.prefill(params, config, jnp.asarray(ids), jnp.asarray(lengths), comp, 8)
    cache = sharding.split_kv_heads(cache)
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    args = (params, config, cache, token, jnp.asarray(lengths), jax.random.key(0))
    with jax.default_matmul_precision("highest"):
        assert kernel_drift.isolate(args, comp, "pallas") == []  # the Pallas kernel agrees on every call

        real = attention._kernel

        def off_by_one(name):  # a kernel whose evict slot is the next slot over
            kernel = real(name)

            def call(q, k, v, valid, **kw):
                out, evict = kernel(q, k, v, valid, **kw)
                return out, (evict + 1) % k.shape[2]

            return call

        monkeypatch.setattr(attention, "_kernel", off_by_one)
        dump = tmp_path / "dump"
        dump.mkdir()
        lines = kernel_drift.isolate(args, comp, "pallas", str(dump))
    assert len(lines) == config.num_layers
    assert lines[0].startswith("layer 0: kernel evict") and "kv_len [" in lines[0]
    saved = np.load(dump / "layer_0.npz")
    np.testing.assert_array_equal(saved["kernel_evict"], (saved["reference_evict"] + 1) % saved["k"].shape[2])
    assert str(saved["kv_quant"]) == "fp8" and saved["q"].shape[1] == config.num_heads
    assert {"scale_k_scale", "scale_v_scale", "scale_v_norm", "kv_len", "valid"} <= set(saved.files)


def test_the_triton_interpreter_follows_the_reference_on_its_own_run():
    # In its own process: TRITON_INTERPRET must be set before triton is first imported.
    import subprocess

    import pytest

    pytest.importorskip("triton", reason="needs triton (no GPU)")
    pytest.importorskip("torch", reason="needs torch (CPU)")
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "kernel_drift.py")
    argv = ["--impl", "triton-interpreter", "--kv-quant", "fp8", "--granularity", "kv_head", "--steps", "3"]
    done = subprocess.run(
        [sys.executable, script, *argv, "--seeds", "1"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "prompt set 0: the first call whose evict slots differ: none" in done.stdout, done.stdout
