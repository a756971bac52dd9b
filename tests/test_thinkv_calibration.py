"""ThinKV's calibration: the densities, modes and minima against a direct numpy computation, the measured
step sparsity against attention recomputed in numpy, the command end to end, and the flag that reads
its file."""

import argparse
import json
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_prompts, write_jsonl

import longflow_jax as lf
from longflow_jax import runner
from longflow_jax import thinkv_calibration as cal
from longflow_jax.config import THINKV_DEFAULT_THRESHOLDS, ThinKVConfig
from longflow_jax.model import forward

CONFIG = lf.ModelConfig(
    model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
)  # fmt: skip


# ---- densities against numpy ----


def reference_modes(x):
    """Silverman's bandwidth, the exact Gaussian KDE on a 1001-point grid over [0, 1], its interior
    local maxima, and for the three highest: the minima between them, the masses and the dips."""
    grid = np.linspace(0.0, 1.0, 1001)
    q25, q75 = np.quantile(x, [0.25, 0.75])
    h = 0.9 * min(np.std(x, ddof=1), (q75 - q25) / 1.34) * len(x) ** -0.2
    d = np.exp(-0.5 * ((grid[:, None] - x[None, :]) / h) ** 2).sum(axis=1) / (len(x) * h * np.sqrt(2 * np.pi))
    slope = np.sign(np.diff(d))
    peaks = np.flatnonzero((slope[:-1] > 0) & (slope[1:] < 0)) + 1
    top = sorted(sorted(peaks, key=lambda i: -d[i])[:3])
    if len(top) < 3:
        return dict(bandwidth=h, density=d, modes=len(peaks))
    lows = [a + np.argmin(d[a : b + 1]) for a, b in zip(top, top[1:])]
    minima = grid[lows]
    masses = [np.mean(x < minima[0]), np.mean((x >= minima[0]) & (x < minima[1])), np.mean(x >= minima[1])]
    dips = [d[i] / min(d[a], d[b]) for i, a, b in zip(lows, top, top[1:])]
    return dict(bandwidth=h, density=d, modes=len(peaks), minima=minima, masses=masses, dips=dips)


def mixture(weights, means, sd, n=4000, seed=0):
    rng = np.random.default_rng(seed)
    parts = [rng.normal(m, sd, int(round(w * n))) for w, m in zip(weights, means)]
    return np.clip(np.concatenate(parts), 0.0, 1.0)


TRIMODAL = ((0.5, 0.3, 0.2), (0.2, 0.5, 0.85), 0.05)


def test_trimodal_density_modes_and_minima_match_numpy():
    x = mixture(*TRIMODAL)
    got, want = cal.layer_density(x), reference_modes(x)
    assert got.bandwidth == pytest.approx(want["bandwidth"], rel=1e-9)
    np.testing.assert_allclose(got.density, want["density"], rtol=2e-3, atol=1e-3 * want["density"].max())
    assert got.num_modes == want["modes"] == 3
    np.testing.assert_allclose(got.minima, want["minima"], atol=cal.GRID_STEP)
    np.testing.assert_allclose(got.masses, want["masses"], atol=0.005)
    np.testing.assert_allclose(got.dips, want["dips"], rtol=0.02)
    assert got.trimodal and max(want["dips"]) < cal.DEFAULT_MAX_DIP


def test_unimodal_density_is_not_trimodal():
    x = np.clip(np.random.default_rng(1).normal(0.6, 0.1, 4000), 0, 1)
    got = cal.layer_density(x)
    assert got.num_modes == reference_modes(x)["modes"] == 1
    assert not got.trimodal and got.minima is None and got.masses is None
    assert cal.choose_layers([got, got]) is None


