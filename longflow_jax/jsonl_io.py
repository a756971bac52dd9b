"""JSONL records in and rows out: validation with line numbers, per-process output paths, resume.

Each batch's rows are written with one write, flush and fsync, so a crash loses at most the batch in
flight; a partial last line left by a crash mid-write is cut off on the next run. One process writes an
output at a time (`lock_output`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import json
import math
import os
import time
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


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} overflows to {value}")
    return value


def parse_json_line(line: bytes) -> Any:
    """Strict JSON of one line: UTF-8, no NaN/Infinity, no number that overflows to inf. Raises
    ValueError with the reason."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise ValueError(f"bad JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:
        raise ValueError(f"bad JSON ({e})") from None


def read_jsonl_records(
    path: str, validate: Callable[[dict], Any], id_field: str = "id", id_from_line: bool = False
) -> tuple[list[Record], list[Skipped]]:
    """Parse a JSONL file: returns (records in file order, skipped), blank lines ignored.

    validate(obj) returns the record's data or raises ValueError with the reason. A line that is not
    strict JSON (`parse_json_line`), a non-object, a missing/null id (unless id_from_line: then the line
    number is the id), a failed validation and an id seen before are skipped with their 1-based line number.
    """
    records, skipped, seen = [], [], set()
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record_id = None
            try:
                obj = parse_json_line(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                record_id = obj.get(id_field)
                if record_id is None and id_from_line:
                    record_id = number
                if record_id is None:
                    raise ValueError(f"missing {id_field!r}")
                if not isinstance(record_id, str | int) or isinstance(record_id, bool):
                    raise ValueError(f"{id_field!r} must be a string or an integer")
                data = validate(obj)
                if id_key(record_id) in seen:
                    raise ValueError("duplicate id (an earlier line has it)")
            except ValueError as e:
                skipped.append(Skipped(number, record_id, str(e)))
                continue
            seen.add(id_key(record_id))
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


@dataclasses.dataclass
class OutputState:
    """What the existing output files hold."""

    ids: set[str] = dataclasses.field(default_factory=set)  # id_key of every row
    # json text of a row's "settings" (null when it has none) -> "path:line" of its first row
    settings: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)  # what was repaired or ignored


def read_output(path: str, truncate: bool, state: OutputState | None = None) -> OutputState:
    """Add the rows of `path` (if it exists) to state.

    A last line without its newline is a write cut short by a crash: cut off the file with truncate=True
    (this process's file), else ignored (another host's, maybe being written now). A line that is not
    UTF-8 or not a JSON object with an id is ignored, named by its line number, and its prompt redone.
    """
    state = OutputState() if state is None else state
    if not os.path.isfile(path):
        return state
    with open(path, "rb") as f:
        content = f.read()
    end = content.rfind(b"\n") + 1
    if end < len(content) and truncate:
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        state.notes.append(f"{path}: truncated a partial last line ({len(content) - end} bytes)")
    for number, line in enumerate(content[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = parse_json_line(line)
            state.ids.add(id_key(row["id"]))
        except (ValueError, KeyError, TypeError) as e:
            reason = str(e) if isinstance(e, ValueError) else "not an object with an 'id'"
            state.notes.append(f"{path}:{number}: unreadable output line ignored, {reason} (redone)")
            continue
        settings = json.dumps(row.get("settings"), sort_keys=True)
        state.settings.setdefault(settings, f"{path}:{number}")
    return state


def read_outputs_of_all_processes(out_path: str) -> OutputState:
    """read_output over every sibling output, so a resume with another process count redoes nothing;
    only out_path (this process's file) is repaired."""
    state = OutputState()
    for path in sibling_outputs(out_path):
        read_output(path, truncate=path == out_path, state=state)
    return state


def settings_differences(state: OutputState, settings: dict) -> list[str]:
    """One line per settings value in the output that differs from `settings`, naming each field."""
    current = json.loads(json.dumps(settings))  # as it reads back from a row
    lines = []
    for text, where in state.settings.items():
        old = json.loads(text)
        if old is None:
            lines.append(f"{where}: the row records no settings")
        elif old != current:
            fields = sorted(k for k in {*old, *current} if old.get(k) != current.get(k))
            diffs = ", ".join(f"{k} {old.get(k)!r} (now {current.get(k)!r})" for k in fields)
            lines.append(f"{where}: {diffs}")
    return lines


def set_aside(path: str) -> str:
    """Rename path to path.bak-TIMESTAMP (never over an existing file); returns the new name."""
    stem = f"{path}.bak-{time.strftime('%Y%m%d-%H%M%S')}"
    target, n = stem, 1
    while os.path.exists(target):
        target, n = f"{stem}-{n}", n + 1
    os.rename(path, target)
    return target


def lock_output(path: str, prog: str):
    """An exclusive lock on path + ".lock" (its folder created), held while the returned file stays
    open: a second writer of the same output fails at once. The lock file keeps the holder's pid and is
    never removed (removing it would let a waiting process and a new one lock two different files)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    f = open(path + ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise ValueError(f"another {prog} process is writing {path} (pid {pid})") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def append_lines(f, rows: Sequence[dict]) -> None:
    """All of a batch's rows in one write, then flush and fsync: a crash leaves whole lines only."""
    f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())
