"""longflow-batch end to end: skips and reports bad records, resumes, shards per process, 4 CPU devices."""

import json
import os
import subprocess
import sys

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
        assert set(r) == {"id", "text", "prompt_tokens", "completion_tokens", "finish_reason", "seconds"}
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
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "batch_generate.py"), "--ckpt", chat_ckpt]
    cmd += ["--input", inp, "--output", four, "--max-new-tokens", "8", "--budget", "32", "--batch-size", "2"]
    result = subprocess.run(cmd + ["--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "data parallel over 4 device(s)" in result.stderr
    strip = lambda rows: sorted(
        (str(r["id"]), r["text"], r["completion_tokens"], r["finish_reason"]) for r in rows
    )
    assert strip(read_rows(four)) == strip(read_rows(one))
    assert len(read_rows(four)) == len(GOOD)
