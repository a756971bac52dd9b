"""scripts/kernel_drift.py on CPU: the stored-bytes comparison, and a run through the Pallas kernel
(interpret mode), which follows the reference step for step."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import kernel_drift  # noqa: E402


def test_stored_byte_differences_counts_the_bytes_per_layer_and_buffer():
    k = np.zeros((2, 3), np.float32)
    moved = k.copy()
    moved[1, 2] = np.nextafter(np.float32(0), np.float32(1))  # one float: its lowest byte differs
    codes = np.arange(6, dtype=np.int8).reshape(2, 3)
    layer = lambda k, v: SimpleNamespace(k=k, v=v)
    a = SimpleNamespace(layers=[layer(k, codes), layer(k, codes)])
    b = SimpleNamespace(layers=[layer(k, codes), layer(moved, -codes)])
    # -codes differs from codes wherever a code is not 0: 5 bytes.
    assert kernel_drift.stored_byte_differences(a, b) == {(1, "k"): 1, (1, "v"): 5}
    assert kernel_drift.stored_byte_differences(a, a) == {}


def test_pallas_follows_the_reference_step_for_step_at_fp8():
    (r,) = kernel_drift.main(
        ["--impl", "pallas", "--kv-quant", "fp8", "--granularity", "kv_head", "--seeds", "1", "--steps", "6"]
    )
    assert r["generate_equal"]
    assert r["first_argmax"] is None and r["first_evict"] is None and r["stored"] == {}
    assert r["max_dlogits"] < 1e-4
