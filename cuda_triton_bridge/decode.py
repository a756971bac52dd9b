"""The JAX launcher of the Triton decode kernels (imports triton and jax_triton; imported on first call).

A call runs the plan of launch.py inside the caller's jit, with no host sync: the split kernel, then the
combine kernel when there is something to combine, or one launch of the fused or coop kernel with the
caller's kernel state aliased in and out as its tickets.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jax_triton as jt
import numpy as np

from cuda_triton_bridge import kernels
from cuda_triton_bridge.config import kernel_state_shape
from cuda_triton_bridge.launch import LOG2E, plan_launch
from cuda_triton_bridge.xla_call import xla_triton_call
from pallas_kernels import quant


@functools.cache
def _compute_capability() -> int:
    """The capability jax-triton compiles for (device 0), e.g. 90 for sm_90."""
    return int(jt.get_compute_capability(0))


def run(
    q, k_cache, v_cache, kv_valid, kv_len, scale, shape, cfg, granularity, compute_evict, kernel_state,
    kv_scales=None, return_lse=False,
):  # fmt: skip
    """Launch the plan of one checked call: (out, evict_slot, lse, kernel_state); lse is a (1,)
    placeholder unless return_lse."""
    plan = plan_launch(
        shape,
        cfg,
        granularity=granularity,
        compute_evict=compute_evict,
        is_f32=q.dtype == jnp.float32,
        capability=_compute_capability(),
        return_lse=return_lse,
    )
    qk_scale = np.float32(float(scale) * LOG2E)
    # The main kernels take KVScales' five buffers last among their inputs; what the launch does not read
    # (all five without kv_quant, the zero points of int8 / fp8) is one f32 placeholder, a constant.
    placeholder = jnp.zeros((1,), jnp.float32)
    absent = (None,) * len(quant.KVScales._fields)
    scales = tuple(placeholder if x is None else x for x in (kv_scales or absent))
    if plan.one_kernel:
        if kernel_state is None:
            kernel_state = jnp.zeros(kernel_state_shape(shape.batch, shape.num_kv_heads), jnp.int32)
        # Aliases index the array arguments (qk_scale is a scalar, or a constexpr through XLA's call).
        outs = _call(
            getattr(kernels, plan.main_kernel),
            (q, k_cache, v_cache, kv_valid, kv_len, qk_scale, kernel_state, *scales),
            plan.split,
            q.dtype,
            via_xla=cfg.xla_launch,
            aliases={5: plan.tickets_output},
        )
        evict_slot = outs[plan.evict_output]
        return outs[0], _squeeze_groups(evict_slot, granularity), outs[-1], outs[plan.tickets_output]

    out, acc, m, ell, t, counter, no_evict, lse = _call(
        kernels.decode_split_kernel,
        (q, k_cache, v_cache, kv_valid, kv_len, qk_scale, *scales),
        plan.split,
        q.dtype,
        via_xla=cfg.xla_launch,
    )
    evict_slot = no_evict
    if plan.combine is not None:
        comb_out, comb_evict, *_, comb_lse = _call(
            kernels.decode_combine_kernel,
            (kv_valid, kv_len, acc, m, ell, t, counter),
            plan.combine,
            q.dtype,
            via_xla=True,
            aliases={6: 4},  # the atomic counter, zeroed by the split kernel
        )
        if plan.combine.meta["COMBINE_OUT"]:
            out, lse = comb_out, comb_lse
        evict_slot = comb_evict if compute_evict else no_evict
    # The separate epilogue's counter is zeroed by its own split kernel: the caller's state passes through.
    return out, _squeeze_groups(evict_slot, granularity), lse, kernel_state


def _call(kernel, args, launch, q_dtype, *, via_xla, aliases=None):
    """One launch of `kernel` with `args` (its non-output arguments, in order; numpy scalars are
    scalars; `aliases` index the arrays among `args`, as both launches count them): through XLA's Triton
    custom call (scalars become constexprs), else through jax-triton."""
    dtypes = {"q": q_dtype, "f32": jnp.float32, "i32": jnp.int32}
    out_shape = [jax.ShapeDtypeStruct(buf.shape, dtypes[buf.dtype]) for buf in launch.outputs]
    if via_xla:
        scalars = {n: float(a) for n, a in zip(kernel.arg_names, args) if isinstance(a, np.generic)}
        return xla_triton_call(
            *(a for a in args if not isinstance(a, np.generic)),
            kernel=kernel,
            out_shape=out_shape,
            grid=launch.grid,
            num_warps=launch.num_warps,
            num_stages=launch.num_stages,
            capability=_compute_capability(),
            input_output_aliases=aliases,
            **scalars,
            **launch.meta,
        )
    return jt.triton_call(
        *args,
        kernel=kernel,
        out_shape=out_shape,
        input_output_aliases=aliases,
        grid=launch.grid,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
        name="longflow_" + kernel.fn.__name__.removesuffix("_kernel"),
        **launch.meta,
    )


def _squeeze_groups(evict_slot, granularity):
    # [B, 1] -> [B] is a bitcast in XLA: no extra kernel.
    return evict_slot.reshape(evict_slot.shape[0]) if granularity == "sequence" else evict_slot
