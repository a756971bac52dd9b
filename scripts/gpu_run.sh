#!/usr/bin/env bash
# Every GPU acceptance run of the project, in stages that each fit one 10-minute device call.
#   bash scripts/gpu_session.sh STAGE      (on the GPU machine, in the repo root; logs under $OUT)
# Stages:
#   tests     the GPU test suite: HF parity on GPU, both kernels vs the jnp reference, generate
#             through the kernels vs the reference path                                   (~3 min)
#   kernels   scripts/bench_kernels.py: B {1,16,64} x C {2048,8192}, all columns, ceiling  (~4 min)
#   gen       scripts/benchmark_generate.py, Qwen3-4B shape: full B=1 and B=16, full vs LongFlow
#             C=2048 at B=16 over 8192 tokens (reference path and kernels)                 (~8 min)
#   maxbatch  equal memory: full vs LongFlow at the largest batch that fits, 8192 tokens   (~9 min)
#   triton    the Triton kernel's GPU tests + generate through it vs the reference          (~2 min)
#   eq16      Qwen3-4B, batch 16, 8192 tokens: full (Triton, length-aware) vs LongFlow       (~4 min)
#   max4b     Qwen3-4B, equal memory, 8192 tokens: full at its largest batch vs LongFlow at
#             its largest batch (LongFlow timed over 3072 steps: its buffer is full by 1920)  (~6 min)
#   max7b     the same for the DeepSeek-R1-Distill-Qwen-7B shape                           (~7 min)
#   max16k    Qwen3-4B, equal memory, 16384 tokens (LongFlow timed over 3072 steps)         (~7 min)
#   max7b16k  R1-Distill-7B shape, equal memory, 16384 tokens (LongFlow over 3072 steps)    (~8 min)
#   lfwhole   Qwen3-4B, LongFlow at its largest batch timed over all 8192 steps (checks the
#             projection of max4b)                                                          (~6 min)
#   vnorm     Triton GPU tests + generate through both kernels, then the kernel table for the Triton
#             columns (||v||_1 on the tensor cores vs as a row sum vs no scoring) and XLA  (~7 min)
#   final4    the Triton kernel's GPU tests, then the profiler's kernel times of the default Triton
#             configuration with and without scoring at the six benchmark sizes               (~6 min)
#   final4b   generate through both kernels vs the reference, then scripts/bench_kernels.py, all
#             columns                                                                          (~6 min)
#   pallas8   the Pallas kernel's GPU tests and generate through both kernels (session 8: the GPU epilogue
#             is a second Pallas kernel)                                                     (~5 min)
#   pprof8    the profiler's kernel times of XLA and the Pallas kernel with/without scoring  (~4 min)
#   psweep8   Pallas split counts at every benchmark size, 128-slot blocks, 4 warps, 2 stages (~5 min)
#   psweep8b  three passes of the split sweep at 1x2048, 1x8192, 16x2048 (and XLA at 1x2048) (~3 min)
#   cbuf8     are the Pallas kernels in XLA's command buffers? optimized HLO of a 4-call chain, then
#             the B=1 / 16x2048 tables with command buffers default, off, min graph size 1   (~4 min)
#   mend8     the review mend: Triton final-reduce tests and the Pallas GPU tests          (~6 min)
#   psplit9   GPU kernel time (profiler) of the Pallas call at B = 1 by split count and block size: which
#             setting has the least GPU time (decode + combine + chunk reduction)         (~3 min)
#   fmid9     the Triton kernel at B = 16-32: the fused epilogue with one 128-slot split (one launch plus
#             the tickets' memset) against the default (separate), no scoring and XLA, interleaved (~4 min)
#   hint9     the Pallas call with L2 eviction hints (t stored evict_last; t loaded evict_first by the
#             combine kernel; K/V loaded evict_first), interleaved by throughput against no hints. Needs
#             commit 0809abb (the policy constants were removed after hint9b)                (~3 min)
#   hint9b    t stored evict_last against no hint, 20 interleaved repetitions, then the Pallas GPU tests
#             and generate (420 s; 300 s cut it off in session 9). Needs commit 31022de     (~9 min)
#   pfx9      profiler kernel times (XLA, Pallas with/without scoring, Triton without), then the Pallas
#             GPU tests; run in session 9 at commit 26b57d3 (valid mask prefetched, backed out) (~7 min)
#   xla10     the Triton kernels through XLA's own Triton custom call (xla_call) against jax-triton's
#             launch, no scoring too, and XLA's attention, interleaved by throughput, all sizes (~8 min)
#   xla10b    GPU tests of the XLA launch, then the profiler's GPU and idle time per call of both launches
#             at 1x2048, 16x2048, 64x8192                                                       (~7 min)
#   xla10c    the XLA launch's GPU tests, XLA's PTX of the kernels against the triton package's, then every
#             epilogue through the XLA launch against the jax-triton default, interleaved   (~9 min)
#   xla10d    XLA's PTX against the triton package's; B 1-8 and 16x2048 with the new default (XLA's launch at a
#             small batch) against jax-triton's launch and XLA's attention, interleaved          (~6 min)
#   final10   all GPU tests of tests/test_triton_kernel.py (session 10 code)                  (~9 min)
#   final10b  generate through both kernels vs the reference, then the kernel table: XLA, Pallas, the
#             Triton default and jax-triton's launch, with and without scoring, interleaved  (~7 min)
#   xla10e    B = 1: 40 interleaved repetitions and the profiler (session-10 default), then XLA's PTX of the
#             16x2048 kernels with LLVM IR dumping on                                        (~6 min)
#   xla10f    the combine kernel alone through XLA's Triton call at B = 16-32, interleaved; profiler (~5 min)
#   final10c  all GPU tests of tests/test_triton_kernel.py (final session-10 defaults)     (~9 min)
#   final10d  generate through both kernels, then the kernel table on the final defaults      (~7 min)
#   final10e  B >= 16 on the final defaults, 20 interleaved repetitions: XLA, Pallas, Triton, no scoring (~4 min)
#   b1sweep10 B = 1 coop settings through XLA's launch by GPU time and interleaved wall time (~4 min)
#   b1sweep10b 64- against 128-slot coop blocks at B = 1-8 (default splits), GPU and wall time (~4 min)
#   final10f  after the 64-slot coop default: all Triton GPU tests, then the B <= 16 kernel rows (~9 min)
#   ncu11     Nsight Compute: the Triton kernels through jax-triton's and XLA's launch side by side (~5 min)
#   ncu11b    the same after ex2/lg2 became inline PTX; then B >= 16 with each launch at every size (~6 min)
#   final11   all Triton GPU tests and generate through both kernels (inline ex2/lg2)        (~8 min)
#   small11   B <= 16: profiler GPU time, then the rows interleaved by throughput             (~5 min)
#   ptxas11   the jax-triton build with CUDA 13's ptxas against its own and XLA's; ncu on Pallas (~5 min)
#   pallas11  the Pallas GPU tests and generate, after its body's log became one lg2.approx  (~6 min)
#   bench11   ncu on the Pallas kernel at 16x2048, then the full table interleaved              (~7 min)
#   final11b  after both math changes were backed out: generate, then the full table (20 reps)  (~6 min)
#   comb11    the combine kernel's chunk and warps at B = 16-32 by GPU time and wall time      (~5 min)
#   tickets12 persistent tickets: their GPU tests, then B = 1-64 with and without them interleaved (30
#             repetitions), and the profiler's GPU time per call at B = 1                   (~8 min)
#   loop12    B = 1-16 with the bench's chain run once per program execution (as before) and 8 times in
#             a fori_loop (a decode loop's form: no new buffers per chain), with and without tickets (~5 min)
#   loop12b   B >= 16 in the fori_loop form: the default against one-launch epilogues (fused with one
#             128-slot split, coop) and XLA's launch for every kernel, all on persistent tickets (~7 min)
#   loop12c   B = 1 and 16 in the fori_loop form: t's L2 discard and evict_last hint switched off (~5 min)
#   sweep12   B = 1 launch settings in the fori_loop form, on persistent tickets (coop blocks / splits /
#             warps; separate and fused through XLA's launch), then 16x2048 / 16x8192 with the combine
#             kernel's discards moved after its ticket                                      (~7 min)
#   ab12      the combine kernel with its discards before the ticket (6c42331) against after it, in
#             one interleaved run, fori_loop form, B = 16-32                                  (~4 min)
#   final12   all Triton GPU tests (persistent tickets; kernels as at 6c42331)                 (~9 min)
#   final12b  generate through both kernels, then the full table in the fori_loop form (8 chains per
#             execution) and the B = 1 rows in the classic form                            (~8 min)
#   disc12    t's L2 discard on and off by the size of t (0.25-16 MB), fori_loop form, 20 reps (~5 min)
#   final12c  (= final12) all Triton GPU tests after t's discard became size-dependent (off up to 4 MiB)     (~9 min)
#   final12d  generate through both kernels, then the full table in the fori_loop form              (~7 min)
#   spin12    the coop barrier spinning on plain L2 reads (one acquire after) against atomic polls, A/B in
#             one run at B = 1-8 (fori_loop form), then the coop GPU tests                   (~6 min)
#   ibench8   bench_kernels.py --interleave (repetitions round-robin over the columns) by throughput, all
#             sizes; then B = 1 with 40 repetitions                                          (~6 min)
#   combine8  the Triton combine kernel's chunk / tile / warps at 16x2048 and 16x8192, interleaved (~3 min)
#   bench8    bench_kernels.py by throughput (--queued 4) and latency: XLA, Pallas, Triton   (~8 min)
#   cmdbuf    (not run yet) the bench's chain under the profiler with XLA's command buffers (CUDA
#             graphs) as by default, off, and with no minimum graph size: do they take the host's
#             jax-triton launch cost away?                                                    (~4 min)
#   launch    jaxlib's Triton targets, then the kernel table (XLA, Triton, no scoring) as is, with the
#             legacy custom call in command buffers (flag removed in jax 0.11: fails), line info off
#   ffi       the typed-FFI launch path: its GPU tests, which target the compiled HLO names, the kernel
#             table with Triton through the typed FFI (default) and the legacy call            (~4 min)
#   host      the bench chain under the profiler with the top host-side events per call: where the CPU
#             time of a jax-triton launch goes (legacy and typed FFI against XLA)          (~3 min)
#   lcost     scripts/probe_launch_cost.py with XLA's command buffers on (default) and off: host cost of
#             one jax-triton launch, and the marginal vs fixed cost per call of the bench chain (~4 min)
#   final5    the Triton kernel's GPU tests (all of tests/test_triton_kernel.py)             (~6 min)
#   final5b   generate through both kernels vs the reference, then bench_kernels.py (latency), all
#             columns                                                                      (~7 min)
#   final5c   bench_kernels.py --queued 4 (throughput) for XLA, Pallas, Triton with and without
#             scoring                                                                      (~4 min)
#   coop      the "coop" epilogue (one launch, a barrier, parallel shares) against the reference on the
#             GPU: its tests, the default-config shapes, both granularities, then generate       (~5 min)
#   coopsweep scripts/sweep_small_batch.py for coop at B = 1 (splits x block) and B = 16 (block), with
#             the separate and fused settings of session 5 for comparison                  (~8 min)
#   coopprof  profiler kernel times (and wall) of coop against separate / fused at B = 1 and 16  (~5 min)
#   sweep6    the defaults' evidence: scripts/sweep_small_batch.py at B = 1 (coop vs separate), B = 16 and
#             B = 32 (separate vs fused, 1-4 splits, 32- and 128-slot blocks)               (~7 min)
#   final6    the Triton kernel's GPU tests (all of tests/test_triton_kernel.py), then generate
#             through both kernels vs the reference                                        (~6 min)
#   final6b   bench_kernels.py (latency), all columns                                        (~6 min)
#   final6c   bench_kernels.py --queued 4 (throughput) for XLA, Pallas, Triton (default, no scoring,
#             each epilogue)                                                               (~5 min)
#   final6d   profiler kernel times of the session-6 defaults with and without scoring at the six
#             sizes, then a repeat throughput run at B = 16 and 32 (XLA, Triton with and without
#             scoring)                                                                       (~4 min)
#   small6    the small-batch default (coop) against the other epilogues at B = 1, 4 and 8, by
#             throughput and by latency                                                    (~5 min)
#   fin6      the fused finisher with one load of its own statistics and 8K-element tiles: the fused and
#             coop GPU tests, then separate vs fused with one 128-slot split at B = 16 and 32, and
#             the B = 64 default (fused) by throughput                                      (~7 min)
#   ffi7      the typed-FFI launch by throughput (with and without scoring), then the profiler's idle GPU
#             time per call of both launch paths at 1x2048 and 16x2048                      (~3 min)
#   pprof7    profiler kernel times of the Pallas kernel with and without scoring at the benchmark sizes
#             (B >= 16 and 1x2048)                                                          (~1 min)
#   pallas7   all of tests/test_pallas_kernel.py on the GPU, then generate through both kernels vs the
#             reference (tests/test_kernel_generate.py)                                      (~6 min)
#   psweep7   the Pallas launch sweep: 64- and 128-slot blocks, 2 and 3 stages, 1/2/4 splits at B = 16
#             and 64, by throughput, twice                                                  (~3 min)
#   bench7    bench_kernels.py by throughput (--queued 4), then by latency: XLA, Pallas and Triton with
#             and without scoring                                                           (~4 min)
#   qdepth7   bench_kernels.py by throughput with 4 and 16 executions queued per sync, twice, at 1x2048,
#             16x2048 and 16x8192: is a column's gap per call or per execution?             (~4 min)
#   ttraffic  the Triton kernel's t-traffic switches (cache_hints, discard_t) and epilogues against the
#             reference on the GPU, then profiler kernel times of both epilogues and split counts  (~3 min)
# The generation stages run each configuration in its own process (--isolate: own peak memory).
# Carry [".whl"] (jax-triton, see docs/DEVICE notes in README) for the Triton columns.
set -uo pipefail
stage=${1:?usage: gpu_session.sh tests|kernels|gen|maxbatch|triton|eq16|max4b|max7b|max16k|max7b16k|lfwhole|vnorm|ttraffic|final4|final4b|cmdbuf|launch|ffi|host|lcost|final5|final5b|final5c|coop|coopsweep|coopprof|sweep6|final6|final6b|final6c|final6d|small6|fin6|ffi7|pprof7|pallas7|psweep7|bench7|qdepth7|pallas8|pprof8|psweep8|psweep8b|cbuf8|ibench8|combine8|bench8|mend8|pfx9|fmid9|hint9|hint9b|psplit9|xla10|xla10b|xla10c|xla10d|final10|final10b|xla10e|xla10f|final10c|final10d|final10e|b1sweep10|b1sweep10b|final10f|ncu11|ncu11b|final11|small11|ptxas11|pallas11|bench11|final11b|comb11}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
date -u | tee "$OUT/date.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
case "$stage" in
  tests)
    timeout 420 python3 -m pytest -q -p no:cacheprovider tests/test_model_parity.py tests/test_kernel_generate.py \
      tests/test_pallas_kernel.py ${WITH_TRITON_TESTS:+tests/test_triton_kernel.py} 2>&1 | tee "$OUT/tests.log" | tail -30 ;;
  kernels)
    timeout 540 python3 scripts/bench_kernels.py --out "$OUT/bench_kernels.md" 2>&1 | tee "$OUT/bench_kernels.log" ;;
  gen)
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 timeout 560 python3 scripts/benchmark_generate.py --model qwen3-4b \
      --runs full:1:2048 full:16:8192 longflow:16:8192:2048 longflow:16:8192:2048:pallas \
      longflow:16:8192:2048:triton --out "$OUT/gen.jsonl" --plot "$OUT/gen.png" 2>&1 | tee "$OUT/gen.log" ;;
  maxbatch)
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 560 python3 scripts/benchmark_generate.py --model qwen3-4b \
      --runs full:max:8192 longflow:max:8192:2048:triton --out "$OUT/maxbatch.jsonl" \
      --plot "$OUT/maxbatch.png" 2>&1 | tee "$OUT/maxbatch.log" ;;
  triton)
    timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py tests/test_kernel_generate.py \
      -k "not pallas" 2>&1 | tee "$OUT/triton_tests.log" | tail -15 ;;
  vnorm)
    timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py tests/test_kernel_generate.py \
      2>&1 | tee "$OUT/tests.log" | tail -15
    timeout 250 python3 scripts/bench_kernels.py --columns xla_attn,triton,triton_reduce,triton_noevict --reps 20 \
      --out "$OUT/bench_kernels.md" 2>&1 | tee "$OUT/bench_kernels.log" ;;
  final4)
    timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py 2>&1 | tee "$OUT/tests.log" \
      | tail -4
    diag=$(for b in 1 16 64; do for c in 2048 8192; do printf "%s," "$b:$c:32:4:3:d:a:en"; done; done)
    timeout 240 python3 -m cuda_triton_bridge.tune --out "$OUT" --phases d --diag "${diag%,}" 2>&1 \
      | tee "$OUT/tune.log" | grep -v "^|" ;;
  final4b)
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_generate.py 2>&1 | tee "$OUT/gen_tests.log" \
      | tail -4
    timeout 400 python3 scripts/bench_kernels.py --reps 20 --out "$OUT/bench_kernels.md" 2>&1 \
      | tee "$OUT/bench_kernels.log" ;;
  cmdbuf)
    for flags in "" "--xla_gpu_enable_command_buffer=" "--xla_gpu_graph_min_graph_size=1"; do
      echo "XLA_FLAGS=$flags" | tee -a "$OUT/cmdbuf.md"
      XLA_FLAGS="$flags" timeout 150 python3 scripts/profile_kernel_chain.py --sizes 1x2048,1x8192,16x2048 \
        --columns xla_attn,triton,triton_noevict --reps 3 2>&1 | grep -v Warning | tee -a "$OUT/cmdbuf.md"
    done ;;
  launch)
    python3 - <<'PY' 2>&1 | tee "$OUT/probe.log"
