"""generate() through the fused kernels gives the reference path's greedy tokens (tiny model).

The Pallas kernel runs in interpret mode on CPU (so CI checks the wiring) and on its real backend on a
GPU or TPU; the Triton kernel needs a CUDA GPU with triton and jax-triton.
"""

import jax
import numpy as np
import pytest
from helpers import make_prompts

import longflow_jax as lf
from longflow_jax.config import CompressionConfig


@pytest.fixture(scope="module")
def qwen3(tiny_checkpoints):
    return lf.load(tiny_checkpoints["qwen3"][1])


def _same_tokens(params, config, impl, comp):
    ids, lengths = make_prompts(config, [5, 14, 9])
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


@pytest.mark.gpu
@pytest.mark.parametrize(
    "granularity, kv_quant", [("sequence", None), ("kv_head", None), ("sequence", "int8"), ("kv_head", "fp8")]
)
def test_triton_generate_matches_reference(qwen3, granularity, kv_quant):
    from cuda_triton_bridge import triton_available

    if not triton_available():
        pytest.skip("needs triton and jax-triton")
    config, params = qwen3
    comp = CompressionConfig(
        policy="longflow", budget=8, granularity=granularity, kv_quant=kv_quant, kv_quant_group=16
    )
    _same_tokens(params, config, "triton", comp)
