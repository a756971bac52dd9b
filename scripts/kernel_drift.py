r"""Where a kernel path's greedy decoding leaves the reference path's (tiny random model, float32).

Run free, `generate` through a kernel and through the reference can part even when each single step
agrees. This finds where and why: it decodes greedily through IMPL in a Python loop, and at every step
also runs the reference step from the same cache, comparing
  - the logits (largest |difference|, and whether the argmax differs),
  - each layer's next evict slot(s),
  - the K/V each path stored for the new token (the payloads' bytes; their scales differ in the last
    bits from layer 1 on, as the activations do): a quantizer may round a value the other way.
Per prompt set it prints the first step of each kind of difference, and whether `generate` through
IMPL gave the reference's tokens. Runs on CPU with the Pallas kernel (interpret mode) and on a GPU.
On an accelerator, the first step whose evict slots differ is replayed on the CPU from the same cache,
through the reference and the Pallas kernel: if they side with the accelerator's reference, the kernel
disagrees with three implementations (a kernel fault); if they side with the kernel, or split, the
scores of the two slots tie within float32 rounding and the path a run takes depends on summation order.

  python scripts/kernel_drift.py --impl triton --kv-quant fp8 --granularity kv_head --seeds 6

--impl triton-interpreter runs no drift: on the CPU, Triton's interpreter (the kernels' own code in
numpy) takes every kernel call of the reference's own run, and the first call whose evict slots differ
from the reference's is printed (needs triton and torch).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import longflow_jax as lf  # noqa: E402
from longflow_jax import attention, policies, sharding  # noqa: E402
from longflow_jax.attention import with_kernel_state  # noqa: E402
from longflow_jax.config import CompressionConfig  # noqa: E402
from longflow_jax.convert import convert  # noqa: E402
from longflow_jax.testing import make_tiny_hf_checkpoint, random_prompts  # noqa: E402
from pallas_kernels import reference  # noqa: E402

gen = importlib.import_module("longflow_jax.generate")


def stored_byte_differences(a, b) -> dict:
    """{(layer, "k" or "v"): bytes that differ} between two caches' K/V buffers (payloads with kv_quant)."""
    out = {}
    for i, (x, y) in enumerate(zip(a.layers, b.layers)):
        for name in ("k", "v"):
            n = int(
                np.sum(
                    np.asarray(getattr(x, name)).view(np.uint8) != np.asarray(getattr(y, name)).view(np.uint8)
                )
            )
            if n:
                out[i, name] = n
    return out


def evict_slots(cache) -> list[np.ndarray]:
    return [np.asarray(layer.evict_slot) for layer in cache.layers]


def replay_on_cpu(step, args, comp) -> dict:
    """The evict slots [per layer] of the reference and the Pallas step from the same inputs, on the CPU."""
    cpu = jax.devices("cpu")[0]
    params, config, cache, *arrays = args  # config is static
    # The Triton kernel's state (its tickets) is not the other paths' to take.
    cache = cache.replace(layers=[layer.replace(kernel_state=None) for layer in cache.layers])
    args = (jax.device_put(params, cpu), config, *jax.device_put([cache, *arrays], cpu))
    with jax.default_device(cpu):
        return {
            impl: evict_slots(step(*args, compression=comp, attention_impl=impl)[1])
            for impl in ("reference", "pallas")
        }


def importance_gap(step_args, comp, want_evict, got_evict) -> float | None:
    """The largest relative importance gap (imp[kernel's slot] - imp[reference's]) / |imp[reference's]|,
    by the reference step's own importance from step_args, over the layers, rows and groups whose evict
    slots differ; None where none differ. Near 1e-7 the two slots tie within float32 rounding; the
    tests' near-tie rule allows 1e-5."""
    recorded = []
    original = policies.longflow_importance

    def recording(*a):
        importance = original(*a)
        jax.debug.callback(lambda x: recorded.append(np.asarray(x)), importance, ordered=True)
        return importance

    policies.longflow_importance = recording
    try:  # a fresh jit, so the step is traced again with the recording importance
        step = jax.jit(
            functools.partial(gen.decode_step), static_argnames=("config", "compression", "attention_impl")
        )
        jax.block_until_ready(step(*step_args, compression=comp, attention_impl="reference"))
        jax.effects_barrier()
    finally:
        policies.longflow_importance = original
    gaps = []
    for importance, want, got in zip(recorded, want_evict, got_evict):
        want, got = (np.broadcast_to(x, importance.shape[:2])[..., None] for x in (want, got))
        chosen, minimum = (np.take_along_axis(importance, x, -1)[..., 0] for x in (got, want))
        differ = want[..., 0] != got[..., 0]
        gaps += list(((chosen - minimum) / np.abs(minimum))[differ])
    return float(max(gaps)) if gaps else None


