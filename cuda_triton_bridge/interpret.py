"""Run the decode kernels in Triton's CPU interpreter (numpy), for tests on machines without a GPU.

Same checks, config and launch plan as the jax_triton path (decode.py); only the launcher differs:
torch CPU tensors instead of XLA buffers, and interpreted programs run one after another (so the atomic
last-program reduction is exercised, though not its concurrency). Needs triton and torch, no GPU.
Slow (numpy per program): keep shapes small.

Triton picks the interpreter when `triton` is first imported with TRITON_INTERPRET=1, so this runs in its
own process: `TRITON_INTERPRET=1 python -m cuda_triton_bridge.interpret CASES.npz RESULTS.npz` (what
tests/test_triton_kernel.py does). CASES.npz holds q_i, k_i, v_i (float32 values of the rounded inputs),
valid_i and a JSON list `cases` of {"dtype": ..., "kwargs": {...}}; RESULTS.npz gets out_i (float32)
and evict_i. A case with "persistent_tickets": true in its kwargs runs twice, the second time with the
ticket buffer the first returned: out_i and evict_i are the second call's, tickets_i what the first left.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
import triton

from cuda_triton_bridge import kernels
from cuda_triton_bridge.config import check_tickets, resolve_call, ticket_shape
from cuda_triton_bridge.launch import LOG2E, plan_launch


def _index_one_element_tensors():
    """Let the interpreter use a loaded scalar as a loop bound (`range(0, n)`, n from tl.load).

    Triton 3.6's interpreter holds scalars as 1-element arrays and converts them with int(array), which
    numpy 2 rejects for arrays of shape (1,). The GPU compiler has no such limit; this only patches the
    interpreter's tensor `__index__`, the same way the interpreter installs its own.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_longflow_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._longflow_patched = True
    interpreter._patch_lang_tensor = patched


_index_one_element_tensors()

_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _to_torch(x):
    x = np.asarray(x)
    if x.dtype.name == "bfloat16":  # numpy has no bf16: go through the raw bits
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def _to_numpy(x):
    if x.dtype == torch.bfloat16:
        import ml_dtypes

        return x.view(torch.int16).numpy().view(np.uint16).view(ml_dtypes.bfloat16)
    return x.numpy()


def _alloc(launch, q_dtype):
    dtypes = {"q": q_dtype, "f32": torch.float32, "i32": torch.int32}
    # Poisoned, so an element the kernel should write and does not shows up as NaN / a wild index.
    return [
        torch.full(buf.shape, float("nan"), dtype=dtypes[buf.dtype])
        if buf.dtype != "i32"
        else torch.full(buf.shape, -(2**30), dtype=torch.int32)
        for buf in launch.outputs
    ]


