"""The Triton kernels of the fused LongFlow decode step (imported only where triton is installed).

Each main kernel streams one split of one (sequence, KV head) in `_attend_split`, reading each K/V block
once for the whole GQA group, with an online softmax in the log2 domain. For eviction it also stores
t = logit*log2(e) + log2||v||_1 per query head and slot, so a slot's importance term is exp2(t - m) / l
once the final (m, l) are known: no second pass over K/V. The epilogues ("separate": the split kernel,
then the combine kernel; "fused"; "coop") use no float atomics, so results are deterministic. With
KV_QUANT, K and V are quantized payloads + scales (pallas_kernels/quant.py), dequantized in registers
chunk by chunk; KV_QUANT="none" compiles to the float kernel. Design and measurements: docs/KERNELS.md.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice


@triton.jit
def _row_bound(kv_len_ptr, b, C: tl.constexpr):
    """Slots of row b that may be valid: kv_len[b] clamped to [0, C]."""
    return tl.minimum(tl.maximum(tl.load(kv_len_ptr + b), 0), C)


@triton.jit
def _log_sum_exp(m, denom):
    """log(sum_c exp(scale * q.k_c)) in natural log from a head's log2-domain statistics: m, the max of
    s_c = scale * log2(e) * q.k_c, and denom = sum_c exp2(s_c - m); -inf where no slot counts (denom 0)."""
    ok = denom > 0.0
    return tl.where(ok, m * 0.6931471805599453 + tl.log(tl.where(ok, denom, 1.0)), float("-inf"))


@triton.jit
def _discard_l2_lines(line_addr, line_ok):
    """discard.global.L2 on each 128-byte-aligned line address where line_ok: the line's contents become
    undefined and a dirty line is dropped without a write-back."""
    # A buffer whose base is not 128-byte aligned keeps its lines (discarding is only an optimisation).
    line_ok = line_ok & ((line_addr.to(tl.int64) & 127) == 0)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p discard.global.L2 [$1], 128; mov.u32 $0, 0; }",
        "=r,l,r",
        [line_addr.to(tl.int64), line_ok.to(tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _load_payload(ptr, offsets, mask, KV_QUANT: tl.constexpr):
    """A payload tile, zero where masked off. fp8 is loaded as its bits: a masked-off lane takes the
    integer 0, which is +0.0 in e4m3, with no float cast of the fill value."""
    if KV_QUANT == "fp8":
        bits = tl.load(ptr.to(tl.pointer_type(tl.uint8), bitcast=True) + offsets, mask=mask, other=0)
        payload = bits.to(tl.float8e4nv, bitcast=True)
    else:
        payload = tl.load(ptr + offsets, mask=mask, other=0)
    return payload


@triton.jit
def _plane_codes(payload, plane: tl.constexpr, CODES_PER_BYTE: tl.constexpr):
    """Plane `plane` of a payload tile: the codes of bits [plane * bits, (plane + 1) * bits) of every
    byte (pallas_kernels/quant.py); int8 and fp8 payloads are their own single plane."""
    if CODES_PER_BYTE == 1:
        codes = payload
    else:
        BITS: tl.constexpr = 8 // CODES_PER_BYTE
        codes = (payload >> (plane * BITS)) & ((1 << BITS) - 1)
    return codes


# Packed codes to 16-bit floats with integer ops (the FasterTransformer "magic number" trick): a code c
# of at most 7 bits ORed into the mantissa of M = 2^7 (bf16 0x4300) or 2^10 (fp16 0x6400) is the float
# M + c, exactly, and one packed fma takes M off two at a time: no I2F (a quarter-rate conversion, two
# per code with the byte extraction before it). Four payload bytes per call: PRMT spreads bytes 0, 1
# (then 2, 3) over the two halves of a register, and a shift selects the plane. (For int8 the compiler's
# own conversion already compiles to as many instructions as this scheme needs.)
@triton.constexpr_function
def _unpacks_in_ptx(dtype, codes_per_byte):
    """Whether packed codes become dtype values through `_unpack_asm`: 16-bit floats only (two to a
    register); float32 q (the reference-precision path) converts codes the compiler's way."""
    return codes_per_byte > 1 and _is_16_bit(dtype)


@triton.constexpr_function
def _is_16_bit(dtype):
    return str(dtype) in ("bf16", "fp16")


@triton.constexpr_function
def _unpack_asm(dtype, plane, codes_per_byte):
    """The PTX of one call: four payload bytes' codes of `plane` as four dtype values (bf16 or fp16) in
    two registers."""
    if not _unpacks_in_ptx(dtype, codes_per_byte):
        raise ValueError(f"PTX unpacking takes bf16 or fp16 and packed codes, got {dtype}, {codes_per_byte}")
    bf16 = str(dtype) == "bf16"
    pair = "bf16x2" if bf16 else "f16x2"
    magic, one, minus_magic = (
        (0x43004300, 0x3F803F80, 0xC300C300) if bf16 else (0x64006400, 0x3C003C00, 0xE400E400)
    )
    bits = 8 // codes_per_byte
    mask = ((1 << bits) - 1) * 0x10001
    shift = f"shr.u32 t0, t0, {plane * bits}; shr.u32 t1, t1, {plane * bits}; " if plane else ""
    return (
        "{ .reg .b32 t0, t1, one, neg; "
        f"mov.b32 one, {one:#x}; mov.b32 neg, {minus_magic:#x}; "
        f"prmt.b32 t0, $2, 0, 0x4140; prmt.b32 t1, $2, 0, 0x4342; {shift}"
        f"lop3.b32 $0, t0, {mask:#x}, {magic:#x}, 0xea; lop3.b32 $1, t1, {mask:#x}, {magic:#x}, 0xea; "
        f"fma.rn.{pair} $0, $0, one, neg; fma.rn.{pair} $1, $1, one, neg; }}"
    )


@triton.jit
def _codes_as(payload, plane: tl.constexpr, CODES_PER_BYTE: tl.constexpr, DTYPE: tl.constexpr,
              NATIVE: tl.constexpr, CONVERT_AFTER_UNPACK: tl.constexpr):  # fmt: skip
    """Plane `plane` of a payload tile (`_plane_codes`) as DTYPE values, exactly (codes of 8 bits or
    fewer are exact in bf16 and fp16). Packed codes compiled for the GPU into 16-bit floats unpack in
    PTX. CONVERT_AFTER_UNPACK: the dots' layout conversion takes the 16-bit codes, not the payload."""
    if NATIVE and _unpacks_in_ptx(DTYPE, CODES_PER_BYTE):
        codes = tl.inline_asm_elementwise(
            _unpack_asm(DTYPE, plane, CODES_PER_BYTE), "=r,=r,r", [payload], DTYPE.value, True, 4
        )
    else:
        codes = _plane_codes(payload, plane, CODES_PER_BYTE).to(DTYPE)
    if CONVERT_AFTER_UNPACK and NATIVE and _is_16_bit(DTYPE):
        # The codes are a dot operand. Triton moves an operand's layout conversion above elementwise
        # ops onto the narrowest tensor, here the 8-bit payload, which has no ldmatrix path: it was
        # gathered from shared memory a byte at a time (LDS.U8) and re-packed (PRMT), a fifth of the
        # slot loop. An opaque identity (not pure, so not moved) keeps the conversion on the 16-bit
        # codes: 16-byte shared stores and ldmatrix (docs/KERNELS.md, "Converting after unpacking").
        codes = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [codes], DTYPE.value, False, 2)
    return codes


