"""The decode kernels' contract: input layout, checks, and the empty-slot and tie rules.

Every decode kernel (pallas_kernels, cuda_triton_bridge) and the jnp reference (reference.py) take

  q         [B, Hq, D]          the current token's queries, post-RoPE
  k, v      [B, Hkv, C, D]      post-RoPE keys and values, one row per slot
  kv_valid  [B, C] bool         filled slots (the new token's slot included)
  kv_len    [B] int (optional)  slot c of row b takes part only if c < kv_len[b] as well

and return (out [B, Hq, D] in q's dtype, evict_slot int32 [B] ("sequence") or [B, Hkv] ("kv_head")).
Query head h reads KV head h // (Hq // Hkv) (Hugging Face `repeat_kv` order).

With `return_lse=True` they also return, last, lse [B, Hq] float32: the natural log of the softmax
denominator, log(sum over the slots that take part (kv_valid, and c < kv_len) of exp(scale * q . k_c)),
keys as the kernel reads them (dequantized with kv_quant), -inf for a row with no such slot (whose out is
0). Attention over several buffers is then the merge of each buffer's out weighted by softmax(lse) over
the buffers (a buffer with lse -inf weighs 0). It combines with any compute_evict and kv_quant, and on
the Pallas kernel with `return_importance` (out, importance, lse): lse needs only the softmax statistics.

With `kv_quant` the kernels multiply P by the values in q's dtype (the reference in float32): with
float16 q, every value the buffer holds must lie in float16's range (|v| <= 65504), as it does when q
and the cached values come from one float16 model; one value beyond it makes its row's out inf or NaN,
even from a masked slot.

Rules every kernel keeps:
  * invalid slots score EMPTY_SLOT_SCORE (-1), strictly below any valid slot's importance (>= 0), so
    empty slots are filled first even where a valid slot's probability underflows to 0;
  * the evict slot is the argmin of the importance, ties to the lowest slot index (`jnp.argmin`'s rule).

The importance is a sum over query heads, so a caller that splits the heads over devices (tensor
parallel) asks each for its heads' importance (`return_importance`), sums the shares and takes
`reference.evict_argmin` of the sum: every share scores an empty slot negative and a valid one >= 0, so
the sum keeps both rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import quant

GRANULARITIES = ("sequence", "kv_head")
EMPTY_SLOT_SCORE = -1.0
DEFAULT_NUM_SMS = 132  # H100 / H200 SXM; used when the device does not report its core count.


# Integer helpers and the core count, shared by both kernel packages' launch defaults.
def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_sms() -> int:
    """The default device's core count (SMs on a GPU), which the kernels' split defaults fill."""
    try:
        return int(getattr(jax.devices()[0], "core_count", 0) or DEFAULT_NUM_SMS)
    except Exception:  # no backend at all: only the defaults use this
        return DEFAULT_NUM_SMS


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def num_score_groups(num_kv_heads: int, granularity: str) -> int:
    """How many evict slots a sequence has per layer: 1, or one per KV head."""
    check_granularity(granularity)
    return 1 if granularity == "sequence" else num_kv_heads


def check_kv_len(kv_len, batch: int) -> None:
    """The kernels' optional filled-prefix bound: an integer array [B] (clamped to [0, C] by them)."""
    shape, dtype = getattr(kv_len, "shape", None), getattr(kv_len, "dtype", None)
    if shape != (batch,) or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"kv_len must be an integer array of shape [B] = ({batch},) (filled slots per row), got "
            + (f"{dtype} {shape}" if dtype is not None else type(kv_len).__name__)
        )


def check_decode_inputs(q, k, v, kv_valid, kv_quant=None, kv_scales=None) -> None:
    """Shape and dtype contract shared by the reference and every kernel entry point.

    With kv_quant (quant.KV_QUANT_KINDS), k and v are the packed payloads [B, Hkv, C, D / codes a byte]
    of quant.payload_dtype(kv_quant) and kv_scales a quant.KVScales of float32 [B, Hkv, C, D / group]
    arrays (zero points only for int4 / int2); q is then in the keys' (rotated) basis.
    """
    if q.ndim != 3 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"expected q [B, Hq, D] and k, v [B, Hkv, C, D]; got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    batch, num_q_heads, head_dim = q.shape
    if kv_quant is not None and kv_quant not in quant.KV_QUANT_KINDS:
        raise ValueError(f"kv_quant must be None or one of {quant.KV_QUANT_KINDS}, got {kv_quant!r}")
    if k.shape[1] < 1:
        raise ValueError(f"k and v need at least one KV head, got k {k.shape}")
    row = head_dim if kv_quant is None else head_dim // quant.codes_per_byte(kv_quant)
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != row:
        raise ValueError(f"k {k.shape} and v {v.shape} must both be [B={batch}, Hkv, C, {row}]")
    if num_q_heads % k.shape[1]:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({k.shape[1]})")
    if kv_valid.shape != (batch, k.shape[2]) or kv_valid.dtype != jnp.bool_:
        raise ValueError(
            f"kv_valid must be bool [B, C] = {(batch, k.shape[2])}, got {kv_valid.dtype} {kv_valid.shape}"
        )
    floats = (jnp.float32, jnp.bfloat16, jnp.float16)
    if kv_quant is None:
        if kv_scales is not None:
            raise ValueError("kv_scales given without kv_quant")
        if any(x.dtype not in floats for x in (q, k, v)):
            raise ValueError(f"q, k, v must be float32/bfloat16/float16, got {q.dtype}, {k.dtype}, {v.dtype}")
        return
    if q.dtype not in floats:
        raise ValueError(f"q must be float32/bfloat16/float16, got {q.dtype}")
    if k.dtype != quant.payload_dtype(kv_quant) or v.dtype != k.dtype:
        raise ValueError(
            f"kv_quant={kv_quant!r} needs {jnp.dtype(quant.payload_dtype(kv_quant))} payloads, "
            f"got k {k.dtype}, v {v.dtype}"
        )
    quant.check_kv_scales(kv_scales, kv_quant, k.shape[:3], head_dim)
