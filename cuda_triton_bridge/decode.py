"""JAX entry point of the Triton decode kernel: launches through `jax_triton.triton_call`.

Imports triton and jax_triton at module level; `cuda_triton_bridge/__init__.py` imports this module only
when the kernel is called, so the package itself imports anywhere.

Launches per call (all inside the caller's jit, no host sync):
  * split kernel, grid (num_splits, Hkv, B);
  * combine kernel, grid (max(Hq, slot chunks), B): only when there is something to combine, i.e. when
    num_splits > 1 or compute_evict. With one split and compute_evict=False the split kernel writes the
    normalised output and the -1 evict slots itself: one launch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import jax_triton as jt
import numpy as np

from cuda_triton_bridge import kernels
from cuda_triton_bridge.config import (
    cdiv,
    check_triton_inputs,
    next_pow2,
    resolve_config,
    score_groups,
)

FINAL_REDUCES = ("atomic", "xla")
_LOG2E = math.log2(math.e)


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
    final_reduce="atomic",
):
    """See `cuda_triton_bridge.longflow_decode_attention_triton` (the documented entry point)."""
    shape = check_triton_inputs(q, k_cache, v_cache, kv_valid, scale, granularity)
    if final_reduce not in FINAL_REDUCES:
        raise ValueError(f"final_reduce must be one of {FINAL_REDUCES}, got {final_reduce!r}")
    cfg = resolve_config(
        shape, block_c=block_c, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages
    )
    num_groups, heads_per_group = score_groups(shape, granularity)
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, num_slots = shape.num_kv_heads, shape.num_slots
    splits = cfg.num_splits
    direct_out = splits == 1
    evict = bool(compute_evict)

    f32, i32 = jnp.float32, jnp.int32

    def sds(shape_, dtype, used=True):
        # Unused outputs still need a pointer: a one-element placeholder.
        return jax.ShapeDtypeStruct(shape_ if used else (1,), dtype)

    out, acc, m, ell, t, counter, no_evict = jt.triton_call(
        q,
        k_cache,
        v_cache,
        kv_valid,
        np.float32(float(scale) * _LOG2E),
        kernel=kernels.decode_split_kernel,
        out_shape=[
            sds((batch, num_q_heads, head_dim), q.dtype, direct_out),
            sds((batch, num_q_heads, splits, head_dim), f32, not direct_out),
            sds((batch, num_q_heads, splits), f32, evict or not direct_out),
            sds((batch, num_q_heads, splits), f32, evict or not direct_out),
            sds((batch, num_q_heads, num_slots), f32, evict),
            sds((batch,), i32, evict),
            sds((batch, num_groups), i32, not evict),
        ],
        grid=(splits, num_kv_heads, batch),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        name="longflow_decode_split",
        HQ=num_q_heads,
        HKV=num_kv_heads,
        C=num_slots,
        D=head_dim,
        NUM_SPLITS=splits,
        BLOCKS_PER_SPLIT=cfg.blocks_per_split,
        BLOCK_C=cfg.block_c,
        QROWS=cfg.query_rows,
        NG=num_groups,
        NG_P=next_pow2(num_groups),
        DIRECT_OUT=direct_out,
        EVICT=evict,
        DOT_PRECISION="ieee" if q.dtype == jnp.float32 else "tf32",
    )
    if not evict and direct_out:
        return out, _squeeze_groups(no_evict, granularity)

    ng_p, hpg_p = next_pow2(num_groups), next_pow2(heads_per_group)
    # Keep the importance tile of one program at about 8K floats (32 registers a thread at 8 warps).
    chunk = max(16, min(cfg.combine_chunk, 8192 // (ng_p * hpg_p)))
    num_chunks = cdiv(num_slots, chunk) if evict else 0
    atomic = final_reduce == "atomic"
    combine_programs = max(0 if direct_out else num_q_heads, num_chunks)
    comb_out, comb_evict, part_val, part_idx, _ = jt.triton_call(
        kv_valid,
        acc,
        m,
        ell,
        t,
        counter,
        kernel=kernels.decode_combine_kernel,
        out_shape=[
            sds((batch, num_q_heads, head_dim), q.dtype, not direct_out),
            sds((batch, num_groups), i32, evict),
            sds((batch, num_groups, num_chunks), f32, evict and num_chunks > 1),
            sds((batch, num_groups, num_chunks), i32, evict and num_chunks > 1),
            counter,
        ],
        input_output_aliases={5: 4},
        grid=(combine_programs, batch),
        num_warps=cfg.combine_num_warps,
        num_stages=1,
        name="longflow_decode_combine",
        HQ=num_q_heads,
        C=num_slots,
        D=head_dim,
        NUM_SPLITS=splits,
        S_P=next_pow2(splits),
        NG=num_groups,
        NG_P=ng_p,
        HPG=heads_per_group,
        HPG_P=hpg_p,
        CHUNK=chunk,
        NUM_CHUNKS=max(num_chunks, 1),
        NCH_P=next_pow2(max(num_chunks, 1)),
        COMBINE_OUT=not direct_out,
        EVICT=evict,
        ATOMIC_FINAL=atomic,
    )
    out = out if direct_out else comb_out
    if not evict:
        evict_slot = no_evict
    elif num_chunks > 1 and not atomic:
        best_chunk = jnp.argmin(part_val, axis=-1)  # ties -> lowest chunk -> lowest slot
        evict_slot = jnp.take_along_axis(part_idx, best_chunk[..., None], axis=-1)[..., 0]
    else:
        evict_slot = comb_evict
    return out, _squeeze_groups(evict_slot, granularity)


def _squeeze_groups(evict_slot, granularity):
    # [B, 1] -> [B] is a bitcast in XLA: no extra kernel.
    return evict_slot.reshape(evict_slot.shape[0]) if granularity == "sequence" else evict_slot
