"""Pallas kernels (GPU via Pallas' Triton backend, TPU via Mosaic, CPU in interpret mode).

Nothing here imports the model; `longflow_jax.reference` is used for the contract's constants and checks.
"""

from pallas_kernels.decode_attention import BACKENDS, longflow_decode_attention

__all__ = ["BACKENDS", "longflow_decode_attention"]