def test_choose_layers_takes_the_four_most_pronounced_trimodal_layers():
    """Six tri-modal layers of decreasing separation, one whose smallest mode holds 2% of the samples,
    one uni-modal: L* is the four best separated (smallest larger dip), thresholds their minima's mean."""
    weights, means = (0.4, 0.35, 0.25), (0.2, 0.5, 0.8)
    layers = [
        mixture(weights, means, sd, seed=s) for s, sd in enumerate((0.045, 0.03, 0.06, 0.04, 0.05, 0.055))
    ]
    layers.insert(2, mixture((0.49, 0.49, 0.02), means, 0.03, seed=9))
    layers.insert(4, np.clip(np.random.default_rng(8).normal(0.5, 0.1, 3000), 0, 1))
    refs = [reference_modes(x) for x in layers]
    densities = [cal.layer_density(x) for x in layers]
    trimodal = [r["modes"] >= 3 and min(r["masses"]) >= 0.05 and max(r["dips"]) <= 0.5 for r in refs]
    assert [d.trimodal for d in densities] == trimodal == [True, True, False, True, False, True, True, True]
    best = sorted((i for i in range(len(refs)) if trimodal[i]), key=lambda i: max(refs[i]["dips"]))[:4]
    got_layers, (lo, hi) = cal.choose_layers(densities)
    assert got_layers == tuple(sorted(best)) == (0, 1, 5, 6)  # sd 0.045, 0.03, 0.04, 0.05
    want = np.mean([refs[i]["minima"] for i in best], axis=0)
    np.testing.assert_allclose([lo, hi], want, atol=cal.GRID_STEP)


def test_layer_density_rejects_bad_samples():
    with pytest.raises(ValueError, match="at least 2 sparsity samples in"):
        cal.layer_density([0.5])
    with pytest.raises(ValueError, match=r"at least 2 sparsity samples in \[0, 1\], got 0$"):
        cal.layer_density([])  # was numpy's "zero-size array" error from the message itself
    with pytest.raises(ValueError, match="sparsity samples in"):
        cal.layer_density([0.2, 1.5])


# ---- the measured sparsity against numpy ----


def test_step_sparsity_equals_numpy_attention_over_the_full_cache():
    """Each fed token's sparsity per layer equals the fraction of its attention weights below 1% of the
    row's largest, over the prompt and the tokens before it, recomputed in numpy from the q, k of a
    causal forward over the whole sequence; a row that generated fewer tokens is NaN beyond them."""
    rng = np.random.default_rng(0)
    draw = lambda sd: (1.0 if len(sd.shape) == 1 else 0.0) + 0.2 * rng.standard_normal(sd.shape)
    params = jax.tree.map(lambda sd: jnp.asarray(draw(sd), sd.dtype), lf.param_shapes(CONFIG))
    ids, prompt_lengths = make_prompts(CONFIG, [9, 5], seed=2)
    tokens = rng.integers(1, CONFIG.vocab_size, (2, 8)).astype(np.int32)  # any trajectory is fed as given
    lengths = np.array([8, 4], np.int32)
    got = cal.step_sparsity(params, CONFIG, ids, prompt_lengths, tokens, lengths)
    assert got.shape == (CONFIG.num_layers, 2, 7)
    # Both rows' prompt and fed tokens, right-padded: causal attention never reads the padding after.
    seqs = np.zeros((2, 16), np.int32)
    for row in range(2):
        n = prompt_lengths[row] + lengths[row] - 1
        seqs[row, :n] = np.concatenate([ids[row, : prompt_lengths[row]], tokens[row, : lengths[row] - 1]])
    qk = jax.jit(lambda p, x: forward(p, CONFIG, x, layer_hook=lambda i, q, k, v: (q, k))[1])(params, seqs)
    group = CONFIG.num_heads // CONFIG.num_kv_heads
    for layer, (q, k) in enumerate(qk):
        q, k = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), group, axis=2)  # [B, S, H, D]
        for row in range(2):
            for t in range(lengths[row] - 1):
                p = prompt_lengths[row] + t
                logits = np.einsum("hd,shd->hs", q[row, p], k[row, : p + 1]) / np.sqrt(CONFIG.head_dim)
                w = np.exp(logits - logits.max(axis=1, keepdims=True))
                w /= w.sum(axis=1, keepdims=True)
                want = np.mean(w < 0.01 * w.max(axis=1, keepdims=True))
                assert got[layer, row, t] == pytest.approx(want, abs=1e-6), (layer, row, t)
    assert np.isnan(got[:, 1, 3:]).all() and not np.isnan(got[:, 0]).any()
    # An id outside the vocabulary was clamped by the embedding lookup and measured as if valid.
    for bad in (CONFIG.vocab_size + 500, -1):
        with pytest.raises(ValueError, match=rf"tokens must hold token ids in \[0, {CONFIG.vocab_size}\)"):
            bad_tokens = np.where(tokens == tokens[0, 0], bad, tokens)
            cal.step_sparsity(params, CONFIG, ids, prompt_lengths, bad_tokens, lengths)


