"""scripts/bench_kernels.py's harness on CPU: the chained program, the timing, the correctness gate, the
stateful Triton column, the bandwidth ceiling's choice, and a whole run writing its table (the numbers mean
nothing on CPU)."""

from __future__ import annotations

import functools
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import bench_kernels as bk  # noqa: E402

from cuda_triton_bridge.config import LaunchConfig  # noqa: E402


def test_chain_feeds_each_output_into_the_next_call_and_rotates_the_sets():
    sets = [(jnp.zeros(2), jnp.full(2, float(i)), None, None) for i in range(3)]
    # Each call adds its set's k to q: the chain's output is the sum over the rotated sets.
    program, n_calls = bk.chain_program(lambda q, k, v, valid: (q + k, k[0]), sets, min_calls=7)
    assert n_calls == 7
    out, evicts = program(sets[0][0], sets)
    np.testing.assert_array_equal(np.asarray(out), [sum(i % 3 for i in range(7))] * 2)
    assert [float(e) for e in evicts] == [i % 3 for i in range(7)]
    # Never fewer calls than sets, so every set is read.
    assert bk.chain_program(lambda q, *a: (q, q), sets * 20, min_calls=7)[1] == 60


def test_chain_in_a_loop_runs_every_call_and_returns_the_last_iteration():
    sets = [(jnp.zeros(2), jnp.full(2, float(i)), None, None) for i in range(3)]
    program, n_calls = bk.chain_program(lambda q, k, v, valid: (q + k, q[0]), sets, min_calls=5, loops=4)
    assert n_calls == 20
    out, evicts = program(sets[0][0], sets)
    # 20 calls in all: each loop adds the five rotated sets' k (0, 1, 2, 0, 1) to q.
    np.testing.assert_array_equal(np.asarray(out), [4 * 4] * 2)
    # The evicts are the last iteration's: q before each of its calls (12, 12, 13, 15, 15).
    assert [float(e) for e in evicts] == [12, 12, 13, 15, 15]


@pytest.mark.parametrize("name", ["xla_longflow", "xla_longflow_int4"])
def test_chain_leaves_no_kv_work_outside_the_timed_loop(name):
    # The sets repeat over the calls and the loop: without a barrier tying each call's K/V to its q, XLA
    # converted every set's K and V to f32 (and took ||v||_1, unpacked int4) once, before the loop, and
    # the column was timed without that work (1.8-2x too fast on CPU).
    batch, slots = 1, 64
    sets = bk.make_sets(batch, slots, 2, kv_quant=bk.column_kind(name))
    program, _ = bk.chain_program(bk.columns(bk.HEAD_DIM**-0.5)[name], sets, min_calls=4, loops=2)
    hlo = program.lower(sets[0][0], sets).compile().as_text()
    entry = hlo[hlo.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    assert "while(" in entry
    # Nothing computed from K/V before the loop: no f32 [B, Hkv, C, ...] made in the entry computation
    # (the dequantized or converted K/V, their norms).
    made = re.findall(rf"= f32\[{batch},{bk.NUM_KV_HEADS},{slots}[,\]][^\n]*", entry)
    assert not [line for line in made if "parameter(" not in line], made


def test_stateful_column_threads_its_state_through_the_chain_and_the_loop():
    sets = [(jnp.zeros(2), jnp.full(2, 1.0), None, None)]
    # The state counts the calls; each call adds the count so far to q.
    column = bk.StatefulColumn(
        call=lambda q, k, v, valid, kernel_state: (q + kernel_state, kernel_state, kernel_state + 1),
        init_state=lambda q, k: jnp.zeros((), jnp.float32),
    )
    out, evict = column(*sets[0])  # one call from a fresh state
    assert float(evict) == 0 and np.asarray(out).tolist() == [0, 0]
    program, n_calls = bk.chain_program(column, sets, min_calls=3, loops=2)
    out, evicts = program(sets[0][0], sets)
    assert n_calls == 6 and np.asarray(out).tolist() == [sum(range(6))] * 2
    assert [float(e) for e in evicts] == [3, 4, 5]


def test_triton_columns_thread_one_kernel_state_as_generate_does():
    """A fake entry point with the bridge's signature stands in for the Triton kernel."""
    seen = []

    def entry(
        q,
        k,
        v,
        kv_valid,
        *,
        scale,
        granularity,
        kernel_state,
        compute_evict=True,
        kv_quant=None,
        kv_scales=None,
        launch=None,
    ):
        seen.append((scale, granularity, compute_evict, kernel_state.shape) + ((launch,) if launch else ()))
        assert (kv_quant is None) == (kv_scales is None)
        evict = jnp.full(q.shape[0], 0 if compute_evict else -1, jnp.int32)
        return q + 1 + (kv_scales.k_scale.sum() if kv_quant else 0), evict, kernel_state + 1

    init_kernel_state = lambda batch, num_kv_heads: jnp.zeros((batch, num_kv_heads), jnp.int32)
    launches = [bk.parse_launch("triton_int4:block_c=32,epilogue=fused,xla_launch=false")]
    cols = bk.columns(0.5, triton=(entry, init_kernel_state), launches=launches)
    launched = "triton_int4[block_c=32,epilogue=fused,xla_launch=False]"
    assert list(cols) == list(bk.COLUMNS) + [launched] and bk.column_kind(launched) == "int4"
    sets = [(jnp.zeros((2, 3)), jnp.zeros((2, 4, 5, 3)), None, None)]
    out, evicts = bk.chain_program(cols["triton"], sets, min_calls=3)[0](sets[0][0], sets)
    assert np.asarray(out).tolist() == [[3] * 3] * 2 and len(evicts) == 3
    assert seen == [(0.5, "sequence", True, (2, 4))] * 3  # the state is made once, (B, Hkv), and threaded
    seen.clear()
    assert np.asarray(cols["triton_noevict"](*sets[0])[1]).tolist() == [-1, -1]
    assert seen == [(0.5, "sequence", False, (2, 4))]
    # A quantized column passes its set's scales and kind, and threads the state the same way.
    seen.clear()
    ones = jnp.ones((2, 4, 5, 1))
    quantized = [
        (
            jnp.zeros((2, 3)),
            jnp.zeros((2, 4, 5, 3)),
            None,
            None,
            bk.quant.KVScales(ones, ones, ones, ones, ones),
        )
    ]
    out, _ = bk.chain_program(cols["triton_int4"], quantized, min_calls=2)[0](quantized[0][0], quantized)
    assert np.asarray(out).tolist() == [[2 * (1 + 40)] * 3] * 2
    assert seen == [(0.5, "sequence", True, (2, 4))] * 2
    # A --launch column is the same call with its LaunchConfig.
    seen.clear()
    cols[launched](*quantized[0])
    want = LaunchConfig(block_c=32, epilogue="fused", xla_launch=False)
    assert seen == [(0.5, "sequence", True, (2, 4), want)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("xla_attn:block_c=32", "a triton column"),
        ("triton", "a triton column"),
        ("triton:blocks=32", "FIELD one of"),
        ("triton:block_c", "FIELD one of"),
    ],
)
def test_bad_launch_columns_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        bk.parse_launch(text)


