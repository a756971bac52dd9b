"""Tiny random Hugging Face checkpoints and a character-level chat tokenizer, built locally.

`longflow-generate --demo` and the tests use them: no download and no torch (weights are drawn with numpy
and written as safetensors). The default init scale is large so that greedy decoding is not decided by
near-ties between logits, which would make float32 parity between two implementations fragile.
"""

from __future__ import annotations

import json
import os

import numpy as np

FAMILIES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
TINY_MODEL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,  # the std of the random weights
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=0,
)
TINY_SPECIAL_TOKENS = ("<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML, as Qwen's templates write it (minus tools and thinking).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_hf_checkpoint(
    out_dir: str,
    model_type: str = "qwen3",
    seed: int = 0,
    max_shard_size: int | str | None = None,
    with_tokenizer: bool = False,
    **overrides,
) -> str:
    """Write a random `model_type` checkpoint (config.json + safetensors) to out_dir; returns out_dir.

    overrides: Hugging Face config fields over TINY_MODEL. max_shard_size (e.g. "20KB"): shard the
    weights with an index, as `save_pretrained` does. with_tokenizer: also save `make_tiny_tokenizer`'s
    tokenizer, its <|im_end|> the eos_token_id unless overrides set one.
    """
    import jax
    import transformers
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.numpy import save_file

    from .config import ModelConfig
    from .convert import hf_name_for
    from .model import param_shapes

    if model_type not in FAMILIES:
        raise ValueError(f"model_type must be one of {sorted(FAMILIES)}, got {model_type!r}")
    kwargs = dict(TINY_MODEL, **({"head_dim": 16} if model_type == "qwen3" else {}))
    if with_tokenizer:
        kwargs["eos_token_id"] = TINY_SPECIAL_TOKENS.index("<|im_end|>")
    kwargs.update(overrides)
    getattr(transformers, FAMILIES[model_type])(**kwargs).save_pretrained(out_dir)
    config = ModelConfig.from_pretrained_dir(out_dir)

    rng, std = np.random.default_rng(seed), kwargs["initializer_range"]
    tensors = {}
    for path, sd in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]:
        name, transpose = hf_name_for(path)
        weights = std * rng.standard_normal(sd.shape[::-1] if transpose else sd.shape)
        tensors[name] = (weights + 1.0 if name.endswith("norm.weight") else weights).astype(np.float32)

    split = split_state_dict_into_shards_factory(
        tensors,
        get_storage_size=lambda a: a.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size or "5GB",
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, os.path.join(out_dir, filename), {"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    if with_tokenizer:
        make_tiny_tokenizer(out_dir, kwargs["vocab_size"])
    return out_dir


def make_tiny_tokenizer(out_dir: str, vocab_size: int = 128):
    """Save a character-level tokenizer with a ChatML chat template to out_dir; returns it.

    Ids: the special tokens first (<pad> = 0, eos = <|im_end|> = 4), then newline and printable ASCII,
    so it fits a model of vocab_size >= 101; other characters map to <unk>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate([*TINY_SPECIAL_TOKENS, *chars])}
    if len(vocab) > vocab_size:
        raise ValueError(f"the tiny tokenizer needs vocab_size >= {len(vocab)}, got {vocab_size}")
    # BPE without merges is a character-level tokenizer; Fuse joins the characters back on decode.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
        chat_template=TINY_CHAT_TEMPLATE,
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def random_prompts(vocab_size: int, lengths, seed=None):
    """Right-padded random prompts [B, max(lengths)] int32 (ids 1..vocab_size-1: no pad id inside a row)
    and their lengths [B] int32."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), max(lengths)), np.int32)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(1, vocab_size, n)
    return ids, np.asarray(lengths, np.int32)
