"""Batch 1: can a different epilogue / split count / block size of the Triton kernel beat XLA's attention?

Latency and throughput (bench_kernels' two timings) of every (epilogue, num_splits, block_c) in
{fused, separate} x {1, 2, 4, 8} x {64, 128} against the default and XLA, at B = 1, C in {2048, 4096,
8192}, Qwen3-8B heads. Every variant is checked against the reference first. GPU only.

  python3 scripts/sweep_small_batch.py
"""

import functools
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_kernels as bk  # noqa: E402

import cuda_triton_bridge as ctb  # noqa: E402
from cuda_triton_bridge.config import DecodeShape, resolve_config  # noqa: E402


def main():
    scale = 1 / math.sqrt(128)
    cols = bk.columns(scale)
    for C in (2048, 4096, 8192):
        sets = bk.make_sets(1, C, bk.n_sets_for(1, C))
        shape = DecodeShape(1, 32, 8, C, 128, 2)
        d = resolve_config(shape)
        print(
            f"C={C} default: {d.epilogue}, splits {d.num_splits}, block_c {d.block_c}, warps {d.num_warps}",
            flush=True,
        )
        variants = {"xla_attn": cols["xla_attn"], "triton default": cols["triton"]}
        for ep in ("fused", "separate"):
            for sp in (1, 2, 4, 8):
                for bc in (64, 128):
                    variants[f"{ep} splits {sp} block_c {bc}"] = functools.partial(
                        ctb.longflow_decode_attention_triton,
                        scale=scale,
                        epilogue=ep,
                        num_splits=sp,
                        block_c=bc,
                    )
        for name, fn in variants.items():
            try:
                bk.check_column(name, fn, sets[0], scale)
                lat, _ = bk.time_column(fn, sets, 10)
                thr, _ = bk.time_column(fn, sets, 5, queued=4)
            except Exception as e:
                print(f"  {name}: FAILED {type(e).__name__} {str(e)[:200]}", flush=True)
                continue
            print(f"  {name:32s} latency {lat * 1e6:6.1f} us  throughput {thr * 1e6:6.1f} us", flush=True)


if __name__ == "__main__":
    main()
