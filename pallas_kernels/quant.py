"""Per-slot quantization of the KV slot buffer, and the Hadamard rotation of keys, in plain jnp.

LongFlow overwrites one arbitrary slot per step, so every slot of every KV head is quantized on its
own: its head_dim elements in groups of `group` consecutive elements, each group with its own scale
(and zero point where asymmetric). Scales and zero points are float32. For a group x:
  int8  symmetric: s = max|x| / 127, payload round(x / s) in [-127, 127]; x ~ payload * s.
  fp8   s = max|x| / 448, payload x / s rounded to float8_e4m3fn; x ~ payload * s.
  int4, int2  asymmetric: z = min x, s = (max x - z) / (2^bits - 1), payload round((x - z) / s) in
        [0, 2^bits - 1]; x ~ payload * s + z.
An all-zero group (an empty slot) gets s = 0 and dequantizes exactly, and so does any group of equal
values at int4 / int2 (x ~ 0 * s + z); at int8 / fp8 such a group is within the scheme's rounding (a
relative 1e-7). "/ 127" etc. is a product with the float32 reciprocal (as XLA computes a division by a
constant), so that the scales are reproducible bit for bit on hardware that keeps float32 subnormals
(a group whose largest magnitude is below about 1e-36 gets a subnormal s, which XLA on CPU flushes to 0:
the group then dequantizes to 0), and a group whose range overflows float32 (|x| near 1.7e38) gets an
infinite s and NaN values at int4 / int2.

int4 and int2 pack 2 or 4 codes per uint8 in planes: byte j of a row holds elements
j + i * (D / per_byte), i = 0 .. per_byte - 1, code i in bits [i * bits, (i + 1) * bits). Each plane is a
contiguous slice of the head, so a kernel unpacks with a shift and a mask and dots each plane with the
matching slice of q, with no interleave.

Keys are rotated along head_dim by a fixed orthogonal Hadamard matrix before they are quantized, and
queries by the same matrix (q.k is unchanged): a key's few outlier channels are spread over the whole
head, so they no longer set the per-token scale of 4- and 2-bit groups. Values are quantized as they are.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

KV_QUANT_KINDS = ("int8", "fp8", "int4", "int2")
_PACKED_BITS = {"int4": 4, "int2": 2}
_SYMMETRIC_MAX = {"int8": 127.0, "fp8": 448.0}  # fp8: float8_e4m3fn's largest finite value


def check_kv_quant(kind: str, group: int, head_dim: int) -> None:
    """ValueError unless `kind` / `group` can quantize a head of `head_dim` elements."""
    if kind not in KV_QUANT_KINDS:
        raise ValueError(f"kv_quant must be one of {KV_QUANT_KINDS}, got {kind!r}")
    if not isinstance(group, numbers.Integral) or group < 1:
        raise ValueError(f"kv_quant_group must be a positive int, got {group!r}")
    if head_dim % group:
        raise ValueError(f"kv_quant_group {group} must divide head_dim {head_dim}")
    per_byte = codes_per_byte(kind)
    if head_dim % per_byte:
        raise ValueError(
            f"kv_quant {kind!r} packs {per_byte} codes a byte: head_dim {head_dim} must be a multiple"
        )


class KVScales(NamedTuple):
    """A quantized buffer's per-slot float32 side data, [B, Hkv, C, ...]: the scales and zero points,
    [B, Hkv, C, D / group] each (the zero points None for the symmetric kinds, int8 and fp8; the group
    is D / the scales' last dimension), and v_norm [B, Hkv, C, 1], ||v||_1 of each slot's dequantized
    value (`value_norms`). The importance needs that norm for every slot at every step, and it changes
    only when the slot is written: stored beside the scales, the Triton kernel reads 4 bytes a slot
    instead of dequantizing every value in float32 and summing it."""

    k_scale: Any
    k_zero: Any
    v_scale: Any
    v_zero: Any
    v_norm: Any


def check_kv_scales(scales, kind: str, slots_shape: tuple, head_dim: int) -> int:
    """ValueError unless `scales` is a KVScales for `kind` over slots_shape [B, Hkv, C]; returns the group."""
    if not isinstance(scales, KVScales):
        raise ValueError(f"kv_quant={kind!r} needs kv_scales=KVScales(...), got {type(scales).__name__}")
    width = getattr(scales.k_scale, "shape", (0,))[-1]
    if not width or head_dim % width:
        raise ValueError(f"kv_scales.k_scale's last dimension ({width}) must divide head_dim {head_dim}")
    group = head_dim // width
    check_kv_quant(kind, group, head_dim)
    zeros = ("k_zero", "v_zero")
    for name, x in scales._asdict().items():
        absent = name in zeros and not has_zero_point(kind)
        if (x is None) != absent:
            raise ValueError(
                f"kv_scales.{name} must be {'None' if absent else 'given'} for kv_quant={kind!r}"
            )
        want = tuple(slots_shape) + ((1,) if name == "v_norm" else (width,))
        if x is not None and (tuple(x.shape) != want or x.dtype != jnp.float32):
            raise ValueError(f"kv_scales.{name} must be float32 {list(want)}, got {x.dtype} {list(x.shape)}")
    return group


def codes_per_byte(kind: str) -> int:
    return 8 // _PACKED_BITS.get(kind, 8)


VALUE_NORM_BYTES = 4  # KVScales.v_norm: one float32 a slot and KV head


def slot_bytes(head_dim: int, itemsize: int, kind: str | None = None, group: int = 32) -> int:
    """Bytes of one slot's K and V for one KV head: 2 * head_dim elements of `itemsize` bytes, or with
    `kind` the packed payloads, their float32 scales (and zero points for int4 / int2) and the value's
    float32 norm (KVScales)."""
    if kind is None:
        return 2 * head_dim * itemsize
    per_row = head_dim // codes_per_byte(kind) + (2 if has_zero_point(kind) else 1) * 4 * (head_dim // group)
    return 2 * per_row + VALUE_NORM_BYTES


def payload_dtype(kind: str):
    return {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}.get(kind, jnp.uint8)


def has_zero_point(kind: str) -> bool:
    return kind in _PACKED_BITS


def hadamard_matrix(head_dim: int) -> np.ndarray:
    """[D, D] float32, orthogonal and symmetric: the normalized Sylvester Hadamard matrix when head_dim is
    a power of two; otherwise block diagonal, with the largest power-of-two block that divides head_dim."""
    block = head_dim & -head_dim
    h = np.ones((1, 1))
    while h.shape[0] < block:
        h = np.block([[h, h], [h, -h]])
    return np.kron(np.eye(head_dim // block), h / np.sqrt(block)).astype(np.float32)


def hadamard_rotate(x):
    """x [..., D] times the Hadamard matrix, in float32 (applied twice it is the identity)."""
    h = jnp.asarray(hadamard_matrix(x.shape[-1]))
    return jnp.matmul(x.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST)


def _pack(codes, bits: int):
    """codes [..., D] uint8 < 2^bits -> [..., D * bits / 8] uint8, in planes (module docstring)."""
    per_byte = 8 // bits
    planes = codes.reshape(*codes.shape[:-1], per_byte, codes.shape[-1] // per_byte)
    packed = planes[..., 0, :]
    for i in range(1, per_byte):
        packed = packed | (planes[..., i, :] << (i * bits))
    return packed


def _unpack(payload, bits: int):
    per_byte = 8 // bits
    shifts = jnp.arange(per_byte, dtype=jnp.uint8)[:, None] * bits
    planes = (payload[..., None, :] >> shifts) & ((1 << bits) - 1)
    return planes.reshape(*payload.shape[:-1], -1)


def quantize(x, kind: str, group: int):
    """Quantize x [..., D] per row in groups of `group` along D.

    Returns (payload [..., D / codes_per_byte(kind)] of payload_dtype(kind), scale [..., D / group] f32,
    zero [..., D / group] f32 for int4 / int2, None otherwise).
    """
    head_dim = x.shape[-1]
    check_kv_quant(kind, group, head_dim)
    grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], head_dim // group, group)
    if kind in _SYMMETRIC_MAX:
        limit = _SYMMETRIC_MAX[kind]
        scale = jnp.max(jnp.abs(grouped), axis=-1, keepdims=True) * np.float32(1.0 / limit)
        scaled = jnp.clip(grouped / jnp.where(scale > 0, scale, 1.0), -limit, limit)
        payload = (jnp.round(scaled) if kind == "int8" else scaled).astype(payload_dtype(kind))
        return payload.reshape(x.shape), scale[..., 0], None
    bits = _PACKED_BITS[kind]
    levels = float(2**bits - 1)
    zero = jnp.min(grouped, axis=-1, keepdims=True)
    scale = (jnp.max(grouped, axis=-1, keepdims=True) - zero) * np.float32(1.0 / levels)
    codes = jnp.clip(jnp.round((grouped - zero) / jnp.where(scale > 0, scale, 1.0)), 0.0, levels)
    return _pack(codes.astype(jnp.uint8).reshape(x.shape), bits), scale[..., 0], zero[..., 0]


def quantize_kv(k, v, kind: str, group: int):
    """Keys and values [..., D] as a quantized buffer stores them: (k payload, v payload, KVScales), each
    side data [..., D / group] (v_norm [..., 1]). Keys are taken as given: the caller rotates them."""
    k_payload, k_scale, k_zero = quantize(k, kind, group)
    v_payload, v_scale, v_zero = quantize(v, kind, group)
    v_norm = value_norms(v_payload, v_scale, v_zero, kind, group)
    return k_payload, v_payload, KVScales(k_scale, k_zero, v_scale, v_zero, v_norm)


def value_norms(payload, scale, zero, kind: str, group: int):
    """||v||_1 of quantized values [..., D] as `dequantize` gives them: [..., 1] float32 (KVScales.v_norm)."""
    return jnp.sum(jnp.abs(dequantize(payload, scale, zero, kind, group)), axis=-1, keepdims=True)


def dequantize(payload, scale, zero, kind: str, group: int):
    """`quantize`'s inverse up to rounding: [..., D] float32."""
    codes = _unpack(payload, _PACKED_BITS[kind]) if kind in _PACKED_BITS else payload
    grouped = codes.astype(jnp.float32).reshape(*scale.shape, group) * scale[..., None]
    if zero is not None:
        grouped = grouped + zero[..., None]
    return grouped.reshape(*codes.shape)
