"""scripts/benchmark_generate.py on CPU with the tiny model: runs, records, plots, sizes batches."""

import importlib.util
import json
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "benchmark_generate.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_generate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_write_jsonl_and_plot(bench, tmp_path):
    out, png = tmp_path / "gen.jsonl", tmp_path / "gen.png"
    assert (
        bench.main(
            [
                "--model",
                "tiny",
                "--runs",
                "full:2:128",
                "longflow:2:128:32",
                "--chunk",
                "32",
                "--prompt-len",
                "16",
                "--out",
                str(out),
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["policy"] for r in rows] == ["full", "longflow"]
    full, longflow = rows
    assert full["capacity"] == 16 + 128 and longflow["capacity"] == 32
    assert longflow["kv_cache_bytes"] * (144 / 32) == full["kv_cache_bytes"]
    for r in rows:
        assert (
            r["decoded_steps"] == 128 and len(r["chunk_tokens_per_s"]) == 4 and r["decode_tokens_per_s"] > 0
        )
    assert png.stat().st_size > 1000


def test_max_batch_fills_the_memory_budget(bench):
    config = bench.MODELS["tiny"]
    params = bench.init_random_params(config)
    memory = 64 * 2**20
    sizes = {}
    for policy, budget in [("full", None), ("longflow", 128)]:
        batch = bench.max_batch(config, params, policy, 4096, budget or 2048, 64, memory)
        capacity = 64 + 4096 if policy == "full" else 128
        per_row = bench.row_bytes(config, capacity)
        used = bench.params_bytes(params) + batch * per_row
        assert used <= memory < used + per_row
        sizes[policy] = batch
    assert sizes["longflow"] > 10 * sizes["full"]
    with pytest.raises(ValueError, match="not even one row"):
        bench.max_batch(config, params, "full", 4096, 2048, 64, bench.params_bytes(params) + 1)
