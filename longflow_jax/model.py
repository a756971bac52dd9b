"""Llama / Qwen2 / Qwen3 decoder as pure functions over a params pytree.

Params layout (what `convert` writes and `param_shapes` describes):
  embed [V, Dm]; final_norm [Dm]; lm_head [Dm, V] (absent when embeddings are tied)
  layers: a list, one dict per layer:
    input_norm [Dm], wq [Dm, Hq*D], wk [Dm, Hkv*D], wv [Dm, Hkv*D], wo [Hq*D, Dm],
    bq/bk/bv (qkv_bias), bo (o_bias), q_norm/k_norm [D] (qk_norm),
    post_norm [Dm], w_gate [Dm, F], w_up [Dm, F], w_down [F, Dm]
Weights are stored [in, out] so a projection is `x @ w`. Layers are a Python list (not stacked) so the
decode step updates each layer's cache buffer in place without slicing a stacked array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig


def param_shapes(config: ModelConfig) -> dict:
    """The expected params pytree as jax.ShapeDtypeStruct leaves."""
    dt = config.param_dtype
    dm, d, f = config.hidden_size, config.head_dim, config.intermediate_size
    hq, hkv = config.num_heads * d, config.num_kv_heads * d

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, dt)

    def layer():
        out = {
            "input_norm": s(dm),
            "wq": s(dm, hq),
            "wk": s(dm, hkv),
            "wv": s(dm, hkv),
            "wo": s(hq, dm),
            "post_norm": s(dm),
            "w_gate": s(dm, f),
            "w_up": s(dm, f),
            "w_down": s(f, dm),
        }
        if config.qkv_bias:
            out.update(bq=s(hq), bk=s(hkv), bv=s(hkv))
        if config.o_bias:
            out["bo"] = s(dm)
        if config.qk_norm:
            out.update(q_norm=s(d), k_norm=s(d))
        return out

    params = {
        "embed": s(config.vocab_size, dm),
        "layers": [layer() for _ in range(config.num_layers)],
        "final_norm": s(dm),
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = s(dm, config.vocab_size)
    return params


def init_random_params(config: ModelConfig, seed: int = 0, scale: float = 0.02) -> dict:
    """Random weights of the right shapes (benchmarks and demos; speed does not depend on values)."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))

    def make(key, sd):
        if len(sd.shape) == 1:  # norms and biases
            return jnp.ones(sd.shape, sd.dtype) + 0.01 * jax.random.normal(key, sd.shape, sd.dtype)
        return (scale * jax.random.normal(key, sd.shape, jnp.float32)).astype(sd.dtype)

    return jax.tree_util.tree_unflatten(treedef, [make(k, sd) for k, sd in zip(keys, leaves)])


def rms_norm(x, weight, eps):
    """HF RMSNorm: normalise in float32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [D/2] in float64 numpy, with llama3 scaling applied when configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    sc = config.rope_scaling
    if sc is None:
        return inv_freq
    # Llama 3.1 scaling: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
    low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
    high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / sc.factor, inv_freq)
    smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled)


def apply_rope(x, positions, inv_freq):
    """Rotate-half RoPE (HF convention). x [..., T, H, D]; positions [..., T] int."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [..., T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[..., None, :]  # [..., T, 1, D]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def project_qkv(layer, config: ModelConfig, x, positions):
    """x [B, T, Dm] -> post-RoPE q [B, T, Hq, D], k, v [B, T, Hkv, D]."""
    b, t, _ = x.shape
    d = config.head_dim
    q = x @ layer["wq"]
    k = x @ layer["wk"]
    v = x @ layer["wv"]
    if config.qkv_bias:
        q, k, v = q + layer["bq"], k + layer["bk"], v + layer["bv"]
    q = q.reshape(b, t, config.num_heads, d)
    k = k.reshape(b, t, config.num_kv_heads, d)
    v = v.reshape(b, t, config.num_kv_heads, d)
    if config.qk_norm:
        q = rms_norm(q, layer["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, layer["k_norm"], config.rms_norm_eps)
    inv_freq = rope_inv_freq(config)
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def project_out(layer, config: ModelConfig, attn):
    """attn [..., Hq, D] -> [..., Dm]."""
    out = attn.reshape(*attn.shape[:-2], -1).astype(layer["wo"].dtype) @ layer["wo"]
    if config.o_bias:
        out = out + layer["bo"]
    return out


def mlp(layer, x):
    return (jax.nn.silu(x @ layer["w_gate"]) * (x @ layer["w_up"])) @ layer["w_down"]


def causal_attention(q, k, v, scale):
    """Prefill attention, float32 softmax. q [B, T, Hq, D]; k, v [B, T, Hkv, D] -> [B, T, Hq, D].

    With right-padded prompts the causal mask alone keeps real tokens off the padding.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    causal = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(causal, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)


def attention_scale(config: ModelConfig) -> float:
    return config.head_dim**-0.5


def decoder_layer(layer, config: ModelConfig, x, positions, attend):
    """One pre-norm decoder layer, for prefill and decode alike.

    x [B, T, Dm], positions [B, T]; attend(q, k, v) gets the post-RoPE q [B, T, Hq, D], k, v [B, T, Hkv, D]
    and returns (attention output [B, T, Hq, D], anything). Returns (x [B, T, Dm], that anything).
    """
    h = rms_norm(x, layer["input_norm"], config.rms_norm_eps)
    q, k, v = project_qkv(layer, config, h, positions)
    attn, aux = attend(q, k, v)
    x = x + project_out(layer, config, attn)
    x = x + mlp(layer, rms_norm(x, layer["post_norm"], config.rms_norm_eps))
    return x, aux


def forward(params, config: ModelConfig, tokens, layer_hook=None):
    """Causal forward over right-padded tokens [B, T]; returns final-normed hidden states [B, T, Dm].

    layer_hook(i, q, k, v), if given, sees each layer's post-RoPE q, k, v (prefill builds the cache
    from them) and its return values are collected into a list returned as the second result.
    """
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = params["embed"][tokens]
    scale = attention_scale(config)
    collected = []
    for i, layer in enumerate(params["layers"]):

        def attend(q, k, v, i=i):
            return causal_attention(q, k, v, scale), layer_hook(i, q, k, v) if layer_hook else None

        x, hooked = decoder_layer(layer, config, x, positions, attend)
        collected.append(hooked)
    return rms_norm(x, params["final_norm"], config.rms_norm_eps), collected if layer_hook else []


def logits_from_hidden(params, config: ModelConfig, hidden):
    """hidden [..., Dm] -> float32 logits [..., V]."""
    head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
    return jnp.matmul(hidden, head, preferred_element_type=jnp.float32)