import jax, jaxlib
print("jax", jax.__version__, "jaxlib", jaxlib.__version__)
from jax._src.lib import gpu_triton as g
print("gpu_triton:", [n for n in dir(g) if not n.startswith("__")])
regs = getattr(g, "registrations", None)
print("registrations:", sorted(regs()) if regs else None)
PY
    cb="--xla_gpu_enable_command_buffer=+CUSTOM_CALL --legacy_command_buffer_custom_call_targets=triton_kernel_call"
    for run in "default|" "graphs|$cb" "graphs-noline|$cb"; do
      name=${run%%|*}; flags=${run#*|}
      echo "== $name XLA_FLAGS=$flags" | tee -a "$OUT/launch.log"
      noline=0; [[ $name == *noline* ]] && noline=1
      TRITON_DISABLE_LINE_INFO=$noline XLA_FLAGS="$flags" timeout 170 python3 scripts/bench_kernels.py \
        --reps 10 --copy-mb 1024 --matmul-n 2048 --sizes 1x2048,1x8192,16x2048,16x8192,64x2048 \
        --columns xla_attn,triton,triton_noevict 2>&1 | grep -v Warning | grep -v "^|" | tee -a "$OUT/launch.log"
    done ;;
  ffi)
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py -k "ffi or custom_call" 2>&1 \
      | tee "$OUT/ffi_tests.log" | tail -4
    python3 - <<'PY' 2>&1 | grep -v Warning | tee "$OUT/ffi_probe.log"
import jax, jax.numpy as jnp, re
import cuda_triton_bridge as ctb
q = jnp.ones((16, 32, 128), jnp.bfloat16); k = jnp.ones((16, 8, 2048, 128), jnp.bfloat16)
valid = jnp.ones((16, 2048), bool)
for ffi in (True, False):
    def chain(q, k, v, valid):
        for _ in range(4):
            q, _ = ctb.longflow_decode_attention_triton(q, k, v, valid, scale=0.1, overrides=dict(ffi_call=ffi))
        return q
    text = jax.jit(chain).lower(q, k, k, valid).compile().as_text()
    print("ffi", ffi, "targets", sorted(set(re.findall(r'custom_call_target="([^"]+)"', text))),
          "command_buffer mentions", text.count("command_buffer"))
