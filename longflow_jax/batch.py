"""`longflow-batch`: generate for a JSONL file of prompts, data parallel over the local devices, resumably.

Input, one JSON object a line: {"id": ..., "prompt": "text"} or {"id": ..., "messages": [chat messages]}.
Output, one line per prompt, appended batch by batch: {"id", "text", "prompt_tokens", "completion_tokens",
"finish_reason", "seconds", "settings"}. finish_reason is "stop" (EOS, a --stop-token-ids id or a --stop
string), "length" (max_new_tokens) or "error" (the logits became NaN/inf: the text stops there and a
warning names the ids); "seconds" is the wall time of the prompt's batch, compile excluded (the summary
line gives both); "settings" is what the row was made with. With --stop, "stop_string" names the string
the text was cut before (null: none); the device loop stops on token ids only, so completion_tokens
counts what was generated. With --logprobs K: "token_ids" and their "logprobs" (`generate`'s
return_logprobs), and for K > 0 "top_logprobs", per token [[id, log-prob], ...] best first, without the
tokens the sampling controls banned (log-prob -inf, which JSON cannot hold): fewer than K where they are.

Rerunning resumes: ids already in the output are skipped. A rerun with other settings is refused, naming
the fields that differ, unless --force-new (the old output is renamed to OUT.bak-TIMESTAMP); a partial
last line left by a crash is cut off only once the rows before it pass that check. An --output that is
the --input file is refused. A lock on OUT.lock (OUT's real path: a link to it takes the same lock) makes a
second writer fail at once.

--distributed: `jax.distributed.initialize()`, then process i of n takes the valid records k with
k % n == i, runs them on its own devices with no cross-host communication (a slow or restarted host holds
up nobody) and appends to OUT.i-of-n.jsonl. A run skips the ids done in OUT.jsonl and in every
OUT.i-of-n.jsonl (any n), so a resume with another number of hosts redoes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import jax

from . import jsonl_io, runner
from .config import POLICIES

PROG = "longflow-batch"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help='JSONL: {"id", "prompt"} or {"id", "messages"} per line')
    p.add_argument("--output", required=True, help="JSONL results, appended to (resumable)")
    runner.add_generation_args(p, auto_batch_size=True)
    p.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: jax.distributed.initialize(), then each process takes its share of the input",
    )
    p.add_argument("--policy", default="longflow", choices=POLICIES)
    p.add_argument("--budget", type=int, default=2048, help="KV slots per layer per sequence")
    p.add_argument(
        "--logprobs",
        type=int,
        default=None,
        metavar="K",
        help="write each token's id and log-prob into the row, and its K most likely alternatives",
    )
    p.add_argument(
        "--force-new",
        action="store_true",
        help="start a fresh output (the old one is renamed to OUT.bak-TIMESTAMP) instead of resuming",
    )
    return p


def run_settings(args, compression) -> dict:
    """What a row's output depends on; a resume must use the same."""
    cache = dataclasses.asdict(compression)
    if compression.policy == "full":
        cache["budget"] = None  # not used
    if cache["thinkv"] is None:
        del cache["thinkv"]  # other policies' rows stay as they were, so their outputs still resume
    return {
        "ckpt": os.path.abspath(args.ckpt),
        "dtype": args.dtype,
        **cache,
        "attention_impl": args.attention_impl,
        "max_new_tokens": args.max_new_tokens,
        **dataclasses.asdict(runner.sampling_from(args)),
        "seed": args.seed,
        "chat_template": not args.no_chat_template,
        "chat_template_kwargs": args.chat_template_kwargs,
        "stop": args.stop,
        "logprobs": args.logprobs,
    }


def done_ids(args, out_path: str, process_index: int, process_count: int, settings: dict) -> set[str]:
    """Ids already in the outputs, after checking they were made with `settings` (only then is a partial
    last line of out_path cut off: a refused output is left untouched); with --force-new, none: this
    process's output (and, for process 0, any left by another process count) is set aside."""
    if args.force_new:
        layout = {jsonl_io.output_path(args.output, i, process_count) for i in range(process_count)}
        for path in jsonl_io.sibling_outputs(args.output):
            if path == out_path or (process_index == 0 and path not in layout):
                runner.report(f"--force-new: {path} renamed to {jsonl_io.set_aside(path)}", PROG)
        return set()
    state = jsonl_io.read_outputs_of_all_processes(args.output, out_path)
    for note in state.notes:
        runner.report(note, PROG)
    differences = jsonl_io.settings_differences(state, settings)
    if differences:
        raise ValueError(
            f"{args.output} holds rows made with other settings, so it cannot be resumed:\n  "
            + "\n  ".join(differences)
            + "\nrerun with the same settings, or pass --force-new to start a fresh output (the old "
            "one is kept as OUT.bak-TIMESTAMP)"
        )
    for note in jsonl_io.cut_partial_lines(state):
        runner.report(note, PROG)
    return state.ids


