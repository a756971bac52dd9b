"""Launch settings of the Triton kernel against XLA's attention at one batch size, by latency and throughput.

Every (epilogue, num_splits, block_c) of the given lists, plus the default, against xla_attn, timed as
bench_kernels does (latency: one execution per sync; throughput: 4 queued). Qwen3-8B heads (32/8, D 128),
bf16, full buffer. Every variant is checked against the reference first. GPU only.

  python3 scripts/sweep_small_batch.py                       # B = 1, C in {2048, 4096, 8192}
  python3 scripts/sweep_small_batch.py --batch 16 --slots 2048 --splits 1,2,4 --block-c 32,64,128
"""

import argparse
import functools
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_kernels as bk  # noqa: E402

import cuda_triton_bridge as ctb  # noqa: E402
from cuda_triton_bridge.config import DecodeShape, resolve_config  # noqa: E402


def _ints(text):
    return [int(v) for v in text.split(",")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--slots", default="2048,4096,8192")
    parser.add_argument("--epilogues", default="fused,separate")
    parser.add_argument("--splits", default="1,2,4,8")
    parser.add_argument("--block-c", default="64,128")
    args = parser.parse_args(argv)
    scale = 1 / math.sqrt(bk.HEAD_DIM)
    cols = bk.columns(scale)
    for slots in _ints(args.slots):
        sets = bk.make_sets(args.batch, slots, bk.n_sets_for(args.batch, slots))
        d = resolve_config(DecodeShape(args.batch, bk.NUM_Q_HEADS, bk.NUM_KV_HEADS, slots, bk.HEAD_DIM, 2))
        print(
            f"B={args.batch} C={slots} default: {d.epilogue}, splits {d.num_splits}, block_c {d.block_c}, "
            f"warps {d.num_warps}",
            flush=True,
        )
        variants = {"xla_attn": cols["xla_attn"], "triton default": cols["triton"]}
        for epilogue in args.epilogues.split(","):
            for splits in _ints(args.splits):
                for block_c in _ints(args.block_c):
                    variants[f"{epilogue} splits {splits} block_c {block_c}"] = functools.partial(
                        ctb.longflow_decode_attention_triton,
                        scale=scale,
                        epilogue=epilogue,
                        num_splits=splits,
                        block_c=block_c,
                    )
        for name, fn in variants.items():
            try:
                bk.check_column(name, fn, sets[0], scale)
                latency, _ = bk.time_column(fn, sets, 10)
                throughput, _ = bk.time_column(fn, sets, 5, queued=4)
            except Exception as e:  # an illegal combination: report it and go on
                print(f"  {name}: FAILED {type(e).__name__} {str(e)[:200]}", flush=True)
                continue
            print(f"  {name:32s} latency {latency * 1e6:6.1f} us  throughput {throughput * 1e6:6.1f} us")


if __name__ == "__main__":
    main()
