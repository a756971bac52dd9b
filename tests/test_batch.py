"""longflow-batch end to end: skips and reports bad records, resumes, shards per process, 4 CPU devices."""

import importlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import jax.numpy as jnp
import pytest
from helpers import write_jsonl

from longflow_jax import batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GOOD = [
    {"id": 1, "prompt": "What is 2+2?"},
    {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]},
    # the tiny model ends this one with <|im_end|> after 5 tokens (budget 32)
    {
        "id": 4,
        "prompt": "A much longer prompt that goes on and on and on and on for quite a while, "
        "to land in another bucket.",
    },
    {"id": 5, "prompt": "x"},
    {"id": "e", "prompt": "Tell me a story about a cat."},
]


def read_rows(path):
    return [json.loads(line) for line in open(path)]


def run_batch(ckpt, inp, out, *extra):
    argv = ["--ckpt", ckpt, "--input", inp, "--output", out, "--max-new-tokens", "8", "--budget", "32"]
    return batch.main(argv + ["--batch-size", "2", "--quiet", *extra])


def test_generates_skips_reports_and_resumes(chat_ckpt, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [*GOOD[:3], "oops", {"id": 1, "prompt": "dup"}, *GOOD[3:]])
    out = str(tmp_path / "out.jsonl")
    assert run_batch(chat_ckpt, inp, out) == 0
    captured = capsys.readouterr()
    assert "line 4: bad JSON" in captured.err and "line 5 (id 1): duplicate id" in captured.err
    assert "5 prompts" in captured.out and "2 skipped" in captured.out
    rows = read_rows(out)
    assert sorted(map(str, (r["id"] for r in rows))) == sorted(str(g["id"]) for g in GOOD)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_ckpt)
    for r in rows:
        keys = {"id", "text", "prompt_tokens", "completion_tokens", "finish_reason", "seconds", "settings"}
        assert set(r) == keys
        assert r["completion_tokens"] == 8 if r["finish_reason"] == "length" else r["completion_tokens"] < 8
    # Plain prompts go through the chat template as one user message; messages as they are.
    by_id = {r["id"]: r for r in rows}
    assert by_id[4]["finish_reason"] == "stop" and by_id[4]["completion_tokens"] == 5
    as_chat = tok.apply_chat_template(
        [{"role": "user", "content": GOOD[0]["prompt"]}], tokenize=False, add_generation_prompt=True
    )
    assert by_id[1]["prompt_tokens"] == len(tok(as_chat, add_special_tokens=False)["input_ids"])
    as_chat = tok.apply_chat_template(GOOD[1]["messages"], tokenize=False, add_generation_prompt=True)
    assert by_id["b"]["prompt_tokens"] == len(tok(as_chat, add_special_tokens=False)["input_ids"])

    # A rerun has nothing to do.
    assert run_batch(chat_ckpt, inp, out) == 0
    assert "0 prompts" in capsys.readouterr().out and len(read_rows(out)) == 5

    # A crash mid-write: the last line lost its end. The rerun truncates it and redoes only that prompt.
    content = open(out, "rb").read()
    lost = json.loads(content.splitlines()[-1])
    with open(out, "wb") as f:
        f.write(content[: content.rfind(b"\n", 0, len(content) - 1) + 1] + b'{"id": 9, "te')
    assert run_batch(chat_ckpt, inp, out) == 0
    captured = capsys.readouterr()
    assert "truncated a partial last line" in captured.err and "1 prompts" in captured.out
    again = read_rows(out)
    assert len(again) == 5 and again[-1]["id"] == lost["id"] and again[-1]["text"] == lost["text"]


def test_strict_fails_on_a_bad_line_before_writing(chat_ckpt, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [GOOD[0], {"id": 2}])
    out = tmp_path / "out.jsonl"
    assert run_batch(chat_ckpt, inp, str(out), "--strict") == 2
    assert "line 2 (id 2)" in capsys.readouterr().err and not out.exists()