def check_not_input(args, out_path: str) -> None:
    """Refuse an output (this process's file, or any sibling a resume reads or --force-new renames) that
    is the input file."""
    for path in dict.fromkeys([out_path, *jsonl_io.sibling_outputs(args.output)]):
        if jsonl_io.same_file(path, args.input):
            which = "" if path == args.output else f" (its per-process output {path})"
            raise ValueError(
                f"--output {args.output}{which} is the same file as --input {args.input}: rows are "
                "appended to the output (--force-new renames it), so pass an --output other than the input"
            )


def pause_for_fault_tests(out_path: str, batches_written: int) -> None:
    """With LONGFLOW_FAULT_PAUSE_AFTER_BATCH=k, once k batches are written: create OUT.paused and wait
    while it exists, so tests/test_batch_faults.py can kill the process at a known point."""
    pause_at = os.environ.get("LONGFLOW_FAULT_PAUSE_AFTER_BATCH")
    if pause_at is None or int(pause_at) != batches_written:
        return
    flag = out_path + ".paused"
    open(flag, "w").close()
    while os.path.exists(flag):
        time.sleep(0.02)


def start_processes(args) -> tuple[int, int]:
    if args.distributed:
        jax.distributed.initialize()
    return jax.process_index(), jax.process_count()


def run(args) -> None:
    runner.check_args(args)
    process_index, process_count = start_processes(args)
    out_path = jsonl_io.output_path(args.output, process_index, process_count)
    check_not_input(args, out_path)
    with jsonl_io.lock_output(out_path, PROG):
        generate_into(out_path, process_index, process_count, args)


def output_row(record_id, c: runner.Completion, seconds: float, settings: dict, args) -> dict:
    row = {
        "id": record_id,
        "text": c.text,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": len(c.tokens),
        "finish_reason": c.finish_reason,
        "seconds": round(seconds, 3),
        "settings": settings,
    }
    if args.stop:
        row["stop_string"] = c.stop_string
    if args.logprobs is not None:
        row.update(token_ids=c.tokens, logprobs=c.logprobs)
    if args.logprobs:
        row["top_logprobs"] = [[pair for pair in step if math.isfinite(pair[1])] for step in c.top_logprobs]
    return row


def generate_into(out_path: str, process_index: int, process_count: int, args) -> None:
    """This process's share of the input, less the ids done, appended to out_path (locked)."""
    from tqdm import tqdm

    compression = runner.compression_from(args)
    settings = run_settings(args, compression)
    records, skipped = jsonl_io.read_jsonl_records(args.input, jsonl_io.validate_prompt_record)
    runner.handle_skipped(skipped, args.input, args.strict, PROG)
    if not records:
        raise ValueError(f"no valid prompt records in {args.input} ({len(skipped)} line(s) skipped)")
    records = records[process_index::process_count]
    generator = runner.DataParallelGenerator(
        args.ckpt, num_devices=args.devices, dtype=args.dtype, mesh_shape=args.mesh
    )
    # The flags as generate checks them, before --force-new renames the output or a batch creates it.
    runner.check_runs(generator, [compression], args, 1)
    done = done_ids(args, out_path, process_index, process_count, settings)
    todo = [r for r in records if jsonl_io.id_key(r.id) not in done]

    plan = runner.make_plan(generator, todo, args, PROG, compression=compression)
    skipped += plan.skipped
    already_done = len(records) - len(todo)
    shapes = sorted({(b.rows, b.prompt_len) for b in plan.batches}, reverse=True)
    runner.report(
        f"process {process_index}/{process_count}: {len(plan.records)} prompts to generate "
        f"({already_done} already in the output, {len(skipped)} skipped), "
        f"{len(plan.batches)} batches, {generator.describe()}, shapes (rows, prompt_len): {shapes}",
        PROG,
    )

    start = time.perf_counter()
    completion_tokens = errors = 0
    compile_seconds = 0.0
    with (
        open(out_path, "ab") as f,
        tqdm(total=len(plan.records), unit="prompt", disable=args.quiet, dynamic_ncols=True) as bar,
    ):
        pause_for_fault_tests(out_path, 0)
        for written, (compiling, seconds, outputs) in enumerate(
            runner.generate_batches(generator, plan, args, compression, PROG), 1
        ):
            compile_seconds += compiling
            rows = [output_row(record.id, c, seconds, settings, args) for record, c in outputs]
            jsonl_io.append_lines(f, rows)
            completion_tokens += sum(len(c.tokens) for _, c in outputs)
            errors += sum(c.finish_reason == "error" for _, c in outputs)
            bar.update(len(rows))
            bar.set_postfix_str(f"{completion_tokens / (time.perf_counter() - start):.1f} tok/s")
            pause_for_fault_tests(out_path, written)
    seconds = time.perf_counter() - start - compile_seconds
    rate = round(completion_tokens / seconds, 2) if seconds > 0 else 0.0
    print(
        f"{len(plan.records)} prompts, {completion_tokens} tokens in {seconds:.1f} s of generation "
        f"({rate} tokens/s) + {compile_seconds:.1f} s of compilation on {generator.num_devices} device(s); "
        f"{already_done} already done, {len(skipped)} skipped"
        + (f", {errors} stopped on NaN/inf logits (finish_reason 'error')" if errors else "")
        + f" -> {out_path}"
    )


def main(argv=None) -> int:
    return runner.cli_main(run, build_parser(), PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
