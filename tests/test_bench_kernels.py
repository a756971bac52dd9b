"""scripts/bench_kernels.py's harness on CPU: the chained program, the two timings, the correctness gate,
and a whole run writing its table (the numbers mean nothing on CPU; the GPU runs are in BENCHMARKS.md)."""

from __future__ import annotations

import functools
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import bench_kernels as bk  # noqa: E402


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


def test_stateful_column_threads_its_state_through_the_chain_and_the_loop():
    sets = [(jnp.zeros(2), jnp.full(2, 1.0), None, None)]
    # The state counts the calls; each call adds the count so far to q.
    column = bk.Stateful(
        fn=lambda q, k, v, valid, n: (q + n, n, n + 1), init=lambda q: jnp.zeros((), jnp.float32)
    )
    out, evict = column(*sets[0])  # one call from a fresh state
    assert float(evict) == 0 and np.asarray(out).tolist() == [0, 0]
    program, n_calls = bk.chain_program(column, sets, min_calls=3, loops=2)
    out, evicts = program(sets[0][0], sets)
    assert n_calls == 6 and np.asarray(out).tolist() == [sum(range(6))] * 2
    assert [float(e) for e in evicts] == [3, 4, 5]


def test_with_tickets_threads_the_bridges_ticket_buffer():
    seen = []

    def kernel(q, k, v, valid, *, tickets):  # stands in for the Triton entry point
        seen.append(tickets.shape)
        return q + 1, jnp.zeros(q.shape[0], jnp.int32), tickets + 1

    column = bk._with_tickets(kernel)
    sets = [(jnp.zeros((2, 3)), None, None, None)]
    out, evicts = bk.chain_program(column, sets, min_calls=3)[0](sets[0][0], sets)
    assert np.asarray(out).tolist() == [[3] * 3] * 2 and len(evicts) == 3
    assert seen == [(2, 2 * bk.NUM_KV_HEADS)] * 3  # cuda_triton_bridge.ticket_shape(B, Hkv), made once


@pytest.mark.parametrize("queued", [0, 1, 3])
def test_time_program_runs_queued_executions_per_sync(queued):
    calls = []

    def program(q, sets):
        calls.append(q)
        return q

    reps = 4
    median, (lo, hi) = bk.time_program(program, 8, [(jnp.ones(1),)], reps, queued=queued)
    assert len(calls) == 2 + reps * max(queued, 1)  # two warm-ups, then Q executions per repetition
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
    noevict = functools.partial(bk.xla_attention, scale=scale)
    assert bk.check_column("xla_attn", noevict, inputs, scale).startswith("out rel")


def test_interleave_entry_checks_the_column_then_chains_it():
    scale = bk.HEAD_DIM**-0.5
    sets = bk.make_sets(2, 64, 2)
    reference = bk.columns(scale)["xla_longflow"]
    summary, (run, n_calls) = bk.interleave_entry("xla_longflow", reference, sets, scale, compile_now=True)
    assert summary == "out rel 0.0e+00, evict equal"
    assert n_calls == bk.MIN_CALLS_PER_PROGRAM
    q_last, evicts = run()
    assert len(evicts) == n_calls and q_last.shape == sets[0][0].shape
    with pytest.raises(AssertionError, match="out rel err"):  # a wrong column never reaches the timing
        bk.interleave_entry("wrong_out", lambda *a: (-reference(*a)[0], None), sets, scale)


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("queued", [0, 2])
def test_main_writes_a_table_with_the_timing_mode(tmp_path, queued, interleave):
    out = tmp_path / "table.md"
    loops = 2 if interleave and queued else 1  # the fori_loop form in one of the four runs
    argv = ["--sizes", "1x64", "--columns", "xla_attn,xla_longflow", "--reps", "2", "--copy-mb", "8"]
    argv += ["--matmul-n", "64", "--queued", str(queued), "--out", str(out), "--loops", str(loops)]
    bk.main(argv + ["--interleave"] * interleave)
    text = out.read_text()
    assert ("throughput, 2 executions queued per sync" if queued else "timing: latency") in text
    assert ("columns interleaved" in text) == interleave
    assert ("the chain run 2 times in a fori_loop" in text) == (loops == 2)
    (row,) = [line for line in text.splitlines() if line.startswith("| 1 | 64 |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 5 + 2 + 4  # sizes and floors, the two columns, the four ratios
    assert all(float(c.split(" ")[0]) > 0 for c in cells[5:7])
