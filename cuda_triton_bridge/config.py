"""Input checks and launch configuration of the Triton decode kernel: no triton import, so bad input
raises the same ValueError with or without a GPU."""

from __future__ import annotations

import dataclasses
import math
import numbers

from cuda_triton_bridge import tuned_launch
from pallas_kernels import contract, quant
from pallas_kernels.contract import cdiv, is_pow2, next_pow2, num_sms

MIN_DOT = 16  # tl.dot needs every dimension >= 16: query rows are padded up to this.
MAX_BLOCK_C = 512
MAX_SPLITS = 256
HEAD_DIMS = (16, 32, 64, 128, 256)  # tl.arange needs a power of two; one register row per query head.
EPILOGUES = ("separate", "fused", "coop")
COOP_MAX_SPLITS = 32  # the coop epilogue's share tile is [splits, D]
COMBINE_CHUNK = 256  # slots per importance program of the combine kernel
COMBINE_NUM_WARPS = 4
DEFAULT_CAPABILITY = 90
FP8_MIN_CAPABILITY = 89  # float8e4nv (kv_quant="fp8")
# Hopper's opt-in shared memory per block (227 KiB). A launch over it fails only at run time, so
# resolve_launch checks its estimate first.
SHARED_MEMORY_LIMIT = 232448
# Persistent tickets per (sequence, KV head): coop needs 2 per barrier group (at most B * Hkv groups),
# fused B * Hkv + B.
TICKETS_PER_KV_HEAD = 2


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How one call launches; every field left None takes the tuned default (tuned_launch.py).

    epilogue: "separate" (a split kernel, then a combine kernel), "fused" (one launch; the last program
      of each KV head, then of each sequence, finishes) or "coop" (one launch; every program waits at a
      barrier, then finishes a share; only with at most one program per SM). See kernels.py.
    block_c: slots per loop iteration, a power of two in [16, 512].
    num_splits: split-K programs per (sequence, KV head), in [1, ceil(C / block_c)]; rounded to whole
      blocks per split.
    num_warps, num_stages: Triton launch parameters of the main kernel.
    xla_launch: launch the main kernel through XLA's own Triton custom call (it joins XLA's CUDA graphs)
      instead of jax-triton's. The combine kernel always goes through XLA's call.
    discard_t: drop t's lines from L2 once the epilogue has read them (no DRAM write-back).
    convert_after_unpack: a quantized cache's codes reach the tensor-core dots' layout as 16-bit values
      (shared memory and ldmatrix) after unpacking, not as payload bytes before it; off by default until
      timed (docs/KERNELS.md, "Converting after unpacking").
    """

    epilogue: str | None = None
    block_c: int | None = None
    num_splits: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    xla_launch: bool | None = None
    discard_t: bool | None = None
    convert_after_unpack: bool | None = None


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    batch: int
    num_q_heads: int
    num_kv_heads: int
    num_slots: int
    head_dim: int
    itemsize: int = 2  # q's (and an unquantized cache's) bytes an element
    kv_quant: str | None = None  # the cache's payload kind (pallas_kernels/quant.py)
    quant_group: int = 0  # head elements per scale, with kv_quant

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def codes_per_byte(self) -> int:
        return 1 if self.kv_quant is None else quant.codes_per_byte(self.kv_quant)

    @property
    def quant_chunk(self) -> int:
        """Head elements per key dot of the quantized kernel: one plane's slice of one scale group (the
        whole head without kv_quant)."""
        return min(self.quant_group or self.head_dim, self.head_dim // self.codes_per_byte)

    @property
    def kv_slot_bytes(self) -> int:
        """Bytes of one slot's K and V for one KV head as the kernel reads them: payloads + scales + zero
        points + the value norm (quant.slot_bytes)."""
        return quant.slot_bytes(self.head_dim, self.itemsize, self.kv_quant, self.quant_group)


@dataclasses.dataclass(frozen=True)
class ResolvedLaunch:
    """A LaunchConfig with every field filled in; `num_splits` is the effective count."""

    epilogue: str
    block_c: int
    num_splits: int
    blocks_per_split: int
    num_warps: int
    num_stages: int
    xla_launch: bool
    discard_t: bool
    query_rows: int  # the GQA group padded to a tl.dot-able power of two
    combine_chunk: int
    convert_after_unpack: bool = False
    combine_num_warps: int = COMBINE_NUM_WARPS


def _check_int(name: str, value, lo: int, hi: int, pow2: bool = False) -> None:
    bad = isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi
    if bad or (pow2 and not is_pow2(value)):
        kind = "a power of two" if pow2 else "an int"
        raise ValueError(f"{name} must be {kind} in [{lo}, {hi}], got {value!r}")


def check_inputs(
    q, k_cache, v_cache, kv_valid, scale, granularity: str, kv_quant=None, kv_scales=None
) -> DecodeShape:
    """The kernels' shared contract plus what the Triton kernel itself needs."""
    contract.check_decode_inputs(q, k_cache, v_cache, kv_valid, kv_quant, kv_scales)
    contract.check_granularity(granularity)
    if kv_quant is None and not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(
            f"q, k_cache, v_cache must share one dtype (tl.dot takes equal operand types), got "
            f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    batch, num_q_heads, head_dim = q.shape
    _, num_kv_heads, num_slots, _ = k_cache.shape
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    quant_group = 0
    if kv_quant is not None:
        quant_group = head_dim // kv_scales.k_scale.shape[-1]
        per_byte = quant.codes_per_byte(kv_quant)
        # A key chunk is one tl.dot's reduction, which needs >= 16 elements (MIN_DOT).
        if min(quant_group, head_dim // per_byte) < MIN_DOT:
            raise ValueError(
                f"kv_quant={kv_quant!r} in the Triton kernel needs kv_quant_group >= {MIN_DOT} and "
                f"head_dim / {per_byte} >= {MIN_DOT}, got group {quant_group} at head_dim {head_dim}"
            )
    if min(batch, num_q_heads, num_slots) < 1:
        raise ValueError(f"empty input: q {q.shape}, k_cache {k_cache.shape}")
    # A static number (Python or numpy scalar), not a traced array: it is baked into the launch.
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite Python float (a static softmax scale), got {scale!r}")
    if batch > 65535 or num_kv_heads > 65535:
        raise ValueError(f"batch ({batch}) and num_kv_heads ({num_kv_heads}) must be <= 65535 (grid limit)")
    return DecodeShape(
        batch, num_q_heads, num_kv_heads, num_slots, head_dim, q.dtype.itemsize, kv_quant, quant_group
    )


def resolve_kv_len(kv_len, batch: int, num_slots: int):
    """The per-row slot bound as int32 [B]: `kv_len` checked, or C for every row when it is None."""
    import jax.numpy as jnp

    if kv_len is None:
        return jnp.full((batch,), num_slots, jnp.int32)
    contract.check_kv_len(kv_len, batch)
    return jnp.asarray(kv_len).astype(jnp.int32)


def device_capability() -> int:
    """The default GPU's compute capability as an int (90 = sm_90); 90 where there is none (CPU tests)."""
    try:
        import jax

        major, _, minor = str(getattr(jax.devices()[0], "compute_capability", "")).partition(".")
        return int(major) * 10 + int(minor or 0)
    except Exception:  # no GPU backend, or a device that does not report it
        return DEFAULT_CAPABILITY


def check_coop_grid(shape: DecodeShape, num_splits: int, sms: int) -> None:
    """The coop epilogue's programs wait for each other at a barrier: every program must be resident at
    once, which one program per SM guarantees (a kernel that launches at all fits once on every SM)."""
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


def shared_memory_bytes(
    shape: DecodeShape, block_c: int, num_stages: int, convert_after_unpack: bool = False
) -> int:
    """Shared memory of the main kernel as Triton 3.6 lays it out: the cp.async ring of K and V tiles
    (stages - 1 of them, at least one; a quantized cache's payload and scale rows, not its value norms),
    the query tile, and the f32 logits tile (16-bit queries; with convert_after_unpack also one
    [block_c, D] tile of codes in q's dtype) or one more f32 [block_c, D] tile (float32 queries, and both
    with a quantized cache). Exact for 2+ stages with 16-bit or int8 / fp8 tiles at 2+ warps; an upper
    bound otherwise, with convert_after_unpack within the logits tile (checked against compiled
    kernels)."""
    rows = max(MIN_DOT, next_pow2(shape.group))
    # The value norm (one f32 a slot) is loaded straight into registers, outside the ring.
    staged = shape.kv_slot_bytes - (quant.VALUE_NORM_BYTES if shape.kv_quant else 0)
    ring = max(num_stages - 1, 1) * block_c * staged
    query = rows * shape.head_dim * shape.itemsize
    if shape.itemsize < 4:
        # Converted after unpacking, a quantized block's codes reach their dots through shared memory in
        # q's dtype (kernels.py, `_codes_as`): one [block_c, D] tile of scratch.
        codes = block_c * shape.head_dim * shape.itemsize if shape.kv_quant and convert_after_unpack else 0
        return ring + rows * block_c * 4 + query + codes
    if shape.kv_quant is None:
        return ring + block_c * shape.head_dim * 4 + query
    # float32 queries on a quantized cache: both tiles, and 64-128 bytes of padding Triton adds there.
    return ring + (rows + shape.head_dim) * block_c * 4 + 128 + query


def _fit_stages(
    shape: DecodeShape, block_c: int, num_stages, default: int, convert_after_unpack: bool
) -> int:
    """An explicit stage count if it fits in shared memory, else the largest up to the default that does."""
    limit_kib = SHARED_MEMORY_LIMIT // 1024
    need_for = lambda stages: shared_memory_bytes(shape, block_c, stages, convert_after_unpack)
    if num_stages is not None:
        need = need_for(num_stages)
        if need > SHARED_MEMORY_LIMIT:
            raise ValueError(
                f"block_c={block_c} with num_stages={num_stages} at head_dim={shape.head_dim} "
                f"({shape.itemsize}-byte elements) needs about {need // 1024} KiB of shared memory per "
                f"program; the limit is {limit_kib} KiB: lower block_c or num_stages"
            )
        return num_stages
    for stages in range(default, 0, -1):
        if need_for(stages) <= SHARED_MEMORY_LIMIT:
            return stages
    raise ValueError(
        f"block_c={block_c} at head_dim={shape.head_dim} ({shape.itemsize}-byte elements) needs about "
        f"{need_for(1) // 1024} KiB of shared memory per program even with "
        f"num_stages=1; the limit is {limit_kib} KiB: lower block_c"
    )


def resolve_launch(
    shape: DecodeShape,
    launch: LaunchConfig | None = None,
    *,
    compute_evict: bool = True,
    sms: int | None = None,
    capability: int | None = None,
) -> ResolvedLaunch:
    """Fill in the tuned defaults and check explicit values; raises ValueError naming the bad value."""
    launch = LaunchConfig() if launch is None else launch
    if not isinstance(launch, LaunchConfig):
        raise ValueError(f"launch must be a cuda_triton_bridge.LaunchConfig or None, got {launch!r}")
    sms = sms or num_sms()
    capability = capability or device_capability()
    programs = shape.batch * shape.num_kv_heads
    rows = tuned_launch.tuned_rows(capability, compute_evict)
    row = tuned_launch.tuned_row(rows, programs, sms)
    wide = shape.itemsize > 2
    quantized = shape.kv_quant is not None
    if shape.kv_quant == "fp8" and capability < FP8_MIN_CAPABILITY:
        raise ValueError(
            f"kv_quant='fp8' needs an sm_{FP8_MIN_CAPABILITY}+ GPU (Triton's float8e4nv), got sm_{capability}"
        )

    epilogue = row.epilogue if launch.epilogue is None else launch.epilogue
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES} or None, got {epilogue!r}")
    many = tuned_launch.QUANT_MANY_PROGRAMS.get(shape.kv_quant)
    measured = compute_evict and not wide and epilogue == row.epilogue  # where the rule was timed
    if many is None or not measured or programs < many.programs_per_sm * sms:
        many = None
    block_c = launch.block_c
    if block_c is None:
        # A forced epilogue takes the block size the table gives it at the nearest batch.
        same = [r for r in rows if r.epilogue == epilogue]
        tuned_block = row.block_c if epilogue == row.epilogue else (same[0].block_c if same else 32)
        block_c = tuned_launch.QUANT_BLOCK_C if quantized else tuned_block
        block_c = many.block_c if many else block_c
        block_c = tuned_launch.F32_BLOCK_C if wide else block_c
        block_c = max(MIN_DOT, min(block_c, next_pow2(shape.num_slots)))
    _check_int("block_c", block_c, MIN_DOT, MAX_BLOCK_C, pow2=True)
    num_blocks = cdiv(shape.num_slots, block_c)
    num_splits = launch.num_splits
    if num_splits is None:
        num_splits = _default_num_splits(shape, row, epilogue, block_c, sms)
    _check_int("num_splits", num_splits, 1, MAX_SPLITS)
    if num_splits > num_blocks:
        raise ValueError(
            f"num_splits={num_splits} exceeds the {num_blocks} blocks of block_c={block_c} slots in "
            f"C={shape.num_slots}; expected num_splits <= {num_blocks}"
        )
    # Whole blocks per split: e.g. 7 blocks in 3 requested splits -> 3 blocks each, 3 splits.
    blocks_per_split = cdiv(num_blocks, num_splits)
    num_splits = cdiv(num_blocks, blocks_per_split)
    if epilogue == "coop":
        check_coop_grid(shape, num_splits, sms)
    num_warps = launch.num_warps
    if num_warps is None:
        num_warps = tuned_launch.QUANT_NUM_WARPS[shape.kv_quant] if quantized else tuned_launch.NUM_WARPS
        num_warps = many.num_warps if many else num_warps
        num_warps = tuned_launch.F32_NUM_WARPS if wide else num_warps
    _check_int("num_warps", num_warps, 1, 16, pow2=True)
    if launch.num_stages is not None:
        _check_int("num_stages", launch.num_stages, 1, 8)
    default_stages = tuned_launch.F32_NUM_STAGES if wide else tuned_launch.NUM_STAGES
    for name in ("xla_launch", "discard_t", "convert_after_unpack"):
        if getattr(launch, name) is not None and not isinstance(getattr(launch, name), bool):
            raise ValueError(f"LaunchConfig.{name} must be a bool or None, got {getattr(launch, name)!r}")
    convert_after_unpack = quantized and bool(launch.convert_after_unpack)  # None: off until timed
    num_stages = _fit_stages(shape, block_c, launch.num_stages, default_stages, convert_after_unpack)
    large_t = 4 * shape.batch * shape.num_q_heads * shape.num_slots > tuned_launch.DISCARD_T_MIN_BYTES
    return ResolvedLaunch(
        epilogue=epilogue,
        block_c=block_c,
        num_splits=num_splits,
        blocks_per_split=blocks_per_split,
        num_warps=num_warps,
        num_stages=num_stages,
        xla_launch=row.xla_launch if launch.xla_launch is None else launch.xla_launch,
        discard_t=large_t if launch.discard_t is None else launch.discard_t,
        query_rows=max(MIN_DOT, next_pow2(shape.group)),
        combine_chunk=min(COMBINE_CHUNK, max(MIN_DOT, next_pow2(shape.num_slots))),
        convert_after_unpack=convert_after_unpack,
    )


def _default_num_splits(shape: DecodeShape, row, epilogue: str, block_c: int, sms: int) -> int:
    num_blocks = cdiv(shape.num_slots, block_c)
    if epilogue == "fused":
        per_split = row.slots_per_split or tuned_launch.MIN_SLOTS_PER_SPLIT * 4
        return max(1, min(cdiv(shape.num_slots, per_split), num_blocks, MAX_SPLITS))
    programs = shape.batch * shape.num_kv_heads
    most = max(1, num_blocks // max(1, tuned_launch.MIN_SLOTS_PER_SPLIT // block_c))
    per_sm = tuned_launch.QUANT_PROGRAMS_PER_SM.get(shape.kv_quant, row.programs_per_sm)
    want = round(per_sm * sms / programs)
    if epilogue == "coop":  # every program resident at once
        want = min(sms // programs, COOP_MAX_SPLITS)
    return max(1, min(want, most, MAX_SPLITS))


def plan_inputs(
    q, k_cache, v_cache, kv_valid, *, scale, granularity="sequence", kv_len=None, compute_evict=True,
    launch=None, sms=None, kv_quant=None, kv_scales=None, return_lse=False,
):  # fmt: skip
    """Every check of one decode call, then its launch: (shape, kv_len int32 [B], ResolvedLaunch)."""
    shape = check_inputs(q, k_cache, v_cache, kv_valid, scale, granularity, kv_quant, kv_scales)
    # A static switch: it picks the kernels' outputs, so a traced or numpy value cannot stand in.
    if not isinstance(return_lse, bool):
        raise ValueError(f"return_lse must be a Python bool, got {return_lse!r}")
    if not isinstance(compute_evict, bool):  # it picks the kernels too: "False" was read as True
        raise ValueError(f"compute_evict must be a Python bool, got {compute_evict!r}")
    kv_len = resolve_kv_len(kv_len, shape.batch, shape.num_slots)
    return shape, kv_len, resolve_launch(shape, launch, compute_evict=compute_evict, sms=sms)


def kernel_state_shape(batch: int, num_kv_heads: int) -> tuple[int, int]:
    """Shape of the int32 ticket buffer that is the kernel's per-layer state; its batch axis lets a cache
    be sliced and joined by rows (all entries are zero between calls)."""
    return (batch, TICKETS_PER_KV_HEAD * num_kv_heads)


def check_kernel_state(state, shape: DecodeShape) -> None:
    """Checks shape and dtype only: checking its values (all zero) would need a device read."""
    want = kernel_state_shape(shape.batch, shape.num_kv_heads)
    dtype = getattr(state, "dtype", None)
    if tuple(getattr(state, "shape", ())) != want or dtype is None or str(dtype) != "int32":
        raise ValueError(
            f"kernel_state must be int32 {want} for batch {shape.batch} and {shape.num_kv_heads} KV heads "
            f"(init_kernel_state(batch, num_kv_heads), or the previous call's return), got "
            f"{getattr(state, 'dtype', type(state).__name__)} {tuple(getattr(state, 'shape', ()))}"
        )
