"""`longflow-eval fidelity` on the tiny chat checkpoint: rows, table, plot, and the identity at a budget
that holds the whole trajectory."""

import json
import sys

import jax.numpy as jnp
import pytest
from helpers import write_jsonl

import longflow_jax as lf
from longflow_jax import eval_math

PROBLEMS = [
    {"question": "What is 2 + 3?", "true_answer": "5"},
    {"question": "A farmer has 12 cows and buys 7 more. How many cows?", "true_answer": "19"},
    {"problem": "Compute 6 * 7.", "answer": "42"},
]
NEW_TOKENS = 12


def run_fidelity(tmp_path, ckpt, *extra):
    out = tmp_path / "rows.jsonl"
    argv = [
        "--ckpt", ckpt, "--input", write_jsonl(tmp_path / "p.jsonl", PROBLEMS), "--output", str(out),
        "--table", str(tmp_path / "t.md"), "--max-new-tokens", str(NEW_TOKENS), "--temperature", "1.0",
        "--seed", "3", "--quiet", "--jobs", "2", *extra,
    ]  # fmt: skip
    return eval_math.main(["fidelity", *argv]), out


def test_fidelity_rows_table_and_identity(tmp_path, chat_ckpt):
    """256 slots hold prompt + trajectory: every unquantized policy must then be the full cache exactly.
    @KV_QUANT runs the quantized buffer: a quantized full cache runs once (budget "all"), and
    quantization alone moves the model where the plain budget that holds everything does not."""
    code, out = run_fidelity(
        tmp_path, chat_ckpt, "--policies", "longflow,tova:kv_head,full@int2", "--budgets", "4,256",
        "--kv-quant-group", "8", "--plot", str(tmp_path / "f.png"),
    )  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == (2 * 2 + 1) * len(PROBLEMS)
    for r in rows:
        assert 1 <= r["steps"] <= NEW_TOKENS
        if r["budget"] == 256:
            assert r["mean_kl"] == 0.0 and r["top1_agreement"] == 1.0 and r["nll_diff"] == 0.0
            assert r["divergence_step"] is None and r["answer"] == r["full_answer"]
    small = [r for r in rows if r["budget"] == 4]
    assert max(r["mean_kl"] for r in small) > 0  # 4 slots really evict
    # K/V held by LongFlow's 4 slots: 3 at the first step (the prompt cut to budget - 1), then 4.
    config, _ = lf.load(chat_ckpt)
    itemsize = jnp.dtype(config.dtype).itemsize
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize
    for r in small:
        if r["policy"] == "longflow":
            assert r["kv_bytes"] == pytest.approx(per_token * (4 - 1 / r["steps"]))
    int2 = [r for r in rows if r["kv_quant"] == "int2"]
    assert len(int2) == len(PROBLEMS) and {r["budget"] for r in int2} == {None}
    assert max(r["mean_kl"] for r in int2) > 0
    table = (tmp_path / "t.md").read_text()
    longflow = [r for r in small if r["policy"] == "longflow"]
    held = sum(r["kv_bytes"] * r["steps"] for r in longflow) / sum(r["steps"] for r in longflow)
    assert "| tova:kv_head | 4 |" in table and f"| longflow | 4 | {held / 1024:.0f} |" in table
    assert "| 0.0000 | 100.0 | +0.0000 |" in table
    assert "| full@int2 | all |" in table
    assert (tmp_path / "f.png").stat().st_size > 0


