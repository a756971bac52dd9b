"""scripts/bench_thinkv_layer.py on CPU (the Pallas kernel, interpreted): its columns agree with the jnp
reference on full ThinKV buffers, a wrong column is caught, and the step model's arithmetic."""

from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import bench_thinkv_layer as btl  # noqa: E402

from longflow_jax.config import CompressionConfig, ThinKVConfig  # noqa: E402


def test_columns_match_the_reference_on_full_buffers():
    comp = CompressionConfig(policy="thinkv", budget=16, kv_quant_group=32, thinkv=ThinKVConfig())
    cols = btl.make_columns("pallas", 1, comp, 8, 256, 1)
    assert set(cols) == set(btl.COLUMNS)
    ((q, layer),) = cols["thinkv_kernel"][1]
    # The main buffer (prompt + one 128-token window) and two tiers (int4, int2) of the budget's slots,
    # all but one slot of each full; the one-call buffer holds as many slots.
    assert sorted(t.kv_quant for t in layer.thinkv.tiers) == ["int2", "int4"]
    assert btl.slots_of(layer) == 8 + 128 + 2 * 16 == cols["one_call_int4"][1][0][1].shape[2]
    assert int(jnp.sum(layer.slot_pos >= 0)) == 8 + 128 - 1
    assert cols["thinkv_lstar"][1][0][1].thinkv.sparsity_sum is not None and layer.thinkv.sparsity_sum is None
    scale = btl.bk.HEAD_DIM**-0.5
    for name, (fn, sets) in cols.items():
        assert btl.check(name, fn, sets[0], scale) < 2e-2
    broken = lambda q, layer: (jnp.zeros_like(q), None)  # noqa: E731
    with pytest.raises(AssertionError, match="rel err"):
        btl.check("thinkv_kernel", broken, (q, layer), scale)
    # The L* layer's sparsity on the kernels (from the logits) is the jnp path's (from the
    # probabilities); a wrong one is caught.
    fn, ((q, inside),) = cols["thinkv_lstar"]
    assert 0 < float(fn(q, inside)[1][0]) < 1
    no_sparsity = lambda q, layer: (fn(q, layer)[0], jnp.zeros(q.shape[:1]))  # noqa: E731
    with pytest.raises(AssertionError, match="sparsity off"):
        btl.check("thinkv_lstar", no_sparsity, (q, inside), scale)


def test_step_model_weighs_the_layer_kinds():
    seconds = dict(thinkv_kernel=3e-4, thinkv_lstar=9e-4, longflow=2e-4)
    got = btl.step_model(seconds, layers=36, lstar=4, batch=100)
    assert got["thinkv_ms_per_row"] == pytest.approx(1e3 * (32 * 3e-4 + 4 * 9e-4) / 100)
    assert got["longflow_ms_per_row"] == pytest.approx(1e3 * 36 * 2e-4 / 100)
    assert got["lstar_share"] == pytest.approx(4 * 9e-4 / (32 * 3e-4 + 4 * 9e-4))
    assert "thinkv_lstar_jnp_ms_per_row" not in got
    got = btl.step_model(dict(seconds, lstar_jnp=4e-3), layers=36, lstar=4, batch=100)
    assert got["thinkv_lstar_jnp_ms_per_row"] == pytest.approx(1e3 * (32 * 3e-4 + 4 * 4e-3) / 100)
