"""longflow-generate: the demo builds its own model; --ckpt generates from a converted checkpoint."""

import pytest
from test_batch import poison_embedding

from longflow_jax import cli


def test_demo_prints_both_caches_and_the_saving(capsys):
    argv = ["--demo", "--batch", "2", "--prompt-len", "16", "--max-new-tokens", "8", "--budget", "8"]
    assert cli.main(argv + ["--kv-quant", "int4", "--kv-quant-group", "16"]) == 0
    out = capsys.readouterr().out
    assert "longflow C=8 int4" in out and "full" in out and "saved" in out and "compile s" in out
    # prompts of 8-16 tokens + 8 new ones outgrow 8 slots
    assert (
        "policy longflow, budget 8 slots: 2 of 2 row(s) needed up to" in out
        and "so tokens were evicted" in out
    )
    assert "policy full: the cache holds every token, nothing was evicted" in out
    # The quantized run's own cache is the int4 size the planner reports beside int8's.
    row = next(line for line in out.splitlines() if line.startswith("longflow C=8 int4"))
    line = next(line for line in out.splitlines() if line.startswith("Stored quantized"))
    int4_bytes = int(line.split(" bytes at int4")[0].split()[-1].replace(",", ""))
    assert "bytes at int8" in line and row.split()[-2].replace(",", "") == str(int4_bytes)


def test_checkpoint_generates_a_text_per_prompt(chat_ckpt, capsys):
    argv = [
        "--ckpt",
        chat_ckpt,
        "--prompt",
        "hi",
        "--prompt",
        "x",
        "--max-new-tokens",
        "8",
        "--budget",
        "256",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("--- [") == 2 and "s of generation + " in out and "s of compilation" in out
    assert "policy longflow, budget 256 slots: the run fit the budget, nothing was evicted" in out
    assert cli.main(["--ckpt", chat_ckpt]) == 2  # --ckpt needs a --prompt


def test_a_prompt_of_no_tokens_is_named(chat_ckpt, capsys):
    # It failed as "batch and prompt_len must be positive ints, got 1 and 0".
    argv = ["--ckpt", chat_ckpt, "--prompt", "", "--no-chat-template", "--max-new-tokens", "4"]
    assert cli.main(argv) == 2
    assert "--prompt '' encodes to no tokens" in capsys.readouterr().err


def test_a_prompt_with_nan_logits_is_reported(chat_ckpt, monkeypatch, capsys):
    poison_embedding(chat_ckpt, "Z", monkeypatch)
    argv = [
        "--ckpt",
        chat_ckpt,
        "--prompt",
        "hi",
        "--prompt",
        "Zed",
        "--max-new-tokens",
        "4",
        "--budget",
        "8",
    ]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "--- [1] 0 tokens (stopped: the logits became NaN/inf)" in captured.out
    assert "--- [0] 4 tokens\n" in captured.out
    assert "the logits became NaN/inf for 1 row(s) [1]" in captured.err
    assert "policy longflow, budget 8 slots: 2 of 2 row(s) needed up to" in captured.out


DEMO = ["--demo", "--batch", "2", "--prompt-len", "16", "--max-new-tokens", "8", "--budget", "8"]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*DEMO, "--batch", "0"], "--batch must be >= 1, got 0"),
        ([*DEMO, "--prompt-len", "0"], "--prompt-len must be >= 1, got 0"),
        ([*DEMO, "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        ([*DEMO, "--budget", "0"], "--budget must be >= 2, got 0"),
        ([*DEMO, "--budget", "-3"], "--budget must be >= 2, got -3"),
        (
            [*DEMO, "--temperature", "nan"],
            "--temperature must be 0 (greedy) or a finite number >= 1e-06, got nan",
        ),
        (
            [*DEMO, "--temperature=-inf"],
            "--temperature must be 0 (greedy) or a finite number >= 1e-06, got -inf",
        ),
        (
            [*DEMO, "--temperature", "1e-9"],
            "--temperature must be 0 (greedy) or a finite number >= 1e-06, got 1e-09",
        ),
        ([*DEMO, "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        ([*DEMO, "--top-p", "inf"], "--top-p must be in (0, 1], got inf"),
        ([*DEMO, "--top-k", "-2"], "--top-k must be >= 0, got -2"),
        ([*DEMO, "--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--ckpt", "/nope", "--prompt", "hi"], "--ckpt '/nope': it does not exist"),
        (["--ckpt", "/", "--prompt", "hi"], "is not a complete longflow-jax checkpoint"),
        (["--ckpt", "/nope"], "--ckpt needs at least one --prompt"),
        ([*DEMO, "--prompt", "hi"], "--prompt is for --ckpt"),  # it ran the demo, exit 0
        (["--ckpt", "/nope", "--prompt", "hi", "--batch", "2"], "--batch is for --demo"),
        ([*DEMO, "--repetition-penalty", "0"], "--repetition-penalty must be a finite number > 0, got 0.0"),
        ([*DEMO, "--presence-penalty", "nan"], "--presence-penalty must be a finite number, got nan"),
        ([*DEMO, "--no-repeat-ngram-size", "-1"], "--no-repeat-ngram-size must be an int >= 0, got -1"),
        ([*DEMO, "--min-new-tokens", "-2"], "--min-new-tokens must be an int >= 0, got -2"),
        ([*DEMO, "--stop-token-ids", "3", "-1"], "--stop-token-ids must be a sequence of token ids >= 0"),
        ([*DEMO, "--stop", ""], "--stop must be a non-empty string"),
    ],
)
def test_bad_arguments_are_one_clear_error(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("longflow-generate: error: ") and message in err and "Traceback" not in err


def test_eviction_summary_counts_rows_past_the_budget_and_rkv_past_its_buffer():
    from longflow_jax.cli import eviction_summary
    from longflow_jax.config import CompressionConfig

    longflow = CompressionConfig(policy="longflow", budget=16)
    assert "nothing was evicted" in eviction_summary(longflow, [10, 4], [7, 13])  # 16 and 16 slots
    assert "1 of 2 row(s) needed up to 17 slots" in eviction_summary(longflow, [10, 4], [8, 13])
    rkv = CompressionConfig(policy="rkv", budget=16, rkv_buffer=4)
    assert "nothing was evicted" in eviction_summary(rkv, [10], [11])  # 20 slots: the buffer holds them
    assert "1 of 1 row(s)" in eviction_summary(rkv, [10], [12])  # 21 slots
    assert "1 of 1 row(s)" in eviction_summary(rkv, [17], [1])  # a prompt past the budget, at prefill


def test_a_bad_kv_quant_group_is_named_as_its_flag_before_any_work(capsys):
    # It failed as "kv_quant_group must be ..." after the demo model was built.
    assert cli.main(["--demo", "--kv-quant-group", "0"]) == 2
    captured = capsys.readouterr()
    assert "--kv-quant-group must be >= 1, got 0" in captured.err and "demo model" not in captured.out
