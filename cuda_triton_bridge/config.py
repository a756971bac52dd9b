"""Launch configuration and input checks for the Triton decode kernel (no triton import here).

Everything in this module runs on any machine, so a bad block size or shape raises the same ValueError
with or without a GPU, and CPU tests can check it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from longflow_jax.reference import check_decode_inputs, check_granularity, check_kv_len, num_score_groups

MIN_DOT = 16  # tl.dot needs every dimension >= 16: query rows are padded up to this.
MAX_BLOCK_C = 512
MAX_SPLITS = 256
HEAD_DIMS = (16, 32, 64, 128, 256)  # tl.arange needs a power of two; one register row per query head.

# Defaults measured on an H100 80GB HBM3 (docs/KERNEL_NOTES_triton.md), by the batch's own parallelism,
# programs = B * Hkv against the SM count (config.batch_regime):
# * "small" (programs < SMs / 2; B <= 7 at 8 KV heads): one program per SM (never below
#   MIN_SLOTS_PER_SPLIT slots a split), SMALL_EPILOGUE with scoring.
# * "mid" (SMs / 2 <= programs < 2 * SMs; B = 9-32): one split per (sequence, KV head) and about one
#   program per SM, MID_BLOCK_C-slot blocks, the separate epilogue (session 6 sweeps: 16x8192 206-212 us
#   against 212-219 for 4 splits of 32-slot blocks; 32x8192 406 against 416).
# * "large" (programs >= 2 * SMs; B = 64): the fused epilogue with FUSED_SLOTS_PER_SPLIT-slot splits of
#   32-slot blocks (session 4: 64x8192 756 vs 795 us, 64x2048 196 vs 199); its per-KV-head finishers
#   run while later splits still stream, and t is still in L2 when they read it. Without scoring,
#   PROGRAMS_PER_SM programs per SM (one split at B = 64).
# 4 warps and a 3-stage cp.async pipeline throughout.
BLOCK_C = 32
MID_BLOCK_C = 128
NUM_WARPS = 4
NUM_STAGES = 3
PROGRAMS_PER_SM = 4
MIN_SLOTS_PER_SPLIT = 128
# float32 (tests, not speed): fp32 tiles are twice as wide; these keep the kernel free of spills.
F32_BLOCK_C = 32
F32_NUM_WARPS = 8
F32_NUM_STAGES = 2
EPILOGUES = ("fused", "separate", "coop")
FUSED_MIN_PROGRAMS_PER_SM = 2
FUSED_SLOTS_PER_SPLIT = 512
# "coop" (one launch, a barrier, then every program takes a share of the epilogue): its programs wait for
# each other, so the whole grid must be resident at once; it is allowed only when the grid has at most one
# program per SM (check_coop_grid), with at most COOP_MAX_SPLITS splits (a share's merge tile is
# [splits, D]).
COOP_MAX_SPLITS = 32
# 64-slot blocks (session 10, through XLA's launch, b1sweep10b): less GPU time than 128-slot blocks at
# seven of the eight B = 1-8 sizes measured, e.g. 19.1 against 20.5 us at 1x8192 and 54.9 against 56.6
# at 4x8192, level at 1x2048. Session 6 chose 128 while jax-triton's host launch hid the GPU time.
COOP_BLOCK_C = 64
SMALL_EPILOGUE = "coop"
# The epilogue kernel: slots per importance program, and its warps.
COMBINE_CHUNK = 256
COMBINE_NUM_WARPS = 4
# How the split kernel takes ||v||_1 for the importance: "mma" (ones @ |V|^T on the tensor cores, in the
# logits' own layout) or "reduce" (a row sum, then a layout conversion to the logits' layout).
VNORM_MODES = ("mma", "reduce")
VNORM = "mma"
DEFAULT_NUM_SMS = 132  # H100 SXM; used when the device does not report its core count.
# The 128-slot blocks of the "mid" default and the coop default's 64-slot blocks were measured on Hopper
# only; 128-slot blocks need 72 KiB of shared memory at D 128 (Turing has 64) and spill on sm_75, so older
# GPUs keep 32-slot blocks.
LARGE_BLOCK_MIN_CAPABILITY = 90
DEFAULT_CAPABILITY = 90
# Shared memory one program may use: the H100's opt-in maximum per block (227 KiB). A launch over it
# fails only at run time ("Shared memory requested ... exceeds device resources"), so resolve_config
# checks its estimate first.
SHARED_MEMORY_LIMIT = 232448


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    batch: int
    num_q_heads: int
    num_kv_heads: int
    num_slots: int
    head_dim: int
    itemsize: int = 2

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Resolved launch parameters; `num_splits` is the effective count (whole blocks per split)."""

    block_c: int
    num_splits: int
    blocks_per_split: int
    num_warps: int
    num_stages: int
    query_rows: int  # the GQA group padded to a tl.dot-able power of two
    combine_chunk: int
    combine_num_warps: int
    vnorm: str = VNORM
    epilogue: str = "separate"  # "separate" (split + combine kernels), "fused" or "coop" (one launch)
    # The traffic of t (docs/KERNEL_NOTES_triton.md, session 4): cache_hints stores t (and the fused
    # epilogue's per-KV-head importances) with L2 evict_last; discard_t drops their lines from L2 once the
    # epilogue has read them (discard.global.L2), so a line still in L2 is never written back to DRAM.
    # cache_hints on by default; discard_t by default_discard_t (t over 4 MiB). resolve_config(overrides=...)
    # sets either for A/B runs.
    cache_hints: bool = True
    discard_t: bool = True
    # Launch through jaxlib's typed-FFI Triton target where jax has it (ffi_target.py) instead of
    # jax-triton's legacy custom call. Off: on jax 0.11.2 / H100 it cost 0.2-13 us more per call
    # (docs/BENCHMARKS.md, session 5).
    ffi_call: bool = False
    # Launch through XLA's own Triton custom call (xla_call.py): XLA compiles the kernels' TTIR and
    # runs them as ordinary kernel thunks, inside its CUDA graphs. resolve_config's default: at a small
    # batch only (default_xla_call); overrides=dict(xla_call=...) forces either launch.
    xla_call: bool = False
    # The combine kernel through XLA's Triton custom call even where the main kernel goes through
    # jax-triton. On by default: XLA's Triton compiles the combine kernel as fast or faster (5.2-5.4
    # against 5.8 us at 16x2048), and the idle GPU time between the two launches halves (1.9 against
    # 4.1 us; docs/BENCHMARKS.md, session 10).
    xla_combine: bool = True