PY
    timeout 300 python3 scripts/bench_kernels.py --reps 10 --copy-mb 1024 --matmul-n 2048 \
      --sizes 1x2048,1x8192,16x2048,16x8192,64x2048,64x8192 --columns xla_attn,triton,triton_ffi,triton_noevict \
      --out "$OUT/bench_ffi.md" 2>&1 | grep -v Warning | tee "$OUT/bench_ffi.log" ;;
  host)
    timeout 280 python3 scripts/profile_kernel_chain.py --sizes 1x2048,16x2048 --columns xla_attn,triton,triton_ffi \
      --reps 3 --host 2>&1 | grep -v Warning | tee "$OUT/host.log" ;;
  lcost)
    for flags in "" "--xla_gpu_enable_command_buffer="; do
      XLA_FLAGS="$flags" timeout 250 python3 scripts/probe_launch_cost.py --sizes 1x2048,16x2048,64x2048 \
        --columns xla_attn,triton,triton_ffi 2>&1 | grep -v Warning | tee -a "$OUT/launch_cost.md"
    done ;;
  final5)
    timeout 540 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py 2>&1 | tee "$OUT/tests.log" \
      | tail -4 ;;
  final5b)
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_generate.py 2>&1 | tee "$OUT/gen_tests.log" \
      | tail -4
    timeout 400 python3 scripts/bench_kernels.py --reps 20 --out "$OUT/bench_kernels.md" 2>&1 | grep -v Warning \
      | tee "$OUT/bench_kernels.log" ;;
  final5c)
    timeout 400 python3 scripts/bench_kernels.py --reps 10 --queued 4 --columns xla_attn,pallas,triton,triton_noevict \
      --out "$OUT/bench_kernels_queued.md" 2>&1 | grep -v Warning | tee "$OUT/bench_kernels_queued.log" ;;
  coop)
    timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py \
      -k "coop or benchmark_shapes or agree or matches_reference or decode_loop" 2>&1 | tee "$OUT/tests.log" | tail -12
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_generate.py 2>&1 | tee "$OUT/generate.log" | tail -4 ;;
  coopsweep)
    timeout 280 python3 scripts/sweep_small_batch.py --batch 1 --slots 2048,8192 --epilogues coop \
      --splits 8,16 --block-c 32,64,128 2>&1 | grep -v Warning | tee "$OUT/sweep_b1.log"
    timeout 290 python3 scripts/sweep_small_batch.py --batch 16 --slots 2048,8192 --epilogues coop,separate \
      --splits 1,4 --block-c 32,64,128 2>&1 | grep -v Warning | tee "$OUT/sweep_b16.log" ;;
  coopprof)
    diag=1:2048:128:4:3:16:c:en,1:2048:32:4:3:16:s:e,1:8192:128:4:3:16:c:en,1:8192:32:4:3:16:s:e
    diag=$diag,16:2048:128:4:3:1:c:e,16:2048:128:4:3:1:s:en,16:2048:128:4:3:1:f:e,16:2048:32:4:3:4:s:e
    diag=$diag,16:8192:128:4:3:1:c:e,16:8192:128:4:3:1:s:en,16:8192:32:4:3:4:s:e
    timeout 420 python3 -m cuda_triton_bridge.tune --out "$OUT" --phases d --diag "$diag" 2>&1 \
      | tee "$OUT/tune.log" | grep -v "^|" ;;
  sweep6)
    timeout 200 python3 scripts/sweep_small_batch.py --batch 1 --slots 2048,4096,8192 --epilogues coop,separate \
      --splits 8,16 --block-c 32,128 2>&1 | grep -v Warning | tee "$OUT/sweep_b1.log"
    timeout 180 python3 scripts/sweep_small_batch.py --batch 16 --slots 2048,8192 --epilogues separate,fused \
      --splits 1,4 --block-c 32,128 2>&1 | grep -v Warning | tee "$OUT/sweep_b16.log"
    timeout 190 python3 scripts/sweep_small_batch.py --batch 32 --slots 2048,8192 --epilogues separate,fused \
      --splits 1,2 --block-c 32,128 2>&1 | grep -v Warning | tee "$OUT/sweep_b32.log" ;;
  final6)
    timeout 480 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py 2>&1 | tee "$OUT/tests.log" | tail -6
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_generate.py 2>&1 | tee "$OUT/generate.log" | tail -3 ;;
  final6b)
    timeout 560 python3 scripts/bench_kernels.py --reps 20 --out "$OUT/bench_kernels.md" 2>&1 | grep -v Warning \
      | tee "$OUT/bench_kernels.log" ;;
  final6c)
    timeout 560 python3 scripts/bench_kernels.py --reps 10 --queued 4 \
      --columns xla_attn,pallas,triton,triton_noevict,triton_separate,triton_fused,triton_coop \
      --out "$OUT/bench_kernels_queued.md" 2>&1 | grep -v Warning | tee "$OUT/bench_kernels_queued.log" ;;
  final6d)
    diag=1:2048:128:4:3:d:a:en,1:8192:128:4:3:d:a:en,16:2048:128:4:3:d:a:en,16:8192:128:4:3:d:a:en
    diag=$diag,64:2048:32:4:3:d:a:en,64:8192:32:4:3:d:a:en
    timeout 300 python3 -m cuda_triton_bridge.tune --out "$OUT" --phases d --diag "$diag" 2>&1 \
      | tee "$OUT/tune.log" | grep -v "^|"
    timeout 240 python3 scripts/bench_kernels.py --reps 10 --queued 4 --sizes 16x2048,16x8192,32x2048,32x8192 \
      --columns xla_attn,triton,triton_noevict --out "$OUT/bench_kernels_queued.md" 2>&1 | grep -v Warning \
      | tee "$OUT/bench_kernels_queued.log" | tail -9 ;;
  small6)
    for q in 4 0; do
      timeout 270 python3 scripts/bench_kernels.py --reps 20 --queued $q --sizes 1x2048,1x8192,4x2048,4x8192,8x2048,8x8192 \
        --columns xla_attn,triton,triton_noevict,triton_separate,triton_fused --out "$OUT/bench_small_q$q.md" 2>&1 \
        | grep -v Warning | tee "$OUT/bench_small_q$q.log" | tail -8
    done ;;
  fin6)
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py \
      -k "fused or coop or agree or benchmark_shapes or switches" 2>&1 | tee "$OUT/tests.log" | tail -4
    for b in 16 32; do
      timeout 100 python3 scripts/sweep_small_batch.py --batch $b --slots 2048,8192 --epilogues separate,fused \
        --splits 1 --block-c 128 2>&1 | grep -v Warning | tee -a "$OUT/sweep.log"
    done
    timeout 120 python3 scripts/bench_kernels.py --reps 10 --queued 4 --sizes 64x2048,64x8192 \
      --columns xla_attn,triton,triton_noevict,triton_separate --out "$OUT/bench64.md" 2>&1 | grep -v Warning \
      | tee "$OUT/bench64.log" | tail -4 ;;
  ffi7)
    timeout 330 python3 scripts/bench_kernels.py --reps 10 --queued 4 \
      --columns xla_attn,triton,triton_ffi,triton_noevict,triton_ffi_noevict --out "$OUT/ffi_q4.md" \
      > "$OUT/ffi_q4.log" 2>&1; tail -12 "$OUT/ffi_q4.log"
    timeout 200 python3 scripts/profile_kernel_chain.py --sizes 1x2048,16x2048 --columns xla_attn,triton,triton_ffi \
      --reps 3 2>&1 | grep -v Warn | tee "$OUT/ffi_prof.md" | tail -12 ;;
  pprof7)
    timeout 400 python3 scripts/profile_kernel_chain.py --sizes 1x2048,16x2048,16x8192,64x2048,64x8192 \
      --columns xla_attn,pallas,pallas_noevict --reps 3 2>&1 | grep -v Warn | tee "$OUT/pallas_prof.md" | tail -20 ;;
  pallas7|pallas8|pallas11)  # pallas8: the same commands, session 8; pallas11: after the lg2.approx log (1d09bda, backed out in e990c71)
    timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_pallas_kernel.py 2>&1 | tail -3 \
      | tee "$OUT/pallas_tests.log"
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_generate.py -rs 2>&1 | tail -4 \
      | tee "$OUT/kernel_generate.log" ;;
  psweep7)
    for pass in 1 2; do
      timeout 280 python3 scripts/bench_kernels.py --reps 20 --queued 4 --sizes 16x2048 --columns xla_attn --sweep \
        --sweep-sizes 16x2048,16x8192,64x2048,64x8192 --sweep-splits 1,2,4 --sweep-launches 64:4:3,64:4:2,128:4:2 \
        --deadline 260 --out "$OUT/pallas_sweep$pass.md" > "$OUT/pallas_sweep$pass.log" 2>&1
      grep -E "^sweep" "$OUT/pallas_sweep$pass.log"
    done ;;
  bench7|bench8)  # bench8: the same commands, session 8
    C=xla_attn,pallas,pallas_noevict,triton,triton_noevict
    timeout 270 python3 scripts/bench_kernels.py --reps 10 --queued 4 --columns $C --out "$OUT/bench_queued.md" \
      > "$OUT/bench_queued.log" 2>&1; tail -9 "$OUT/bench_queued.log"
    timeout 270 python3 scripts/bench_kernels.py --reps 20 --columns $C --out "$OUT/bench_latency.md" \
      > "$OUT/bench_latency.log" 2>&1; tail -9 "$OUT/bench_latency.log" ;;
  qdepth7)
    for q in 4 16 4 16; do
      timeout 120 python3 scripts/bench_kernels.py --reps 10 --queued $q --sizes 1x2048,16x2048,16x8192 \
        --columns xla_attn,triton,triton_noevict,pallas > "$OUT/q$q.log" 2>&1
      echo "queued $q"; grep "^B=" "$OUT/q$q.log" | tee -a "$OUT/queue_depth.log"
    done ;;
  pprof8)
    timeout 300 python3 scripts/profile_kernel_chain.py --sizes 1x2048,16x2048,16x8192,64x2048,64x8192 \
      --columns xla_attn,pallas,pallas_noevict --reps 3 2>&1 | grep -v Warn | tee "$OUT/pallas_prof.md" | tail -12 ;;
  fmid9)
    # Session 6 timed the fused epilogue with one 128-slot split once at 16x2048 (2.4 us ahead of the
    # separate default) and once at 16x8192 (7 us behind). Here: interleaved, by throughput, with C between.
    python3 - <<'PY' 2>&1 | grep -v Warn | tee "$OUT/fused_mid.log"
