"""longflow-batch: input validation, bucketing, resumable output, data parallel over 4 CPU devices."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from longflow_jax import batch
from longflow_jax.tiny_models import make_tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 4  # the tiny tokenizer's <|im_end|>

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


@pytest.fixture(scope="module")
def chat_ckpt(tiny_checkpoints, tmp_path_factory):
    """The session's converted tiny Qwen3 plus the tiny chat tokenizer (its eos is <|im_end|>)."""
    path = str(tmp_path_factory.mktemp("chat") / "ckpt")
    shutil.copytree(tiny_checkpoints["qwen3"][1], path)
    make_tiny_tokenizer(path, vocab_size=128)
    return path


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def read_rows(path):
    return [json.loads(line) for line in open(path)]


def run_batch(ckpt, inp, out, *extra):
    argv = ["--ckpt", ckpt, "--input", inp, "--output", out, "--max-new-tokens", "8", "--budget", "32"]
    return batch.main(argv + ["--batch-size", "2", "--quiet", *extra])


def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    lines = [
        json.dumps(GOOD[0]),
        "{not json",
        "[1, 2]",
        json.dumps({"prompt": "no id"}),
        json.dumps({"id": None, "prompt": "null id"}),
        json.dumps({"id": True, "prompt": "bool id"}),
        "",
        json.dumps({"id": 7}),
        json.dumps({"id": 8, "prompt": "p", "messages": [{"role": "user", "content": "m"}]}),
        json.dumps({"id": 9, "prompt": 3}),
        json.dumps({"id": 10, "messages": [{"role": "user"}]}),
        json.dumps({"id": 1, "prompt": "duplicate"}),
        json.dumps(GOOD[1]),
    ]
    records, skipped = batch.read_jsonl_records(
        write_jsonl(tmp_path / "in.jsonl", lines), batch.validate_prompt_record
    )
    assert [(r.line, r.id) for r in records] == [(1, 1), (13, "b")]
    assert records[1].data == ("messages", GOOD[1]["messages"])
    reasons = {s.line: s.reason for s in skipped}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 8, 9, 10, 11, 12]  # the blank line 7 is not a record
    assert "bad JSON" in reasons[2] and "JSON object" in reasons[3]
    assert "missing 'id'" in reasons[4] == reasons[5]
    assert "exactly one of" in reasons[8] == reasons[9]
    assert "duplicate" in reasons[12] and "string" in reasons[10] and "messages[0]" in reasons[11]


def test_plan_batches_buckets_by_length_and_pads_rows_to_the_devices():
    lengths = [5, 190, 17, 16, 40, 33, 1, 120, 16, 16, 16]
    batches = batch.plan_batches(lengths, batch_size=4, num_devices=2, max_prompt_len=200)
    covered = sorted(i for b in batches for i in b.indices)
    assert covered == list(range(len(lengths)))
    for b in batches:
        assert b.rows % 2 == 0 and len(b.indices) <= b.rows <= 4
        assert all(lengths[i] <= b.prompt_len for i in b.indices)
        assert b.prompt_len in (16, 32, 64, 128, 200)  # powers of two >= 16, capped at the limit
        assert b.prompt_len == batch.bucket_length(max(lengths[i] for i in b.indices), 200)
    flat = [lengths[i] for b in batches for i in b.indices]
    assert flat == sorted(flat, reverse=True)  # longest first
    with pytest.raises(ValueError, match="longer than"):
        batch.plan_batches([201], 4, 1, 200)


def test_plan_batches_bounds_the_number_of_shapes():
    lengths = [(7 * i) % 500 + 1 for i in range(1000)]
    batches = batch.plan_batches(lengths, batch_size=16, num_devices=4, max_prompt_len=512)
    shapes = {(b.rows, b.prompt_len) for b in batches}
    assert {rows for rows, _ in shapes} <= {4, 8, 16}
    assert len({p for _, p in shapes}) <= 6  # 16 .. 512


def test_partial_last_line_is_truncated_only_in_our_own_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": 1, "text": "a"}\n{"id": "x", "text": "b"}\n{"id": 3, "te')
    ids, notes = batch.done_ids(str(path), truncate=False)
    assert ids == {"1", '"x"'} and not notes and path.read_bytes().endswith(b'"te')
    ids, notes = batch.done_ids(str(path), truncate=True)
    assert ids == {"1", '"x"'} and "truncated" in notes[0]
    assert path.read_bytes().endswith(b'"b"}\n')


def test_output_paths_per_process(tmp_path):
    out = str(tmp_path / "res.jsonl")
    assert batch.output_path(out, 0, 1) == out
    assert batch.output_path(out, 2, 4) == str(tmp_path / "res.2-of-4.jsonl")
    for name in ["res.jsonl", "res.0-of-2.jsonl", "res.1-of-2.jsonl", "other.0-of-2.jsonl"]:
        (tmp_path / name).write_text("")
    assert [os.path.basename(p) for p in batch.sibling_outputs(out)] == [
        "res.jsonl",
        "res.0-of-2.jsonl",
        "res.1-of-2.jsonl",
    ]


def test_finish_reason():
    assert batch.finish_reason([7, 8, EOS], (EOS,)) == "stop"
    assert batch.finish_reason([7, EOS, 8], (EOS,)) == "length"
    assert batch.finish_reason([], (EOS,)) == "length"


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
