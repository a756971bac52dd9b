"""scripts/ab_kernels.py's plumbing on CPU: the before-module is loaded from a file and is in force while
its column is traced and compiled, and only then (the timing itself needs a GPU)."""

from __future__ import annotations

import functools
import os
import sys
import types

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import ab_kernels as ab  # noqa: E402
import bench_kernels as bk  # noqa: E402


def test_load_module_imports_a_file_under_a_name(tmp_path):
    path = tmp_path / "k.py"
    path.write_text("VERSION = 'before'\n")
    module = ab.load_module(str(path))
    assert module.__name__ == "kernels_before" and module.VERSION == "before"


def test_attribute_is_restored_after_the_block_and_on_an_error():
    owner = types.SimpleNamespace(kernels="after")
    with ab.attribute(owner, "kernels", "before"):
        assert owner.kernels == "before"
    assert owner.kernels == "after"
    with pytest.raises(RuntimeError), ab.attribute(owner, "kernels", "before"):
        raise RuntimeError
    assert owner.kernels == "after"


def test_each_column_traces_under_its_own_kernels():
    scale = bk.HEAD_DIM**-0.5
    sets = bk.make_sets(2, 64, 2)
    owner = types.SimpleNamespace(kernels="after")
    seen = {}
    reference = bk.columns(scale)["xla_longflow"]

    def column(name):
        def fn(*args):
            seen.setdefault(name, set()).add(owner.kernels)  # at trace time
            return reference(*args)

        return fn

    columns = [("old", column("old"), "before"), ("new", column("new"), None)]
    runs = ab.entries(sets, scale, columns, functools.partial(ab.attribute, owner, "kernels"), loops=1)
    assert seen == {"old": {"before"}, "new": {"after"}} and owner.kernels == "after"
    assert set(runs) == {"old", "new"} and all(n == bk.MIN_CALLS_PER_PROGRAM for _, n in runs.values())
    q_last, evicts = runs["old"][0]()  # compiled: runs without tracing again
    assert len(evicts) == bk.MIN_CALLS_PER_PROGRAM and seen["old"] == {"before"}


def test_main_needs_a_gpu(tmp_path):
    before = tmp_path / "k.py"
    before.write_text("")
    if bk.jax.devices()[0].platform == "gpu":
        pytest.skip("on a GPU main() runs the A/B")
    with pytest.raises(SystemExit, match="needs a GPU"):
        ab.main(["--before", str(before)])
