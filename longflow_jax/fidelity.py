"""`longflow-eval fidelity`: how far each cache policy and budget moves a model's outputs.

1. The full cache generates each problem's trajectory (greedy, or sampled with a fixed seed).
2. For every policy x budget the model is teacher-forced along that trajectory with the compressed cache
   (`score_trajectory`): per step, KL(full || compressed) of the next-token distribution, top-1 agreement
   and the trajectory tokens' NLL difference.
3. Free running: each policy x budget generates with the same sampling settings and the same seed (so
   the two runs draw alike until their distributions part); reported are the first step where its tokens
   differ from the full cache's, and whether its extracted final answer agrees with the full cache's and
   with the reference.
All problems share one padded prompt length, so each policy x budget compiles once.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import jax
import numpy as np

from . import runner
from .config import POLICIES, CompressionConfig
from .eval_math import (
    DEFAULT_PROMPT,
    answers_match,
    extract_answer,
    parse_budgets,
    parse_list,
    validate_problem,
)
from .jsonl_io import append_lines, id_key, lock_output
from .trajectory import score_trajectory

PROG = "longflow-eval fidelity"


def parse_runs(policies: str, budgets: str, kv_quant_group: int = 32) -> list[tuple]:
    """(policy, granularity, budget, kv_quant) per run from "longflow,longflow:kv_head@int4,full@int8"
    and "64,128". The full cache runs only quantized (KIVI-style), once, with budget None."""
    runs = []
    for spec in parse_list("--policies", policies, str):
        name, _, kv_quant = spec.partition("@")
        policy, _, granularity = name.partition(":")
        if policy not in POLICIES or (policy == "full" and not kv_quant):
            raise ValueError(
                f"--policies: unknown or uncompressed policy {spec!r}; expected one of {POLICIES[1:]}, "
                f"optionally :kv_head and @KV_QUANT, or full@KV_QUANT"
            )
        budget_list = [None] if policy == "full" else parse_budgets(budgets)
        runs += [(policy, granularity or "sequence", b, kv_quant or None) for b in budget_list]
    for run in runs:
        compression_of(run, kv_quant_group)  # validates
    return list(dict.fromkeys(runs))


def compression_of(run, kv_quant_group: int, thinkv=None) -> CompressionConfig:
    """thinkv: policy "thinkv"'s ThinKVConfig (None: the defaults)."""
    policy, granularity, budget, kv_quant = run
    budget = {} if budget is None else dict(budget=budget)
    return CompressionConfig(
        policy=policy, granularity=granularity, kv_quant=kv_quant, kv_quant_group=kv_quant_group, **budget,
        thinkv=thinkv if policy == "thinkv" else None,
    )  # fmt: skip


def run_name(policy: str, granularity: str, kv_quant: str | None = None) -> str:
    name = policy if granularity == "sequence" else f"{policy}:{granularity}"
    return name if kv_quant is None else f"{name}@{kv_quant}"


def run_key(row: dict) -> tuple:
    return row["policy"], row["granularity"], row["budget"], row.get("kv_quant")


def _padded(rows: list[list[int]], width: int, pad: int) -> np.ndarray:
    out = np.full((len(rows), width), pad, np.int32)
    for r, tokens in enumerate(rows):
        out[r, : len(tokens)] = tokens
    return out


def _first_difference(a: list[int], b: list[int]) -> int | None:
    """The first step where two token lists differ (one ending earlier counts), or None if equal."""
    for t, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return t
    return None if len(a) == len(b) else min(len(a), len(b))


def aggregate(rows: list[dict]) -> dict:
    """One run's problems -> token-weighted means over all their steps, and per-problem rates."""
    steps = max(sum(r["steps"] for r in rows), 1)
    keys = ["mean_kl", "top1_agreement", "nll_diff"]
    keys += ["kv_bytes"] if all("kv_bytes" in r for r in rows) else []  # rows from before the column
    weighted = {k: sum(r[k] * r["steps"] for r in rows) / steps for k in keys}
    diverge = [r["steps"] if r["divergence_step"] is None else r["divergence_step"] for r in rows]
    rates = {k: float(np.mean([r[k] for r in rows])) for k in ("answer_agrees_with_full", "correct")}
    identical = float(np.mean([r["divergence_step"] is None for r in rows]))
    return dict(weighted, **rates, median_divergence=float(np.median(diverge)), identical=identical)