def decode_start(params, config, comp, ids, lengths, steps, impl):
    """What a greedy run of `steps` steps decodes from: (the compression it runs, the prefilled cache
    with IMPL's kernel state, a jitted decode step, the first token)."""
    comp = gen.effective_compression(comp, ids.shape[1], steps)
    capacity = gen.buffer_capacity(comp, ids.shape[1], steps)
    cache, logits = gen.prefill(params, config, jnp.asarray(ids), jnp.asarray(lengths), comp, capacity)
    cache = gen.ready_to_decode(sharding.split_kv_heads(cache), comp, impl, steps)
    step = jax.jit(gen.decode_step, static_argnames=("config", "compression", "attention_impl"))
    return comp, cache, step, jnp.argmax(logits, -1).astype(jnp.int32)


def reference_evict(inputs, kw):
    """The jnp reference's evict slots for one kernel call's inputs (q, k, v, valid) and keywords."""
    ref_kw = {name: kw[name] for name in ("scale", "granularity", "kv_quant", "kv_scales") if name in kw}
    return np.asarray(reference.longflow_decode_attention_reference(*inputs[:4], **ref_kw)[1])


def kernel_calls(step_args, comp, impl) -> list[tuple]:
    """Each layer's kernel call of IMPL's step from step_args, run eagerly: [(args, kwargs, outputs)]."""
    calls, original = [], attention._kernel

    def recording_kernel(name):
        kernel = original(name)

        def call(*a, **kw):
            out = kernel(*a, **kw)
            calls.append((a, kw, out))
            return out

        return call

    attention._kernel = recording_kernel
    try:
        with jax.disable_jit():
            gen.decode_step(*step_args, compression=comp, attention_impl=impl)
    finally:
        attention._kernel = original
    return calls


def launch_sides(impl, inputs, kw, want) -> str:
    """For the Triton kernel: which launches (each epilogue, through jax-triton and XLA's own Triton
    call) give the reference's evict slots on these inputs: "; launches agreeing: ..., not: ..."."""
    if impl != "triton":
        return ""
    from cuda_triton_bridge import LaunchConfig
    from cuda_triton_bridge.config import EPILOGUES

    agree, disagree = [], []
    for epilogue in EPILOGUES:
        for xla_launch in (False, True):
            name = f"{epilogue}{'/xla' if xla_launch else ''}"
            try:
                launch = LaunchConfig(epilogue=epilogue, xla_launch=xla_launch)
                evict = attention._kernel(impl)(*inputs, launch=launch, **kw)[1]
            except Exception as e:  # a launch this shape cannot take
                disagree.append(f"{name} ({type(e).__name__})")
                continue
            (agree if np.array_equal(np.asarray(evict), want) else disagree).append(name)
    return f"; launches agreeing: {', '.join(agree) or 'none'}, not: {', '.join(disagree) or 'none'}"


def isolate(step_args, comp, impl, dump_dir=None) -> list[str]:
    """The step's kernel calls one by one against the jnp reference on the same inputs (q in the keys'
    basis, payloads, scales): per layer whose evict slots differ, a line with the kernel's and the
    reference's slots, the kernel's again without its kv_len bound, and kv_len against the valid slots
    (the kernel reads only below kv_len: filled slots must be a prefix). With dump_dir, each such call's
    inputs go to layer_N.npz there, a reproducer for a kernel test."""
    lines = []
    for i, (a, kw, out) in enumerate(kernel_calls(step_args, comp, impl)):
        q, k, v, valid = a[:4]
        want = reference_evict(a, kw)
        got = np.asarray(out[1])
        if np.array_equal(got, want):
            continue
        stateless = {name: x for name, x in kw.items() if name != "kernel_state"}
        unbounded = {name: x for name, x in stateless.items() if name != "kv_len"}
        no_len = np.asarray(attention._kernel(impl)(q, k, v, valid, **unbounded)[1])
        kv_len = np.asarray(kw.get("kv_len")) if kw.get("kv_len") is not None else None
        last_valid = [int(np.max(np.nonzero(row)[0], initial=-1)) + 1 for row in np.asarray(valid)]
        lines.append(
            f"layer {i}: kernel evict {got.tolist()}, reference {want.tolist()}, kernel without "
            f"kv_len {no_len.tolist()}; kv_len {None if kv_len is None else kv_len.tolist()}, one past the "
            f"last valid slot {last_valid}, valid slots {np.asarray(valid).sum(-1).tolist()}"
            + launch_sides(impl, (q, k, v, valid), stateless, want)
        )
        if dump_dir:
            scales = kw.get("kv_scales")
            arrays = dict(q=q, k=k, v=v, valid=valid, kernel_evict=got, reference_evict=want)
            if kv_len is not None:
                arrays["kv_len"] = kv_len
            if scales is not None:
                arrays.update({f"scale_{n}": x for n, x in scales._asdict().items() if x is not None})
            np.savez(
                os.path.join(dump_dir, f"layer_{i}.npz"),
                scale=kw["scale"],
                granularity=kw["granularity"],
                kv_quant=str(kw.get("kv_quant")),
                **{n: np.asarray(x) for n, x in arrays.items()},
            )
    return lines


