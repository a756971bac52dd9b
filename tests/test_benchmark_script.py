"""scripts/benchmark_generate.py on CPU with the tiny model: runs, records, plots, sizes batches."""

import argparse
import importlib
import importlib.util
import json
import os

import jax
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
    common = ["--model", "tiny", "--chunk", "32", "--prompt-len", "16", "--out", str(out)]
    # The whole generation on a (1, 1) mesh for two runs; ThinKV's (the costliest compile on CPU) only
    # decodes in chunks, appended to the same file.
    generate = ["--generate", "--mesh", "data=1,model=1", "--plot", str(png)]
    assert bench.main(common + generate + ["--runs", "full:2:128", "longflow:2:128:32"]) == 0
    assert bench.main(common + ["--runs", "thinkv:2:160:32"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["policy"] for r in rows] == ["full", "longflow", "thinkv"]
    full, longflow, thinkv = rows
    # ThinKV's main buffer (the prompt and one segment's window) and its tiers, as generate runs it: one
    # segment is classified in 160 steps, and its tokens move into a tier.
    assert thinkv["capacity"] == 16 + 128 and thinkv["decoded_steps"] == 160
    assert thinkv["kv_cache_bytes"] > full["kv_cache_bytes"]  # the tiers come on top of the same 144 slots
    assert full["capacity"] == 16 + 128 and longflow["capacity"] == 32
    assert longflow["kv_cache_bytes"] * (144 / 32) == full["kv_cache_bytes"]
    for r in rows:
        assert r["decoded_steps"] == r["new_tokens"] == 32 * len(r["chunk_tokens_per_s"])
        assert r["step_temp_bytes"] > 0  # the compiled chunk's working set, as XLA's analysis gives it
        assert r["step_temp_budget_bytes"] > 0  # what max_batch budgets for it
        assert r["decode_tokens_per_s"] > 0
    for r in (full, longflow):
        assert r["generate_compile_s"] > 0 and r["generate_tokens_per_s"] > 0
        assert r["generate_mesh"] == "data=1,model=1"
    assert "generate_tokens_per_s" not in thinkv
    assert png.stat().st_size > 1000


def test_max_batch_fills_the_memory_budget(bench):
    """lf.max_batch against the bytes counted by hand: params, K/V, slot bookkeeping, step working set."""
    import longflow_jax as lf

    config = bench.MODELS["tiny"]
    params = sum(x.nbytes for x in jax.tree.leaves(bench.init_random_params(config)))
    memory, layers, d = 64 * 2**20, config.num_layers, config.head_dim
    sizes = {}
    for policy, kv_quant, capacity in [
        ("full", None, 64 + 4096),
        ("longflow", None, 128),
        ("longflow", "int4", 128),
    ]:
        comp = lf.CompressionConfig(policy=policy, budget=128, kv_quant=kv_quant)
        batch = lf.max_batch(config, comp, 4096, 64, memory)
        # K and V of a slot and KV head: bf16, or int4 + f32 scales and zero points and the value's f32 norm.
        per_slot = 2 * 2 * d if kv_quant is None else 2 * (d // 2 + 2 * 4 * (d // 32)) + 4
        kv = layers * config.num_kv_heads * capacity * per_slot + layers * (2 * capacity + 1) * 4
        work = 4 * (2 * config.vocab_size + 8 * config.intermediate_size + 4 * config.num_heads * capacity)
        assert bench.step_working_set_bytes(config, comp, 4096, 64) == work
        used = params + batch * (kv + work)
        assert used <= memory < used + kv + work
        sizes[policy, kv_quant] = batch
    # ThinKV: its cache as kv_cache_bytes counts it, and one L* layer's float32 K and V of the main buffer
    # (prompt + one 128-token window) and both tiers, with its float32 logits and weights over them.
    comp = lf.CompressionConfig(policy="thinkv", budget=128)
    batch = lf.max_batch(config, comp, 4096, 64, memory)
    main, tier = 64 + 128, 128  # tier capacity: the budget (between 4 and 64 tokens a segment)
    lstar = (2 * config.num_kv_heads * d + 2 * config.num_heads) * (main + 2 * tier) * 4
    work = 4 * (2 * config.vocab_size + 8 * config.intermediate_size + 4 * config.num_heads * main)
    row = lf.kv_cache_bytes(config, comp, 1, 64, 4096) + work + lstar
    assert bench.step_working_set_bytes(config, comp, 4096, 64) == work + lstar
    assert params + batch * row <= memory < params + (batch + 1) * row
    # A ThinKV job that completes no segment (64 new tokens, a 128-token window) runs as the full cache:
    # it is budgeted as that, not as the tiers it never allocates.
    full = lf.CompressionConfig(policy="full")
    assert bench.step_working_set_bytes(config, comp, 64, 64) == bench.step_working_set_bytes(
        config, full, 64, 64
    )
    assert sizes["longflow", None] > 10 * sizes["full", None]
    assert sizes["longflow", "int4"] > sizes["longflow", None]
    with pytest.raises(ValueError, match="not even one row fits"):
        lf.max_batch(config, lf.CompressionConfig(policy="full"), 4096, 64, params + 1)


def test_fit_batch_finds_the_largest_batch_that_fits():
    """The fitting search against brute force, for needs linear, convex and with steps (as XLA's buffer
    assignment can give), from guesses below, at and above the answer."""
    gen = importlib.import_module("longflow_jax.generate")

    needs = {
        "linear": lambda b: 1000 + 37 * b,
        "convex": lambda b: 500 + 40 * b + b * b // 20,
        "steps": lambda b: 2000 + 37 * b + 64 * (b // 8),
    }
    for name, need in needs.items():
        for limit in (need(1), need(1) + 1, need(9) - 1, need(57), need(300) + 20):
            want = max(b for b in range(1, 400) if need(b) <= limit)
            for guess in (1, 2, want, want + 1, 3 * want + 5, max(1, want // 4)):  # max_batch's estimate
                calls = []
                got = gen._fit_batch(
                    lambda b, calls=calls, need=need: calls.append(b) or need(b), limit, guess
                )
                assert got == want, (name, limit, guess)
                assert len(calls) == len(set(calls)) <= gen.FIT_MAX_COMPILES
    with pytest.raises(ValueError, match="not even one row fits"):
        gen._fit_batch(needs["linear"], needs["linear"](1) - 1, 5)


def test_max_batch_fitted_to_the_compiled_program(bench, monkeypatch):
    """max_batch(attention_impl=...) against generate's compiled program: the batch it gives fits, one
    more does not; and the program's bytes hold at least the params and the cache kv_cache_bytes counts."""
    import longflow_jax as lf

    gen = importlib.import_module("longflow_jax.generate")

    config = bench.MODELS["tiny"]
    comp = lf.CompressionConfig(policy="longflow", budget=128, kv_quant="int4")
    shape = dict(prompt_len=64, max_new_tokens=512, compression=comp, attention_impl="reference")
    need = {b: gen.generate_program_bytes(config, b, **shape) for b in (8, 9)}
    params = sum(x.nbytes for x in jax.tree.leaves(bench.init_random_params(config)))
    assert need[9] > need[8] >= params + lf.kv_cache_bytes(config, comp, 8, 64, 512)
    compiles = []
    original = gen.generate_program_bytes
    monkeypatch.setattr(
        gen, "generate_program_bytes", lambda *a, **k: compiles.append(a[1]) or original(*a, **k)
    )
    limit = (need[8] + need[9]) // 2
    assert lf.max_batch(config, comp, 512, 64, limit, attention_impl="reference") == 8
    assert len(compiles) == len(set(compiles)) <= gen.FIT_MAX_COMPILES
    with pytest.raises(ValueError, match="not even one row fits"):
        lf.max_batch(config, comp, 512, 64, params, attention_impl="reference")
    with pytest.raises(TypeError, match="need attention_impl"):  # options of a compiled fit, no compile
        lf.max_batch(config, comp, 512, 64, limit, return_logprobs=True)


def test_parse_run_fields_and_errors(bench):
    comp, *rest = bench.parse_run("full:max:8192")
    assert comp.policy == "full" and rest == ["max", 8192, "reference", 8192]
    comp, *rest = bench.parse_run("longflow@int4:4:8192:1024:triton:2048")
    assert (comp.policy, comp.budget, comp.kv_quant) == ("longflow", 1024, "int4")
    assert rest == [4, 8192, "triton", 2048]
    comp, *_ = bench.parse_run("longflow@int8/128:max:8192:2048:triton:3072")
    assert (comp.kv_quant, comp.kv_quant_group) == ("int8", 128)
    assert bench.parse_run("longflow@int8:4:128")[0].kv_quant_group == bench.DEFAULT_GROUP == 32
    for bad in ["longflow@int8/:4:128", "longflow@int8/x:4:128", "longflow@/128:4:128"]:
        with pytest.raises(ValueError, match="GROUP"):
            bench.parse_run(bad)
    with pytest.raises(ValueError, match="kv_quant_group"):
        bench.parse_run("longflow@int8/0:4:128")
    bad_runs = ["full:4", "longflow:4:128:32:triton:256", "longflow:4:128:32:triton:0", "a:1:2:3:4:5:6"]
    bad_runs += ["full:4:128::triton:64"]  # no buffer-full rate to project
    for bad in bad_runs:
        with pytest.raises(ValueError, match="run"):
            bench.parse_run(bad)
    with pytest.raises(ValueError, match="kv_quant"):
        bench.parse_run("longflow@int3:4:128")
    with pytest.raises(SystemExit):  # the mesh is --generate's
        bench.main(["--runs", "full:1:8", "--mesh", "data=1,model=1"])
    # generate's own checks: a kernel runs only the policies it fuses (h2o through Pallas evicted nothing
    # and kept overwriting one slot), an IMPL is one of generate's, a BATCH is positive.
    for bad, match in [
        ("h2o:1:40:16:pallas", "fuses only the policies"),
        ("longflow:4:128:32:trtion", "attention_impl must be one of"),
        ("full:0:64", "BATCH must be a positive int or 'max', got 0"),
        ("full:-8:64", "BATCH must be a positive int or 'max', got -8"),
    ]:
        with pytest.raises(ValueError, match=match):
            bench.parse_run(bad)
    # Only whole chunks are timed: 100 steps in chunks of 64 timed 64 and called the full cache unsettled.
    with pytest.raises(SystemExit):
        bench.main(["--runs", "full:1:100", "--chunk", "64"])


def test_isolated_children_get_every_flag_but_the_runs(bench):
    # --fit-batch was dropped: every isolated BATCH=max run used the estimate.
    args = argparse.Namespace(model="tiny", prompt_len=8, chunk=16, memory_gib=None, prefill_rows=4,
                              generate=True, fit_batch=True, mesh=(1, 2))  # fmt: skip
    assert bench.child_flags(args) == [
        "--model=tiny", "--prompt-len=8", "--chunk=16", "--prefill-rows=4", "--generate", "--fit-batch",
        "--mesh", "data=1,model=2",
    ]  # fmt: skip


def test_isolated_runs_time_only_the_requested_steps(bench, tmp_path):
    """--isolate: one child process per run; STEPS caps the timed steps of a buffer sized for NEW."""
    out = tmp_path / "iso.jsonl"
    argv = ["--model", "tiny", "--chunk", "16", "--prompt-len", "8", "--out", str(out), "--isolate"]
    assert (
        bench.main(argv + ["--runs", "longflow:2:128:32:reference:48", "full:max:64", "--memory-gib", "0.05"])
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    capped, full = rows
    assert (
        capped["new_tokens"] == 128
        and capped["decoded_steps"] == 48
        and len(capped["chunk_tokens_per_s"]) == 3
    )
    assert capped["capacity"] == 32 and capped["batch"] == 2
    assert full["capacity"] == 8 + 64 and full["batch_scale"] == 1.0 and full["memory_limit_bytes"] > 0
    assert full["batch"] == bench.max_batch(
        bench.MODELS["tiny"], bench.CompressionConfig(policy="full"), 64, 8, 0.05 * 2**30
    )
    assert "--isolate" in full["command"] and "--isolate" not in full["run_command"]


def test_fit_batch_sizes_batch_max_by_the_compiled_program(bench, tmp_path):
    out = tmp_path / "fit.jsonl"
    argv = ["--model", "tiny", "--chunk", "16", "--prompt-len", "8", "--out", str(out), "--fit-batch"]
    assert bench.main(argv + ["--runs", "longflow:max:64:16", "--memory-gib", "0.02"]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    comp = bench.CompressionConfig(policy="longflow", budget=16)
    fitted = bench.max_batch(bench.MODELS["tiny"], comp, 64, 8, 0.02 * 2**30, attention_impl="reference")
    assert row["batch_fitted"] and row["batch"] == fitted
    assert fitted != bench.max_batch(bench.MODELS["tiny"], comp, 64, 8, 0.02 * 2**30)  # the estimate's


def test_buffer_full_rate_and_projection(bench, tmp_path, capsys):
    row = dict(policy="longflow", capacity=40, prompt_len=8, chunk=16, batch=2, new_tokens=128,
               decoded_steps=64, chunk_tokens_per_s=[400.0, 300.0, 100.0, 100.0])  # fmt: skip
    row["decode_tokens_per_s"] = 2 * 64 / sum(2 * 16 / t for t in row["chunk_tokens_per_s"])
    # The buffer fills after 32 decode steps: chunks 2 and 3 (steps 32..63) are buffer-full.
    assert bench.buffer_full_tokens_per_s(row) == 100.0
    whole, projected = bench.whole_run_tokens_per_s(row)
    seconds = sum(2 * 16 / t for t in row["chunk_tokens_per_s"]) + 2 * 64 / 100.0
    assert projected and whole == pytest.approx(2 * 128 / seconds)
    full = dict(row, policy="full", decoded_steps=128)
    assert bench.buffer_full_tokens_per_s(full) is None
    assert bench.whole_run_tokens_per_s(full) == (full["decode_tokens_per_s"], False)
    # ThinKV: the last chunks within 1% of the last one's rate are its settled rate, if two or more.
    assert bench.parse_run("thinkv:4:128:32:reference:64")[-1] == 64
    settled = dict(row, policy="thinkv", chunk_tokens_per_s=[400.0, 300.0, 200.0, 199.0, 200.5])
    assert bench.buffer_full_tokens_per_s(settled) == pytest.approx(3 / (1 / 200.0 + 1 / 199.0 + 1 / 200.5))
    assert bench.whole_run_tokens_per_s(settled)[1]
    unsettled = dict(row, policy="thinkv", chunk_tokens_per_s=[400.0, 300.0, 200.0, 150.0])
    assert bench.buffer_full_tokens_per_s(unsettled) is None
    assert bench.whole_run_tokens_per_s(unsettled) == (None, False)
    assert (
        bench.whole_run_tokens_per_s(dict(unsettled, decoded_steps=128))[0]
        == unsettled["decode_tokens_per_s"]
    )
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(dict(row, kv_cache_bytes=1, peak_bytes=None, ms_per_step=1.0, impl="x",
                                    budget=32, model="tiny", device="cpu", date="d")) + "\n")  # fmt: skip
    with open(path, "a") as f:
        f.write(json.dumps(dict(json.loads(path.read_text()), **unsettled)) + "\n")
    assert bench.main(["--from-jsonl", str(path), "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "(projected)" in out and "not settled" in out and (tmp_path / "p.png").stat().st_size > 1000
