"""Run the Triton decode kernels in Triton's CPU interpreter (numpy): a test helper, not shipped.

Same checks, config and launch plan as the jax_triton path (decode.py); only the launcher differs:
torch CPU tensors instead of XLA buffers, and interpreted programs run one after another (so the atomic
last-program reduction is exercised, though not its concurrency). Needs triton and torch, no GPU.
Slow (numpy per program): keep shapes small.

Triton picks the interpreter when `triton` is first imported with TRITON_INTERPRET=1, so this runs in its
own process: `TRITON_INTERPRET=1 python tests/triton_interpret.py CASES.npz RESULTS.npz` (what
tests/test_triton_kernel.py does). CASES.npz holds q_i, k_i, v_i (float32 values of the rounded inputs),
valid_i and a JSON list `cases` of {"dtype": ..., "kwargs": {...}} (a "launch" dict becomes a
LaunchConfig); RESULTS.npz gets out_i (float32), evict_i, lse_i (with "return_lse") and state_i (the
kernel state the first call left). A case with "repeat": true runs twice, the second time on the state
the first returned: out_i, evict_i and lse_i are then the second call's. A case whose kwargs name a
"kv_quant" kind has payloads in k_i, v_i (their raw bytes: int8, or uint8 for the packed kinds and fp8's
bits) and its KVScales fields in k_scale_i, k_zero_i, v_scale_i, v_zero_i (the zero points only where
the kind has them).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
import triton

from cuda_triton_bridge import kernels
from cuda_triton_bridge.config import LaunchConfig, check_kernel_state, kernel_state_shape, plan_inputs
from cuda_triton_bridge.launch import LOG2E, plan_launch
from pallas_kernels import quant


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


def _bf16_as_the_gpu_computes_it():
    """Triton 3.6's interpreter holds bf16 as raw uint16 bits and gets three ops wrong on them: tl.dot
    multiplies the bits, an integer cast to bf16 stores the integer as bits, and f32 -> bf16 truncates
    (the GPU rounds to nearest even). This widens bf16 dot operands to f32 first (exact, as the tensor
    cores' products are) and casts to and from bf16 through ml_dtypes."""
    import ml_dtypes
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_longflow_bf16", False):
        return
    bf16 = np.dtype(ml_dtypes.bfloat16)
    dot, cast = builder.create_dot, builder.cast_impl

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        return interpreter.TensorHandle(x.data.view(bf16).astype(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args):
        return dot(self, widen(a), widen(b), d, *args)

    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if tl.bfloat16 not in (src_ty, dst_ty):
            return cast(self, src, dst_type)
        data = src.data.view(bf16) if src_ty == tl.bfloat16 else src.data
        if dst_ty == tl.bfloat16:
            return interpreter.TensorHandle(data.astype(bf16).view(np.uint16), dst_ty)
        return interpreter.TensorHandle(data.astype(interpreter._get_np_dtype(dst_ty)), dst_ty)

    builder.create_dot, builder.cast_impl, builder._longflow_bf16 = create_dot, cast_impl, True


_index_one_element_tensors()
_bf16_as_the_gpu_computes_it()

_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# dtypes numpy lacks: torch gets their raw bits, reinterpreted
_TORCH_BITS = {"bfloat16": (np.int16, torch.bfloat16), "float8_e4m3fn": (np.uint8, torch.float8_e4m3fn)}
SCALE_NAMES = quant.KVScales._fields


def _to_torch(x):
    x = np.asarray(x)
    if x.dtype.name in _TORCH_BITS:
        bits, dtype = _TORCH_BITS[x.dtype.name]
        return torch.from_numpy(x.view(bits).copy()).view(dtype)
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
    q, k_cache, v_cache, kv_valid, *, sms=None, kernel_state=None, **kwargs
):
    """`longflow_decode_attention_triton`'s contract (its keyword arguments in `kwargs`) on numpy-convertible
    arrays; `sms` stands in for the GPU's SM count in the launch defaults. Always returns
    (out, evict_slot, lse (None unless return_lse), kernel_state)."""
    if not triton.knobs.runtime.interpret:
        raise RuntimeError("set TRITON_INTERPRET=1 before triton is first imported (see the module doc)")
    shape, kv_len, cfg = plan_inputs(q, k_cache, v_cache, kv_valid, sms=sms, **kwargs)
    if kernel_state is None:
        kernel_state = np.zeros(kernel_state_shape(shape.batch, shape.num_kv_heads), np.int32)
    kernel_state = np.asarray(kernel_state)
    check_kernel_state(kernel_state, shape)
    granularity = kwargs.get("granularity", "sequence")
    compute_evict = kwargs.get("compute_evict", True)
    return_lse = kwargs.get("return_lse", False)
    dtype = np.asarray(q).dtype.name
    plan = plan_launch(
        shape,
        cfg,
        granularity=granularity,
        compute_evict=compute_evict,
        is_f32=dtype == "float32",
        native=False,  # no libdevice or PTX in the interpreter; the GPU tests check the native path
        spin=False,  # interpreted programs run one after another: none may wait for another
        return_lse=return_lse,
    )
    tq, tk, tv = (_to_torch(x) for x in (q, k_cache, v_cache))
    tvalid = torch.from_numpy(np.asarray(kv_valid).copy())
    tlen = torch.from_numpy(np.asarray(kv_len).copy())
    # Without kv_quant (or zero points) the kernels never read these: a placeholder, as decode.py passes.
    scales = kwargs.get("kv_scales") or quant.KVScales(*(None for _ in quant.KVScales._fields))
    tscales = [torch.zeros(1) if x is None else _to_torch(x) for x in scales]
    qk_scale = float(kwargs["scale"]) * LOG2E
    split_out = _alloc(plan.split, _TORCH[dtype])
    if plan.one_kernel:
        # The state is the input aliased to the tickets output, as on the GPU.
        split_out[plan.tickets_output] = torch.from_numpy(kernel_state.copy())
        tickets = split_out[plan.tickets_output]
        getattr(kernels, plan.main_kernel)[plan.split.grid](
            tq, tk, tv, tvalid, tlen, qk_scale, tickets, *tscales, *split_out, **plan.split.meta
        )
        out, evict_slot, kernel_state = split_out[0], split_out[plan.evict_output], tickets.numpy()
        lse = split_out[-1]
    else:
        kernels.decode_split_kernel[plan.split.grid](
            tq, tk, tv, tvalid, tlen, qk_scale, *tscales, *split_out, **plan.split.meta
        )
        out, acc, m, ell, t, counter, evict_slot, lse = split_out
        if plan.combine is not None:
            comb_out = _alloc(plan.combine, _TORCH[dtype])
            comb_out[4] = counter  # aliased, as input_output_aliases={6: 4} does on the GPU
            kernels.decode_combine_kernel[plan.combine.grid](
                tvalid, tlen, acc, m, ell, t, counter, *comb_out, **plan.combine.meta
            )
            if plan.combine.meta["COMBINE_OUT"]:
                out, lse = comb_out[0], comb_out[-1]
            evict_slot = comb_out[1] if compute_evict else evict_slot
    evict_slot = evict_slot.numpy()
    if granularity == "sequence":
        evict_slot = evict_slot.reshape(evict_slot.shape[0])
    return _to_numpy(out), evict_slot, lse.numpy() if return_lse else None, kernel_state


def main(argv=None):
    import jax.numpy as jnp

    src, dst = argv or sys.argv[1:]
    data = np.load(src)
    results = {}
    for i, case in enumerate(json.loads(str(data["cases"]))):
        dtype = jnp.dtype(case["dtype"])
        kwargs = dict(case["kwargs"])
        q, k, v = (np.asarray(jnp.asarray(data[f"{n}_{i}"]).astype(dtype)) for n in "qkv")
        if kwargs.get("kv_quant"):
            payload = jnp.dtype(quant.payload_dtype(kwargs["kv_quant"]))
            k, v = (data[f"{n}_{i}"].view(payload) for n in "kv")
            kwargs["kv_scales"] = quant.KVScales(
                *(data[f"{n}_{i}"] if f"{n}_{i}" in data else None for n in SCALE_NAMES)
            )
        if "kv_len" in kwargs:  # JSON holds a list; the kernel takes an int array
            kwargs["kv_len"] = np.asarray(kwargs["kv_len"], np.int32)
        if "launch" in kwargs:
            kwargs["launch"] = LaunchConfig(**kwargs["launch"])
        calls = 2 if kwargs.pop("repeat", False) else 1
        state = None
        for call in range(calls):  # a repeated case's second call takes the state the first left
            out, evict_slot, lse, state = longflow_decode_attention_interpret(
                q, k, v, data[f"valid_{i}"], kernel_state=state, **kwargs
            )
            if call == 0:
                results[f"state_{i}"] = state
        results[f"out_{i}"] = np.asarray(out, np.float32)
        results[f"evict_{i}"] = evict_slot
        if lse is not None:
            results[f"lse_{i}"] = lse
    np.savez(dst, **results)


if __name__ == "__main__":
    main()