def drift(params, config, comp, impl, ids, lengths, steps, dump_dir=None):
    """One prompt set: {"generate_equal", "first_argmax", "first_evict", "first_stored", "stored",
    "max_dlogits", "evict_gap", "cpu_sides_with", "fresh_state_sides_with", "first_state_left"}; a
    "first_*" is the step of the first difference of that kind, or None; "evict_gap" is that step's
    `importance_gap`; "cpu_sides_with" (on an accelerator, at first_evict) says per CPU path
    ("reference", "pallas") whether its evict slots equal the accelerator reference's ("reference"),
    IMPL's ("kernel") or neither; "fresh_state_sides_with" says the same of IMPL's step rerun at
    first_evict with a new kernel state (Triton's tickets; None for a path without one): the other
    checks start every step from a new state, a free run carries the state the last step returned;
    "first_state_left" is the first step whose returned kernel state is not all zero (every call must
    hand its tickets back at zero); "isolated" (on an accelerator, at first_evict) has `isolate`'s lines
    for that step (dump_dir: where it saves the differing calls' inputs)."""
    with jax.default_matmul_precision("highest"):
        run = functools.partial(
            lf.generate, params, config, ids, lengths, max_new_tokens=steps, compression=comp
        )
        want, got = np.asarray(run().tokens), np.asarray(run(attention_impl=impl).tokens)
        comp, cache, step, token = decode_start(params, config, comp, ids, lengths, steps, impl)
        found = dict(
            first_argmax=None,
            first_evict=None,
            first_stored=None,
            stored={},
            max_dlogits=0.0,
            evict_gap=None,
            cpu_sides_with={},
            fresh_state_sides_with=None,
            first_state_left=None,
            isolated=[],
        )
        for t in range(1, steps):
            positions = jnp.asarray(lengths) + t - 1
            args = (params, config, cache, token, positions, jax.random.key(0))
            want_logits, want_cache, _ = step(*args, compression=comp, attention_impl="reference")
            got_logits, got_cache, _ = step(*args, compression=comp, attention_impl=impl)
            found["max_dlogits"] = max(
                found["max_dlogits"], float(jnp.max(jnp.abs(want_logits - got_logits)))
            )
            if found["first_argmax"] is None and bool(
                jnp.any(jnp.argmax(want_logits, -1) != jnp.argmax(got_logits, -1))
            ):
                found["first_argmax"] = t
            want_evict, got_evict = evict_slots(want_cache), evict_slots(got_cache)
            states = [layer.kernel_state for layer in got_cache.layers if layer.kernel_state is not None]
            if found["first_state_left"] is None and any(bool(jnp.any(x != 0)) for x in states):
                found["first_state_left"] = t
            if found["first_evict"] is None and not _same(want_evict, got_evict):
                found["first_evict"] = t
                found["evict_gap"] = importance_gap(args, comp, want_evict, got_evict)
                if jax.default_backend() != "cpu":
                    found["cpu_sides_with"] = {
                        path: _sides_with(e, want_evict, got_evict)
                        for path, e in replay_on_cpu(step, args, comp).items()
                    }
                if jax.default_backend() != "cpu":
                    try:  # a diagnosis that fails must not take the rest of the run with it
                        found["isolated"] = isolate(args, comp, impl, dump_dir)
                    except Exception as e:
                        found["isolated"] = [f"failed: {type(e).__name__}: {str(e)[:300]}"]
                if states:
                    fresh = (params, config, with_kernel_state(cache, impl), *args[3:])
                    e = evict_slots(step(*fresh, compression=comp, attention_impl=impl)[1])
                    found["fresh_state_sides_with"] = _sides_with(e, want_evict, got_evict)
            differences = stored_byte_differences(want_cache, got_cache)
            if differences and found["first_stored"] is None:
                found["first_stored"], found["stored"] = t, differences
            cache, token = got_cache, jnp.argmax(got_logits, -1).astype(jnp.int32)
    return dict(generate_equal=bool(np.array_equal(want, got)), **found)


