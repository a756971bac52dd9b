"""`longflow-batch`: generate for a JSONL file of prompts, data parallel over the local devices, resumably.

Input, one JSON object a line: {"id": ..., "prompt": "text"} or {"id": ..., "messages": [chat messages]}.
Output, one line per prompt, appended batch by batch:
  {"id", "text", "prompt_tokens", "completion_tokens", "finish_reason": "stop"|"length", "seconds"}
("seconds": wall time of the batch the prompt was generated in, compile included on a new shape).
Ids already in the output are skipped, so rerunning the command resumes.

Multi-host (--distributed): `jax.distributed.initialize()`, then every process reads the whole input,
takes the valid records k with k % process_count == process_index and runs them on its own devices with
no cross-host communication, so a slow or restarted host holds up nobody. Process i of n appends to
OUT.i-of-n.jsonl; a run skips the ids done in OUT.jsonl and in every OUT.*-of-*.jsonl, so a resume with
another number of hosts does not redo finished prompts.
"""

from __future__ import annotations

import argparse
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
    runner.add_generation_args(p)
    p.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: jax.distributed.initialize(), then each process takes its share of the input",
    )
    p.add_argument("--policy", default="longflow", choices=POLICIES)
    p.add_argument("--budget", type=int, default=2048, help="KV slots per layer per sequence")
    return p


def start_processes(args) -> tuple[int, int]:
    if args.distributed:
        jax.distributed.initialize()
    return jax.process_index(), jax.process_count()


def run(args) -> None:
    from tqdm import tqdm

    runner.check_args(args)
    compression = runner.compression_from(args)
    process_index, process_count = start_processes(args)
    out_path = jsonl_io.output_path(args.output, process_index, process_count)

    records, skipped = jsonl_io.read_jsonl_records(args.input, jsonl_io.validate_prompt_record)
    runner.handle_skipped(skipped, args.input, args.strict, PROG)
    records = records[process_index::process_count]
    done, notes = jsonl_io.done_ids_of_all_processes(out_path)
    for note in notes:
        runner.report(note, PROG)
    todo = [r for r in records if jsonl_io.id_key(r.id) not in done]

    generator = runner.DataParallelGenerator(args.ckpt, num_devices=args.devices, dtype=args.dtype)
    plan = runner.make_plan(generator, todo, args, PROG)
    skipped += plan.skipped
    already_done = len(records) - len(todo)
    shapes = sorted({(b.rows, b.prompt_len) for b in plan.batches}, reverse=True)
    runner.report(
        f"process {process_index}/{process_count}: {len(plan.records)} prompts to generate "
        f"({already_done} already in the output, {len(skipped)} skipped), "
        f"{len(plan.batches)} batches, data parallel over {generator.num_devices} device(s) "
        f"[{generator.mesh.devices.flat[0].platform}], shapes (rows, prompt_len): {shapes}",
        PROG,
    )

    start = time.perf_counter()
    completion_tokens = 0
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with (
        open(out_path, "ab") as f,
        tqdm(total=len(plan.records), unit="prompt", disable=args.quiet, dynamic_ncols=True) as bar,
    ):
        for seconds, outputs in runner.generate_batches(generator, plan, args, compression):
            rows = [
                {
                    "id": record.id,
                    "text": c.text,
                    "prompt_tokens": c.prompt_tokens,
                    "completion_tokens": len(c.tokens),
                    "finish_reason": c.finish_reason,
                    "seconds": round(seconds, 3),
                }
                for record, c in outputs
            ]
            jsonl_io.append_lines(f, rows)
            completion_tokens += sum(len(c.tokens) for _, c in outputs)
            bar.update(len(rows))
            bar.set_postfix_str(f"{completion_tokens / (time.perf_counter() - start):.1f} tok/s")
    seconds = time.perf_counter() - start
    rate = round(completion_tokens / seconds, 2) if seconds > 0 else 0.0
    print(
        f"{len(plan.records)} prompts, {completion_tokens} tokens in {seconds:.1f} s "
        f"({rate} tokens/s, compile included) on {generator.num_devices} device(s); "
        f"{already_done} already done, {len(skipped)} skipped -> {out_path}"
    )


def main(argv=None) -> int:
    return runner.cli_main(run, build_parser(), PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
