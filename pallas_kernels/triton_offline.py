"""Compile the Triton body for a GPU on a machine without one, and report what the GPU would run.

Lowers `longflow_decode_attention` for "cuda" with jax.export, captures the Triton IR that Pallas
produces, compiles it with the `triton` package (its bundled ptxas; no driver needed) for a target such as
sm_90, and reports shared memory, registers, spills and the instruction mix of the SASS (16-byte async
copies for K/V, HMMA for the dots, no local memory). It catches what `jax.export` alone does not: Triton
compile errors, shared-memory overflow, register spills.

  PYTHONPATH=. python -m pallas_kernels.triton_offline --batch 16 --slots 8192 --num-splits 4

Needs `triton` importable (the `cuda` extra). Uses a private JAX hook to capture the IR (the Pallas
Triton lowering function), checked with jax 0.10.2; a development aid, not part of the kernel.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention import (
    COMBINE_NUM_WARPS,
    TRITON_NUM_STAGES,
    TRITON_NUM_WARPS,
    longflow_decode_attention,
)

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
    read with the cuobjdump bundled with triton (also used by cuda_triton_bridge/offline.py)."""
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
    }


def add_shape_arguments(parser) -> None:
    """The decode shape, dtype, scoring switch and target of an offline compile (also used by
    cuda_triton_bridge/offline.py)."""
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--num-q-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--slots", type=int, default=8192)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--no-evict", action="store_true")
    parser.add_argument("--capability", type=int, default=90)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--block-c", type=int)
    parser.add_argument("--num-splits", type=int)
    parser.add_argument("--num-warps", type=int, default=TRITON_NUM_WARPS)
    parser.add_argument("--num-stages", type=int, default=TRITON_NUM_STAGES)
    parser.add_argument("--kernel", choices=KERNELS, default="decode")
    args = parser.parse_args(argv)
    ir_text = triton_ir(
        args.batch,
        args.num_q_heads,
        args.num_kv_heads,
        args.slots,
        args.head_dim,
        dtype=jnp.dtype(args.dtype),
        block_c=args.block_c,
        num_splits=args.num_splits,
        compute_evict=not args.no_evict,
        num_warps=args.num_warps,
        num_stages=args.num_stages,
        kernel=args.kernel,
    )
    launch = (args.num_warps, args.num_stages) if args.kernel == "decode" else (COMBINE_NUM_WARPS, 1)
    report = compile_report(ir_text, num_warps=launch[0], num_stages=launch[1], capability=args.capability)
    for key, value in report.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
