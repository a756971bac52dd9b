"""One call of the Triton decode kernels per launch route, for Nsight Compute to compare (GPU only).

XLA's own Triton compiles our TTIR into kernels 2-5% slower than the triton package does (session 10,
docs/KERNEL_NOTES_triton.md), and XLA's dump holds no PTX. Run this under `ncu` and the two routes' kernels
sit side by side: registers, shared memory, DRAM bytes, duration, and the SASS. Route "pallas" runs the
Pallas kernel (Pallas' Triton backend, also built by XLA's bundled Triton) for the same comparison.

Each case is first checked against the jnp reference (bench_kernels.check_column: one more launch of each
kernel), then run twice, so ncu sees three instances of each kernel (the cases run in order; session 11's
runs predate the check and hold two);
run it with XLA_PYTHON_CLIENT_ALLOCATOR=platform, or ncu's kernel replay saves and restores the whole
preallocated pool.

  ncu --clock-control none --kernel-name regex:"decode_|longflow_" --set full -o rep \
      python3 scripts/ncu_launch_compare.py --cases 16x2048:jt,16x2048:xla,64x8192:jt,64x8192:xla
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_kernels as bk  # noqa: E402

from cuda_triton_bridge import longflow_decode_attention_triton  # noqa: E402
from pallas_kernels import longflow_decode_attention  # noqa: E402

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
ROUTES = {
    "jt": dict(xla_call=False, xla_combine=False),  # every kernel through jax-triton
    "xla": dict(xla_call=True, xla_combine=True),  # every kernel through XLA's Triton custom call
    "pallas": None,  # the Pallas kernel (Pallas' Triton backend), for its SASS beside the native one
}


def run_case(batch, slots, route, compute_evict):
    if route not in ROUTES:
        raise ValueError(f"route must be one of {sorted(ROUTES)}, got {route!r}")
    keys = jax.random.split(jax.random.PRNGKey(batch * 7 + slots), 3)
    q = jax.random.normal(keys[0], (batch, NUM_Q_HEADS, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, NUM_KV_HEADS, slots, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, NUM_KV_HEADS, slots, HEAD_DIM), jnp.bfloat16)
    valid = jnp.ones((batch, slots), bool)
    if route == "pallas":
        call = functools.partial(longflow_decode_attention, compute_evict=compute_evict)
    else:
        call = functools.partial(
            longflow_decode_attention_triton, compute_evict=compute_evict, overrides=ROUTES[route]
        )
    scale = HEAD_DIM**-0.5
    fn = jax.jit(lambda q, k, v, valid: call(q, k, v, valid, scale=scale))
    name = route if compute_evict else f"{route}_noevict"  # check_column reads the suffix
    summary = bk.check_column(name, fn, (q, k, v, valid), scale)
    for _ in range(2):
        jax.block_until_ready(fn(q, k, v, valid))
    tag = "" if compute_evict else ":noevict"
    print(f"case {batch}x{slots}:{route}{tag} [{summary}]", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--cases", default="16x2048:jt,16x2048:xla", help="BxC:route[:noevict],...")
    args = parser.parse_args()
    for case in args.cases.split(","):
        size, route, *flag = case.split(":")
        if flag not in ([], ["noevict"]):
            raise ValueError(f"a case is BxC:route or BxC:route:noevict, got {case!r}")
        batch, slots = (int(x) for x in size.split("x"))
        run_case(batch, slots, route, compute_evict=flag != ["noevict"])


if __name__ == "__main__":
    main()
