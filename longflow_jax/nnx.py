"""Flax `nnx` front end: the decoder as modules, and a drop-in compressed-cache attention layer.

The modules hold the weights (`nnx.Embed`, `nnx.Linear`, `nnx.RMSNorm`); the math is the functional
core's (`model.py`, `attention.py`, `kv_cache.py`, `snapkv.py`), called on the params pytree the modules
expose (`params()`, the layout `model.py` documents), so the two paths cannot drift apart. The norm
modules only hold scales: the core's `rms_norm` (Hugging Face's: cast back before scaling) runs, not
`nnx.RMSNorm.__call__`.

Every weight carries a Megatron tensor-parallel annotation for a ("data", "model") mesh
(`nnx.with_partitioning`, `sharding.param_spec`): the q/k/v, gate and up projections split their output
columns (heads, intermediate) over "model", the o and down projections their input rows, the embedding
and the lm_head the vocabulary; norms and the o bias are replicated, and nothing is split over "data".
A dimension that does not divide by the "model" axis of the mesh the module is built under is
replicated (KV heads included), as `sharding.param_partition_specs` has it; without a mesh every split
is annotated. Under a mesh (`jax.set_mesh`) the weights are sharded as they are created;
`nnx.get_partition_spec` reads the specs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.quant import check_kv_quant

from .attention import check_attention_impl, decode_attention, with_kernel_state
from .config import CompressionConfig, ModelConfig
from .convert import load
from .generate import (
    FULL,
    buffer_capacity,
    build_layer_cache,
    check_free_slot,
    check_params,
    effective_compression,
)
from .kv_cache import KVCache, write_token
from .model import (
    attention_scale,
    causal_attention,
    forward,
    logits_from_hidden,
    project_out,
    project_qkv,
)
from .sharding import MODEL, param_spec

REPLICATED = (None,)


def _spec(name: str, config: ModelConfig) -> tuple:
    """Weight `name`'s spec (`sharding.param_spec`) for the "model" axis of the mesh being built under;
    without one, Megatron's split whole (nothing to fail to divide yet)."""
    mesh = jax.sharding.get_abstract_mesh()
    model_size = 1 if mesh.empty or MODEL not in mesh.axis_names else mesh.shape[MODEL]
    return tuple(param_spec(name, 2, config, model_size))


def _annotated(init, spec):
    """`init` with its partition spec. Without a mesh there is nothing to shard onto yet, so the
    weight is created whole and keeps the spec as metadata."""
    no_mesh = jax.sharding.get_abstract_mesh().empty
    return nnx.with_partitioning(init, spec, **({"eager_sharding": False} if no_mesh else {}))


def _linear(n_in: int, n_out: int, name: str, use_bias: bool, config: ModelConfig, rngs: nnx.Rngs):
    spec = _spec(name, config)
    return nnx.Linear(
        n_in,
        n_out,
        use_bias=use_bias,
        param_dtype=config.param_dtype,
        kernel_init=_annotated(nnx.initializers.lecun_normal(), spec),
        bias_init=_annotated(nnx.initializers.zeros_init(), spec[1:]),
        rngs=rngs,
    )


def _norm(size: int, config: ModelConfig, rngs: nnx.Rngs):
    return nnx.RMSNorm(
        size,
        epsilon=config.rms_norm_eps,
        param_dtype=config.param_dtype,
        scale_init=_annotated(nnx.initializers.ones_init(), REPLICATED),
        rngs=rngs,
    )


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _values(variables):
    """A pytree of nnx Variables -> the same pytree of their arrays (no copy)."""
    return jax.tree.map(lambda v: v.get_value(), variables, is_leaf=_is_variable)


def _check_lengths(lengths, batch: int, prompt_len: int) -> None:
    """lengths: [batch] integer token counts in [1, prompt_len] (the values when they are concrete), as
    `generate` checks its prompt_lengths: a row of 0 tokens, or more than the prompt holds, was built into
    a cache of the wrong tokens without a word."""
    shape = tuple(getattr(lengths, "shape", np.shape(lengths)))
    dtype = jnp.result_type(lengths if hasattr(lengths, "dtype") else np.asarray(lengths))
    if shape != (batch,) or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"lengths must be [{batch}] integer token counts, got {dtype} {shape}")
    if not isinstance(lengths, jax.core.Tracer):
        values = np.asarray(lengths)
        bad = np.flatnonzero((values < 1) | (values > prompt_len))
        if bad.size:
            raise ValueError(
                f"lengths must be in [1, {prompt_len}] (the prompt's width); row {int(bad[0])} has "
                f"{int(values[bad[0]])}"
            )


