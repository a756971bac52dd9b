"""Profile the chained program of scripts/bench_kernels.py: where a column's time per call goes.

bench_kernels.py times one jitted chain of calls by wall clock. This traces the same chain with the
JAX profiler and splits each call's time into GPU kernel time (by kernel name) and idle GPU time (gaps
between kernels, e.g. waiting on the host's launches). GPU only.

  python3 scripts/profile_kernel_chain.py --sizes 16x2048,64x8192 --columns xla_attn,triton,triton_noevict
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_kernels as bk  # noqa: E402

from cuda_triton_bridge.tune import profile_host, profile_kernels  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", default="16x2048,16x8192,64x2048,64x8192")
    parser.add_argument("--columns", default="xla_attn,triton,triton_noevict")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--host", action="store_true", help="also list the top host-side events per call")
    args = parser.parse_args(argv)
    if jax.devices()[0].platform != "gpu":
        raise SystemExit("profile_kernel_chain.py needs a GPU")
    scale = 1 / math.sqrt(bk.HEAD_DIM)
    cols = bk.columns(scale)
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| B x C | column | wall us/call | GPU kernels us/call | idle GPU us/call | kernels (us/call) |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        batch, slots = (int(x) for x in size.split("x"))
        sets = bk.make_sets(batch, slots, bk.n_sets_for(batch, slots))
        for name in args.columns.split(","):
            program, n_calls = bk.chain_program(cols[name], sets)
            wall, _ = bk.time_program(program, n_calls, sets, reps=10)  # also compiles and warms up
            run = functools.partial(program, sets[0][0], sets)
            per, span, _, idle = profile_kernels(run, args.reps, n_calls)
            busy = sum(per.values())
            top = ", ".join(f"{k[:32]} {v:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:4])
            print(f"| {size} | {name} | {wall * 1e6:.1f} | {busy:.1f} | {idle:.1f} | {top} |", flush=True)
            if args.host:
                for event, us, count in profile_host(run, args.reps, n_calls):
                    print(f"|   host | {event[:60]} | {us:.2f} us | {count:.2f} per call | | |", flush=True)


if __name__ == "__main__":
    main()
