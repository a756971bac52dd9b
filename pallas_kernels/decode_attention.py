"""Fused LongFlow decode kernel in Pallas: attention, importance and the evict slot from one pass over K/V.

One program serves the whole GQA group of one (sequence, KV head, split) and stores, beside the online
softmax, t = logit + log ||v||_1 per slot and query head, so that head h's importance term is
exp(t - m_h) / l_h once the split partials are merged: no second pass over K/V, no host sync. Bodies:
"triton" (GPU, Pallas' Triton backend) and "mosaic" (TPU), both interpreted on CPU. Slots past kv_len
take no part: the Triton body never reads them, the Mosaic body copies no block past the bound and
masks the slots past it inside the last live block (logits, and value rows zeroed), and the epilogue
masks their t before any arithmetic.
With kv_quant the bodies read the quantized payloads and their scales and dequantize in registers (no
dequantized copy of the buffer exists): q dots the exact integer (or fp8) codes and the per-slot scales
multiply the products, so the logits keep float32 accuracy; values are rebuilt in float32 per tile.
Contract: contract.py; design and measurements: docs/KERNELS.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import contract, quant
from pallas_kernels.contract import EMPTY_SLOT_SCORE, is_pow2, next_pow2, num_sms
from pallas_kernels.reference import evict_argmin, evict_argmin_of_chunks, importance_from_terms

BACKENDS = ("triton", "mosaic")
_BACKEND_ALIASES = {"gpu": "triton", "cuda": "triton", "tpu": "mosaic"}

# Finite "minus infinity": a split or row with no valid slot then gives m = MASK_VALUE, l = 0, out = 0
# instead of NaN (exp(-inf - -inf)), matching the reference's all-invalid row.
MASK_VALUE = -1e30
_LANES = 128  # TPU lane width: m and l are stored lane-replicated.
_MIN_DOT = 16  # Triton's tl.dot needs every dimension >= 16.

# GPU defaults, measured with scripts/bench_kernels.py on Hopper (docs/KERNELS.md).
TRITON_BLOCK_C = 128  # at most; fewer where a K or V tile would pass TRITON_TILE_BYTES
# With kv_quant the float32 V slices rebuilt per block live in registers: built for sm_90 (D 128, 4 warps),
# 64-slot blocks keep them without spills at groups >= 32, 128-slot blocks spill (docs/KERNELS.md).
TRITON_QUANT_BLOCK_C = 64
TRITON_TILE_BYTES = 32 << 10  # K + V tiles x 2 stages = 128 KiB of shared memory (H100: 227 KiB)
TRITON_NUM_WARPS = 4
TRITON_NUM_STAGES = 2
TRITON_PROGRAMS_PER_CORE = 4  # split-K until B * Hkv * splits reaches this many programs per SM
TRITON_MIN_SLOTS_PER_SPLIT = 256
MOSAIC_BLOCK_C = 512
# The GPU epilogue kernel (_triton_combine_kernel): t elements per scoring program, and its warps.
COMBINE_TILE = 4096
COMBINE_MAX_CHUNK = 512
COMBINE_NUM_WARPS = 4


def default_platform() -> str:
    """The platform a call runs on: `jax.default_device`'s where one is set (e.g. CPU inside
    `with jax.default_device(cpu)` on a GPU host), else the default backend's."""
    device = jax.config.jax_default_device
    if device is None:
        return jax.default_backend()
    return device if isinstance(device, str) else device.platform


def resolve_backend(backend: str | None) -> str:
    """ "triton" or "mosaic"; None picks from the default device (CPU runs the Triton body interpreted)."""
    if backend is None:
        return "mosaic" if default_platform() == "tpu" else "triton"
    backend = _BACKEND_ALIASES.get(backend, backend)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or gpu/tpu), got {backend!r}")
    return backend


def _default_block_c(backend: str, num_slots: int, head_dim: int, itemsize: int) -> int:
    if backend == "triton":
        fit = _MIN_DOT
        while fit * 2 * head_dim * itemsize <= TRITON_TILE_BYTES:
            fit *= 2
        return max(_MIN_DOT, min(TRITON_BLOCK_C, fit, next_pow2(num_slots)))
    return num_slots if num_slots <= MOSAIC_BLOCK_C else MOSAIC_BLOCK_C


def _check_block_c(backend: str, block_c, num_slots: int) -> None:
    if not isinstance(block_c, int) or block_c <= 0:
        raise ValueError(f"block_c must be a positive int, got {block_c!r}")
    if backend == "triton" and not (is_pow2(block_c) and block_c >= _MIN_DOT):
        raise ValueError(
            f"block_c={block_c}: the Triton backend needs a power of two >= {_MIN_DOT} "
            f"(the slot count C={num_slots} need not be a multiple of it; the tail is masked)"
        )
    if backend == "mosaic" and block_c % _LANES and block_c != num_slots:
        raise ValueError(
            f"block_c={block_c}: the Mosaic (TPU) backend needs a multiple of {_LANES} or exactly "
            f"C={num_slots} (TPU blocks tile by (8, 128))"
        )