class KVCacheState(nnx.Variable):
    """A `CompressedAttention` layer's cache (`kv_cache.LayerCache`) as nnx state; None before `prefill`."""


class CompressedAttention(nnx.Module):
    """GQA attention with RoPE over LongFlow's fixed-capacity slot buffer, held as `KVCacheState`.

    config: the attention's shapes and RoPE (hidden_size, num_heads, num_kv_heads, head_dim, rope_theta,
    rope_scaling, qkv_bias, o_bias, qk_norm, rms_norm_eps); its other fields are not used here.
    compression: the cache policy (None: the full cache), kv_quant included; attention_impl:
    "reference", "pallas" or "triton", as in `generate`. Each `prefill` sets `cache_compression`, the
    policy its cache then runs under: `compression`, or the full cache when the budget holds the prompt
    and every new token (`generate.effective_compression`, as in `generate`).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        compression: CompressionConfig | None = None,
        attention_impl: str = "reference",
        rngs: nnx.Rngs,
    ):
        compression = FULL if compression is None else compression
        if not isinstance(compression, CompressionConfig):
            raise ValueError(f"compression must be a CompressionConfig, got {type(compression).__name__}")
        check_attention_impl(attention_impl, compression)
        if compression.policy == "thinkv":  # its segment table spans the layers: generate only
            raise ValueError("policy 'thinkv' runs in generate and decode_step, not in CompressedAttention")
        if compression.kv_quant is not None:
            check_kv_quant(compression.kv_quant, compression.kv_quant_group, config.head_dim)
        self.config, self.compression, self.attention_impl = config, compression, attention_impl
        self.cache_compression = None
        dm, d = config.hidden_size, config.head_dim
        hq, hkv = config.num_heads * d, config.num_kv_heads * d
        self.wq = _linear(dm, hq, "wq", config.qkv_bias, config, rngs)
        self.wk = _linear(dm, hkv, "wk", config.qkv_bias, config, rngs)
        self.wv = _linear(dm, hkv, "wv", config.qkv_bias, config, rngs)
        self.wo = _linear(hq, dm, "wo", config.o_bias, config, rngs)
        self.q_norm = _norm(d, config, rngs) if config.qk_norm else None
        self.k_norm = _norm(d, config, rngs) if config.qk_norm else None
        self.cache = KVCacheState(None)

    def param_variables(self) -> dict:
        """This layer's entries of `model.py`'s layer dict, with the nnx.Param objects as leaves."""
        out = {"wq": self.wq.kernel, "wk": self.wk.kernel, "wv": self.wv.kernel, "wo": self.wo.kernel}
        if self.config.qkv_bias:
            out.update(bq=self.wq.bias, bk=self.wk.bias, bv=self.wv.bias)
        if self.config.o_bias:
            out["bo"] = self.wo.bias
        if self.config.qk_norm:
            out.update(q_norm=self.q_norm.scale, k_norm=self.k_norm.scale)
        return out

    def prefill(self, x, positions, lengths, max_new_tokens: int):
        """Causal attention over right-padded prompts, and the cache built from them (replacing any).

        x [B, P, Dm] (already normed), positions [B, P] int (the RoPE positions; the causal mask is over
        the index, as in `model.forward`), lengths [B] int in [1, P]. The buffer gets room for
        max_new_tokens more tokens, capped by a compressing budget (`generate.buffer_capacity`), and is
        built as `generate.prefill` builds each layer's (`generate.build_layer_cache`). Returns
        [B, P, Dm].
        """
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        _check_lengths(lengths, x.shape[0], x.shape[1])
        layer = _values(self.param_variables())
        q, k, v = project_qkv(layer, self.config, x, positions)
        compression = effective_compression(self.compression, x.shape[1], max_new_tokens)
        capacity = buffer_capacity(compression, x.shape[1], max_new_tokens)
        cache = build_layer_cache(q, k, v, lengths, compression, capacity)
        self.cache_compression = compression
        self.cache.set_value(with_kernel_state(KVCache(layers=[cache]), self.attention_impl).layers[0])
        return project_out(layer, self.config, causal_attention(q, k, v, attention_scale(self.config)))

    def decode(self, x, positions, key=None):
        """One token per row: x [B, 1, Dm] (already normed) at positions [B] -> [B, 1, Dm].

        The token's K/V go into the slot the policy chose last step, the token attends to the buffer,
        and the policy chooses the next slot (`attention.decode_attention`). key: a PRNG key, needed
        (a fresh one per step) by the "random" policy only.
        """
        if key is None and self.compression.policy == "random":
            raise ValueError("policy 'random' needs a PRNG key per decode step, got key=None")
        cache = self.cache.get_value()
        if cache is None:
            raise ValueError("CompressedAttention.decode needs a cache: call prefill first")
        if self.cache_compression.policy == "full":
            check_free_slot(cache)
        layer = _values(self.param_variables())
        q, k, v = project_qkv(layer, self.config, x, positions[:, None])
        cache = write_token(cache, k[:, 0], v[:, 0], positions)
        scale = attention_scale(self.config)
        attn, cache = decode_attention(
            q[:, 0], cache, positions, scale, self.cache_compression, self.attention_impl, key
        )
        self.cache.set_value(cache)
        return project_out(layer, self.config, attn[:, None])


class DecoderLayer(nnx.Module):
    """One pre-norm decoder layer's weights: norms, a `CompressedAttention`, the SwiGLU MLP."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dm, f = config.hidden_size, config.intermediate_size
        self.input_norm = _norm(dm, config, rngs)
        self.attention = CompressedAttention(config, rngs=rngs)
        self.post_norm = _norm(dm, config, rngs)
        self.w_gate = _linear(dm, f, "w_gate", False, config, rngs)
        self.w_up = _linear(dm, f, "w_up", False, config, rngs)
        self.w_down = _linear(f, dm, "w_down", False, config, rngs)

    def param_variables(self) -> dict:
        """`model.py`'s layer dict, with the nnx.Param objects as leaves."""
        return {
            "input_norm": self.input_norm.scale,
            **self.attention.param_variables(),
            "post_norm": self.post_norm.scale,
            "w_gate": self.w_gate.kernel,
            "w_up": self.w_up.kernel,
            "w_down": self.w_down.kernel,
        }


