#!/usr/bin/env bash
# The project's GPU runs: one named stage per call, each within a 10-minute device call.
#   bash scripts/gpu_run.sh STAGE [ARGS...]   (on the GPU machine, in the repo root; output under $OUT)
# Stages (ARGS go at the end of the stage's command; for the Python scripts a later flag wins):
#   tests [PYTEST ARGS]  the GPU tests: both kernels against the jnp reference, generate through both
#                        kernels against the reference path (default: the four GPU test files), in JOBS (8)
#                        processes where pytest-xdist is installed
#   kernels [ARGS]       scripts/bench_kernels.py --interleave: every column at the standard sizes, with
#                        the copy ceiling
#   generate [ARGS]      scripts/benchmark_generate.py, Qwen3-4B shape, batch 16, 8192 new tokens: the
#                        full cache (Triton, length-aware) against LongFlow C=2048 through Pallas and Triton
#   equal-memory [ARGS]  full cache against LongFlow C=2048, each at the largest batch that fits the same
#                        memory; MODEL (qwen3-4b or r1-distill-qwen-7b) and NEW_TOKENS (8192) from the
#                        environment; LongFlow timed over its first 3072 steps (its buffer is full by
#                        then), the rest projected at the buffer-full rate. The prompt pass runs in slices
#                        of at most PREFILL_ROWS (64) rows: at the largest batch of the 7B shape at 16384
#                        tokens, or of a quantized buffer, one pass does not fit beside the cache.
#                        KV_QUANTS="int8 int4" adds LongFlow at those kv_quant kinds, each at its own
#                        largest batch.
#   fidelity CKPT PROBLEMS [ARGS]  docs/QUALITY.md's SmolLM2 command (the #22 table's policies and budgets;
#                        ARGS such as --policies override), resumed from ROWS (/tmp/fidelity_rows.jsonl,
#                        kept on a warm machine between calls); no run starts after START_LIMIT (300) s,
#                        JOBS (6) runs at once. The rows, and the finished halves of unfinished runs
#                        (ROWS.parts), are copied to $OUT.
#   ab OLD_TREE [ARGS]   no-regression check: scripts/bench_kernels.py from OLD_TREE (an old checkout,
#                        e.g. `git archive COMMIT | tar -x -C old`) and from this tree, as separate processes
#                        taking turns for ROUNDS (2) rounds; then a table of both trees' per-call medians.
#                        A round of both takes 3-5 minutes at all six sizes: pass --sizes to fit a call.
#   profile [ARGS]       Nsight Compute over the Triton decode kernel, one scripts/bench_kernels.py process
#                        per column of PROFILE_COLUMNS (triton,triton_int8,triton_int4) at SIZE (64x2048):
#                        speed of light, occupancy, warp stall reasons, instruction mix, memory workload,
#                        of COUNT (2) calls after the first SKIP (8); one report a column, the columns
#                        sharing TIMEOUT_S. Needs ncu and hardware counters (Firecracker machines have
#                        them, gVisor ones do not).
#   drift [ARGS]         scripts/kernel_drift.py (default: Triton, fp8, kv_head, 6 prompt sets): where greedy
#                        decoding through the kernel leaves the reference's, and why
#   thinkv-layer [ARGS]  scripts/bench_thinkv_layer.py through Triton (default: B 64, budget 2048, Qwen3-4B's
#                        36 layers with 4 in L*): one ThinKV layer of each kind against LongFlow's
#   step-memory [RUN...] XLA's memory reports and buffer assignments of the compiled decode chunk and prompt
#                        pass, one short benchmark_generate run each (MODEL, default qwen3-4b; prompt pass
#                        in 64-row slices): which temporaries they hold (default: int8 group 128 at 400
#                        rows, where the merged-weight copies showed, docs/BENCHMARKS.md)
# The Triton kernel needs jax-triton: carry [".whl"] holding its wheel (docs/DEVICE.md).
set -uo pipefail
stage=${1:?usage: gpu_run.sh tests|kernels|generate|equal-memory|fidelity CKPT PROBLEMS|ab OLD_TREE|profile|drift|thinkv-layer|step-memory [ARGS...]}
shift
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
# "." is the tree a script runs from: this one, or OLD_TREE in the ab stage.
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
limit=${TIMEOUT_S:-570}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader | tee "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"