def test_rows_that_stop_at_once_are_named(monkeypatch):
    # Every row stopped at its first token (a wrong template, EOS first): nothing fed back, no samples;
    # the run then failed in numpy ("zero-size array") with no word of why.
    generator = types.SimpleNamespace(
        config=CONFIG, params=None,
        generate=lambda prompts, *a, **k: [types.SimpleNamespace(tokens=[7]) for _ in prompts],
    )  # fmt: skip
    plan = types.SimpleNamespace(
        batches=[types.SimpleNamespace(indices=[0, 1], prompt_len=3, rows=2)],
        prompts=[[1, 2, 3], [4, 5]],
        records=[types.SimpleNamespace(id=0), types.SimpleNamespace(id=1)],
    )
    monkeypatch.setattr(runner, "sampling_from", lambda args: lf.SamplingConfig())
    monkeypatch.setattr(cal, "step_sparsity", lambda *a: np.full((CONFIG.num_layers, 2, 3), np.nan))
    with pytest.raises(ValueError, match="only 0 generated token.* of 2 prompt.* were fed back"):
        cal.collect(generator, plan, argparse.Namespace(seed=0, max_new_tokens=4))


# ---- the command ----


def test_calibration_cli_writes_a_file_from_calibration_reads_and_a_plot(chat_ckpt, tmp_path, capsys):
    # Prompts of 33-64 tokens after the chat template: one shape to compile.
    questions = [{"question": "What is 2 + 3?", "answer": "5"}, {"problem": "Add 7 and 8 now."}]
    inp = write_jsonl(tmp_path / "in.jsonl", [*questions, {"prompt": "Q: Count to three."}])
    out, plot = tmp_path / "thinkv.json", tmp_path / "densities.png"
    args = [
        "--ckpt",
        chat_ckpt,
        "--input",
        inp,
        "--out",
        str(out),
        "--plot",
        str(plot),
        "--max-new-tokens",
        "12",
    ]
    assert cal.main([*args, "--prompt-template", "Q: {question}", "--ignore-eos"]) == 0
    assert str(out) in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["prompts"] == 3 and data["tokens"] == 3 * 11  # 12 tokens each, all but the last fed
    assert len(data["per_layer"]) == 2 and all(d["samples"] == 33 for d in data["per_layer"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A random tiny model has no tri-modal layer: the fallback, marked, and a warning where it is read.
    assert data["fallback"]
    with pytest.warns(UserWarning, match="no layer whose sparsity density is clearly tri-modal"):
        tk = ThinKVConfig.from_calibration(str(out))
    assert (list(tk.layers), list(tk.thresholds)) == (data["layers"], data["thresholds"])
    assert cal.main(args) == 2  # the file exists: not replaced without --overwrite
    assert "pass --overwrite" in capsys.readouterr().err


def test_without_a_trimodal_layer_the_thresholds_are_the_default_layers_tertiles(
    chat_ckpt, tmp_path, monkeypatch
):
    rng = np.random.default_rng(0)
    samples = [rng.beta(8, 2, 500) for _ in range(2)]  # uni-modal near 0.8, as real models measure
    monkeypatch.setattr(cal, "collect", lambda *a: samples)
    out = tmp_path / "thinkv.json"
    inp = write_jsonl(tmp_path / "in.jsonl", [{"question": "1 + 1?"}])
    assert (
        cal.main(["--ckpt", chat_ckpt, "--input", str(inp), "--out", str(out), "--max-new-tokens", "8"]) == 0
    )
    data = json.loads(out.read_text())
    layers = ThinKVConfig().calibrated(2)[0]
    pooled = np.sort(np.concatenate([samples[i] for i in layers]))
    lo, hi = data["thresholds"]
    assert data["fallback"] and data["layers"] == list(layers)
    assert abs(np.mean(pooled < lo) - 1 / 3) < 0.01 and abs(np.mean(pooled < hi) - 2 / 3) < 0.01
    assert (lo, hi) != THINKV_DEFAULT_THRESHOLDS


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--input", "missing.jsonl"], "--input 'missing.jsonl': no such file"),
        (["--limit", "0"], "--limit must be >= 1, got 0"),
        (["--max-new-tokens", "1"], "--max-new-tokens must be >= 2"),
        (["--max-dip", "1.5"], "--max-dip must be in (0, 1), got 1.5"),
        # The plot defaults to --out's name with .png: it replaced the calibration file, exit 0.
        (["--out", "cal.png"], "--plot cal.png is the same file as --out cal.png"),
        (["--plot", "d.txt"], "--plot d.txt: matplotlib cannot write .txt files"),
        # Even with --overwrite: the prompts were replaced by the calibration file.
        (["--out", "IN", "--overwrite"], "--out IN is the same file as --input IN: the run would replace"),
        (["--out", "no/cal.json"], "--out no/cal.json: no directory"),  # said after the whole run
        (["--plot", "no/d.png"], "--plot no/d.png: no directory"),
    ],
)
def test_calibration_cli_rejects_bad_input(chat_ckpt, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"question": "1 + 1?"}])
    extra = [inp if x == "IN" else x for x in extra]
    assert cal.main(["--ckpt", chat_ckpt, "--input", inp, *extra]) == 2
    assert message.replace("IN", inp) in capsys.readouterr().err
    assert open(inp).read() == '{"question": "1 + 1?"}\n'  # the prompts are untouched


