"""Tiny random Hugging Face checkpoints, built locally with `transformers` (no hub download).

Used by the demo and the tests. Weights use a large init scale so greedy decoding is not decided by
near-ties between logits (which would make fp32 parity between two implementations fragile).
"""

from __future__ import annotations

import os

TINY_DEFAULTS = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=0,
)


def make_tiny_hf_checkpoint(out_dir: str, model_type: str = "qwen3", seed: int = 0,
                            max_shard_size: str | None = None, **overrides) -> str:
    """Write a random `model_type` checkpoint (safetensors + config.json) to out_dir; returns out_dir."""
    import torch
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }
    if model_type not in classes:
        raise ValueError(f"model_type must be one of {sorted(classes)}, got {model_type!r}")
    config_cls, model_cls = classes[model_type]
    kwargs = dict(TINY_DEFAULTS)
    if model_type == "qwen3":
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    os.makedirs(out_dir, exist_ok=True)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **save_kwargs)
    return out_dir
