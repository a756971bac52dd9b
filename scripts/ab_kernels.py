"""A/B of two versions of the Triton kernels in one interleaved run (GPU only).

A kernel change measured against the previous session's tables is confounded by the machine: the H100s
of one session differ by up to 3%. This times both versions in one run, round-robin: `--before` is an
earlier `cuda_triton_bridge/kernels.py` (e.g. `git show REV:cuda_triton_bridge/kernels.py > before.py`),
which stands in for the package's kernels module while its column is traced and compiled. Columns, all
on persistent tickets and in the fori_loop form (`bench_kernels.py --loops`), each checked against the
jnp reference first: XLA's attention, the current kernels without scoring, the before and the after
kernels with scoring. Prints us per call and the overhead over the no-scoring column.

  python3 scripts/ab_kernels.py --before before.py --sizes 16x2048,16x8192 --names "old,new"
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_kernels as bk  # noqa: E402


def load_module(path, name="kernels_before"):
    """The Python module at `path`, imported under `name` (a file, so Triton can read its source)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def attribute(owner, name, value):
    """owner.name = value inside the block, restored after it (also on an error)."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def entries(sets, scale, columns, swap, loops):
    """{name: (run, calls per run)} for time_interleaved; columns = [(name, fn, kernels or None)]: each
    is checked and compiled now, with `swap(kernels)` in force when kernels is not None."""
    runs = {}
    for name, fn, kernels in columns:
        with swap(kernels) if kernels is not None else contextlib.nullcontext():
            runs[name] = bk.interleave_entry(name, fn, sets, scale, compile_now=True, loops=loops)[1]
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--before", required=True, help="an earlier cuda_triton_bridge/kernels.py")
    parser.add_argument("--sizes", default="16x2048,16x8192")
    parser.add_argument("--names", default="before,after", help="the two columns' names")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--loops", type=int, default=8)
    args = parser.parse_args(argv)
    import jax

    if jax.devices()[0].platform != "gpu":
        raise SystemExit("ab_kernels.py needs a GPU")
    from cuda_triton_bridge import decode
    from cuda_triton_bridge import longflow_decode_attention_triton as tri

    before = load_module(args.before)
    name_before, name_after = args.names.split(",")
    scale = bk.HEAD_DIM**-0.5
    for size in args.sizes.split(","):
        batch, slots = (int(x) for x in size.split("x"))
        sets = bk.make_sets(batch, slots, bk.n_sets_for(batch, slots))
        columns = [
            ("xla_attn", functools.partial(bk.xla_attention, scale=scale), None),
            # (check_column reads a name ending in "noevict" as the -1 placeholder's column)
            ("noevict", bk._with_tickets(functools.partial(tri, scale=scale, compute_evict=False)), None),
            (name_before, bk._with_tickets(functools.partial(tri, scale=scale)), before),
            (name_after, bk._with_tickets(functools.partial(tri, scale=scale)), None),
        ]
        runs = entries(sets, scale, columns, functools.partial(attribute, decode, "kernels"), args.loops)
        res = bk.time_interleaved(runs, args.reps, queued=4)
        base = res["noevict"][0]
        for name, (t, (lo, hi)) in res.items():
            print(
                f"B={batch} C={slots} {name:22s} {t * 1e6:7.2f} us (min {lo * 1e6:.2f}, max {hi * 1e6:.2f})"
                f"  overhead {100 * (t / base - 1):5.1f}%",
                flush=True,
            )
        del sets, runs


if __name__ == "__main__":
    main()
