"""longflow-eval: answer extraction and scoring on hand-written cases, and the harness end to end."""

import json
import os
from fractions import Fraction

import pytest
from test_batch import poison_embedding

from longflow_jax import eval_math, jsonl_io
from longflow_jax.eval_math import answers_match, extract_answer, last_boxed, reference_answer, to_number


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the answer is \boxed{42}.", "42"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{x^{2} + \frac{a}{b_{1}}}", r"x^{2} + \frac{a}{b_{1}}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close it
        (r"$\boxed{\left( 3, \frac{\pi}{2} \right)}$", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed 7$", "7"),
        (r"\fbox{B}", "B"),
        (r"\boxed{3} and then a cut-off \boxed{\frac{1}{", "3"),  # the unclosed last one is skipped
        (r"\boxed{}", ""),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_last_boxed_none():
    assert last_boxed("no box here") is None
    assert last_boxed(r"\boxed{never closed") is None
    assert last_boxed(r"\boxedx{1}") is None  # another command


@pytest.mark.parametrize(
    "text, answer, how",
    [
        (r"Reasoning... \boxed{-3} #### 5", "-3", "boxed"),
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72", "####"),
        ("#### 1,234\nThat's it.", "1,234", "####"),
        ("So the answer is 18.", "18", "answer_is"),
        (r"The final answer is: \frac{3}{4}. Done", r"\frac{3}{4}", "answer_is"),
        ("She has 3 apples, eats 1, so -2.5 remain", "-2.5", "last_number"),
        ("costs $1,250.75 total", "1,250.75", "last_number"),
        ("half is 1/2", "1/2", "last_number"),
        ("no digits at all", None, "none"),
        ("", None, "none"),
    ],
)
def test_extract_answer(text, answer, how):
    assert extract_answer(text) == (answer, how)


@pytest.mark.parametrize(
    "answer, reference",
    [
        ("Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18", "18"),
        ("#### 1,000", "1,000"),
        (r"The area is $\pi r^2 = \boxed{4\pi}$.", r"4\pi"),
        (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt{3}}{2}"),
        (" 5 ", "5"),
        (12, "12"),
    ],
)
def test_reference_answer(answer, reference):
    assert reference_answer(answer) == reference


@pytest.mark.parametrize(
    "prediction, reference",
    [
        ("42", "42"),
        ("42.0", "42"),
        ("42.", "42"),
        ("1,000", "1000"),
        ("$1,000", "1000"),
        (r"\$1,000.00", "1000"),
        ("18 dollars", "18"),
        (r"5 \text{ cm}^2", "5"),
        (r"5\text{ inches}", "5"),
        (r"90^\circ", "90"),
        (r"90^{\circ}", "90"),
        ("90°", "90"),
        (r"25\%", "25"),
        ("25%", "25"),
        ("-7", "-7"),
        ("\u22127", "-7"),  # unicode minus
        ("0.5", r"\frac{1}{2}"),
        (".5", r"\frac12"),
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\tfrac{3}{4}", "0.75"),
        ("3/4", r"\frac{3}{4}"),
        ("-1/2", r"-\frac{1}{2}"),
        (r"\frac{-1}{2}", r"-\frac{1}{2}"),
        (r"\frac{6}{4}", "1.5"),
        (r"\frac{1}{2}", r"\frac12"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        ("(1, 2.0)", "(1,2)"),
        (r"\left[ -1, \frac{1}{2} \right)", "[-1, 0.5)"),
        (r"\text{(B)}", "B"),
        ("(C)", r"\text{C}"),
        ("x = 5", "5"),
        (r"2 \sqrt{3}", r"2\sqrt3"),
        (r"\frac{\sqrt{3}}{2}", r"\dfrac{\sqrt3}{2}"),
        (r"3\pi", r"3 \pi"),
        (r"\{1, 2\}", r"\{1,2\}"),
        (r"10\,000", "10000"),
        ("x^2 + 2x + 1", "x^2+2x+1"),
    ],
)
def test_equal_answers_match(prediction, reference):
    assert answers_match(prediction, reference)
    assert answers_match(reference, prediction)


@pytest.mark.parametrize(
    "prediction, reference",
    [
        ("12", "21"),
        ("-5", "5"),
        ("5", "-5"),
        ("0.5", "5"),
        ("1/2", "2"),
        (r"\frac{1}{2}", r"\frac{2}{1}"),
        (r"\frac{1}{3}", "0.33"),  # scoring is exact: a rounded decimal is not the fraction
        (r"\frac{1}{3}", "0.333333"),
        ("2x", "2"),
        (r"2\sqrt{3}", "2"),
        (r"\sqrt{2}", "2"),
        ("(1, 2)", "(2, 1)"),
        ("[1, 2]", "(1, 2)"),
        ("(1, 2)", "(1, 2, 3)"),
        ("1,2", "12"),  # a list, not a thousands separator
        ("10", "100"),
        ("25%", "0.25"),
        ("A", "B"),
        (r"3\pi", r"3"),
        ("x^2+1", "x^2-1"),
        (None, "5"),
        ("", "5"),
        ("5", ""),
    ],
)
def test_different_answers_do_not_match(prediction, reference):
    assert not answers_match(prediction, reference)
    if prediction is not None:
        assert not answers_match(reference, prediction)


def test_extract_then_score_gsm8k_style():
    reference = reference_answer("16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars.\n#### 18")
    assert answers_match(extract_answer(r"She makes $18 a day. \boxed{\$18}")[0], reference)
    assert answers_match(extract_answer("... so she earns 18 dollars every day.")[0], reference)
    assert not answers_match(extract_answer("... 9 * 2 = 19. She makes 19.")[0], reference)


def test_to_number():
    assert to_number("1,234.5") == Fraction(2469, 2)
    assert to_number(r"-\frac{3}{4}") == -0.75
    assert to_number(r"\frac{1}{0}") is None
    assert to_number(r"\sqrt{2}") is None and to_number("x") is None and to_number("1,23") is None


def test_to_number_counts_any_number_of_leading_signs():
    # a degenerate answer of a small-budget run: thousands of signs, no RecursionError
    assert to_number("-" * 5001 + "3") == -3 and to_number("+-" * 5000 + r"\frac{1}{2}") == Fraction(1, 2)
    assert to_number("-+" * 3000 + "-1/4") == Fraction(-1, 4) and to_number("-" * 3000) is None
    assert answers_match("-" * 4000 + "7", "7") and not answers_match("-" * 4001 + "7", "7")


def test_runs_and_table():
    runs = eval_math.runs_for(["full", "longflow", "h2o"], [64, 128])
    assert runs == [("full", None), ("longflow", 64), ("longflow", 128), ("h2o", 64), ("h2o", 128)]
    with pytest.raises(ValueError, match="unknown policy"):
        eval_math.runs_for(["snap"], [64])
    results = {("full", None): 3, ("longflow", 64): 1, ("longflow", 128): 2}
    table = eval_math.accuracy_table(results, ["full", "longflow"], [64, 128], 4)
    assert table.splitlines() == [
        "| policy | budget 64 | budget 128 |",
        "|---|---:|---:|",
        "| full | 75.0 (3/4) | 75.0 (3/4) |",
        "| longflow | 25.0 (1/4) | 50.0 (2/4) |",
    ]


PROBLEMS = [
    {"id": "g1", "question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {
        "id": "m1",
        "problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?",
        "solution": "It is $\\boxed{\\frac34}$.",
    },
    {"question": "No id: 2 + 2?", "answer": "4"},
    {"id": "bad", "question": "no answer"},
]


def test_harness_end_to_end(chat_ckpt, tmp_path, capsys):
    inp = tmp_path / "problems.jsonl"
    # shortest first: the batches run longest first, the rows come back in this order
    inp.write_text("".join(json.dumps(PROBLEMS[i]) + "\n" for i in (2, 1, 0, 3)))
    out, table = tmp_path / "rows.jsonl", tmp_path / "table.md"
    argv = ["--ckpt", chat_ckpt, "--input", str(inp), "--output", str(out), "--table", str(table)]
    argv += ["--policies", "full,longflow", "--budgets", "32,64", "--max-new-tokens", "6", "--quiet"]
    assert eval_math.main(argv) == 0
    captured = capsys.readouterr()
    assert "line 4 (id 'bad'): needs a non-empty 'answer'" in captured.err
    assert "| policy | budget 32 | budget 64 |" in captured.out and "| longflow |" in captured.out
    assert table.read_text().startswith("| policy | budget 32 | budget 64 |")
    template = f"prompt template (--prompt-template): {eval_math.DEFAULT_PROMPT!r}"
    assert template in captured.out and template in table.read_text()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["policy"], r["budget"], r["id"]) for r in rows] == [
        (policy, budget, i)
        for policy, budget in eval_math.runs_for(["full", "longflow"], [32, 64])
        for i in (1, "m1", "g1")
    ]
    refs = {r["id"]: r["reference"] for r in rows}
    assert refs == {"g1": "7", "m1": r"\frac34", 1: "4"}  # the id-less problem is named by its line
    for r in rows:
        assert r["completion_tokens"] <= 6 and r["correct"] == answers_match(r["prediction"], r["reference"])
        assert r["extracted_by"] in ("boxed", "####", "answer_is", "last_number", "none")


