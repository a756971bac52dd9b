"""Compile the GPU kernels for sm_90 on a machine without a GPU (test helper, not shipped).

Builds what the GPU would run -- the Pallas GPU body's Triton IR (captured from its lowering) and the
native Triton kernels of a launch plan -- compiles it with the `triton` package (its bundled ptxas; no
driver, no jax-triton) and reports shared memory, registers, spills and the SASS instruction mix. It
catches what the CPU interpreter cannot: compile errors, shared-memory overflow, register spills.
Uses a private JAX hook to capture the Pallas IR (the Pallas Triton lowering function).
"""

from __future__ import annotations

import collections
import functools
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from cuda_triton_bridge.config import DecodeShape, LaunchConfig, resolve_launch
from cuda_triton_bridge.launch import plan_launch
from pallas_kernels.decode_attention import TRITON_NUM_STAGES, TRITON_NUM_WARPS, longflow_decode_attention

_SASS_OPS = re.compile(
    r"\b(LDGSTS[.A-Z0-9]*|LDG[.A-Z0-9]*|STG[.A-Z0-9]*|HMMA[.A-Z0-9]*|HGMMA[.A-Z0-9]*|LDL[.A-Z0-9]*|"
    r"STL[.A-Z0-9]*|MUFU\.EX2|LDSM[.A-Z0-9]*|CCTL[.A-Z0-9]*)"
)

KERNELS = ("decode", "combine")  # the launches of one call, in order: main kernel, then the epilogue


def triton_ir(
    batch, num_q_heads, num_kv_heads, slots, head_dim, dtype=jnp.bfloat16, *, kernel="decode", **kernel_kwargs
):
    """The Triton IR (text) of one of the call's kernels at these shapes: "decode" (the main kernel) or
    "combine" (the epilogue, launched when the call splits or scores)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    from jax._src.pallas.triton import pallas_call_registration as registration

    captured = []
    original = registration.lowering.lower_jaxpr_to_triton_module

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    sds = jax.ShapeDtypeStruct
    args = (
        sds((batch, num_q_heads, head_dim), dtype),
        sds((batch, num_kv_heads, slots, head_dim), dtype),
        sds((batch, num_kv_heads, slots, head_dim), dtype),
        sds((batch, slots), jnp.bool_),
    )
    kernel_kwargs.setdefault("scale", head_dim**-0.5)
    fn = jax.jit(
        functools.partial(longflow_decode_attention, backend="triton", interpret=False, **kernel_kwargs)
    )
    registration.lowering.lower_jaxpr_to_triton_module = spy
    try:
        checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        jax.export.export(fn, platforms=["cuda"], disabled_checks=checks)(*args)
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = original
    which = KERNELS.index(kernel)
    if len(captured) <= which:
        raise RuntimeError(f"no {kernel!r} kernel at these arguments (captured {len(captured)} kernels)")
    return captured[which]


def compile_report(ir_text, *, num_warps=TRITON_NUM_WARPS, num_stages=TRITON_NUM_STAGES, capability=90):
    """Compile Triton IR text for sm_<capability>; return a dict of resources and SASS op counts."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ir_text)
        compiled = triton.compile(
            path,
            target=GPUTarget("cuda", capability, 32),
            options={"num_warps": num_warps, "num_stages": num_stages},
        )
    return cubin_report(compiled)


def cubin_report(compiled):
    """Shared memory, registers, stack/local (spill) bytes and SASS op counts of a compiled kernel,
    read with the cuobjdump bundled with triton."""
    return {"shared_bytes": compiled.metadata.shared, **cubin_bytes_report(compiled.asm["cubin"])}


def cubin_bytes_report(cubin_bytes: bytes) -> dict:
    """Registers, stack/local (spill) bytes and SASS op counts of a cubin (its first kernel)."""
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(cubin_bytes)
        tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        cuobjdump = os.path.join(tools, "cuobjdump")
        usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout
    resources = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    return {
        "registers": int(resources.get("REG", -1)),
        "stack_bytes": int(resources.get("STACK", -1)),
        "local_bytes": int(resources.get("LOCAL", -1)),
        "sass_ops": dict(collections.Counter(_SASS_OPS.findall(sass)).most_common()),
        "loop_ops": longest_loop_ops(sass),
    }


