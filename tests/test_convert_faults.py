"""SIGKILL of `longflow-convert` at each stage of a conversion: the source is never touched, OUT holds
nothing, the old complete checkpoint or the new one, a half checkpoint never loads, and the next
conversion sweeps what the killed one left (but never what a live one is writing)."""

import hashlib
import importlib
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

import longflow_jax as lf

convert = importlib.import_module("longflow_jax.convert")  # the package's `convert` is the function

# The converter's CLI; with no_exchange, the fallback that swaps by two renames (no renameat2).
_CLI = (
    "import importlib, sys; c = importlib.import_module('longflow_jax.convert'); "
    "{patch}sys.exit(c.main(sys.argv[1:]))"
)


def _digest(root):
    h = hashlib.sha256()
    for d, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            h.update(name.encode() + open(os.path.join(d, name), "rb").read())
    return h.hexdigest()


def _paused_converter(stage, hf, out, *flags, no_exchange=False):
    """Start the converter with LONGFLOW_FAULT_PAUSE=stage; returns the process once it sits there."""
    patch = "c._exchange = lambda a, b: False; " if no_exchange else ""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLI.format(patch=patch), str(hf), str(out), *flags],
        env=dict(os.environ, LONGFLOW_FAULT_PAUSE=stage, JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.strip() == f"paused at {stage}":
                return proc
    finally:
        watchdog.cancel()
    proc.kill()
    pytest.fail(f"the converter never reached stage {stage!r}: {proc.stderr.read()[-2000:]}")


def _sigkill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    return proc.pid


def _leftovers(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + "."))


