"""Next-token choice from float32 logits: the penalties and bans first, in Hugging Face's processor order,
then greedy, or temperature with top-k / top-p filtering.

Everything here runs inside the decode loop: the state the penalties read (`TokenHistory`) is made of
fixed-shape arrays, and a control that is off is a Python branch not taken, so it adds no operation.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .config import SamplingConfig


@flax.struct.dataclass
class TokenHistory:
    """What the penalties and bans read, per row; a field no control of the config reads is None."""

    prompt_seen: jax.Array | None  # [B, V] bool: the id is in the row's prompt (repetition_penalty)
    output_counts: jax.Array | None  # [B, V] int32: times the id was generated (the three penalties)
    tokens: jax.Array | None  # [B, P + max_new_tokens] int32: prompt then output, left-aligned (n-grams)
    length: jax.Array | None  # [B] int32: how much of `tokens` is filled


def init_history(prompt_ids, prompt_lengths, vocab_size: int, max_new_tokens: int, sampling: SamplingConfig):
    """The history before the first token: the right-padded prompts [B, P] and their lengths [B]."""
    batch, prompt_len = prompt_ids.shape
    counting = sampling.repetition_penalty != 1.0 or sampling.presence_penalty or sampling.frequency_penalty
    if not (counting or sampling.no_repeat_ngram_size):
        return None
    in_prompt = jnp.arange(prompt_len)[None, :] < prompt_lengths[:, None]
    seen = None
    if sampling.repetition_penalty != 1.0:
        ids = jnp.where(in_prompt, prompt_ids, vocab_size)  # padding goes out of range, dropped
        seen = jnp.zeros((batch, vocab_size), bool).at[jnp.arange(batch)[:, None], ids].set(True, mode="drop")
    tokens = length = None
    if sampling.no_repeat_ngram_size:
        tokens = jnp.pad(prompt_ids, ((0, 0), (0, max_new_tokens)))
        length = prompt_lengths
    counts = jnp.zeros((batch, vocab_size), jnp.int32) if counting else None
    return TokenHistory(prompt_seen=seen, output_counts=counts, tokens=tokens, length=length)


def record_token(history: TokenHistory | None, new_tokens) -> TokenHistory | None:
    """The history with each row's new token [B] appended."""
    if history is None:
        return None
    rows = jnp.arange(new_tokens.shape[0])
    counts, tokens, length = history.output_counts, history.tokens, history.length
    if counts is not None:
        counts = counts.at[rows, new_tokens].add(1)
    if tokens is not None:
        tokens, length = tokens.at[rows, length].set(new_tokens), length + 1
    return history.replace(output_counts=counts, tokens=tokens, length=length)


def ngram_bans(tokens, length, ngram_size: int, vocab_size: int):
    """[B, V] bool: the ids that would repeat an n-gram of tokens[b, :length[b]].

    Hugging Face's rule: the last n - 1 tokens are compared against the first n - 1 of every complete
    window of n, and a matching window bans its own last token. All windows at once, as one compare
    per offset and one scatter.
    """
    batch, total = tokens.shape
    num_windows = total - ngram_size + 1
    if num_windows < 1:
        return jnp.zeros((batch, vocab_size), bool)
    offsets = jnp.arange(ngram_size - 1)
    last = jnp.take_along_axis(tokens, jnp.maximum(length[:, None] - ngram_size + 1 + offsets, 0), axis=1)
    match = jnp.arange(num_windows)[None, :] + ngram_size <= length[:, None]  # the window is complete
    for j in range(ngram_size - 1):
        match &= tokens[:, j : j + num_windows] == last[:, j : j + 1]
    banned = jnp.where(match, tokens[:, ngram_size - 1 :], vocab_size)  # non-matches out of range: dropped
    return jnp.zeros((batch, vocab_size), bool).at[jnp.arange(batch)[:, None], banned].set(True, mode="drop")


def process_logits(logits, sampling: SamplingConfig, stop_ids, num_generated, history: TokenHistory | None):
    """Raw logits [B, V] f32 -> the logits after the penalties and bans, in Hugging Face's order:
    repetition penalty (then vLLM's frequency and presence penalties), n-gram bans, min_new_tokens.

    stop_ids: the ids that end a row (`SamplingConfig.stop_ids`); num_generated: tokens generated so far.
    """
    vocab_size = logits.shape[-1]
    if sampling.repetition_penalty != 1.0:
        penalty = sampling.repetition_penalty
        seen = history.prompt_seen | (history.output_counts > 0)
        logits = jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)
    if sampling.frequency_penalty:
        logits = logits - sampling.frequency_penalty * history.output_counts
    if sampling.presence_penalty:
        logits = logits - sampling.presence_penalty * (history.output_counts > 0)
    if sampling.no_repeat_ngram_size:
        bans = ngram_bans(history.tokens, history.length, sampling.no_repeat_ngram_size, vocab_size)
        logits = jnp.where(bans, -jnp.inf, logits)
    if sampling.min_new_tokens and stop_ids:
        is_stop = np.isin(np.arange(vocab_size), stop_ids)
        logits = jnp.where(is_stop & (num_generated < sampling.min_new_tokens), -jnp.inf, logits)
    return logits


def _tempered(logits, temperature: float):
    """logits / temperature with each row's max taken off first: under a tiny temperature the best
    logit then stays 0 and the others go to -inf, where dividing first would send the best to +inf (and
    every positive one with it, a tie of infinities and NaN log-probs). Softmax is unchanged by it."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    return (logits - jnp.where(jnp.isfinite(top), top, 0.0)) / temperature


def sample_next(logits, key, sampling: SamplingConfig):
    """logits [B, V] float32 (processed) -> tokens [B] int32."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = _tempered(logits, sampling.temperature)
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        cutoff_idx = jnp.sum(cum < sampling.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def token_logprobs(logits, tokens, sampling: SamplingConfig, top_k: int):
    """Log-probabilities under the processed distribution: `process_logits`' output divided by the
    temperature when sampling (as it is when greedy), before top-k / top-p truncation.

    Returns (log-prob of tokens [B], and with top_k > 0 the k best [B, k] and their ids [B, k], best
    first; else None, None).
    """
    scaled = _tempered(logits, sampling.temperature) if sampling.temperature else logits
    logp = jax.nn.log_softmax(scaled, axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    if not top_k:
        return chosen, None, None
    best, ids = jax.lax.top_k(logp, top_k)
    return chosen, best, ids.astype(jnp.int32)