def test_resume_reruns_only_missing_or_failed_runs_and_refuses_other_settings(
    tmp_path, chat_ckpt, monkeypatch, capsys
):
    """A failed half is rerun on --resume and the finished half of the same run is taken from the parts
    file, not measured again; the merged rows equal an uninterrupted run's."""
    from longflow_jax import fidelity, runner

    code, out = run_fidelity(tmp_path, chat_ckpt, "--policies", "streaming", "--budgets", "8")
    assert code == 0
    first = out.read_text()
    assert run_fidelity(tmp_path, chat_ckpt, "--policies", "streaming", "--budgets", "8")[0] == 2  # exists
    # A run that fails (out of memory, say) is reported; the others' rows are kept.
    real = fidelity.score_trajectory

    def fails_for_h2o(*args, compression, **kwargs):
        if any(c.policy == "h2o" for c in compression):
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
        return real(*args, compression=compression, **kwargs)

    monkeypatch.setattr(fidelity, "score_trajectory", fails_for_h2o)
    argv = ("--policies", "streaming,h2o,random", "--budgets", "8", "--resume")
    assert run_fidelity(tmp_path, chat_ckpt, *argv)[0] == 2
    err = capsys.readouterr().err
    assert "h2o budget 8 failed: RuntimeError: RESOURCE_EXHAUSTED" in err and "--resume reruns" in err
    policies = [json.loads(line)["policy"] for line in out.read_text().splitlines()]
    assert out.read_text().startswith(first) and sorted(set(policies)) == ["random", "streaming"]
    monkeypatch.setattr(fidelity, "score_trajectory", real)
    free_runs = []
    generate = runner.DataParallelGenerator.generate

    def counting(self, *args, compression, **kwargs):
        free_runs.append(compression.policy)
        return generate(self, *args, compression=compression, **kwargs)

    monkeypatch.setattr(runner.DataParallelGenerator, "generate", counting)
    assert run_fidelity(tmp_path, chat_ckpt, *argv)[0] == 0
    assert "h2o" not in free_runs and "full" in free_runs  # h2o's free half came from the parts file
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["policy"] for r in rows) == sorted(["h2o", "random", "streaming"] * len(PROBLEMS))
    fresh_dir = tmp_path / "fresh"  # its --input path differs: compare everything but the settings
    fresh_dir.mkdir()
    _, fresh = run_fidelity(fresh_dir, chat_ckpt, "--policies", "h2o", "--budgets", "8")
    strip = lambda r: {k: v for k, v in r.items() if k != "settings"}
    fresh_rows = [strip(json.loads(x)) for x in fresh.read_text().splitlines()]
    assert [strip(r) for r in rows if r["policy"] == "h2o"] == fresh_rows
    code, _ = run_fidelity(
        tmp_path, chat_ckpt, "--policies", "h2o", "--budgets", "8", "--resume", "--seed", "4"
    )
    assert code == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--policies", "full"], "uncompressed"),
        (["--policies", "longflow:rows"], "granularity"),
        (["--policies", "longflow@int3"], "kv_quant must be None or one of"),
        (["--kv-quant", "int8"], "POLICY@KV_QUANT"),
        (["--budgets", "1"], "--budgets"),
        (["--prompt-template", "no field"], "{question}"),
    ],
)
def test_bad_flags_are_named(tmp_path, chat_ckpt, capsys, flags, message):
    assert run_fidelity(tmp_path, chat_ckpt, *flags)[0] == 2
    assert message in capsys.readouterr().err


def test_an_output_or_its_parts_file_that_is_the_input_is_refused_even_with_overwrite(
    tmp_path, chat_ckpt, capsys
):
    # --overwrite emptied the problems file and wrote the rows into it.
    flags = ["--quiet", "--overwrite", "--policies", "h2o", "--budgets", "8"]
    for inp, out, name in (
        ("p.jsonl", "p.jsonl", "--output"),
        ("q.jsonl.parts", "q.jsonl", "--output's parts file"),
    ):
        inp = write_jsonl(tmp_path / inp, PROBLEMS)
        before = open(inp).read()
        argv = ["fidelity", "--ckpt", chat_ckpt, "--input", inp, "--output", str(tmp_path / out), *flags]
        assert eval_math.main(argv) == 2
        assert f"{name} " in capsys.readouterr().err.split("is the same file as --input")[0]
        assert open(inp).read() == before


def test_a_table_onto_an_output_not_yet_written_is_refused(tmp_path, chat_ckpt, capsys):
    out = tmp_path / "rows.jsonl"
    code, _ = run_fidelity(tmp_path, chat_ckpt, "--table", str(out), "--policies", "h2o", "--budgets", "8")
    assert code == 2 and f"--table {out} is the same file as --output" in capsys.readouterr().err
    assert not out.exists()


def test_stop_strings_cut_the_free_runs_and_are_part_of_the_settings(tmp_path, chat_ckpt):
    # --stop was accepted and ignored: answers came from the uncut text.
    stops = [flag for d in "0123456789" for flag in ("--stop", d)]
    code, out = run_fidelity(tmp_path, chat_ckpt, "--policies", "h2o", "--budgets", "8", *stops)
    assert code == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows and all(r["settings"]["stop"] == list("0123456789") for r in rows)
    # No digit survives a stop at every digit, so no answer is a number.
    assert not any(any(ch.isdigit() for ch in str(r["answer"] or "")) for r in rows), rows
    assert not any(any(ch.isdigit() for ch in str(r["full_answer"] or "")) for r in rows), rows


def test_flags_fidelity_cannot_honour_are_refused(tmp_path, chat_ckpt, capsys):
    # Granularity is per run (POLICY:GRANULARITY); fidelity runs on one device (no --devices / --mesh).
    assert run_fidelity(tmp_path, chat_ckpt, "--granularity", "kv_head")[0] == 2
    assert "POLICY:GRANULARITY" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_fidelity(tmp_path, chat_ckpt, "--mesh", "data=1,model=1")


