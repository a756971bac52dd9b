"""Decode attention: dispatch between the jnp reference and the fused kernels, then the policy.

attention_impl:
  "reference"  plain jnp (pallas_kernels/reference.py) + policies.py; supports every policy.
  "pallas"     pallas_kernels.longflow_decode_attention (TPU Mosaic / GPU Triton / CPU interpret).
  "triton"     cuda_triton_bridge.longflow_decode_attention_triton (CUDA, native Triton kernels).
The kernels fuse attention with LongFlow's scoring and argmin, so they serve "longflow" and "full"
(scoring switched off); the baselines need the probabilities and run on the reference path.
"""

from __future__ import annotations

from pallas_kernels.reference import decode_attention_probs

from .config import CompressionConfig
from .kv_cache import KVCache, LayerCache, kv_valid, occupancy
from .policies import select_evict_slot

ATTENTION_IMPLS = ("reference", "pallas", "triton")
KERNEL_POLICIES = ("full", "longflow")


def check_attention_impl(attention_impl: str, compression: CompressionConfig) -> None:
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    if attention_impl != "reference" and compression.policy not in KERNEL_POLICIES:
        raise ValueError(
            f"attention_impl={attention_impl!r} fuses only the policies {KERNEL_POLICIES}; "
            f"policy {compression.policy!r} needs attention_impl='reference'"
        )


def _kernel(attention_impl: str):
    if attention_impl == "pallas":
        from pallas_kernels import longflow_decode_attention

        return longflow_decode_attention
    from cuda_triton_bridge import longflow_decode_attention_triton

    return longflow_decode_attention_triton


def with_kernel_state(cache: KVCache, attention_impl: str) -> KVCache:
    """The cache with each layer's kernel state for `attention_impl` (the Triton kernel's tickets, kept
    from step to step so no zero fill runs per call; the other paths keep none)."""
    if attention_impl != "triton":
        return cache
    from cuda_triton_bridge import init_kernel_state

    batch, num_kv_heads = cache.layers[0].k.shape[:2]
    return KVCache(
        layers=[layer.replace(kernel_state=init_kernel_state(batch, num_kv_heads)) for layer in cache.layers]
    )


def decode_attention(q, layer: LayerCache, pos, scale, compression: CompressionConfig, attention_impl, key):
    """q [B, Hq, D] of the token already written into `layer`; returns (out [B, Hq, D], new layer).

    The new layer carries the slot the next token will overwrite (and the policy's score state).
    """
    valid = kv_valid(layer)
    policy = compression.policy
    if attention_impl == "reference":
        out, probs = decode_attention_probs(q, layer.k, layer.v, valid, scale)
        out = out.astype(q.dtype)
    else:
        granularity = "sequence" if layer.slot_pos.shape[1] == 1 else "kv_head"
        # Filled slots are a prefix (kv_cache.py), so the kernel can stop reading at its end: the full
        # cache costs what it holds, not what it reserves, and LongFlow's fill phase likewise.
        kw = dict(
            scale=scale, granularity=granularity, compute_evict=policy == "longflow", kv_len=occupancy(layer)
        )
        if layer.kernel_state is not None:  # a cache without one (not made by generate): fresh per call
            out, evict, state = _kernel(attention_impl)(
                q, layer.k, layer.v, valid, kernel_state=layer.kernel_state, **kw
            )
            layer = layer.replace(kernel_state=state)
        else:
            out, evict = _kernel(attention_impl)(q, layer.k, layer.v, valid, **kw)
    if policy == "full":
        # The buffer is sized for the whole generation: slots fill in order and nothing is evicted.
        return out, layer.replace(evict_slot=layer.evict_slot + 1)
    if attention_impl != "reference":
        return out, layer.replace(evict_slot=evict.reshape(layer.evict_slot.shape))
    evict, score = select_evict_slot(probs, layer, valid, pos, compression, key)
    return out, layer.replace(evict_slot=evict, score=score)
