"""Fused LongFlow decode kernel (attention + importance + eviction) in native Triton, called from JAX.

Importing this package needs neither triton nor jax-triton: they are imported when the kernel is first
called. `triton_available()` says whether it can run here.
"""

from __future__ import annotations

import functools

from cuda_triton_bridge.config import LaunchConfig, resolve_config, ticket_shape

__all__ = [
    "LaunchConfig",
    "longflow_decode_attention_triton",
    "new_tickets",
    "resolve_config",
    "ticket_shape",
    "triton_available",
]


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


def new_tickets(batch: int, num_kv_heads: int):
    """A zero persistent ticket buffer for `longflow_decode_attention_triton(..., tickets=...)`: int32
    ticket_shape(batch, num_kv_heads). One per cache (e.g. per layer), threaded through the calls."""
    import jax.numpy as jnp

    return jnp.zeros(ticket_shape(batch, num_kv_heads), jnp.int32)


def longflow_decode_attention_triton(
    q,
    k_cache,
    v_cache,
    kv_valid,
    *,
    scale,
    granularity="sequence",
    compute_evict=True,
    block_c=None,
    num_splits=None,
    num_warps=None,
    num_stages=None,
    vnorm=None,
    final_reduce="atomic",
    epilogue=None,
    kv_len=None,
    overrides=None,
    tickets=None,
):
    """Decode attention of one query token over the slot cache, with LongFlow's evict slot.

    Args:
      q: [B, Hq, D] post-RoPE queries; float32, bfloat16 or float16 (the same dtype as the cache).
      k_cache, v_cache: [B, Hkv, C, D] post-RoPE keys and values; query head h reads KV head
        h // (Hq // Hkv). D must be a power of two in [16, 256]; any C >= 1.
      kv_valid: [B, C] bool, the filled slots.
      scale: the softmax scale (a Python float; it is baked into the launch).
      granularity: "sequence" (one evict slot per sequence, importance summed over all query heads) or
        "kv_head" (one per KV head, summed over its query-head group).
      compute_evict: False skips all importance work and returns evict_slot filled with -1.
      block_c: slots per loop iteration (power of two in [16, 512]); None: tuned default.
      num_splits: split-K programs per (sequence, KV head) in [1, ceil(C / block_c)]; rounded to whole
        blocks per split. None: enough to fill the GPU.
      num_warps, num_stages: Triton launch parameters of the main kernel; None: tuned defaults.
      vnorm: how the main kernel takes ||v||_1 for the importance: "mma" (on the tensor cores) or
        "reduce" (a row sum); None: the default (config.VNORM). Same numbers up to summation order.
      epilogue: "separate" (a second, combine kernel over (chunk, sequence) programs merges the splits
        and scores the slots), "fused" (one launch: the last split of each KV head, then the last KV
        head of each sequence, does it, coordinated by atomic tickets), "coop" (one launch: every
        program waits at a barrier of its sequence, then finishes a share of the epilogue; only where
        the grid has at most one program per SM, else ValueError), or None: the measured choice
        (config.default_epilogue: coop while B * Hkv < SMs / 2, separate with one split of 128-slot
        blocks up to B * Hkv < 2 * SMs, fused above).
      final_reduce: with epilogue="separate": "atomic" (the last combine program of a sequence reduces
        the chunk minima) or "xla" (a jnp argmin over the chunk minima; a cross-check).
      kv_len: optional int32 [B], clamped to [0, C]: slot c of row b takes part only if
        kv_valid[b, c] and c < kv_len[b]; no program reads K/V at or past the bound, so a buffer whose
        filled slots are a prefix (every cache of longflow_jax) costs what its prefix costs. None: C.
      overrides: switches of `config.LaunchConfig` as a dict of bools, for A/B runs: cache_hints (t
        stored with L2 evict_last) and discard_t (t dropped from L2 once read), both on by default;
        ffi_call (launch through jaxlib's typed-FFI Triton target, jax >= 0.10.1, instead of jax-triton's
        legacy custom call), off by default: measured slower. Which launch each kernel takes:
        xla_call (every kernel through XLA's own Triton custom call; default: at a small batch,
        B * Hkv < SMs / 2) and xla_combine (the combine kernel through it even where the main kernel
        goes through jax-triton; default on). Measured on an H100: docs/BENCHMARKS.md, session 10.
      tickets: optional persistent ticket buffer, int32 ticket_shape(B, Hkv) = [B, 2 Hkv], from
        `new_tickets` or the previous call's return (donate it, or thread it through a loop carry).
        The one-launch epilogues ("coop", "fused") count their programs in it and leave it zero again,
        so no zeroed buffer is made for them per call (through XLA's launch that is a fill kernel of
        its own; 0.8-1.0 us a call at B = 1-4 in a decode loop, docs/BENCHMARKS.md, session 12). A
        buffer that is not all zeros at the call hangs or corrupts the coop kernel's barrier: never
        pass one that anything else wrote. None: a fresh zero buffer per call.

    Returns:
      (out [B, Hq, D] in q's dtype, evict_slot int32 [B] ("sequence") or [B, Hkv] ("kv_head")), equal to
      `longflow_jax.reference.longflow_decode_attention_reference` up to float rounding. Invalid slots
      score -1 and ties go to the lowest slot, as there. With `tickets`: (out, evict_slot, tickets), the
      buffer for the next call.

    Raises:
      ValueError: shapes, dtypes, scale or a launch parameter outside the contract (checked before any
        triton import).
    """
    from cuda_triton_bridge.config import check_tickets, resolve_call

    launch = dict(
        block_c=block_c,
        num_splits=num_splits,
        num_warps=num_warps,
        num_stages=num_stages,
        vnorm=vnorm,
        epilogue=epilogue,
        overrides=overrides,
    )
    # Checked here, before any triton import, so bad input fails the same way with or without a GPU.
    shape, _, _ = resolve_call(
        q, k_cache, v_cache, kv_valid, scale=scale, granularity=granularity, kv_len=kv_len,
        compute_evict=compute_evict, **launch,
    )  # fmt: skip
    if tickets is not None:
        check_tickets(tickets, shape)
    try:
        from cuda_triton_bridge import decode  # triton + jax_triton from here on
    except ImportError as e:
        raise ImportError(
            "longflow_decode_attention_triton needs triton>=3.6 and jax-triton>=0.3.1 "
            "(pip install 'longflow-jax[cuda]') and a CUDA GPU; check triton_available() first"
        ) from e

    return decode.longflow_decode_attention_triton(
        q,
        k_cache,
        v_cache,
        kv_valid,
        scale=scale,
        granularity=granularity,
        compute_evict=compute_evict,
        final_reduce=final_reduce,
        kv_len=kv_len,
        tickets=tickets,
        **launch,
    )
