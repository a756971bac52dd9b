"""JSONL input validation with line numbers, per-process output paths, and resume repair."""

import json
import os

import pytest
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
    state = jsonl_io.read_output(str(path), own=False)
    assert state.ids == {"1", '"x"'} and not state.notes and not state.partial
    state = jsonl_io.read_output(str(path), own=True)
    assert state.ids == {"1", '"x"'} and path.read_bytes().endswith(b'"te')  # reading cuts nothing
    notes = jsonl_io.cut_partial_lines(state)
    assert "truncated a partial last line (13 bytes)" in notes[0]
    assert path.read_bytes().endswith(b'"b"}\n')


@pytest.mark.parametrize(
    "content",
    [
        b'{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "no final newline"}',  # rows without settings
        b'{"id": 1, "settings": {"budget": 64}}\n{"id": 2, "se',  # other settings
        b'{"id": 1, "settings": {"budget": 32}}\n{"id": 2, "settings": {"budget": 64}}',  # a whole last row
    ],
)
def test_a_partial_last_line_is_not_cut_while_the_settings_check_refuses(tmp_path, content):
    path = tmp_path / "out.jsonl"
    path.write_bytes(content)
    state = jsonl_io.read_output(str(path), own=True)
    assert jsonl_io.settings_differences(state, {"budget": 32})  # the caller refuses and cuts nothing
    assert path.read_bytes() == content


@pytest.mark.parametrize("tail", [b"last words", b"[1, 2]", b'{"text": "a", "id": 3}'])
def test_a_last_line_that_does_not_begin_like_a_row_is_refused_untouched(tmp_path, tail):
    path = tmp_path / "notes.jsonl"
    content = b'{"id": 1, "settings": {"budget": 32}}\n' + tail
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path}:2: the last line has no newline and does not begin"):
        jsonl_io.read_output(str(path), own=True)
    assert path.read_bytes() == content
    assert jsonl_io.read_output(str(path), own=False).ids == {"1"}  # another host's file: ignored


def test_strings_utf8_cannot_encode_are_malformed_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [
        '{"id": 1, "prompt": "ok"}',
        '{"id": "a\\ud800", "prompt": "lone high surrogate in the id"}',
        '{"id": 3, "prompt": "lone low \\udc00"}',
        '{"id": 4, "prompt": "x", "meta": [{"\\udfff": 1}]}',  # a key, nested
        '{"id": 5, "prompt": "a pair is one character: \\ud83d\\ude00"}',
    ]
    path.write_text("\n".join(lines) + "\n")
    records, skipped = jsonl_io.read_jsonl_records(str(path), jsonl_io.validate_prompt_record)
    assert [(r.id, r.data) for r in records] == [
        (1, ("prompt", "ok")),
        (5, ("prompt", "a pair is one character: \U0001f600")),
    ]
    assert [s.line for s in skipped] == [2, 3, 4]
    assert skipped[0].reason.startswith("bad JSON (the string 'a\\ud800' holds a lone surrogate escape")
    assert all("UTF-8 cannot encode" in s.reason for s in skipped)


def test_undecodable_input_lines_are_skipped_by_number(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [
        b'{"id": 1, "prompt": "ok"}',
        b'{"id": 2, "prompt": "caf\xe9"}',  # latin-1, not UTF-8
        b'{"id": 3, "prompt": "\xc3\xa9t\xc3\xa9"}',  # UTF-8
        b'{"id": 4, "prompt": NaN}',
        b'{"id": 5, "prompt": "x", "n": 1e999}',  # overflows to inf
        b'{"id": Infinity, "prompt": "x"}',
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    records, skipped = jsonl_io.read_jsonl_records(str(path), jsonl_io.validate_prompt_record)
    assert [(r.id, r.data) for r in records] == [(1, ("prompt", "ok")), (3, ("prompt", "\u00e9t\u00e9"))]
    reasons = {s.line: s.reason for s in skipped}
    assert sorted(reasons) == [2, 4, 5, 6]
    assert reasons[2] == "not UTF-8 (byte 0xe9 at column 25)"
    assert "NaN is not valid JSON" in reasons[4] and "1e999 overflows" in reasons[5]
    assert "Infinity is not valid JSON" in reasons[6]


def test_unreadable_output_lines_are_named_and_their_ids_redone(tmp_path):
    path = tmp_path / "out.jsonl"
    settings = {"policy": "longflow", "budget": 32}
    rows = [
        json.dumps({"id": 1, "settings": settings}).encode(),
        b'{"id": 2, "text": "\xff\xfe"}',
        b"[3]",
        json.dumps({"id": 4, "settings": dict(settings, budget=64)}).encode(),
        json.dumps({"id": 5}).encode(),
    ]
    path.write_bytes(b"\n".join(rows) + b"\n")
    state = jsonl_io.read_output(str(path), own=True)
    assert state.ids == {"1", "4", "5"}
    assert [n.split(": ", 1)[0] for n in state.notes] == [f"{path}:2", f"{path}:3"]
    assert "not UTF-8" in state.notes[0]
    assert jsonl_io.settings_differences(state, settings) == [
        f"{path}:4: budget 64 (now 32)",
        f"{path}:5: the row records no settings",
    ]


def test_a_second_writer_fails_at_once_and_set_aside_keeps_the_old_file(tmp_path):
    out = str(tmp_path / "out.jsonl")
    with jsonl_io.lock_output(out, "longflow-batch"):
        with pytest.raises(
            ValueError, match=f"another longflow-batch process is writing {out} \\(pid {os.getpid()}\\)"
        ):
            jsonl_io.lock_output(out, "longflow-batch")
        link = tmp_path / "link.jsonl"  # the same output under another name: the same lock
        link.symlink_to(tmp_path / "out.jsonl")
        with pytest.raises(ValueError, match="another longflow-batch process is writing"):
            jsonl_io.lock_output(str(link), "longflow-batch")
    jsonl_io.lock_output(out, "longflow-batch").close()  # free again once the holder closes it
    (tmp_path / "out.jsonl").write_text("old\n")
    first, second = jsonl_io.set_aside(out), None
    (tmp_path / "out.jsonl").write_text("newer\n")
    second = jsonl_io.set_aside(out)
    assert first != second and first.startswith(out + ".bak-") and second.startswith(out + ".bak-")
    assert open(first).read() == "old\n" and open(second).read() == "newer\n" and not os.path.exists(out)


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


def test_sibling_outputs_are_only_the_names_output_path_makes(tmp_path):
    out = str(tmp_path / "res.jsonl")
    made = ["res.1-of-2.jsonl", "res.10-of-12.jsonl"]
    others = ["res.top-of-list.jsonl", "res.a-of-2.jsonl", "res.01-of-2.jsonl", "res.2-of-2.jsonl"]
    others += ["res.0-of-1.jsonl", "res.x.0-of-2.jsonl", "res.0-of-2.jsonl.bak", "res.0-of-2-of-3.jsonl"]
    for name in made + others:
        (tmp_path / name).write_text("")
    assert [os.path.basename(p) for p in jsonl_io.sibling_outputs(out)] == made  # res.jsonl itself: absent


def test_a_file_of_no_rows_is_not_an_output_to_resume(tmp_path):
    # Rows were appended to someone's notes (each line "ignored (redone)").
    path = tmp_path / "notes.txt"
    path.write_text("My lab notes\nimportant results: 0.93\n")
    with pytest.raises(ValueError, match=r"holds no output rows \(2 line\(s\)"):
        jsonl_io.read_output(str(path), own=True)
    assert path.read_text() == "My lab notes\nimportant results: 0.93\n"
