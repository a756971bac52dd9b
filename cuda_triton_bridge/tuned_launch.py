"""Tuned launch defaults of the Triton decode kernel, as data (`config.resolve_launch` reads them).

Keyed by the GPU generation (compute capability), by the batch's own parallelism, B * Hkv programs,
against the SM count, and by C through each row's split rule. Measured on an H100 80GB HBM3 with
Hq/Hkv 32/8, D 128, bf16, C 2048-8192; the reason for each row is in docs/KERNELS.md.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class TunedLaunch:
    """One row: the launch for calls with B * Hkv < below_programs_per_sm * SMs (first row that fits).

    The split count is programs_per_sm * SMs / (B * Hkv) rounded to nearest (or C / slots_per_split
    when set), at least 1, at most one split per MIN_SLOTS_PER_SPLIT slots.
    """

    below_programs_per_sm: float
    epilogue: str  # "coop", "separate" or "fused"
    block_c: int
    xla_launch: bool  # the main kernel through XLA's own Triton custom call (else jax-triton)
    programs_per_sm: float = 1.0
    slots_per_split: int | None = None


# With eviction scoring: coop while the batch gives under half an SM's worth of programs (one launch,
# XLA's launch joins its CUDA graph), the separate epilogue with 128-slot blocks split to about one
# program an SM (rounded: one split from 1.5 programs an SM) up to two programs per SM, and the fused
# epilogue with 512-slot splits above (its per-KV-head finishers overlap later splits' streaming and find
# t in L2).
_SM90_EVICT = (
    TunedLaunch(0.5, "coop", 64, xla_launch=True),
    TunedLaunch(2.0, "separate", 128, xla_launch=False),
    TunedLaunch(math.inf, "fused", 32, xla_launch=False, slots_per_split=512),
)
# Attention only (the full cache): the same launch structure at a small batch; above it one split kernel
# that writes the output itself, split until about four programs per SM.
_SM90_ATTEND = (
    TunedLaunch(0.5, "coop", 64, xla_launch=True),
    TunedLaunch(2.0, "separate", 128, xla_launch=False),
    TunedLaunch(math.inf, "separate", 32, xla_launch=False, programs_per_sm=4.0),
)
# Before Hopper the 64- and 128-slot blocks are unmeasured and 128 spills on sm_75: 32-slot blocks.
_OLDER_EVICT = tuple(dataclasses.replace(row, block_c=32) for row in _SM90_EVICT)
_OLDER_ATTEND = tuple(dataclasses.replace(row, block_c=32) for row in _SM90_ATTEND)

# (minimum compute capability, with scoring, rows), first match wins.
TUNED_LAUNCH = (
    (90, True, _SM90_EVICT),
    (90, False, _SM90_ATTEND),
    (0, True, _OLDER_EVICT),
    (0, False, _OLDER_ATTEND),
)

# float32 inputs (tests, not speed): fp32 tiles are twice as wide; these keep the kernel free of spills.
F32_BLOCK_C = 32
F32_NUM_WARPS = 8
F32_NUM_STAGES = 2
# A quantized cache (kv_quant, 16-bit q), every row: 64-slot blocks. The codes are unpacked and converted
# in registers, so the tile is bounded by registers, not shared memory: at D 128, group 32 this is the
# largest block with no spill for every kind and epilogue on sm_90 (ptxas).
# Warps per program and, where the table's row splits by programs per SM, that target, by kind. Measured
# on the H100 with scoring, C 2048 (docs/BENCHMARKS.md, docs/KERNELS.md):
# - int4: 2 warps. Fewer warps split a block's 64 slots fewer ways, so each slot costs fewer
#   instructions (offline SASS, group 128: 41 warp instructions a slot against 51 at 4 warps), and the
#   int4 loop is instruction-bound: group 128, B 64: 112 us against 129 at 4 warps (108 with 2 splits);
#   B 16: 41.5 against 42.7. 8 warps: 520 us against 262 at 4 (group 32).
# - int8: 4 warps, B 64: 233 us against 481 with 8; B 16, 4 splits: 74 us against 93 with 1 (4 warps)
#   and 121 (8 warps, 1 split). With scoring, from about 3.5 programs an SM, 1 warp with 32-slot blocks
#   (QUANT_MANY_PROGRAMS; group 128, C 2048, the fused epilogue's own splits): B 64 131 us against
#   140, B 128 233 against 252; below it slower (B 32 77 against 72, B 48 114 against 110).
# fp8 and int2 are not timed: they keep 8 warps (from the register report) and the row's own target.
QUANT_BLOCK_C = 64
QUANT_NUM_WARPS = {"int8": 4, "fp8": 8, "int4": 2, "int2": 8}
QUANT_PROGRAMS_PER_SM = {"int8": 4.0, "int4": 2.0}


@dataclasses.dataclass(frozen=True)
class ManyProgramsLaunch:
    """A quantized kind's warps and block from `programs_per_sm` B * Hkv programs an SM up, where the
    batch alone fills the GPU: each warp then covers more slots of a block for its per-block work."""

    programs_per_sm: float
    num_warps: int
    block_c: int


QUANT_MANY_PROGRAMS = {"int8": ManyProgramsLaunch(programs_per_sm=3.5, num_warps=1, block_c=32)}
NUM_WARPS = 4
NUM_STAGES = 3  # the cp.async pipeline depth, lowered where shared memory does not hold it
MIN_SLOTS_PER_SPLIT = 128
# t (f32, B x Hq x C) up to this size stays in L2 once read: the next call's t overwrites the same lines
# there, and the discards cost more than the write-back they save; above it they pay.
DISCARD_T_MIN_BYTES = 4 << 20


def tuned_rows(capability: int, compute_evict: bool) -> tuple[TunedLaunch, ...]:
    """The table's rows for this GPU generation and scoring mode."""
    return next(
        rows for cap, evict, rows in TUNED_LAUNCH if capability >= cap and evict == bool(compute_evict)
    )


def tuned_row(rows: tuple[TunedLaunch, ...], programs: int, sms: int) -> TunedLaunch:
    """The row for B * Hkv = `programs` on `sms` SMs."""
    return next(row for row in rows if programs < row.below_programs_per_sm * sms)
