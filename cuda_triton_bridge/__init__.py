"""LongFlow's fused decode kernel (attention + importance + eviction) in native Triton, called from JAX.

Importing this package needs neither triton nor jax-triton: they are imported when the kernel is first
called. `triton_available()` says whether it can run here.
"""

from __future__ import annotations

import functools

from cuda_triton_bridge.config import LaunchConfig, check_kernel_state, kernel_state_shape, plan_inputs

__all__ = ["LaunchConfig", "init_kernel_state", "longflow_decode_attention_triton", "triton_available"]


@functools.cache
def triton_available() -> bool:
    """True when triton and jax_triton import and JAX's default backend is a CUDA GPU."""
    try:
        import jax
        import jax_triton  # noqa: F401
        import triton  # noqa: F401
    except Exception:  # ImportError, or a jax-triton built against another jaxlib
        return False
    try:
        return len(jax.devices("cuda")) > 0
    except RuntimeError:  # no CUDA backend
        return False


def init_kernel_state(batch: int, num_kv_heads: int):
    """The kernel's per-layer state for `longflow_decode_attention_triton(..., kernel_state=...)`: a zero
    int32 ticket buffer that the one-launch epilogues count in and leave zero, so no call zero-fills one.
    Keep one per cache layer and thread it through the calls."""
    import jax.numpy as jnp

    return jnp.zeros(kernel_state_shape(batch, num_kv_heads), jnp.int32)


def longflow_decode_attention_triton(
    q,
    k_cache,
    v_cache,
    kv_valid,
    *,
    scale,
    granularity="sequence",
    compute_evict=True,
    kv_len=None,
    launch: LaunchConfig | None = None,
    kernel_state=None,
    kv_quant=None,
    kv_scales=None,
    return_lse=False,
):
    """Decode attention of one query token over the slot cache, with LongFlow's evict slot.

    Args:
      q, k_cache, v_cache, kv_valid: the kernels' contract (pallas_kernels/contract.py) with one dtype for
        q and the cache; D a power of two in [16, 256], any C >= 1.
      kv_quant, kv_scales: a quantized cache (pallas_kernels/quant.py): k_cache and v_cache are payloads
        and kv_scales their `KVScales`, dequantized in registers (never written out); q in the keys'
        basis. Needs kv_quant_group >= 16 and D / codes a byte >= 16. None: a float cache.
      scale: the softmax scale (a Python float; it is baked into the launch).
      granularity: "sequence" (one evict slot per sequence) or "kv_head" (one per KV head).
      compute_evict: False skips all importance work and returns evict_slot filled with -1.
      kv_len: optional int32 [B], clamped to [0, C]: slot c of row b takes part only if kv_valid[b, c]
        and c < kv_len[b]; no block past the bound is read. The last block the bound cuts is read
        whole: its slots past the bound weigh 0, but a non-finite value there (never in `generate`'s
        buffers) still reaches out as 0 x NaN. None: C.
      launch: a `LaunchConfig`; its None fields (all, by default) take the tuned defaults.
      kernel_state: the per-layer state from `init_kernel_state` or the previous call's return (never a
        buffer anything else wrote: a non-zero one hangs or corrupts the coop kernel's barrier). None:
        a fresh one per call.
      return_lse: also return each query head's log-sum-exp (a static bool; False adds no work).

    Returns:
      (out [B, Hq, D] in q's dtype, evict_slot int32 [B] ("sequence") or [B, Hkv] ("kv_head")), as
      `pallas_kernels.longflow_decode_attention_reference` up to float rounding. With return_lse, lse
      float32 [B, Hq] after evict_slot: log(sum over the slots c that take part of exp(scale * q.k_c))
      in natural log, -inf for a row with none (its out is 0), so outputs over disjoint slot sets merge
      exactly. With `kernel_state` the state for the next call comes last: (out, evict_slot,
      kernel_state), or (out, evict_slot, lse, kernel_state).

    Raises:
      ValueError: shapes, dtypes, scale, state or a launch field outside the contract (checked before
        any triton import).
    """
    shape, kv_len, cfg = plan_inputs(
        q, k_cache, v_cache, kv_valid, scale=scale, granularity=granularity, kv_len=kv_len,
        compute_evict=compute_evict, launch=launch, kv_quant=kv_quant, kv_scales=kv_scales,
        return_lse=return_lse,
    )  # fmt: skip
    if kernel_state is not None:
        check_kernel_state(kernel_state, shape)
    try:
        from cuda_triton_bridge import decode  # triton + jax_triton from here on
    except ImportError as e:
        raise ImportError(
            "longflow_decode_attention_triton needs triton>=3.6 and jax-triton>=0.3.1 "
            "(pip install 'longflow-jax[cuda]') and a CUDA GPU; check triton_available() first"
        ) from e
    out, evict_slot, lse, state = decode.run(
        q, k_cache, v_cache, kv_valid, kv_len, scale, shape, cfg, granularity, compute_evict, kernel_state,
        kv_scales, return_lse,
    )  # fmt: skip
    outs = (out, evict_slot, lse) if return_lse else (out, evict_slot)
    return outs if kernel_state is None else (*outs, state)
