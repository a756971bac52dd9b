"""Teacher-forced scoring: how far a compressed cache moves the model along a fixed trajectory.

Both caches, the reference (the full cache by default) and the compressed one, are fed the same tokens:
the prompt, then the trajectory one token a step, exactly as `generate` would have fed them had it
produced that trajectory. Each cache therefore evolves as it would while decoding those tokens (same
eviction decisions, same random keys for policy "random"), and at every step both next-token
distributions are compared. This measures the compressor, not the model's skill at the task.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .config import CompressionConfig, ModelConfig, SamplingConfig
from .generate import (
    FULL,
    _as_key,
    buffer_capacity,
    check_generate_inputs,
    check_integer_counts,
    check_params,
    check_token_ids,
    decode_step,
    effective_compression,
    prefill,
    ready_to_decode,
)
from .kv_cache import bytes_held


@flax.struct.dataclass
class TrajectoryScores:
    """Per step t (predicting trajectory token t) and row; steps at or past a row's length are 0/False."""

    kl: jax.Array  # [B, T] f32: KL(reference || compressed) of the next-token distributions, in nats
    top1_agree: jax.Array  # [B, T] bool: both distributions have the same most likely token
    nll: jax.Array  # [B, T] f32: -log p_compressed(token t)
    reference_nll: jax.Array  # [B, T] f32: -log p_reference(token t)
    kv_bytes: jax.Array  # [B, T] f32: K/V bytes the compressed cache holds at step t (`bytes_held`)
    mask: jax.Array  # [B, T] bool: step t lies within the row's trajectory


def score_trajectory(
    params,
    config: ModelConfig,
    prompt_ids,
    prompt_lengths,
    trajectory,
    trajectory_lengths,
    *,
    compression: CompressionConfig | Sequence[CompressionConfig],
    reference: CompressionConfig | None = None,
    attention_impl: str = "reference",
    seed=0,
) -> TrajectoryScores | tuple[TrajectoryScores, ...]:
    """Teacher-force `trajectory` [B, T] (tokens after each prompt; row b's first trajectory_lengths[b]
    count) through a `compression` cache and a `reference` cache (None: the full cache).

    Prompts are right-padded [B, P] with lengths [B], as for `generate`; `seed` (an int or a PRNG key,
    as for `generate`) gives the same per-step keys `generate` uses without a mesh, so policy "random"
    evicts as it did while generating with that seed. `generate(..., mesh=)` folds each data shard's
    index into its key: for its shard i's rows pass `jax.random.fold_in(key, i)`. The
    distributions compared are the model's own (softmax of the logits, no temperature or filtering).
    A list of compressions is scored in one pass against one reference pass (the reference is
    usually the costliest cache), giving one TrajectoryScores each, in order.
    Jit-friendly like `generate` (configs static).
    """
    reference = FULL if reference is None else reference
    if not isinstance(reference, CompressionConfig):
        raise ValueError(f"reference must be a CompressionConfig or None, got {reference!r}")
    several = isinstance(compression, list | tuple)
    compressions = tuple(compression) if several else (compression,)
    if not compressions or not all(isinstance(c, CompressionConfig) for c in compressions):
        raise ValueError(
            f"compression must be a CompressionConfig or a non-empty list of them, got {compression!r}"
        )
    batch, steps = np.shape(trajectory) if len(np.shape(trajectory)) == 2 else (None, None)
    if steps is None or steps < 1:
        raise ValueError(
            f"trajectory must be [batch, steps] with steps >= 1, got shape {np.shape(trajectory)}"
        )
    for comp in (*compressions, reference):
        check_generate_inputs(
            config, prompt_ids, prompt_lengths, steps, comp, SamplingConfig(), attention_impl
        )
    check_params(params, config)
    if np.shape(prompt_ids)[0] != batch or np.shape(trajectory_lengths) != (batch,):
        raise ValueError(
            f"trajectory {np.shape(trajectory)} and trajectory_lengths {np.shape(trajectory_lengths)} must "
            f"have the prompts' batch {np.shape(prompt_ids)[0]}"
        )
    check_token_ids("trajectory", trajectory, config.vocab_size)
    check_integer_counts("trajectory_lengths", trajectory_lengths)
    if not isinstance(trajectory_lengths, jax.core.Tracer):
        lengths = np.asarray(trajectory_lengths)
        if lengths.min() < 0 or lengths.max() > steps:
            raise ValueError(f"trajectory_lengths must be in [0, {steps}], got {lengths.tolist()}")
    key = _as_key(seed)
    scores = _score(
        params,
        jnp.asarray(prompt_ids, jnp.int32),
        jnp.asarray(prompt_lengths, jnp.int32),
        jnp.asarray(trajectory, jnp.int32),
        jnp.asarray(trajectory_lengths, jnp.int32),
        key,
        config=config,
        compressions=compressions,
        reference=reference,
        attention_impl=attention_impl,
    )
    return scores if several else scores[0]