@triton.jit
def _query_chunks(
    q_ptr, bh, row_ok, D: tl.constexpr, CODES_PER_BYTE: tl.constexpr, QUANT_CHUNK: tl.constexpr
):  # fmt: skip
    """The query rows cut into the quantized head's chunks, loaded once before the slot loop: (chunks
    [QROWS, QUANT_CHUNK] in q's dtype, their f32 row sums [QROWS]), two tuples in chunk order.

    Chunk k is QUANT_CHUNK consecutive head elements from (k % CODES_PER_BYTE) * D / CODES_PER_BYTE +
    (k // CODES_PER_BYTE) * QUANT_CHUNK: one plane of one payload column chunk, inside one scale group."""
    PW: tl.constexpr = D // CODES_PER_BYTE
    w = tl.arange(0, QUANT_CHUNK)
    chunks = ()
    sums = ()
    for k in tl.static_range(D // QUANT_CHUNK):
        first = (k % CODES_PER_BYTE) * PW + (k // CODES_PER_BYTE) * QUANT_CHUNK
        q = tl.load(q_ptr + bh[:, None] * D + (first + w)[None, :], mask=row_ok[:, None], other=0.0)
        chunks = chunks + (q,)
        sums = sums + (tl.sum(q.to(tl.float32), axis=1),)
    return chunks, sums


@triton.jit
def _half(rows, upper: tl.constexpr):
    """The odd (upper) or even columns of a tile whose last axis has 2 entries or more."""
    N: tl.constexpr = rows.shape[1]
    even, odd = tl.split(tl.reshape(rows, [rows.shape[0], N // 2, 2]))
    if upper:
        out = odd
    else:
        out = even
    return out


@triton.jit
def _column(rows, g: tl.constexpr, N: tl.constexpr):
    """Column g of a [BLOCK_C, N] tile (N a power of two up to 8) by halving splits of the last axis:
    each thread holds a slot's N values, so these are register moves, not a reduction."""
    if N == 1:
        col = rows
    elif N == 2:
        col = _half(rows, g % 2 == 1)
    elif N == 4:
        col = _half(_half(rows, g % 2 == 1), g // 2 == 1)
    else:
        tl.static_assert(N == 8, "scale groups per head must be 1, 2, 4 or 8")
        col = _half(_half(_half(rows, g % 2 == 1), (g // 2) % 2 == 1), g // 4 == 1)
    return tl.reshape(col, [rows.shape[0]])


@triton.jit
def _quant_block(
    head, scale_head, zero_head, c, in_range,
    D: tl.constexpr, KV_QUANT: tl.constexpr, CODES_PER_BYTE: tl.constexpr, QUANT_GROUP: tl.constexpr,
    QUANT_CHUNK: tl.constexpr, DTYPE: tl.constexpr, NATIVE: tl.constexpr, CONVERT_AFTER_UNPACK: tl.constexpr,
):  # fmt: skip
    """A block of quantized keys or values by chunk (_query_chunks' order): (codes [BLOCK_C, QUANT_CHUNK]
    as exact DTYPE values (q's dtype), scales [BLOCK_C] f32, zero points [BLOCK_C] f32 (int4 / int2;
    else none)), three tuples. Each payload byte is loaded once, for all its planes."""
    PW: tl.constexpr = D // CODES_PER_BYTE
    NG: tl.constexpr = D // QUANT_GROUP
    w = tl.arange(0, QUANT_CHUNK)
    # A slot's scales are one contiguous row: one vector load each, then a column per chunk.
    group = tl.arange(0, NG)
    scale_at = c[:, None] * NG + group[None, :]
    scale_rows = tl.load(scale_head + scale_at, mask=in_range[:, None], other=0.0)
    if CODES_PER_BYTE > 1:  # the packed kinds are the asymmetric ones
        zero_rows = tl.load(zero_head + scale_at, mask=in_range[:, None], other=0.0)
    codes = ()
    scales = ()
    zeros = ()
    for k in tl.static_range(D // QUANT_CHUNK):
        column = (k // CODES_PER_BYTE) * QUANT_CHUNK  # of the payload row (static, as k is)
        if k % CODES_PER_BYTE == 0:
            payload = _load_payload(
                head, c[:, None] * PW + (column + w)[None, :], in_range[:, None], KV_QUANT
            )
        codes = codes + (
            _codes_as(payload, k % CODES_PER_BYTE, CODES_PER_BYTE, DTYPE, NATIVE, CONVERT_AFTER_UNPACK),
        )
        g = ((k % CODES_PER_BYTE) * PW + column) // QUANT_GROUP
        scales = scales + (_column(scale_rows, g, NG),)
        if CODES_PER_BYTE > 1:
            zeros = zeros + (_column(zero_rows, g, NG),)
    return codes, scales, zeros


@triton.jit
def _quant_logits(
    q_chunks, q_sums, codes, scales, zeros, BLOCK_C: tl.constexpr, QROWS: tl.constexpr,
    CODES_PER_BYTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """q . k over a block of quantized keys: [QROWS, BLOCK_C] f32 (unscaled). Each chunk's codes, exact
    in q's dtype, meet its slice of q in one tensor-core dot, and the chunk's scale multiplies the f32
    result: the products stay exact, as with 16-bit keys. A zero point adds zero * sum(q's slice)."""
    s = tl.zeros([QROWS, BLOCK_C], tl.float32)
    for k in tl.static_range(len(codes)):
        dot = tl.dot(q_chunks[k], tl.trans(codes[k]), input_precision=DOT_PRECISION)
        s += dot * scales[k][None, :]
        if CODES_PER_BYTE > 1:
            s += q_sums[k][:, None] * zeros[k][None, :]
    return s


@triton.jit
def _quant_accumulate(
    acc, alpha, p, codes, scales, zeros, DTYPE: tl.constexpr, CODES_PER_BYTE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """acc * alpha + p @ v over a block of quantized values, acc a tuple of [QROWS, QUANT_CHUNK] f32 by
    chunk. A chunk's scale is folded into p (a [QROWS, BLOCK_C] product, not a [BLOCK_C, D] one), so
    its codes go into the tensor-core dot in q's dtype (DTYPE) as they are, exactly. A zero point's
    share, p @ zero in every column of the chunk, is a second dot, (p * zero) @ ones: it lands in acc's
    layout, where a sum over the slots would cross the warps (shared memory and a barrier) every block.
    p * zero is rounded to DTYPE as p * scale is."""
    out = ()
    for k in tl.static_range(len(codes)):
        p_scaled = (p * scales[k][None, :]).to(DTYPE)
        chunk = acc[k] * alpha[:, None] + tl.dot(p_scaled, codes[k], input_precision=DOT_PRECISION)
        if CODES_PER_BYTE > 1:
            ones = tl.full(codes[k].shape, 1.0, tl.float32).to(DTYPE)
            chunk += tl.dot((p * zeros[k][None, :]).to(DTYPE), ones, input_precision=DOT_PRECISION)
        out = out + (chunk,)
    return out


@triton.jit
def _attend_split(
    q_ptr, k_ptr, v_ptr, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, v_norm_ptr, valid_ptr,
    kv_len_ptr, t_ptr,
    qk_scale, split, kvh, b,
    HQ: tl.constexpr, HKV: tl.constexpr, C: tl.constexpr, D: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr,
    BLOCK_C: tl.constexpr, QROWS: tl.constexpr, EVICT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NATIVE: tl.constexpr, KV_QUANT: tl.constexpr, CODES_PER_BYTE: tl.constexpr,
    QUANT_GROUP: tl.constexpr, QUANT_CHUNK: tl.constexpr, CONVERT_AFTER_UNPACK: tl.constexpr,
):  # fmt: skip
    """One split of one KV head: (m, l, acc) of its query-head group, QROWS rows (rows >= G are padding).
    With KV_QUANT the K/V blocks are payloads + scales, dequantized in registers chunk by chunk
    (_query_chunks), and acc is a tuple of [QROWS, QUANT_CHUNK] by chunk."""
    G: tl.constexpr = HQ // HKV
    rows = tl.arange(0, QROWS)
    row_ok = rows < G
    head = kvh * G + rows  # query heads of this KV head's group
    bh = (b * HQ + head).to(tl.int64)
    d = tl.arange(0, D)
    if KV_QUANT == "none":
        q = tl.load(q_ptr + bh[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
    else:
        q_chunks, q_sums = _query_chunks(q_ptr, bh, row_ok, D, CODES_PER_BYTE, QUANT_CHUNK)

    head_row = (b * HKV + kvh).to(tl.int64)
    kv_off = head_row * (C * D // CODES_PER_BYTE)  # payload bytes: D // CODES_PER_BYTE a slot
    k_head = k_ptr + kv_off
    v_head = v_ptr + kv_off
    scale_off = head_row * (C * (D // QUANT_GROUP))
    valid_row = valid_ptr + b.to(tl.int64) * C
    first = split * (BLOCKS_PER_SPLIT * BLOCK_C)
    # Only the blocks of this split below the row's bound are read (a dynamic trip count): a partly
    # filled buffer costs what its filled prefix costs. A split wholly past the bound keeps m = -inf.
    n_valid = _row_bound(kv_len_ptr, b, C)
    num_blocks = tl.minimum(tl.cdiv(tl.maximum(n_valid - first, 0), BLOCK_C), BLOCKS_PER_SPLIT)

    m_i = tl.full([QROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([QROWS], tl.float32)
    if KV_QUANT == "none":
        acc = tl.zeros([QROWS, D], tl.float32)
    else:
        acc = ()
        for _ in tl.static_range(D // QUANT_CHUNK):
            acc = acc + (tl.zeros([QROWS, QUANT_CHUNK], tl.float32),)
    # The mask is too narrow (one byte a slot) for the cp.async pipeline that carries K and V, so it is
    # prefetched by hand one block ahead: its load latency hides behind the current block's math.
    c_first = first + tl.arange(0, BLOCK_C)
    valid_next = tl.load(valid_row + c_first, mask=c_first < n_valid, other=0)
    for blk in range(0, num_blocks):
        c = first + blk * BLOCK_C + tl.arange(0, BLOCK_C)
        in_range = c < C
        valid = valid_next != 0  # zero past n_valid: the mask load stops there
        c_next = c + BLOCK_C
        valid_next = tl.load(valid_row + c_next, mask=(c_next < n_valid) & (blk + 1 < num_blocks), other=0)
        if KV_QUANT == "none":
            kv_idx = c[:, None] * D + d[None, :]
            k = tl.load(k_head + kv_idx, mask=in_range[:, None], other=0.0)
            v = tl.load(v_head + kv_idx, mask=in_range[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [QROWS, BLOCK_C]
            if EVICT:
                # ones @ |V|^T on the tensor cores gives ||v||_1 in every row, already in the layout of
                # s (no cross-thread reduction, no layout conversion). Products are exact, sums are f32.
                ones = tl.full([QROWS, D], 1.0, v.dtype)
                vnorm = tl.dot(ones, tl.trans(tl.abs(v)), input_precision=DOT_PRECISION)
        else:
            k_codes, k_scales, k_zeros = _quant_block(
                k_head, k_scale_ptr + scale_off, k_zero_ptr + scale_off, c, in_range, D, KV_QUANT,
                CODES_PER_BYTE, QUANT_GROUP, QUANT_CHUNK, q_ptr.dtype.element_ty, NATIVE,
                CONVERT_AFTER_UNPACK,
            )  # fmt: skip
            s = _quant_logits(
                q_chunks, q_sums, k_codes, k_scales, k_zeros, BLOCK_C, QROWS, CODES_PER_BYTE, DOT_PRECISION
            )
            if not CONVERT_AFTER_UNPACK:
                v_codes, v_scales, v_zeros = _quant_block(
                    v_head, v_scale_ptr + scale_off, v_zero_ptr + scale_off, c, in_range, D, KV_QUANT,
                    CODES_PER_BYTE, QUANT_GROUP, QUANT_CHUNK, q_ptr.dtype.element_ty, NATIVE, False,
                )  # fmt: skip
            if EVICT:  # stored when the slot was written (quant.KVScales)
                vnorm = tl.load(v_norm_ptr + head_row * C + c, mask=in_range, other=0.0)[None, :]
        s = s * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        if EVICT:
            if NATIVE:
                # lg2.approx (one MUFU op, ~2^-22 relative error); tl.log2 is libdevice's polynomial.
                t = s + libdevice.fast_log2f(vnorm)
            else:
                t = s + tl.log2(vnorm)
            # evict_last: the epilogue reads t again and K/V never, so t outlasts the K/V stream in L2.
            tl.store(
                t_ptr + bh[:, None] * C + c[None, :],
                t,
                mask=row_ok[:, None] & in_range[None, :],
                eviction_policy="evict_last",
            )
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A block (or split) with no valid slot keeps m = -inf; subtracting 0 instead avoids inf - inf.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if KV_QUANT == "none":
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        else:
            if CONVERT_AFTER_UNPACK:
                # Unpacked here, not beside the keys: the 16-bit value codes then live only up to their
                # dot, and int4's 2-warp loop at group 32 (255 registers) does not spill.
                v_codes, v_scales, v_zeros = _quant_block(
                    v_head, v_scale_ptr + scale_off, v_zero_ptr + scale_off, c, in_range, D, KV_QUANT,
                    CODES_PER_BYTE, QUANT_GROUP, QUANT_CHUNK, q_ptr.dtype.element_ty, NATIVE, True,
                )  # fmt: skip
            acc = _quant_accumulate(
                acc, alpha, p, v_codes, v_scales, v_zeros, q_ptr.dtype.element_ty, CODES_PER_BYTE,
                DOT_PRECISION,
            )  # fmt: skip
        m_i = m_new

    return m_i, l_i, acc


@triton.jit
def _store_columns(
    acc, cols, l_i, bh, row_ok, out_ptr, acc_ptr, split, D: tl.constexpr, NUM_SPLITS: tl.constexpr
):  # fmt: skip
    """Head columns `cols` of a split's result: normalised into out when it is the only split, else the
    unnormalised accumulator."""
    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + bh[:, None] * D + cols[None, :], o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None]
        )
    else:
        tl.store(acc_ptr + (bh[:, None] * NUM_SPLITS + split) * D + cols[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _store_split(
    m_i, l_i, acc, out_ptr, acc_ptr, m_ptr, l_ptr, lse_ptr, split, kvh, b,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr, QROWS: tl.constexpr,
    STATS: tl.constexpr, LSE: tl.constexpr, KV_QUANT: tl.constexpr, CODES_PER_BYTE: tl.constexpr,
    QUANT_CHUNK: tl.constexpr,
):  # fmt: skip
    """A split's result for its query-head group: the normalised output (and with LSE its log-sum-exp)
    when it is the only split, else the unnormalised accumulator (a quantized head's chunk by chunk);
    with STATS also (m, l) for whoever merges or scores after it."""
    G: tl.constexpr = HQ // HKV
    rows = tl.arange(0, QROWS)
    row_ok = rows < G
    bh = (b * HQ + kvh * G + rows).to(tl.int64)
    if KV_QUANT == "none":
        _store_columns(acc, tl.arange(0, D), l_i, bh, row_ok, out_ptr, acc_ptr, split, D, NUM_SPLITS)
    else:
        PW: tl.constexpr = D // CODES_PER_BYTE
        for k in tl.static_range(D // QUANT_CHUNK):
            first = (k % CODES_PER_BYTE) * PW + (k // CODES_PER_BYTE) * QUANT_CHUNK
            cols = first + tl.arange(0, QUANT_CHUNK)
            _store_columns(acc[k], cols, l_i, bh, row_ok, out_ptr, acc_ptr, split, D, NUM_SPLITS)
    if LSE and NUM_SPLITS == 1:
        tl.store(lse_ptr + bh, _log_sum_exp(m_i, l_i), mask=row_ok)
    if STATS:
        tl.store(m_ptr + bh * NUM_SPLITS + split, m_i, mask=row_ok)
        tl.store(l_ptr + bh * NUM_SPLITS + split, l_i, mask=row_ok)


@triton.jit
def _merge_head(
    oh, m_ptr, l_ptr, acc_ptr, out_ptr, lse_ptr, NUM_SPLITS: tl.constexpr, S_P: tl.constexpr,
    D: tl.constexpr, LSE: tl.constexpr,
):  # fmt: skip
    """Query head oh's output (and with LSE its log-sum-exp) from its split partials, read through L2."""
    s = tl.arange(0, S_P)
    s_ok = s < NUM_SPLITS
    om = tl.load(m_ptr + oh * NUM_SPLITS + s, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
    ol = tl.load(l_ptr + oh * NUM_SPLITS + s, mask=s_ok, other=0.0, cache_modifier=".cg")
    om_max = tl.max(om, axis=0)
    om_use = tl.where(om_max == float("-inf"), 0.0, om_max)
    ow = tl.exp2(om - om_use)
    odenom = tl.sum(ol * ow, axis=0)
    d = tl.arange(0, D)
    oacc = tl.load(
        acc_ptr + (oh * NUM_SPLITS + s[:, None]) * D + d[None, :],
        mask=s_ok[:, None],
        other=0.0,
        cache_modifier=".cg",
    )
    o = tl.sum(oacc * ow[:, None], axis=0) / tl.where(odenom > 0.0, odenom, 1.0)
    tl.store(out_ptr + oh * D + d, o.to(out_ptr.dtype.element_ty))
    if LSE:
        tl.store(lse_ptr + oh, _log_sum_exp(om_use, odenom))


@triton.jit
def decode_split_kernel(
    q_ptr,  # [B, HQ, D]
    k_ptr,  # [B, HKV, C, D], or a quantized payload [B, HKV, C, D / CODES_PER_BYTE]
    v_ptr,  # as k_ptr
    valid_ptr,  # [B, C] bool
    kv_len_ptr,  # [B] i32: slots >= kv_len[b] are invalid and not read
    qk_scale,  # softmax scale * log2(e), f32
    k_scale_ptr,  # [B, HKV, C, D / QUANT_GROUP] f32 (with KV_QUANT; else unused)
    k_zero_ptr,  # [B, HKV, C, D / QUANT_GROUP] f32 (int4 / int2; else unused)
    v_scale_ptr,
    v_zero_ptr,
    v_norm_ptr,  # [B, HKV, C, 1] f32 ||v||_1 of each slot's dequantized value (with KV_QUANT; else unused)
    out_ptr,  # [B, HQ, D] q dtype (written when DIRECT_OUT)
    acc_ptr,  # [B, HQ, S, D] f32 unnormalised split outputs (when not DIRECT_OUT)
    m_ptr,  # [B, HQ, S] f32 running max (log2 domain)
    l_ptr,  # [B, HQ, S] f32 softmax denominators
    t_ptr,  # [B, HQ, C] f32 logit*log2e + log2||v||_1 (when EVICT)
    counter_ptr,  # [B] i32 zeroed here for the combine kernel (when EVICT)
    no_evict_ptr,  # [B, NG] i32 filled with -1 (when not EVICT)
    lse_ptr,  # [B, HQ] f32 log-sum-exp of the scaled logits (when LSE and DIRECT_OUT)
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    C: tl.constexpr,
    D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCKS_PER_SPLIT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    QROWS: tl.constexpr,
    NG: tl.constexpr,
    NG_P: tl.constexpr,
    DIRECT_OUT: tl.constexpr,
    EVICT: tl.constexpr,
    LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    NATIVE: tl.constexpr,  # GPU compile: lg2.approx, PTX code unpacking (the interpreter runs neither)
    KV_QUANT: tl.constexpr,  # "none", or the payload kind of k_ptr / v_ptr (pallas_kernels/quant.py)
    CODES_PER_BYTE: tl.constexpr,
    QUANT_GROUP: tl.constexpr,  # head elements per scale
    QUANT_CHUNK: tl.constexpr,  # head elements per key dot: min(QUANT_GROUP, D // CODES_PER_BYTE)
    CONVERT_AFTER_UNPACK: tl.constexpr,  # LaunchConfig.convert_after_unpack
):
    split = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)

    m_i, l_i, acc = _attend_split(
        q_ptr, k_ptr, v_ptr, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, v_norm_ptr, valid_ptr,
        kv_len_ptr, t_ptr,
        qk_scale, split, kvh, b, HQ, HKV, C, D, BLOCKS_PER_SPLIT, BLOCK_C, QROWS, EVICT, DOT_PRECISION,
        NATIVE, KV_QUANT, CODES_PER_BYTE, QUANT_GROUP, QUANT_CHUNK, CONVERT_AFTER_UNPACK,
    )  # fmt: skip
    # DIRECT_OUT is NUM_SPLITS == 1 (launch.py): the only split normalises its own output.
    _store_split(
        m_i, l_i, acc, out_ptr, acc_ptr, m_ptr, l_ptr, lse_ptr, split, kvh, b, HQ, HKV, D, NUM_SPLITS, QROWS,
        EVICT or not DIRECT_OUT, LSE, KV_QUANT, CODES_PER_BYTE, QUANT_CHUNK,
    )  # fmt: skip
    if (split == 0) & (kvh == 0):
        if EVICT:
            tl.store(counter_ptr + b, 0)
        else:
            g = tl.arange(0, NG_P)
            tl.store(no_evict_ptr + b * NG + g, tl.full([NG_P], -1, tl.int32), mask=g < NG)


@triton.jit
def decode_combine_kernel(
    valid_ptr,  # [B, C] bool
    kv_len_ptr,  # [B] i32
    acc_ptr,  # [B, HQ, S, D] f32
    m_ptr,  # [B, HQ, S] f32
    l_ptr,  # [B, HQ, S] f32
    t_ptr,  # [B, HQ, C] f32 (when EVICT)
    counter_in_ptr,  # [B] i32, aliased to counter_ptr
    out_ptr,  # [B, HQ, D] q dtype (when COMBINE_OUT)
    evict_ptr,  # [B, NG] i32 (when EVICT)
    part_val_ptr,  # [B, NG, NUM_CHUNKS] f32 chunk minima
    part_idx_ptr,  # [B, NG, NUM_CHUNKS] i32 their slots
    counter_ptr,  # [B] i32
    lse_ptr,  # [B, HQ] f32 log-sum-exp of the scaled logits (when LSE and COMBINE_OUT)
    HQ: tl.constexpr,
    C: tl.constexpr,
    D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    S_P: tl.constexpr,
    NG: tl.constexpr,
    NG_P: tl.constexpr,
    HPG: tl.constexpr,
    HPG_P: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    NCH_P: tl.constexpr,
    COMBINE_OUT: tl.constexpr,
    EVICT: tl.constexpr,
    LSE: tl.constexpr,
    DISCARD_T: tl.constexpr,  # drop the t lines of this chunk from L2 once read (no write-back)
):
    j = tl.program_id(0)
    b = tl.program_id(1)
    s = tl.arange(0, S_P)
    s_ok = s < NUM_SPLITS

    if COMBINE_OUT:
        if j < HQ:
            _merge_head(
                (b * HQ + j).to(tl.int64), m_ptr, l_ptr, acc_ptr, out_ptr, lse_ptr, NUM_SPLITS, S_P, D, LSE
            )

    if EVICT:
        if j < NUM_CHUNKS:
            g = tl.arange(0, NG_P)
            c = j * CHUNK + tl.arange(0, CHUNK)
            c_ok = c < C
            # Past the bound t was never written: those slots are empty whatever the mask says.
            in_bound = c < _row_bound(kv_len_ptr, b, C)
            # Final softmax statistics of every query head, as [group, head-in-group].
            r = tl.arange(0, HPG_P)
            head_ok = (g[:, None] < NG) & (r[None, :] < HPG)
            bh = (b * HQ + g[:, None] * HPG + r[None, :]).to(tl.int64)  # [NG_P, HPG_P]
            stat_idx = bh[:, :, None] * NUM_SPLITS + s[None, None, :]
            stat_ok = head_ok[:, :, None] & s_ok[None, None, :]
            m = tl.load(m_ptr + stat_idx, mask=stat_ok, other=float("-inf"))
            ell = tl.load(l_ptr + stat_idx, mask=stat_ok, other=0.0)
            m_max = tl.max(m, axis=2)
            m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
            denom = tl.sum(ell * tl.exp2(m - m_use[:, :, None]), axis=2)
            inv_denom = tl.where(denom > 0.0, 1.0 / denom, 0.0)
            t = tl.load(
                t_ptr + bh[:, :, None] * C + c[None, None, :],
                mask=head_ok[:, :, None] & c_ok[None, None, :],
                other=float("-inf"),
            )
            contrib = tl.exp2(t - m_use[:, :, None]) * inv_denom[:, :, None]
            score = tl.sum(contrib, axis=1)  # [NG_P, CHUNK]
            valid = tl.load(valid_ptr + b.to(tl.int64) * C + c, mask=in_bound, other=0) != 0
            score = tl.where(valid[None, :], score, -1.0)  # EMPTY_SLOT_SCORE
            score = tl.where(c_ok[None, :], score, float("inf"))
            best, best_at = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
            if DISCARD_T:
                # t is dead once read. The predicate depends on the chunk's argmin, which needs every
                # thread's t, so no line goes before all its reads; the plan keeps lines whole.
                lines = tl.arange(0, CHUNK // 32)
                line_addr = t_ptr + bh[:, :, None] * C + (j * CHUNK + lines * 32)[None, None, :]
                read_done = tl.min(best_at, axis=0) >= 0
                line_ok = head_ok[:, :, None] & ((j * CHUNK + lines * 32) < C)[None, None, :] & read_done
                _discard_l2_lines(line_addr, line_ok)
            slot = j * CHUNK + best_at
            g_ok = g < NG
            if NUM_CHUNKS == 1:
                tl.store(evict_ptr + b * NG + g, slot, mask=g_ok)
            else:
                part = (b * NG + g) * NUM_CHUNKS + j
                tl.store(part_val_ptr + part, best, mask=g_ok)
                tl.store(part_idx_ptr + part, slot, mask=g_ok)
                # Every thread's partial store precedes the barrier; the acq_rel atomic then
                # publishes them (the pattern of CUDA's grid sync), and the last program sees all.
                tl.debug_barrier()
                done = tl.atomic_add(counter_ptr + b, 1, sem="acq_rel", scope="gpu")
                if done == NUM_CHUNKS - 1:
                    jj = tl.arange(0, NCH_P)
                    all_idx = (b * NG + g[:, None]) * NUM_CHUNKS + jj[None, :]
                    all_ok = g_ok[:, None] & (jj[None, :] < NUM_CHUNKS)
                    vals = tl.load(
                        part_val_ptr + all_idx, mask=all_ok, other=float("inf"), cache_modifier=".cg"
                    )
                    idxs = tl.load(part_idx_ptr + all_idx, mask=all_ok, other=0, cache_modifier=".cg")
                    # Chunks are in slot order, so the lowest chunk among equal minima holds the
                    # lowest slot: ties still go to the lowest index, as jnp.argmin does.
                    _, best_chunk = tl.min(
                        vals, axis=1, return_indices=True, return_indices_tie_break_left=True
                    )
                    pick = tl.sum(tl.where(jj[None, :] == best_chunk[:, None], idxs, 0), axis=1)
                    tl.store(evict_ptr + b * NG + g, pick, mask=g_ok)


@triton.jit
def decode_fused_kernel(
    q_ptr,  # [B, HQ, D]
    k_ptr,  # [B, HKV, C, D], or a quantized payload [B, HKV, C, D / CODES_PER_BYTE]
    v_ptr,  # as k_ptr
    valid_ptr,  # [B, C] bool
    kv_len_ptr,  # [B] i32
    qk_scale,  # softmax scale * log2(e), f32
    tickets_in_ptr,  # unused: the caller's ticket buffer, aliased to count_ptr
    k_scale_ptr,  # [B, HKV, C, D / QUANT_GROUP] f32 (with KV_QUANT; else unused)
    k_zero_ptr,  # [B, HKV, C, D / QUANT_GROUP] f32 (int4 / int2; else unused)
    v_scale_ptr,
    v_zero_ptr,
    v_norm_ptr,  # [B, HKV, C, 1] f32 ||v||_1 of each slot's dequantized value (with KV_QUANT; else unused)
    out_ptr,  # [B, HQ, D] q dtype
    acc_ptr,  # [B, HQ, S, D] f32 split outputs (when NUM_SPLITS > 1)
    m_ptr,  # [B, HQ, S] f32
    l_ptr,  # [B, HQ, S] f32
    t_ptr,  # [B, HQ, C] f32 (when EVICT)
    imp_ptr,  # [B, HKV, C] f32 per-KV-head importance (when EVICT and NG < HKV)
    evict_ptr,  # [B, NG] i32
    count_ptr,  # [B * HKV + B (or more)] i32, zero at launch and at exit: split, then KV-head tickets
    lse_ptr,  # [B, HQ] f32 log-sum-exp of the scaled logits (when LSE)
    B: tl.constexpr,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    C: tl.constexpr,
    D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCKS_PER_SPLIT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    QROWS: tl.constexpr,
    G_P: tl.constexpr,  # next_pow2(G): the finisher's head tile
    S_CHUNK: tl.constexpr,  # splits merged per step by the finisher
    HKV_P: tl.constexpr,
    NG: tl.constexpr,
    ECHUNK: tl.constexpr,  # slots per step of the KV-head finisher
    SCHUNK: tl.constexpr,  # slots per step of the sequence finisher
    EVICT: tl.constexpr,
    LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    NATIVE: tl.constexpr,
    DISCARD_T: tl.constexpr,  # drop t (and imp) lines from L2 once the finisher has read them
    KV_QUANT: tl.constexpr,  # "none", or the payload kind of k_ptr / v_ptr (pallas_kernels/quant.py)
    CODES_PER_BYTE: tl.constexpr,
    QUANT_GROUP: tl.constexpr,  # head elements per scale
    QUANT_CHUNK: tl.constexpr,  # head elements per key dot: min(QUANT_GROUP, D // CODES_PER_BYTE)
    CONVERT_AFTER_UNPACK: tl.constexpr,  # LaunchConfig.convert_after_unpack
):
    """Everything in one launch. Each program streams its split; the last split of a (sequence, KV head)
    to finish merges the group's outputs and scores that KV head's slots; for "sequence" granularity
    the last KV head of the sequence sums the per-KV-head scores and takes the argmin."""
    split = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    G: tl.constexpr = HQ // HKV
    m_i, l_i, acc = _attend_split(
        q_ptr, k_ptr, v_ptr, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, v_norm_ptr, valid_ptr,
        kv_len_ptr, t_ptr,
        qk_scale, split, kvh, b, HQ, HKV, C, D, BLOCKS_PER_SPLIT, BLOCK_C, QROWS, EVICT, DOT_PRECISION,
        NATIVE, KV_QUANT, CODES_PER_BYTE, QUANT_GROUP, QUANT_CHUNK, CONVERT_AFTER_UNPACK,
    )  # fmt: skip
    _store_split(
        m_i, l_i, acc, out_ptr, acc_ptr, m_ptr, l_ptr, lse_ptr, split, kvh, b, HQ, HKV, D, NUM_SPLITS, QROWS,
        True, LSE, KV_QUANT, CODES_PER_BYTE, QUANT_CHUNK,
    )  # fmt: skip
    d = tl.arange(0, D)
    # Every thread's stores precede the barrier; the acq_rel ticket then publishes them to whichever
    # program finishes last (the pattern of CUDA's grid sync), which reads them back through L2 (.cg).
    tl.debug_barrier()
    if NUM_SPLITS > 1:
        ticket = tl.atomic_add(count_ptr + b * HKV + kvh, 1, sem="acq_rel", scope="gpu")
        head_last = ticket == NUM_SPLITS - 1
    else:
        head_last = True

    if head_last:
        if NUM_SPLITS > 1:
            # Every split of this KV head has taken its ticket: nobody reads it again in this launch.
            tl.store(count_ptr + b * HKV + kvh, 0)
        g = tl.arange(0, G_P)
        g_ok = g < G
        fh = (b * HQ + kvh * G + g).to(tl.int64)  # [G_P] this group's query heads
        sp = tl.arange(0, S_CHUNK)
        if NUM_SPLITS == 1:
            # The program's own statistics are final: read back as [G_P] rows, no merge.
            m_max = tl.load(m_ptr + fh, mask=g_ok, other=float("-inf"), cache_modifier=".cg")
            m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
            denom = tl.load(l_ptr + fh, mask=g_ok, other=0.0, cache_modifier=".cg")
        else:
            m_max = tl.full([G_P], float("-inf"), tl.float32)
            for s0 in range(0, NUM_SPLITS, S_CHUNK):
                s_ok = (s0 + sp) < NUM_SPLITS
                ms = tl.load(
                    m_ptr + fh[:, None] * NUM_SPLITS + s0 + sp[None, :],
                    mask=g_ok[:, None] & s_ok[None, :],
                    other=float("-inf"),
                    cache_modifier=".cg",
                )
                m_max = tl.maximum(m_max, tl.max(ms, axis=1))
            m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
            denom = tl.zeros([G_P], tl.float32)
            o_sum = tl.zeros([G_P, D], tl.float32)
            for s0 in range(0, NUM_SPLITS, S_CHUNK):
                s_ok = (s0 + sp) < NUM_SPLITS
                st_ok = g_ok[:, None] & s_ok[None, :]
                st_idx = fh[:, None] * NUM_SPLITS + s0 + sp[None, :]
                ms = tl.load(m_ptr + st_idx, mask=st_ok, other=float("-inf"), cache_modifier=".cg")
                ls = tl.load(l_ptr + st_idx, mask=st_ok, other=0.0, cache_modifier=".cg")
                w = tl.exp2(ms - m_use[:, None])  # [G_P, S_CHUNK]
                denom += tl.sum(ls * w, axis=1)
                accs = tl.load(
                    acc_ptr + st_idx[:, :, None] * D + d[None, None, :],
                    mask=st_ok[:, :, None],
                    other=0.0,
                    cache_modifier=".cg",
                )
                o_sum += tl.sum(accs * w[:, :, None], axis=1)
        inv_denom = tl.where(denom > 0.0, 1.0 / denom, 0.0)
        if NUM_SPLITS > 1:
            o = o_sum * inv_denom[:, None]
            tl.store(
                out_ptr + fh[:, None] * D + d[None, :], o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None]
            )
            if LSE:
                tl.store(lse_ptr + fh, _log_sum_exp(m_use, denom), mask=g_ok)

        if EVICT:
            valid_row = valid_ptr + b.to(tl.int64) * C
            n_valid = _row_bound(kv_len_ptr, b, C)
            ec = tl.arange(0, ECHUNK)
            best_val = float("inf")
            best_slot = 0
            for c0 in range(0, C, ECHUNK):
                c = c0 + ec
                c_ok = c < C
                t = tl.load(
                    t_ptr + fh[:, None] * C + c[None, :],
                    mask=g_ok[:, None] & c_ok[None, :],
                    other=float("-inf"),
                    cache_modifier=".cg",
                )
                imp = tl.sum(tl.exp2(t - m_use[:, None]) * inv_denom[:, None], axis=0)  # [ECHUNK]
                if DISCARD_T:
                    # imp >= 0 is never -1: the predicate waits for every thread's t of this chunk.
                    lines = tl.arange(0, ECHUNK // 32)
                    read_done = tl.max(imp, axis=0) != -1.0
                    line_ok = g_ok[:, None] & ((c0 + lines * 32) < C)[None, :] & read_done
                    _discard_l2_lines(t_ptr + fh[:, None] * C + (c0 + lines * 32)[None, :], line_ok)
                if NG == HKV:  # one score group per KV head: this program has everything
                    valid = tl.load(valid_row + c, mask=c < n_valid, other=0) != 0
                    score = tl.where(c_ok, tl.where(valid, imp, -1.0), float("inf"))
                    cmin, cat = tl.min(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
                    take = cmin < best_val  # strict: an earlier chunk keeps ties (lowest slot)
                    best_slot = tl.where(take, c0 + cat, best_slot)
                    best_val = tl.where(take, cmin, best_val)
                else:
                    tl.store(
                        imp_ptr + (b * HKV + kvh).to(tl.int64) * C + c,
                        imp,
                        mask=c_ok,
                        eviction_policy="evict_last",
                    )
            if NG == HKV:
                tl.store(evict_ptr + b * NG + kvh, best_slot)
            else:
                tl.debug_barrier()
                seq_ticket = tl.atomic_add(count_ptr + B * HKV + b, 1, sem="acq_rel", scope="gpu")
                if seq_ticket == HKV - 1:
                    tl.store(count_ptr + B * HKV + b, 0)
                    hk = tl.arange(0, HKV_P)
                    sc = tl.arange(0, SCHUNK)
                    imp_rows = imp_ptr + (b * HKV + hk).to(tl.int64)[:, None] * C
                    seq_val = float("inf")
                    seq_slot = 0
                    for c0 in range(0, C, SCHUNK):
                        c = c0 + sc
                        c_ok = c < C
                        part = tl.load(
                            imp_rows + c[None, :],
                            mask=(hk[:, None] < HKV) & c_ok[None, :],
                            other=0.0,
                            cache_modifier=".cg",
                        )
                        valid = tl.load(valid_row + c, mask=c < n_valid, other=0) != 0
                        score = tl.where(c_ok, tl.where(valid, tl.sum(part, axis=0), -1.0), float("inf"))
                        cmin, cat = tl.min(
                            score, axis=0, return_indices=True, return_indices_tie_break_left=True
                        )
                        if DISCARD_T:
                            lines = tl.arange(0, SCHUNK // 32)
                            line_ok = (hk[:, None] < HKV) & ((c0 + lines * 32) < C)[None, :] & (cat >= 0)
                            _discard_l2_lines(imp_rows + (c0 + lines * 32)[None, :], line_ok)
                        take = cmin < seq_val
                        seq_slot = tl.where(take, c0 + cat, seq_slot)
                        seq_val = tl.where(take, cmin, seq_val)
                    tl.store(evict_ptr + b, seq_slot)
        else:
            if kvh < NG:
                tl.store(evict_ptr + b * NG + kvh, -1)


@triton.jit
def _coop_finish_share(
    j, bar, valid_ptr, kv_len_ptr, acc_ptr, m_ptr, l_ptr, t_ptr, out_ptr, part_val_ptr, part_idx_ptr,
    lse_ptr, HQ: tl.constexpr, HKV: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, S_P: tl.constexpr, BAR_KV: tl.constexpr, HPG: tl.constexpr,
    HPG_P: tl.constexpr, NSH: tl.constexpr, ECHUNK: tl.constexpr, EVICT: tl.constexpr,
    DISCARD_T: tl.constexpr, LSE: tl.constexpr,
):  # fmt: skip
    """Share j of barrier group `bar` (b * NG + g with eviction, b * HKV + kvh without), once every program
    of the group has stored its split: merge the split outputs of some of its query heads, and score one
    strided set of slot chunks (argmin to part_*)."""
    G: tl.constexpr = HQ // HKV
    split = j // BAR_KV
    b = (bar * BAR_KV) // HKV
    kvh = (bar * BAR_KV) % HKV + j % BAR_KV
    s = tl.arange(0, S_P)
    s_ok = s < NUM_SPLITS
    if NUM_SPLITS > 1:
        # Heads r = split, split + S, ... of this KV head's group: every head once across the shares.
        for r in range(split, G, NUM_SPLITS):
            _merge_head(
                (b * HQ + kvh * G + r).to(tl.int64), m_ptr, l_ptr, acc_ptr, out_ptr, lse_ptr, NUM_SPLITS,
                S_P, D, LSE,
            )  # fmt: skip
    if EVICT:
        NG: tl.constexpr = HKV // BAR_KV
        g = bar % NG
        r = tl.arange(0, HPG_P)
        r_ok = r < HPG
        bh = (b * HQ + g * HPG + r).to(tl.int64)  # the score group's query heads
        stat_idx = bh[:, None] * NUM_SPLITS + s[None, :]
        stat_ok = r_ok[:, None] & s_ok[None, :]
        m = tl.load(m_ptr + stat_idx, mask=stat_ok, other=float("-inf"), cache_modifier=".cg")
        ell = tl.load(l_ptr + stat_idx, mask=stat_ok, other=0.0, cache_modifier=".cg")
        m_max = tl.max(m, axis=1)
        m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
        denom = tl.sum(ell * tl.exp2(m - m_use[:, None]), axis=1)
        inv_denom = tl.where(denom > 0.0, 1.0 / denom, 0.0)
        n_valid = _row_bound(kv_len_ptr, b, C)
        valid_row = valid_ptr + b.to(tl.int64) * C
        ec = tl.arange(0, ECHUNK)
        best_val = float("inf")
        best_slot = C
        for c0 in range(j * ECHUNK, C, NSH * ECHUNK):
            c = c0 + ec
            c_ok = c < C
            in_bound = c < n_valid  # past the bound t was never written: those slots are empty
            t = tl.load(
                t_ptr + bh[:, None] * C + c[None, :],
                mask=r_ok[:, None] & in_bound[None, :],
                other=float("-inf"),
                cache_modifier=".cg",
            )
            imp = tl.sum(tl.exp2(t - m_use[:, None]) * inv_denom[:, None], axis=0)  # [ECHUNK]
            valid = tl.load(valid_row + c, mask=in_bound, other=0) != 0
            score = tl.where(c_ok, tl.where(valid, imp, -1.0), float("inf"))
            cmin, cat = tl.min(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
            if DISCARD_T:
                # The predicate needs the chunk's argmin, so every thread's t is read before any line goes.
                lines = tl.arange(0, ECHUNK // 32)
                line_ok = r_ok[:, None] & ((c0 + lines * 32) < n_valid)[None, :] & (cat >= 0)
                _discard_l2_lines(t_ptr + bh[:, None] * C + (c0 + lines * 32)[None, :], line_ok)
            take = cmin < best_val  # strict: this share's earlier chunk keeps ties (lower slot)
            best_slot = tl.where(take, c0 + cat, best_slot)
            best_val = tl.where(take, cmin, best_val)
        tl.store(part_val_ptr + bar * NSH + j, best_val)
        tl.store(part_idx_ptr + bar * NSH + j, best_slot)


@triton.jit
def _coop_final_argmin(bar, part_val_ptr, part_idx_ptr, evict_ptr, NSH: tl.constexpr, NSH_P: tl.constexpr):
    """The group's evict slot from its shares' minima: the lowest slot among the equal minima (shares
    interleave their chunks, so the share order is not the slot order)."""
    jj = tl.arange(0, NSH_P)
    ok = jj < NSH
    vals = tl.load(part_val_ptr + bar * NSH + jj, mask=ok, other=float("inf"), cache_modifier=".cg")
    idxs = tl.load(part_idx_ptr + bar * NSH + jj, mask=ok, other=0, cache_modifier=".cg")
    vmin = tl.min(vals, axis=0)
    pick = tl.min(tl.where(ok & (vals == vmin), idxs, 2147483647), axis=0)
    tl.store(evict_ptr + bar, pick)


@triton.jit
def _reset_group_tickets(count_ptr, bar, NBAR: tl.constexpr):
    """Leave barrier group `bar`'s arrival count and finish ticket at zero for the next launch."""
    tl.store(count_ptr + bar, 0)
    tl.store(count_ptr + NBAR + bar, 0)


@triton.jit
def decode_coop_kernel(
    q_ptr,  # [B, HQ, D]
    k_ptr,  # [B, HKV, C, D], or a quantized payload [B, HKV, C, D / CODES_PER_BYTE]
    v_ptr,  # as k_ptr
    valid_ptr,  # [B, C] bool
    kv_len_ptr,  # [B] i32
    qk_scale,  # softmax scale * log2(e), f32
    tickets_in_ptr,  # unused: the caller's ticket buffer, aliased to count_ptr
    k_scale_ptr,  # [B, HKV, C, D / QUANT_GROUP] f32 (with KV_QUANT; else unused)
    k_zero_ptr,  # [B, HKV, C, D / QUANT_GROUP] f32 (int4 / int2; else unused)
    v_scale_ptr,
    v_zero_ptr,
    v_norm_ptr,  # [B, HKV, C, 1] f32 ||v||_1 of each slot's dequantized value (with KV_QUANT; else unused)
    out_ptr,  # [B, HQ, D] q dtype
    acc_ptr,  # [B, HQ, S, D] f32 split outputs (when NUM_SPLITS > 1)
    m_ptr,  # [B, HQ, S] f32
    l_ptr,  # [B, HQ, S] f32
    t_ptr,  # [B, HQ, C] f32 (when EVICT)
    part_val_ptr,  # [NBAR, NSH] f32 share minima (when EVICT)
    part_idx_ptr,  # [NBAR, NSH] i32 their slots
    evict_ptr,  # [B, NG] i32
    count_ptr,  # [2 * NBAR (or more)] i32, zero at launch and at exit: arrivals, then finish tickets
    lse_ptr,  # [B, HQ] f32 log-sum-exp of the scaled logits (when LSE)
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    C: tl.constexpr,
    D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    S_P: tl.constexpr,
    BLOCKS_PER_SPLIT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    QROWS: tl.constexpr,
    BAR_KV: tl.constexpr,  # KV heads per barrier group: HKV // NG with eviction, 1 without
    NBAR: tl.constexpr,  # barrier groups: B * HKV // BAR_KV
    HPG: tl.constexpr,  # query heads per score group
    HPG_P: tl.constexpr,
    NSH: tl.constexpr,  # programs (= shares) per barrier group: NUM_SPLITS * BAR_KV
    NSH_P: tl.constexpr,
    ECHUNK: tl.constexpr,  # slots per scoring step of a share
    EVICT: tl.constexpr,
    LSE: tl.constexpr,
    SPIN: tl.constexpr,  # GPU: every program waits at the barrier; interpreter: the last one does all
    DOT_PRECISION: tl.constexpr,
    NATIVE: tl.constexpr,
    DISCARD_T: tl.constexpr,
    KV_QUANT: tl.constexpr,  # "none", or the payload kind of k_ptr / v_ptr (pallas_kernels/quant.py)
    CODES_PER_BYTE: tl.constexpr,
    QUANT_GROUP: tl.constexpr,  # head elements per scale
    QUANT_CHUNK: tl.constexpr,  # head elements per key dot: min(QUANT_GROUP, D // CODES_PER_BYTE)
    CONVERT_AFTER_UNPACK: tl.constexpr,  # LaunchConfig.convert_after_unpack
):
    """One launch with a parallel epilogue: each program streams its split, waits at its group's barrier,
    then finishes one share; the last share reduces the shares' minima. The whole grid must be resident
    at once (config.check_coop_grid)."""
    split = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    NG: tl.constexpr = HKV // BAR_KV
    m_i, l_i, acc = _attend_split(
        q_ptr, k_ptr, v_ptr, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, v_norm_ptr, valid_ptr,
        kv_len_ptr, t_ptr,
        qk_scale, split, kvh, b, HQ, HKV, C, D, BLOCKS_PER_SPLIT, BLOCK_C, QROWS, EVICT, DOT_PRECISION,
        NATIVE, KV_QUANT, CODES_PER_BYTE, QUANT_GROUP, QUANT_CHUNK, CONVERT_AFTER_UNPACK,
    )  # fmt: skip
    _store_split(
        m_i, l_i, acc, out_ptr, acc_ptr, m_ptr, l_ptr, lse_ptr, split, kvh, b, HQ, HKV, D, NUM_SPLITS, QROWS,
        True, LSE, KV_QUANT, CODES_PER_BYTE, QUANT_CHUNK,
    )  # fmt: skip
    if not EVICT:
        if (split == 0) & (kvh < NG):
            tl.store(evict_ptr + b * NG + kvh, -1)
    if EVICT or NUM_SPLITS > 1:
        bar = (b * HKV + kvh) // BAR_KV
        share = split * BAR_KV + kvh % BAR_KV
        # Every thread's stores precede the barrier; the acq_rel arrival publishes them, as in CUDA's
        # grid sync, and the reads past it go through L2 (.cg).
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + bar, 1, sem="acq_rel", scope="gpu") + 1
        if SPIN:
            while arrived < NSH:
                arrived = tl.atomic_add(count_ptr + bar, 0, sem="acquire", scope="gpu")
            tl.debug_barrier()
            _coop_finish_share(
                share, bar, valid_ptr, kv_len_ptr, acc_ptr, m_ptr, l_ptr, t_ptr, out_ptr, part_val_ptr,
                part_idx_ptr, lse_ptr, HQ, HKV, C, D, NUM_SPLITS, S_P, BAR_KV, HPG, HPG_P, NSH, ECHUNK,
                EVICT, DISCARD_T, LSE,
            )  # fmt: skip
            tl.debug_barrier()
            ticket = tl.atomic_add(count_ptr + NBAR + bar, 1, sem="acq_rel", scope="gpu")
            if ticket == NSH - 1:
                if EVICT:
                    _coop_final_argmin(bar, part_val_ptr, part_idx_ptr, evict_ptr, NSH, NSH_P)
                # Every program of the group has passed the barrier (it took a ticket after its
                # share): the arrival count and the ticket are read by nobody else this launch.
                _reset_group_tickets(count_ptr, bar, NBAR)
        else:
            # Triton's CPU interpreter runs programs one after another, so nobody may wait: the last to
            # arrive does every share (the same code, serially).
            if arrived == NSH:
                for jshare in range(0, NSH):
                    _coop_finish_share(
                        jshare, bar, valid_ptr, kv_len_ptr, acc_ptr, m_ptr, l_ptr, t_ptr, out_ptr,
                        part_val_ptr, part_idx_ptr, lse_ptr, HQ, HKV, C, D, NUM_SPLITS, S_P, BAR_KV, HPG,
                        HPG_P, NSH, ECHUNK, EVICT, DISCARD_T, LSE,
                    )  # fmt: skip
                if EVICT:
                    tl.debug_barrier()
                    _coop_final_argmin(bar, part_val_ptr, part_idx_ptr, evict_ptr, NSH, NSH_P)
                _reset_group_tickets(count_ptr, bar, NBAR)