def test_triton_columns_are_omitted_without_the_bridge():
    assert list(bk.columns(0.5)) == [n for n in bk.COLUMNS if not n.startswith("triton")]
    bridge, why = bk.load_triton_bridge()  # no CUDA device here
    assert bridge is None and why


@pytest.mark.parametrize("queued", [0, 1, 3])
def test_time_interleaved_runs_queued_executions_per_sync(queued):
    calls = {"a": 0, "b": 0}

    def run(name):
        calls[name] += 1
        return jnp.ones(1)

    reps = 4
    result = bk.time_interleaved({n: (functools.partial(run, n), 8) for n in calls}, reps, queued=queued)
    # Two warm-ups each, then Q executions per repetition.
    assert calls == {n: 2 + reps * max(queued, 1) for n in calls}
    for median, (lo, hi) in result.values():
        assert 0 < lo <= median <= hi


def test_check_column_accepts_the_reference_and_rejects_a_wrong_slot_or_output():
    scale = bk.HEAD_DIM**-0.5
    inputs = bk.make_sets(2, 64, 1)[0]
    reference = bk.columns(scale)["xla_longflow"]
    assert bk.check_column("xla_longflow", reference, inputs, scale) == "out rel 0.0e+00, evict equal"

    def wrong_slot(*args):
        out, evict = reference(*args)
        return out, (evict + 1) % 64

    with pytest.raises(AssertionError, match="importance gap"):
        bk.check_column("wrong_slot", wrong_slot, inputs, scale)
    with pytest.raises(AssertionError, match="out rel err"):
        bk.check_column("wrong_out", lambda *a: (-reference(*a)[0], None), inputs, scale)
    with pytest.raises(AssertionError, match="should be all -1"):
        bk.check_column("wrong_noevict", reference, inputs, scale)
    # A --launch column of a no-evict kernel is one too (it failed its check as a scoring column).
    no_scoring = lambda *a: (reference(*a)[0], jnp.full((2,), -1, jnp.int32))
    assert bk.check_column("triton_noevict[block_c=32]", no_scoring, inputs, scale).endswith("evict -1")
    noevict = functools.partial(bk.xla_attention, scale=scale)
    assert bk.check_column("xla_attn", noevict, inputs, scale).startswith("out rel")