import functools, sys
sys.path.insert(0, "scripts")
import jax
import bench_kernels as bk
from cuda_triton_bridge import longflow_decode_attention_triton as tri
scale = bk.HEAD_DIM ** -0.5
for batch, slots in [(16, 2048), (16, 4096), (32, 2048), (16, 8192)]:
    sets = bk.make_sets(batch, slots, bk.n_sets_for(batch, slots))
    runs = {}
    def add(name, fn):
        print(f"B={batch} C={slots} {name}: {bk.check_column(name, fn, sets[0], scale)}", flush=True)
        program, n = bk.chain_program(fn, sets)
        runs[name] = (functools.partial(program, sets[0][0], sets), n)
    add("xla_attn", functools.partial(bk.xla_attention, scale=scale))
    add("triton", functools.partial(tri, scale=scale))
    add("triton_noevict", functools.partial(tri, scale=scale, compute_evict=False))
    add("fused_1x128", functools.partial(tri, scale=scale, epilogue="fused", block_c=128, num_splits=1))
    add("fused_2x128", functools.partial(tri, scale=scale, epilogue="fused", block_c=128, num_splits=2))
    res = bk.time_interleaved(runs, 20, queued=4)
    for name, (t, (lo, hi)) in res.items():
        print(f"B={batch} C={slots} {name:16s} {t * 1e6:8.1f} us (min {lo * 1e6:.1f}, max {hi * 1e6:.1f})", flush=True)
    del sets, runs
PY
    ;;
  hint9)
    # Session 4 tried evict_last on the Pallas side outputs when the epilogue was XLA's (no gain). Since
    # session 8 a Pallas kernel reads t right after the stream, so t kept in L2 may now pay off.
    python3 - <<'PY' 2>&1 | grep -v Warn | tee "$OUT/pallas_hints.log"
import functools, sys
sys.path.insert(0, "scripts")
import jax
import bench_kernels as bk
import pallas_kernels.decode_attention as da
from pallas_kernels import longflow_decode_attention as pal
if not hasattr(da, "KV_LOAD_POLICY"):
    raise SystemExit("hint9 needs commit 0809abb (its policy constants were removed after session 9)")
VARIANTS = {"none": (None, None, None), "tlast": ("evict_last", None, None),
            "tlast_tfirst": ("evict_last", "evict_first", None), "tlast_kvfirst": ("evict_last", None, "evict_first"),
            "all3": ("evict_last", "evict_first", "evict_first")}
scale = bk.HEAD_DIM ** -0.5
for batch, slots in [(16, 2048), (16, 8192), (64, 2048), (64, 8192)]:
    sets = bk.make_sets(batch, slots, bk.n_sets_for(batch, slots))
    runs = {}
    def add(name, fn):
        jax.clear_caches()  # trace under the current constants
        print(f"B={batch} C={slots} {name}: {bk.check_column(name, fn, sets[0], scale)}", flush=True)
        program, n = bk.chain_program(fn, sets)
        compiled = program.lower(sets[0][0], sets).compile()
        runs[name] = (functools.partial(compiled, sets[0][0], sets), n)
    add("xla_attn", functools.partial(bk.xla_attention, scale=scale))
    add("pallas_noevict", functools.partial(pal, scale=scale, compute_evict=False))
    for name, policies in VARIANTS.items():
        da.T_STORE_POLICY, da.T_LOAD_POLICY, da.KV_LOAD_POLICY = policies
        add(name, functools.partial(pal, scale=scale))
    da.T_STORE_POLICY = da.T_LOAD_POLICY = da.KV_LOAD_POLICY = None
    res = bk.time_interleaved(runs, 10, queued=4)
    for name, (t, (lo, hi)) in res.items():
        print(f"B={batch} C={slots} {name:16s} {t * 1e6:8.1f} us (min {lo * 1e6:.1f}, max {hi * 1e6:.1f})", flush=True)
    del sets, runs
PY
    ;;
  hint9b)
    python3 - <<'PY' 2>&1 | grep -v Warn | tee "$OUT/pallas_hint_confirm.log"
import functools, sys
sys.path.insert(0, "scripts")
import jax
import bench_kernels as bk
import pallas_kernels.decode_attention as da
from pallas_kernels import longflow_decode_attention as pal
if not hasattr(da, "T_STORE_POLICY"):
    raise SystemExit("hint9b needs commit 31022de (T_STORE_POLICY was removed after session 9)")
scale = bk.HEAD_DIM ** -0.5
for batch, slots in [(16, 2048), (16, 8192), (64, 2048), (64, 8192)]:
    sets = bk.make_sets(batch, slots, bk.n_sets_for(batch, slots))
    runs = {}
    def add(name, fn):
        jax.clear_caches()  # trace under the current constant
        print(f"B={batch} C={slots} {name}: {bk.check_column(name, fn, sets[0], scale)}", flush=True)
        program, n = bk.chain_program(fn, sets)
        compiled = program.lower(sets[0][0], sets).compile()
        runs[name] = (functools.partial(compiled, sets[0][0], sets), n)
    add("xla_attn", functools.partial(bk.xla_attention, scale=scale))
    for policy in (None, "evict_last"):
        da.T_STORE_POLICY = policy
        add(f"pallas_t_{policy}", functools.partial(pal, scale=scale))
    da.T_STORE_POLICY = "evict_last"
    res = bk.time_interleaved(runs, 20, queued=4)
    for name, (t, (lo, hi)) in res.items():
        print(f"B={batch} C={slots} {name:22s} {t * 1e6:8.1f} us (min {lo * 1e6:.1f}, max {hi * 1e6:.1f})", flush=True)
    del sets, runs
PY
    timeout 420 python3 -m pytest -q -p no:cacheprovider tests/test_pallas_kernel.py tests/test_kernel_generate.py 2>&1 \
      | tee "$OUT/pallas_tests.log" | tail -3 ;;
  psplit9)
    # B = 1 wall times vary 2x between runs, so the split rule was never settled by them (psweep8b). The
    # profiler's GPU kernel time per call is the steadier signal: Pallas loses 2.6-2.9 us of it to XLA.
    python3 - <<'PY' 2>&1 | grep -v Warn | tee "$OUT/pallas_split_b1.log"
import functools, sys
sys.path.insert(0, "scripts")
import bench_kernels as bk
from cuda_triton_bridge.tune import profile_kernels
from pallas_kernels import longflow_decode_attention as pal
scale = bk.HEAD_DIM ** -0.5
GRID = {2048: [(128, 4), (128, 8), (128, 16), (64, 16), (64, 32)],
        8192: [(128, 16), (128, 32), (128, 64), (64, 64), (64, 128)]}
for slots, settings in GRID.items():
    sets = bk.make_sets(1, slots, bk.n_sets_for(1, slots))
    cols = [("xla_attn", functools.partial(bk.xla_attention, scale=scale)), ("rule", functools.partial(pal, scale=scale))]
    cols += [(f"block{bc}/splits{sp}", functools.partial(pal, scale=scale, block_c=bc, num_splits=sp)) for bc, sp in settings]
    for name, fn in cols:
        check = bk.check_column(name, fn, sets[0], scale)
        program, n = bk.chain_program(fn, sets)
        wall, _ = bk.time_program(program, n, sets, reps=10, queued=4)
        per, _, _, idle = profile_kernels(functools.partial(program, sets[0][0], sets), 3, n)
        busy = sum(per.values())
        top = ", ".join(f"{k[:24]} {v:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:3])
        print(f"1x{slots} {name:18s} GPU {busy:5.1f} us  wall {wall * 1e6:5.1f} us  [{top}]  ({check})", flush=True)
    del sets
PY
    ;;
  pfx9)
    timeout 240 python3 scripts/profile_kernel_chain.py --sizes 1x2048,16x2048,16x8192,64x2048,64x8192 \
      --columns xla_attn,pallas,pallas_noevict,triton_noevict --reps 3 2>&1 | grep -v Warn | tee "$OUT/pallas_prof.md" | tail -22
    timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_pallas_kernel.py 2>&1 | tee "$OUT/pallas_tests.log" | tail -3 ;;
  psweep8)
    timeout 280 python3 scripts/bench_kernels.py --reps 20 --queued 4 --sizes 16x2048 --columns xla_attn --sweep \
      --sweep-sizes 1x2048,1x8192,16x2048,16x8192,64x2048,64x8192 --sweep-splits 1,2,4,8,16 \
      --sweep-launches 128:4:2 --deadline 260 --out "$OUT/pallas_sweep.md" > "$OUT/pallas_sweep.log" 2>&1
    grep -E "^sweep" "$OUT/pallas_sweep.log" ;;
  psweep8b)
    for pass in 1 2 3; do
      timeout 150 python3 scripts/bench_kernels.py --reps 20 --queued 4 --sizes 1x2048 --columns xla_attn --sweep \
        --sweep-sizes 1x2048,1x8192,16x2048 --sweep-splits 2,4,8,16,32 --sweep-launches 128:4:2 \
        --deadline 140 --out "$OUT/pallas_sweep$pass.md" > "$OUT/pallas_sweep$pass.log" 2>&1
      grep -E "^(sweep|B=)" "$OUT/pallas_sweep$pass.log"
    done ;;
  cbuf8)
    # Are the Pallas kernels inside XLA's command buffers (CUDA graphs)? The optimized HLO of a chain of
    # 4 calls at 1x2048, then the B=1 and 16x2048 tables with command buffers as by default, off, and
    # with no minimum graph size.
    python3 - <<'PY' 2>&1 | tee "$OUT/cbuf_hlo.log"
import re, functools, jax, jax.numpy as jnp
from pallas_kernels import longflow_decode_attention as pk
def chain(q, k, v, valid):
    for _ in range(4):
        q, _e = pk(q, k, v, valid, scale=128**-0.5)
    return q
args = (jnp.ones((1, 32, 128), jnp.bfloat16), jnp.ones((1, 8, 2048, 128), jnp.bfloat16),
        jnp.ones((1, 8, 2048, 128), jnp.bfloat16), jnp.ones((1, 2048), bool))
text = jax.jit(chain).lower(*args).compile().as_text()
print("command_buffer computations:", len(re.findall(r"^%?command_buffer\S* ", text, re.M)))
for line in text.splitlines():
    if re.search(r"command_buffer|custom_call_target|kind=kCustom|__triton|ENTRY", line):
        print(line.strip()[:200])
