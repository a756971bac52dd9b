"""longflow-batch under faults, in subprocesses: SIGKILL at several points then a resume loses and
duplicates no id; a second writer of the same output fails at once and the first finishes alone.

The job pauses at a known point through LONGFLOW_FAULT_PAUSE_AFTER_BATCH=k: once k batches are written
it creates OUT.paused and waits while that file exists.
"""

import collections
import json
import os
import signal
import subprocess
import sys
import time

from helpers import write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [{"id": i, "prompt": f"prompt {i}"} for i in range(6)]  # 3 batches of 2, one shape


def start(ckpt, inp, out, pause_after=None):
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    env.pop("LONGFLOW_FAULT_PAUSE_AFTER_BATCH", None)
    if pause_after is not None:
        env["LONGFLOW_FAULT_PAUSE_AFTER_BATCH"] = str(pause_after)
    cmd = [sys.executable, "-m", "longflow_jax.batch", "--ckpt", ckpt, "--input", inp, "--output", out]
    cmd += ["--max-new-tokens", "4", "--budget", "16", "--batch-size", "2", "--quiet"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_paused(proc, out, timeout=120):
    deadline = time.monotonic() + timeout
    while not os.path.exists(out + ".paused"):
        assert proc.poll() is None, f"exited with {proc.returncode} before pausing: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "did not pause in time"
        time.sleep(0.05)


def id_counts(out):
    if not os.path.exists(out):
        return collections.Counter()
    with open(out, "rb") as f:
        content = f.read()
    assert not content or content.endswith(b"\n"), "a partial line"
    return collections.Counter(json.loads(line)["id"] for line in content.splitlines())


def test_sigkill_at_several_points_then_resume_loses_and_duplicates_nothing(chat_ckpt, tmp_path):
    inp, out = write_jsonl(tmp_path / "in.jsonl", PROMPTS), str(tmp_path / "out.jsonl")
    # killed before its first batch, then after one batch of a resume, then after one of the next
    for pause_after, rows_then in [(0, 0), (1, 2), (1, 4)]:
        proc = start(chat_ckpt, inp, out, pause_after)
        wait_until_paused(proc, out)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        os.remove(out + ".paused")
        counts = id_counts(out)
        assert sum(counts.values()) == rows_then and set(counts.values()) <= {1}
    proc = start(chat_ckpt, inp, out)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert id_counts(out) == collections.Counter(p["id"] for p in PROMPTS)


def test_a_second_writer_fails_at_once_and_the_first_writes_every_id_once(chat_ckpt, tmp_path):
    inp, out = write_jsonl(tmp_path / "in.jsonl", PROMPTS), str(tmp_path / "out.jsonl")
    first = start(chat_ckpt, inp, out, pause_after=1)
    wait_until_paused(first, out)
    second = start(chat_ckpt, inp, out)
    _, err = second.communicate(timeout=60)
    assert second.returncode == 2
    assert f"longflow-batch: error: another longflow-batch process is writing {out} (pid {first.pid})" in err
    os.remove(out + ".paused")
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert id_counts(out) == collections.Counter(p["id"] for p in PROMPTS)
