"""Compare the PTX that XLA's own Triton makes of our kernels (xla_call launch) with the triton package's.

The same TTIR goes through two compilers: the `triton` package (jax-triton's launch) and the Triton that
XLA bundles (the xla_call override). This dumps XLA's PTX for one decode call, compiles the same launch
plan with the triton package, and prints for each kernel the PTX features that decide its speed (L2
cache hints, discards, async copies, wide loads, local memory) and ptxas' register and spill report for
both. GPU machine only (it compiles through jax on the GPU). In session 10 (jax 0.11.2) XLA's dump held no
PTX, so only the triton package's side printed: see docs/KERNEL_NOTES_triton.md.

  python3 scripts/xla_triton_ptx.py --batch 64 --slots 8192 [--epilogue fused]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

FEATURES = {
    "L2::evict_last": r"L2::evict_last|createpolicy[^;]*evict_last",
    "L2::cache_hint": r"L2::cache_hint",
    "discard.global.L2": r"discard\.global\.L2",
    "cp.async": r"cp\.async\.(?:ca|cg)",
    "cp.async.bulk": r"cp\.async\.bulk",
    "ld.global.v4": r"ld\.global[.a-zA-Z0-9:_]*\.v4",
    "st.global": r"st\.global",
    "mma/wgmma": r"\b(?:mma\.sync|wgmma\.mma_async)",
    ".local": r"\.local\b",
}


def entries(ptx: str) -> dict[str, str]:
    """{entry name: a PTX module holding only that entry} for every kernel of a PTX module."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"(?:\.visible\s+)?\.entry\s+(\w+)", ptx)]
    header = ptx[: starts[0][0]] if starts else ""
    out = {}
    for i, (pos, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(ptx)
        out[name] = header + ptx[pos:end]
    return out


def features(text: str) -> str:
    return ", ".join(f"{k} {len(re.findall(v, text))}" for k, v in FEATURES.items())


def xla_kernel_report(ptx_text: str, arch: str) -> dict:
    """ptxas (the triton package's) on XLA's PTX, then the same cuobjdump report as the offline compile."""
    import triton

    from pallas_kernels.triton_offline import cubin_bytes_report

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx_text)
        run = subprocess.run([ptxas, f"--gpu-name={arch}", src, "-o", dst], capture_output=True, text=True)
        if run.returncode != 0:
            return {"ptxas": f"failed: {run.stderr[-300:]}"}
        with open(dst, "rb") as f:
            return cubin_bytes_report(f.read())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8192)
    parser.add_argument(
        "--epilogue", default=None, help="fused / separate / coop; default: the measured choice"
    )
    args = parser.parse_args(argv)

    dump = tempfile.mkdtemp(prefix="xla_dump_")
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}"
    import jax
    import jax.numpy as jnp

    from cuda_triton_bridge import longflow_decode_attention_triton
    from cuda_triton_bridge.offline import compile_plan

    b, hq, hkv, c, d = args.batch, 32, 8, args.slots, 128
    q = jax.ShapeDtypeStruct((b, hq, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, hkv, c, d), jnp.bfloat16)
    valid = jax.ShapeDtypeStruct((b, c), jnp.bool_)
    fn = jax.jit(
        lambda *a: longflow_decode_attention_triton(
            *a, scale=d**-0.5, epilogue=args.epilogue, overrides=dict(xla_call=True)
        )
    )
    fn.lower(q, kv, kv, valid).compile()
    print(f"{b}x{c}, epilogue {args.epilogue or 'default'}; XLA dump {dump}")
    ptx_files = sorted(glob.glob(os.path.join(dump, "*.ptx")))
    if not ptx_files:  # jax 0.11.2 on the H100 (session 10), also with --xla_gpu_dump_llvmir
        print("XLA's dump holds no PTX: nothing to compare on XLA's side")
    for path in ptx_files:
        ptx = open(path).read()
        arch = re.search(r"\.target\s+(\w+)", ptx).group(1)
        for name, text in entries(ptx).items():
            if "decode" in name:
                print(f"XLA    {name} ({arch}): {features(text)}")
                print(f"       {xla_kernel_report(text, arch)}")
    print("triton package (jax-triton's launch), the same plan:")
    import triton

    if not triton.knobs.cache.dir:  # the GPU machine gives triton no cache dir by default
        triton.knobs.cache.dir = tempfile.mkdtemp(prefix="triton_cache_")
    reports = compile_plan(b, hq, hkv, c, d, epilogue=args.epilogue, with_ptx=True)
    for name, report in reports.items():
        print(f"triton {name}: {features(report.pop('ptx'))}")
        print(f"       {report}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
