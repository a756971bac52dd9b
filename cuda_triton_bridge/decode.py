"""JAX entry point of the Triton decode kernel. Each kernel is launched through `jax_triton.triton_call`
or through XLA's own Triton custom call (xla_call.py). Which one, per kernel: LaunchConfig.xla_call (the
main kernel; default at a small batch) and xla_combine (the combine kernel; default on).

Imports triton and jax_triton at module level; `cuda_triton_bridge/__init__.py` imports this module only
when the kernel is called, so the package itself imports anywhere.

Launches per call (all inside the caller's jit, no host sync), see launch.py:
  * split kernel, grid (num_splits, Hkv, B);
  * combine kernel, grid (max(Hq, slot chunks), B), when there is something to combine: num_splits > 1
    or compute_evict. With one split and compute_evict=False the split kernel writes the normalised
    output and the -1 evict slots itself: one launch.
  * or one launch of the fused or coop kernel (epilogue="fused" / "coop"). Its tickets start at zero:
    jax-triton memsets them, and through XLA's call they are a zero buffer aliased to the output. With
    the caller's persistent `tickets` neither: the buffer is aliased in and out, and the kernel leaves
    it zero (no zero fill, which through XLA's call is a kernel of its own).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jax_triton as jt
import numpy as np

from cuda_triton_bridge import kernels
from cuda_triton_bridge.config import check_tickets, resolve_call
from cuda_triton_bridge.ffi_target import custom_call_target, install
from cuda_triton_bridge.launch import LOG2E, plan_launch
from cuda_triton_bridge.xla_call import xla_triton_call
from longflow_jax.reference import evict_argmin_of_chunks


@functools.cache
def _compute_capability() -> int:
    # The capability jax-triton compiles for (it uses device 0 too), e.g. 90 for an H100.
    return int(jt.get_compute_capability(0))


def _out_shapes(launch, q_dtype):
    dtypes = {"q": q_dtype, "f32": jnp.float32, "i32": jnp.int32}
    return [jax.ShapeDtypeStruct(buf.shape, dtypes[buf.dtype]) for buf in launch.outputs]


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
    """See `cuda_triton_bridge.longflow_decode_attention_triton` (the documented entry point)."""
    shape, kv_len, cfg = resolve_call(
        q, k_cache, v_cache, kv_valid, scale=scale, granularity=granularity, kv_len=kv_len,
        compute_evict=compute_evict, block_c=block_c, num_splits=num_splits, num_warps=num_warps,
        num_stages=num_stages, vnorm=vnorm, epilogue=epilogue, overrides=overrides,
    )  # fmt: skip
    if tickets is not None:
        check_tickets(tickets, shape)
    plan = plan_launch(
        shape,
        cfg,
        granularity=granularity,
        compute_evict=compute_evict,
        final_reduce=final_reduce,
        is_f32=q.dtype == jnp.float32,
        capability=_compute_capability(),
        persistent_tickets=tickets is not None,
    )
    if plan.one_kernel:
        out, evict_slot, tickets_out = _launch_one(
            q, k_cache, v_cache, kv_valid, kv_len, scale, plan, cfg, tickets
        )
        return (out, evict_slot) if tickets is None else (out, evict_slot, tickets_out)
    out, evict_slot = _launch_two(q, k_cache, v_cache, kv_valid, kv_len, scale, plan, cfg, compute_evict)
    # The separate epilogue's counter is zeroed by its own split kernel: the caller's tickets pass through.
    return (out, evict_slot) if tickets is None else (out, evict_slot, tickets)


def _launch_two(q, k_cache, v_cache, kv_valid, kv_len, scale, plan, cfg, compute_evict):
    """The separate epilogue: the split kernel, then the combine kernel when there is something to
    combine."""
    granularity = plan.granularity
    qk_scale = np.float32(float(scale) * LOG2E)
    out, acc, m, ell, t, counter, no_evict = _call(
        kernels.decode_split_kernel,
        (q, k_cache, v_cache, kv_valid, kv_len, qk_scale),
        plan.split,
        q.dtype,
        cfg,
        via_xla=cfg.xla_call,
    )
    if plan.combine is None:
        return out, _squeeze_groups(no_evict, granularity)

    comb = plan.combine
    comb_out, comb_evict, part_val, part_idx, _ = _call(
        kernels.decode_combine_kernel,
        (kv_valid, kv_len, acc, m, ell, t, counter),
        comb,
        q.dtype,
        cfg,
        via_xla=cfg.xla_call or cfg.xla_combine,
        aliases={6: 4},  # the atomic counter, zeroed by the split kernel
    )
    out = comb_out if comb.meta["COMBINE_OUT"] else out
    if not compute_evict:
        evict_slot = no_evict
    elif plan.reduce_in_xla:
        evict_slot = evict_argmin_of_chunks(part_val, part_idx)
    else:
        evict_slot = comb_evict
    return out, _squeeze_groups(evict_slot, granularity)


def _launch_one(q, k_cache, v_cache, kv_valid, kv_len, scale, plan, cfg, tickets=None):
    """The one-launch epilogues ("fused", "coop"): their tickets start at zero. (out, evict, tickets)."""
    launch = plan.split
    ticket_out = plan.tickets_output
    # Aliases index the array arguments (qk_scale is a scalar, or a constexpr through XLA's call).
    if plan.persistent_tickets:  # the caller's zeros in, left zero by the kernel
        tickets_in, aliases = tickets, {5: ticket_out}
    elif cfg.xla_call:  # zeros, aliased to the tickets output
        tickets_in = jnp.zeros(launch.outputs[ticket_out].shape, jnp.int32)
        aliases = {5: ticket_out}
    else:  # jax-triton memsets the output itself (launch.zeroed); the input is a placeholder
        tickets_in = jnp.zeros((1,), jnp.int32)
        aliases = None
    outs = _call(
        getattr(kernels, plan.main_kernel),
        (q, k_cache, v_cache, kv_valid, kv_len, np.float32(float(scale) * LOG2E), tickets_in),
        launch,
        q.dtype,
        cfg,
        via_xla=cfg.xla_call,
        aliases=aliases,
    )
    return outs[0], _squeeze_groups(outs[plan.evict_output], plan.granularity), outs[ticket_out]


def _call(kernel, args, launch, q_dtype, cfg, *, via_xla, aliases=None):
    """One launch of `kernel` with `args` (its non-output arguments, in order; numpy scalars are
    scalars): through XLA's Triton custom call (via_xla: scalars become constexprs, `aliases` index the
    arrays among `args`), else through jax-triton (its legacy custom call, or jaxlib's typed FFI with
    cfg.ffi_call; `launch.zeroed` outputs memset by it)."""
    out_shape = _out_shapes(launch, q_dtype)
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
    if cfg.ffi_call:
        install()  # only then is jax-triton's lowering wrapped (ffi_target.py): no side effect by default
    return jt.triton_call(
        *args,
        kernel=kernel,
        out_shape=out_shape,
        input_output_aliases=aliases,
        zeroed_outputs=launch.zeroed,
        grid=launch.grid,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
        name="longflow_" + kernel.fn.__name__.removesuffix("_kernel"),
        custom_call_target_name=custom_call_target(cfg.ffi_call),
        **launch.meta,
    )


def _squeeze_groups(evict_slot, granularity):
    # [B, 1] -> [B] is a bitcast in XLA: no extra kernel.
    return evict_slot.reshape(evict_slot.shape[0]) if granularity == "sequence" else evict_slot