def interpreter_replay(params, config, comp, ids, lengths, steps) -> dict | None:
    """Triton's CPU interpreter (tests/triton_interpret.py: the kernels' own code in numpy, with the
    launch plan of a 132-SM GPU) on every kernel call of the reference's own greedy run, against the
    reference on the same inputs: the first {"step", "layer", "interpreter", "reference"} whose evict
    slots differ, or None. TRITON_INTERPRET=1 must be set before triton is first imported (`main` does
    it for --impl triton-interpreter); needs triton and torch."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import triton_interpret

    with jax.default_matmul_precision("highest"):
        comp, cache, step, token = decode_start(params, config, comp, ids, lengths, steps, "pallas")
        for t in range(1, steps):
            args = (params, config, cache, token, jnp.asarray(lengths) + t - 1, jax.random.key(0))
            for i, (a, kw, _) in enumerate(kernel_calls(args, comp, "pallas")):
                want = reference_evict(a, kw)
                got = np.asarray(
                    triton_interpret.longflow_decode_attention_interpret(*a[:4], sms=132, **kw)[1]
                )
                if not np.array_equal(got, want):
                    return dict(step=t, layer=i, interpreter=got, reference=want)
            logits, cache, _ = step(*args, compression=comp, attention_impl="reference")
            token = jnp.argmax(logits, -1).astype(jnp.int32)
    return None


def _same(a: list, b: list) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def _sides_with(evict: list, reference: list, kernel: list) -> str:
    return "reference" if _same(evict, reference) else "kernel" if _same(evict, kernel) else "neither"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--impl",
        default="triton",
        choices=["pallas", "triton", "triton-interpreter"],
        help="triton-interpreter: no drift run; Triton's CPU interpreter on the reference's own run",
    )
    ap.add_argument("--kv-quant", default=None, choices=[None, "int8", "fp8", "int4", "int2"])
    ap.add_argument("--granularity", default="sequence", choices=["sequence", "kv_head"])
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--group", type=int, default=16, help="kv_quant_group (the tiny model's head dim is 16)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seeds", type=int, default=6, help="prompt sets (3 rows of 5, 14 and 9 tokens each)")
    ap.add_argument(
        "--dump", help="save the inputs of the kernel calls that disagree here (set_N/layer_M.npz)"
    )
    args = ap.parse_args(argv)
    if args.impl == "triton-interpreter":
        if "triton" in sys.modules and not os.environ.get("TRITON_INTERPRET"):
            raise SystemExit("--impl triton-interpreter needs TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported
    root = tempfile.mkdtemp(prefix="kernel_drift_")
    convert(make_tiny_hf_checkpoint(os.path.join(root, "hf"), "qwen3"), os.path.join(root, "lf"))
    config, params = lf.load(os.path.join(root, "lf"))
    comp = CompressionConfig(
        policy="longflow", budget=args.budget, granularity=args.granularity, kv_quant=args.kv_quant,
        kv_quant_group=args.group,
    )  # fmt: skip
    print(f"{args.impl} against the reference: {comp}", flush=True)
    results = []
    for seed in range(args.seeds):
        ids, lengths = random_prompts(config.vocab_size, [5, 14, 9], seed)
        dump_dir = None
        if args.dump:
            dump_dir = os.path.join(args.dump, f"set_{seed}")
            os.makedirs(dump_dir, exist_ok=True)
        if args.impl == "triton-interpreter":
            found = interpreter_replay(params, config, comp, ids, lengths, args.steps)
            results.append(found)
            where = "none" if found is None else (
                f"step {found['step']} layer {found['layer']}: interpreter {found['interpreter'].tolist()}, "
                f"reference {found['reference'].tolist()}"
            )  # fmt: skip
            print(f"prompt set {seed}: the first call whose evict slots differ: {where}", flush=True)
            continue
        r = drift(params, config, comp, args.impl, ids, lengths, args.steps, dump_dir)
        results.append(r)
        stored = f"{r['first_stored']} {r['stored']}" if r["stored"] else "None"
        cpu = "".join(
            f"; on the CPU {path} sides with the {side}" for path, side in r["cpu_sides_with"].items()
        )
        gap = "" if r["evict_gap"] is None else f" (importance gap {r['evict_gap']:.1e})"
        if r["fresh_state_sides_with"] is not None:
            cpu += f"; {args.impl} with a new kernel state sides with the {r['fresh_state_sides_with']}"
        if r["first_state_left"] is not None:
            cpu += f"; {args.impl}'s kernel state first left nonzero at step {r['first_state_left']}"
        print(
            f"prompt set {seed}: generate equal {r['generate_equal']}; stepping {args.impl}'s own cache, the "
            f"first step with a different argmax {r['first_argmax']}, evict slot {r['first_evict']}{gap}, "
            f"stored K/V {stored}{cpu}; largest |logits difference| {r['max_dlogits']:.1e}",
            flush=True,
        )
        for line in r["isolated"]:
            print(f"  that step's kernel calls alone: {line}", flush=True)
    return results


if __name__ == "__main__":
    main()
