"""JSONL input validation with line numbers, per-process output paths, and resume repair."""

import json
import os

from helpers import write_jsonl

from longflow_jax import jsonl_io

PROMPT = {"id": 1, "prompt": "What is 2+2?"}
MESSAGES = {
    "id": "b",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
}


def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    lines = [
        json.dumps(PROMPT),
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
        json.dumps(MESSAGES),
    ]
    records, skipped = jsonl_io.read_jsonl_records(
        write_jsonl(tmp_path / "in.jsonl", lines), jsonl_io.validate_prompt_record
    )
    assert [(r.line, r.id) for r in records] == [(1, 1), (13, "b")]
    assert records[1].data == ("messages", MESSAGES["messages"])
    reasons = {s.line: s.reason for s in skipped}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 8, 9, 10, 11, 12]  # the blank line 7 is not a record
    assert "bad JSON" in reasons[2] and "JSON object" in reasons[3]
    assert "missing 'id'" in reasons[4] == reasons[5]
    assert "exactly one of" in reasons[8] == reasons[9]
    assert "duplicate" in reasons[12] and "string" in reasons[10] and "messages[0]" in reasons[11]


def test_partial_last_line_is_truncated_only_in_our_own_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": 1, "text": "a"}\n{"id": "x", "text": "b"}\n{"id": 3, "te')
    ids, notes = jsonl_io.done_ids(str(path), truncate=False)
    assert ids == {"1", '"x"'} and not notes and path.read_bytes().endswith(b'"te')
    ids, notes = jsonl_io.done_ids(str(path), truncate=True)
    assert ids == {"1", '"x"'} and "truncated" in notes[0]
    assert path.read_bytes().endswith(b'"b"}\n')


def test_output_paths_per_process(tmp_path):
    out = str(tmp_path / "res.jsonl")
    assert jsonl_io.output_path(out, 0, 1) == out
    assert jsonl_io.output_path(out, 2, 4) == str(tmp_path / "res.2-of-4.jsonl")
    for name in ["res.jsonl", "res.0-of-2.jsonl", "res.1-of-2.jsonl", "other.0-of-2.jsonl"]:
        (tmp_path / name).write_text("")
    assert [os.path.basename(p) for p in jsonl_io.sibling_outputs(out)] == [
        "res.jsonl",
        "res.0-of-2.jsonl",
        "res.1-of-2.jsonl",
    ]