@pytest.mark.parametrize("kind", [None, "int8", "int4", "fp8", "int2"])
def test_kv_bytes_are_what_a_set_holds(kind):
    # The bytes a column's TB/s counts: the K and V buffers of its sets, payloads + scales + zero points
    # + value norms.
    q, *buffers = bk.make_sets(2, 64, 1, kv_quant=kind)[0]
    held = sum(x.nbytes for x in jax.tree_util.tree_leaves(buffers) if x.dtype != jnp.bool_)
    assert bk.kv_bytes(2, 64, kind) == held
    # Per slot and KV head at D 128, group 32: bf16 512 bytes; int8 2 x (128 + 16) + 4; int4
    # 2 x (64 + 32) + 4.
    assert bk.kv_bytes(1, 1, kind) // bk.NUM_KV_HEADS == {None: 512, "int8": 292, "fp8": 292, "int4": 196,
                                                          "int2": 132}[kind]  # fmt: skip


@pytest.mark.parametrize("group", [64, 128])
def test_a_coarser_group_holds_and_counts_fewer_scale_bytes(group):
    # --group: the sets are quantized at that group, and kv_bytes counts what they hold (int4 at D 128:
    # 2 x (64 + 2 x 4 x 128 / group) + 4 a slot and KV head).
    q, *buffers = bk.make_sets(2, 64, 1, kv_quant="int4", group=group)[0]
    held = sum(x.nbytes for x in jax.tree_util.tree_leaves(buffers) if x.dtype != jnp.bool_)
    assert bk.kv_bytes(2, 64, "int4", group) == held
    assert held // (2 * 64 * bk.NUM_KV_HEADS) == 2 * (64 + 8 * 128 // group) + 4
    assert buffers[-1].k_scale.shape[-1] == 128 // group


def test_check_column_checks_a_quantized_column_against_the_quantized_reference():
    scale = bk.HEAD_DIM**-0.5
    inputs = bk.make_sets(2, 64, 1, kv_quant="int4")[0]
    reference = bk.columns(scale)["xla_longflow_int4"]
    assert bk.check_column("xla_longflow_int4", reference, inputs, scale) == "out rel 0.0e+00, evict equal"

    def wrong_slot(*args):
        out, evict = reference(*args)
        return out, (evict + 1) % 64

    with pytest.raises(AssertionError, match="importance gap"):
        bk.check_column("pallas_int4", wrong_slot, inputs, scale)
    # The float reference on the dequantized values is the same computation.
    q, k, v, valid, scales = inputs
    k, v = bk.reference.dequantized_kv(k, v, "int4", scales)
    float_ref = bk.columns(scale)["xla_longflow"]
    assert bk.check_column("xla_longflow", float_ref, (q, k, v, valid), scale).endswith("evict equal")


def test_the_ceiling_falls_back_to_the_jnp_copy_only_without_triton_or_torch_cuda():
    assert list(bk.ceiling_measurers(triton_ok=False, torch_cuda_ok=False)) == ["jnp copy"]
    assert list(bk.ceiling_measurers(triton_ok=True, torch_cuda_ok=False)) == ["triton read kernel"]
    both = bk.ceiling_measurers(triton_ok=True, torch_cuda_ok=True)
    assert list(both) == ["triton read kernel", "torch copy_"]
    assert list(bk.ceiling_measurers(triton_ok=False, torch_cuda_ok=True)) == ["torch copy_"]
    assert bk.load_triton_bridge()[0] is None and not bk.can_run_torch_cuda()  # CPU: neither runs here


def test_the_ceiling_is_the_fastest_copy_and_skips_one_that_fails():
    def broken(nbytes):
        raise RuntimeError("no such device")

    logged = []
    measurers = {"slow": lambda n: 3e12, "fast": lambda n: 4e12, "broken": broken}
    ceiling = bk.measure_ceiling(measurers, 1 << 20, logged.append)
    assert ceiling == bk.Ceiling(4e12, "fast") and ceiling.note == "fast"
    assert any("broken FAILED RuntimeError" in line for line in logged)
    # Nothing measured: the jnp copy stands in, and its note says it under-measures.
    jnp_ceiling = bk.measure_ceiling({"broken": broken}, 1 << 20, logged.append)
    assert jnp_ceiling.method == "jnp copy" and jnp_ceiling.bytes_per_s > 0
    assert "under-measures" in jnp_ceiling.note