def _compare(ref_logits, logits, token, cache):
    """One step's (kl, top-1 agreement, nll, reference nll, the compressed cache's bytes held) per row."""
    ref_lp, lp = jax.nn.log_softmax(ref_logits, axis=-1), jax.nn.log_softmax(logits, axis=-1)
    kl = jnp.sum(jnp.exp(ref_lp) * (ref_lp - lp), axis=-1)
    agree = jnp.argmax(ref_logits, axis=-1) == jnp.argmax(logits, axis=-1)
    pick = lambda x: -jnp.take_along_axis(x, token[:, None], axis=-1)[:, 0]
    return kl, agree, pick(lp), pick(ref_lp), bytes_held(cache)


@functools.partial(jax.jit, static_argnames=("config", "compressions", "reference", "attention_impl"))
def _score(params, prompt_ids, prompt_lengths, trajectory, lengths, key, *, config, compressions, reference,
           attention_impl):  # fmt: skip
    prompt_len, steps = prompt_ids.shape[1], trajectory.shape[1]

    def start(comp):
        comp = effective_compression(comp, prompt_len, steps)
        capacity = buffer_capacity(comp, prompt_len, steps)
        cache, logits = prefill(params, config, prompt_ids, prompt_lengths, comp, capacity)
        return ready_to_decode(cache, comp, attention_impl, steps), logits

    ref_cache, ref_logits = start(reference)
    caches, logits = zip(*(start(c) for c in compressions))
    first = [_compare(ref_logits, x, trajectory[:, 0], c) for x, c in zip(logits, caches)]

    def body(carry, step):
        ref_cache, caches = carry
        step_key = jax.random.fold_in(jax.random.fold_in(key, step), 1)  # generate's key for this step
        current = trajectory[:, step - 1]
        positions = prompt_lengths + step - 1
        run = lambda c, comp: decode_step(
            params, config, c, current, positions, step_key,
            compression=effective_compression(comp, prompt_len, steps), attention_impl=attention_impl,
        )[:2]  # fmt: skip
        ref_logits, ref_cache = run(ref_cache, reference)
        logits, caches = zip(*(run(c, comp) for c, comp in zip(caches, compressions)))
        return (ref_cache, caches), [
            _compare(ref_logits, x, trajectory[:, step], c) for x, c in zip(logits, caches)
        ]

    _, rest = jax.lax.scan(body, (ref_cache, caches), jnp.arange(1, steps))
    mask = jnp.arange(steps)[None, :] < lengths[:, None]

    def scores(first, rest):
        kl, agree, nll, ref_nll, kv_bytes = (
            jnp.where(mask, jnp.concatenate([f[:, None], r.T], axis=1), 0) for f, r in zip(first, rest)
        )
        return TrajectoryScores(
            kl=kl, top1_agree=agree.astype(bool), nll=nll, reference_nll=ref_nll, kv_bytes=kv_bytes, mask=mask
        )

    return tuple(scores(f, r) for f, r in zip(first, rest))