def test_thinkv_calibration_flag_and_the_checkpoints_file(tmp_path):
    """--thinkv-calibration wins; without it the checkpoint's thinkv.json is read; without either the
    settings stay unset (generate warns); a missing file is an error."""
    ckpt, other = tmp_path / "ckpt", tmp_path / "other.json"
    ckpt.mkdir()
    other.write_text(json.dumps({"layers": [1], "thresholds": [0.2, 0.3]}))
    namespace = lambda path=None: argparse.Namespace(ckpt=str(ckpt), thinkv_calibration=path, policy="thinkv")
    assert runner.thinkv_from(namespace()) == ThinKVConfig()
    (ckpt / "thinkv.json").write_text(json.dumps({"layers": [0, 2], "thresholds": [0.4, 0.6]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runner.thinkv_from(namespace()) == ThinKVConfig(layers=(0, 2), thresholds=(0.4, 0.6))
        flags = vars(namespace()) | dict(budget=64, granularity="sequence", kv_quant=None, kv_quant_group=16)
        compression = runner.compression_from(argparse.Namespace(**flags))
        assert compression.thinkv == ThinKVConfig(layers=(0, 2), thresholds=(0.4, 0.6))
        assert runner.thinkv_from(namespace(str(other))) == ThinKVConfig(layers=(1,), thresholds=(0.2, 0.3))
    with pytest.raises(ValueError, match="--thinkv-calibration 'nope.json': no such file"):
        runner.thinkv_from(namespace("nope.json"))
