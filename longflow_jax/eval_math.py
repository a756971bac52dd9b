"""`longflow-eval`: math accuracy (GSM8K / MATH style) of one checkpoint under several KV-cache policies.

Input JSONL, one problem a line: {"id", "question" or "problem", "answer"} ("true_answer", then
"solution", stand in for a missing "answer"; a missing id becomes the line number). Each (policy,
budget) run generates for every problem (the full cache runs once: budgets do not apply to it),
extracts the model's final answer (`extract_answer`) and scores it against the reference
(`reference_answer`) with `answers_match`. Prints one accuracy table (policy x budget) and writes a
JSONL row per problem and run, run by run, each run's rows in input order. An existing --output is
refused unless --overwrite; one that is the --input file always is.

Each question becomes the user message through --prompt-template (default `DEFAULT_PROMPT`, its
`{question}` field replaced), which the run prints and records under the table.

Scoring is deliberately exact: numbers compare as rationals (1,000 = 1000.0 = $1000; 0.5 = 1/2 =
\\frac{1}{2}; but 0.33 != \\frac{1}{3}), everything else as normalised LaTeX strings (spaces, \\left/
\\right, \\text{}, \\dfrac, ^\\circ, \\%, $ and units after a number removed); tuples and intervals
compare element by element with the same brackets.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from fractions import Fraction

from . import runner
from .config import POLICIES, CompressionConfig
from .jsonl_io import Record, append_lines, lock_output, read_jsonl_records

PROG = "longflow-eval"
DEFAULT_PROMPT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."


def _braced(text: str, open_at: int) -> tuple[str, int] | None:
    """text[open_at] == "{": (content up to its matching "}", index after it), or None if unclosed.
    Escaped braces (\\{ \\}) do not count."""
    depth, i = 0, open_at
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i], i + 1
        i += 1
    return None


_BOXED = re.compile(r"\\(?:boxed|fbox)\b")


def last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} or \\fbox{...} (nested braces), or of `\\boxed 5`."""
    for m in reversed(list(_BOXED.finditer(text))):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            found = _braced(text, i)
            if found is not None:
                return found[0].strip()
        elif i > m.end():  # "\boxed 5": up to the next space or $
            word = re.match(r"[^\s$]+", text[i:])
            if word:
                return word.group(0)
    return None


_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_LAST_NUMBER = re.compile(rf"(?:{_NUMBER})(?:/(?:\d+))?")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+)", re.IGNORECASE)


