"""JSONL records in and rows out: validation with line numbers, per-process output paths, resume.

Each batch's rows are written with one write, flush and fsync, so a crash loses at most the batch in
flight; a partial last line left by a crash mid-write is cut off on the next run, once the rows before it
are known to be a resumable output (`cut_partial_lines`). One process writes an output at a time
(`lock_output`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import json
import math
import os
import re
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


def _unencodable_string(obj: Any) -> str | None:
    """The first string (value or key) in obj that UTF-8 cannot encode (a lone surrogate such as
    "\\ud800"), or None. Iterative: the depth is json's to limit."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def parse_json_line(line: bytes) -> Any:
    """Strict JSON of one line: UTF-8, no NaN/Infinity, no number that overflows to inf, no string that
    UTF-8 cannot encode (a lone surrogate escape: the row made from it could not be written). Raises
    ValueError with the reason."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise ValueError(f"bad JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:
        raise ValueError(f"bad JSON ({e})") from None
    bad = _unencodable_string(obj)
    if bad is not None:
        shown = bad if len(bad) <= 40 else bad[:37] + "..."
        raise ValueError(
            f"bad JSON (the string {shown!r} holds a lone surrogate escape, which UTF-8 cannot encode; "
            "expected text made of whole characters)"
        )
    return obj


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


def sibling_outputs(output: str) -> list[str]:
    """The files that `output_path` makes of `output` (the --output path) and that exist: output itself,
    then OUT.i-of-n.jsonl (0 <= i < n, n >= 2, no leading zeros) for any process count n, sorted."""
    stem, ext = os.path.splitext(output)
    shard = re.compile(re.escape(stem) + r"\.([0-9]+)-of-([0-9]+)" + re.escape(ext))
    found = []
    for path in sorted(glob.glob(f"{glob.escape(stem)}.*-of-*{glob.escape(ext)}")):
        m = shard.fullmatch(path)
        if m and int(m[1]) < int(m[2]) and output_path(output, int(m[1]), int(m[2])) == path:
            found.append(path)
    return ([output] if os.path.isfile(output) else []) + found


def same_file(a: str, b: str) -> bool:
    """Whether a and b name one file: one path once resolved (whether or not it exists yet: an output
    a run will create), or one existing file through a link or another spelling of the path."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is missing (or its folder is a file): not one file
        return False


# Every row of a resumable output begins so (`append_lines` of rows whose first key is "id").
ROW_START = b'{"id": '


@dataclasses.dataclass
class OutputState:
    """What the existing output files hold."""

    ids: set[str] = dataclasses.field(default_factory=set)  # id_key of every row
    # json text of a row's "settings" (null when it has none) -> "path:line" of its first row
    settings: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)  # what was ignored
    # path -> byte length of its whole lines, for this process's file when a partial last line follows
    partial: dict[str, int] = dataclasses.field(default_factory=dict)


def read_output(path: str, own: bool, state: OutputState | None = None) -> OutputState:
    """Add the rows of `path` (if it exists) to state; the file is only read.

    A last line without its newline is a write cut short by a crash. In this process's file (own=True) it
    must begin like a row (ROW_START, else ValueError: the file is not an output to resume); if it is a
    whole JSON object its settings are checked with the others; state.partial records where to cut it
    (`cut_partial_lines`, once the caller has checked the settings). In another host's file (maybe being
    written now) it is ignored. A line that is not UTF-8 or not a JSON object with an id is ignored,
    named by its line number, and its prompt redone; a file of such lines only is not an output
    (ValueError).
    """
    state = OutputState() if state is None else state
    if not os.path.isfile(path):
        return state
    with open(path, "rb") as f:
        content = f.read()
    end = content.rfind(b"\n") + 1
    lines = content[:end].splitlines()
    rows = unreadable = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = parse_json_line(line)
            state.ids.add(id_key(row["id"]))
            rows += 1
        except (ValueError, KeyError, TypeError) as e:
            reason = str(e) if isinstance(e, ValueError) else "not an object with an 'id'"
            state.notes.append(f"{path}:{number}: unreadable output line ignored, {reason} (redone)")
            unreadable += 1
            continue
        settings = json.dumps(row.get("settings"), sort_keys=True)
        state.settings.setdefault(settings, f"{path}:{number}")
    if unreadable and not rows:
        # Some other file (notes, a table): rows appended to it would mix into what the user wrote.
        raise ValueError(
            f"{path} holds no output rows ({unreadable} line(s), none a JSON object with an 'id'), so it "
            "is not an output to resume (left as it is); pass another output path"
        )
    piece = content[end:]
    if own and piece.strip():
        where = f"{path}:{len(lines) + 1}"
        if not (piece.startswith(ROW_START) or ROW_START.startswith(piece)):
            raise ValueError(
                f"{where}: the last line has no newline and does not begin like a row ({ROW_START!r}), "
                f"so {path} is not an output to resume (left as it is); pass another output path"
            )
        try:
            row = parse_json_line(piece)
        except ValueError:
            row = None  # cut short: only its start is there
        if isinstance(row, dict):
            state.settings.setdefault(json.dumps(row.get("settings"), sort_keys=True), where)
        state.partial[path] = end
    return state


def read_outputs_of_all_processes(output: str, out_path: str) -> OutputState:
    """read_output over every sibling output of `output` (the --output path), so a resume with another
    process count redoes nothing; out_path is this process's file."""
    state = OutputState()
    for path in sibling_outputs(output):
        read_output(path, own=path == out_path, state=state)
    return state


def cut_partial_lines(state: OutputState) -> list[str]:
    """Cut off the partial last lines that `read_output` found (call it once the rows before them are
    known to be resumable); returns a note per file cut."""
    notes = []
    for path, end in state.partial.items():
        with open(path, "r+b") as f:
            cut = f.seek(0, os.SEEK_END) - end
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        notes.append(f"{path}: truncated a partial last line ({cut} bytes)")
    state.partial.clear()
    return notes


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
    """An exclusive lock on path + ".lock" (its folder created) at the path's real location, so a
    symbolic link to the output takes the same lock, held while the returned file stays open: a second
    writer of the same output fails at once. The lock file keeps the holder's pid and is never removed
    (removing it would let a waiting process and a new one lock two different files)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    f = open(os.path.realpath(path) + ".lock", "a+")
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
    """All of a batch's rows in one write, then flush and fsync: a crash leaves whole lines only. Strict
    JSON: a NaN or infinity (which no JSON reader takes back) is an error, not a line resume redoes."""
    text = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
    f.write(text.encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())