case "$stage" in
  tests)
    [ $# -gt 0 ] || set -- tests/test_triton_kernel.py tests/test_pallas_kernel.py tests/test_kernel_generate.py \
      tests/test_thinkv_generate.py
    # Compiling the kernels is most of the time: JOBS processes share the GPU, each allocating as it goes
    # (preallocation would give the first process most of the memory and fail the others at collection).
    workers=()
    python3 -c "import xdist" 2>/dev/null && workers=(-n "${JOBS:-8}")
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$limit" python3 -m pytest -q -p no:cacheprovider -rs \
      "${workers[@]}" "$@" 2>&1 | tee "$OUT/tests.log" | tail -30 ;;
  kernels)
    timeout "$limit" python3 scripts/bench_kernels.py --interleave --out "$OUT/bench_kernels.md" "$@" 2>&1 \
      | tee "$OUT/bench_kernels.log" ;;
  generate)
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout "$limit" python3 scripts/benchmark_generate.py --model qwen3-4b \
      --isolate --runs full:16:8192::triton longflow:16:8192:2048:pallas longflow:16:8192:2048:triton \
      --out "$OUT/generate.jsonl" --plot "$OUT/generate.png" "$@" 2>&1 | tee "$OUT/generate.log" ;;
  equal-memory)
    new=${NEW_TOKENS:-8192}
    runs=("full:max:$new::triton" "longflow:max:$new:2048:triton:3072")
    for kind in ${KV_QUANTS:-}; do runs+=("longflow@$kind:max:$new:2048:triton:3072"); done
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout "$limit" python3 scripts/benchmark_generate.py \
      --model "${MODEL:-qwen3-4b}" --isolate --prefill-rows "${PREFILL_ROWS:-64}" --runs "${runs[@]}" \
      --out "$OUT/equal_memory.jsonl" --plot "$OUT/equal_memory.png" "$@" 2>&1 | tee "$OUT/equal_memory.log" ;;
  fidelity)
    [ $# -ge 2 ] || { echo "usage: gpu_run.sh fidelity CKPT PROBLEMS [ARGS...]" >&2; exit 2; }
    ckpt=$1 problems=$2
    shift 2
    rows=${ROWS:-/tmp/fidelity_rows.jsonl}
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 timeout "$limit" python3 -m longflow_jax.eval_math fidelity \
      --ckpt "$ckpt" --input "$problems" --output "$rows" --resume --max-new-tokens 2048 --temperature 0.6 \
      --seed 0 --batch-size 64 --policies longflow,longflow:kv_head,h2o,tova,streaming,rkv,random \
      --budgets 64,128,256,512,1024 --jobs "${JOBS:-6}" --time-limit "${START_LIMIT:-300}" \
      --table "$OUT/fidelity.md" --plot "$OUT/fidelity.png" "$@" 2>&1 | grep -v "it/s" | tee "$OUT/fidelity.log" \
      | tail -60
    cp "$rows" "$OUT/"
    [ ! -f "$rows.parts" ] || cp "$rows.parts" "$OUT/" ;;
  ab)
    old=${1:?usage: gpu_run.sh ab OLD_TREE [ARGS...]}
    shift
    [ -f "$old/scripts/bench_kernels.py" ] || { echo "no scripts/bench_kernels.py under $old" >&2; exit 2; }
    # Flags both trees' bench_kernels.py take: the decode-loop form, columns interleaved within each process.
    args=(--interleave --loops 8 --reps 15
      --columns "${AB_COLUMNS:-xla_attn,pallas,pallas_noevict,triton,triton_noevict}" "$@")
    # This invocation's tables in a folder of their own: the table below reads every one there, and an
    # earlier invocation's (more rounds, a round that failed now) must not join the medians.
    abdir=$(mktemp -d "$OUT/ab.XXXXXX")
    for round in $(seq "${ROUNDS:-2}"); do
      order="old new"
      [ $((round % 2)) -eq 0 ] && order="new old"  # neither tree always runs first
      for tree in $order; do
        dir=.
        [ "$tree" = old ] && dir=$old
        echo "round $round: $tree ($dir)" | tee -a "$OUT/ab.log"
        (cd "$dir" && timeout "$limit" python3 scripts/bench_kernels.py "${args[@]}" \
          --out "$abdir/ab_${tree}_$round.md") >>"$OUT/ab.log" 2>&1 || { echo FAILED; tail -5 "$OUT/ab.log"; }
      done
    done
    python3 - "$abdir" <<'EOF' | tee "$OUT/ab_table.md"
import glob, os, re, statistics, sys

us = {}  # (B, C, column) -> {tree: [median us per call, one per round]}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "ab_*_*.md"))):
    tree = os.path.basename(path).split("_")[1]
    rows = [[c.strip() for c in line.strip(" |\n").split("|")] for line in open(path) if line.startswith("|")]
    for cells in rows[2:]:
        row = dict(zip(rows[0], cells))
        for name, cell in row.items():
            if re.match(r"[\d.]+ \(", cell):  # a timed column: "us (TB/s...)"
                us.setdefault((row["B"], row["C"], name), {}).setdefault(tree, []).append(float(cell.split()[0]))
