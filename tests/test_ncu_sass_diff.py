"""scripts/ncu_sass_diff.py reads an Nsight Compute SASS export and diffs two launches' opcodes."""

import os
import subprocess
import sys

HEADER = '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed"'
EXPORT = f""""Kernel Name","split",
{HEADER}
"0x0","      LDC R1, c[0x0][0x28]","1","512"
"0x10","@!P1  FMUL R28, R28, 0.5","0","8192"
"0x20","MUFU.EX2 R28, R28","3","8192"
"Kernel Name","split",
{HEADER}
"0x0","      LDC R1, c[0x0][0x28]","1","512"
"0x10","MUFU.EX2 R28, R28","2","8192"
"0x20","MUFU.EX2 R29, R29","2","8192"
"""

SCRIPTS = os.path.join(os.path.dirname(__file__), os.pardir, "scripts")
sys.path.insert(0, SCRIPTS)

import ncu_sass_diff  # noqa: E402


def test_reads_launches_and_strips_guard_predicates(tmp_path):
    path = tmp_path / "sass.csv"
    path.write_text(EXPORT)
    launches = ncu_sass_diff.read_launches(str(path))
    assert [name for name, _ in launches] == ["split", "split"]
    first = launches[0][1]
    assert [ncu_sass_diff.opcode(r["Source"]) for r in first] == ["LDC", "FMUL", "MUFU.EX2"]
    assert ncu_sass_diff.histogram(first, weighted=True) == {"LDC": 512, "FMUL": 8192, "MUFU.EX2": 8192}
    assert ncu_sass_diff.histogram(launches[1][1], weighted=False) == {"LDC": 1, "MUFU.EX2": 2}


def test_diff_lists_only_the_opcodes_that_differ(tmp_path):
    path = tmp_path / "sass.csv"
    path.write_text(EXPORT)
    out = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "ncu_sass_diff.py"), str(path), "0", "1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    executed = out.split("executed (warp instructions)")[1].split("\n\n")[0]
    assert "FMUL" in executed and "-8192" in executed  # B has no FMUL
    assert "MUFU.EX2" in executed and "+8192" in executed
    assert "LDC" not in executed  # equal in both: not listed


def test_stalls_lists_the_heavy_instructions_with_their_running_share(tmp_path, capsys):
    path = tmp_path / "sass.csv"
    path.write_text(EXPORT)
    ncu_sass_diff.main([str(path), "0", "--stalls"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "split: 4 warp-stall samples"
    assert lines[1].split()[:2] == ["1", "25.0%"] and lines[1].endswith("LDC R1, c[0x0][0x28]")
    assert lines[2].split()[:2] == ["3", "100.0%"] and lines[2].endswith("MUFU.EX2 R28, R28")
    assert len(lines) == 3  # the FMUL holds no sample: not listed