PY
    for flags in "" "--xla_gpu_enable_command_buffer=" "--xla_gpu_graph_min_graph_size=1"; do
      echo "XLA_FLAGS=$flags" | tee -a "$OUT/cbuf.log"
      XLA_FLAGS="$flags" timeout 120 python3 scripts/bench_kernels.py --reps 10 --queued 4 --copy-mb 1024 \
        --matmul-n 2048 --sizes 1x2048,1x8192,16x2048 --columns xla_attn,pallas,pallas_noevict 2>&1 \
        | grep -E "^B=|rror" | tee -a "$OUT/cbuf.log"
    done ;;
  mend8)
    # After the session-8 review mend (one chunk-minima reduction shared by both kernels' XLA paths):
    # the Triton final-reduce tests and the Pallas GPU tests.
    timeout 280 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py -k "final or xla or epilogues_agree" 2>&1 \
      | tail -3 | tee "$OUT/triton_final_reduce.log"
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_pallas_kernel.py 2>&1 | tail -3 \
      | tee "$OUT/pallas_tests.log" ;;
  xla10)
    # The Triton kernels launched through XLA's own Triton custom call (xla_call override, separate
    # epilogue) against jax-triton's launch, interleaved by throughput; every column checked first.
    # Run at commit 3fa3688: there triton_xla forced the separate epilogue (since aca7b65 it takes the
    # default epilogue, and since 28e931f triton is XLA's launch at B = 1).
    git merge-base --is-ancestor 3fa3688 HEAD 2>/dev/null && [ "$(git rev-parse --short=7 HEAD)" != 3fa3688 ] \
      && echo "note: xla10's columns changed meaning after 3fa3688 (see the comment above)"
    C=xla_attn,triton,triton_separate,triton_xla,triton_noevict,triton_xla_noevict
    timeout 60 python3 scripts/bench_kernels.py --reps 3 --queued 4 --columns triton_xla --sizes 1x2048 \
      --copy-mb 256 --matmul-n 1024 > "$OUT/xla_smoke.log" 2>&1; tail -12 "$OUT/xla_smoke.log"
    timeout 420 python3 scripts/bench_kernels.py --reps 10 --queued 4 --interleave --columns $C \
      --out "$OUT/xla_queued.md" > "$OUT/xla_queued.log" 2>&1; tail -9 "$OUT/xla_queued.log" ;;
  xla10b)
    # GPU tests of the XLA launch (every epilogue, kv_len, no scoring, the dtype/head matrix, the decode
    # loop), then where each launch's time per call goes (profiler: GPU kernel time and idle time).
    # Run at aca7b65, before 28e931f made XLA's launch the default at a small batch: there the triton and
    # triton_noevict columns were jax-triton's launch at every size (today's triton_jt, triton_jt_noevict).
    timeout 300 python3 -m pytest -q -x tests/test_triton_kernel.py -k "xla or decode_loop or test_matches_reference" \
      2>&1 | tee "$OUT/xla_tests.log" | tail -4
    timeout 240 python3 scripts/profile_kernel_chain.py --sizes 1x2048,16x2048,64x8192 \
      --columns xla_attn,triton,triton_xla,triton_separate,triton_xla_separate,triton_noevict,triton_xla_noevict \
      2>&1 | grep -v Warn | tee "$OUT/xla_profile.log" ;;
  xla10c)
    # The XLA launch's GPU tests (after xla10b's test fix), what XLA's Triton makes of the kernels against the
    # triton package (PTX features, registers, SASS), then every epilogue through the XLA launch against the
    # jax-triton default, interleaved by throughput. Run at b793d8b: triton / triton_noevict were then
    # jax-triton's launch at every size (see xla10b).
    timeout 200 python3 -m pytest -q tests/test_triton_kernel.py -k "xla_launch or decode_loop" 2>&1 \
      | tee "$OUT/xla_tests_c.log" | tail -3
    for shape in "--batch 64 --slots 8192" "--batch 16 --slots 2048"; do
      timeout 90 python3 scripts/xla_triton_ptx.py $shape 2>&1 | grep -v Warn | tee -a "$OUT/xla_ptx.log"
    done
    C=xla_attn,triton,triton_xla,triton_xla_fused,triton_xla_separate,triton_xla_coop,triton_noevict,triton_xla_noevict
    timeout 330 python3 scripts/bench_kernels.py --reps 10 --queued 4 --interleave --columns $C \
      --out "$OUT/xla_epilogues.md" > "$OUT/xla_epilogues.log" 2>&1; tail -9 "$OUT/xla_epilogues.log" ;;
  xla10d)
    # XLA's PTX of the main kernels against the triton package's, then the small batches (B 1-8) and 16x2048
    # with the new default (XLA's launch below B * Hkv = SMs / 2) against jax-triton's launch and XLA.
    export TRITON_CACHE_DIR=/tmp/triton_cache
    for shape in "--batch 64 --slots 8192" "--batch 16 --slots 2048"; do
      timeout 90 python3 scripts/xla_triton_ptx.py $shape 2>&1 | grep -v Warn | tee -a "$OUT/xla_ptx.log"
    done
    ls -R /tmp/xla_dump_* | head -40 > "$OUT/xla_dump_listing.txt"
    C=xla_attn,triton,triton_jt,triton_noevict,triton_jt_noevict
    timeout 300 python3 scripts/bench_kernels.py --reps 10 --queued 4 --interleave --columns $C \
      --sizes 1x2048,1x8192,2x8192,4x2048,4x8192,8x2048,8x8192,16x2048 \
      --out "$OUT/xla_small.md" > "$OUT/xla_small.log" 2>&1; tail -11 "$OUT/xla_small.log" ;;
  final10)
    # Every GPU test of the Triton bridge at the session-10 code (XLA's launch the default at a small batch).
    timeout 560 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py 2>&1 \
      | tee "$OUT/triton_tests.log" | tail -4 ;;
  final10b)
    # generate through both kernels vs the reference, then the kernel table (interleaved by throughput):
    # XLA's attention, Pallas, the Triton default and jax-triton's launch, with and without scoring.
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_generate.py -rs 2>&1 | tail -4 \
      | tee "$OUT/kernel_generate.log"
    C=xla_attn,pallas,pallas_noevict,triton,triton_noevict,triton_jt
    timeout 360 python3 scripts/bench_kernels.py --reps 10 --queued 4 --interleave --columns $C \
      --out "$OUT/final_queued.md" > "$OUT/final_queued.log" 2>&1; tail -9 "$OUT/final_queued.log" ;;
  xla10e)
    # B = 1 with 40 interleaved repetitions and the profiler's GPU time per call (the session-10 default:
    # XLA's launch), then XLA's PTX of the main kernels with LLVM IR dumping on (xla10d found no PTX dumped).
    C=xla_attn,triton,triton_noevict,triton_jt,pallas
    timeout 200 python3 scripts/bench_kernels.py --reps 40 --queued 4 --interleave --columns $C --sizes 1x2048,1x8192 \
      --copy-mb 1024 --matmul-n 2048 --out "$OUT/b1.md" > "$OUT/b1.log" 2>&1; tail -5 "$OUT/b1.log"
    timeout 150 python3 scripts/profile_kernel_chain.py --sizes 1x2048,1x8192 --columns xla_attn,triton,triton_noevict \
      2>&1 | grep -v Warn | tee "$OUT/b1_profile.log"
    export TRITON_CACHE_DIR=/tmp/triton_cache HOME=${HOME:-/tmp} XLA_FLAGS="--xla_gpu_dump_llvmir=true --xla_dump_hlo_as_text"
    timeout 90 python3 scripts/xla_triton_ptx.py --batch 16 --slots 2048 2>&1 | grep -v Warn | tee "$OUT/xla_ptx.log"
    ls /tmp/xla_dump_* | head -60 > "$OUT/xla_dump_listing.txt" ;;
  xla10f)
    # The combine kernel alone through XLA's Triton call (xla_combine override), the split kernel through
    # jax-triton, at B = 16-32 (the separate epilogue): does the idle gap between the launches go?
    C=xla_attn,triton,triton_xlacomb,triton_noevict
    timeout 250 python3 scripts/bench_kernels.py --reps 10 --queued 4 --interleave --columns $C \
      --sizes 16x2048,16x8192,32x2048,32x8192 --out "$OUT/xlacomb.md" > "$OUT/xlacomb.log" 2>&1; tail -7 "$OUT/xlacomb.log"
    timeout 120 python3 scripts/profile_kernel_chain.py --sizes 16x2048 --columns triton,triton_xlacomb,triton_noevict \
      2>&1 | grep -v Warn | tee "$OUT/xlacomb_profile.log" ;;
  final10c)
    # Every GPU test of the Triton bridge after the combine kernel went through XLA's Triton call by default.
    timeout 560 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py 2>&1 \
      | tee "$OUT/triton_tests.log" | tail -4 ;;
  final10d)
    # generate through both kernels, then the kernel table (as final10b) on the final session-10 defaults;
    # triton_jt = every kernel through jax-triton, triton_xlacomb = the combine kernel alone through XLA's call.
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_generate.py -rs 2>&1 | tail -4 \
      | tee "$OUT/kernel_generate.log"
    C=xla_attn,pallas,pallas_noevict,triton,triton_noevict,triton_jt
    timeout 360 python3 scripts/bench_kernels.py --reps 10 --queued 4 --interleave --columns $C \
      --out "$OUT/final_queued.md" > "$OUT/final_queued.log" 2>&1; tail -9 "$OUT/final_queued.log" ;;
  final10e)
    # A third run of the B >= 16 sizes on the final defaults, 20 interleaved repetitions: the Triton goals
    # (fastest, >= 80% of the ceiling, overhead < 10%) sit near their lines at 16x2048.
    C=xla_attn,pallas,triton,triton_noevict
    timeout 400 python3 scripts/bench_kernels.py --reps 20 --queued 4 --interleave --columns $C \
      --sizes 16x2048,16x8192,64x2048,64x8192 --out "$OUT/final_b16.md" > "$OUT/final_b16.log" 2>&1; tail -7 "$OUT/final_b16.log" ;;
  b1sweep10)
    # B = 1 through XLA's launch: the coop settings were chosen in sessions 5-6 when the host's jax-triton
    # launch hid GPU time. Here every setting by GPU kernel time (profiler) and by wall time (interleaved,
    # throughput), against XLA's attention.
    python3 - <<'PY' 2>&1 | grep -v Warn | tee "$OUT/b1_sweep.log"