fmt = lambda ts: f"{statistics.median(ts):.1f} ({min(ts):.1f}-{max(ts):.1f})" if ts else "n/a"
print("\nmedian us per call over the rounds (min-max over the rounds)\n")
print("| B | C | column | old | new | new / old |\n|---|---|---|---|---|---|")
for (b, c, name), runs in us.items():
    old, new = runs.get("old", []), runs.get("new", [])
    ratio = f"{statistics.median(new) / statistics.median(old):.3f}" if old and new else "n/a"
    print(f"| {b} | {c} | {name} | {fmt(old)} | {fmt(new)} | {ratio} |")
EOF
    ;;
  profile)
    command -v ncu >/dev/null || { echo "no ncu on this machine" >&2; exit 2; }
    columns=(${PROFILE_COLUMNS:-triton,triton_int8,triton_int4})
    columns=(${columns[*]//,/ })
    for column in "${columns[@]}"; do
      # Kernel names: decode_{split,fused,coop}_kernel and the combine epilogue. The bandwidth ceiling's
      # child process (256 MiB here) is not profiled. Under ncu, a JAX process holding 75% of the GPU
      # left the child's allocation and ncu's kernel replay short of memory (RESOURCE_EXHAUSTED, then a
      # segfault, on an H100): no preallocation, and no CUDA graphs around the kernels.
      XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS="--xla_gpu_enable_command_buffer= ${XLA_FLAGS:-}" \
        timeout "$((limit / ${#columns[@]}))" ncu --clock-control none --target-processes application-only \
        --kernel-name "regex:^decode_" \
        --launch-skip "${SKIP:-8}" --launch-count "${COUNT:-2}" --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section SchedulerStats --section InstructionStats \
        --section MemoryWorkloadAnalysis --print-summary none \
        python3 scripts/bench_kernels.py --columns "$column" --sizes "${SIZE:-64x2048}" --reps 2 --loops 1 \
        --copy-mb 256 "$@" >"$OUT/ncu_$column.txt" 2>&1
      echo "== $column (rc $?)"
      grep -E "decode_|Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|No Eligible|Stall|Warp Cycles Per Issued" \
        "$OUT/ncu_$column.txt" | head -40
      # No metrics (on gVisor ncu cannot load its profiler library): show why.
      grep -q "Duration" "$OUT/ncu_$column.txt" || tail -5 "$OUT/ncu_$column.txt"
    done ;;
  drift)
    timeout "$limit" python3 scripts/kernel_drift.py --impl triton --kv-quant fp8 --granularity kv_head \
      --dump "$OUT/drift_inputs" "$@" 2>&1 \
      | grep -v Warning | tee "$OUT/kernel_drift.log" ;;
  thinkv-layer)
    timeout "$limit" python3 scripts/bench_thinkv_layer.py --impl triton "$@" 2>&1 | grep -v Warning \
      | tee "$OUT/thinkv_layer.log" ;;
  step-memory)
    # One short run per RUN (default: Qwen3-4B's int8 group 128 at its equal-memory batch, where XLA's
    # merged-weight copies showed without COMPILER_OPTIONS; docs/BENCHMARKS.md), with XLA's dump of the
    # compiled decode chunk and prompt pass only: what each temporary buffer is.
    [ $# -gt 0 ] || set -- longflow@int8/128:400:16384:2048:triton:512
    for run in "$@"; do
      dir="$OUT/step_memory/${run//[^A-Za-z0-9]/_}"
      mkdir -p "$dir/dump"
      XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95} \
        XLA_FLAGS="--xla_dump_to=$dir/dump --xla_dump_hlo_module_re=jit_chunk_body|jit_prefill_fn --xla_dump_hlo_as_text ${XLA_FLAGS:-}" \
        timeout "$((limit / $#))" python3 scripts/benchmark_generate.py --model "${MODEL:-qwen3-4b}" \
        --prefill-rows 64 --runs "$run" 2>&1 | grep -v Warning | grep -E "working set|tok/s, " | tee "$dir/run.log"
      # The reports, not the HLO text: the largest allocations and every buffer's assignment.
      find "$dir/dump" \( -name "*memory-usage-report*" -o -name "*after_optimizations-buffer-assignment.txt" \) \
        -exec mv {} "$dir/" \;
      rm -rf "$dir/dump"
      head -30 "$dir"/*memory-usage-report* 2>/dev/null
    done ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
