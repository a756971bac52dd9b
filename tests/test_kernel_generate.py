"""generate() through the fused kernels gives the reference path's greedy tokens (tiny model), and each
decode step through a kernel gives the reference step's logits and evict slots.

The Pallas kernel runs in interpret mode on CPU (so CI checks the wiring) and on its real backend on a
GPU or TPU; the Triton kernel needs a CUDA GPU with triton and jax-triton.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import generate_module, make_prompts

import longflow_jax as lf
from longflow_jax import sharding
from longflow_jax.config import CompressionConfig


@pytest.fixture(scope="module")
def qwen3(tiny_checkpoints):
    return lf.load(tiny_checkpoints["qwen3"][1])


def _same_tokens(params, config, impl, comp):
    ids, lengths = make_prompts(config, [5, 14, 9], seed=0)
    with jax.default_matmul_precision("highest"):
        want = lf.generate(params, config, ids, lengths, max_new_tokens=24, compression=comp)
        got = lf.generate(
            params, config, ids, lengths, max_new_tokens=24, compression=comp, attention_impl=impl
        )
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.cache_occupancy), np.asarray(want.cache_occupancy))


@pytest.mark.parametrize(
    "comp",
    [
        CompressionConfig(policy="longflow", budget=8),
        CompressionConfig(policy="longflow", budget=8, granularity="kv_head"),
        None,  # full cache: the kernel with scoring off
        CompressionConfig(policy="longflow", budget=8, kv_quant="int8", kv_quant_group=16),
    ],
    ids=["longflow-sequence", "longflow-kv_head", "full", "longflow-int8"],
)
def test_pallas_generate_matches_reference(qwen3, comp):
    config, params = qwen3
    _same_tokens(params, config, "pallas", comp)


def _step(params, config, cache, tokens, positions, comp, impl, max_new_tokens, kernel_state=None):
    """(logits, new cache) of one decode step through `impl` from a prefilled cache: with a new kernel
    state, or with `kernel_state` (per layer) as a previous step returned it."""
    gen = generate_module
    cache = gen.ready_to_decode(cache, comp, impl, max_new_tokens)
    if kernel_state is not None:
        cache = cache.replace(
            layers=[layer.replace(kernel_state=s) for layer, s in zip(cache.layers, kernel_state)]
        )
    logits, cache, _ = gen.decode_step(
        params, config, cache, tokens, positions, jax.random.key(0), compression=comp, attention_impl=impl
    )
    return logits, cache


def _same_steps(params, config, impl, comp, steps=12, carry_state=False):
    """Every step starts from the reference's own cache, fed the same random tokens: the kernel path's
    logits and next evict slots against the reference step's. Unlike a free-running comparison, a last-bit
    difference cannot grow into a different cache (an fp8 code rounded the other way) over the steps.
    carry_state: the kernel path gets the kernel state its previous step returned, as `generate` runs
    it, instead of a new one each step."""
    gen = generate_module
    ids, lengths = make_prompts(config, [5, 14, 9], seed=1)
    rng = np.random.default_rng(2)
    with jax.default_matmul_precision("highest"):
        comp = gen.effective_compression(comp, ids.shape[1], steps)
        capacity = gen.buffer_capacity(comp, ids.shape[1], steps)
        cache, _ = gen.prefill(params, config, jnp.asarray(ids), jnp.asarray(lengths), comp, capacity)
        cache = sharding.split_kv_heads(cache)
        state = None  # the kernel path's state for the next step: new unless carry_state
        for step in range(steps):
            tokens = jnp.asarray(rng.integers(1, config.vocab_size, len(lengths)), jnp.int32)
            positions = jnp.asarray(lengths) + step
            want_logits, want = _step(params, config, cache, tokens, positions, comp, "reference", steps)
            got_logits, got = _step(params, config, cache, tokens, positions, comp, impl, steps, state)
            np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), rtol=0, atol=1e-4)
            for layer, (a, b) in enumerate(zip(want.layers, got.layers)):
                np.testing.assert_array_equal(
                    np.asarray(b.evict_slot), np.asarray(a.evict_slot), err_msg=f"step {step}, layer {layer}"
                )
            cache = want
            if carry_state:
                state = [layer.kernel_state for layer in got.layers]


@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
def test_pallas_step_matches_reference_fp8(qwen3, granularity):
    config, params = qwen3
    comp = CompressionConfig(
        policy="longflow", budget=8, granularity=granularity, kv_quant="fp8", kv_quant_group=16
    )
    _same_steps(params, config, "pallas", comp)


def _triton_longflow(granularity, kv_quant):
    """LongFlow at budget 8 for the Triton tests (skipped where the kernel cannot run)."""
    from cuda_triton_bridge import triton_available

    if not triton_available():
        pytest.skip("needs triton and jax-triton")
    return CompressionConfig(
        policy="longflow", budget=8, granularity=granularity, kv_quant=kv_quant, kv_quant_group=16
    )


@pytest.mark.gpu
@pytest.mark.parametrize("kv_quant", [None, "int8", "fp8"])
@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
def test_triton_step_matches_reference(qwen3, granularity, kv_quant):
    config, params = qwen3
    _same_steps(params, config, "triton", _triton_longflow(granularity, kv_quant))


@pytest.mark.gpu
@pytest.mark.parametrize("kv_quant", [None, "fp8"])
@pytest.mark.parametrize("granularity", ["sequence", "kv_head"])
def test_triton_steps_match_reference_carrying_the_kernel_state(qwen3, granularity, kv_quant):
    # As generate runs it: each step's kernel state is the one the step before returned.
    config, params = qwen3
    _same_steps(params, config, "triton", _triton_longflow(granularity, kv_quant), carry_state=True)


# fp8 is checked step by step above. Run free, its greedy tokens through the Triton kernel left the
# reference's on 5 of 6 prompt sets on an H100, while every step from the reference's cache agreed
# (logits within 5e-6, the same evict slots, also when each step gets the kernel state the last one
# returned). At the first differing step of a free run the kernel picks a slot whose importance is
# 1e-4 to 1e-2 above the minimum, with a new kernel state too, where the CPU reference and Pallas side
# with the GPU reference: a kernel fault on some inputs, not yet pinned down. Triton's interpreter (the
# same kernel code, numpy arithmetic) agrees with the reference at every call through the step where
# the GPU kernel first differed (prompt sets 0-5; `scripts/kernel_drift.py --impl
# triton-interpreter --kv-quant fp8 --granularity kv_head --steps 14`), so the fault is in what only the
# GPU runs: the PTX paths, the epilogues' concurrency or the compiled arithmetic (`kernel_drift.py
# --dump` on the GPU saves the disagreeing calls and says which launches agree).
@pytest.mark.gpu
@pytest.mark.parametrize(
    "granularity, kv_quant", [("sequence", None), ("kv_head", None), ("sequence", "int8")]
)
def test_triton_generate_matches_reference(qwen3, granularity, kv_quant):
    config, params = qwen3
    _same_tokens(params, config, "triton", _triton_longflow(granularity, kv_quant))
