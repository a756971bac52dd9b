"""The launch plan of one decode call: grids, output buffers and constexprs of its kernels.

Pure Python, shared by the GPU launcher (decode.py) and the tests' Triton interpreter runner, so the CPU
tests exercise the plumbing that runs on the GPU.
"""

from __future__ import annotations

import dataclasses
import math

from cuda_triton_bridge.config import DecodeShape, ResolvedLaunch, cdiv, kernel_state_shape, next_pow2
from pallas_kernels.contract import num_score_groups

DISCARD_MIN_CAPABILITY = 80  # PTX discard.global.L2
LOG2E = math.log2(math.e)
COMBINE_TILE_ELEMS = 8192  # a combine program's importance tile: 64 f32 registers a thread at 4 warps
FINISH_TILE_ELEMS = 4096  # the fused and coop finishers' tiles, within the main kernel's registers


@dataclasses.dataclass(frozen=True)
class Buffer:
    """An output buffer: `dtype` is "q" (the input dtype), "f32" or "i32"; unused ones are (1,)."""

    shape: tuple[int, ...]
    dtype: str


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    grid: tuple[int, ...]
    outputs: tuple[Buffer, ...]
    meta: dict  # the kernel's constexprs
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    split: KernelLaunch  # the main kernel: decode_split_kernel, or the fused / coop kernel
    combine: KernelLaunch | None  # None: one launch (fused, coop, or 1 split without eviction)
    granularity: str
    epilogue: str = "separate"  # config.EPILOGUES

    @property
    def one_kernel(self) -> bool:
        """The fused or coop kernel does everything (its tickets come in zero and are left zero)."""
        return self.epilogue != "separate"

    @property
    def tickets_output(self) -> int:
        """Index of the tickets among a one-kernel plan's outputs."""
        return 8 if self.epilogue == "coop" else 7

    @property
    def main_kernel(self) -> str:
        """Name of the main kernel in kernels.py."""
        return f"decode_{self.epilogue}_kernel" if self.one_kernel else "decode_split_kernel"

    @property
    def evict_output(self) -> int:
        """Index of the evict slots among a one-kernel plan's outputs."""
        return 7 if self.epilogue == "coop" else 6


def _buf(shape, dtype, used=True):
    return Buffer(tuple(shape) if used else (1,), dtype)


