"""`longflow-calibrate-thinkv`: ThinKV's offline calibration (docs/THINKV.md, "Calibration").

The full cache generates for the prompts; the generated tokens are then fed back through the full cache
one a step (`step_sparsity`, one jitted loop) to measure every layer's step sparsity: the mean over the
layer's query heads of `thinkv.attention_sparsity` over the filled slots. Per layer, a Gaussian kernel
density estimate of those samples (`layer_density`) gives the modes and the density minima between the
three highest; the layers whose density is clearly tri-modal become L* (at most 4, the most pronounced
first) and the thresholds are their minima averaged (`choose_layers`). Writes thinkv.json, which
`ThinKVConfig.from_calibration` and `--thinkv-calibration` read, and a plot of the densities.

Input JSONL, one prompt a line: {"question"} or {"problem"} (a problems file, as longflow-eval reads it,
through --prompt-template), {"prompt"} or {"messages"} (as longflow-batch reads them).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.reference import decode_attention_probs

from . import runner
from .config import THINKV_CALIBRATION_FILE, ModelConfig, SamplingConfig, ThinKVConfig
from .eval_math import DEFAULT_PROMPT, check_prompt_template
from .generate import FULL, check_generate_inputs, check_params, check_token_ids, prefill
from .jsonl_io import validate_prompt_record
from .kv_cache import KVCache, kv_valid, write_token
from .model import attention_scale, decoder_layer
from .thinkv import attention_sparsity

PROG = "longflow-calibrate-thinkv"
GRID = np.linspace(0.0, 1.0, 1001)  # where densities are evaluated: sparsity is a fraction
GRID_STEP = float(GRID[1] - GRID[0])
MAX_LAYERS = 4  # the size of L*, as in the paper
DEFAULT_MIN_MASS = 0.05  # each of the three modes holds at least this fraction of the samples
DEFAULT_MAX_DIP = 0.5  # each minimum's density is at most this fraction of its lower neighbouring peak


# ---- measuring: the step sparsity along generated tokens ----


def step_sparsity(params, config: ModelConfig, prompt_ids, prompt_lengths, tokens, lengths):
    """Every layer's step sparsity while generated tokens are fed through the full cache.

    The cache is `generate`'s full cache: the prompt, then token t written at position
    prompt_lengths + t when it is fed, exactly as while generating it.
    Args:
      prompt_ids: [B, P] right-padded prompts; prompt_lengths: [B] int in [1, P].
      tokens: [B, T] generated ids; lengths: [B] tokens generated per row (a stop id included).
    Returns:
      [L, B, T - 1] float32 numpy: [l, b, t] is the mean over layer l's query heads of
      `thinkv.attention_sparsity` over the filled slots when token t of row b is fed; NaN where
      t >= lengths[b] - 1 (the last token is only sampled, never fed).
    """
    steps = np.shape(tokens)[1] if len(np.shape(tokens)) == 2 else 0
    check_generate_inputs(
        config, prompt_ids, prompt_lengths, max(steps, 1), FULL, SamplingConfig(), "reference"
    )
    check_params(params, config)
    if steps < 1 or np.shape(tokens)[0] != np.shape(prompt_ids)[0] or np.shape(lengths) != (len(tokens),):
        raise ValueError(
            f"tokens must be [batch, steps] and lengths [batch] for the prompts' batch "
            f"{np.shape(prompt_ids)[0]}, got {np.shape(tokens)} and {np.shape(lengths)}"
        )
    lengths = np.asarray(lengths)
    if not np.issubdtype(lengths.dtype, np.integer) or lengths.min() < 0 or lengths.max() > steps:
        raise ValueError(f"lengths must be integer token counts in [0, {steps}], got {lengths.tolist()}")
    check_token_ids("tokens", tokens, config.vocab_size)
    out = _replay(
        params, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32),
        jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32), config=config,
    )  # fmt: skip
    return np.asarray(out)


def _layers_with_sparsity(params, config: ModelConfig, cache: KVCache, tokens, positions):
    """The full cache's decode step through every layer, without the final norm and logits (only the
    cache and the attention matter): tokens [B] at positions [B]. Returns (new cache, [L, B] step
    sparsity)."""
    x = params["embed"][tokens][:, None]
    scale = attention_scale(config)
    new_layers, sparsity = [], []
    for layer, lc in zip(params["layers"], cache.layers):

        def attend(q, k, v, lc=lc):
            lc = write_token(lc, k[:, 0], v[:, 0], positions)
            valid = kv_valid(lc)
            out, probs = decode_attention_probs(q[:, 0], lc.k, lc.v, valid, scale)  # probs [B, Hq, C]
            step = attention_sparsity(probs, valid[:, None, :]).mean(axis=-1)
            return out[:, None].astype(q.dtype), (lc.replace(evict_slot=lc.evict_slot + 1), step)

        x, (lc, step) = decoder_layer(layer, config, x, positions[:, None], attend)
        new_layers.append(lc)
        sparsity.append(step)
    return KVCache(layers=new_layers), jnp.stack(sparsity)


@functools.partial(jax.jit, static_argnames=("config",))
def _replay(params, prompt_ids, prompt_lengths, tokens, lengths, *, config):
    (batch, prompt_len), steps = prompt_ids.shape, tokens.shape[1]
    cache, _ = prefill(params, config, prompt_ids, prompt_lengths, FULL, prompt_len + steps)
    sparsity = jnp.full((steps - 1, config.num_layers, batch), jnp.nan, jnp.float32)

    def feed(t, carry):
        cache, sparsity = carry
        cache, step = _layers_with_sparsity(params, config, cache, tokens[:, t], prompt_lengths + t)
        step = jnp.where(t < lengths - 1, step, jnp.nan)  # rows that stopped feed pad tokens
        return cache, sparsity.at[t].set(step)

    # Up to the longest row only; the bound is traced, so batches of one shape share a compile.
    _, sparsity = jax.lax.fori_loop(0, jnp.max(lengths) - 1, feed, (cache, sparsity))
    return jnp.transpose(sparsity, (1, 2, 0))


# ---- the densities, their modes and the choice of L* ----


def silverman_bandwidth(samples) -> float:
    """Silverman's rule of thumb (Density Estimation, 1986, eq. 3.31): 0.9 min(std, IQR / 1.34)
    n^(-1/5), with the std alone where the IQR is 0 (as R's bw.nrd0), and at least one grid step."""
    x = np.asarray(samples, np.float64)
    q75, q25 = np.percentile(x, [75, 25])
    spread = np.std(x, ddof=1)
    if q75 > q25:
        spread = min(spread, (q75 - q25) / 1.34)
    return max(0.9 * spread * x.size**-0.2, GRID_STEP)


def gaussian_kde(samples, bandwidth: float):
    """[len(GRID)] the Gaussian kernel density estimate of samples in [0, 1] at GRID.

    The samples are first linearly binned onto GRID (each splits its weight between its two grid
    neighbours), so the cost is grid x grid rather than samples x grid; the estimate moves by about
    (GRID_STEP / bandwidth)^2 / 12 of itself.
    """
    x = np.asarray(samples, np.float64)
    pos = x / GRID_STEP
    left = np.minimum(np.floor(pos).astype(np.int64), len(GRID) - 2)
    frac = pos - left
    weights = np.bincount(left, 1.0 - frac, len(GRID)) + np.bincount(left + 1, frac, len(GRID))
    kernel = np.exp(-0.5 * np.square((GRID[:, None] - GRID[None, :]) / bandwidth))
    return kernel @ weights / (x.size * bandwidth * np.sqrt(2.0 * np.pi))


@dataclasses.dataclass(frozen=True)
class LayerDensity:
    """One layer's step-sparsity density (`layer_density`) and its three highest modes."""

    samples: int
    bandwidth: float
    density: np.ndarray  # [len(GRID)]
    num_modes: int  # local maxima of the density
    peaks: tuple[float, ...]  # the three highest modes, in order of position (all, where fewer)
    minima: tuple[float, float] | None  # the density minima between them; None with fewer than 3 modes
    masses: tuple[float, float, float] | None  # the fraction of the samples between the minima
    dips: tuple[float, float] | None  # each minimum's density over the lower of its two peaks'
    trimodal: bool  # every mass >= min_mass and every dip <= max_dip

    def summary(self) -> dict:
        """The JSON record of the layer (no density)."""
        rounded = lambda xs: None if xs is None else [round(float(x), 4) for x in xs]
        return dict(
            samples=self.samples, bandwidth=round(self.bandwidth, 5), modes=self.num_modes,
            peaks=rounded(self.peaks), minima=rounded(self.minima), masses=rounded(self.masses),
            dips=rounded(self.dips), trimodal=self.trimodal,
        )  # fmt: skip


def layer_density(
    samples, min_mass: float = DEFAULT_MIN_MASS, max_dip: float = DEFAULT_MAX_DIP
) -> LayerDensity:
    """The density of one layer's step-sparsity samples (values in [0, 1]), its modes, and whether it
    is clearly tri-modal: of its three highest modes (by density), each holds at least min_mass of the
    samples (those between the minima next to it), and each minimum between two of them is at most
    max_dip of the lower of the two peaks."""
    x = np.asarray(samples, np.float64).ravel()
    if x.size < 2 or not np.all((x >= 0.0) & (x <= 1.0)):
        span = f" in [{x.min()}, {x.max()}]" if x.size else ""
        raise ValueError(f"need at least 2 sparsity samples in [0, 1], got {x.size}{span}")
    bandwidth = silverman_bandwidth(x)
    d = gaussian_kde(x, bandwidth)
    rising = np.concatenate([[True], d[1:] > d[:-1]])  # a plateau's first point counts, once
    falling = np.concatenate([d[:-1] >= d[1:], [True]])
    # The density's flat zero tails are no modes: a mode must stand above the float noise far from the data.
    modes = np.flatnonzero(rising & falling & (d > 1e-6 * d.max()))
    top = np.sort(modes[np.argsort(-d[modes], kind="stable")[:3]])
    if len(top) < 3:
        return LayerDensity(x.size, bandwidth, d, len(modes), tuple(GRID[top]), None, None, None, False)
    lows = [a + int(np.argmin(d[a : b + 1])) for a, b in zip(top, top[1:])]
    minima = tuple(float(GRID[i]) for i in lows)
    below = np.searchsorted(np.sort(x), minima)  # samples below each minimum
    masses = tuple(float(m) for m in np.diff([0, *below, x.size]) / x.size)
    dips = tuple(float(d[i] / min(d[a], d[b])) for i, a, b in zip(lows, top, top[1:]))
    trimodal = min(masses) >= min_mass and max(dips) <= max_dip
    return LayerDensity(x.size, bandwidth, d, len(modes), tuple(GRID[top]), minima, masses, dips, trimodal)


def choose_layers(densities: list[LayerDensity], max_layers: int = MAX_LAYERS):
    """L* and the thresholds from the layers' densities (index = layer): the tri-modal layers with the
    most pronounced modes (smallest larger dip; ties: the lower layer), at most max_layers, and their
    minima averaged. Returns (layers ascending, (lo, hi)), or None when no layer is tri-modal."""
    ranked = sorted(
        (i for i, d in enumerate(densities) if d.trimodal), key=lambda i: (max(densities[i].dips), i)
    )
    chosen = sorted(ranked[:max_layers])
    if not chosen:
        return None
    lo, hi = np.mean([densities[i].minima for i in chosen], axis=0)
    return tuple(chosen), (float(lo), float(hi))


def plot_densities(densities: list[LayerDensity], layers, thresholds, path: str, title: str) -> None:
    """Every layer's density in its own panel: L*'s in colour with their minima marked, the thresholds
    dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(densities), 6)
    rows = -(-len(densities) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 1.7 * rows + 0.6), sharex=True, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(densities):
            ax.axis("off")
            continue
        d, chosen = densities[i], i in layers
        ax.plot(GRID, d.density, color="C3" if chosen else "0.45", lw=1.4 if chosen else 0.9)
        if chosen:
            ax.plot(d.minima, np.interp(d.minima, GRID, d.density), "v", color="C3", ms=4)
        for t in thresholds:
            ax.axvline(t, color="C0", ls="--", lw=0.8)
        mark = " (L*)" if chosen else " (tri-modal)" if d.trimodal else ""
        ax.set_title(f"layer {i}{mark}, {d.num_modes} modes", fontsize=7)
        ax.set_yticks([])
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=8)
    fig.supxlabel("step sparsity (dashed: the thresholds)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the command ----


def prompt_of_record(obj: dict, template: str):
    """{"question"} or {"problem"}: the user message `template` makes of it; {"prompt"} or
    {"messages"}: as longflow-batch reads them (`validate_prompt_record`)."""
    if not {"question", "problem", "prompt", "messages"} & set(obj):
        raise ValueError("needs one of 'question', 'problem', 'prompt' and 'messages'")
    question = obj.get("question", obj.get("problem"))
    if question is None:
        return validate_prompt_record(obj)
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' (or 'problem') must be a non-empty string")
    return ("prompt", template.replace("{question}", question))


def _padded(rows, width: int, pad: int) -> np.ndarray:
    out = np.full((len(rows), width), pad, np.int32)
    for r, ids in enumerate(rows):
        out[r, : len(ids)] = ids
    return out


def collect(generator: runner.DataParallelGenerator, plan: runner.Plan, args) -> list[np.ndarray]:
    """Generate with the full cache batch by batch, then measure: per layer, the step sparsity of every
    fed generated token of every prompt (1-D)."""
    sampling, pad = runner.sampling_from(args), generator.config.pad_token_id
    per_layer = [[] for _ in range(generator.config.num_layers)]
    for k, b in enumerate(plan.batches, 1):
        start = time.perf_counter()
        prompts = [plan.prompts[i] for i in b.indices]
        seed = runner.batch_seed(args.seed, plan.records[b.indices[0]].id)
        completions = generator.generate(
            prompts, b.prompt_len, b.rows, seed=seed, max_new_tokens=args.max_new_tokens, compression=FULL,
            sampling=sampling, attention_impl="reference",
        )  # fmt: skip
        sparsity = step_sparsity(
            generator.params, generator.config, _padded(prompts, b.prompt_len, pad),
            np.asarray([len(p) for p in prompts], np.int32),
            _padded([c.tokens for c in completions], args.max_new_tokens, pad),
            np.asarray([len(c.tokens) for c in completions], np.int32),
        )  # fmt: skip
        for layer, s in zip(per_layer, sparsity):
            layer.append(s[np.isfinite(s)])
        runner.report(
            f"batch {k}/{len(plan.batches)}: {len(prompts)} prompts, {per_layer[0][-1].size} tokens "
            f"measured, {time.perf_counter() - start:.1f} s",
            PROG,
        )
    samples = [np.concatenate(layer) for layer in per_layer]
    if samples[0].size < 2:
        raise ValueError(
            f"only {samples[0].size} generated token(s) of {len(plan.records)} prompt(s) were fed back to "
            f"be measured (a row's last token is only sampled): the rows stopped at once; check "
            f"--prompt-template, the model's stop ids and --max-new-tokens"
        )
    return samples


def _json_lines(result: dict) -> str:
    """The JSON object with a line per key, and a line per layer in "per_layer"."""
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in result.items() if k != "per_layer"]
    layers = ",\n".join(f"  {json.dumps(d)}" for d in result["per_layer"])
    return "{\n" + ",\n".join([*lines, f' "per_layer": [\n{layers}\n ]']) + "\n}\n"


def check_calibration_args(args) -> None:
    runner.check_args(args)
    if args.max_new_tokens < 2:
        raise ValueError(
            f"--max-new-tokens must be >= 2 (a token's sparsity is measured when it is fed back), got "
            f"{args.max_new_tokens}"
        )
    if not 0.0 < args.min_mass <= 1.0 / 3.0:
        raise ValueError(
            f"--min-mass must be in (0, 1/3] (three modes share the samples), got {args.min_mass}"
        )
    if not 0.0 < args.max_dip < 1.0:
        raise ValueError(f"--max-dip must be in (0, 1), got {args.max_dip}")
    check_prompt_template(args.prompt_template)
    if not os.path.isfile(args.input):
        raise ValueError(f"--input {args.input!r}: no such file")


def run(args) -> None:
    check_calibration_args(args)
    out = args.out or os.path.join(args.ckpt, THINKV_CALIBRATION_FILE)
    plot_path = args.plot or os.path.splitext(out)[0] + ".png"
    runner.check_plot_path("--plot", plot_path, **{"--out": out, "--input": args.input})
    runner.check_outputs_not_input(args, {"--out": out}, flag="--out")
    for flag, path in (("--out", out), ("--plot", plot_path)):
        if os.path.exists(path) and not args.overwrite:
            raise ValueError(f"{path} exists: pass --overwrite to replace it, or --out / --plot elsewhere")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ValueError(f"{flag} {path}: no directory {folder} to write it in")
    validate = functools.partial(prompt_of_record, template=args.prompt_template)
    generator, plan = runner.plan_on_one_device(args, validate, PROG)
    samples = collect(generator, plan, args)
    densities = [layer_density(s, args.min_mass, args.max_dip) for s in samples]
    chosen = choose_layers(densities)
    if chosen is None:
        # The default layers, and the tertiles of their pooled sparsity as thresholds: fixed thresholds
        # may fall outside a model's range (all steps one type), tertiles give each type a third.
        layers = ThinKVConfig().calibrated(generator.config.num_layers)[0]
        pooled = np.concatenate([samples[i][~np.isnan(samples[i])] for i in layers])
        thresholds = tuple(float(t) for t in np.quantile(pooled, [1 / 3, 2 / 3]))
        runner.report(
            f"warning: no layer's sparsity density is clearly tri-modal (--min-mass {args.min_mass}, "
            f"--max-dip {args.max_dip}); {out} holds the default layers {list(layers)} and the tertiles "
            f'of their sparsity as thresholds {[round(t, 4) for t in thresholds]}, marked "fallback": true',
            PROG,
        )
    else:
        layers, thresholds = chosen
    result = {
        "layers": list(layers),
        "thresholds": [round(t, 4) for t in thresholds],
        "fallback": chosen is None,
        "ckpt": os.path.abspath(args.ckpt),
        "input": os.path.abspath(args.input),
        "prompts": len(plan.records),
        "tokens": int(samples[0].size),
        "max_new_tokens": args.max_new_tokens,
        "sampling": {**dataclasses.asdict(runner.sampling_from(args)), "seed": args.seed},
        "bandwidth": "silverman: 0.9 min(std, IQR / 1.34) n^(-1/5)",
        "grid_points": len(GRID),
        "criteria": {"min_mass": args.min_mass, "max_dip": args.max_dip, "max_layers": MAX_LAYERS},
        "per_layer": [d.summary() for d in densities],
    }
    with open(out, "w") as f:
        f.write(_json_lines(result))
    name = os.path.basename(os.path.abspath(args.ckpt))
    chose = "fallback: default layers, tertiles" if chosen is None else f"L* = {result['layers']}"
    title = f"{name}, {len(plan.records)} prompts: {chose}, thresholds {result['thresholds']}"
    plot_densities(densities, layers if chosen else (), result["thresholds"], plot_path, title)
    print(
        f"{len(plan.records)} prompts, {result['tokens']} generated tokens measured per layer; "
        f"layers {result['layers']}, thresholds {result['thresholds']}"
        + (" (fallback: no tri-modal layer)" if chosen is None else "")
    )
    print(f"wrote {out} and {plot_path}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    runner.add_model_input_args(p)
    p.add_argument("--input", required=True, help='JSONL: {"question"}, {"prompt"} or {"messages"} per line')
    p.add_argument("--out", help=f"the calibration file (default CKPT/{THINKV_CALIBRATION_FILE})")
    p.add_argument("--plot", help="the density plot, PNG (default: --out with .png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing calibration file and plot")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts (the paper uses ~100)")
    p.add_argument(
        "--prompt-template", default=DEFAULT_PROMPT, help="the user message of a question; {question} is it"
    )
    p.add_argument(
        "--min-mass",
        type=float,
        default=DEFAULT_MIN_MASS,
        help="tri-modal: the least fraction of samples a mode holds",
    )
    p.add_argument(
        "--max-dip",
        type=float,
        default=DEFAULT_MAX_DIP,
        help="tri-modal: the largest density at a minimum, as a fraction of its lower neighbouring peak",
    )
    runner.add_sampling_args(p)
    return p


def main(argv=None) -> int:
    return runner.cli_main(run, build_parser(), PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
