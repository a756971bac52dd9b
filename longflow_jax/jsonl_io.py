"""JSONL records in and rows out: validation with line numbers, per-process output paths, resume.

Each batch's rows are written with one write, flush and fsync, so a crash loses at most the batch in
flight; a partial last line left by a crash mid-write is cut off on the next run.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Skipped:
    """An input record that is not generated for, and why."""

    line: int
    id: Any
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" (id {self.id!r})" if self.id is not None else "")
        return f"{where}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class Record:
    line: int
    id: Any
    data: Any  # what the validator made of the JSON object


def id_key(record_id) -> str:
    """Ids compare by their JSON text: 1 and "1" are different ids."""
    return json.dumps(record_id, sort_keys=True)


def read_jsonl_records(
    path: str, validate: Callable[[dict], Any], id_field: str = "id", id_from_line: bool = False
) -> tuple[list[Record], list[Skipped]]:
    """Parse a JSONL file: returns (records in file order, skipped).

    validate(obj) returns the record's data or raises ValueError with the reason. Blank lines are not
    records. Bad JSON, a non-object, a missing/null id (unless id_from_line: then the line number is
    the id), a failed validation and a repeated id (its second and later occurrences) are skipped, each
    with its 1-based line number.
    """
    records, skipped, seen = [], [], set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.append(Skipped(number, None, f"bad JSON ({e.msg} at column {e.colno})"))
                continue
            if not isinstance(obj, dict):
                skipped.append(Skipped(number, None, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            record_id = obj.get(id_field)
            if record_id is None and id_from_line:
                record_id = number
            if record_id is None:
                skipped.append(Skipped(number, None, f"missing {id_field!r}"))
                continue
            if not isinstance(record_id, str | int) or isinstance(record_id, bool):
                skipped.append(Skipped(number, record_id, f"{id_field!r} must be a string or an integer"))
                continue
            try:
                data = validate(obj)
            except ValueError as e:
                skipped.append(Skipped(number, record_id, str(e)))
                continue
            key = id_key(record_id)
            if key in seen:
                skipped.append(Skipped(number, record_id, "duplicate id (an earlier line has it)"))
                continue
            seen.add(key)
            records.append(Record(number, record_id, data))
    return records, skipped


def validate_prompt_record(obj: dict):
    """{"prompt": str} -> ("prompt", str); {"messages": [...]} -> ("messages", list)."""
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise ValueError("needs exactly one of 'prompt' and 'messages'")
    if has_prompt:
        if not isinstance(obj["prompt"], str):
            raise ValueError(f"'prompt' must be a string, got {type(obj['prompt']).__name__}")
        return ("prompt", obj["prompt"])
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")
    return ("messages", messages)


def output_path(path: str, process_index: int, process_count: int) -> str:
    """OUT.jsonl for a single process; OUT.i-of-n.jsonl for process i of n."""
    if process_count == 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}.{process_index}-of-{process_count}{ext}"


def sibling_outputs(path: str) -> list[str]:
    """The plain output and every per-process output of any process count, those that exist."""
    stem, ext = os.path.splitext(path)
    found = sorted(glob.glob(f"{glob.escape(stem)}.*-of-*{glob.escape(ext)}"))
    return ([path] if os.path.isfile(path) else []) + [p for p in found if p != path]


def done_ids(path: str, truncate: bool) -> tuple[set[str], list[str]]:
    """Ids (id_key) already written to `path`, and notes on what was repaired.

    A last line without its newline is a write cut short by a crash: with truncate=True (the file this
    process appends to) it is cut off the file, otherwise (another host's file, maybe being written
    right now) it is ignored.
    """
    ids, notes = set(), []
    if not os.path.isfile(path):
        return ids, notes
    with open(path, "rb") as f:
        content = f.read()
    end = content.rfind(b"\n") + 1
    if end < len(content) and truncate:
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        notes.append(f"{path}: truncated a partial last line ({len(content) - end} bytes)")
    for number, line in enumerate(content[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            ids.add(id_key(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            notes.append(f"{path}:{number}: unreadable output line ignored (its prompt will be redone)")
    return ids, notes


def done_ids_of_all_processes(out_path: str) -> tuple[set[str], list[str]]:
    """done_ids over every sibling output, so a resume with another process count redoes nothing;
    only out_path (this process's file) is repaired."""
    done, notes = set(), []
    for path in sibling_outputs(out_path):
        ids, path_notes = done_ids(path, truncate=path == out_path)
        done |= ids
        notes += path_notes
    return done, notes


def append_lines(f, rows: Sequence[dict]) -> None:
    """All of a batch's rows in one write, then flush and fsync: a crash leaves whole lines only."""
    f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())
