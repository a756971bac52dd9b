"""Compile the native Triton decode kernels for a GPU on a machine without one (a CI check).

Builds the same launch plan as decode.py, compiles each kernel of it with the `triton` package for a
target such as sm_90 (its bundled ptxas; no driver, no jax-triton), and reports shared memory, registers
and spills. It catches what the CPU interpreter cannot: Triton compile errors (e.g. a construct the
interpreter accepts and the compiler does not), shared-memory overflow, register spills.

  python -m cuda_triton_bridge.offline --batch 16 --slots 8192
"""

from __future__ import annotations

import argparse

from cuda_triton_bridge.config import DecodeShape, resolve_config
from cuda_triton_bridge.launch import plan_launch

_POINTER = {"q": "*{q}", "f32": "*fp32", "i32": "*i32"}
_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


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
    epilogue=None,
    with_ptx=False,
    **config,
):
    """{kernel name: resource report} for every kernel the launch plan of these shapes runs (with its
    PTX text under "ptx" if with_ptx)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cuda_triton_bridge import kernels
    from cuda_triton_bridge.xla_call import aligned_pointers
    from pallas_kernels.triton_offline import cubin_report  # the same cuobjdump report as for Pallas

    itemsize = 4 if dtype == "float32" else 2
    shape = DecodeShape(batch, num_q_heads, num_kv_heads, slots, head_dim, itemsize)
    # block_c, num_splits, num_warps, num_stages, vnorm, overrides
    cfg = resolve_config(
        shape, sms=132, capability=capability, epilogue=epilogue, compute_evict=compute_evict, **config
    )
    plan = plan_launch(
        shape,
        cfg,
        granularity=granularity,
        compute_evict=compute_evict,
        final_reduce="atomic",
        is_f32=dtype == "float32",
        capability=capability,
    )
    q_type = _DTYPE[dtype]
    main_inputs = {
        "q_ptr": f"*{q_type}",
        "k_ptr": f"*{q_type}",
        "v_ptr": f"*{q_type}",
        "valid_ptr": "*i1",
        "kv_len_ptr": "*i32",
        "qk_scale": "fp32",
    }
    if plan.one_kernel:
        main_inputs["tickets_in_ptr"] = "*i32"
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


def main(argv=None):
    from pallas_kernels.triton_offline import add_shape_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--granularity", default="sequence")
    parser.add_argument(
        "--epilogue", choices=("fused", "separate", "coop"), help="default: the measured choice"
    )
    parser.add_argument("--vnorm", choices=("mma", "reduce"))
    parser.add_argument(
        "--override", action="append", default=[], help="LaunchConfig switch, e.g. discard_t=0"
    )
    args = parser.parse_args(argv)
    reports = compile_plan(
        args.batch,
        args.num_q_heads,
        args.num_kv_heads,
        args.slots,
        args.head_dim,
        dtype=args.dtype,
        capability=args.capability,
        granularity=args.granularity,
        compute_evict=not args.no_evict,
        epilogue=args.epilogue,
        vnorm=args.vnorm,
        overrides={n: v != "0" for n, _, v in (o.partition("=") for o in args.override)},
    )
    for name, report in reports.items():
        print(name, report)


if __name__ == "__main__":
    main()
