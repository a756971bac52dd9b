"""Decode attention: dispatch between the jnp reference and the fused kernels, then the policy.

attention_impl:
  "reference"  plain jnp (pallas_kernels/reference.py) + policies.py; supports every policy ("thinkv"
               reads its tiers in thinkv.py).
  "pallas"     pallas_kernels.longflow_decode_attention (TPU Mosaic / GPU Triton / CPU interpret).
  "triton"     cuda_triton_bridge.longflow_decode_attention_triton (CUDA, native Triton kernels).
The kernels fuse attention with LongFlow's scoring and argmin, so they serve "longflow" and "full"
(scoring switched off), and "thinkv" in every layer (one call per buffer, thinkv.attend; its layers L*
also take the step's sparsity from jnp logits); the baselines need the probabilities and run on the
reference path. On a "model" axis the Pallas kernel runs
per KV-head shard (`_per_model_shard`); the Triton kernel is single-GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.reference import decode_attention_probs, evict_argmin

from .config import CompressionConfig
from .kv_cache import (
    KVCache,
    LayerCache,
    dequantized_kv,
    kv_scales,
    kv_valid,
    occupancy,
    queries_for_keys,
)
from .policies import select_evict_slot
from .rkv import decode_update
from .sharding import MODEL, model_shards_in_trace
from .thinkv import attend as thinkv_attend

ATTENTION_IMPLS = ("reference", "pallas", "triton")
KERNEL_POLICIES = ("full", "longflow", "thinkv")


def check_attention_impl(attention_impl: str, compression: CompressionConfig) -> None:
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    if attention_impl != "reference" and compression.policy not in KERNEL_POLICIES:
        raise ValueError(
            f"attention_impl={attention_impl!r} fuses only the policies {KERNEL_POLICIES}; "
            f"policy {compression.policy!r} needs attention_impl='reference'"
        )


def check_kernel_on_model_axis(attention_impl: str, model_size: int) -> None:
    """The Pallas kernel runs on a "model" axis of any size (`_per_model_shard`); the Triton kernel
    runs on one GPU."""
    if attention_impl == "triton" and model_size > 1:
        raise ValueError(f"attention_impl='triton' runs on one GPU, got a 'model' axis of {model_size}")


def _per_model_shard(kernel, num_kv_heads: int):
    """The kernel under `shard_map` over the traced program's "model" axis (`model_shards_in_trace`),
    since XLA cannot split a kernel: each device runs it on its share of the query heads and the KV
    heads they read, or on all of them when the KV heads do not divide by the axis (replicated).
    "kv_head" granularity's slots are then each shard's own. "sequence" granularity's importance sums
    over every query head: each shard returns its heads' share (B x C floats), the shares are
    all-reduced over "model" and every shard takes the argmin of the sum (contract.py's rules), so all
    evict the same slot. Outside such a program, the kernel itself."""
    shards = model_shards_in_trace()
    if shards == 1:
        return kernel
    split = num_kv_heads % shards == 0
    heads = P(None, MODEL) if split else P()

    def call(
        q, k, v, valid, *, kv_len, kv_scales=None, granularity, compute_evict, return_lse=False, **static
    ):
        summed = split and compute_evict and granularity == "sequence"

        def one_shard(q, k, v, valid, kv_len, kv_scales):
            out, scored, *lse = kernel(
                q, k, v, valid, kv_len=kv_len, kv_scales=kv_scales, granularity=granularity,
                compute_evict=compute_evict, return_importance=summed, return_lse=return_lse, **static,
            )  # fmt: skip
            if summed:  # scored: this shard's heads' importance [B, 1, C]
                scored = evict_argmin(jax.lax.psum(scored, MODEL))[:, 0]
            return out, scored, *lse  # lse [B, Hq] per query head, like out

        evict = heads if granularity == "kv_head" else P()
        return jax.shard_map(
            one_shard,
            in_specs=(heads, heads, heads, P(), P(), heads),
            out_specs=(heads, evict) + ((heads,) if return_lse else ()),
            axis_names={MODEL},
            check_vma=False,
        )(q, k, v, valid, kv_len, kv_scales)

    return call


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


# Slots per iteration of the full cache's reference attention, and the buffer size up to which one pass
# over every slot costs less than the loop's per-block overhead (CPU: 0.78 against 0.95 ms a step at 512).
# On a GPU each iteration costs a host round trip: 128-slot blocks made a step 2x slower than one pass.
PREFIX_BLOCK = 512
SINGLE_PASS_MAX_SLOTS = 512


def filled_prefix_attention(q, k, v, kv_valid, kv_len, scale):
    """`decode_attention_probs`' output (float32) reading only the filled prefix of the slots.

    An online softmax over blocks of PREFIX_BLOCK slots, as many as the longest row's kv_len [B] needs, so
    the full cache's reference path costs what the cache holds rather than what it reserves. The last
    block is shifted to end at the buffer's end; slots an earlier block already read are masked.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, capacity = k.shape[1], k.shape[2]
    if capacity <= SINGLE_PASS_MAX_SLOTS:
        return decode_attention_probs(q, k, v, kv_valid, scale)[0]
    block = min(PREFIX_BLOCK, capacity)
    qg = q.astype(jnp.float32).reshape(batch, num_kv_heads, -1, head_dim)

    def one_block(i, carry):
        row_max, denom, acc = carry
        start = jnp.minimum(i * block, capacity - block)
        kb, vb = (jax.lax.dynamic_slice_in_dim(x, start, block, axis=2).astype(jnp.float32) for x in (k, v))
        fresh = start + jnp.arange(block) >= i * block
        mask = (jax.lax.dynamic_slice_in_dim(kv_valid, start, block, axis=1) & fresh)[:, None, None, :]
        logits = jnp.einsum("bkgd,bkcd->bkgc", qg, kb, precision=jax.lax.Precision.HIGHEST) * scale
        logits = jnp.where(mask, logits, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1, keepdims=True))
        shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # no valid slot yet: nothing to rescale
        unnorm = jnp.where(mask, jnp.exp(logits - shift), 0.0)
        rescale = jnp.exp(row_max - shift)
        acc = acc * rescale + jnp.einsum("bkgc,bkcd->bkgd", unnorm, vb, precision=jax.lax.Precision.HIGHEST)
        return new_max, denom * rescale + jnp.sum(unnorm, axis=-1, keepdims=True), acc

    stats = jnp.zeros(qg.shape[:-1] + (1,), jnp.float32)
    init = (stats - jnp.inf, stats, jnp.zeros(qg.shape, jnp.float32))
    num_blocks = (jnp.max(kv_len) + block - 1) // block
    _, denom, acc = jax.lax.fori_loop(0, num_blocks, one_block, init)
    out = acc / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(batch, num_q_heads, head_dim)