def test_prompts_over_the_model_limit_are_skipped(chat_ckpt, tmp_path, capsys):
    # max_position_embeddings 512 - 500 new tokens leaves 12 prompt tokens (one per character, raw).
    inp = write_jsonl(
        tmp_path / "in.jsonl", [{"id": "short", "prompt": "hi"}, {"id": "long", "prompt": "x" * 13}]
    )
    out = str(tmp_path / "out.jsonl")
    argv = ["--ckpt", chat_ckpt, "--input", inp, "--output", out, "--max-new-tokens", "500", "--budget", "8"]
    argv += ["--no-chat-template", "--quiet", "--temperature", "1.0"]
    assert batch.main(argv + ["--strict"]) == 2
    assert "13 tokens is longer" in capsys.readouterr().err
    assert batch.main(argv) == 0
    assert "(id 'long'): prompt of 13 tokens" in capsys.readouterr().err
    assert [r["id"] for r in read_rows(out)] == ["short"]
    assert read_rows(out)[0]["prompt_tokens"] == 2  # raw: no chat template


def test_per_process_shards_and_a_resume_with_another_host_count(chat_ckpt, tmp_path, monkeypatch, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD)
    out = str(tmp_path / "out.jsonl")
    monkeypatch.setattr(batch, "start_processes", lambda args: (1, 2))
    assert run_batch(chat_ckpt, inp, out, "--distributed") == 0
    shard = tmp_path / "out.1-of-2.jsonl"
    assert sorted(str(r["id"]) for r in read_rows(shard)) == ["5", "b"]  # valid records 1 and 3
    assert not os.path.exists(out)
    monkeypatch.setattr(batch, "start_processes", lambda args: (0, 1))
    assert run_batch(chat_ckpt, inp, out) == 0
    assert "3 prompts" in capsys.readouterr().out  # "b" and 5 were done by process 1 of 2
    assert sorted(str(r["id"]) for r in read_rows(out)) == ["1", "4", "e"]