def test_table_reports_every_column_against_the_ceiling():
    ceiling = bk.Ceiling(4e12, "torch copy_")
    nbytes = bk.kv_bytes(1, 2048)
    row = dict(batch=1, slots=2048, pallas=nbytes / 2e12, pallas_noevict=nbytes / 2.5e12)
    table = bk.format_table("device: x", ceiling, [row], ["pallas", "pallas_noevict", "triton"])
    assert "bandwidth ceiling 4.00 TB/s (torch copy_)" in table
    (line,) = [x for x in table.splitlines() if x.startswith("| 1 | 2048 |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3] == f"{nbytes / 4e12 * 1e6:.1f}"  # the bytes floor at the ceiling
    timed = [f"{nbytes / 2e6:.1f} (2.00, 50%)", f"{nbytes / 2.5e6:.1f} (2.50, 62%)"]
    assert cells[4:] == timed + ["n/a", "25.0%", "n/a"]  # triton absent: n/a, and so its overhead


def test_table_rates_a_quantized_column_by_the_bytes_it_reads():
    ceiling = bk.Ceiling(4e12, "torch copy_")
    int4 = bk.kv_bytes(16, 2048, "int4")
    row = dict(batch=16, slots=2048, triton=bk.kv_bytes(16, 2048) / 2e12, triton_int4=int4 / 3e12)
    table = bk.format_table("device: x", ceiling, [row], ["triton", "triton_int4"])
    header = [x for x in table.splitlines() if x.startswith("| B |")][0]
    assert [c.strip() for c in header.strip("|").split("|")][4:7] == ["int4 MB", "triton", "triton_int4"]
    (line,) = [x for x in table.splitlines() if x.startswith("| 16 | 2048 |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4] == f"{int4 / 1e6:.0f}"
    assert cells[5].endswith("(2.00, 50%)") and cells[6] == f"{int4 / 3e6:.1f} (3.00, 75%)"
    # The stored value norms (4 bytes a slot and KV head) count for the Triton kernel, which reads them;
    # the Pallas kernel and the reference sum their own.
    norms = 16 * bk.NUM_KV_HEADS * 2048 * 4
    assert bk.column_bytes("pallas_int4", 16, 2048) == bk.column_bytes("xla_longflow_int4", 16, 2048)
    assert bk.column_bytes("triton_int4[num_warps=1]", 16, 2048) == int4
    assert bk.column_bytes("pallas_int4", 16, 2048) == int4 - norms
    assert bk.column_bytes("pallas", 16, 2048) == bk.kv_bytes(16, 2048)


@pytest.mark.parametrize("queued, interleave", [(0, False), (2, True)])
def test_main_writes_a_table_with_the_timing_mode(tmp_path, capsys, queued, interleave):
    out = tmp_path / "table.md"
    loops = 2 if queued else 1
    argv = ["--sizes", "1x64", "--columns", "xla_attn,xla_longflow,pallas_noevict", "--reps", "2"]
    argv += ["--copy-mb", "8", "--queued", str(queued), "--out", str(out), "--loops", str(loops)]
    bk.main(argv + ["--interleave"] * interleave)
    assert "triton columns omitted" in capsys.readouterr().out
    text = out.read_text()
    assert ("throughput, 2 executions queued per sync" if queued else "timing: latency") in text
    assert ("columns interleaved" in text) == interleave
    assert ("the chain run 2 times in a fori_loop" in text) == (loops == 2)
    # The ceiling comes from a child process; on CPU only the jnp copy runs, and the table says so.
    assert "bandwidth ceiling" in text and "(a jnp copy: neither Triton nor torch with CUDA runs here" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| 1 | 64 |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 4 + 3 + 2  # size, MB, floor; the three columns; the two overheads
    assert all(float(c.split(" ")[0]) > 0 and c.endswith("%)") for c in cells[4:7])
    with pytest.raises(SystemExit, match="unknown or unavailable columns"):
        bk.main(["--sizes", "1x64", "--columns", "triton", "--copy-mb", "8"])


@pytest.mark.parametrize("group, why", [(0, "must be a positive int"), (48, "must divide head_dim 128")])
def test_main_rejects_a_group_the_head_cannot_take(capsys, group, why):
    # Before any ceiling or column runs: the usage error names the value.
    with pytest.raises(SystemExit):
        bk.main(["--sizes", "1x64", "--group", str(group), "--copy-mb", "8"])
    err = capsys.readouterr().err
    assert f"kv_quant_group {group}" in err or f"got {group}" in err
    assert why in err


def test_main_times_a_quantized_column_on_its_own_sets(tmp_path):
    out = tmp_path / "table.md"
    argv = ["--sizes", "1x64", "--columns", "xla_longflow,xla_longflow_int8", "--reps", "1", "--loops", "1"]
    bk.main(argv + ["--copy-mb", "8", "--out", str(out)])
    (row,) = [line for line in out.read_text().splitlines() if line.startswith("| 1 | 64 |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == f"{bk.kv_bytes(1, 64, 'int8') / 1e6:.0f}"  # the int8 MB column
    assert all(float(c.split(" ")[0]) > 0 and c.endswith("%)") for c in cells[5:7])
