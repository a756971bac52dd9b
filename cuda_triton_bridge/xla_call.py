"""Launch a native Triton kernel through XLA's own Triton custom call instead of jax-triton's.

jax-triton's launch is a legacy custom call: several microseconds of host time each, outside XLA's CUDA
graphs (docs/KERNELS.md). XLA's `__gpu$xla.gpu.triton` custom call (Pallas' GPU lowering uses it) takes
the kernel's Triton IR (TTIR), compiles it with XLA's bundled Triton and runs it as an ordinary kernel
thunk that command buffers record. `xla_triton_call` takes what `jax_triton.triton_call` takes for our
kernels, with the TTIR built by the `triton` package's front end. Where it differs:
  * scalar arguments are constexprs (the custom call passes buffers only), one compile per value;
  * no output is zeroed for the kernel: a kernel that needs zeros takes them as an input aliased to
    the output (the fused and coop kernels' tickets_in_ptr).
"""

from __future__ import annotations

import functools
import re

import jax
import numpy as np

XLA_TRITON_TARGET = "__gpu$xla.gpu.triton"
_POINTER_TYPES = {
    np.dtype(jax.numpy.bfloat16): "*bf16",
    np.dtype(np.float16): "*fp16",
    np.dtype(np.float32): "*fp32",
    np.dtype(np.int32): "*i32",
    np.dtype(np.bool_): "*i1",
    np.dtype(np.int8): "*i8",  # quantized payloads (pallas_kernels/quant.py)
    np.dtype(np.uint8): "*u8",
    np.dtype(jax.numpy.float8_e4m3fn): "*fp8e4nv",
}
_FUNC_NAME = re.compile(r"tt\.func public @([A-Za-z_][A-Za-z0-9_]*)")


def pointer_type(dtype) -> str:
    """Triton's type string of a pointer to `dtype` elements, e.g. "*bf16"."""
    try:
        return _POINTER_TYPES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"no Triton pointer type for dtype {dtype}") from None


def aligned_pointers(signature: dict) -> dict:
    """Triton `attrs` declaring every pointer argument 16-byte aligned, as jax-triton does for every
    buffer (XLA's are too); without it the compiler keeps K/V loads scalar."""
    return {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}


@functools.lru_cache(maxsize=256)
def kernel_ttir(kernel, signature: tuple, constexprs: tuple, num_warps: int, num_stages: int, capability):
    """(function name, TTIR text) of `kernel` specialised to `signature` ((name, type) pairs; pointers
    16-byte aligned, as jax-triton assumes) and `constexprs` ((name, value) pairs)."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages, "num_ctas": 1})
    sig = dict(signature)
    src = ASTSource(fn=kernel, signature=sig, constexprs=dict(constexprs), attrs=aligned_pointers(sig))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(
        target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context
    )
    module = backend.make_ttir(module, {}, options, capability)  # inlines the helper functions
    text = module.str_nodebug()  # no source locations: smaller backend config, same kernel
    names = _FUNC_NAME.findall(text)
    if len(names) != 1:
        raise RuntimeError(f"expected one public function in the TTIR of {kernel.fn.__name__}, got {names}")
    return names[0], text


def xla_triton_call(
    *inputs, kernel, out_shape, grid, num_warps, num_stages, capability, input_output_aliases=None,
    **constexprs,
):  # fmt: skip
    """Run `kernel` over `grid` as XLA's Triton custom call; returns the outputs (a list).

    The kernel's non-constexpr arguments must be the input pointers, then the output pointers, in order.
    """
    names = list(kernel.arg_names)
    unknown = sorted(set(constexprs) - set(names))
    if unknown:
        raise ValueError(f"{kernel.fn.__name__} has no arguments {unknown}")
    pointers = [n for n in names if n not in constexprs]
    buffers = [x.dtype for x in inputs] + [s.dtype for s in out_shape]
    if len(pointers) != len(buffers):
        raise ValueError(
            f"{kernel.fn.__name__} takes {len(pointers)} buffers, got {len(inputs)} inputs and "
            f"{len(out_shape)} outputs"
        )
    types = dict(zip(pointers, (pointer_type(d) for d in buffers)))
    signature = tuple((n, types.get(n, "constexpr")) for n in names)
    name, ttir = kernel_ttir(
        kernel, signature, tuple(sorted(constexprs.items())), num_warps, num_stages, capability
    )
    grid = tuple(grid) + (1,) * (3 - len(grid))
    call = jax.ffi.ffi_call(XLA_TRITON_TARGET, list(out_shape), input_output_aliases=input_output_aliases)
    return call(
        *inputs,
        name=name,
        ir=ttir,
        num_stages=np.int32(num_stages),
        num_warps=np.int32(num_warps),
        grid_x=np.int32(grid[0]),
        grid_y=np.int32(grid[1]),
        grid_z=np.int32(grid[2]),
        debug=False,
    )