def longest_loop_ops(sass: str) -> dict:
    """Opcode counts (predicates dropped) of the longest backward branch's body: the main kernel's slot
    loop, one block of slots per trip."""
    code = [
        (int(m.group(1), 16), m.group(2).strip())
        for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;/]*);", sass)
    ]
    loops = [
        (int(target.group(1), 16), at)
        for at, text in code
        if (target := re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)) and int(target.group(1), 16) < at
    ]
    if not loops:
        return {}
    first, last = max(loops, key=lambda loop: loop[1] - loop[0])
    body = [re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] for at, text in code if first <= at <= last]
    return dict(collections.Counter(body).most_common())


_POINTER = {"q": "*{q}", "f32": "*fp32", "i32": "*i32"}
_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_PAYLOAD = {"int8": "i8", "fp8": "fp8e4nv", "int4": "u8", "int2": "u8"}


def _signature(kernel, inputs, launch, q_type, meta):
    """Triton signature: inputs (name -> type), then the launch's output buffers, then constexprs."""
    names = list(kernel.arg_names)
    types = dict(inputs)
    outputs = [n for n in names if n not in types and n not in meta]
    if len(outputs) != len(launch.outputs):
        raise RuntimeError(
            f"{kernel.fn.__name__}: {len(outputs)} output pointers vs {len(launch.outputs)} buffers"
        )
    for name, buf in zip(outputs, launch.outputs):
        types[name] = _POINTER[buf.dtype].format(q=q_type)
    signature = {n: types.get(n, "constexpr") for n in names}
    return signature


def compile_plan(
    batch,
    num_q_heads,
    num_kv_heads,
    slots,
    head_dim,
    dtype="bfloat16",
    capability=90,
    granularity="sequence",
    compute_evict=True,
    with_ptx=False,
    kv_quant=None,
    quant_group=32,
    **launch,
):
    """{kernel name: resource report} for every kernel the launch plan of these shapes runs (with its
    PTX text under "ptx" if with_ptx); `launch`: LaunchConfig fields; kv_quant: a quantized cache with
    quant_group elements per scale."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cuda_triton_bridge import kernels
    from cuda_triton_bridge.xla_call import aligned_pointers

    itemsize = 4 if dtype == "float32" else 2
    shape = DecodeShape(
        batch, num_q_heads, num_kv_heads, slots, head_dim, itemsize, kv_quant, quant_group if kv_quant else 0
    )
    cfg = resolve_launch(
        shape, LaunchConfig(**launch), compute_evict=compute_evict, sms=132, capability=capability
    )
    plan = plan_launch(
        shape,
        cfg,
        granularity=granularity,
        compute_evict=compute_evict,
        is_f32=dtype == "float32",
        capability=capability,
    )
    q_type = _DTYPE[dtype]
    kv_type = _PAYLOAD.get(kv_quant, q_type)
    main_inputs = {
        "q_ptr": f"*{q_type}",
        "k_ptr": f"*{kv_type}",
        "v_ptr": f"*{kv_type}",
        "valid_ptr": "*i1",
        "kv_len_ptr": "*i32",
        "qk_scale": "fp32",
    }
    if plan.one_kernel:
        main_inputs["tickets_in_ptr"] = "*i32"
    main_inputs.update({f"{n}_ptr": "*fp32" for n in ("k_scale", "k_zero", "v_scale", "v_zero", "v_norm")})
    launches = [(getattr(kernels, plan.main_kernel), main_inputs, plan.split)]
    if plan.combine is not None:
        comb_inputs = {
            "valid_ptr": "*i1",
            "kv_len_ptr": "*i32",
            "acc_ptr": "*fp32",
            "m_ptr": "*fp32",
            "l_ptr": "*fp32",
            "t_ptr": "*fp32",
            "counter_in_ptr": "*i32",
        }
        launches.append((kernels.decode_combine_kernel, comb_inputs, plan.combine))
    reports = {}
    for kernel, inputs, launch in launches:
        signature = _signature(kernel, inputs, launch, q_type, launch.meta)
        src = ASTSource(
            fn=kernel, signature=signature, constexprs=dict(launch.meta), attrs=aligned_pointers(signature)
        )
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", capability, 32),
            options={"num_warps": launch.num_warps, "num_stages": launch.num_stages},
        )
        reports[kernel.fn.__name__] = cubin_report(compiled)
        if with_ptx:
            reports[kernel.fn.__name__]["ptx"] = compiled.asm["ptx"]
    return reports
