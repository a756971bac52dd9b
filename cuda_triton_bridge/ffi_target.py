"""Launch jax-triton's kernel calls through jaxlib's typed-FFI Triton target.

jax-triton 0.3.1 (the newest release) lowers every `triton_call` to the legacy custom call
`triton_kernel_call` (API version 2, the zlib'd kernel proto as the opaque backend config). jaxlib's
handler for it looks the whole opaque string up in a hash map on every launch, and XLA of jax >= 0.11 can
no longer put a legacy custom call into a command buffer. jaxlib >= 0.10.1 also registers the typed-FFI
target `triton_kernel_call_ffi` (same proto, as the string attribute `opaque`), whose handler has an
initialisation stage, and XLA may record it into a command buffer. jax-triton's unreleased main branch
lowers to it for jax >= 0.10.1.

`install()` adds that lowering without forking jax-triton: it wraps jax-triton's CUDA lowering rule, and a
call whose `custom_call_target_name` is `FFI_TARGET` gets its ABI attributes rewritten to the typed-FFI
form (what `jax.ffi.ffi_lowering` emits). Every other `triton_call` lowers exactly as before.

Measured on an H100 with jax 0.11.2 (docs/BENCHMARKS.md, session 5): cheaper for an empty kernel (3.8-4.3
us a launch against 7.8-8.7), but 0.2-13 us more per decode call with our kernels, so it is off by default
(`overrides=dict(ffi_call=True)` turns it on).
"""

from __future__ import annotations

import functools

import jax

FFI_TARGET = "triton_kernel_call_ffi"
LEGACY_TARGET = "triton_kernel_call"
FFI_MIN_JAX = (0, 10, 1)  # the first jaxlib that registers FFI_TARGET (as jax-triton main checks)


def ffi_target_available() -> bool:
    return tuple(jax.__version_info__[:3]) >= FFI_MIN_JAX


def custom_call_target(use_ffi: bool) -> str:
    """The custom-call target a launch uses: the typed-FFI one when asked for and available."""
    return FFI_TARGET if use_ffi and ffi_target_available() else LEGACY_TARGET


def is_legacy_call(op) -> bool:
    """A custom call in jax-triton 0.3.1's legacy form (API version 2, opaque bytes as backend config)."""
    from jax._src.lib.mlir import ir

    attrs = op.attributes
    return (
        "api_version" in attrs
        and ir.IntegerAttr(attrs["api_version"]).value == 2
        and "mhlo.backend_config" not in attrs
    )


def to_typed_ffi(op) -> None:
    """Rewrite a legacy jax-triton custom call (API version 2, opaque bytes) into the typed-FFI form.

    `jax.interpreters.mlir.custom_call` encodes a typed-FFI call as API version 1 with an empty
    `backend_config` and its attributes in the dictionary `mhlo.backend_config`; the StableHLO -> HLO
    conversion turns that into API_VERSION_TYPED_FFI. The kernel proto keeps its bytes.
    """
    from jax._src.lib.mlir import ir

    attrs = op.attributes
    opaque = attrs["backend_config"]
    if ir.IntegerAttr(attrs["api_version"]).value != 2 or not isinstance(opaque, ir.StringAttr):
        raise RuntimeError(f"unexpected jax-triton custom call, cannot rewrite: {op}")
    with op.context:
        attrs["backend_config"] = ir.StringAttr.get("")
        attrs["api_version"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), 1)
        attrs["mhlo.backend_config"] = ir.DictAttr.get({"opaque": opaque})


@functools.cache
def install() -> None:
    """Register the wrapped CUDA lowering of jax-triton's primitive (once per process)."""
    from jax.interpreters import mlir
    from jax_triton import triton_lib

    legacy = functools.partial(triton_lib.triton_kernel_call_lowering, triton_lib.get_cuda_backend)

    def lowering(ctx, *args, custom_call_target_name, **params):
        results = legacy(ctx, *args, custom_call_target_name=custom_call_target_name, **params)
        op = results[0].owner
        op = getattr(op, "operation", op)
        # A jax-triton that already lowers to the typed FFI (its main branch does) needs no rewrite.
        if custom_call_target_name == FFI_TARGET and is_legacy_call(op):
            to_typed_ffi(op)
        return results

    mlir.register_lowering(triton_lib.triton_kernel_call_p, lowering, platform="cuda")