def test_a_plot_without_matplotlib_is_refused_before_any_run(tmp_path, chat_ckpt, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: importing it raises
    code, out = run_fidelity(tmp_path, chat_ckpt, "--plot", str(tmp_path / "f.png"))
    assert code == 2 and "drawing needs matplotlib" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("name, flag", [("rows.jsonl", "--output"), ("t.md", "--table")])
def test_a_plot_onto_the_runs_own_file_is_refused(tmp_path, chat_ckpt, capsys, name, flag):
    # The plot is drawn last: it replaced the rows (or the table) it was drawn from.
    code, out = run_fidelity(tmp_path, chat_ckpt, "--plot", str(tmp_path / name))
    assert code == 2 and f"is the same file as {flag}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("line", ['{"id": "a", "policy": "h2o", "gran', "[1, 2]"])
def test_resume_names_a_line_that_is_no_row(tmp_path, line):
    from longflow_jax.fidelity import _finished_rows

    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a", "policy": "h2o", "settings": {}}\n' + line)
    with pytest.raises(ValueError, match=f"--resume: {path} line 2 is not one of this command's rows"):
        _finished_rows(str(path), {}, None)


def test_resume_refuses_rows_scored_along_other_trajectories():
    from longflow_jax.fidelity import check_same_trajectories
    from longflow_jax.jsonl_io import id_key

    a, b = id_key("a"), id_key("b")
    rows = [
        dict(id="a", policy="h2o", steps=5, trajectory_sha1="1f"),
        dict(id="b", policy="tova", steps=7),  # from before the fingerprint: its length is compared
    ]
    check_same_trajectories(rows, {a: "1f", b: "2e"}, {a: 5, b: 7})
    check_same_trajectories(rows, {a: "1f"}, {a: 5})  # b is not among this input's problems
    with pytest.raises(ValueError, match="problem 'a'.*\\(3c\\) differs .* h2o rows .*\\(1f\\)"):
        check_same_trajectories(rows, {a: "3c", b: "2e"}, {a: 5, b: 7})
    with pytest.raises(ValueError, match="problem 'b'.*\\(6\\) differs .* tova rows .*\\(7\\)"):
        check_same_trajectories(rows, {a: "1f", b: "2e"}, {a: 5, b: 6})


def test_resume_refuses_runs_made_on_other_problems():
    from longflow_jax.fidelity import check_same_problems

    row = lambda i, policy: dict(id=i, policy=policy, granularity="sequence", budget=8, kv_quant=None)
    done = [row("p1", "longflow"), row("p2", "longflow"), row(2, "h2o"), row("p2", "h2o")]
    check_same_problems([], ["p1", "p2", "p3"])
    check_same_problems(done[:2], ["p2", "p1"])
    with pytest.raises(
        ValueError, match=r"longflow rows \(budget 8\) .*\(1 of its problems missing, e.g. \['p3'\]"
    ):
        check_same_problems(done[:2], ["p1", "p2", "p3"])  # a problem added to the input since
    with pytest.raises(ValueError, match=r"0 of its problems missing.*1 not in it, e.g. \['p1'\]"):
        check_same_problems(done[:2], ["p2"])  # a problem dropped
    with pytest.raises(ValueError, match=r"h2o rows .* 1 not in it, e.g. \[2\]"):
        check_same_problems(done, ["p1", "p2"])  # the integer id 2 is not the string "p1"


def test_saved_parts_fit_only_these_settings_and_trajectories(tmp_path):
    from longflow_jax.fidelity import _saved_parts
    from longflow_jax.jsonl_io import id_key

    settings = {"seed": 0}
    run = ["h2o", "sequence", 8, None]

    def part(kind, sha_b, seed=0):
        problems = [
            {"id": "b", "trajectory_sha1": sha_b, "x": 2},
            {"id": "a", "trajectory_sha1": "1f", "x": 1},
        ]
        return json.dumps(dict(part=kind, run=run, settings={"seed": seed}, problems=problems))

    path = tmp_path / "rows.jsonl.parts"
    lines = [part("score", "2e"), part("free", "9d"), part("free", "2e", seed=1), part("free", "2e")[:40]]
    path.write_text("\n".join(lines))  # the last line cut short, as by a killed job
    saved = _saved_parts(str(path), {id_key("a"): "1f", id_key("b"): "2e"}, settings, thinkv=None)
    # Only the score half fits (the free halves: another trajectory of b, other settings, a cut line), in
    # input order.
    assert list(saved) == [("score", tuple(run))]
    assert [p["x"] for p in saved[("score", tuple(run))]] == [1, 2]
    assert _saved_parts(str(tmp_path / "none"), {}, settings, thinkv=None) == {}