def test_four_devices_give_the_same_output_as_one(chat_ckpt, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD)
    one, four = str(tmp_path / "one.jsonl"), str(tmp_path / "four.jsonl")
    assert run_batch(chat_ckpt, inp, one, "--devices", "1") == 0
    # The device count flag must be set before jax initialises: a fresh interpreter.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "longflow_jax.batch", "--ckpt", chat_ckpt]
    cmd += ["--input", inp, "--output", four, "--max-new-tokens", "8", "--budget", "32", "--batch-size", "2"]
    result = subprocess.run(cmd + ["--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "data parallel over 4 device(s)" in result.stderr
    strip = lambda rows: sorted(
        (str(r["id"]), r["text"], r["completion_tokens"], r["finish_reason"]) for r in rows
    )
    assert strip(read_rows(four)) == strip(read_rows(one))
    assert len(read_rows(four)) == len(GOOD)


def test_rows_record_their_settings_and_a_resume_with_others_is_refused(chat_ckpt, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD[:2])
    out = str(tmp_path / "out.jsonl")
    assert run_batch(chat_ckpt, inp, out) == 0
    rows = read_rows(out)
    assert rows[0]["settings"] == {
        "ckpt": os.path.abspath(chat_ckpt),
        "dtype": None,
        "policy": "longflow",
        "budget": 32,
        "granularity": "sequence",
        "snapkv_window": 32,
        "snapkv_pool": 5,
        "num_sinks": 4,
        "recent_window": None,
        "rkv_buffer": 128,
        "kv_quant": None,
        "kv_quant_group": 32,
        "attention_impl": "reference",
        "max_new_tokens": 8,
        "temperature": 0.0,
        "top_k": 0,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "no_repeat_ngram_size": 0,
        "min_new_tokens": 0,
        "ignore_eos": False,
        "stop_token_ids": [],
        "seed": 0,
        "chat_template": True,
        "chat_template_kwargs": {},
        "stop": [],
        "logprobs": None,
    }
    assert rows[1]["settings"] == rows[0]["settings"]
    # A non-UTF-8 line in the output is named and its prompt redone; it does not block the resume.
    with open(out, "ab") as f:
        f.write(b'{"id": "junk\xff"}\n')
    capsys.readouterr()
    assert run_batch(chat_ckpt, inp, out) == 0
    captured = capsys.readouterr()
    assert f"{out}:3: unreadable output line ignored, not UTF-8" in captured.err
    assert "0 prompts" in captured.out

    inp = write_jsonl(tmp_path / "in.jsonl", GOOD)
    assert run_batch(chat_ckpt, inp, out, "--policy", "h2o", "--max-new-tokens", "6") == 2
    err = capsys.readouterr().err
    assert "cannot be resumed" in err and "--force-new" in err
    assert f"{out}:1: max_new_tokens 8 (now 6), policy 'longflow' (now 'h2o')" in err
    assert open(out, "rb").read().count(b"\n") == 3  # untouched
    # A flag generate refuses is said before --force-new moves the output (it was renamed, then refused).
    assert run_batch(chat_ckpt, inp, out, "--force-new", "--attention-impl", "pallas", "--policy", "h2o") == 2
    assert "renamed" not in capsys.readouterr().err and open(out, "rb").read().count(b"\n") == 3

    assert run_batch(chat_ckpt, inp, out, "--policy", "h2o", "--force-new") == 0
    assert "renamed to" in capsys.readouterr().err
    rows = read_rows(out)
    assert sorted(map(str, (r["id"] for r in rows))) == sorted(str(g["id"]) for g in GOOD)
    assert {r["settings"]["policy"] for r in rows} == {"h2o"}
    (backup,) = [p for p in os.listdir(tmp_path) if p.startswith("out.jsonl.bak-")]
    assert open(tmp_path / backup, "rb").read().count(b"\n") == 3  # the old rows, kept


def test_an_output_that_is_the_input_is_refused_and_left_untouched(chat_ckpt, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    content = "\n".join(json.dumps(g) for g in GOOD).encode()  # no final newline
    inp.write_bytes(content)
    os.symlink(inp, tmp_path / "link.jsonl")
    for out in (str(inp), str(tmp_path / "link.jsonl")):
        assert run_batch(chat_ckpt, str(inp), out) == 2
        err = capsys.readouterr().err
        assert f"--output {out} is the same file as --input {inp}" in err
        assert inp.read_bytes() == content
    # a per-process output that is the input: read by a resume, renamed by --force-new
    os.symlink(inp, tmp_path / "out.0-of-2.jsonl")
    assert run_batch(chat_ckpt, str(inp), str(tmp_path / "out.jsonl"), "--force-new") == 2
    assert (
        f"(its per-process output {tmp_path / 'out.0-of-2.jsonl'}) is the same file"
        in capsys.readouterr().err
    )
    assert inp.read_bytes() == content


def test_a_partial_last_line_is_cut_only_after_the_settings_check_passes(chat_ckpt, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD[:1])
    out = tmp_path / "out.jsonl"
    # someone's JSONL without a final newline: its rows record no settings, so it is refused as it is
    content = "\n".join(json.dumps(g) for g in GOOD[1:]).encode()
    out.write_bytes(content)
    assert run_batch(chat_ckpt, inp, str(out)) == 2
    assert f"{out}:1: the row records no settings" in capsys.readouterr().err
    assert out.read_bytes() == content
    # a crash's partial line after rows of other settings: refused, nothing cut; resumed with the same
    out.unlink()
    assert run_batch(chat_ckpt, inp, str(out)) == 0
    with open(out, "ab") as f:
        f.write(b'{"id": 9, "te')
    content = out.read_bytes()
    assert run_batch(chat_ckpt, inp, str(out), "--policy", "h2o") == 2
    assert "cannot be resumed" in capsys.readouterr().err and out.read_bytes() == content
    assert run_batch(chat_ckpt, inp, str(out)) == 0
    assert f"{out}: truncated a partial last line (13 bytes)" in capsys.readouterr().err
    assert out.read_bytes() == content[: -len(b'{"id": 9, "te')]


def test_an_id_utf8_cannot_encode_is_a_skipped_line_and_the_others_are_written(chat_ckpt, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [GOOD[0], '{"id": "a\\ud800", "prompt": "hi"}', GOOD[3]])
    out = str(tmp_path / "out.jsonl")
    assert run_batch(chat_ckpt, inp, out) == 0
    assert "line 2: bad JSON (the string 'a\\ud800' holds a lone surrogate" in capsys.readouterr().err
    assert sorted(r["id"] for r in read_rows(out)) == [1, 5]


def test_files_merely_named_like_shards_are_neither_read_nor_renamed(chat_ckpt, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD[:1])
    out = str(tmp_path / "out.jsonl")
    mine = tmp_path / "out.top-of-list.jsonl"
    mine.write_text(json.dumps({"id": 1, "note": "not an output"}) + "\n")
    assert run_batch(chat_ckpt, inp, out) == 0
    assert [r["id"] for r in read_rows(out)] == [1]
    assert run_batch(chat_ckpt, inp, out, "--force-new") == 0
    assert mine.read_text() == json.dumps({"id": 1, "note": "not an output"}) + "\n"


def test_a_process_of_several_skips_the_ids_done_by_a_single_process_run(chat_ckpt, tmp_path, monkeypatch):
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD)
    out = str(tmp_path / "out.jsonl")
    assert run_batch(chat_ckpt, inp, out) == 0
    monkeypatch.setattr(batch, "start_processes", lambda args: (1, 2))
    assert run_batch(chat_ckpt, inp, out, "--distributed") == 0
    assert read_rows(tmp_path / "out.1-of-2.jsonl") == []  # its share, "b" and 5, is in out.jsonl


def test_top_logprobs_leave_out_banned_tokens_and_the_output_resumes(chat_ckpt, tmp_path, capsys):
    # --min-new-tokens bans EOS (log-prob -inf): the rows held -Infinity, which is no JSON, so a rerun
    # called them unreadable and generated those prompts again.
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD[:2])
    out = str(tmp_path / "out.jsonl")
    argv = ["--logprobs", "128", "--min-new-tokens", "8"]
    assert run_batch(chat_ckpt, inp, out, *argv) == 0
    with open(out) as f:
        rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in a row")) for line in f]
    for r in rows:
        for token, logprob, top in zip(r["token_ids"], r["logprobs"], r["top_logprobs"]):
            assert top[0] == [token, logprob] and all(lp <= 0 for _, lp in top)
            assert 4 not in [t for t, _ in top] and len(top) < 128  # EOS (id 4), banned
    assert run_batch(chat_ckpt, inp, out, *argv) == 0
    assert "2 already done" in capsys.readouterr().out
    assert [r["id"] for r in read_rows(out)] == [r["id"] for r in rows]


def test_rows_carry_logprobs_and_stop_strings_and_ignore_eos_runs_on(chat_ckpt, tmp_path, capsys):
    from transformers import AutoTokenizer

    inp = write_jsonl(tmp_path / "in.jsonl", GOOD)
    out = str(tmp_path / "out.jsonl")
    stops = list("aeiost")
    argv = ["--logprobs", "2", "--ignore-eos", *(f"--stop={s}" for s in stops)]
    assert run_batch(chat_ckpt, inp, out, *argv) == 0
    assert "s of compilation" in capsys.readouterr().out
    rows = read_rows(out)
    by_id = {r["id"]: r for r in rows}
    # id 4 ends with <|im_end|> (id 4) as its 5th token; ignoring EOS, it goes on to max_new_tokens
    assert by_id[4]["token_ids"][4] == 4
    tok = AutoTokenizer.from_pretrained(chat_ckpt)
    for r in rows:
        assert (
            r["settings"]["stop"] == stops and r["settings"]["logprobs"] == 2 and r["settings"]["ignore_eos"]
        )
        ids = r["token_ids"]
        assert len(ids) == len(r["logprobs"]) == len(r["top_logprobs"]) == r["completion_tokens"] == 8
        for token, logprob, top in zip(ids, r["logprobs"], r["top_logprobs"]):
            assert (
                len(top) == 2 and top[0] == [token, logprob] and top[1][1] <= logprob <= 0
            )  # greedy: the best
        # the text is cut before the earliest stop string of the whole decoded output
        full = tok.decode(ids, skip_special_tokens=True)
        at = min((full.find(s) for s in stops if s in full), default=None)
        if at is None:
            assert r["stop_string"] is None and r["text"] == full and r["finish_reason"] == "length"
        else:
            assert (
                r["text"] == full[:at] and full.find(r["stop_string"]) == at and r["finish_reason"] == "stop"
            )
    assert any(r["stop_string"] for r in rows) and not all(r["stop_string"] for r in rows)


def poison_embedding(ckpt, char, monkeypatch):
    """Load ckpt with the embedding of `char` set to NaN from now on: a prompt holding it has NaN
    logits from the prefill on, the others are untouched."""
    from transformers import AutoTokenizer

    convert = importlib.import_module("longflow_jax.convert")  # the package's `convert` is the function
    token, load = AutoTokenizer.from_pretrained(ckpt).convert_tokens_to_ids(char), convert.load

    def poisoned_load(*args, **kwargs):
        config, params = load(*args, **kwargs)
        return config, dict(params, embed=params["embed"].at[token].set(jnp.nan))

    monkeypatch.setattr(convert, "load", poisoned_load)


def test_a_row_with_nan_logits_is_an_error_row_with_a_warning(chat_ckpt, tmp_path, monkeypatch, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [*GOOD[:2], {"id": "z", "prompt": "Zebra"}])
    clean, out = str(tmp_path / "clean.jsonl"), str(tmp_path / "out.jsonl")
    assert run_batch(chat_ckpt, inp, clean) == 0
    assert "warning" not in capsys.readouterr().err
    poison_embedding(chat_ckpt, "Z", monkeypatch)
    assert run_batch(chat_ckpt, inp, out) == 0
    captured = capsys.readouterr()
    assert "the logits became NaN/inf for 1 row(s) ['z']" in captured.err
    assert "1 stopped on NaN/inf logits" in captured.out
    by_id = {r["id"]: r for r in read_rows(out)}
    assert by_id["z"]["finish_reason"] == "error" and by_id["z"]["completion_tokens"] == 0
    assert by_id["z"]["text"] == ""
    # the other rows are as without the poison
    fields = lambda r: (r["text"], r["completion_tokens"], r["finish_reason"])
    expected = {r["id"]: fields(r) for r in read_rows(clean)}
    assert fields(by_id[1]) == expected[1] and fields(by_id["b"]) == expected["b"]


@pytest.mark.parametrize(
    "extra, lines, message",
    [
        (
            ["--temperature", "nan"],
            GOOD,
            "--temperature must be 0 (greedy) or a finite number >= 1e-06, got nan",
        ),
        (
            ["--temperature", "inf"],
            GOOD,
            "--temperature must be 0 (greedy) or a finite number >= 1e-06, got inf",
        ),
        (
            ["--temperature", "-0.5"],
            GOOD,
            "--temperature must be 0 (greedy) or a finite number >= 1e-06, got -0.5",
        ),
        (["--top-p", "0"], GOOD, "--top-p must be in (0, 1], got 0.0"),
        (["--top-p", "1.5"], GOOD, "--top-p must be in (0, 1], got 1.5"),
        (["--top-p", "nan"], GOOD, "--top-p must be in (0, 1], got nan"),
        (["--top-k", "-1"], GOOD, "--top-k must be >= 0, got -1"),
        (["--budget", "0"], GOOD, "--budget must be >= 2, got 0"),
        (["--budget", "-8"], GOOD, "--budget must be >= 2, got -8"),
        (["--batch-size", "0"], GOOD, "--batch-size must be >= 1, got 0"),
        (["--batch-size", "auto"], GOOD, "--batch-size auto needs a device that reports its memory limit"),
        (["--max-new-tokens", "0"], GOOD, "--max-new-tokens must be >= 1, got 0"),
        (["--devices", "0"], GOOD, "--devices must be >= 1, got 0"),
        (["--seed", "-1"], GOOD, "--seed must be >= 0, got -1"),
        (["--dtype", "float8"], GOOD, "dtype must be one of"),
        (["--chat-template-kwargs", "[1]"], GOOD, "--chat-template-kwargs must be a JSON object, got [1]"),
        (["--logprobs", "-1"], GOOD, "--logprobs must be >= 0, got -1"),
        (["--logprobs", "129"], GOOD, "--logprobs must be <= the model's vocab_size 128, got 129"),
        # Refused at the first batch's compile, after the output was created (empty)
        (["--kv-quant", "int4", "--kv-quant-group", "5"], GOOD, "kv_quant_group 5 must divide head_dim"),
        (["--attention-impl", "pallas", "--policy", "h2o"], GOOD, "policy 'h2o' needs attention_impl"),
        (["--frequency-penalty", "inf"], GOOD, "--frequency-penalty must be a finite number, got inf"),
        (["--ckpt", "/nope"], GOOD, "--ckpt '/nope': it does not exist"),
        (["--ckpt", "."], GOOD, "is not a complete longflow-jax checkpoint"),
        ([], [], "no valid prompt records in"),
        ([], ["oops", {"id": 1}], "no valid prompt records in"),
        ([], None, "No such file or directory"),
        (["--output", "in.jsonl/out.jsonl"], GOOD, "File exists"),  # a file where its folder goes
    ],
)
def test_bad_arguments_and_inputs_are_one_clear_error(
    chat_ckpt, tmp_path, monkeypatch, capsys, extra, lines, message
):
    monkeypatch.chdir(tmp_path)
    inp = str(tmp_path / "missing.jsonl") if lines is None else write_jsonl(tmp_path / "in.jsonl", lines)
    assert run_batch(chat_ckpt, inp, str(tmp_path / "out.jsonl"), *extra) == 2
    err = capsys.readouterr().err
    (last,) = [line for line in err.splitlines() if "error:" in line]
    assert last.startswith("longflow-batch: error: ") and message in last
    assert "Traceback" not in err and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--chat-template-kwargs", "{bad", "'{bad': Expecting property name enclosed in double quotes"),
        ("--mesh", "data=0", "--mesh must look like data=2,model=4 (positive sizes, each axis once)"),
    ],
)
def test_flag_parse_errors_say_why(capsys, flag, value, message):
    # argparse kept only the parser's name: "invalid loads value", "invalid parse_mesh_shape value".
    with pytest.raises(SystemExit) as exit_info:
        batch.main(["--ckpt", "c", "--input", "i", flag, value])
    assert exit_info.value.code == 2 and f"error: argument {flag}: {message}" in capsys.readouterr().err