def extract_answer(text: str) -> tuple[str | None, str]:
    """The model's final answer and how it was found, first match wins: "boxed" (the last \\boxed{}),
    "####", "answer_is" ("the answer is x") or "last_number"; else (None, "none")."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed, "boxed"
    if "####" in text:
        after = text.rsplit("####", 1)[1].strip().splitlines()
        if after and after[0].strip():
            return after[0].strip(), "####"
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        sentence = re.split(r"\.\s|\n", matches[-1].group(1))[0].strip().rstrip(".").strip()
        sentence = sentence.strip("*_").strip()  # markdown emphasis: "the answer is **42**"
        # "the answer is 42, since ...": a number before a clause is the answer; "(1, 2)" stays whole.
        head = re.split(r"[,;]\s", sentence, maxsplit=1)[0]
        if _LAST_NUMBER.fullmatch(head):
            sentence = head
        if sentence:
            return sentence, "answer_is"
    numbers = _LAST_NUMBER.findall(text)
    return (numbers[-1], "last_number") if numbers else (None, "none")


def reference_answer(answer: str) -> str:
    """GSM8K "... #### 42" -> "42"; a MATH solution -> its last \\boxed{}; else the answer itself."""
    answer = str(answer)
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip()
    boxed = last_boxed(answer)
    return boxed if boxed is not None else answer.strip()


_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*(?=\{)")
_SPACING = re.compile(r"\\[!,;: ]|\\q?quad(?![a-zA-Z])|~|\\displaystyle(?![a-zA-Z])")


def _unwrap(s: str, pattern: re.Pattern) -> str:
    """\\text{abc} -> abc, with nested braces."""
    while True:
        m = pattern.search(s)
        if not m:
            return s
        found = _braced(s, m.end())
        if found is None:
            return s[: m.start()] + s[m.end() :]
        s = s[: m.start()] + found[0] + s[found[1] :]


def normalize_answer(answer: str) -> str:
    """A canonical string for an answer: no spaces, units, $ or %, \\dfrac -> \\frac, and so on."""
    s = str(answer).strip()
    s = s.replace("\u2212", "-").replace("\u2013", "-").replace("\u00b0", "")
    s = re.sub(r"\\(?:left|right)\.", "", s)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = _unwrap(s, _TEXT_WRAPPERS)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = s.replace("\\{", "{").replace("\\}", "}")
    s = _SPACING.sub(" ", s)
    s = s.strip().rstrip(".").strip()
    # A variable being assigned: "x = 5" -> "5" (only a single letter on the left of one "=").
    s = re.sub(r"\A[a-zA-Z]\s*=\s*([^=]+)\Z", r"\1", s)
    # Units after a number: "18 dollars", "5 cm^2", "3 square feet" -> the number.
    s = re.sub(rf"\A({_NUMBER})\s+[a-zA-Z]+(?:\s+[a-zA-Z]+)*(?:\^\{{?\d\}}?)?\Z", r"\1", s)
    s = re.sub(r"\s+", "", s)
    # Shorthand LaTeX: \frac12 -> \frac{1}{2}, \frac{1}2 -> \frac{1}{2}, \sqrt2 -> \sqrt{2}.
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\{[^{}]*\})(\d)", r"\\frac\1{\2}", s)
    s = re.sub(r"\\frac(\d)(\{)", r"\\frac{\1}\2", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    # A multiple-choice letter in parentheses: "(B)" -> "B".
    return re.sub(r"\A\(([A-Za-z])\)\Z", r"\1", s)


_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+")


def to_number(s: str) -> Fraction | None:
    """A normalised answer as an exact rational, or None: 1,000 / 2.50 / -3 / 1/2 / \\frac{-1}{2} /
    -\\frac{3}{4} (no other expressions); leading signs combine (--3 = 3)."""
    if _PLAIN_NUMBER.fullmatch(s):
        return Fraction(s.replace(",", "").rstrip(".") or "0")
    body = s.lstrip("-+")
    if body != s:  # counted, not recursed on: a degenerate answer may hold thousands of signs
        value = to_number(body) if body else None
        negative = s[: len(s) - len(body)].count("-") % 2 == 1
        return None if value is None else (-value if negative else value)
    m = re.fullmatch(r"\\frac\{([^{}]+)\}\{([^{}]+)\}", s) or re.fullmatch(r"([^/]+)/([^/]+)", s)
    if not m:
        return None
    num, den = (to_number(part) for part in m.groups())
    if num is None or den is None or den == 0:
        return None
    return num / den


def _split_top_level(s: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    return parts + [s[start:]]


def _normalized_match(a: str, b: str) -> bool:
    if not a or not b:
        return False
    if a == b:
        return True
    x, y = to_number(a), to_number(b)
    if x is not None and y is not None:
        return x == y
    # Tuples and intervals: same brackets, same length, elements equal.
    if len(a) > 2 and len(b) > 2 and a[0] + a[-1] == b[0] + b[-1] and a[0] in "([{" and a[-1] in ")]}":
        xs, ys = _split_top_level(a[1:-1]), _split_top_level(b[1:-1])
        if len(xs) == len(ys) > 1:
            return all(_normalized_match(u, v) for u, v in zip(xs, ys))
    return False


def answers_match(prediction: str | None, reference: str) -> bool:
    """Whether an extracted answer equals the reference, after normalisation (see module docstring)."""
    if prediction is None:
        return False
    return _normalized_match(normalize_answer(prediction), normalize_answer(reference))


def validate_problem(obj: dict) -> tuple[str, str]:
    question = obj.get("question", obj.get("problem"))
    if not isinstance(question, str) or not question.strip():
        raise ValueError("needs a non-empty string 'question' (or 'problem')")
    answer = obj.get("answer", obj.get("true_answer", obj.get("solution")))
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("needs a non-empty 'answer' (or 'true_answer' or 'solution')")
    reference = reference_answer(answer)
    if not reference:
        raise ValueError(f"no final answer found in {answer[-60:]!r}")
    return question, reference


def parse_list(flag: str, text: str, kind):
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        if items:
            return [kind(t) for t in items]
    except ValueError:
        pass
    raise ValueError(f"{flag} expects a comma-separated list of {kind.__name__}, got {text!r}")


def parse_budgets(text: str) -> list[int]:
    budgets = parse_list("--budgets", text, int)
    least = runner.MIN_VALUES["budget"]
    if min(budgets) < least:
        raise ValueError(f"--budgets must all be >= {least} (KV slots per layer), got {text!r}")
    return budgets


def runs_for(policies: list[str], budgets: list[int]) -> list[tuple[str, int | None]]:
    """(policy, budget) pairs; the full cache once with budget None."""
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"unknown policy {p!r}; expected some of {POLICIES}")
    runs = []
    for p in dict.fromkeys(policies):
        runs += [(p, None)] if p == "full" else [(p, b) for b in dict.fromkeys(budgets)]
    return runs


def accuracy_table(results: dict, policies: list[str], budgets: list[int], n: int) -> str:
    """Markdown: a row per policy, a column per budget; cells "accuracy % (correct/n)"."""
    budgets = list(dict.fromkeys(budgets))
    lines = [
        "| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    cell = lambda correct: f"{100 * correct / n:.1f} ({correct}/{n})" if n else "-"
    for p in dict.fromkeys(policies):
        cells = [cell(results[(p, None if p == "full" else b)]) for b in budgets]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_prompt_template(template: str) -> None:
    if "{question}" not in template:
        raise ValueError(
            f"--prompt-template must contain the field {{question}} (where each problem goes), "
            f"got {template!r}"
        )


def score(problem: Record, c: runner.Completion) -> dict:
    """A problem's output row: the answer extracted from the completion, and whether it is correct (a
    completion cut short by NaN/inf logits never is)."""
    prediction, how = extract_answer(c.text)
    return {
        "id": problem.id,
        "reference": problem.data[1],
        "prediction": prediction,
        "extracted_by": how,
        "correct": c.finish_reason != "error" and answers_match(prediction, problem.data[1]),
        "completion_tokens": len(c.tokens),
        "finish_reason": c.finish_reason,
        "text": c.text,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help='JSONL: {"id", "question"|"problem", "answer"} per line')
    p.add_argument("--output", required=True, help="per-problem JSONL rows (a new file; not resumed)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--table", default=None, help="also write the markdown accuracy table here")
    runner.add_generation_args(p)
    p.add_argument("--policies", default="full,longflow", help=f"comma-separated, from {POLICIES}")
    p.add_argument("--budgets", default="2048", help="comma-separated KV budgets (slots per layer)")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument(
        "--prompt-template", default=DEFAULT_PROMPT, help="the user message; {question} becomes the problem"
    )
    return p


def run(args) -> None:
    runner.check_args(args)
    check_prompt_template(args.prompt_template)
    policies = parse_list("--policies", args.policies, str)
    budgets = parse_budgets(args.budgets)
    runs = runs_for(policies, budgets)
    runner.check_table_path(args)
    runner.check_outputs_not_input(args, {"--output": args.output})
    if os.path.exists(args.output) and not args.overwrite:
        raise ValueError(
            f"--output {args.output} exists: pass --overwrite to replace it, or another --output"
        )
    with lock_output(args.output, PROG):
        evaluate(args, policies, budgets, runs)


def evaluate(args, policies: list[str], budgets: list[int], runs: list[tuple[str, int | None]]) -> None:
    from tqdm import tqdm

    problems, skipped = read_jsonl_records(args.input, validate_problem, id_from_line=True)
    runner.handle_skipped(skipped, args.input, args.strict, PROG)
    generator = runner.DataParallelGenerator(
        args.ckpt, num_devices=args.devices, dtype=args.dtype, mesh_shape=args.mesh
    )
    as_prompt = lambda r: ("prompt", args.prompt_template.replace("{question}", r.data[0]))
    plan = runner.make_plan(generator, problems[: args.limit], args, PROG, prompt_of=as_prompt)
    skipped += plan.skipped
    n = len(plan.records)
    if not n:
        raise ValueError(f"no problems to evaluate in {args.input}")
    runner.report(
        f"{n} problems ({len(skipped)} skipped), runs {runs}, {len(plan.batches)} batches each, "
        f"{generator.describe()}; prompt template {args.prompt_template!r}",
        PROG,
    )

    compressions = []
    for policy, budget in runs:
        # the full cache has no budget: CompressionConfig's default stands in, unused
        sized = {} if budget is None else {"budget": budget}
        compressions.append(CompressionConfig(
            policy=policy, granularity=args.granularity, kv_quant=args.kv_quant,
            kv_quant_group=args.kv_quant_group, **sized,
            thinkv=runner.thinkv_from(args) if policy == "thinkv" else None,
        ))  # fmt: skip
    # Every run checked as `generate` checks it before the output is opened: a budget the model cannot
    # take would otherwise fail in its run, after the earlier runs' rows were written.
    runner.check_runs(generator, compressions, args, max(map(len, plan.prompts)))

    results = {}  # (policy, budget) -> problems answered correctly
    errors = 0
    start = time.perf_counter()
    with open(args.output, "wb") as f, tqdm(total=n * len(runs), unit="problem", disable=args.quiet) as bar:
        for (policy, budget), comp in zip(runs, compressions):
            rows = []  # (input line, row): the batches come bucketed by length
            for _, _, outputs in runner.generate_batches(generator, plan, args, comp, PROG):
                for p, c in outputs:
                    stop = {"stop_string": c.stop_string} if args.stop else {}
                    rows.append((p.line, {"policy": policy, "budget": budget, **score(p, c), **stop}))
                bar.update(len(outputs))
            rows = [row for _, row in sorted(rows, key=lambda pair: pair[0])]
            results[(policy, budget)] = sum(row["correct"] for row in rows)
            errors += sum(row["finish_reason"] == "error" for row in rows)
            append_lines(f, rows)
    seconds = time.perf_counter() - start
    table = accuracy_table(results, policies, budgets, n)
    notes = [
        f"{n} problems from {args.input}, max_new_tokens {args.max_new_tokens}, "
        f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}, "
        f"{seconds:.1f} s; accuracy % (correct/n)",
        f"prompt template (--prompt-template): {args.prompt_template!r}",
    ]
    if "full" in policies:
        notes.append("full: the full cache, one run (the budget does not apply)")
    if skipped:
        notes.append(f"{len(skipped)} input problem(s) skipped (reported above)")
    if errors:
        notes.append(f"{errors} row(s) stopped on NaN/inf logits (finish_reason 'error', scored wrong)")
    text = table + "\n\n" + "\n".join(notes)
    print(text)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text + "\n")


def main(argv=None) -> int:
    """`longflow-eval ...` scores answers; `longflow-eval fidelity ...` runs the fidelity harness."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fidelity"]:
        from . import fidelity

        return fidelity.main(argv[1:])
    return runner.cli_main(run, build_parser(), PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