def longflow_decode_attention_interpret(
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
    sms=None,
    overrides=None,
    tickets=None,
):
    """Same contract as `longflow_decode_attention_triton`; takes and returns numpy-convertible arrays."""
    if not triton.knobs.runtime.interpret:
        raise RuntimeError("set TRITON_INTERPRET=1 before triton is first imported (see the module doc)")
    shape, kv_len, cfg = resolve_call(
        q, k_cache, v_cache, kv_valid, scale=scale, granularity=granularity, kv_len=kv_len,
        compute_evict=compute_evict, sms=sms, block_c=block_c, num_splits=num_splits,
        num_warps=num_warps, num_stages=num_stages, vnorm=vnorm, epilogue=epilogue, overrides=overrides,
    )  # fmt: skip
    if tickets is not None:
        tickets = np.asarray(tickets)
        check_tickets(tickets, shape)
    dtype = np.asarray(q).dtype.name
    plan = plan_launch(
        shape,
        cfg,
        granularity=granularity,
        compute_evict=compute_evict,
        final_reduce=final_reduce,
        is_f32=dtype == "float32",
        fast_log2=False,  # no libdevice in the interpreter; the GPU tests check lg2.approx
        spin=False,  # interpreted programs run one after another: none may wait for another
        persistent_tickets=tickets is not None,
    )
    tq, tk, tv = (_to_torch(x) for x in (q, k_cache, v_cache))
    tvalid = torch.from_numpy(np.asarray(kv_valid).copy())
    tlen = torch.from_numpy(np.asarray(kv_len).copy())
    split_out = _alloc(plan.split, _TORCH[dtype])
    for i in plan.split.zeroed:
        split_out[i].zero_()
    if plan.one_kernel:
        if plan.persistent_tickets:
            split_out[plan.tickets_output] = torch.from_numpy(tickets.copy())
        ticket_buf = split_out[plan.tickets_output]  # the input aliased to the tickets output, as on the GPU
        getattr(kernels, plan.main_kernel)[plan.split.grid](
            tq, tk, tv, tvalid, tlen, float(scale) * LOG2E, ticket_buf, *split_out, **plan.split.meta
        )
        evict_slot = split_out[plan.evict_output].numpy()
        if granularity == "sequence":
            evict_slot = evict_slot.reshape(evict_slot.shape[0])
        if tickets is not None:
            return _to_numpy(split_out[0]), evict_slot, ticket_buf.numpy()
        return _to_numpy(split_out[0]), evict_slot
    kernels.decode_split_kernel[plan.split.grid](
        tq, tk, tv, tvalid, tlen, float(scale) * LOG2E, *split_out, **plan.split.meta
    )
    out, acc, m, ell, t, counter, no_evict = split_out
    if plan.combine is None:
        evict_slot = no_evict
    else:
        comb_out = _alloc(plan.combine, _TORCH[dtype])
        comb_out[4] = counter  # aliased, as input_output_aliases={6: 4} does on the GPU
        kernels.decode_combine_kernel[plan.combine.grid](
            tvalid, tlen, acc, m, ell, t, counter, *comb_out, **plan.combine.meta
        )
        if plan.combine.meta["COMBINE_OUT"]:
            out = comb_out[0]
        if not compute_evict:
            evict_slot = no_evict
        elif plan.reduce_in_xla:
            best_chunk = comb_out[2].argmin(dim=-1)
            evict_slot = torch.gather(comb_out[3], -1, best_chunk[..., None])[..., 0]
        else:
            evict_slot = comb_out[1]
    evict_slot = evict_slot.numpy()
    if granularity == "sequence":
        evict_slot = evict_slot.reshape(evict_slot.shape[0])
    if tickets is not None:  # the separate epilogue zeroes its own counter: the buffer passes through
        return _to_numpy(out), evict_slot, tickets
    return _to_numpy(out), evict_slot


def main(argv=None):
    import jax.numpy as jnp

    src, dst = argv or sys.argv[1:]
    data = np.load(src)
    results = {}
    for i, case in enumerate(json.loads(str(data["cases"]))):
        dtype = jnp.dtype(case["dtype"])
        q, k, v = (np.asarray(jnp.asarray(data[f"{n}_{i}"]).astype(dtype)) for n in "qkv")
        kwargs = dict(case["kwargs"])
        if "kv_len" in kwargs:  # JSON holds a list; the kernel takes an int array
            kwargs["kv_len"] = np.asarray(kwargs["kv_len"], np.int32)
        if kwargs.pop("persistent_tickets", False):
            tickets = np.zeros(ticket_shape(q.shape[0], k.shape[1]), np.int32)
            *_, tickets = longflow_decode_attention_interpret(
                q, k, v, data[f"valid_{i}"], tickets=tickets, **kwargs
            )
            results[f"tickets_{i}"] = tickets
            out, evict_slot, _ = longflow_decode_attention_interpret(
                q, k, v, data[f"valid_{i}"], tickets=tickets, **kwargs
            )
        else:
            out, evict_slot = longflow_decode_attention_interpret(q, k, v, data[f"valid_{i}"], **kwargs)
        results[f"out_{i}"] = np.asarray(out, np.float32)
        results[f"evict_{i}"] = evict_slot
    np.savez(dst, **results)


if __name__ == "__main__":
    main()