def test_batch_size_auto_fills_one_devices_memory(chat_ckpt, tmp_path, monkeypatch, capsys):
    """--batch-size auto: per device, the largest batch whose compiled generate fits 90% of the memory
    limit (here a limit chosen for 3 rows), times the data devices; every prompt is answered. A mesh
    with a model axis is refused."""
    import jax

    from longflow_jax import jsonl_io, runner
    from longflow_jax.config import ModelConfig

    gen = importlib.import_module("longflow_jax.generate")
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD)
    argv = ["--ckpt", chat_ckpt, "--input", inp, "--output", "out.jsonl", "--max-new-tokens", "8"]
    args = batch.build_parser().parse_args(argv + ["--budget", "32"])
    records, _ = jsonl_io.read_jsonl_records(inp, jsonl_io.validate_prompt_record)
    generator = runner.DataParallelGenerator(chat_ckpt)
    prompt_len = runner.make_plan(generator, records, args, "test").batches[0].prompt_len  # the longest
    config = ModelConfig.from_pretrained_dir(chat_ckpt)
    options = dict(
        prompt_len=prompt_len, max_new_tokens=8, compression=runner.compression_from(args),
        sampling=runner.sampling_from(args),
    )  # fmt: skip
    need = {rows: gen.generate_program_bytes(config, rows, **options) for rows in (3, 4)}
    limit = int((need[3] + need[4]) / 2 / runner.AUTO_BATCH_MEMORY_FRACTION)
    monkeypatch.setattr(runner, "device_memory_limit", lambda device: limit)
    out = str(tmp_path / "out.jsonl")
    assert run_batch(chat_ckpt, inp, out, "--batch-size", "auto") == 0
    err = capsys.readouterr().err
    n = jax.device_count()
    assert f"--batch-size auto: {3 * n} rows (data parallel over {n} device(s)" in err
    assert f"prompts padded to {prompt_len})" in err
    assert sorted(str(r["id"]) for r in read_rows(out)) == sorted(str(g["id"]) for g in GOOD)
    tensor_parallel = SimpleNamespace(mesh=SimpleNamespace(shape={"data": 1, "model": 2}))
    with pytest.raises(ValueError, match="--batch-size auto needs a model axis of 1, got the mesh"):
        runner.auto_batch_size(tensor_parallel, args, options["compression"], prompt_len)