import functools, sys
sys.path.insert(0, "scripts")
import bench_kernels as bk
from cuda_triton_bridge import longflow_decode_attention_triton as tri
from cuda_triton_bridge.tune import profile_kernels
scale = bk.HEAD_DIM ** -0.5
SETTINGS = [(128, 16, 4), (64, 16, 4), (64, 8, 4), (128, 8, 4), (32, 16, 4), (128, 16, 8), (64, 16, 8)]
for slots in (2048, 8192):
    sets = bk.make_sets(1, slots, bk.n_sets_for(1, slots))
    runs = {}
    def add(name, fn):
        bk.check_column(name, fn, sets[0], scale)
        program, n = bk.chain_program(fn, sets)
        runs[name] = (functools.partial(program, sets[0][0], sets), n)
    add("xla_attn", functools.partial(bk.xla_attention, scale=scale))
    add("default", functools.partial(tri, scale=scale))
    for block_c, splits, warps in SETTINGS:
        if splits * block_c > slots:
            continue
        add(f"coop {block_c}x{splits} w{warps}", functools.partial(
            tri, scale=scale, epilogue="coop", block_c=block_c, num_splits=splits, num_warps=warps))
    res = bk.time_interleaved(runs, 30, queued=4)
    for name, (t, (lo, hi)) in res.items():
        run, n = runs[name]
        per, _, _, idle = profile_kernels(run, 3, n)
        print(f"B=1 C={slots} {name:20s} wall {t * 1e6:6.1f} us (min {lo * 1e6:.1f}, max {hi * 1e6:.1f})"
              f"  GPU {sum(per.values()):5.1f} us  idle {idle:5.1f} us", flush=True)
    del sets, runs
PY
    ;;
  b1sweep10b)
    # b1sweep10 found 64-slot coop blocks faster at B = 1 (GPU 19.2 against 20.4 us at 1x8192). Do they
    # hold at B = 2-8 (the rest of the coop regime), at the default split count?
    python3 - <<'PY' 2>&1 | grep -v Warn | tee "$OUT/coop64.log"
import functools, sys
sys.path.insert(0, "scripts")
import bench_kernels as bk
from cuda_triton_bridge import longflow_decode_attention_triton as tri
from cuda_triton_bridge.tune import profile_kernels
scale = bk.HEAD_DIM ** -0.5
for batch in (1, 2, 4, 8):
    for slots in (2048, 8192):
        sets = bk.make_sets(batch, slots, bk.n_sets_for(batch, slots))
        runs = {}
        def add(name, fn):
            bk.check_column(name, fn, sets[0], scale)
            program, n = bk.chain_program(fn, sets)
            runs[name] = (functools.partial(program, sets[0][0], sets), n)
        add("xla_attn", functools.partial(bk.xla_attention, scale=scale))
        add("coop 128 (default)", functools.partial(tri, scale=scale))
        add("coop 64", functools.partial(tri, scale=scale, block_c=64))
        res = bk.time_interleaved(runs, 20, queued=4)
        for name, (t, (lo, hi)) in res.items():
            run, n = runs[name]
            per, _, _, idle = profile_kernels(run, 3, n)
            print(f"B={batch} C={slots} {name:20s} wall {t * 1e6:6.1f} us (min {lo * 1e6:.1f}, max {hi * 1e6:.1f})"
                  f"  GPU {sum(per.values()):6.1f} us  idle {idle:5.1f} us", flush=True)
        del sets, runs
PY
    ;;
  final10f)
    # After the coop default moved to 64-slot blocks: every Triton GPU test, then the B <= 16 rows of the
    # kernel table (interleaved by throughput).
    timeout 420 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py 2>&1 \
      | tee "$OUT/triton_tests.log" | tail -3
    C=xla_attn,pallas,triton,triton_noevict,triton_jt
    timeout 150 python3 scripts/bench_kernels.py --reps 20 --queued 4 --interleave --columns $C \
      --sizes 1x2048,1x8192,4x8192,8x8192,16x2048 --copy-mb 1024 --matmul-n 2048 \
      --out "$OUT/final_small.md" > "$OUT/final_small.log" 2>&1; tail -8 "$OUT/final_small.log" ;;
  ncu11)
    # Session 11: Nsight Compute on the same Triton kernels through the two launches (jax-triton compiles
    # with the triton package, XLA's custom call with XLA's bundled Triton): registers, shared memory,
    # DRAM bytes, duration and SASS, to find why XLA's build runs 2-5% slower.
    ptxas=$(python3 -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/ptxas'))")
    { echo "triton's ptxas:"; $ptxas --version | tail -2; echo "other ptxas:"; find / -name ptxas -type f 2>/dev/null | grep -v triton;
      python3 -m pip list 2>/dev/null | grep -i -E "nvidia|jax"; ncu --version | tail -1; } > "$OUT/versions.txt" 2>&1
    cat "$OUT/versions.txt"
    export XLA_PYTHON_CLIENT_ALLOCATOR=platform
    timeout 360 ncu --clock-control none --kernel-name regex:decode_ --set full -f -o "$OUT/rep" \
      python3 scripts/ncu_launch_compare.py \
      --cases 16x2048:jt,16x2048:xla,16x2048:jt:noevict,16x2048:xla:noevict,64x8192:jt,64x8192:xla \
      > "$OUT/ncu_run.log" 2>&1; tail -15 "$OUT/ncu_run.log"
    M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,launch__registers_per_thread
    M=$M,launch__shared_mem_per_block_dynamic,launch__shared_mem_per_block_static,smsp__inst_executed.sum
    M=$M,launch__grid_size,launch__block_size,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem
    ncu -i "$OUT/rep.ncu-rep" --page raw --csv --metrics $M > "$OUT/raw.csv" 2>&1; cut -c1-400 "$OUT/raw.csv" | head -40
    ncu -i "$OUT/rep.ncu-rep" --page details --csv > "$OUT/details.csv" 2>&1
    ncu -i "$OUT/rep.ncu-rep" --page source --print-source sass --csv > "$OUT/sass.csv" 2>&1
    head -c 600 "$OUT/sass.csv"; ls -la "$OUT" ;;
  ncu11b)
    # After ex2/lg2 became inline PTX (ex2/lg2.approx.ftz) in every kernel: the same Nsight Compute cases,
    # then B >= 16 interleaved by throughput with each launch at every size. Ran at 1d28d69; that change
    # was backed out in e990c71, so at a later commit this measures session 10's kernels.
    export XLA_PYTHON_CLIENT_ALLOCATOR=platform
    timeout 240 ncu --clock-control none --kernel-name regex:decode_ --set full -f -o "$OUT/rep" \
      python3 scripts/ncu_launch_compare.py \
      --cases 16x2048:jt,16x2048:xla,16x2048:jt:noevict,16x2048:xla:noevict,64x8192:jt,64x8192:xla \
      > "$OUT/ncu_run.log" 2>&1; tail -3 "$OUT/ncu_run.log"
    M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__registers_per_thread
    M=$M,launch__shared_mem_per_block_dynamic,smsp__inst_executed.sum,launch__grid_size
    ncu -i "$OUT/rep.ncu-rep" --page raw --csv --metrics $M > "$OUT/raw.csv" 2>&1; cut -d, -f5,12- "$OUT/raw.csv"
    ncu -i "$OUT/rep.ncu-rep" --page source --print-source sass --csv > "$OUT/sass.csv" 2>&1; rm -f "$OUT/rep.ncu-rep"
    unset XLA_PYTHON_CLIENT_ALLOCATOR
    C=xla_attn,triton,triton_jt,triton_xla,triton_noevict,triton_jt_noevict,triton_xla_noevict
    timeout 300 python3 scripts/bench_kernels.py --reps 10 --queued 4 --interleave --columns $C \
      --sizes 16x2048,16x8192,64x2048,64x8192 --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1; tail -12 "$OUT/bench.log" ;;
  final11)
    # Every Triton GPU test and generate through both kernels, after ex2/lg2 became inline PTX (ran at
    # 1d28d69..ad18d8e; backed out in e990c71).
    timeout 430 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py 2>&1 \
      | tee "$OUT/triton_tests.log" | tail -3
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_generate.py -rs 2>&1 \
      | tee "$OUT/kernel_generate.log" | tail -3 ;;
  small11)
    # B <= 16 after ex2/lg2 became inline PTX (ran at 3eed814; backed out in e990c71): GPU time by the profiler (the XLA launch's coop kernel at
    # B = 1), then the rows interleaved by throughput. First the tests that final11's timeout cut off (the
    # last ones of the file).
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py \
      -k "test_decode_loop_under_jit or separate-combine_xla" 2>&1 | tee "$OUT/triton_tests_rest.log" | tail -2
    timeout 150 python3 scripts/profile_kernel_chain.py --sizes 1x2048,1x8192,16x2048 \
      --columns xla_attn,triton,triton_noevict,triton_xla > "$OUT/profile_small.log" 2>&1; tail -30 "$OUT/profile_small.log"
    C=xla_attn,pallas,triton,triton_noevict,triton_jt
    timeout 200 python3 scripts/bench_kernels.py --reps 20 --queued 4 --interleave --columns $C \
      --sizes 1x2048,1x8192,4x8192,8x8192,16x2048 --copy-mb 1024 --matmul-n 2048 \
      --out "$OUT/small.md" > "$OUT/small.log" 2>&1; tail -8 "$OUT/small.log" ;;
  ptxas11)
    # Is the slower build of XLA's launch its ptxas (CUDA 13.0's; the triton package bundles 12.8's)?
    # The profiler's GPU time of the same kernels through jax-triton with each ptxas (TRITON_PTXAS_PATH),
    # and through XLA's launch. Then Nsight Compute on the Pallas kernel beside the native one (SASS).
    P=/usr/local/cuda-13.0/bin/ptxas; $P --version | tail -1
    C=triton_jt,triton_xla,triton_jt_noevict,triton_xla_noevict
    for ptx in default cuda13; do
      if [ $ptx = cuda13 ]; then export TRITON_PTXAS_PATH=$P; fi
      echo "== jax-triton's ptxas: $ptx"
      timeout 150 python3 scripts/profile_kernel_chain.py --sizes 16x2048,64x8192 --columns $C 2>&1 | grep -v Warn \
        | tee "$OUT/profile_ptxas_$ptx.log" | tail -9
    done
    unset TRITON_PTXAS_PATH
    export XLA_PYTHON_CLIENT_ALLOCATOR=platform
    timeout 200 ncu --clock-control none --kernel-name regex:"decode_|longflow_" --set full -f -o "$OUT/rep" \
      python3 scripts/ncu_launch_compare.py --cases 16x2048:pallas:noevict,16x2048:pallas,16x2048:jt:noevict \
      > "$OUT/ncu_run.log" 2>&1; tail -3 "$OUT/ncu_run.log"
    M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__registers_per_thread
    M=$M,launch__shared_mem_per_block_dynamic,smsp__inst_executed.sum,launch__grid_size
    ncu -i "$OUT/rep.ncu-rep" --page raw --csv --metrics $M > "$OUT/raw.csv" 2>&1; cut -d, -f5,12- "$OUT/raw.csv"
    ncu -i "$OUT/rep.ncu-rep" --page source --print-source sass --csv > "$OUT/sass.csv" 2>&1
    ncu -i "$OUT/rep.ncu-rep" --page details --csv > "$OUT/details.csv" 2>&1; rm -f "$OUT/rep.ncu-rep" ;;
  bench11)
    # After the Pallas body's log became one lg2.approx: Nsight Compute on the Pallas decode kernel at 16x2048
    # (registers, instructions, duration), then the full table interleaved by throughput. Ran at 1d09bda;
    # both math changes were backed out in e990c71 (final11b re-timed the result).
    export XLA_PYTHON_CLIENT_ALLOCATOR=platform
    timeout 150 ncu --clock-control none --kernel-name regex:"decode_|longflow_" --set full -f -o "$OUT/rep" \
      python3 scripts/ncu_launch_compare.py --cases 16x2048:pallas:noevict,16x2048:pallas \
      > "$OUT/ncu_run.log" 2>&1; tail -2 "$OUT/ncu_run.log"
    M=gpu__time_duration.sum,dram__bytes_write.sum,launch__registers_per_thread,smsp__inst_executed.sum
    ncu -i "$OUT/rep.ncu-rep" --page raw --csv --metrics $M > "$OUT/raw.csv" 2>&1; cut -d, -f5,12- "$OUT/raw.csv"
    ncu -i "$OUT/rep.ncu-rep" --page source --print-source sass --csv > "$OUT/sass.csv" 2>&1; rm -f "$OUT/rep.ncu-rep"
    unset XLA_PYTHON_CLIENT_ALLOCATOR
    C=xla_attn,pallas,pallas_noevict,triton,triton_noevict
    timeout 330 python3 scripts/bench_kernels.py --reps 10 --queued 4 --interleave --columns $C \
      --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1; tail -9 "$OUT/bench.log" ;;
  final11b)
    # After both math changes were backed out (the kernels are session 10's again): generate through both
    # kernels, then the full table interleaved by throughput, 20 repetitions.
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_generate.py -rs 2>&1 \
      | tee "$OUT/kernel_generate.log" | tail -2
    C=xla_attn,pallas,pallas_noevict,triton,triton_noevict
    timeout 400 python3 scripts/bench_kernels.py --reps 20 --queued 4 --interleave --columns $C \
      --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1; tail -9 "$OUT/bench.log" ;;
  comb11)
    # The combine kernel (XLA's launch since session 10) by chunk and warps at B = 16-32, by the profiler's
    # GPU time per kernel and by interleaved wall time: combine8 (session 8, through jax-triton) timed
    # only the wall, where 64- and 128-slot chunks were 0.6-0.7 us ahead of 256 at 16x2048. Ran at d16544e
    # with combine8's add() spelled out inline; bench_kernels.interleave_entry does the same steps since.
    python3 - <<'PY' 2>&1 | grep -v Warn | tee "$OUT/combine_sweep.log"