def _by_run(rows: list[dict], runs: list[tuple]) -> dict:
    found = {run: [r for r in rows if run_key(r) == run] for run in runs}
    return {run: aggregate(mine) for run, mine in found.items() if mine}


def summary_table(rows: list[dict], runs: list[tuple], full_correct: float) -> str:
    """Markdown: a row per policy x budget; with the K/V bytes held when every run recorded them."""
    found = _by_run(rows, runs)
    held = all("kv_bytes" in a for a in found.values())
    lines = [
        "| policy | budget | "
        + ("KV held (KiB/seq) | " if held else "")
        + "mean KL (nats/token) | top-1 agreement % | NLL diff (nats/token) | "
        "first divergence (median step) | identical % | answer = full's % | correct % |",
        "|---|---:|" + ("---:|" if held else "") + "---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (policy, granularity, budget, kv_quant), a in found.items():
        lines.append(
            f"| {run_name(policy, granularity, kv_quant)} | {budget or 'all'} | "
            + (f"{a['kv_bytes'] / 1024:.0f} | " if held else "")
            + f"{a['mean_kl']:.4f} | "
            f"{100 * a['top1_agreement']:.1f} | {a['nll_diff']:+.4f} | {a['median_divergence']:.0f} | "
            f"{100 * a['identical']:.0f} | {100 * a['answer_agrees_with_full']:.0f} | "
            f"{100 * a['correct']:.0f} |"
        )
    return "\n".join(lines) + f"\n\nThe full cache itself answers {100 * full_correct:.0f}% correctly."


def plot(rows: list[dict], runs: list[tuple], path: str) -> None:
    """KL and top-1 agreement, a curve per policy: against the K/V bytes held when every run recorded
    them (then a quantized full cache is a point), else against the budget (and it has none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_top1) = plt.subplots(1, 2, figsize=(11, 4))
    curves: dict[str, list] = {}
    found = _by_run(rows, runs)
    held = all("kv_bytes" in a for a in found.values())
    for (policy, granularity, budget, kv_quant), a in found.items():
        if held or budget is not None:
            x = a["kv_bytes"] / 1024 if held else budget
            curves.setdefault(run_name(policy, granularity, kv_quant), []).append((x, a))
    for name, points in curves.items():
        points.sort(key=lambda p: p[0])
        xs = [x for x, _ in points]
        ax_kl.plot(xs, [a["mean_kl"] for _, a in points], marker="o", label=name)
        ax_top1.plot(xs, [100 * a["top1_agreement"] for _, a in points], marker="o", label=name)
    xlabel = "K/V held (KiB per sequence, mean over steps)" if held else "budget (slots per layer)"
    ax_kl.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="mean KL(full || policy)")
    ax_top1.set(xscale="log", xlabel=xlabel, ylabel="top-1 agreement with full (%)")
    for ax in (ax_kl, ax_top1):
        ax.grid(alpha=0.3, which="both")
    ax_top1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help='JSONL: {"question", "true_answer" | "answer"} per line')
    p.add_argument("--output", required=True, help="per-problem JSONL rows, one per problem and run")
    p.add_argument("--table", help="also write the markdown table here")
    p.add_argument("--plot", help="also draw KL and top-1 agreement against budget into this PNG")
    # One device (the runs are compared on it), and granularity / kv_quant per run in --policies.
    runner.add_model_input_args(p)
    runner.add_decoding_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--policies",
        default="longflow,h2o,tova,streaming,random",
        help="POLICY[:GRANULARITY][@KV_QUANT],... (full@KV_QUANT: the quantized full cache)",
    )
    p.add_argument("--budgets", default="64,128,256,512,1024", help="comma-separated KV budgets")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--prompt-template", default=DEFAULT_PROMPT, help="{question} becomes the problem")
    p.add_argument("--resume", action="store_true", help="keep --output's finished runs (same settings)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--time-limit", type=float, help="start no run after this many seconds (then --resume)")
    p.add_argument("--jobs", type=int, default=1, help="policy x budget runs measured at once (threads)")
    return p


def run(args) -> None:
    runner.check_args(args)
    runner.check_plot_path("--plot", args.plot, **{"--input": args.input, "--output": args.output,
                                                    "--table": args.table})  # fmt: skip
    runner.check_table_path(args)
    runner.check_outputs_not_input(
        args, {"--output": args.output, "--output's parts file": parts_path(args.output)}
    )
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise ValueError(f"--time-limit must be > 0 seconds, got {args.time_limit}")
    if "{question}" not in args.prompt_template:
        raise ValueError(f"--prompt-template must contain {{question}}, got {args.prompt_template!r}")
    if args.kv_quant:
        raise ValueError(
            f"--kv-quant {args.kv_quant}: fidelity quantizes per run, as --policies POLICY@KV_QUANT"
        )
    if args.granularity != "sequence":
        raise ValueError(
            f"--granularity {args.granularity}: fidelity takes it per run, as --policies POLICY:GRANULARITY"
        )
    runs = parse_runs(args.policies, args.budgets, args.kv_quant_group)
    if os.path.exists(args.output) and not (args.resume or args.overwrite):
        raise ValueError(f"--output {args.output} exists: pass --resume to continue it or --overwrite")
    settings = {
        k: getattr(args, k)
        for k in ("ckpt", "input", "limit", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
                  "attention_impl", "dtype", "prompt_template", "kv_quant_group", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "no_repeat_ngram_size", "min_new_tokens",
                  "ignore_eos", "stop_token_ids", "stop")
    }  # fmt: skip
    # Free-running runs are separate programs: on GPUs, float32 matmuls at the default precision (TF32)
    # would differ between them by ~1e-3 and part sampled trajectories for that reason alone. The setting
    # is global (the runs' threads do not see a context manager), so it is put back afterwards.
    thinkv = runner.thinkv_from(args)
    precision = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        with lock_output(args.output, PROG):
            done = _finished_rows(args.output, settings, thinkv) if args.resume else []
            finished = {run_key(r) for r in done}
            todo = [run for run in runs if run not in finished]
            new_rows, failed = measure(args, todo, settings, thinkv, done) if todo else ([], [])
            rows = done + new_rows
    finally:
        jax.config.update("jax_default_matmul_precision", precision)
    full_correct = np.mean(list({id_key(r["id"]): r["full_correct"] for r in rows}.values()) or [0.0])
    text = summary_table(rows, runs, full_correct) + "\n\n" + _settings_note(args, rows)
    print(text)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text + "\n")
    if args.plot:
        plot(rows, runs, args.plot)
    if failed:
        raise ValueError(f"{len(failed)} run(s) failed ({', '.join(failed)}); --resume reruns only them")


def _settings_note(args, rows) -> str:
    sampling = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, seed {args.seed}"
    n = len({id_key(r["id"]) for r in rows})
    return (
        f"{n} problems from {os.path.basename(args.input)}, {args.max_new_tokens} new tokens, {sampling}; "
        f"KL, top-1 and NLL teacher-forced along the full cache's trajectory, token-weighted; divergence and "
        f"answers from free-running generation with the same sampling and seed."
    )


def row_settings(settings: dict, policy: str, thinkv) -> dict:
    """A row's settings: ThinKV's calibration counts for its own rows only, so the other policies' rows
    resume whatever calibration file is at hand."""
    return {**settings, "thinkv": dataclasses.asdict(thinkv)} if policy == "thinkv" else settings


def _finished_rows(path: str, settings: dict, thinkv) -> list[dict]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line) if line.strip() else None
            except ValueError as e:
                row = e
            if row is not None and not (isinstance(row, dict) and "id" in row and "policy" in row):
                raise ValueError(
                    f"--resume: {path} line {number} is not one of this command's rows ({row}): a cut or "
                    f"foreign line; use another --output, or mend that line"
                )
            rows += [row] if row is not None else []
    for r in rows:
        if r.get("settings") != json.loads(json.dumps(row_settings(settings, r.get("policy"), thinkv))):
            raise ValueError(
                f"--resume: {path} holds rows made with other settings ({r.get('settings')}); "
                f"use another --output or drop --resume"
            )
    return rows


def _fingerprint(tokens) -> str:
    return hashlib.sha1(np.asarray(tokens, np.int64).tobytes()).hexdigest()


def check_same_problems(done: list[dict], ids: list) -> None:
    """Resumed runs must cover exactly this input's problems: a table would otherwise average one run
    over other problems than the next (an input grown or cut since the rows were made)."""
    want = {id_key(i): i for i in ids}
    covered = {}
    for r in done:
        covered.setdefault(run_key(r), {})[id_key(r["id"])] = r["id"]
    for run, have in covered.items():
        missing = [want[k] for k in want if k not in have]
        extra = [have[k] for k in have if k not in want]
        if missing or extra:
            raise ValueError(
                f"--resume: --output's {run[0]} rows (budget {run[2]}) were made on other problems than "
                f"--input holds now ({len(missing)} of its problems missing, e.g. {missing[:3]}; "
                f"{len(extra)} not in it, e.g. {extra[:3]}): use another --output"
            )


def check_same_trajectories(done: list[dict], fingerprints: dict, lengths: dict) -> None:
    """Resumed rows must have been scored along the trajectories the full cache generates now: another
    device or jax can sample others, and a table mixing them compares runs on different text."""
    for r in done:
        key = id_key(r["id"])
        if key not in fingerprints:
            continue
        was, now = r.get("trajectory_sha1"), fingerprints[key]
        if was is None:  # a row from before the fingerprint: its trajectory's length must match
            was, now = r["steps"], lengths[key]
        if was != now:
            raise ValueError(
                f"--resume: problem {r['id']!r}'s full-cache trajectory ({now}) differs from the one "
                f"--output's {r['policy']} rows were scored along ({was}): another device or software "
                f"samples other text; use another --output"
            )


def parts_path(output: str) -> str:
    """Where a run's finished halves wait for the other (`measure`): beside --output."""
    return output + ".parts"


def _saved_parts(path: str, fingerprints: dict, settings: dict, thinkv) -> dict:
    """{(part, run): per-problem results} of the parts file that fit this invocation: the same settings
    and, for every problem now, the same full-cache trajectory; others are left unused."""
    if not os.path.exists(path):
        return {}
    saved = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # blank, or the last line of a job killed while writing it
                continue
            run = tuple(rec["run"])
            same = rec["settings"] == json.loads(json.dumps(row_settings(settings, run[0], thinkv)))
            mine = {id_key(p["id"]): p for p in rec["problems"]}
            if same and all(k in mine and mine[k]["trajectory_sha1"] == f for k, f in fingerprints.items()):
                saved[(rec["part"], run)] = [mine[k] for k in fingerprints]
    return saved


def measure(args, runs, settings, thinkv, done=()) -> tuple[list[dict], list[str]]:
    """The rows of `runs`, appended to --output run by run, and the names of the runs that failed; with
    --time-limit, runs not yet started when it has passed are left for a later --resume. `done` (rows
    resumed) must share the trajectories generated now (`check_same_trajectories`).

    A run has two halves, its teacher-forced scores and its free-running answers, measured apart. Each
    half is appended to the parts file (`parts_path`) when it is done, and --resume takes the halves
    found there, made with these settings along these trajectories: a call cut short (a time limit, a
    killed job) loses only the halves it had not finished."""
    as_prompt = lambda r: ("prompt", args.prompt_template.replace("{question}", r.data[0]))
    generator, plan = runner.plan_on_one_device(args, validate_problem, PROG, prompt_of=as_prompt)
    records, prompts = plan.records, plan.prompts
    config, pad = generator.config, generator.config.pad_token_id
    width = -(-max(map(len, prompts)) // 16) * 16  # one prompt shape for every run
    compressions = [compression_of(run, args.kv_quant_group, thinkv) for run in runs]
    runner.check_runs(generator, compressions, args, width)  # before any run, not in the middle of them
    rows_per_batch = min(args.batch_size, len(prompts))
    batches = [
        list(range(i, min(i + rows_per_batch, len(prompts)))) for i in range(0, len(prompts), rows_per_batch)
    ]
    seeds = [runner.batch_seed(args.seed, records[b[0]].id) for b in batches]
    options = dict(
        max_new_tokens=args.max_new_tokens,
        sampling=runner.sampling_from(args),
        attention_impl=args.attention_impl,
    )

    def free_run(compression):
        out = []
        for b, seed in zip(batches, seeds):
            out += generator.generate([prompts[i] for i in b], width, rows_per_batch, seed=seed,
                                      compression=compression, stop_strings=args.stop, **options)  # fmt: skip
        return out

    began = start = time.perf_counter()
    full = free_run(CompressionConfig(policy="full"))
    full_answers = [extract_answer(c.text)[0] for c in full]
    fingerprints = [_fingerprint(c.tokens) for c in full]
    fingerprint_of = {id_key(r.id): f for r, f in zip(records, fingerprints)}
    check_same_problems(done, [r.id for r in records])
    check_same_trajectories(
        done, fingerprint_of, {id_key(r.id): len(c.tokens) for r, c in zip(records, full)}
    )
    saved = _saved_parts(parts_path(args.output), fingerprint_of, settings, thinkv) if args.resume else {}
    runner.report(
        f"{len(records)} problems, full-cache trajectories in {time.perf_counter() - start:.0f} s", PROG
    )

    def late():
        return args.time_limit and time.perf_counter() - began > args.time_limit

    def score_group(group):
        """The teacher-forced scores of runs that differ only in budget, in one pass against one reference
        pass: the full cache is the costliest cache to decode, and it is the same for every budget. Per
        run, a summary per problem."""
        if late():
            return None
        start = time.perf_counter()
        scores = {run: [] for run in group}
        for b, seed in zip(batches, seeds):
            traj = [full[i].tokens for i in b]
            per_run = score_trajectory(
                generator.params, config, _padded([prompts[i] for i in b], width, pad),
                np.asarray([len(prompts[i]) for i in b], np.int32), _padded(traj, args.max_new_tokens, pad),
                np.asarray([len(t) for t in traj], np.int32),
                compression=[compression_of(run, args.kv_quant_group, thinkv) for run in group],
                attention_impl=args.attention_impl,
                seed=jax.random.fold_in(jax.random.PRNGKey(seed), 0),  # the generator's device-0 key
            )  # fmt: skip
            for run, s in zip(group, per_run):
                s = jax.tree.map(np.asarray, s)
                for r, i in enumerate(b):
                    steps = int(s.mask[r].sum())
                    n = max(steps, 1)
                    scores[run].append(dict(
                        id=records[i].id, trajectory_sha1=fingerprints[i], steps=steps,
                        mean_kl=float(s.kl[r].sum() / n), top1_agreement=float(s.top1_agree[r].sum() / n),
                        nll_diff=float((s.nll[r] - s.reference_nll[r]).sum() / n),
                        kv_bytes=float(s.kv_bytes[r].sum() / n),
                    ))  # fmt: skip
        policy, granularity, _, kv_quant = group[0]
        runner.report(
            f"{run_name(policy, granularity, kv_quant)} teacher-forced at budgets "
            f"{', '.join(str(run[2] or 'all') for run in group)}: {time.perf_counter() - start:.0f} s",
            PROG,
        )
        return scores

    def free_run_of(run):
        if late():
            return None
        start = time.perf_counter()
        out = [
            dict(id=record.id, trajectory_sha1=f, tokens=[int(t) for t in c.tokens], text=c.text)
            for record, f, c in zip(
                records, fingerprints, free_run(compression_of(run, args.kv_quant_group, thinkv))
            )
        ]
        policy, granularity, budget, kv_quant = run
        runner.report(
            f"{run_name(policy, granularity, kv_quant)} budget {budget or 'all'} free-running: "
            f"{time.perf_counter() - start:.0f} s",
            PROG,
        )
        return out

    def rows_of(run, scores, compressed):
        policy, granularity, budget, kv_quant = run
        new_rows = []
        for i, (record, s, c) in enumerate(zip(records, scores, compressed)):
            answer = extract_answer(c["text"])[0]
            new_rows.append(dict(
                id=record.id, policy=policy, granularity=granularity, budget=budget, kv_quant=kv_quant,
                steps=s["steps"], mean_kl=s["mean_kl"], top1_agreement=s["top1_agreement"],
                nll_diff=s["nll_diff"], kv_bytes=s["kv_bytes"],
                divergence_step=_first_difference(full[i].tokens, c["tokens"]),
                trajectory_sha1=fingerprints[i],
                answer=answer, full_answer=full_answers[i],
                answer_agrees_with_full=full_answers[i] is not None
                and answers_match(answer, full_answers[i]),
                correct=answers_match(answer, record.data[1]),
                full_correct=answers_match(full_answers[i], record.data[1]),
                reference=record.data[1], settings=row_settings(settings, policy, thinkv),
            ))  # fmt: skip
        return new_rows

    groups = {}
    for run in runs:
        policy, granularity, _, kv_quant = run
        groups.setdefault((policy, granularity, kv_quant), []).append(run)
    rows, failed = [], []
    scores = {run: part for (kind, run), part in saved.items() if kind == "score" and run in runs}
    compressed = {run: part for (kind, run), part in saved.items() if kind == "free" and run in runs}
    # Work in threads overlaps one part's compile and host-side loop control with another's device work:
    # a small model's decode step is bound by kernel launches, not by the device. Each run's rows are
    # written once both its parts are done, and a part that fails (out of device memory, say) fails its
    # runs and leaves the others' rows. A part that the time limit kept from starting leaves its runs for
    # a later --resume.
    mode = "a" if args.resume else "w"
    with (
        open(args.output, mode + "b") as f,
        open(parts_path(args.output), mode, encoding="utf-8") as parts,
        ThreadPoolExecutor(args.jobs) as pool,
    ):
        for run in runs:  # both halves saved by an earlier call
            if run in scores and run in compressed:
                new_rows = rows_of(run, scores[run], compressed[run])
                append_lines(f, new_rows)
                rows += new_rows
        futures = {}
        for group in groups.values():
            unscored = [run for run in group if run not in scores]
            if unscored:
                futures[pool.submit(score_group, unscored)] = ("score", unscored)
            futures.update(
                {pool.submit(free_run_of, run): ("free", [run]) for run in group if run not in compressed}
            )
        for future in as_completed(futures):
            part, part_runs = futures[future]
            try:
                result = future.result()
            except Exception as e:  # noqa: BLE001 - reported, and the runs are left for --resume
                result = e
            for run in part_runs:
                if isinstance(result, Exception):
                    policy, granularity, budget, kv_quant = run
                    failed.append(f"{run_name(policy, granularity, kv_quant)} budget {budget or 'all'}")
                    runner.report(f"{failed[-1]} failed: {type(result).__name__}: {result}", PROG)
                    scores[run] = compressed[run] = None
                elif result is not None:
                    done_part = result[run] if part == "score" else result
                    (scores if part == "score" else compressed)[run] = done_part
                    record = dict(part=part, run=list(run), settings=row_settings(settings, run[0], thinkv),
                                  problems=done_part)  # fmt: skip
                    parts.write(json.dumps(record) + "\n")
                    parts.flush()
                if scores.get(run) is not None and compressed.get(run) is not None:
                    new_rows = rows_of(run, scores[run], compressed[run])
                    append_lines(f, new_rows)
                    rows += new_rows
    return rows, sorted(set(failed))


def main(argv=None) -> int:
    return runner.cli_main(run, build_parser(), PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