def _default_num_splits(backend: str, batch: int, num_kv_heads: int, num_blocks: int, block_c: int) -> int:
    """Flash-decoding split-K: enough programs to fill the chip, in splits that divide the blocks."""
    if backend == "mosaic":
        target = 2  # a parallel grid of >= 2 keeps both TensorCores of a megacore chip busy
    else:
        target = TRITON_PROGRAMS_PER_CORE * num_sms()
    min_blocks = max(1, TRITON_MIN_SLOTS_PER_SPLIT // block_c)
    splits = 1
    while (
        batch * num_kv_heads * splits < target
        and num_blocks % (2 * splits) == 0
        and num_blocks // (2 * splits) >= min_blocks
    ):
        splits *= 2
    return splits


def _softmax_block(s, valid, m_prev, l_prev, acc_prev, v_parts, pv_dot):
    """One online-softmax step over a block of slots (the GPU body's).

    s [G, N] scaled logits (already MASK_VALUE where invalid), valid [1|G, N] bool, m/l [G, 1]-broadcastable
    running max and sum, acc a tuple of [G, w] column slices of the output, v_parts the matching [N, w]
    slices of V. Returns (m_new, l_new, acc_new) with shapes of the inputs.
    """
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    # Invalid slots are zeroed explicitly: with m_new still MASK_VALUE (nothing valid yet) exp(0) = 1.
    p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
    correction = jnp.exp(m_prev - m_new)
    l_new = correction * l_prev + jnp.sum(p, axis=1, keepdims=True)
    acc_new = tuple(correction * acc + pv_dot(p.astype(v.dtype), v) for acc, v in zip(acc_prev, v_parts))
    return m_new, l_new, acc_new


def _dot_precision(dtype):
    # f32 inputs: full-precision products (Triton would use tf32, TPU bf16 passes); the evict argmin is
    # compared for exact equality with the f32 reference.
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a K/V row is stored: floats in q's dtype (kind None), or a kv_quant payload of `planes` planes of
    `width` bytes (quant.py), with one scale (and zero point) per `group` elements."""

    kind: str | None
    head_dim: int
    group: int

    @property
    def planes(self) -> int:
        return 1 if self.kind is None else quant.codes_per_byte(self.kind)

    @property
    def width(self) -> int:
        return self.head_dim // self.planes

    @property
    def num_groups(self) -> int:
        return self.head_dim // self.group

    @property
    def zero_points(self) -> bool:
        return self.kind is not None and quant.has_zero_point(self.kind)

    @property
    def num_scale_arrays(self) -> int:  # KVScales' arrays: scales, and zero points for int4 / int2
        return 0 if self.kind is None else 4 if self.zero_points else 2

    @property
    def piece(self) -> int:
        """Columns of one GPU piece: a slice of one plane under one scale."""
        return min(self.group, self.width)

    def pieces(self):
        """The GPU body's column slices in store order: (payload column, plane, first element, group)."""
        return [
            (col, plane, plane * self.width + col, (plane * self.width + col) // self.group)
            for col in range(0, self.width, self.piece)
            for plane in range(self.planes)
        ]

    def codes(self, payload, plane: int):
        """Plane `plane` of a payload tile as float32 codes: integers or fp8 values, exact in q's dtype."""
        if self.planes == 1:
            return payload.astype(jnp.float32)
        bits = 8 // self.planes
        # Shifted as int32: Mosaic has no 8-bit vector shifts.
        codes = (payload.astype(jnp.int32) >> (plane * bits)) & ((1 << bits) - 1)
        return codes.astype(jnp.float32)


# Triton (GPU) body.


def _triton_kernel(
    q_ref,  # [Hq, D]          this sequence's queries
    k_ref,  # [C, D]           this (sequence, KV head)'s keys (with kv_quant: the payload [C, D / planes])
    v_ref,  # [C, D]
    valid_ref,  # [C] bool
    *refs,  # with kv_quant the scale refs [C, D / group]; kv_len_ref (a scalar) if bounded; the outputs
    scale: float,
    block_c: int,
    blocks_per_split: int,
    group: int,
    group_pad: int,
    num_slots: int,
    bounded: bool,
    compute_evict: bool,
    finalize: bool,
    write_stats: bool,
    precision,
    layout: _Layout,
):
    scale_refs, refs = refs[: layout.num_scale_arrays], refs[layout.num_scale_arrays :]
    if bounded:
        kv_len_ref, *out_refs = refs
    else:
        out_refs = refs
    o_ref, *stat_refs = out_refs
    m_ref, l_ref = stat_refs[:2] if write_stats else (None, None)
    t_ref = stat_refs[2] if compute_evict else None
    kv_head, split = pl.program_id(1), pl.program_id(2)
    head_dim = q_ref.shape[-1]
    # The GQA group's rows, padded to a tl.dot-sized tile; padded rows load zeros and are never stored.
    rows = pl.ds(kv_head * group, group_pad)
    row_ok = (jnp.arange(group_pad) < group)[:, None]
    pieces, width = layout.pieces(), layout.piece
    # q in the column slices the quantized tiles come in (one slice, all of q, without kv_quant).
    q_parts = [
        _gpu_load(q_ref.at[rows, pl.ds(first, width)], mask=row_ok, other=0.0) for *_, first, _ in pieces
    ]
    split_slots = blocks_per_split * block_c
    first_slot = split * split_slots
    ragged = num_slots % block_c != 0
    if bounded:
        # Only the blocks of this split that start below kv_len are read: a dynamic trip count (the
        # fori_loop becomes an scf.for with a runtime upper bound, which Triton still pipelines). A
        # split wholly past the bound runs no iteration and stores m = MASK_VALUE, l = 0, acc = 0.
        kv_len = kv_len_ref[...]  # clamped to [0, C] by the wrapper
        remaining = jnp.minimum(jnp.maximum(kv_len - first_slot, 0), split_slots)
        num_blocks = lax.div(remaining + (block_c - 1), block_c)
    else:
        num_blocks = blocks_per_split

    def dot_t(a, b):  # a @ b.T, f32 accumulation
        return _gpu_dot(a, b, trans_b=True, precision=precision)

    def pv_dot(p, v):
        return _gpu_dot(p, v, precision=precision)

    # ||v||_1 of every slot, in the logits' [group_pad, block_c] layout: a ones-row matmul against |v|
    # on the tensor cores (a row sum over D would be a cross-thread reduction plus a relayout per block).
    ones = jnp.ones((group_pad, head_dim), v_ref.dtype) if compute_evict and layout.kind is None else None
    # sum(q) per slice, for the zero points' term of the logits.
    q_sums = [jnp.sum(q.astype(jnp.float32), axis=1, keepdims=True) for q in q_parts]

    def body(j, carry):
        m, denom, acc = carry
        start = first_slot + j * block_c
        slots = pl.ds(start, block_c)
        slot_ids = start + jnp.arange(block_c)
        # Two masks: `in_buffer` (static C) guards the valid-mask load and the side-output stores, which
        # stay 16-byte vectorised (a runtime bound would split them into 4-byte accesses); `in_range`
        # also applies kv_len and guards the K/V loads, whose mask is constant along each row.
        in_buffer = slot_ids < num_slots if ragged else None
        in_range = slot_ids < kv_len if bounded else in_buffer
        row_mask = None if in_range is None else in_range[:, None]
        if layout.kind is None:
            k = _gpu_load(k_ref.at[slots, :], mask=row_mask, other=0.0)
            v = _gpu_load(v_ref.at[slots, :], mask=row_mask, other=0.0)
        valid = _gpu_load(valid_ref.at[slots], mask=in_buffer, other=False)
        if bounded:
            valid = valid & in_range
        valid = valid[None, :]
        if layout.kind is None:
            logits, v_parts = dot_t(q_parts[0], k), (v,)
        else:
            loads = _TritonTileLoads(slots, row_mask, in_range, width)
            logits, v_parts, vnorm = _triton_dequantized_block(
                layout, q_parts, q_sums, k_ref, v_ref, scale_refs, loads, dot_t, compute_evict
            )
        s = logits * scale
        s = jnp.where(valid, s, MASK_VALUE)
        m, denom, acc = _softmax_block(s, valid, m, denom, acc, v_parts, pv_dot)
        if compute_evict:
            # ||v||_1 = 0 (also V rows past kv_len, loaded as zeros) gives t = -inf, a zero term. Blocks
            # past kv_len are never written; the epilogue selects those slots away.
            if layout.kind is None:
                vnorm = dot_t(ones, jnp.abs(v))
            out_mask = row_ok if in_buffer is None else row_ok & in_buffer[None, :]
            _gpu_store(t_ref.at[rows, slots], s + jnp.log(vnorm), mask=out_mask)

        return m, denom, acc

    m0 = jnp.full((group_pad, 1), MASK_VALUE, jnp.float32)
    l0 = jnp.zeros((group_pad, 1), jnp.float32)
    acc0 = tuple(jnp.zeros((group_pad, width), jnp.float32) for _ in pieces)
    m, denom, acc = lax.fori_loop(0, num_blocks, body, (m0, l0, acc0))
    for (*_, first, _), part in zip(pieces, acc):
        cols = pl.ds(first, width)
        if finalize:
            out = part / jnp.where(denom > 0.0, denom, 1.0)
            _gpu_store(o_ref.at[rows, cols], out.astype(o_ref.dtype), mask=row_ok)
        else:
            _gpu_store(o_ref.at[rows, cols], part, mask=row_ok)
    if m_ref is not None:
        _gpu_store(m_ref.at[rows], m[:, 0], mask=row_ok[:, 0])
        _gpu_store(l_ref.at[rows], denom[:, 0], mask=row_ok[:, 0])


@dataclasses.dataclass(frozen=True)
class _TritonTileLoads:
    """One block's loads from a quantized buffer: payload column slices and per-slot scales."""

    slots: Any
    row_mask: Any  # [N, 1] bool or None: kv_len and the buffer's end
    in_range: Any  # [N] bool or None
    width: int

    def payload(self, ref, col: int):  # [N, width] bytes
        zero = 0.0 if jnp.issubdtype(ref.dtype, jnp.floating) else 0  # fp8: no int-to-fp8 cast on GPUs
        return _gpu_load(ref.at[self.slots, pl.ds(col, self.width)], mask=self.row_mask, other=zero)

    def scales(self, ref, group: int):  # [N] f32; zero past the bound, so no garbage scale enters
        # The column as an int32 scalar: interpret mode's load takes no Python int index beside a slice.
        return _gpu_load(ref.at[self.slots, jnp.int32(group)], mask=self.in_range, other=0.0)


def _triton_dequantized_block(layout, q_parts, q_sums, k_ref, v_ref, scale_refs, loads, dot_t, compute_evict):
    """Logits [G, N], V's column slices in q's dtype and ||v||_1 [1, N] of one block of a quantized buffer.

    Per slice under one scale s (and zero point z) per slot: q . (codes * s + z) = (q . codes) * s +
    sum(q) * z, with the codes exact in q's dtype, so the logits keep the float32 reference's accuracy.
    V is rebuilt in float32 per slice, and ||v||_1 is its float32 row sum.
    """
    ks_ref, kz_ref, vs_ref, vz_ref = (
        scale_refs if layout.zero_points else (scale_refs[0], None, scale_refs[1], None)
    )
    dtype = q_parts[0].dtype
    scales = {}  # (array, group) -> [N]: a scale shared by several slices is loaded once

    def scale_of(name, ref, group):
        if (name, group) not in scales:
            scales[name, group] = loads.scales(ref, group)
        return scales[name, group]

    logits, v_parts, vnorm = 0.0, [], 0.0
    k_bytes = v_bytes = None
    for q_part, q_sum, (col, plane, _, group) in zip(q_parts, q_sums, layout.pieces()):
        if plane == 0:  # the planes of one column slice share its bytes
            k_bytes, v_bytes = loads.payload(k_ref, col), loads.payload(v_ref, col)
        part = (
            dot_t(q_part, layout.codes(k_bytes, plane).astype(dtype)) * scale_of("ks", ks_ref, group)[None, :]
        )
        if kz_ref is not None:
            part = part + q_sum * scale_of("kz", kz_ref, group)[None, :]
        logits = logits + part
        v = layout.codes(v_bytes, plane) * scale_of("vs", vs_ref, group)[:, None]
        if vz_ref is not None:
            v = v + scale_of("vz", vz_ref, group)[:, None]
        v_parts.append(v.astype(dtype))
        if compute_evict:
            vnorm = vnorm + jnp.sum(jnp.abs(v), axis=1)
    return logits, tuple(v_parts), vnorm[None, :] if compute_evict else None


def _gpu_load(ref, *, mask=None, other=None):
    from jax.experimental.pallas import triton as plgpu

    if mask is None:
        return plgpu.load(ref)
    return plgpu.load(ref, mask=mask, other=other)


def _gpu_store(ref, val, *, mask=None):
    from jax.experimental.pallas import triton as plgpu

    if mask is None:
        return plgpu.store(ref, val)
    return plgpu.store(ref, val, mask=mask)


def _gpu_dot(a, b, *, trans_b=False, precision=None):
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    prec = None if precision is None else (precision, precision)
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _triton_call(
    q, k, v, kv_valid, kv_len, *, scale, block_c, num_splits, compute_evict, interpret, num_warps, num_stages,
    layout=None, scales=(), return_stats=False,
):  # fmt: skip
    batch, num_q_heads, head_dim = q.shape
    _, num_kv_heads, num_slots, row = k.shape
    layout = layout or _Layout(None, head_dim, head_dim)
    group = num_q_heads // num_kv_heads
    group_pad = max(_MIN_DOT, next_pow2(group))
    num_blocks = pl.cdiv(num_slots, block_c)
    blocks_per_split = num_blocks // num_splits
    finalize = num_splits == 1
    # The softmax statistics: for the split merge, the scoring, or a caller's log-sum-exp.
    write_stats = compute_evict or not finalize or return_stats
    f32 = jnp.float32

    per_seq_q = pl.BlockSpec((None, num_q_heads, head_dim), lambda b, h, s: (b, 0, 0))
    in_specs = [
        per_seq_q,
        pl.BlockSpec((None, None, num_slots, row), lambda b, h, s: (b, h, 0, 0)),
        pl.BlockSpec((None, None, num_slots, row), lambda b, h, s: (b, h, 0, 0)),
        pl.BlockSpec((None, num_slots), lambda b, h, s: (b, 0)),
    ]
    in_specs += [
        pl.BlockSpec((None, None, num_slots, layout.num_groups), lambda b, h, s: (b, h, 0, 0))
    ] * len(scales)
    inputs = [q, k, v, kv_valid, *scales]
    if kv_len is not None:
        in_specs.append(pl.BlockSpec((None,), lambda b, h, s: (b,)))
        inputs.append(kv_len)
    if finalize:
        out_shape = [jax.ShapeDtypeStruct((batch, num_q_heads, head_dim), q.dtype)]
        out_specs = [per_seq_q]
    else:
        out_shape = [jax.ShapeDtypeStruct((num_splits, batch, num_q_heads, head_dim), f32)]
        out_specs = [pl.BlockSpec((None, None, num_q_heads, head_dim), lambda b, h, s: (s, b, 0, 0))]
    if write_stats:
        stat_spec = pl.BlockSpec((None, None, num_q_heads), lambda b, h, s: (s, b, 0))
        out_shape += [jax.ShapeDtypeStruct((num_splits, batch, num_q_heads), f32)] * 2
        out_specs += [stat_spec, stat_spec]
    if compute_evict:
        out_shape.append(jax.ShapeDtypeStruct((batch, num_q_heads, num_slots), f32))
        out_specs.append(pl.BlockSpec((None, num_q_heads, num_slots), lambda b, h, s: (b, 0, 0)))

    kernel = functools.partial(
        _triton_kernel,
        scale=scale,
        block_c=block_c,
        blocks_per_split=blocks_per_split,
        group=group,
        group_pad=group_pad,
        num_slots=num_slots,
        bounded=kv_len is not None,
        compute_evict=compute_evict,
        finalize=finalize,
        write_stats=write_stats,
        precision=_dot_precision(q.dtype),
        layout=layout,
    )
    from jax.experimental.pallas import triton as plgpu

    outs = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="longflow_decode_triton",
    )(*inputs)
    stats = (outs[1], outs[2]) if write_stats else None
    return outs[0], stats, outs[3] if compute_evict else None


def _combine_chunk(heads_per_group: int, num_slots: int) -> int:
    """Slots one combine program scores: a [heads_per_group, chunk] tile of t of about COMBINE_TILE."""
    return max(
        _MIN_DOT, min(COMBINE_MAX_CHUNK, COMBINE_TILE // next_pow2(heads_per_group), next_pow2(num_slots))
    )


def _triton_combine_kernel(
    *refs,
    num_splits: int,
    num_q_heads: int,
    heads_per_group: int,
    num_chunks: int,
    chunk: int,
    num_slots: int,
    merge_out: bool,
    compute_evict: bool,
):
    """The GPU epilogue, grid (B, P): program p < Hq merges query head p's split partials (when split);
    program p < G * chunks scores chunk p % chunks of score group p // chunks with the merged statistics
    and stores the chunk's minimum and its lowest slot, for `evict_argmin_of_chunks`."""
    refs = list(refs)
    o_part_ref = refs.pop(0) if merge_out else None  # [S, Hq, D] f32
    m_part_ref, l_part_ref = refs.pop(0), refs.pop(0)  # [S, Hq] f32
    t_ref, valid_ref = (refs.pop(0), refs.pop(0)) if compute_evict else (None, None)  # [Hq, C], [C]
    out_ref = refs.pop(0) if merge_out else None  # [Hq, D] q dtype
    min_ref, slot_ref = refs if compute_evict else (None, None)  # [G, chunks] f32, i32
    p = pl.program_id(1)
    splits_pad = next_pow2(num_splits)
    split_ok = jnp.arange(splits_pad) < num_splits
    split_rows = pl.ds(0, splits_pad)

    def merged_stats(heads, head_ok):
        """Final m and l of `heads` ([n] rows of the stats) from the splits' partial ones: [n] each."""
        ok = split_ok[:, None] & head_ok[None, :]
        m_part = _gpu_load(m_part_ref.at[split_rows, heads], mask=ok, other=MASK_VALUE)
        l_part = _gpu_load(l_part_ref.at[split_rows, heads], mask=ok, other=0.0)
        m = jnp.max(m_part, axis=0)
        weight = jnp.where(ok, jnp.exp(m_part - m[None, :]), 0.0)
        return m, weight, jnp.sum(l_part * weight, axis=0)

    if merge_out:

        @pl.when(p < num_q_heads)
        def _merge():
            head = pl.ds(p, 1)
            _, weight, denom = merged_stats(head, jnp.full((1,), True))
            acc = _gpu_load(o_part_ref.at[split_rows, p, :], mask=split_ok[:, None], other=0.0)
            out = jnp.sum(acc * weight, axis=0) / jnp.where(denom > 0.0, denom, 1.0)
            _gpu_store(out_ref.at[p, :], out.astype(out_ref.dtype))

    if compute_evict:
        num_groups = num_q_heads // heads_per_group

        @pl.when(p < num_groups * num_chunks)
        def _score():
            group, j = p // num_chunks, p % num_chunks
            hpg_pad = next_pow2(heads_per_group)
            head_ok = jnp.arange(hpg_pad) < heads_per_group
            heads = pl.ds(group * heads_per_group, hpg_pad)
            m, _, denom = merged_stats(heads, head_ok)
            slot_ids = j * chunk + jnp.arange(chunk)
            in_buffer = slot_ids < num_slots
            slots = pl.ds(j * chunk, chunk)
            # Slots the main kernel never wrote (past kv_len) hold garbage: `valid` selects them away.
            valid = _gpu_load(valid_ref.at[slots], mask=in_buffer, other=False)
            t = _gpu_load(t_ref.at[heads, slots], mask=head_ok[:, None] & in_buffer[None, :], other=0.0)
            terms = jnp.where(valid[None, :] & head_ok[:, None], jnp.exp(t - m[:, None]), 0.0)
            terms = terms / jnp.where(denom > 0.0, denom, 1.0)[:, None]
            score = jnp.where(valid, jnp.sum(terms, axis=0), EMPTY_SLOT_SCORE)
            score = jnp.where(in_buffer, score, jnp.inf)
            best = jnp.min(score)
            # The lowest slot among equal minima (ties to the lowest index, as jnp.argmin).
            first = jnp.min(jnp.where(score == best, jnp.arange(chunk), chunk))
            _gpu_store(min_ref.at[group, pl.ds(j, 1)], jnp.full((1,), best, jnp.float32))
            _gpu_store(slot_ref.at[group, pl.ds(j, 1)], jnp.full((1,), j * chunk + first, jnp.int32))


def _triton_combine_call(o_part, stats, t, valid, out_dtype, heads_per_group, interpret):
    """The GPU epilogue kernel: (out [B, Hq, D] or None when not split, evict [B, G] or None)."""
    m_part, l_part = stats
    num_splits, batch, num_q_heads = m_part.shape
    merge_out = num_splits > 1
    compute_evict = t is not None
    num_groups = num_q_heads // heads_per_group
    inputs, in_specs, out_shape, out_specs = [], [], [], []
    stat_spec = pl.BlockSpec((num_splits, None, num_q_heads), lambda b, p: (0, b, 0))
    if merge_out:
        head_dim = o_part.shape[-1]
        inputs.append(o_part)
        in_specs.append(pl.BlockSpec((num_splits, None, num_q_heads, head_dim), lambda b, p: (0, b, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((batch, num_q_heads, head_dim), out_dtype))
        out_specs.append(pl.BlockSpec((None, num_q_heads, head_dim), lambda b, p: (b, 0, 0)))
    inputs += [m_part, l_part]
    in_specs += [stat_spec, stat_spec]
    num_chunks = chunk = num_slots = 0
    if compute_evict:
        num_slots = t.shape[-1]
        chunk = _combine_chunk(heads_per_group, num_slots)
        num_chunks = pl.cdiv(num_slots, chunk)
        inputs += [t, valid]
        in_specs += [
            pl.BlockSpec((None, num_q_heads, num_slots), lambda b, p: (b, 0, 0)),
            pl.BlockSpec((None, num_slots), lambda b, p: (b, 0)),
        ]
        part_spec = pl.BlockSpec((None, num_groups, num_chunks), lambda b, p: (b, 0, 0))
        out_shape += [
            jax.ShapeDtypeStruct((batch, num_groups, num_chunks), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_groups, num_chunks), jnp.int32),
        ]
        out_specs += [part_spec, part_spec]
    programs = max(num_q_heads if merge_out else 0, num_groups * num_chunks)
    kernel = functools.partial(
        _triton_combine_kernel,
        num_splits=num_splits,
        num_q_heads=num_q_heads,
        heads_per_group=heads_per_group,
        num_chunks=num_chunks,
        chunk=chunk,
        num_slots=num_slots,
        merge_out=merge_out,
        compute_evict=compute_evict,
    )
    from jax.experimental.pallas import triton as plgpu

    outs = pl.pallas_call(
        kernel,
        grid=(batch, programs),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=COMBINE_NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="longflow_combine_triton",
    )(*inputs)
    out = outs[0] if merge_out else None
    return out, evict_argmin_of_chunks(*outs[-2:]) if compute_evict else None


# Mosaic (TPU) body.

_TRANS_B = (((1,), (1,)), ((), ()))


def _lane_fit(x, width: int):
    """A lane-replicated [G, 128] value as [G, width]."""
    if width == _LANES:
        return x
    if width % _LANES == 0:
        return jnp.tile(x, (1, width // _LANES))
    if width < _LANES:
        return x[:, :width]
    return jnp.broadcast_to(x[:, :1], (x.shape[0], width))


def _mosaic_kernel(
    kv_len_ref,  # [B] int32 in SMEM (scalar prefetch), clamped to [0, C]
    q_ref,  # [G, D]; with kv_quant q per scale group (_mosaic_grouped_queries)
    k_ref,  # [block_c, D]; with kv_quant the payload [block_c, D / planes]
    v_ref,  # [block_c, D]
    valid_ref,  # [1, block_c] int32
    *refs,  # with kv_quant the scale refs [block_c, D / group] (and q_sum_ref); outputs; scratch
    scale: float,
    block_c: int,
    blocks_per_split: int,
    num_slots: int,
    compute_evict: bool,
    precision,
    layout: _Layout,
):
    num_quant_refs = layout.num_scale_arrays + layout.zero_points  # the scales, and sum(q) with zero points
    quant_refs, refs = refs[:num_quant_refs], refs[num_quant_refs:]
    o_ref, m_ref, l_ref = refs[:3]
    m_sc, l_sc, acc_sc = refs[-3:]
    if compute_evict:
        t_ref = refs[3]
    b, split, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    # A block that starts at or past kv_len[b] holds no slot that takes part: its math is skipped, and
    # its K/V index map points at the row's last live block, so the pipeline finds that block already
    # in VMEM and issues no copy (_mosaic_call). Only the filled prefix streams from HBM.
    live = (split * blocks_per_split + j) * block_c < kv_len_ref[b]

    @pl.when(live)
    def _attend():
        dtype = q_ref.dtype
        if layout.kind is None:
            s = lax.dot_general(
                q_ref[...], k_ref[...], _TRANS_B, precision=precision, preferred_element_type=jnp.float32
            )
            v_parts = [v_ref[...]]
        else:
            s, v_parts = _mosaic_dequantized_block(layout, q_ref, k_ref, v_ref, quant_refs, m_sc.shape[0])
        # The block is copied whole, so it may hold slots past the row's bound (kv_len inside the last
        # live block) and, in the last block of a C that is no multiple of it, whatever was in VMEM:
        # possibly NaN, which p = 0 would still carry into P @ V. Mask the logits by slot index and zero
        # those value rows.
        bound = jnp.minimum(kv_len_ref[b], num_slots)
        start = (split * blocks_per_split + j) * block_c
        lane_slot = start + lax.broadcasted_iota(jnp.int32, (1, block_c), 1)
        valid = (valid_ref[...] != 0) & (lane_slot < bound)
        row_slot = start + lax.broadcasted_iota(jnp.int32, (block_c, layout.width), 0)
        v_parts = [jnp.where(row_slot < bound, v, jnp.zeros_like(v)) for v in v_parts]

        s = jnp.where(valid, s * scale, MASK_VALUE)
        m_prev = m_sc[...]  # [G, 128], lane-replicated
        l_prev = l_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(valid, jnp.exp(s - _lane_fit(m_new, block_c)), 0.0)
        correction = jnp.exp(m_prev - m_new)
        l_sc[...] = correction * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_new
        for plane, v in enumerate(v_parts):
            pv = lax.dot_general(
                p.astype(dtype),
                v.astype(dtype),
                (((1,), (0,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )
            acc_sc[plane] = _lane_fit(correction, layout.width) * acc_sc[plane] + pv

        if compute_evict:
            # t = logit + log ||v||_1, as the GPU body stores it. ||v||_1 per slot as a lane vector: a
            # ones-row matmul against |v| (transposed RHS) lands it in the [1, block_c] layout of the
            # logits' lanes without a sublane->lane relayout (float32 and exact for dequantized V).
            vnorm = functools.reduce(
                jnp.add,
                [
                    lax.dot_general(
                        jnp.ones((8, layout.width), v.dtype),
                        jnp.abs(v),
                        _TRANS_B,
                        precision=_dot_precision(v.dtype),
                        preferred_element_type=jnp.float32,
                    )
                    for v in v_parts
                ],
            )
            t_ref[...] = s + jnp.log(vnorm[:1, :])

    if compute_evict:

        @pl.when(jnp.logical_not(live))
        def _skipped():  # the side output of a skipped block: a defined value (the epilogue masks it)
            t_ref[...] = jnp.full(t_ref.shape, MASK_VALUE, jnp.float32)

    @pl.when(j == blocks_per_split - 1)
    def _finish():
        o_ref[...] = acc_sc[...]
        m_ref[...] = m_sc[...]
        l_ref[...] = l_sc[...]


def _mosaic_dequantized_block(layout, q_ref, k_ref, v_ref, quant_refs, num_heads: int):
    """Logits [G, N] and V's planes [N, D / planes] in float32 of one block of a quantized buffer.

    q_ref holds q once per scale group, masked to the group's columns, so one matmul per plane gives every
    group's q . codes, with the codes exact in q's dtype; the slots' scales, brought to the lanes by a
    one-hot matmul, weight each group's rows, and the zero points add sum(q) * z. Sub-128-lane slices and
    8-bit shifts are avoided: planes are whole tiles, shifted as int32. V is rebuilt in float32 per plane,
    its scales spread over their group's columns by a one-hot matmul.
    """
    f32 = jnp.float32
    exact = dict(precision=lax.Precision.HIGHEST, preferred_element_type=f32)  # one-hot: exact in f32
    num_groups, (_, stacked, width) = layout.num_groups, q_ref.shape
    rows = stacked // num_groups
    if layout.zero_points:
        ks_ref, kz_ref, vs_ref, vz_ref, q_sum_ref = quant_refs
    else:
        (ks_ref, vs_ref), kz_ref, vz_ref = quant_refs, None, None
    k = k_ref[...]
    s_all = functools.reduce(
        jnp.add,
        [
            lax.dot_general(
                q_ref[plane],
                layout.codes(k, plane).astype(q_ref.dtype),
                _TRANS_B,
                precision=_dot_precision(q_ref.dtype),
                preferred_element_type=f32,
            )
            for plane in range(layout.planes)
        ],
    )  # [groups * rows, N]: row i * rows + h is head h's q . codes over group i
    row = lax.broadcasted_iota(jnp.int32, (stacked, num_groups), 0)
    first = lax.broadcasted_iota(jnp.int32, (stacked, num_groups), 1) * rows
    spread = ((row >= first) & (row < first + rows)).astype(f32)  # row i * rows + h -> group i
    weighted = s_all * lax.dot_general(spread, ks_ref[...], _TRANS_B, **exact)
    s = functools.reduce(jnp.add, [weighted[i * rows : (i + 1) * rows] for i in range(num_groups)])
    if kz_ref is not None:
        s = s + lax.dot_general(q_sum_ref[...], kz_ref[...], _TRANS_B, **exact)
    s = s[:num_heads]

    v = v_ref[...]
    v_parts = []
    for plane in range(layout.planes):
        element = plane * width + lax.broadcasted_iota(jnp.int32, (num_groups, width), 1)
        first = lax.broadcasted_iota(jnp.int32, (num_groups, width), 0) * layout.group
        expand = ((element >= first) & (element < first + layout.group)).astype(f32)  # group -> columns

        def spread_cols(ref, expand=expand):
            return lax.dot_general(ref[...], expand, (((1,), (0,)), ((), ())), **exact)

        part = layout.codes(v, plane) * spread_cols(vs_ref)
        if vz_ref is not None:
            part = part + spread_cols(vz_ref)
        v_parts.append(part)
    return s, v_parts


def _mosaic_grouped_queries(q, layout: _Layout, num_kv_heads: int):
    """The Mosaic body's queries with kv_quant: [B, Hkv, planes, groups * rows, D / planes], row
    i * rows + h holding head h's q in scale group i's columns and zeros elsewhere (rows = G rounded up to
    8, so each group's rows are an aligned sublane slice), and sum(q) per group, [B, Hkv, rows, groups]
    float32, for the zero points."""
    batch, num_q_heads, head_dim = q.shape
    group = num_q_heads // num_kv_heads
    rows = -(-group // 8) * 8
    qg = q.reshape(batch, num_kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    owner = jnp.arange(head_dim) // layout.group
    stacked = jnp.where(owner == jnp.arange(layout.num_groups)[:, None, None], qg[:, :, None], 0)
    stacked = stacked.reshape(batch, num_kv_heads, layout.num_groups * rows, layout.planes, layout.width)
    q_sum = qg.astype(jnp.float32).reshape(batch, num_kv_heads, rows, layout.num_groups, layout.group)
    return stacked.transpose(0, 1, 3, 2, 4), q_sum.sum(-1)


def _mosaic_call(
    q, k, v, kv_valid, kv_len, *, scale, block_c, num_splits, compute_evict, interpret, layout, scales
):
    from jax.experimental.pallas import tpu as pltpu

    batch, num_q_heads, head_dim = q.shape
    _, num_kv_heads, num_slots, row = k.shape
    group = num_q_heads // num_kv_heads
    planes, width = layout.planes, layout.width
    num_blocks = pl.cdiv(num_slots, block_c)
    bps = num_blocks // num_splits
    f32 = jnp.float32
    valid_i32 = kv_valid.astype(jnp.int32).reshape(batch, 1, num_slots)

    def live_block(b, s, j, kv_len_ref):
        # Blocks at or past the row's bound map to its last live block (block 0 for an empty row): the
        # same index as the step before, so the pipeline skips their copies.
        last = jnp.maximum(pl.cdiv(kv_len_ref[b], block_c) - 1, 0)
        return jnp.minimum(s * bps + j, last)

    def slot_spec(columns):
        return pl.BlockSpec(
            (None, None, block_c, columns), lambda b, h, s, j, n: (b, h, live_block(b, s, j, n), 0)
        )

    def per_head_spec(shape):
        return pl.BlockSpec((None, None, *shape), lambda b, h, s, j, n: (b, h) + (0,) * len(shape))

    if layout.kind is None:
        q_in, quant_in = q.reshape(batch, num_kv_heads, group, head_dim), []
    else:
        q_in, q_sum = _mosaic_grouped_queries(q, layout, num_kv_heads)
        quant_in = [*scales] + ([q_sum] if layout.zero_points else [])
    in_specs = [
        per_head_spec(q_in.shape[2:]),
        slot_spec(row),
        slot_spec(row),
        pl.BlockSpec((None, 1, block_c), lambda b, h, s, j, n: (b, 0, live_block(b, s, j, n))),
    ]
    in_specs += [slot_spec(layout.num_groups)] * len(scales)
    in_specs += [per_head_spec(x.shape[2:]) for x in quant_in[len(scales) :]]
    # Outputs keep their own block (no clamping): a skipped block writes its defined empty values to
    # its own slots, never over a live block's.
    stat_spec = pl.BlockSpec((None, None, None, group, _LANES), lambda b, h, s, j, n: (b, h, s, 0, 0))
    out_shape = [
        jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, planes, group, width), f32),
        jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, group, _LANES), f32),
        jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, group, _LANES), f32),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, planes, group, width), lambda b, h, s, j, n: (b, h, s, 0, 0, 0)),
        stat_spec,
        stat_spec,
    ]
    if compute_evict:
        out_shape.append(jax.ShapeDtypeStruct((batch, num_kv_heads, group, num_slots), f32))
        out_specs.append(
            pl.BlockSpec((None, None, group, block_c), lambda b, h, s, j, n: (b, h, 0, s * bps + j))
        )
    params_cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
    kernel = functools.partial(
        _mosaic_kernel,
        scale=scale,
        block_c=block_c,
        blocks_per_split=bps,
        num_slots=num_slots,
        compute_evict=compute_evict,
        precision=_dot_precision(q.dtype),
        layout=layout,
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,  # kv_len: read by the index maps and the kernel
        grid=(batch, num_kv_heads, num_splits, bps),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[
            pltpu.VMEM((group, _LANES), f32),
            pltpu.VMEM((group, _LANES), f32),
            pltpu.VMEM((planes, group, width), f32),
        ],
    )
    outs = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=params_cls(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="longflow_decode_mosaic",
    )(kv_len, q_in, k, v, valid_i32, *quant_in)
    # To the Triton body's layouts: partials [S, B, Hq, D], stats [S, B, Hq], t [B, Hq, C].
    o_part = outs[0].transpose(2, 0, 1, 4, 3, 5).reshape(num_splits, batch, num_q_heads, head_dim)

    def stat(x):
        return x[..., 0].transpose(2, 0, 1, 3).reshape(num_splits, batch, num_q_heads)

    stats = (stat(outs[1]), stat(outs[2]))
    t = outs[3].reshape(batch, num_q_heads, num_slots) if compute_evict else None
    return o_part, stats, t


# The jnp epilogue, fused by XLA into the caller's jit: TPU's, and the importance either backend returns
# (the GPU's evict slot comes from _triton_combine_kernel).


def _merged_stats(m_part, l_part):
    """The final softmax max and sum [B, Hq] from split partials [S, B, Hq], and each split's weight."""
    m = jnp.max(m_part, axis=0)
    weight = jnp.exp(m_part - m)
    return m, jnp.sum(l_part * weight, axis=0), weight


def _merge_splits(o_part, m_part, l_part):
    """Log-sum-exp merge of split partials [S, B, Hq, D] -> out [B, Hq, D] f32."""
    _, denom, weight = _merged_stats(m_part, l_part)
    return jnp.sum(o_part * weight[..., None], axis=0) / jnp.where(denom > 0.0, denom, 1.0)[..., None]


def _log_sum_exp(m_part, l_part):
    """log sum exp of the valid scaled logits [B, Hq] from split partials [S, B, Hq]: m + log(l) of the
    merged statistics, -inf for a row with no valid slot (l = 0)."""
    m, denom, _ = _merged_stats(m_part, l_part)
    return jnp.where(denom > 0.0, m + jnp.log(jnp.where(denom > 0.0, denom, 1.0)), -jnp.inf)


def _importance_from_log_terms(t, m, denom, kv_valid, num_kv_heads, granularity):
    """Importance [B, G, C] from the side output t [B, Hq, C]: head h's term is exp(t - m_h) / l_h.
    kv_valid has kv_len folded in: slots past it were never written (possibly NaN), so they are selected
    away before any arithmetic."""
    terms = jnp.where(kv_valid[:, None, :], jnp.exp(t - m[..., None]), 0.0)
    terms = terms / jnp.where(denom > 0.0, denom, 1.0)[..., None]
    return importance_from_terms(terms, num_kv_heads, kv_valid, granularity)


# Entry point.


@functools.partial(jax.jit, static_argnames=(
    "scale", "kv_quant", "granularity", "compute_evict", "return_importance", "return_lse", "block_c",
    "num_splits", "backend", "interpret", "num_warps", "num_stages",
))  # fmt: skip
def longflow_decode_attention(
    q, k_cache, v_cache, kv_valid, *, scale, kv_len=None, kv_quant=None, kv_scales=None,
    granularity="sequence", compute_evict=True, return_importance=False, return_lse=False, block_c=None,
    num_splits=None, backend=None, interpret=None, num_warps=None, num_stages=None,
):  # fmt: skip
    """Decode attention + LongFlow importance + evict slot in one pass over the KV buffer.

    Args:
      q, k_cache, v_cache, kv_valid: q [B, Hq, D] (float32/bfloat16/float16), k_cache, v_cache
        [B, Hkv, C, D] in q's dtype, kv_valid [B, C] bool: the layout of contract.py.
      scale: softmax scale (a Python float; static).
      kv_len: optional integer [B] (traced), clamped to [0, C]: slot c of row b takes part iff
        kv_valid[b, c] and c < kv_len[b]; no block that starts past it is read. None: no bound.
      kv_quant, kv_scales: a quantized buffer (static kind in quant.KV_QUANT_KINDS, and a quant.KVScales):
        k_cache and v_cache are then the payloads [B, Hkv, C, D / codes a byte] and q is in the keys'
        basis (contract.check_decode_inputs). The bodies dequantize in registers. The Triton body needs
        min(group, D / codes a byte) to be a power of two >= 16.
      granularity: "sequence" (one evict slot per sequence) or "kv_head" (one per KV head).
      compute_evict: False skips all scoring work and returns evict_slot filled with -1.
      return_importance: return the importance [B, G, C] float32 (EMPTY_SLOT_SCORE at empty slots) in
        place of evict_slot, for a caller that runs the kernel on a share of the query heads and sums
        the shares before `reference.evict_argmin` (contract.py). Needs compute_evict. The importance
        comes from the jnp epilogue on both backends.
      return_lse: also return lse [B, Hq] float32, the natural log of the softmax denominator,
        log(sum over the slots that take part of exp(scale * q . k)) with keys as the body reads them
        (dequantized with kv_quant), -inf for a row with no such slot (contract.py); a caller merges
        attention over several buffers with it. Any compute_evict, kv_quant, return_importance.
      block_c: slots per block. Triton: power of two >= 16 (default 128, or 64 where a [block_c, D] tile
        would pass 32 KiB or with kv_quant). Mosaic: multiple of 128 or C (default min(512, C)). The tail
        is masked.
      num_splits: programs per (sequence, KV head) along C (split-K); must divide cdiv(C, block_c).
        Default: about 4 programs per SM on a GPU; 1 on a TPU, or 2 for B * Hkv == 1.
      backend: "triton" (GPU), "mosaic" (TPU) or None (from the default device; CPU uses "triton").
      interpret: run in Pallas interpret mode. None: unless the default device is the backend's
        hardware; False lowers for another platform (e.g. `jax.export(..., platforms=["tpu"])`).
      num_warps, num_stages: Triton launch parameters (GPU only).

    Returns:
      (out [B, Hq, D] in q's dtype, evict_slot int32 [B] ("sequence") or [B, Hkv] ("kv_head")), as
      `longflow_decode_attention_reference` computes them; with return_importance, (out, importance).
      With return_lse, lse is a trailing third output.

    Raises:
      ValueError: inputs off the contract, or a bad granularity, backend, block_c, num_splits or kv_len.
    """
    contract.check_decode_inputs(q, k_cache, v_cache, kv_valid, kv_quant, kv_scales)
    contract.check_granularity(granularity)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite Python float, got {scale!r}")
    scale = float(scale)
    for name, flag in (("compute_evict", compute_evict), ("return_importance", return_importance),
                       ("return_lse", return_lse)):  # fmt: skip
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a Python bool, got {flag!r}")
    if return_importance and not compute_evict:
        raise ValueError("return_importance=True needs compute_evict=True (the importance is the scoring)")
    backend = resolve_backend(backend)
    if interpret is None:
        interpret = default_platform() != ("gpu" if backend == "triton" else "tpu")
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, num_slots = k_cache.shape[1], k_cache.shape[2]
    if kv_quant is None:
        if k_cache.dtype != v_cache.dtype:
            raise ValueError(
                f"k_cache and v_cache must share a dtype, got {k_cache.dtype} and {v_cache.dtype}"
            )
        if q.dtype != k_cache.dtype:
            raise ValueError(f"q ({q.dtype}) and the KV cache ({k_cache.dtype}) must share a dtype")
        layout, scales = _Layout(None, head_dim, head_dim), ()
    else:
        layout = _Layout(kv_quant, head_dim, head_dim // kv_scales.k_scale.shape[-1])
        # The bodies take the scales and zero points. They dequantize every value to attend anyway and
        # sum the norms from it, so they do not read kv_scales.v_norm (the Triton kernel does).
        per_group = (kv_scales.k_scale, kv_scales.k_zero, kv_scales.v_scale, kv_scales.v_zero)
        scales = tuple(x for x in per_group if x is not None)
    # The Mosaic body and the epilogue read kv_valid cut at kv_len; the Triton body applies the bound.
    bounded_valid = kv_valid
    if kv_len is not None:
        contract.check_kv_len(kv_len, batch)
        kv_len = jnp.clip(kv_len, 0, num_slots).astype(jnp.int32)
        bounded_valid = kv_valid & (jnp.arange(num_slots, dtype=jnp.int32)[None, :] < kv_len[:, None])
    if backend == "triton" and not (is_pow2(head_dim) and head_dim >= _MIN_DOT):
        raise ValueError(f"head dim D={head_dim}: the Triton backend needs a power of two >= {_MIN_DOT}")
    if (
        backend == "triton"
        and kv_quant is not None
        and not (is_pow2(layout.piece) and layout.piece >= _MIN_DOT)
    ):
        raise ValueError(
            f"kv_quant={kv_quant!r} with group {layout.group} at head dim D={head_dim}: the Triton backend "
            f"dots slices of min(group, D / {layout.planes} codes a byte) = {layout.piece} columns, which "
            f"must be a power of two >= {_MIN_DOT}"
        )
    if block_c is None:
        block_c = _default_block_c(backend, num_slots, k_cache.shape[-1], k_cache.dtype.itemsize)
        if backend == "triton" and kv_quant is not None:
            block_c = min(block_c, TRITON_QUANT_BLOCK_C)
    _check_block_c(backend, block_c, num_slots)
    num_blocks = pl.cdiv(num_slots, block_c)
    if num_splits is None:
        num_splits = _default_num_splits(backend, batch, num_kv_heads, num_blocks, block_c)
    if not isinstance(num_splits, int) or num_splits <= 0 or num_blocks % num_splits:
        raise ValueError(
            f"num_splits={num_splits!r} must be a positive divisor of the block count "
            f"cdiv(C={num_slots}, block_c={block_c}) = {num_blocks}"
        )

    num_groups = 1 if granularity == "sequence" else num_kv_heads
    heads_per_group = num_q_heads // num_groups
    launch = dict(
        scale=scale,
        block_c=block_c,
        num_splits=num_splits,
        compute_evict=compute_evict,
        interpret=interpret,
        layout=layout,
        scales=scales,
    )
    evict = None
    if backend == "triton":
        warps, stages = num_warps or TRITON_NUM_WARPS, num_stages or TRITON_NUM_STAGES
        out, stats, t = _triton_call(
            q, k_cache, v_cache, kv_valid, kv_len, **launch, num_warps=warps, num_stages=stages,
            return_stats=return_lse,
        )  # fmt: skip
        # The epilogue kernel merges split partials and picks the slot; returned importance is jnp's.
        slot_in_kernel = compute_evict and not return_importance
        if num_splits > 1 or slot_in_kernel:
            merged, evict = _triton_combine_call(
                out if num_splits > 1 else None, stats, t if slot_in_kernel else None, bounded_valid,
                q.dtype, heads_per_group, interpret,
            )  # fmt: skip
            out = out if merged is None else merged
    else:
        bound = jnp.full((batch,), num_slots, jnp.int32) if kv_len is None else kv_len
        o_part, stats, t = _mosaic_call(q, k_cache, v_cache, bounded_valid, bound, **launch)
        out = _merge_splits(o_part, *stats)
    lse = (_log_sum_exp(*stats),) if return_lse else ()
    if compute_evict and evict is None:  # the jnp epilogue: Mosaic's, and the importance Triton returns
        m, denom, _ = _merged_stats(*stats)
        importance = _importance_from_log_terms(t, m, denom, bounded_valid, num_kv_heads, granularity)
        if return_importance:
            return (out.astype(q.dtype), importance, *lse)
        evict = evict_argmin(importance)
    if evict is None:
        evict = jnp.full((batch, num_groups), -1, jnp.int32)
    return (out.astype(q.dtype), evict[:, 0] if granularity == "sequence" else evict, *lse)
