"""How much quantizing a real model's keys moves its attention: no treatment, the Hadamard rotation the
quantized buffer uses, or a per-channel smoothing scale calibrated at prefill.

    python scripts/key_outliers.py --ckpt CKPT --input problems.jsonl [--problems 4] [--new-tokens 192]

For each problem: the full cache generates greedily, then one causal forward over prompt + generation
collects every layer's post-RoPE q and k. Keys are quantized per token as the buffer does (`quantize`,
groups along head_dim); values stay exact, so only the keys' error shows. Per kind and treatment the
table gives, over all layers, heads and query rows of the generated part: the mean KL(exact || quantized)
of the attention distribution, and the relative L2 error of the attention output.
- hadamard: k H and q H (H orthogonal, so q.k is unchanged), as `pallas_kernels/quant.py` does.
- smoothing: k / s and q * s with s_c = sqrt(max |k_c|) over the prompt's tokens (SmoothQuant's
  alpha = 0.5 with q unquantized): calibrated at prefill, applied to every later token.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
import longflow_jax as lf  # noqa: E402
from longflow_jax.eval_math import DEFAULT_PROMPT, validate_problem  # noqa: E402
from longflow_jax.jsonl_io import read_jsonl_records  # noqa: E402
from longflow_jax.model import forward  # noqa: E402
from longflow_jax.runner import encode  # noqa: E402
from pallas_kernels.quant import dequantize, hadamard_matrix, quantize  # noqa: E402

KINDS = ("int8", "fp8", "int4", "int2")
TREATMENTS = ("none", "hadamard", "smoothing")


def attention(q, k, v, start):
    """Causal attention of query rows start.. over all keys: q [T, Hq, D], k, v [T, Hkv, D] ->
    (probabilities [Hq, T - start, T], output [T - start, Hq, D]) in float64."""
    t, hq, d = q.shape
    group = hq // k.shape[1]
    kk, vv = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    logits = np.einsum("thd,shd->hts", q[start:], kk) / np.sqrt(d)
    rows = np.arange(start, t)[:, None]
    logits = np.where(np.arange(t)[None, :] <= rows, logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return p, np.einsum("hts,shd->thd", p, vv)


def treated(q, k, treatment, prompt_len):
    if treatment == "hadamard":
        h = hadamard_matrix(q.shape[-1]).astype(np.float64)
        return q @ h, k @ h
    if treatment == "smoothing":
        s = np.sqrt(np.maximum(np.abs(k[:prompt_len]).max(axis=(0, 1)), 1e-6))
        return q * s, k / s
    return q, k


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--input", required=True, help="problems JSONL (question / true_answer)")
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=192)
    ap.add_argument("--group", type=int, default=32, help="kv_quant_group")
    args = ap.parse_args(argv)
    config, params = lf.load(args.ckpt, dtype="float32")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.ckpt)
    problems = read_jsonl_records(args.input, validate_problem, id_from_line=True)[0][: args.problems]
    kl = {(kind, t): [] for kind in KINDS for t in TREATMENTS}
    err = {key: [] for key in kl}
    for record in problems:
        prompt = encode(tokenizer, "prompt", DEFAULT_PROMPT.replace("{question}", record.data[0]), True, {})
        ids = np.asarray([prompt], np.int32)
        out = lf.generate(
            params, config, ids, np.asarray([len(prompt)], np.int32), max_new_tokens=args.new_tokens
        )
        seq = np.concatenate([prompt, np.asarray(out.tokens)[0, : int(out.lengths[0])]])[None]
        _, qkv = jax.jit(forward, static_argnums=(1, 3))(
            params, config, jnp.asarray(seq), lambda i, q, k, v: (q[0], k[0], v[0])
        )
        for q, k, v in qkv:
            q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
            p, o = attention(q, k, v, len(prompt))
            for treatment in TREATMENTS:
                tq, tk = treated(q, k, treatment, len(prompt))
                for kind in KINDS:
                    payload, scale, zero = quantize(jnp.asarray(tk, jnp.float32), kind, args.group)
                    kq = np.asarray(dequantize(payload, scale, zero, kind, args.group), np.float64)
                    pq, oq = attention(tq, kq, v, len(prompt))
                    with np.errstate(divide="ignore", invalid="ignore"):
                        terms = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(pq, 1e-300))), 0.0)
                    kl[kind, treatment].append(terms.sum(-1).mean())
                    err[kind, treatment].append(np.linalg.norm(oq - o) / np.linalg.norm(o))
    print(f"{len(problems)} problems, {args.new_tokens} new tokens, {config.num_layers} layers, "
          f"group {args.group}: KL(exact || quantized keys) per attention row, mean over layers and rows; "
          f"relative L2 error of the attention output")  # fmt: skip
    print("\n| kv_quant | " + " | ".join(f"{t}: KL | {t}: out err" for t in TREATMENTS) + " |")
    print("|---|" + "---:|" * 2 * len(TREATMENTS))
    for kind in KINDS:
        cells = [f"{np.mean(kl[kind, t]):.2e} | {np.mean(err[kind, t]):.2e}" for t in TREATMENTS]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