def _check_positive_int(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")


def check_triton_inputs(q, k_cache, v_cache, kv_valid, scale, granularity: str) -> DecodeShape:
    """The reference's shape/dtype contract plus what the kernel itself needs."""
    check_decode_inputs(q, k_cache, v_cache, kv_valid)
    check_granularity(granularity)
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(
            f"q, k_cache, v_cache must share one dtype (tl.dot takes equal operand types), got "
            f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    batch, num_q_heads, head_dim = q.shape
    _, num_kv_heads, num_slots, _ = k_cache.shape
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if min(batch, num_q_heads, num_slots) < 1:
        raise ValueError(f"empty input: q {q.shape}, k_cache {k_cache.shape}")
    # A static number (Python or numpy scalar), not a traced array: it is baked into the launch.
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite Python float (a static softmax scale), got {scale!r}")
    if batch > 65535 or num_kv_heads > 65535:
        raise ValueError(f"batch ({batch}) and num_kv_heads ({num_kv_heads}) must be <= 65535 (grid limit)")
    return DecodeShape(batch, num_q_heads, num_kv_heads, num_slots, head_dim, q.dtype.itemsize)


def resolve_kv_len(kv_len, batch: int, num_slots: int):
    """The per-row slot bound as int32 [B]: `kv_len` checked, or C for every row when it is None."""
    import jax.numpy as jnp

    if kv_len is None:
        return jnp.full((batch,), num_slots, jnp.int32)
    check_kv_len(kv_len, batch)
    return jnp.asarray(kv_len).astype(jnp.int32)


def num_sms() -> int:
    try:
        import jax

        return int(getattr(jax.devices()[0], "core_count", 0) or DEFAULT_NUM_SMS)
    except Exception:  # no backend at all: only the split heuristic uses this
        return DEFAULT_NUM_SMS


def device_capability() -> int:
    """The default GPU's compute capability as an int (90 = sm_90); 90 where there is none (CPU tests)."""
    try:
        import jax

        major, _, minor = str(getattr(jax.devices()[0], "compute_capability", "")).partition(".")
        return int(major) * 10 + int(minor or 0)
    except Exception:  # no GPU backend, or a device that does not report it
        return DEFAULT_CAPABILITY


def batch_regime(shape: DecodeShape, sms: int | None = None) -> str:
    """ "small", "mid" or "large": how many programs the batch alone gives (B * Hkv) against the SMs."""
    sms = sms or num_sms()
    programs = shape.batch * shape.num_kv_heads
    if programs >= FUSED_MIN_PROGRAMS_PER_SM * sms:
        return "large"
    return "mid" if 2 * programs >= sms else "small"


def default_epilogue(shape: DecodeShape, compute_evict: bool, sms: int | None = None) -> str:
    """The measured choice (see the defaults above). Without scoring: SMALL_EPILOGUE for a small batch
    (the same launch structure as with scoring), else "separate" (one split there: a single launch that
    writes the output itself)."""
    regime = batch_regime(shape, sms)
    if not compute_evict:
        return SMALL_EPILOGUE if regime == "small" else "separate"
    return {"small": SMALL_EPILOGUE, "mid": "separate", "large": "fused"}[regime]


def default_xla_call(shape: DecodeShape, sms: int | None = None) -> bool:
    """Launch through XLA's own Triton custom call (xla_call.py) at a small batch only. Measured on an
    H100 (docs/BENCHMARKS.md, session 10): there the launch's host cost decides (the kernels join XLA's
    CUDA graph: 1x2048 25.6 against 37.0 us through jax-triton), while from B * Hkv >= SMs / 2 on the
    kernel's own speed does, and XLA's Triton compiles our main kernels 2-5% slower than the triton
    package (split kernel 49.2 against 47.2 us at 16x2048, fused kernel 789.5 against 754.8 at 64x8192)."""
    return batch_regime(shape, sms) == "small"


def default_block_c(
    shape: DecodeShape, epilogue: str, sms: int | None = None, capability: int | None = None
) -> int:
    capability = capability or device_capability()
    if shape.itemsize > 2:
        block_c = F32_BLOCK_C
    elif capability < LARGE_BLOCK_MIN_CAPABILITY:
        block_c = BLOCK_C
    elif epilogue == "coop":
        block_c = COOP_BLOCK_C
    elif epilogue == "separate" and batch_regime(shape, sms) == "mid":
        block_c = MID_BLOCK_C
    else:
        block_c = BLOCK_C
    return max(MIN_DOT, min(block_c, next_pow2(shape.num_slots)))


def default_num_splits(shape: DecodeShape, block_c: int, sms: int | None = None, epilogue="separate") -> int:
    """Split-K count (see the defaults above)."""
    num_blocks = cdiv(shape.num_slots, block_c)
    if epilogue == "fused":
        return max(1, min(cdiv(shape.num_slots, FUSED_SLOTS_PER_SPLIT), num_blocks, MAX_SPLITS))
    sms = sms or num_sms()
    programs = shape.batch * shape.num_kv_heads
    most = max(1, num_blocks // max(1, MIN_SLOTS_PER_SPLIT // block_c))
    if epilogue == "coop":
        return max(1, min(sms // programs, most, COOP_MAX_SPLITS))
    regime = batch_regime(shape, sms)
    if regime == "mid":
        want = round(sms / programs)  # about one program per SM
    else:
        want = (PROGRAMS_PER_SM * sms if regime == "large" else sms) // programs
    return max(1, min(want, most, MAX_SPLITS))


def check_coop_grid(shape: DecodeShape, num_splits: int, sms: int | None = None) -> None:
    """The coop epilogue's programs wait for each other at a barrier: every program must be resident at
    once, which one program per SM guarantees (a kernel that launches at all fits once on every SM)."""
    sms = sms or num_sms()
    grid = num_splits * shape.num_kv_heads * shape.batch
    if grid > sms:
        raise ValueError(
            f'epilogue="coop" needs at most one program per SM: num_splits={num_splits} x '
            f"{shape.num_kv_heads} KV heads x batch {shape.batch} = {grid} programs > {sms} SMs; use fewer "
            f'splits or epilogue="fused" / "separate"'
        )
    if num_splits > COOP_MAX_SPLITS:
        raise ValueError(
            f'epilogue="coop" takes at most {COOP_MAX_SPLITS} splits, got num_splits={num_splits}'
        )


def shared_memory_bytes(shape: DecodeShape, block_c: int, num_stages: int) -> int:
    """Shared memory of the main kernel (split or fused), as the Triton 3.6 compiler lays it out: the
    cp.async ring of K and V tiles ((stages - 1) of them; one counted for an unpipelined kernel, which
    needs less), the query tile, and the f32 logits tile (16-bit inputs) or one more f32 [block_c, D]
    tile (float32 inputs, ieee dots). Exact for 2+ stages; tests/test_triton_kernel.py checks it against
    the compiled kernels."""
    rows = max(MIN_DOT, next_pow2(shape.group))
    ring = max(num_stages - 1, 1) * 2 * block_c * shape.head_dim * shape.itemsize
    tile = block_c * shape.head_dim * 4 if shape.itemsize >= 4 else rows * block_c * 4
    return ring + tile + rows * shape.head_dim * shape.itemsize


def _fit_stages(shape: DecodeShape, block_c: int, num_stages, default: int) -> int:
    """An explicit stage count if it fits in shared memory (else ValueError); with None, the largest
    count up to the default that fits."""
    limit_kib = SHARED_MEMORY_LIMIT // 1024
    if num_stages is not None:
        need = shared_memory_bytes(shape, block_c, num_stages)
        if need > SHARED_MEMORY_LIMIT:
            raise ValueError(
                f"block_c={block_c} with num_stages={num_stages} at head_dim={shape.head_dim} "
                f"({shape.itemsize}-byte elements) needs about {need // 1024} KiB of shared memory per "
                f"program; the limit is {limit_kib} KiB: lower block_c or num_stages"
            )
        return num_stages
    for stages in range(default, 0, -1):
        if shared_memory_bytes(shape, block_c, stages) <= SHARED_MEMORY_LIMIT:
            return stages
    raise ValueError(
        f"block_c={block_c} at head_dim={shape.head_dim} ({shape.itemsize}-byte elements) needs about "
        f"{shared_memory_bytes(shape, block_c, 1) // 1024} KiB of shared memory per program even with "
        f"num_stages=1; the limit is {limit_kib} KiB: lower block_c"
    )


def resolve_config(
    shape: DecodeShape,
    *,
    block_c=None,
    num_splits=None,
    num_warps=None,
    num_stages=None,
    vnorm=None,
    epilogue=None,
    compute_evict: bool = True,
    sms: int | None = None,
    capability: int | None = None,
    overrides: dict | None = None,
) -> LaunchConfig:
    """Fill in defaults and check explicit values; raises ValueError naming the bad value."""
    wide = shape.itemsize > 2
    if epilogue is None:
        epilogue = default_epilogue(shape, compute_evict, sms)
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES} or None, got {epilogue!r}")
    if block_c is None:
        block_c = default_block_c(shape, epilogue, sms, capability)
    _check_positive_int("block_c", block_c, MIN_DOT, MAX_BLOCK_C)
    if not is_pow2(block_c):
        raise ValueError(f"block_c must be a power of two in [{MIN_DOT}, {MAX_BLOCK_C}], got {block_c}")
    num_blocks = cdiv(shape.num_slots, block_c)
    if num_splits is None:
        num_splits = default_num_splits(shape, block_c, sms, epilogue)
    _check_positive_int("num_splits", num_splits, 1, MAX_SPLITS)
    if num_splits > num_blocks:
        raise ValueError(
            f"num_splits={num_splits} exceeds the {num_blocks} blocks of block_c={block_c} slots in "
            f"C={shape.num_slots}; expected num_splits <= {num_blocks}"
        )
    # Whole blocks per split; a requested count that does not divide the blocks is rounded to the number
    # of splits actually needed (e.g. 7 blocks in 3 requested splits -> 3 blocks each, 3 splits).
    blocks_per_split = cdiv(num_blocks, num_splits)
    num_splits = cdiv(num_blocks, blocks_per_split)
    if epilogue == "coop":
        check_coop_grid(shape, num_splits, sms)
    if num_warps is None:
        num_warps = F32_NUM_WARPS if wide else NUM_WARPS
    _check_positive_int("num_warps", num_warps, 1, 16)
    if not is_pow2(num_warps):
        raise ValueError(f"num_warps must be a power of two in [1, 16], got {num_warps}")
    if num_stages is not None:
        _check_positive_int("num_stages", num_stages, 1, 8)
    num_stages = _fit_stages(shape, block_c, num_stages, F32_NUM_STAGES if wide else NUM_STAGES)
    vnorm = VNORM if vnorm is None else vnorm
    if vnorm not in VNORM_MODES:
        raise ValueError(f"vnorm must be one of {VNORM_MODES}, got {vnorm!r}")
    cfg = LaunchConfig(
        block_c=block_c,
        num_splits=num_splits,
        blocks_per_split=blocks_per_split,
        num_warps=num_warps,
        num_stages=num_stages,
        query_rows=max(MIN_DOT, next_pow2(shape.group)),
        combine_chunk=min(COMBINE_CHUNK, max(MIN_DOT, next_pow2(shape.num_slots))),
        combine_num_warps=COMBINE_NUM_WARPS,
        vnorm=vnorm,
        epilogue=epilogue,
        discard_t=default_discard_t(shape),
        xla_call=default_xla_call(shape, sms),
    )
    return _apply_overrides(cfg, overrides)


OVERRIDE_FIELDS = ("cache_hints", "discard_t", "ffi_call", "xla_call", "xla_combine")
# t (f32, B x Hq x C) up to this size stays in L2 once read: the next call's t overwrites the same lines
# there, and the discards cost more than the write-back they save. Measured in the fori_loop form
# (docs/BENCHMARKS.md, session 12): 0.4-0.5 us faster without the discard at 16x2048 (4 MiB, two runs),
# the same at B = 1-8 (0.25-4 MiB); above it mixed (16x4096 0.5 us faster, 32x2048 1.4 slower, 8 MiB
# each) and 5.7 us slower at 16x8192 (16 MiB).
DISCARD_T_MIN_BYTES = 4 << 20


def default_discard_t(shape: DecodeShape) -> bool:
    """Drop t's lines from L2 once read only where t is larger than DISCARD_T_MIN_BYTES."""
    return 4 * shape.batch * shape.num_q_heads * shape.num_slots > DISCARD_T_MIN_BYTES


def _apply_overrides(cfg: LaunchConfig, overrides: dict | None) -> LaunchConfig:
    if not overrides:
        return cfg
    unknown = sorted(set(overrides) - set(OVERRIDE_FIELDS))
    if unknown:
        raise ValueError(f"unknown overrides {unknown}; expected a subset of {OVERRIDE_FIELDS}")
    for name, value in overrides.items():
        if not isinstance(value, bool):
            raise ValueError(f"override {name} must be a bool, got {value!r}")
    return dataclasses.replace(cfg, **overrides)


def resolve_call(
    q,
    k_cache,
    v_cache,
    kv_valid,
    *,
    scale,
    granularity,
    kv_len,
    compute_evict=True,
    sms: int | None = None,
    **launch,
):
    """Every check of one decode call, then its launch config: (shape, kv_len int32 [B], cfg).

    launch: resolve_config's block_c, num_splits, num_warps, num_stages, vnorm, epilogue, overrides.
    """
    shape = check_triton_inputs(q, k_cache, v_cache, kv_valid, scale, granularity)
    kv_len = resolve_kv_len(kv_len, shape.batch, shape.num_slots)
    cfg = resolve_config(shape, compute_evict=compute_evict, sms=sms, **launch)
    return shape, kv_len, cfg


# Tickets that persist across calls (the `tickets` argument): int32 [B, TICKETS_PER_KV_HEAD * Hkv], enough
# for the coop kernel (2 per barrier group, at most B * Hkv groups) and the fused one (B * Hkv + B). The
# kernels index it as one flat array; the leading batch axis lets a cache be sliced and joined by rows
# (all its entries are zero between calls).
TICKETS_PER_KV_HEAD = 2


def ticket_shape(batch: int, num_kv_heads: int) -> tuple[int, int]:
    """Shape of the persistent ticket buffer of a call with this batch and number of KV heads."""
    return (batch, TICKETS_PER_KV_HEAD * num_kv_heads)


def check_tickets(tickets, shape: DecodeShape) -> None:
    """A persistent ticket buffer must be int32 ticket_shape(B, Hkv). Its values cannot be checked
    without reading it on the device: it must come from `new_tickets` or the previous call's return."""
    want = ticket_shape(shape.batch, shape.num_kv_heads)
    dtype = getattr(tickets, "dtype", None)
    if tuple(getattr(tickets, "shape", ())) != want or dtype is None or str(dtype) != "int32":
        raise ValueError(
            f"tickets must be int32 {want} for batch {shape.batch} and {shape.num_kv_heads} KV heads "
            f"(new_tickets(batch, num_kv_heads), or the previous call's return), got "
            f"{getattr(tickets, 'dtype', type(tickets).__name__)} {tuple(getattr(tickets, 'shape', ()))}"
        )


def score_groups(shape: DecodeShape, granularity: str) -> tuple[int, int]:
    """(number of score groups, query heads per group): (1, Hq) or (Hkv, Hq // Hkv)."""
    groups = num_score_groups(shape.num_kv_heads, granularity)
    return groups, shape.num_q_heads // groups
