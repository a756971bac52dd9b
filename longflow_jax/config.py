"""Frozen dataclass configs. Hugging Face `config.json` fields are mapped here, once."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import warnings
from typing import Any

import jax.numpy as jnp

from pallas_kernels.quant import KV_QUANT_KINDS

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, name: str, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def dtype_from_name(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """`rope_scaling` / `rope_parameters` of rope_type "llama3" (Llama 3.1+)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        # transformers' validator's ranges: a factor of 0 or NaN made every logit NaN (pad tokens only).
        name = "llama3 rope scaling field"
        _check(
            _is_finite(self.factor) and self.factor >= 1,
            f"{name} 'factor'",
            "a finite number >= 1",
            self.factor,
        )
        low, high = self.low_freq_factor, self.high_freq_factor
        _check(_is_finite(low) and low > 0, f"{name} 'low_freq_factor'", "a finite number > 0", low)
        _check(
            _is_finite(high) and high > low,
            f"{name} 'high_freq_factor'",
            f"a finite number > low_freq_factor {low}",
            high,
        )
        original = self.original_max_position_embeddings
        _check(
            _is_int(original) and original >= 1,
            f"{name} 'original_max_position_embeddings'",
            "a positive int",
            original,
        )
        for field in ("factor", "low_freq_factor", "high_freq_factor"):  # an int in JSON reads as a float
            object.__setattr__(self, field, float(getattr(self, field)))
        object.__setattr__(self, "original_max_position_embeddings", int(original))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # qwen2 always; llama/qwen3 when attention_bias
    o_bias: bool = False  # llama/qwen3 when attention_bias
    qk_norm: bool = False  # qwen3: RMSNorm over head_dim on q and k before RoPE
    rope_scaling: Llama3RopeScaling | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    dtype: str = "float32"  # parameter dtype as stored in the checkpoint

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
            )
        for field in _SIZE_FIELDS:
            value = getattr(self, field)
            _check(_is_int(value) and value >= 1, field, "a positive int", value)
        eps, theta = self.rms_norm_eps, self.rope_theta
        _check(_is_finite(eps) and eps >= 0, "rms_norm_eps", "a finite number >= 0", eps)
        _check(_is_finite(theta) and theta > 0, "rope_theta", "a finite number > 0", theta)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        _check(self.head_dim % 2 == 0, "head_dim", "even for RoPE", self.head_dim)
        eos, pad, vocab = self.eos_token_ids, self.pad_token_id, self.vocab_size
        ids_ok = isinstance(eos, tuple) and all(_is_int(i) and 0 <= i < vocab for i in eos)
        _check(ids_ok, "eos_token_ids", f"a tuple of token ids in [0, {vocab})", eos)
        _check(_is_int(pad) and 0 <= pad < vocab, "pad_token_id", f"a token id in [0, {vocab})", pad)
        dtype_from_name(self.dtype)

    @property
    def param_dtype(self):
        return dtype_from_name(self.dtype)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], generation_config: dict[str, Any] | None = None) -> ModelConfig:
        """Map a Hugging Face config.json (transformers 4.x or 5.x field names) to a ModelConfig; anything
        this decoder does not implement raises ValueError naming the field."""
        if not isinstance(hf, dict):
            raise ValueError(f"config.json must hold a JSON object, got a {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} in config.json; supported: {SUPPORTED_MODEL_TYPES}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: only 'silu' (SwiGLU) is implemented")
        if _hf_bool(hf, "use_sliding_window"):
            raise ValueError("unsupported option use_sliding_window=true: only full attention is implemented")
        layer_types = hf.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"unsupported layer_types {sorted(set(layer_types))}: only full_attention")
        if _hf_bool(hf, "mlp_bias"):
            raise ValueError("unsupported option mlp_bias=true")

        # transformers 5 nests rope settings in rope_parameters; 4.x has rope_theta + rope_scaling. As in
        # transformers, a rope_scaling beside rope_parameters wins (5.x saves a default rope_parameters in
        # every config, and long-context instructions add a rope_scaling block to it).
        for field in ("rope_parameters", "rope_scaling"):
            value = hf.get(field)
            _check(
                value is None or isinstance(value, dict),
                f"config.json field {field!r}",
                "a JSON object",
                value,
            )
        parameters = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or parameters
        rope_theta = scaling.get("rope_theta", parameters.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = scaling.get("rope_type") or scaling.get("type")
        rope_scaling = None
        if rope_type == "llama3":
            missing = [f for f in _LLAMA3_FIELDS if f not in scaling]
            if missing:
                raise ValueError(f"llama3 rope scaling is missing field {missing[0]!r}")
            rope_scaling = Llama3RopeScaling(**{f: scaling[f] for f in _LLAMA3_FIELDS})
        elif rope_type not in (None, "default"):
            raise ValueError(f"unsupported rope scaling type {rope_type!r}: only default and 'llama3'")
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("unsupported option partial_rotary_factor != 1")

        sizes = {field: _hf_size(hf, field) for field in _HF_REQUIRED_SIZES}
        num_heads, hidden = sizes["num_attention_heads"], sizes["hidden_size"]
        num_kv_heads = (
            num_heads if hf.get("num_key_value_heads") is None else _hf_size(hf, "num_key_value_heads")
        )
        if hf.get("head_dim") is not None:
            head_dim = _hf_size(hf, "head_dim")
        elif hidden % num_heads:
            raise ValueError(
                f"config.json: hidden_size ({hidden}) is not a multiple of num_attention_heads "
                f"({num_heads}) and there is no head_dim"
            )
        else:
            head_dim = hidden // num_heads
        attention_bias = _hf_bool(hf, "attention_bias")
        gen = generation_config or {}
        eos = _as_id_tuple(hf.get("eos_token_id"), "eos_token_id")
        eos = tuple(dict.fromkeys(eos + _as_id_tuple(gen.get("eos_token_id"), "generation eos_token_id")))
        # A negative pad id (-1 in some Llama configs) means none, as an absent one does.
        pads = [p for p in (hf.get("pad_token_id"), gen.get("pad_token_id")) if p is not None]
        for p in pads:
            _check(_is_int(p), "config.json field 'pad_token_id'", "a token id (an int)", p)
        pads = [p for p in pads if p >= 0]
        pad = pads[0] if pads else eos[0] if eos else 0
        max_len = (
            _HF_DEFAULT_MAX_POSITIONS[model_type]
            if hf.get("max_position_embeddings") is None
            else _hf_size(hf, "max_position_embeddings")
        )
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        dtype = "float32" if dtype == "float64" else dtype  # the decoder's widest; safetensors F64 reads
        if dtype not in DTYPES:
            raise ValueError(f"unsupported checkpoint dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        return cls(
            model_type=model_type,
            vocab_size=sizes["vocab_size"],
            hidden_size=hidden,
            intermediate_size=sizes["intermediate_size"],
            num_layers=sizes["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_hf_number("rms_norm_eps", hf.get("rms_norm_eps", 1e-6)),
            rope_theta=_hf_number("rope_theta", rope_theta),
            max_position_embeddings=max_len,
            tie_word_embeddings=_hf_bool(hf, "tie_word_embeddings"),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            qk_norm=model_type == "qwen3",
            rope_scaling=rope_scaling,
            eos_token_ids=eos,
            pad_token_id=int(pad),
            dtype=dtype,
        )

    @classmethod
    def from_pretrained_dir(cls, path: str) -> ModelConfig:
        """Read config.json (and generation_config.json when present) from a directory."""
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(f"no config.json in {path!r}")
        hf = _read_json(config_path)
        gen_path = os.path.join(path, "generation_config.json")
        gen = _read_json(gen_path) if os.path.isfile(gen_path) else None
        if gen is not None and not isinstance(gen, dict):
            raise ValueError(f"{gen_path} must hold a JSON object, got a {type(gen).__name__}")
        return cls.from_hf_dict(hf, gen)


# ModelConfig's size fields, and the config.json fields with no default; all must be positive ints.
_SIZE_FIELDS = (
    "vocab_size hidden_size intermediate_size num_layers num_heads num_kv_heads head_dim "
    "max_position_embeddings"
).split()
_HF_REQUIRED_SIZES = "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads".split()


def _hf_size(hf: dict, field: str) -> int:
    if field not in hf:
        raise ValueError(f"config.json is missing the required field {field!r}")
    value = hf[field]
    _check(_is_int(value) and value >= 1, f"config.json field {field!r}", "a positive int", value)
    return int(value)


def _read_json(path: str):
    with open(path, "rb") as f:
        try:
            return json.load(f)
        except ValueError as e:  # also UnicodeDecodeError
            raise ValueError(f"{path} is not valid JSON: {e}") from None


_LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# transformers' defaults where config.json leaves max_position_embeddings out (generate's hard limit).
_HF_DEFAULT_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "qwen3": 32768}


def _hf_bool(hf: dict, field: str) -> bool:
    """config.json's yes/no `field` (false when absent): a JSON boolean; the string "false" is refused, as
    transformers refuses it (bool("false") is True)."""
    value = hf.get(field, False)
    _check(value is None or isinstance(value, bool), f"config.json field {field!r}", "true or false", value)
    return bool(value)


def _hf_number(field: str, value) -> float:
    """config.json's `field`, read as `value`: a finite number."""
    _check(_is_finite(value), f"config.json field {field!r}", "a finite number", value)
    return float(value)


def _as_id_tuple(value, field: str) -> tuple[int, ...]:
    """config.json's eos ids: an int, a list of ints, or absent; strings and floats are refused (a
    string "12" iterated would be the ids 1 and 2)."""
    if value is None:
        return ()
    ids = [value] if not isinstance(value, (list, tuple)) else list(value)
    _check(all(_is_int(i) and i >= 0 for i in ids), f"config.json field {field!r}",
           "a token id or a list of them (ints >= 0)", value)  # fmt: skip
    return tuple(int(i) for i in ids)


MIN_TEMPERATURE = 1e-6  # the smallest temperature a sampling run takes (0 is greedy)

POLICIES = ("full", "longflow", "streaming", "h2o", "tova", "random", "rkv", "thinkv")
# R-KV's observation window (rkv.py): its budget must leave room for more than the window.
RKV_WINDOW = 8

# ThinKV's stored precisions: the bits a thought type's tokens keep, as a kv_quant kind; 16 is the
# model's dtype (not quantized).
_THINKV_BITS = {"2": "int2", "4": "int4", "8": "int8", "16": None}
_THINKV_PRECISIONS = re.compile(r"R(2|4|8|16)E(2|4|8|16)T(2|4|8|16)")
# Used, with a warning, for a model without calibration (docs/THINKV.md): the sparsity layers L* at
# 1/5 .. 4/5 of the depth, and placeholder thresholds (not measured: calibration replaces them).
THINKV_DEFAULT_LAYER_FRACTIONS = (0.2, 0.4, 0.6, 0.8)
THINKV_DEFAULT_THRESHOLDS = (0.5, 0.8)
# longflow-calibrate-thinkv writes it into the checkpoint, and --policy thinkv reads it from there.
THINKV_CALIBRATION_FILE = "thinkv.json"


@dataclasses.dataclass(frozen=True)
class ThinKVConfig:
    """ThinKV's settings (docs/THINKV.md), for CompressionConfig(policy="thinkv", thinkv=...).

    tau: generated tokens per segment; each full segment gets one thought type.
    schedule: tokens a segment keeps at each retention level, strictly decreasing, schedule[0] <= tau;
      a segment enters at level 0 and never goes below the last level.
    precisions: the bits each thought type is stored at, "R<bits>E<bits>T<bits>" with bits 2, 4, 8
      (int2, int4, int8 with kv_quant_group elements per scale) or 16 (the model's dtype): the paper's
      "R4E4T2" by default.
    layers: the calibrated layers L* whose attention sparsity types the segments; None: the default
      layers (THINKV_DEFAULT_LAYER_FRACTIONS of the depth), with a warning.
    thresholds: (lo, hi) in [0, 1], lo <= hi: a segment's mean sparsity below lo is execution, in
      [lo, hi) reasoning, at hi or above transition; None: THINKV_DEFAULT_THRESHOLDS, with a warning.
    `from_calibration` reads layers and thresholds from a calibration file.
    """

    tau: int = 128
    schedule: tuple[int, ...] = (64, 32, 16, 8, 4)
    precisions: str = "R4E4T2"
    layers: tuple[int, ...] | None = None
    thresholds: tuple[float, float] | None = None

    def __post_init__(self):
        _check(_is_int(self.tau) and self.tau >= 1, "thinkv tau", "a positive int", self.tau)
        sched = self.schedule
        ok = (
            isinstance(sched, tuple | list)
            and len(sched) >= 1
            and all(_is_int(n) and n >= 1 for n in sched)
            and all(a > b for a, b in zip(sched, sched[1:]))
            and sched[0] <= self.tau
        )
        _check(
            ok, "thinkv schedule", f"positive ints, strictly decreasing, the first <= tau ({self.tau})", sched
        )
        object.__setattr__(self, "schedule", tuple(int(n) for n in sched))
        prec = self.precisions
        ok = isinstance(prec, str) and _THINKV_PRECISIONS.fullmatch(prec) is not None
        _check(
            ok, "thinkv precisions", "'R<bits>E<bits>T<bits>' with bits 2, 4, 8 or 16, such as 'R4E4T2'", prec
        )
        layers = self.layers
        if layers is not None:
            ok = isinstance(layers, tuple | list) and len(layers) >= 1
            ok = ok and all(_is_int(i) and i >= 0 for i in layers) and len(set(layers)) == len(layers)
            _check(ok, "thinkv layers", "None or distinct layer indices >= 0", layers)
            object.__setattr__(self, "layers", tuple(sorted(int(i) for i in layers)))
        th = self.thresholds
        if th is not None:
            ok = isinstance(th, tuple | list) and len(th) == 2 and all(_is_finite(x) for x in th)
            ok = ok and 0.0 <= th[0] <= th[1] <= 1.0
            _check(ok, "thinkv thresholds", "None or (lo, hi) with 0 <= lo <= hi <= 1", th)
            object.__setattr__(self, "thresholds", (float(th[0]), float(th[1])))

    @property
    def type_precisions(self) -> tuple[str | None, str | None, str | None]:
        """The kv_quant kind (None: the model's dtype) of each thought-type code (T, E, R: 0, 1, 2)."""
        r, e, t = _THINKV_PRECISIONS.fullmatch(self.precisions).groups()
        return _THINKV_BITS[t], _THINKV_BITS[e], _THINKV_BITS[r]

    def calibrated(self, num_layers: int) -> tuple[tuple[int, ...], tuple[float, float]]:
        """(layers, thresholds) for a model of num_layers: the configured ones, or the documented defaults
        where unset (`generate` warns then). ValueError for a layer index the model does not have."""
        layers = self.layers
        if layers is None:
            layers = tuple(sorted({int(f * num_layers) for f in THINKV_DEFAULT_LAYER_FRACTIONS}))
        if max(layers) >= num_layers:
            raise ValueError(f"thinkv layers must be < num_layers {num_layers}, got {layers}")
        return layers, self.thresholds or THINKV_DEFAULT_THRESHOLDS

    @classmethod
    def from_calibration(cls, path: str, **overrides) -> ThinKVConfig:
        """The config with `layers` and `thresholds` read from a calibration file: a JSON object with
        "layers" (layer indices) and "thresholds" ([lo, hi]); `overrides` set the other fields. A file
        with "fallback": true (calibration found no tri-modal layer) holds the defaults: a warning."""
        data = _read_json(path)
        if not isinstance(data, dict) or not {"layers", "thresholds"} <= set(data):
            raise ValueError(f"{path} must hold a JSON object with 'layers' and 'thresholds'")
        if data.get("fallback"):
            warnings.warn(
                f"{path} holds ThinKV's fallback: its calibration found no layer whose sparsity density is "
                f"clearly tri-modal, so it gives the default layers and the tertiles of their sparsity as "
                f"thresholds, and the thought types are a fixed split of the steps, not found modes",
                stacklevel=2,
            )
        return cls(layers=data["layers"], thresholds=data["thresholds"], **overrides)


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
    """How the KV buffer is kept.

    policy: "full" (no eviction; capacity = prompt + new tokens), "longflow" (LONGFLOW.md), or a
      baseline: "streaming", "h2o", "tova", "random" (each described in policies.py), or "rkv" (R-KV,
      rkv.py: compresses a full buffer back to the budget at once; budget > RKV_WINDOW).
    budget: slots per layer per sequence (C). Ignored for "full".
    granularity: "sequence" (one evict slot per sequence per layer, the paper's) or "kv_head".
    snapkv_window / snapkv_pool: SnapKV prefill compression when a prompt exceeds budget - 1 (every
      policy but "rkv" and "thinkv", "streaming" included: the baselines differ only in what they
      evict while decoding).
    num_sinks: first positions "streaming" never evicts while decoding (of a prompt longer than budget -
      1, SnapKV's prefill keeps them only where they score).
    recent_window: newest positions "h2o" never evicts (None: budget // 2, as in the H2O paper).
    rkv_buffer: slots "rkv" fills beyond the budget before it compresses back to the budget (the
      paper's 128).
    kv_quant: None (the buffer holds K/V in the model's dtype) or "int8", "fp8", "int4", "int2": each
      slot's K/V quantized on its own, keys Hadamard-rotated first (pallas_kernels/quant.py); every
      policy reads the dequantized values; both kernels dequantize in registers.
    kv_quant_group: elements of head_dim sharing one scale (must divide head_dim); also ThinKV's.
    thinkv: "thinkv" only (ThinKV, docs/THINKV.md): its ThinKVConfig (None: the defaults). Its budget
      counts the tokens kept by the classified segments; the prompt and the segment being written stay
      at the model's dtype beside it, and kv_quant must be None (the tiers' precisions are ThinKV's).
    """

    policy: str = "longflow"
    budget: int = 2048
    granularity: str = "sequence"
    snapkv_window: int = 32
    snapkv_pool: int = 5
    num_sinks: int = 4
    recent_window: int | None = None
    rkv_buffer: int = 128
    kv_quant: str | None = None
    kv_quant_group: int = 32
    thinkv: ThinKVConfig | None = None

    def __post_init__(self):
        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; expected one of {POLICIES}")
        g = self.granularity
        _check(
            isinstance(g, str) and g in ("sequence", "kv_head"), "granularity", "'sequence' or 'kv_head'", g
        )
        for field in ("budget", "snapkv_window", "snapkv_pool", "num_sinks", "recent_window", "rkv_buffer"):
            value = getattr(self, field)
            _check(_is_int(value) or (field == "recent_window" and value is None), field, "an int", value)
        budget_ok = self.policy == "full" or self.budget >= 2
        _check(budget_ok, "budget", ">= 2 slots (one for the new token)", self.budget)
        if self.snapkv_window < 1 or self.snapkv_pool < 1 or self.snapkv_pool % 2 == 0:
            raise ValueError(
                f"snapkv_window must be >= 1 and snapkv_pool odd >= 1, got "
                f"{self.snapkv_window}, {self.snapkv_pool}"
            )
        _check(self.num_sinks >= 0, "num_sinks", ">= 0", self.num_sinks)
        recent = self.recent_window
        _check(recent is None or 0 <= recent < self.budget, "recent_window", "in [0, budget)", recent)
        _check(self.rkv_buffer >= 1, "rkv_buffer", ">= 1", self.rkv_buffer)
        quant = self.kv_quant
        quant_ok = quant is None or quant in KV_QUANT_KINDS
        _check(quant_ok, "kv_quant", f"None or one of {KV_QUANT_KINDS}", quant)
        group = self.kv_quant_group
        _check(_is_int(group) and group >= 1, "kv_quant_group", "a positive int", group)
        if self.policy == "rkv" and self.budget <= RKV_WINDOW:
            raise ValueError(
                f"policy 'rkv' needs budget > its observation window ({RKV_WINDOW}), got {self.budget}"
            )
        if self.policy == "thinkv":
            if self.thinkv is None:
                object.__setattr__(self, "thinkv", ThinKVConfig())
            _check(isinstance(self.thinkv, ThinKVConfig), "thinkv", "a ThinKVConfig or None", self.thinkv)
            _check(quant is None, "kv_quant", "None for policy 'thinkv' (its precisions are thinkv's)", quant)
            # A slot is kept or freed for all KV heads at once (docs/THINKV.md).
            _check(g == "sequence", "granularity", "'sequence' for policy 'thinkv'", g)
        elif self.thinkv is not None:
            raise ValueError(f"thinkv settings apply to policy 'thinkv' only, got policy {self.policy!r}")

    @property
    def h2o_recent(self) -> int:
        return self.budget // 2 if self.recent_window is None else self.recent_window


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How each next token is chosen, and what ends a row.

    temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters.
    repetition_penalty: Hugging Face's: the logit of every id in the prompt or the output so far is
      divided by it when positive, multiplied by it otherwise (1.0: off).
    presence_penalty, frequency_penalty: OpenAI's and vLLM's: logit -= presence * (count > 0) +
      frequency * count, counting each id in the output only (0.0: off; negative favours repeats).
    no_repeat_ngram_size: n > 0 bans every token that would complete an n-gram already in the prompt
      + output (Hugging Face's NoRepeatNGramLogitsProcessor).
    min_new_tokens: the ids that end a row are banned until this many tokens were generated.
    ignore_eos: the model's EOS ids do not end a row (fixed-length runs).
    stop_token_ids: more ids that end a row as EOS does (kept as the row's last token).
    The penalties and bans apply in that order to the raw logits, before temperature, top-k and top-p,
    as Hugging Face orders its processors; each costs nothing when off.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        # float32 logits divided by a temperature below about 1e-6 leave no other token a chance anyway,
        # and one below float32's smallest normal number (1.2e-38) is flushed to 0 on some backends.
        ok = _is_finite(t) and (t == 0 or t >= MIN_TEMPERATURE)
        _check(ok, "temperature", f"0 (greedy) or a finite number >= {MIN_TEMPERATURE}", t)
        _check(_is_int(k) and k >= 0, "top_k", "an int >= 0", k)
        _check(_is_finite(p) and 0.0 < p <= 1.0, "top_p", "a number in (0, 1]", p)
        r = self.repetition_penalty
        _check(_is_finite(r) and r > 0, "repetition_penalty", "a finite number > 0", r)
        for field in ("presence_penalty", "frequency_penalty"):
            _check(_is_finite(getattr(self, field)), field, "a finite number", getattr(self, field))
        for field in ("no_repeat_ngram_size", "min_new_tokens"):
            value = getattr(self, field)
            _check(_is_int(value) and value >= 0, field, "an int >= 0", value)
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", "a bool", self.ignore_eos)
        ids = self.stop_token_ids
        ok = isinstance(ids, tuple | list) and all(_is_int(i) and i >= 0 for i in ids)
        _check(ok, "stop_token_ids", "a sequence of token ids >= 0", ids)
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))  # hashable: a static arg

    def stop_ids(self, eos_token_ids) -> tuple[int, ...]:
        """The ids that end a row: the model's EOS ids (unless ignore_eos) and stop_token_ids."""
        return tuple(dict.fromkeys((*(() if self.ignore_eos else eos_token_ids), *self.stop_token_ids)))