def decode_attention(q, layer: LayerCache, pos, scale, compression: CompressionConfig, attention_impl, key):
    """q [B, Hq, D] of the token already written into `layer`; returns (out [B, Hq, D], new layer).

    The new layer carries the slot the next token will overwrite (and the policy's score state).
    """
    policy = compression.policy
    if policy == "thinkv":
        kernel = None
        if attention_impl != "reference":
            kernel = _per_model_shard(_kernel(attention_impl), layer.k.shape[1])
        out, layer = thinkv_attend(q, layer, scale, kernel)
        return out.astype(q.dtype), layer
    valid = kv_valid(layer)
    q_keys = queries_for_keys(layer, q)  # q itself unless the keys are stored rotated (kv_quant)
    if attention_impl == "reference":
        k, v = dequantized_kv(layer)
    if attention_impl == "reference" and policy == "full":
        out = filled_prefix_attention(q_keys, k, v, valid, occupancy(layer), scale).astype(q.dtype)
    elif attention_impl == "reference":
        out, probs = decode_attention_probs(q_keys, k, v, valid, scale)
        out = out.astype(q.dtype)
    else:
        granularity = "sequence" if layer.slot_pos.shape[1] == 1 else "kv_head"
        # Filled slots are a prefix (kv_cache.py), so the kernel can stop reading at its end: the full
        # cache costs what it holds, not what it reserves, and LongFlow's fill phase likewise.
        kw = dict(
            scale=scale, granularity=granularity, compute_evict=policy == "longflow", kv_len=occupancy(layer)
        )
        if layer.kv_quant is not None:
            # Rotated queries back in the model's dtype: the kernels' dots then run on tensor cores.
            q_kernel = q_keys.astype(q.dtype)
            kw.update(kv_quant=layer.kv_quant, kv_scales=kv_scales(layer))
        else:
            q_kernel = q
        if layer.kernel_state is not None:  # a cache without one (not made by generate): fresh per call
            out, evict, state = _kernel(attention_impl)(
                q_kernel, layer.k, layer.v, valid, kernel_state=layer.kernel_state, **kw
            )
            layer = layer.replace(kernel_state=state)
        else:
            kernel = _per_model_shard(_kernel(attention_impl), layer.k.shape[1])
            out, evict = kernel(q_kernel, layer.k, layer.v, valid, **kw)
    if policy == "full":
        # The buffer is sized for the whole generation: slots fill in order and nothing is evicted.
        return out, layer.replace(evict_slot=layer.evict_slot + 1)
    if policy == "rkv":  # compresses a full buffer at once instead of choosing one slot (rkv.py)
        return out, decode_update(layer, q_keys, pos, compression.budget)
    if attention_impl != "reference":
        return out, layer.replace(evict_slot=evict.reshape(layer.evict_slot.shape))
    evict, score = select_evict_slot(probs, layer, valid, pos, compression, key)
    return out, layer.replace(evict_slot=evict, score=score)