def plan_launch(
    shape: DecodeShape, cfg: ResolvedLaunch, *, granularity: str, compute_evict: bool, is_f32: bool,
    native: bool = True, capability: int = 90, spin: bool = True, return_lse: bool = False,
) -> LaunchPlan:  # fmt: skip
    """The launch of one checked call.

    return_lse: each query head's log-sum-exp goes to a [B, Hq] f32 buffer, every kernel's last output:
      the main kernel's where it has the final statistics (one split, or the fused / coop epilogue),
      else the combine kernel's. Without it that buffer is (1,) and its stores compile away.
    capability: the GPU's compute capability (90 = sm_90); below sm_80 discard_t is ignored.
    native: compiled for the GPU (lg2.approx, PTX code unpacking); False for Triton's CPU interpreter,
      which runs no libdevice and no PTX.
    spin: the coop programs wait at their barrier; False for the interpreter, which runs programs one
      after another (there the last program to arrive does every share).
    The fused and coop kernels take the caller's tickets (kernel_state, zero) and leave them zero."""
    b, hq, hkv, c, d = shape.batch, shape.num_q_heads, shape.num_kv_heads, shape.num_slots, shape.head_dim
    num_groups = num_score_groups(hkv, granularity)
    heads_per_group = hq // num_groups
    splits = cfg.num_splits
    direct = splits == 1
    evict = bool(compute_evict)
    one_kernel = cfg.epilogue != "separate"
    stats = evict or not direct or one_kernel
    main_lse = return_lse and (direct or one_kernel)
    meta = dict(  # the constexprs every main kernel passes to _attend_split
        HQ=hq,
        HKV=hkv,
        C=c,
        D=d,
        NUM_SPLITS=splits,
        BLOCKS_PER_SPLIT=cfg.blocks_per_split,
        BLOCK_C=cfg.block_c,
        QROWS=cfg.query_rows,
        EVICT=evict,
        DOT_PRECISION="ieee" if is_f32 else "tf32",
        NATIVE=native,
        KV_QUANT=shape.kv_quant or "none",
        CODES_PER_BYTE=shape.codes_per_byte,
        QUANT_GROUP=shape.quant_group or d,
        QUANT_CHUNK=shape.quant_chunk,
        CONVERT_AFTER_UNPACK=cfg.convert_after_unpack,
    )
    # discard.global.L2 needs sm_80, and the interpreter (native=False) runs no PTX; each plan also
    # checks that its tiles hold whole 128-byte lines of t.
    discard = evict and cfg.discard_t and native and capability >= DISCARD_MIN_CAPABILITY
    if one_kernel:
        # The fused or coop kernel's own buffers, then evict and its tickets (the caller's kernel state).
        own, own_meta, whole_lines = _one_kernel_epilogue(shape, cfg, num_groups, evict, spin)
        tail = (*own, _buf((b, num_groups), "i32"), _buf(kernel_state_shape(b, hkv), "i32"))
        own_meta["DISCARD_T"] = discard and whole_lines
    else:  # decode_split_kernel's counter and no_evict
        tail = (_buf((b,), "i32", evict), _buf((b, num_groups), "i32", not evict))
        own_meta = dict(NG=num_groups, NG_P=next_pow2(num_groups), DIRECT_OUT=direct)
    split = KernelLaunch(
        grid=(splits, hkv, b),
        # Order = the kernel's output pointers: out, acc, m, l, t, then the tail, then lse.
        outputs=(
            _buf((b, hq, d), "q", direct or one_kernel),
            _buf((b, hq, splits, d), "f32", not direct),
            _buf((b, hq, splits), "f32", stats),
            _buf((b, hq, splits), "f32", stats),
            _buf((b, hq, c), "f32", evict),
            *tail,
            _buf((b, hq), "f32", main_lse),
        ),
        meta=dict(**meta, **own_meta, LSE=main_lse),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if one_kernel or (direct and not evict):
        return LaunchPlan(split, None, granularity, cfg.epilogue)

    ng_p, hpg_p = next_pow2(num_groups), next_pow2(heads_per_group)
    chunk = max(16, min(cfg.combine_chunk, COMBINE_TILE_ELEMS // (ng_p * hpg_p)))
    num_chunks = cdiv(c, chunk) if evict else 0
    partials = evict and num_chunks > 1
    combine = KernelLaunch(
        grid=(max(0 if direct else hq, num_chunks), b),
        # Order = the kernel's output pointers: out, evict, part_val, part_idx, counter (aliased input 5),
        # lse.
        outputs=(
            _buf((b, hq, d), "q", not direct),
            _buf((b, num_groups), "i32", evict),
            _buf((b, num_groups, num_chunks), "f32", partials),
            _buf((b, num_groups, num_chunks), "i32", partials),
            _buf((b,), "i32", evict),
            _buf((b, hq), "f32", return_lse and not direct),
        ),
        meta=dict(
            HQ=hq,
            C=c,
            D=d,
            NUM_SPLITS=splits,
            S_P=next_pow2(splits),
            NG=num_groups,
            NG_P=ng_p,
            HPG=heads_per_group,
            HPG_P=hpg_p,
            CHUNK=chunk,
            NUM_CHUNKS=max(num_chunks, 1),
            NCH_P=next_pow2(max(num_chunks, 1)),
            COMBINE_OUT=not direct,
            EVICT=evict,
            LSE=return_lse and not direct,
            DISCARD_T=discard and c % 32 == 0 and chunk % 32 == 0,  # whole 128-byte lines of t
        ),
        num_warps=cfg.combine_num_warps,
        num_stages=1,
    )
    return LaunchPlan(split, combine, granularity)


def _one_kernel_epilogue(shape, cfg, num_groups, evict, spin):
    """The fused or coop kernel's own output buffers (between t and evict), its constexprs, and whether
    its tiles hold whole 128-byte lines of t (discard_t needs them)."""
    b, hkv, c, d = shape.batch, shape.num_kv_heads, shape.num_slots, shape.head_dim
    splits = cfg.num_splits
    if cfg.epilogue == "fused":
        g_p, hkv_p = next_pow2(shape.group), next_pow2(hkv)
        echunk = max(16, min(next_pow2(c), FINISH_TILE_ELEMS // g_p))
        schunk = max(16, min(next_pow2(c), FINISH_TILE_ELEMS // hkv_p))
        meta = dict(
            B=b,
            G_P=g_p,
            S_CHUNK=max(1, min(next_pow2(splits), COMBINE_TILE_ELEMS // (g_p * d))),
            HKV_P=hkv_p,
            NG=num_groups,
            ECHUNK=echunk,
            SCHUNK=schunk,
        )
        imp = _buf((b, hkv, c), "f32", evict and num_groups < hkv)  # per-KV-head importance
        return (imp,), meta, c % 32 == 0 and echunk % 32 == 0 and schunk % 32 == 0
    bar_kv = hkv // num_groups if evict else 1  # a barrier group: one score group, or one KV head
    num_bars = b * hkv // bar_kv
    shares = splits * bar_kv
    heads_per_group = shape.num_q_heads // num_groups
    hpg_p = next_pow2(heads_per_group)
    # A share's scoring tile is [heads of the group, echunk]; >= 32 slots keeps whole 128-byte t lines.
    echunk = min(FINISH_TILE_ELEMS // hpg_p, next_pow2(cdiv(c, shares)))
    echunk = max(16, min(max(32, echunk), next_pow2(c)))
    meta = dict(
        S_P=next_pow2(splits),
        BAR_KV=bar_kv,
        NBAR=num_bars,
        HPG=heads_per_group,
        HPG_P=hpg_p,
        NSH=shares,
        NSH_P=next_pow2(shares),
        ECHUNK=echunk,
        SPIN=spin,
    )
    minima = (_buf((num_bars, shares), "f32", evict), _buf((num_bars, shares), "i32", evict))  # per share
    return minima, meta, c % 32 == 0 and echunk % 32 == 0