import functools, sys
sys.path.insert(0, "scripts")
import bench_kernels as bk
from cuda_triton_bridge import config, launch, longflow_decode_attention_triton as tri
from cuda_triton_bridge.tune import profile_kernels
VARIANTS = [(256, 8192, 4), (128, 8192, 4), (64, 8192, 4), (128, 8192, 8), (64, 8192, 2)]
scale = bk.HEAD_DIM ** -0.5
for batch, slots in [(16, 2048), (16, 8192), (32, 2048)]:
    sets = bk.make_sets(batch, slots, bk.n_sets_for(batch, slots))
    runs = {}
    def add(name, fn):  # compiled now, under the current constants
        runs[name] = bk.interleave_entry(name, fn, sets, scale, compile_now=True)[1]
    add("xla_attn", functools.partial(bk.xla_attention, scale=scale))
    add("triton_noevict", functools.partial(tri, scale=scale, compute_evict=False))
    for chunk, tile, warps in VARIANTS:
        config.COMBINE_CHUNK, launch.COMBINE_TILE_ELEMS, config.COMBINE_NUM_WARPS = chunk, tile, warps
        add(f"chunk{chunk}/w{warps}", functools.partial(tri, scale=scale))
    config.COMBINE_CHUNK, launch.COMBINE_TILE_ELEMS, config.COMBINE_NUM_WARPS = 256, 8192, 4
    res = bk.time_interleaved(runs, 20, queued=4)
    for name, (t, (lo, hi)) in res.items():
        run, n = runs[name]
        per, _, _, idle = profile_kernels(run, 3, n)
        kern = ", ".join(f"{k} {v:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.05)
        print(f"B={batch} C={slots} {name:16s} wall {t * 1e6:6.1f} us (min {lo * 1e6:.1f}, max {hi * 1e6:.1f})"
              f"  GPU {sum(per.values()):6.1f} us  idle {idle:4.1f}  [{kern}]", flush=True)
    del sets, runs
PY
    ;;
  tickets12)
    # (Column names as renamed after this ran, at 703fa4c: "triton" then had no tickets, now
    # "triton_fresh"; "triton_tickets" is now "triton".)
    # Session 12: the one-launch epilogues take a persistent ticket buffer (tickets=...) and leave it zero,
    # so through XLA's launch (B * Hkv < SMs / 2: coop) no zero-fill kernel runs per call.
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py -k tickets -rs 2>&1 \
      | tee "$OUT/tickets_tests.log" | tail -3
    C=xla_attn,triton_fresh,triton,triton_fresh_noevict,triton_noevict
    timeout 240 python3 scripts/bench_kernels.py --reps 30 --queued 4 --interleave --columns $C \
      --sizes 1x2048,1x8192,4x8192,16x2048,64x2048 --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
    tail -9 "$OUT/bench.log"
    timeout 120 python3 scripts/profile_kernel_chain.py --sizes 1x2048,1x8192 \
      --columns xla_attn,triton_fresh,triton,triton_fresh_noevict,triton_noevict --reps 3 \
      > "$OUT/profile.log" 2>&1; tail -12 "$OUT/profile.log" ;;
  loop12)
    # (Ran with the column names of its commit: "triton_tickets*" there is "triton*" now, and "triton*"
    # without tickets is "triton_fresh*".)
    # Is B = 1 bound by each program execution's new buffers (XLA updates its CUDA graph for them, session
    # 5)? The same chain once per execution, then 8 times inside a fori_loop, whose body's buffers stay.
    C=xla_attn,pallas,triton_fresh,triton,triton_fresh_noevict,triton_noevict
    for loops in 1 8; do
      timeout 270 python3 scripts/bench_kernels.py --reps 20 --queued 4 --interleave --columns $C \
        --sizes 1x2048,1x8192,4x8192,16x2048 --loops $loops --copy-mb 1024 --matmul-n 2048 \
        --out "$OUT/bench_loops$loops.md" > "$OUT/bench_loops$loops.log" 2>&1
      grep -E "^B=" "$OUT/bench_loops$loops.log"
    done ;;
  loop12b)
    # (Ran with the column names of its commit: "triton_tickets*" there is "triton*" now, and "triton*"
    # without tickets is "triton_fresh*".)
    # In the fori_loop form the host's launches no longer hide anything: does a one-launch epilogue, or
    # XLA's launch (in the CUDA graph, but XLA's slower build of the split kernel), win at B >= 16?
    C=xla_attn,triton,triton_noevict,triton_tickets_fused1,triton_tickets_coop
    C=$C,triton_tickets_xla,triton_tickets_xla_noevict
    timeout 420 python3 scripts/bench_kernels.py --reps 15 --queued 4 --interleave --columns $C \
      --sizes 16x2048,16x8192,64x2048 --loops 8 --copy-mb 1024 --matmul-n 2048 \
      --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
    grep -E "^B=|FAILED" "$OUT/bench.log" ;;
  loop12c)
    # (Ran with the column names of its commit: "triton_tickets*" there is "triton*" now, and "triton*"
    # without tickets is "triton_fresh*".)
    # Does the epilogue's chain wait on t's discard.global.L2 lines (the fence before the ticket waits for
    # every memory operation before it)? The t-traffic switches off, in the fori_loop form.
    C=xla_attn,triton,triton_tickets_nodiscard,triton_tickets_nohints,triton_noevict
    timeout 420 python3 scripts/bench_kernels.py --reps 15 --queued 4 --interleave --columns $C \
      --sizes 1x2048,1x8192,16x2048,16x8192 --loops 8 --copy-mb 1024 --matmul-n 2048 \
      --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
    grep -E "^B=|FAILED" "$OUT/bench.log" ;;
  sweep12)
    # (Ran with the column names of its commit: "triton_tickets*" there is "triton*" now, and "triton*"
    # without tickets is "triton_fresh*".)
    # b1sweep10 chose the B = 1 coop setting by wall time that the host's per-execution cost dominated;
    # in the fori_loop form the GPU side decides. Then the moved discards at B = 16 (default columns).
    python3 - <<'PY' 2>&1 | grep -v Warn | tee "$OUT/b1_sweep.log"
import functools, sys
sys.path.insert(0, "scripts")
import bench_kernels as bk
from cuda_triton_bridge import longflow_decode_attention_triton as tri
scale = bk.HEAD_DIM ** -0.5
XLA = dict(xla_call=True)
SETTINGS = {
    "coop 64x16 w4 (default)": {},
    "coop 64x8 w4": dict(block_c=64, num_splits=8),
    "coop 128x8 w4": dict(block_c=128, num_splits=8),
    "coop 128x16 w4": dict(block_c=128, num_splits=16),
    "coop 32x16 w4": dict(block_c=32, num_splits=16),
    "coop 64x16 w8": dict(block_c=64, num_splits=16, num_warps=8),
    "separate 32x16 (xla)": dict(epilogue="separate", block_c=32, num_splits=16, overrides=XLA),
    "fused 64x16 (xla)": dict(epilogue="fused", block_c=64, num_splits=16, overrides=XLA),
}
for slots in (2048, 8192):
    sets = bk.make_sets(1, slots, bk.n_sets_for(1, slots))
    runs = {}
    runs["xla_attn"] = bk.interleave_entry("xla_attn", functools.partial(bk.xla_attention, scale=scale), sets, scale, loops=8)[1]
    for name, kw in SETTINGS.items():
        if kw.get("num_splits", 1) * kw.get("block_c", 64) > slots:
            continue
        col = bk._with_tickets(functools.partial(tri, scale=scale, **kw))
        runs[name] = bk.interleave_entry(name, col, sets, scale, loops=8)[1]
    res = bk.time_interleaved(runs, 15, queued=4)
    for name, (t, (lo, hi)) in res.items():
        print(f"B=1 C={slots} {name:26s} {t * 1e6:6.2f} us (min {lo * 1e6:.2f}, max {hi * 1e6:.2f})", flush=True)
    del sets, runs
