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


def make_tiny_hf_checkpoint(
    out_dir: str,
    model_type: str = "qwen3",
    seed: int = 0,
    max_shard_size: str | None = None,
    with_tokenizer: bool = False,
    **overrides,
) -> str:
    """Write a random `model_type` checkpoint (safetensors + config.json) to out_dir; returns out_dir.

    with_tokenizer: also save `make_tiny_tokenizer`'s tokenizer (chat template included) there, and
    make its <|im_end|> the model's eos_token_id unless overrides set one.
    """
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
    if with_tokenizer:
        kwargs["eos_token_id"] = TINY_SPECIAL_TOKENS.index("<|im_end|>")
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    os.makedirs(out_dir, exist_ok=True)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **save_kwargs)
    if with_tokenizer:
        make_tiny_tokenizer(out_dir, kwargs["vocab_size"])
    return out_dir


TINY_SPECIAL_TOKENS = ("<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML, as Qwen's templates write it (minus tools and thinking).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_tokenizer(out_dir: str, vocab_size: int = 128):
    """Save a character-level tokenizer with a ChatML chat template to out_dir; returns it.

    Ids: the special tokens first (<pad> = 0, eos = <|im_end|> = 4), then newline and printable ASCII,
    so it fits a model of vocab_size >= 101; other characters map to <unk>. Built with `tokenizers`,
    wrapped in transformers.PreTrainedTokenizerFast: no download.
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
