"""LongFlow's fused decode kernel in Pallas (GPU via Pallas' Triton backend, TPU via Mosaic, CPU in
interpret mode), with the kernels' contract and jnp reference.

A leaf package: it imports nothing from longflow_jax; cuda_triton_bridge shares its contract and reference.
"""

from pallas_kernels.contract import EMPTY_SLOT_SCORE, GRANULARITIES, check_decode_inputs, check_kv_len
from pallas_kernels.decode_attention import BACKENDS, longflow_decode_attention
from pallas_kernels.reference import longflow_decode_attention_reference

__all__ = [
    "BACKENDS",
    "EMPTY_SLOT_SCORE",
    "GRANULARITIES",
    "check_decode_inputs",
    "check_kv_len",
    "longflow_decode_attention",
    "longflow_decode_attention_reference",
]
