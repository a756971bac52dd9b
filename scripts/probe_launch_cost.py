"""Where the per-call time of a jax-triton launch goes, by wall clock (no profiler). GPU only.

1. Chain scaling: the bench_kernels chain of a column with N and 4N calls per program. The slope is
   the marginal time per call (what one more decode-attention call costs inside a jitted program); the
   intercept is the fixed cost of one program execution, which bench_kernels spreads over its N calls.
2. Empty kernels: 64 chained jax-triton calls of a one-thread kernel per program: the host cost of one
   launch, with jax-triton's legacy custom call, with 64 KiB of extra opaque metadata (jaxlib hashes the
   whole opaque string per launch), and through the typed-FFI target; against 64 chained one-element
   XLA ops.

  python3 scripts/probe_launch_cost.py --sizes 1x2048,16x2048 --columns xla_attn,triton
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_kernels as bk  # noqa: E402


def chain_scaling(sizes, names, calls, reps):
    cols = bk.columns(1 / math.sqrt(bk.HEAD_DIM))
    print(
        "| B x C | column | us/call at N | us/call at 4N | marginal us/call | fixed us/execution "
        "| pipelined us/call at 4N |"
    )
    print("|---|---|---|---|---|---|---|")
    for batch, slots in sizes:
        sets = bk.make_sets(batch, slots, bk.n_sets_for(batch, slots))
        for name in names:
            t = {}
            for n in (calls, 4 * calls):
                program, n_calls = bk.chain_program(cols[name], sets, min_calls=n)
                t[n_calls] = bk.time_program(program, n_calls, sets, reps)[0] * n_calls
            piped = bk.time_program(program, n_calls, sets, 1, queued=reps)[0]
            (n1, t1), (n2, t2) = sorted(t.items())
            slope = (t2 - t1) / (n2 - n1)
            print(
                f"| {batch}x{slots} | {name} | {t1 / n1 * 1e6:.1f} | {t2 / n2 * 1e6:.1f} | "
                f"{slope * 1e6:.1f} | {(t1 - slope * n1) * 1e6:.0f} | {piped * 1e6:.1f} |",
                flush=True,
            )


def empty_launches(n=64, reps=20):
    import jax_triton as jt

    from cuda_triton_bridge.ffi_target import custom_call_target, install
    from cuda_triton_bridge.tune import touch_kernel

    install()
    touch = touch_kernel()

    def chain(**kw):
        def f(x):
            for _ in range(n):
                x = jt.triton_call(
                    x, kernel=touch, out_shape=jax.ShapeDtypeStruct((1,), jnp.int32), grid=(1,), **kw
                )
            return x

        return jax.jit(f)

    def xla_chain(x):
        for _ in range(n):
            x = jax.lax.optimization_barrier(x + 1)  # the barrier keeps XLA from fusing the adds
        return x

    variants = {
        "jax-triton legacy call": chain(),
        "legacy + 64 KiB opaque metadata": chain(serialized_metadata=os.urandom(64 << 10)),
        "typed FFI target": chain(custom_call_target_name=custom_call_target(True)),
        "XLA ops (x + 1)": jax.jit(xla_chain),
    }
    x = jnp.zeros((1,), jnp.int32)
    print("| variant | us per launch |")
    print("|---|---|")
    for name, program in variants.items():
        out = program(x)
        assert int(out[0]) == n, (name, out)  # every launch ran
        print(f"| {name} | {bk.time_runs(lambda p=program: p(x), reps)[0] / n * 1e6:.2f} |", flush=True)


def pad_triton_opaque(kib):
    """Add a column 'triton_padded': the triton column with `kib` KiB of extra opaque metadata per launch.
    jaxlib hashes and compares the whole opaque per launch (the empty-kernel table prices it), so this
    adds host time only: if the chain's marginal time per call rises by that much, the host is the
    bottleneck; if not, the GPU is."""
    import jax_triton as jt

    from cuda_triton_bridge import decode

    pad = os.urandom(kib << 10)

    class PaddedJaxTriton:  # decode.py's `jt` with the metadata bound (this process only)
        def __getattr__(self, name):
            return getattr(jt, name)

        @staticmethod
        def triton_call(*args, **kw):
            return jt.triton_call(*args, serialized_metadata=pad, **kw)

    base = bk.columns
    padded = decode.longflow_decode_attention_triton

    def columns(scale, **kw):
        cols = base(scale, **kw)

        def call(*args, **kwargs):
            decode.jt = PaddedJaxTriton()
            try:
                return padded(*args, scale=scale, **kwargs)
            finally:
                decode.jt = jt

        cols["triton_padded"] = call
        return cols

    bk.columns = columns


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", default="1x2048,16x2048")
    parser.add_argument("--columns", default="xla_attn,triton")
    parser.add_argument("--calls", type=int, default=32)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--skip-empty", action="store_true", help="skip the empty-kernel table")
    parser.add_argument(
        "--pad-opaque",
        type=int,
        default=0,
        help="KiB of metadata added to each launch's opaque: a 'triton_padded' column (host-bound test)",
    )
    args = parser.parse_args(argv)
    if jax.devices()[0].platform != "gpu":
        raise SystemExit("probe_launch_cost.py needs a GPU")
    flags = os.environ.get("XLA_FLAGS")
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, XLA_FLAGS={flags}")
    if not args.skip_empty:
        empty_launches()
    if args.pad_opaque:
        pad_triton_opaque(args.pad_opaque)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    chain_scaling(sizes, args.columns.split(","), args.calls, args.reps)


if __name__ == "__main__":
    main()