class Decoder(nnx.Module):
    """The Llama / Qwen2 / Qwen3 decoder as an nnx module; `params()` is `model.py`'s params pytree.

    Decoder(config, rngs=...) initialises fresh weights; `from_params` and `from_checkpoint` wrap
    existing ones. Call it on tokens for logits; `longflow_jax.generate(decoder, prompt_ids,
    prompt_lengths, ...)` generates from it (`params_and_config`).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a longflow_jax.ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            param_dtype=config.param_dtype,
            embedding_init=_annotated(nnx.initializers.normal(0.02), _spec("embed", config)),
            rngs=rngs,
        )
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = _norm(config.hidden_size, config, rngs)
        tied = config.tie_word_embeddings
        self.lm_head = (
            None if tied else _linear(config.hidden_size, config.vocab_size, "lm_head", False, config, rngs)
        )

    @classmethod
    def from_params(cls, config: ModelConfig, params: dict) -> Decoder:
        """A Decoder around these arrays (no copy): the module is built abstractly (`nnx.eval_shape`,
        nothing allocated) and its Params then hold the given arrays, wherever they are placed."""
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a longflow_jax.ModelConfig, got {type(config).__name__}")
        check_params(params, config)
        decoder = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
        variables = jax.tree.leaves(decoder.param_variables(), is_leaf=_is_variable)
        for variable, array in zip(variables, jax.tree.leaves(params), strict=True):
            variable.set_value(array)
        return decoder

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str, dtype: str | None = None, sharding=None) -> Decoder:
        """A converted checkpoint (`longflow_jax.load`: restored by orbax straight onto `sharding`,
        default the first device), wrapped without a second copy."""
        return cls.from_params(*load(ckpt_dir, dtype=dtype, sharding=sharding))

    def param_variables(self) -> dict:
        """`model.py`'s params pytree, with the nnx.Param objects as leaves."""
        out = {
            "embed": self.embed.embedding,
            "layers": [layer.param_variables() for layer in self.layers],
            "final_norm": self.final_norm.scale,
        }
        if self.lm_head is not None:
            out["lm_head"] = self.lm_head.kernel
        return out

    def params(self) -> dict:
        """`model.py`'s params pytree of this module's arrays (the same arrays, not copies)."""
        return _values(self.param_variables())

    def params_and_config(self) -> tuple[dict, ModelConfig]:
        """(params(), config): what `longflow_jax.generate` and `compile_generate` run on."""
        return self.params(), self.config

    def __call__(self, tokens):
        """Causal forward over right-padded tokens [B, T] -> float32 logits [B, T, V] (`model.forward`)."""
        params = self.params()
        hidden, _ = forward(params, self.config, tokens)
        return logits_from_hidden(params, self.config, hidden)