def test_nonfinite_reference_answers_are_malformed_lines(tmp_path):
    path = tmp_path / "problems.jsonl"
    lines = ['{"question": "q", "answer": 7}', '{"question": "q", "answer": NaN}']
    lines += ['{"question": "q", "answer": -Infinity}', '{"question": "q", "answer": 1e400}']
    path.write_text("\n".join(lines) + "\n")
    records, skipped = jsonl_io.read_jsonl_records(str(path), eval_math.validate_problem, id_from_line=True)
    assert [(r.id, r.data) for r in records] == [(1, ("q", "7"))]
    assert [(s.line, s.reason) for s in skipped] == [
        (2, "bad JSON (NaN is not valid JSON)"),
        (3, "bad JSON (-Infinity is not valid JSON)"),
        (4, "bad JSON (number 1e400 overflows to inf)"),
    ]


def test_a_problem_with_nan_logits_is_an_error_row_scored_wrong(chat_ckpt, tmp_path, monkeypatch, capsys):
    poison_embedding(chat_ckpt, "Z", monkeypatch)
    inp = tmp_path / "problems.jsonl"
    inp.write_text(
        json.dumps(PROBLEMS[0]) + "\n" + json.dumps({"id": "z", "question": "Zero?", "answer": "0"})
    )
    out = tmp_path / "rows.jsonl"
    argv = ["--ckpt", chat_ckpt, "--input", str(inp), "--output", str(out), "--policies", "longflow"]
    assert eval_math.main(argv + ["--budgets", "32", "--max-new-tokens", "4", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "the logits became NaN/inf for 1 row(s) ['z']" in captured.err
    assert "1 row(s) stopped on NaN/inf logits" in captured.out
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["z"]["finish_reason"] == "error" and rows["z"]["correct"] is False
    assert rows["g1"]["finish_reason"] in ("stop", "length")


def test_an_existing_output_is_refused_unless_overwrite(chat_ckpt, tmp_path, capsys):
    inp = tmp_path / "problems.jsonl"
    inp.write_text(json.dumps(PROBLEMS[0]) + "\n")
    out = tmp_path / "rows.jsonl"
    out.write_text("someone's rows\n")
    argv = ["--ckpt", chat_ckpt, "--input", str(inp), "--output", str(out), "--policies", "longflow"]
    argv += ["--budgets", "32", "--max-new-tokens", "4", "--quiet"]
    assert eval_math.main(argv) == 2
    err = capsys.readouterr().err
    assert f"longflow-eval: error: --output {out} exists: pass --overwrite to replace it" in err
    assert out.read_text() == "someone's rows\n"
    assert eval_math.main(argv + ["--overwrite"]) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["g1"]


def test_an_output_that_is_the_input_is_refused_even_with_overwrite(chat_ckpt, tmp_path, capsys):
    inp = tmp_path / "problems.jsonl"
    inp.write_text(json.dumps(PROBLEMS[0]) + "\n")
    os.symlink(inp, tmp_path / "link.jsonl")
    for out in (str(inp), str(tmp_path / "link.jsonl")):
        argv = ["--ckpt", chat_ckpt, "--input", str(inp), "--output", out, "--overwrite", "--quiet"]
        assert eval_math.main(argv + ["--budgets", "32", "--max-new-tokens", "4"]) == 2
        err = capsys.readouterr().err
        assert f"--output {out} is the same file as --input {inp}: the run would replace the problems" in err
        assert inp.read_text() == json.dumps(PROBLEMS[0]) + "\n"


def test_a_table_that_is_the_input_or_output_is_refused(chat_ckpt, tmp_path, capsys):
    inp, out = tmp_path / "problems.jsonl", tmp_path / "rows.jsonl"
    inp.write_text(json.dumps(PROBLEMS[0]) + "\n")
    # An output the run has not created yet is the table's path all the same: the table, written last,
    # replaced the rows.
    argv = ["--ckpt", chat_ckpt, "--input", str(inp), "--output", str(out), "--table", str(out)]
    assert eval_math.main(argv + ["--quiet", "--budgets", "32", "--max-new-tokens", "4"]) == 2
    assert f"--table {out} is the same file as --output" in capsys.readouterr().err
    assert not out.exists()
    for table, flag in ((inp, "input"), (out, "output")):
        out.write_text("mine\n")
        argv = ["--ckpt", chat_ckpt, "--input", str(inp), "--output", str(out), "--table", str(table)]
        argv += ["--overwrite", "--quiet", "--budgets", "32", "--max-new-tokens", "4"]
        assert eval_math.main(argv) == 2
        assert f"--table {table} is the same file as --{flag}" in capsys.readouterr().err
        assert inp.read_text() == json.dumps(PROBLEMS[0]) + "\n" and out.read_text() == "mine\n"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budgets", "0"], "--budgets must all be >= 2 (KV slots per layer), got '0'"),
        (["--budgets", "64,-1"], "--budgets must all be >= 2 (KV slots per layer), got '64,-1'"),
        (["--budgets", "64,x"], "--budgets expects a comma-separated list of int, got '64,x'"),
        (["--budgets", ","], "--budgets expects a comma-separated list of int, got ','"),
        (["--policies", "snap"], "unknown policy 'snap'"),
        (["--limit", "-1"], "--limit must be >= 1, got -1"),
        (["--limit", "0"], "--limit must be >= 1, got 0"),
        (["--temperature", "nan"], "--temperature must be 0 (greedy) or a finite number >= 1e-06, got nan"),
        (["--top-p", "-1"], "--top-p must be in (0, 1], got -1.0"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1, got -1"),
        (["--ckpt", "/nope"], "--ckpt '/nope': it does not exist"),
        (["--input", "/nope.jsonl"], "No such file or directory"),
        (["--input", "EMPTY"], "no problems to evaluate in"),
        (["--output", "problems.jsonl/rows.jsonl"], "File exists"),  # a file where its folder goes
        (["--prompt-template", "Solve: {problem}"], "--prompt-template must contain the field {question}"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be a finite number > 0, got 0.0"),
        (["--stop-token-ids", "999"], "--stop-token-ids must be < the model's vocab_size 128, got [999]"),
    ],
)
def test_bad_arguments_and_inputs_are_one_clear_error(
    chat_ckpt, tmp_path, monkeypatch, capsys, extra, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "problems.jsonl").write_text(json.dumps(PROBLEMS[0]) + "\n")
    (tmp_path / "EMPTY").write_text("")
    argv = ["--ckpt", chat_ckpt, "--input", "problems.jsonl", "--output", "rows.jsonl", "--quiet"]
    assert eval_math.main(argv + ["--max-new-tokens", "4", "--budgets", "32", *extra]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert line.startswith("longflow-eval: error: ") and message in line
    assert "Traceback" not in err and not (tmp_path / "rows.jsonl").exists()


def test_every_runs_budget_is_checked_before_any_row_is_written(chat_ckpt, tmp_path, capsys):
    # The full cache's rows were written, then the budget the model cannot take failed its run; the
    # leftover output then refused the corrected command.
    inp, out = tmp_path / "problems.jsonl", tmp_path / "rows.jsonl"
    inp.write_text(json.dumps(PROBLEMS[0]) + "\n")
    argv = [
        "--ckpt",
        chat_ckpt,
        "--input",
        str(inp),
        "--output",
        str(out),
        "--quiet",
        "--max-new-tokens",
        "4",
    ]
    assert eval_math.main(argv + ["--policies", "full,longflow", "--budgets", "100000"]) == 2
    assert "budget 100000 is larger than the model's max length" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "text, answer",
    [
        ("The answer is **42**.", "42"),
        ("So the answer is 42, since 6*7=42.", "42"),
        ("The answer is __7__", "7"),
        ("The answer is 3/4; so", "3/4"),
        ("The answer is (1, 2).", "(1, 2)"),  # a pair keeps its comma
        ("The answer is 1,000 apples.", "1,000 apples"),  # a thousands comma is no clause
    ],
)
def test_answer_is_reads_emphasis_and_a_number_before_a_clause(text, answer):
    assert eval_math.extract_answer(text) == (answer, "answer_is")