PY
    C=xla_attn,triton,triton_noevict
    timeout 200 python3 scripts/bench_kernels.py --reps 15 --queued 4 --interleave --columns $C \
      --sizes 16x2048,16x8192 --loops 8 --copy-mb 1024 --matmul-n 2048 \
      --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
    grep -E "^B=|FAILED" "$OUT/bench.log" ;;
  ab12)
    # The moved discards, A/B in one run: the kernels module before the move (git show) stands in for
    # cuda_triton_bridge.kernels while the "before" columns are traced and compiled.
    # (The device's copy has no git history: there the file came along untracked, as tmp_ab12/.)
    git show 6c42331:cuda_triton_bridge/kernels.py > /tmp/kernels_before.py 2>/dev/null \
      || cp tmp_ab12/kernels_before.py /tmp/kernels_before.py
    # Ran (at 0621e41) with these steps spelled out inline; scripts/ab_kernels.py does the same since.
    python3 scripts/ab_kernels.py --before /tmp/kernels_before.py --sizes 16x2048,16x8192,32x2048 \
      --names "discard before ticket,discard after ticket" 2>&1 | grep -v Warn | tee "$OUT/ab.log" ;;
  final12 | final12c)  # the same tests before (final12) and after (final12c) t's discard rule
    timeout 560 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py -rs 2>&1 \
      | tee "$OUT/triton_tests.log" | tail -4 ;;
  final12b)
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_generate.py -rs 2>&1 \
      | tee "$OUT/kernel_generate.log" | tail -2
    C=xla_attn,pallas,pallas_noevict,triton,triton_noevict,triton_fresh
    timeout 330 python3 scripts/bench_kernels.py --reps 15 --queued 4 --interleave --loops 8 --columns $C \
      --out "$OUT/bench_loops8.md" > "$OUT/bench_loops8.log" 2>&1; tail -9 "$OUT/bench_loops8.log"
    timeout 100 python3 scripts/bench_kernels.py --reps 20 --queued 4 --interleave --columns $C \
      --sizes 1x2048,1x8192 --copy-mb 1024 --matmul-n 2048 \
      --out "$OUT/bench_b1_classic.md" > "$OUT/bench_b1_classic.log" 2>&1; grep -E "^B=" "$OUT/bench_b1_classic.log" ;;
  disc12)
    # loop12c: without t's discard 16x2048 (t 4 MB) was 0.4 us faster and 16x8192 (t 16 MB) 5.7 us slower.
    # Where does it pay, by the size of t (B * 32 heads * C * 4 bytes)?
    C=xla_attn,triton,triton_tickets_nodiscard,triton_noevict
    timeout 500 python3 scripts/bench_kernels.py --reps 20 --queued 4 --interleave --loops 8 --columns $C \
      --sizes 1x2048,1x8192,4x8192,8x4096,16x2048,8x8192,16x4096,32x2048 --copy-mb 1024 --matmul-n 2048 \
      --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
    grep -E "^B=|FAILED" "$OUT/bench.log" ;;
  final12d)
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_generate.py -rs 2>&1 \
      | tee "$OUT/kernel_generate.log" | tail -2
    C=xla_attn,pallas,pallas_noevict,triton,triton_noevict,triton_fresh
    timeout 400 python3 scripts/bench_kernels.py --reps 15 --queued 4 --interleave --loops 8 --columns $C \
      --out "$OUT/bench_loops8.md" > "$OUT/bench_loops8.log" 2>&1; grep -E "^B=" "$OUT/bench_loops8.log" ;;
  spin12)
    # The coop kernel's barrier: 128 programs at B = 1 polled the arrival count with atomics, which queue at
    # the counter's L2 slice with the arrivals they wait for. A/B as in ab12 (the kernels before the change
    # came along untracked as tmp_ab13/: kernels.py at dd0f960), then the GPU tests that run coop. Ran at
    # 583939c and e5dc160; the read spin was backed out after it (no gain), so at a later commit this
    # needs that kernels.py back.
    # Ran (at 583939c, e5dc160) with these steps spelled out inline, the no-scoring column named "read
    # spin, noevict"; scripts/ab_kernels.py does the same since.
    python3 scripts/ab_kernels.py --before tmp_ab13/kernels_before.py --sizes 1x2048,1x8192,4x8192,8x4096 \
      --names "atomic polls,read spin" 2>&1 | grep -v Warn | tee "$OUT/ab.log"
    # (check_column takes a name ending in "noevict" for the -1 placeholder: the first run named it otherwise
    # and stopped there; the tests below then passed, 65 of them.) SKIP_TESTS=1 runs the A/B alone (the second run).
    [ -n "${SKIP_TESTS:-}" ] || timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py \
      -k "coop or default_config or tickets or decode_loop" 2>&1 | tee "$OUT/coop_tests.log" | tail -3 ;;
  ibench8)
    C=xla_attn,pallas,pallas_noevict,triton,triton_noevict
    timeout 270 python3 scripts/bench_kernels.py --reps 10 --queued 4 --interleave --columns $C \
      --out "$OUT/ibench_queued.md" > "$OUT/ibench_queued.log" 2>&1; tail -9 "$OUT/ibench_queued.log"
    timeout 200 python3 scripts/bench_kernels.py --reps 40 --queued 4 --interleave --columns $C --sizes 1x2048,1x8192 \
      --copy-mb 1024 --matmul-n 2048 --out "$OUT/ibench_b1.md" > "$OUT/ibench_b1.log" 2>&1; tail -5 "$OUT/ibench_b1.log" ;;
  combine8)
    # The Triton combine kernel's chunk and warps at B = 16 (a lead not taken in sessions 4-7), timed
    # interleaved by throughput against the default, the no-scoring kernel and XLA's attention.
    python3 - <<'PY' 2>&1 | grep -v Warn | tee "$OUT/combine_sweep.log"
import functools, sys
sys.path.insert(0, "scripts")
import jax
import bench_kernels as bk
from cuda_triton_bridge import config, launch, longflow_decode_attention_triton as tri
VARIANTS = [(256, 8192, 4), (128, 8192, 4), (64, 8192, 4), (256, 8192, 8), (512, 16384, 8), (128, 8192, 2)]
scale = bk.HEAD_DIM ** -0.5
for batch, slots in [(16, 2048), (16, 8192)]:
    sets = bk.make_sets(batch, slots, bk.n_sets_for(batch, slots))
    runs = {}
    def add(name, fn):
        bk.check_column(name, fn, sets[0], scale)
        program, n = bk.chain_program(fn, sets)
        run = functools.partial(program, sets[0][0], sets)
        jax.block_until_ready(run())  # trace and compile now, under the current constants
        runs[name] = (run, n)
    add("xla_attn", functools.partial(bk.xla_attention, scale=scale))
    add("triton_noevict", functools.partial(tri, scale=scale, compute_evict=False))
    for chunk, tile, warps in VARIANTS:
        config.COMBINE_CHUNK, launch.COMBINE_TILE_ELEMS, config.COMBINE_NUM_WARPS = chunk, tile, warps
        add(f"chunk{chunk}/tile{tile}/w{warps}", functools.partial(tri, scale=scale))
    config.COMBINE_CHUNK, launch.COMBINE_TILE_ELEMS, config.COMBINE_NUM_WARPS = 256, 8192, 4
    res = bk.time_interleaved(runs, 20, queued=4)
    for name, (t, (lo, hi)) in res.items():
        print(f"B={batch} C={slots} {name:28s} {t * 1e6:8.1f} us (min {lo * 1e6:.1f}, max {hi * 1e6:.1f})")
    del sets
PY
    ;;
  ttraffic)
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py -k "switches or kv_len_bound" \
      2>&1 | tee "$OUT/tests.log" | tail -8
    S=32:4:3
    H=cache_hints+discard_t
    diag=64:8192:$S:1:s:n,64:8192:$S:8:f:en:$H,64:8192:$S:16:f:en:$H,64:8192:$S:32:f:e:$H
    diag=$diag,64:2048:$S:1:s:n,64:2048:$S:4:f:en:$H,64:2048:$S:8:f:e:$H,64:2048:$S:2:f:e:$H
    diag=$diag,32:8192:$S:2:s:en:$H,32:8192:$S:8:f:e:$H,32:8192:$S:16:f:e:$H,32:2048:$S:2:s:e:$H
    diag=$diag,32:2048:$S:4:f:e:$H,16:8192:$S:4:s:e:$H,16:8192:$S:4:s:e
    timeout 420 python3 -m cuda_triton_bridge.tune --out "$OUT" --phases d --diag "$diag" 2>&1 \
      | tee "$OUT/tune.log" | grep -v "^|" ;;
  eq16)
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 560 python3 scripts/benchmark_generate.py --model qwen3-4b --isolate \
      --runs full:16:8192::triton longflow:16:8192:2048:triton --out "$OUT/eq16.jsonl" --plot "$OUT/eq16.png" \
      2>&1 | tee "$OUT/eq16.log" ;;
  lfwhole)
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 580 python3 scripts/benchmark_generate.py --model qwen3-4b --isolate \
      --runs longflow:max:8192:2048:triton --out "$OUT/$stage.jsonl" --plot "$OUT/$stage.png" 2>&1 | tee "$OUT/$stage.log" ;;
  max4b|max7b|max16k|max7b16k)
    model=qwen3-4b; new=8192
    case "$stage" in max7b|max7b16k) model=r1-distill-qwen-7b ;; esac
    # max7b16k slices the prompt pass (its 478-row LongFlow batch ran out of memory in prefill at 8192).
    slices=""; [ "$stage" = max7b16k ] && slices="--prefill-rows 64"
    case "$stage" in max16k|max7b16k) new=16384 ;; esac
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 580 python3 scripts/benchmark_generate.py --model $model --isolate $slices \
      --runs full:max:$new::triton longflow:max:$new:2048:triton:3072 --out "$OUT/$stage.jsonl" \
      --plot "$OUT/$stage.png" 2>&1 | tee "$OUT/$stage.log" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
