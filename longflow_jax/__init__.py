"""longflow-jax: decode-time KV cache compression (LongFlow) for reasoning models in JAX."""

from pallas_kernels.reference import longflow_decode_attention_reference

from .config import CompressionConfig, ModelConfig, SamplingConfig, ThinKVConfig
from .convert import CheckpointError, convert, load
from .generate import (
    COMPILER_OPTIONS,
    GenerationOutput,
    compile_generate,
    decode_step,
    generate,
    kv_cache_bytes,
    max_batch,
    prefill,
)
from .kv_cache import KVCache, LayerCache
from .model import init_random_params, param_shapes
from .trajectory import TrajectoryScores, score_trajectory

__all__ = [
    "COMPILER_OPTIONS",
    "CheckpointError",
    "CompressionConfig",
    "GenerationOutput",
    "KVCache",
    "LayerCache",
    "ModelConfig",
    "SamplingConfig",
    "ThinKVConfig",
    "TrajectoryScores",
    "compile_generate",
    "convert",
    "decode_step",
    "generate",
    "init_random_params",
    "kv_cache_bytes",
    "load",
    "max_batch",
    "longflow_decode_attention_reference",
    "param_shapes",
    "prefill",
    "score_trajectory",
]