@pytest.fixture
def hf(tiny_checkpoints, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(tiny_checkpoints["qwen3"][0], dst)
    return dst


@pytest.mark.parametrize("stage", ["staging", "staged"])
def test_killed_first_conversion_leaves_no_output(hf, tmp_path, stage):
    out, source = tmp_path / "out", _digest(hf)
    pid = _sigkill(_paused_converter(stage, hf, out))
    assert not out.exists()
    assert _leftovers(out) == [f"out.partial-{pid}"]
    if stage == "staging":  # params written, marker not yet: a half checkpoint
        with pytest.raises(lf.CheckpointError, match="not a complete"):
            lf.load(str(tmp_path / f"out.partial-{pid}"))
    lf.convert(str(hf), str(out))
    assert _leftovers(out) == []
    assert lf.load(str(out))[0].dtype == "float32"
    assert _digest(hf) == source


@pytest.mark.parametrize(
    "stage, no_exchange, at_out, left",
    [
        ("staging", False, "old", ["partial"]),
        ("staged", False, "old", ["partial"]),
        ("swapped", False, "new", ["old"]),
        ("swapped", True, "new", ["old"]),
        ("aside", True, None, ["old", "partial"]),  # between the fallback's two renames: no OUT
    ],
)
def test_killed_overwrite_keeps_a_complete_checkpoint(hf, tmp_path, stage, no_exchange, at_out, left):
    out = tmp_path / "out"
    lf.convert(str(hf), str(out))  # the old checkpoint: float32; the new one: bfloat16
    source = _digest(hf)
    pid = _sigkill(
        _paused_converter(stage, hf, out, "--overwrite", "--dtype", "bfloat16", no_exchange=no_exchange)
    )
    assert _digest(hf) == source
    assert _leftovers(out) == [f"out.{kind}-{pid}" for kind in left]
    if at_out is None:
        assert not out.exists()
        # The next conversion puts the complete old checkpoint back before anything else.
        with pytest.raises(ValueError, match="already exists"):
            lf.convert(str(hf), str(out))
        at_out = "old"
    assert lf.load(str(out))[0].dtype == {"old": "float32", "new": "bfloat16"}[at_out]
    lf.convert(str(hf), str(out), dtype="float16", overwrite=True)
    assert _leftovers(out) == []
    assert lf.load(str(out))[0].dtype == "float16"
    assert _digest(hf) == source


def test_a_live_conversion_is_not_swept(hf, tmp_path):
    out = tmp_path / "out"
    proc = _paused_converter("staging", hf, out)
    try:
        lf.convert(str(hf), str(out))
        assert _leftovers(out) == [f"out.partial-{proc.pid}"]
    finally:
        _sigkill(proc)
    lf.convert(str(hf), str(out), overwrite=True)
    assert _leftovers(out) == []


def _mine(path, checkpoint=None):
    """A directory of the user's at `path` (a copy of `checkpoint` if given), with a file to keep."""
    if checkpoint:
        shutil.copytree(checkpoint, path)
    else:
        path.mkdir()
    (path / "mine.txt").write_text("keep me")
    return path


def test_only_directories_the_converter_marked_are_swept(hf, tiny_checkpoints, tmp_path):
    """OUT.old-DATE and OUT.partial-N of the user's (no live PID can be that large) look like leftovers
    of killed conversions: neither a refused conversion nor a finished one touches them, even a complete
    checkpoint while OUT is missing; a leftover that carries the converter's mark is swept."""
    out = tmp_path / "out"
    backup = _mine(tmp_path / "out.old-20240101", tiny_checkpoints["qwen3"][1])
    _mine(tmp_path / "out.partial-20240102")
    (tmp_path / "out.partial-20240103").mkdir()
    (tmp_path / "out.partial-20240103" / convert.STAGING_MARK).write_text("20240103")
    _mine(out)
    with pytest.raises(ValueError, match="already exists"):
        lf.convert(str(hf), str(out))
    assert _leftovers(out) == ["out.old-20240101", "out.partial-20240102", "out.partial-20240103"]
    shutil.rmtree(out)
    lf.convert(str(hf), str(out))
    assert _leftovers(out) == ["out.old-20240101", "out.partial-20240102"]
    assert (backup / "mine.txt").read_text() == "keep me" and lf.load(str(backup))[0].dtype == "float32"
    assert (tmp_path / "out.partial-20240102" / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "no renameat2"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_an_output_made_during_the_conversion_is_kept(hf, tmp_path, monkeypatch, renameat2, overwrite):
    """Without overwrite, an OUT that appears while converting is never replaced (with overwrite, one that
    is not a complete checkpoint neither): the converted copy is left beside it and the error says where."""
    out, staged = tmp_path / "out", tmp_path / f"out.partial-{os.getpid()}"
    monkeypatch.setattr(convert, "_fault_point", lambda stage: stage == "staged" and _mine(out))
    if not renameat2:
        monkeypatch.setattr(convert, "_renameat2", lambda a, b, flags: False)
    match = "refusing to overwrite .*changed during" if overwrite else "appeared during the conversion"
    with pytest.raises(ValueError, match=f"{match}.* the converted checkpoint is at '{staged}'"):
        lf.convert(str(hf), str(out), overwrite=overwrite)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert lf.load(str(staged))[0].dtype == "float32"
    assert not (staged / convert.STAGING_MARK).exists(), "handed to the user: no sweep may delete it"


def test_overwrite_replaces_a_checkpoint_made_during_the_conversion(
    hf, tiny_checkpoints, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    made = lambda stage: stage == "staged" and shutil.copytree(tiny_checkpoints["qwen3"][1], out)
    monkeypatch.setattr(convert, "_fault_point", made)
    lf.convert(str(hf), str(out), dtype="bfloat16", overwrite=True)
    assert lf.load(str(out))[0].dtype == "bfloat16" and _leftovers(out) == []
    assert not (out / convert.STAGING_MARK).exists()


def test_python_dash_m_runs_the_converter(tmp_path):
    """`python -m longflow_jax.convert` is the console script: a missing source is one line and exit 2."""
    missing = tmp_path / "no_such_model"
    proc = subprocess.run(
        [sys.executable, "-m", "longflow_jax.convert", str(missing), str(tmp_path / "out")],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"'{missing}' does not exist" in proc.stderr and not (tmp_path / "out").exists()
