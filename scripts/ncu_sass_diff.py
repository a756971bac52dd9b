"""Compare two kernels' SASS from an Nsight Compute source export (runs anywhere; no GPU needed).

Input: the CSV of `ncu -i REP --page source --print-source sass --csv` (scripts/gpu_session.sh stages
ncu11, ncu11b, ptxas11, bench11 write it as sass.csv). The export holds one block per profiled kernel
launch, in launch order, each a table of SASS instructions with their execution counts.

  python3 scripts/ncu_sass_diff.py sass.csv --list
  python3 scripts/ncu_sass_diff.py sass.csv 0 4 [--top 30]
  python3 scripts/ncu_sass_diff.py sass.csv 1 --stalls


prints, for launches A and B, the opcodes whose count differs: static (instructions in the binary) and
weighted (warp-level instructions executed), and the memory, MMA and special-function ops of each.
With --stalls, for launch A alone: where its warp-stall samples fall (the instructions holding >= 2% of
them, and every barrier, fence and atomic, with the running share).
"""

from __future__ import annotations

import argparse
import collections
import csv
import re

_PREDICATE = re.compile(r"^@!?U?P\w+\s+")
_MEMORY_OPS = re.compile(r"^(LDG|STG|LDGSTS|CCTL|ATOM|RED|MUFU|HMMA|MEMBAR|LDGDEPBAR|DEPBAR)")


def read_launches(path: str) -> list[tuple[str, list[dict]]]:
    """[(kernel name, [instruction row as {column: value}])] in launch order."""
    rows = list(csv.reader(open(path, newline="")))
    launches, i = [], 0
    while i < len(rows):
        if rows[i] and rows[i][0] == "Kernel Name":
            name, header, j, instructions = rows[i][1], rows[i + 1], i + 2, []
            while j < len(rows) and rows[j] and rows[j][0] != "Kernel Name":
                instructions.append(dict(zip(header, rows[j])))
                j += 1
            launches.append((name, instructions))
            i = j
        else:
            i += 1
    return launches


def opcode(source: str) -> str:
    """The opcode with its modifiers (e.g. LDGSTS.E.BYPASS.128), without a guard predicate."""
    text = _PREDICATE.sub("", source.strip())
    return text.split()[0] if text else ""


def histogram(instructions: list[dict], weighted: bool) -> collections.Counter:
    counts = collections.Counter()
    for row in instructions:
        counts[opcode(row["Source"])] += int(float(row["Instructions Executed"] or 0)) if weighted else 1
    return counts


def print_stalls(name: str, instructions: list[dict]) -> None:
    samples = [int(float(r["Warp Stall Sampling (All Samples)"] or 0)) for r in instructions]
    total = sum(samples)
    print(f"{name}: {total} warp-stall samples")
    running = 0
    for row, n in zip(instructions, samples):
        running += n
        op = opcode(row["Source"])
        if n >= 0.02 * total or re.match(r"(BAR|MEMBAR|ATOM|RED|EXIT)", op):
            print(f"  {n:6d} {running / max(total, 1):6.1%}  {row['Source'].strip()[:70]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("a", type=int, nargs="?")
    parser.add_argument("b", type=int, nargs="?")
    parser.add_argument("--list", action="store_true", help="list the launches and exit")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--stalls", action="store_true", help="launch A's warp-stall samples by instruction")
    args = parser.parse_args(argv)
    launches = read_launches(args.csv)
    for index in (args.a, args.b):
        if index is not None and not 0 <= index < len(launches):
            parser.error(f"{args.csv} holds launches 0-{len(launches) - 1}, not {index}")
    if args.stalls and args.a is not None:
        print_stalls(*launches[args.a])
        return
    if args.list or args.a is None or args.b is None:
        for i, (name, instructions) in enumerate(launches):
            total = sum(histogram(instructions, True).values())
            print(f"{i:3d} {name} ({len(instructions)} instructions, {total} executed)")
        return
    (name_a, ins_a), (name_b, ins_b) = launches[args.a], launches[args.b]
    print(f"A = launch {args.a} ({name_a}), B = launch {args.b} ({name_b})")
    for weighted in (False, True):
        ha, hb = histogram(ins_a, weighted), histogram(ins_b, weighted)
        kind = "executed (warp instructions)" if weighted else "static (in the binary)"
        print(f"\n{kind}: A {sum(ha.values())}, B {sum(hb.values())}")
        keys = sorted(set(ha) | set(hb), key=lambda k: -abs(ha[k] - hb[k]))
        for k in [k for k in keys if ha[k] != hb[k]][: args.top]:
            print(f"  {k:28s} {ha[k]:>12} {hb[k]:>12} {hb[k] - ha[k]:>+12}")
    for label, instructions in (("A", ins_a), ("B", ins_b)):
        mem = histogram([r for r in instructions if _MEMORY_OPS.match(opcode(r["Source"]))], False)
        print(f"\n{label} memory / MMA / MUFU ops (static): {dict(sorted(mem.items()))}")


if __name__ == "__main__":
    main()
