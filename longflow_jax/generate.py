"""Batched prefill, then a decode loop (`lax.while_loop`) inside one jit, over the slot buffer.

Prompts are right-padded [B, P] with per-row lengths, so a token's position is its index. Generation
stops per row at a stop id (EOS or `SamplingConfig.stop_token_ids`; its later tokens are pad) and the
loop ends when every row has stopped or `max_new_tokens` were produced. Everything whose shape matters
(batch, P, max_new_tokens, the configs) is static: one compile per shape, and the loop body (the decode
step) is traced once per compile.
"""

from __future__ import annotations

import functools
import math
import numbers
import time
import warnings

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.contract import num_score_groups
from pallas_kernels.quant import check_kv_quant

from . import rkv, sharding, thinkv
from .attention import (
    check_attention_impl,
    check_kernel_on_model_axis,
    decode_attention,
    with_kernel_state,
)
from .config import RKV_WINDOW, CompressionConfig, ModelConfig, SamplingConfig
from .kv_cache import (
    KVCache,
    LayerCache,
    evicted_positions,
    kv_bytes_for,
    layer_from_kept,
    prompt_view,
    tokens_held,
    write_token,
)
from .model import attention_scale, decoder_layer, forward, logits_from_hidden, param_shapes, rms_norm
from .sampling import init_history, process_logits, record_token, sample_next, token_logprobs
from .snapkv import prefill_keep_positions

FULL = CompressionConfig(policy="full")


@flax.struct.dataclass
class GenerationOutput:
    tokens: jax.Array  # [B, max_new_tokens] int32; pad_token_id after a row stops
    lengths: jax.Array  # [B] int32: tokens generated per row, its EOS included
    cache_occupancy: jax.Array  # [B] int32: tokens held per row when it stopped (layer 0)
    # [B] bool: the row's logits became NaN or inf (bad weights, an overflow), or the sampling controls
    # banned every token (no_repeat_ngram_size over a used-up vocabulary); the row stopped there, its
    # tokens from that step on are pad, and `lengths` counts only the tokens before it.
    nonfinite: jax.Array | None = None
    # [max_new_tokens, num_layers, B, G] int32, only with return_debug: at step t the position that the
    # write of token t - 1 (the token fed at step t) overwrote in each layer (-1: the slot was empty, or
    # the row had stopped before step t; row 0, the prefill, is all -1; a row's last token is never
    # written).
    evicted_positions: jax.Array | None = None
    # Only with return_logprobs, under the distribution tokens were drawn from before top-k / top-p
    # truncation (`sampling.token_logprobs`); 0 after a row stops.
    logprobs: jax.Array | None = None  # [B, max_new_tokens] f32: log-prob of each generated token
    top_logprobs: jax.Array | None = None  # [B, max_new_tokens, k] f32, best first (top_logprobs=k)
    top_token_ids: jax.Array | None = None  # [B, max_new_tokens, k] int32: their ids


def effective_compression(compression: CompressionConfig, prompt_len: int, max_new_tokens: int):
    """The cache a run really keeps: a budget that holds the prompt and every new token never evicts, so
    that run is the full cache (same numbers, and no scoring work). "thinkv" compresses within its
    budget too (its segments enter at schedule[0] tokens, quantized), so it is the full cache only where
    the run completes no segment."""
    if compression.policy == "thinkv":
        tau = compression.thinkv.tau
        return FULL if thinkv.num_segments(tau, max_new_tokens) == 0 else compression
    fits = compression.policy != "full" and compression.budget >= prompt_len + max_new_tokens
    if fits and compression.kv_quant is not None:
        return CompressionConfig(
            policy="full", kv_quant=compression.kv_quant, kv_quant_group=compression.kv_quant_group
        )
    return FULL if fits else compression


def buffer_capacity(compression: CompressionConfig, prompt_len: int, max_new_tokens: int) -> int:
    """Slots per layer per sequence: room for the whole generation, capped by a compressing budget.

    A budget at least prompt + new tokens never evicts, so it gets no more slots than "full" would.
    "rkv" also holds its buffer of `rkv_buffer` slots beyond the budget. "thinkv": the main buffer, the
    prompt and a window of tau slots (its tiers come on top: thinkv.tier_capacity).
    """
    whole = prompt_len + max_new_tokens
    if compression.policy == "full":
        return whole
    if compression.policy == "thinkv":
        return prompt_len + compression.thinkv.tau
    return min(compression.budget + (compression.rkv_buffer if compression.policy == "rkv" else 0), whole)


def kv_cache_bytes(
    config: ModelConfig,
    compression: CompressionConfig | None,
    batch: int,
    prompt_len: int,
    max_new_tokens: int,
) -> int:
    """Bytes of the cache `generate` allocates for this shape: every layer's K/V buffers (quantized
    payloads and scales with kv_quant) and slot bookkeeping, "rkv"'s query ring, and "thinkv"'s tier
    regions and segment tables. The Triton kernel's per-layer tickets (B x 2 Hkv int32) come on top.
    compression None is the full cache; a job `generate` would refuse is refused here too."""
    compression = _checked_plan(config, compression, batch, prompt_len, max_new_tokens)
    compression = effective_compression(compression, prompt_len, max_new_tokens)
    capacity = buffer_capacity(compression, prompt_len, max_new_tokens)
    groups = num_score_groups(config.num_kv_heads, compression.granularity)
    kv = kv_bytes_for(
        config.num_layers, batch, config.num_kv_heads, capacity, config.head_dim, config.param_dtype,
        compression.kv_quant, compression.kv_quant_group,
    )  # fmt: skip
    per_layer = batch * groups * (2 * capacity + 1) * 4  # slot_pos, score [B, G, C]; evict_slot [B, G]
    if compression.policy == "rkv":
        itemsize = jnp.dtype(config.param_dtype).itemsize
        per_layer += batch * RKV_WINDOW * config.num_heads * config.head_dim * itemsize
    if compression.policy == "thinkv":
        cfg, slots = compression.thinkv, thinkv.tier_capacity(compression, max_new_tokens)
        segments = thinkv.num_segments(cfg.tau, max_new_tokens)
        for kind in thinkv.tier_kinds(cfg):
            kv += kv_bytes_for(
                config.num_layers, batch, config.num_kv_heads, slots, config.head_dim, config.param_dtype,
                kind, compression.kv_quant_group,
            )  # fmt: skip
            per_layer += batch * (2 * slots + 1) * 4  # the tier's slot_pos, score, evict_slot
        per_layer += batch * segments * cfg.schedule[0] * 4  # segment_slots
        sparsity_layers = len(cfg.calibrated(config.num_layers)[0])
        kv += batch * (2 * segments + 1 + sparsity_layers) * 4  # the segment table; L*'s sparsity sums
    return kv + config.num_layers * per_layer


def _checked_plan(config, compression, batch, prompt_len, max_new_tokens) -> CompressionConfig:
    """compression (None: the full cache) for a job of this shape, checked as `generate` checks it."""
    compression = FULL if compression is None else compression
    options = dict(
        max_new_tokens=max_new_tokens,
        compression=compression,
        sampling=SamplingConfig(),
        attention_impl="reference",
    )
    _checked_job_shapes(config, batch, prompt_len, options)
    return compression


def _checked_job_shapes(config, batch: int, prompt_len: int, options: dict):
    """(prompt_ids, prompt_lengths) as ShapeDtypeStructs of a [batch, prompt_len] job, after
    `check_generate_inputs` has checked it with `options`."""
    if not (_is_int_at_least(batch, 1) and _is_int_at_least(prompt_len, 1)):
        raise ValueError(f"batch and prompt_len must be positive ints, got {batch!r} and {prompt_len!r}")
    ids = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    check_generate_inputs(config, ids, lengths, **options)
    return ids, lengths


def step_working_set_bytes(
    config: ModelConfig, compression: CompressionConfig, max_new_tokens: int, prompt_len: int
) -> int:
    """What `max_batch` budgets a row for one decode step beside its cache: float32 logits and
    activations, and for "thinkv" the float32 copy an L* layer attends over. An estimate: the
    compiled step's own working set (`memory_analysis().temp_size_in_bytes`) is what XLA asks for."""
    decoding = effective_compression(compression, prompt_len, max_new_tokens)  # what generate runs
    capacity = buffer_capacity(decoding, prompt_len, max_new_tokens)
    work = 4 * (2 * config.vocab_size + 8 * config.intermediate_size + 4 * config.num_heads * capacity)
    if decoding.policy == "thinkv":  # a job that completes no segment runs as the full cache
        # One L* layer's float32 K and V of the main buffer and every tier (the layers run in turn), and
        # its float32 logits and weights over them. Measured on an H100 (Qwen3-4B shape, budget 2,048):
        # 36.4 MiB a row with the L* layers wholly in jnp (171 rows) and the same on the kernels with
        # jnp logits (237 rows), against 36.7 counted here (docs/BENCHMARKS.md).
        slots = capacity + len(thinkv.tier_kinds(compression.thinkv)) * thinkv.tier_capacity(
            compression, max_new_tokens
        )
        work += 4 * slots * (2 * config.num_kv_heads * config.head_dim + 2 * config.num_heads)
    return work


def max_batch(
    config: ModelConfig,
    compression: CompressionConfig | None,
    max_new_tokens: int,
    prompt_len: int,
    device_bytes: int,
    *,
    attention_impl: str | None = None,
    **generate_options,
) -> int:
    """The largest batch `generate` fits in device_bytes.

    Without attention_impl, an estimate with no compile: the params once, and per row its cache
    (`kv_cache_bytes`) plus a decode step's working set (`step_working_set_bytes`); prefill's activations
    are not counted (`prefill_rows_per_chunk` bounds them).
    With attention_impl, the batch is fitted to `generate`'s own program for that impl and
    generate_options (`generate_program_bytes`' sampling, return_logprobs, top_logprobs,
    prefill_rows_per_chunk) compiled on the default backend: the largest batch whose arguments, outputs
    and temporaries, as XLA counts them, fit device_bytes. It starts at the estimate and takes a few
    compiles. The estimate can be off either way: XLA's working set for a decode step is its own choice
    (docs/BENCHMARKS.md has cases above and below it).
    ValueError if no row fits, or for a job `generate` would refuse; compression None is the full cache."""
    compression = _checked_plan(config, compression, 1, prompt_len, max_new_tokens)
    real = isinstance(device_bytes, numbers.Real) and not isinstance(device_bytes, bool)
    if not (real and math.isfinite(device_bytes) and device_bytes > 0):
        raise ValueError(
            f"device_bytes must be a finite number > 0 (bytes of device memory), got {device_bytes!r}"
        )
    params = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(param_shapes(config)))
    work = step_working_set_bytes(config, compression, max_new_tokens, prompt_len)
    row = kv_cache_bytes(config, compression, 1, prompt_len, max_new_tokens) + work
    batch = (int(device_bytes) - params) // row
    if attention_impl is not None:
        need = functools.partial(
            generate_program_bytes, config, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
            compression=compression, attention_impl=attention_impl, **generate_options,
        )  # fmt: skip
        return _fit_batch(need, int(device_bytes), max(1, int(batch)))
    if generate_options:
        raise TypeError(f"generate_options {sorted(generate_options)} need attention_impl (a compiled fit)")
    if batch < 1:
        capacity = buffer_capacity(effective_compression(compression, prompt_len, max_new_tokens), prompt_len,
                                   max_new_tokens)  # fmt: skip
        raise ValueError(
            f"not even one row fits in device_bytes={device_bytes}: the params take {params} bytes and a "
            f"row {row} ({compression.policy}, {capacity} slots)"
        )
    return int(batch)


# The most compiles `max_batch` makes to fit a batch to the compiled program.
FIT_MAX_COMPILES = 12


def _fit_batch(need, limit: int, guess: int) -> int:
    """The largest batch b with need(b) <= limit, for need(b) rising with b, about linearly. It tries the
    guess and half of it, then where the line through two measured batches (the bracket's ends once one
    fits and one does not, else the last two) meets the limit, kept inside the bracket, and bisects
    whenever a step fails to halve the bracket."""
    seen = {}

    def bytes_at(b):
        if b not in seen:
            if len(seen) == FIT_MAX_COMPILES:
                raise RuntimeError(f"max_batch: no fit in {FIT_MAX_COMPILES} compiles; bytes by batch {seen}")
            seen[b] = need(b)
        return seen[b]

    lo, hi = 0, None  # need(lo) fits (0 rows always do), need(hi) does not
    tried, width = [], None  # width: the bracket's before the last step
    b = guess
    while True:
        if bytes_at(b) <= limit:
            lo = max(lo, b)
        else:
            hi = b if hi is None else min(hi, b)
        tried.append(b)
        if hi is not None and hi - lo <= 1:
            break
        if len(tried) == 1:
            b = guess // 2 if guess > 1 else 2
            continue
        x0, x1 = (lo, hi) if lo and hi else sorted(tried[-2:])
        per_row = max(1.0, (seen[x1] - seen[x0]) / (x1 - x0))
        b = x0 + int((limit - seen[x0]) // per_row)
        if hi is None:
            b = max(b, lo + 1)
        elif width is None or hi - lo <= width // 2:  # the line still halves the bracket
            width, b = hi - lo, min(max(b, lo + 1), hi - 1)
        else:
            width, b = hi - lo, (lo + hi) // 2
        if b in seen:
            b = (lo + hi) // 2 if hi is not None else lo + 1
    if lo == 0:
        raise ValueError(
            f"not even one row fits in device_bytes={limit}: the compiled program needs {seen[1]}B"
        )
    return lo


# XLA options for every program that runs the decode loop. XLA's GPU DotMerger turns the q / k / v
# projections (and gate / up) into one matmul over a concatenation of their weights; the concatenation is
# loop-invariant, so XLA hoists it out of the decode loop and keeps one copy of every layer's merged
# weights for the whole loop. Where XLA runs that matmul through cuBLAS (at a few hundred rows), the
# copies are real: 4.4 GiB on the Qwen3-4B shape at 400 rows, measured on an H100 in the compiled
# chunk's buffer assignment (docs/BENCHMARKS.md). Threshold 0 merges nothing; the weights' bytes read a
# step are the same. Options for other backends are ignored. Inside your own jax.jit, pass
# compiler_options=COMPILER_OPTIONS to it.
COMPILER_OPTIONS = {"xla_gpu_dot_merger_threshold_mb": 0}


def generate_program_bytes(
    config: ModelConfig,
    batch: int,
    *,
    prompt_len: int,
    max_new_tokens: int,
    compression: CompressionConfig | None = None,
    sampling: SamplingConfig | None = None,
    attention_impl: str = "reference",
    return_logprobs: bool = False,
    top_logprobs: int = 0,
    prefill_rows_per_chunk: int | None = None,
) -> int:
    """Device bytes `generate`'s compiled program needs for this shape and these options (as `generate`
    takes them) on the default backend, as XLA counts them (`memory_analysis`): its arguments (the
    params, the prompts) and outputs, and its temporaries, the cache among them. Compiles the program,
    allocates nothing."""
    options = _options(
        max_new_tokens, compression, sampling, attention_impl, return_logprobs, top_logprobs,
        prefill_rows_per_chunk,
    )  # fmt: skip
    compiled, _, _ = _compiled_generate(param_shapes(config), config, batch, prompt_len, options)
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise NotImplementedError(f"the {jax.default_backend()} backend gives no memory analysis")
    return int(
        analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
        + analysis.temp_size_in_bytes
    )  # fmt: skip


def build_layer_cache(q, k, v, lengths, compression: CompressionConfig, capacity: int) -> LayerCache:
    """One layer's buffer from its prompt: R-KV's prefill selection for "rkv", SnapKV's otherwise (a
    prompt that fits in capacity - 1 keeps every token), K/V quantized with kv_quant.

    q [B, P, Hq, D], k, v [B, P, Hkv, D] post-RoPE (position = index), lengths [B] int in [1, P].
    """
    if compression.policy == "thinkv":
        return thinkv.prefill_layer(k, v, lengths, capacity)
    groups = num_score_groups(k.shape[2], compression.granularity)
    quant = (compression.kv_quant, compression.kv_quant_group)
    if compression.policy == "rkv":
        return rkv.prefill_layer(q, k, v, lengths, compression.budget, capacity, groups, *quant)
    q_read, k_read = prompt_view(q, k, *quant)  # SnapKV reads what the buffer will hold
    window, pool = compression.snapkv_window, compression.snapkv_pool
    kept = prefill_keep_positions(q_read, k_read, lengths, capacity, window, pool, groups)
    return layer_from_kept(k, v, kept, capacity, *quant)


def prefill(
    params, config: ModelConfig, prompt_ids, prompt_lengths, compression: CompressionConfig, capacity: int
):
    """Run the prompt; returns (KVCache, logits of each row's last prompt token [B, V] f32). `capacity`:
    slots a layer's buffer holds (`buffer_capacity` gives what `generate` uses); a prompt longer than it
    is compressed by SnapKV, which "full" never is."""
    check_prefill_inputs(config, prompt_ids, prompt_lengths, compression, capacity)

    def build_layer(_, q, k, v):
        return build_layer_cache(q, k, v, prompt_lengths, compression, capacity)

    hidden, layers = forward(params, config, prompt_ids, layer_hook=build_layer)
    last = jnp.take_along_axis(hidden, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    return KVCache(layers=layers), logits_from_hidden(params, config, last)


def prefill_rows_divisor(batch: int, rows_per_chunk: int | None) -> int:
    """Rows per prefill slice: the largest divisor of the batch <= rows_per_chunk (whole batch if None)."""
    if rows_per_chunk is None or rows_per_chunk >= batch:
        return batch
    return max(d for d in range(1, rows_per_chunk + 1) if batch % d == 0)


def prefill_in_slices(
    params,
    config: ModelConfig,
    prompt_ids,
    prompt_lengths,
    compression: CompressionConfig,
    capacity: int,
    rows_per_chunk: int | None,
):
    """`prefill` over slices of the batch, one after another: the prompt's activations (MLP, attention
    scores) then scale with the slice, not the batch, while the cache is built at full size once.

    `lax.map` stacks the slices' caches as [slices, rows, ...]; merging the two leading axes is a
    reshape of contiguous memory, so the cache is not copied. Same numbers as `prefill` on the whole
    batch (row-independent math).
    """
    batch = prompt_ids.shape[0]
    rows = prefill_rows_divisor(batch, rows_per_chunk)
    if rows == batch:
        return prefill(params, config, prompt_ids, prompt_lengths, compression, capacity)
    slices = batch // rows

    def one(args):
        ids, lengths = args
        return prefill(params, config, ids, lengths, compression, capacity)

    stacked = jax.lax.map(one, (prompt_ids.reshape(slices, rows, -1), prompt_lengths.reshape(slices, rows)))
    return jax.tree_util.tree_map(lambda x: x.reshape(batch, *x.shape[2:]), stacked)


def ready_to_decode(cache: KVCache, compression: CompressionConfig, attention_impl: str, max_new_tokens: int):
    """The prefilled cache with what the decode loop carries beside the buffers: the kernel's state
    (`with_kernel_state`) or, for "thinkv", the tiers and the segment table (`thinkv.attach`; its kernel
    calls, one per buffer, take no state)."""
    if compression.policy == "thinkv":
        return thinkv.attach(cache, compression, max_new_tokens)
    return with_kernel_state(cache, attention_impl)


def decode_step(
    params,
    config: ModelConfig,
    cache: KVCache,
    tokens,
    positions,
    key,
    *,
    compression: CompressionConfig,
    attention_impl: str = "reference",
):
    """One token per row: tokens [B] at true positions [B].

    Returns (logits [B, V] f32, new cache, evicted positions [num_layers, B, G]). "thinkv": the cache
    comes from `ready_to_decode` (as in `generate`), and a full segment is compressed after the layers.
    Called eagerly, it checks the token ids and the cache's room ("full": a free slot; "thinkv": a
    segment table entry), reading them to the host; under jit (as in `generate`) those checks are skipped
    at trace time and cost nothing.
    """
    _check_config_types(config, compression)
    check_attention_impl(attention_impl, compression)
    check_token_ids("tokens", tokens, config.vocab_size)
    if compression.policy == "thinkv":
        if cache.segments is None:
            raise ValueError(
                "policy 'thinkv' decodes from the cache of generate.ready_to_decode(cache, compression, "
                "attention_impl, max_new_tokens), which holds its tiers and segment table; this one has none"
            )
        thinkv.check_segment_room(cache)
    elif compression.policy == "full":
        check_free_slot(cache.layers[0])
    x = params["embed"][tokens][:, None]  # [B, 1, Dm]
    scale = attention_scale(config)
    new_layers, evicted = [], []
    for i, (layer, lc) in enumerate(zip(params["layers"], cache.layers)):

        def attend(q, k, v, lc=lc, i=i):
            evicted.append(evicted_positions(lc))
            lc = write_token(lc, k[:, 0], v[:, 0], positions)
            attn, lc = decode_attention(
                q[:, 0], lc, positions, scale, compression, attention_impl, jax.random.fold_in(key, i)
            )
            return attn[:, None], lc

        x, lc = decoder_layer(layer, config, x, positions[:, None], attend)
        new_layers.append(lc)
    x = rms_norm(x[:, 0], params["final_norm"], config.rms_norm_eps)
    cache = cache.replace(layers=new_layers)
    if compression.policy == "thinkv":
        cache = thinkv.close_full_segment(cache, compression)
    return logits_from_hidden(params, config, x), cache, jnp.stack(evicted)


def check_free_slot(layer) -> None:
    """A full cache's layer (concrete) has a free slot for the next token: past its capacity a write
    would be dropped."""
    if _is_concrete(layer.evict_slot) and int(np.max(np.asarray(layer.evict_slot))) >= layer.capacity:
        raise ValueError(
            f"the 'full' cache holds {layer.capacity} tokens a row and a row has them all: it was made for "
            "fewer new tokens (prefill's capacity, buffer_capacity(compression, prompt_len, max_new_tokens), "
            "or its max_new_tokens)"
        )


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer | jax.ShapeDtypeStruct)


def _is_int_at_least(value, least: int) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= least


def _shape(x) -> tuple:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def check_generate_inputs(
    config,
    prompt_ids,
    prompt_lengths,
    max_new_tokens,
    compression,
    sampling,
    attention_impl,
    return_logprobs=False,
    top_logprobs=0,
    prefill_rows_per_chunk=None,
):
    """Every user-facing check, before anything is traced. Values are checked when they are concrete."""
    _check_config_types(config, compression)
    if not isinstance(sampling, SamplingConfig):
        raise ValueError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    check_attention_impl(attention_impl, compression)
    if compression.kv_quant is not None:
        check_kv_quant(compression.kv_quant, compression.kv_quant_group, config.head_dim)
    if compression.policy == "thinkv":
        check_thinkv(compression, config)
    if not _is_int_at_least(max_new_tokens, 1):
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if prefill_rows_per_chunk is not None and not _is_int_at_least(prefill_rows_per_chunk, 1):
        raise ValueError(
            f"prefill_rows_per_chunk must be a positive int or None, got {prefill_rows_per_chunk!r}"
        )
    bad = [i for i in sampling.stop_token_ids if i >= config.vocab_size]
    if bad:
        raise ValueError(f"stop_token_ids must be < vocab_size {config.vocab_size}, got {bad[0]}")
    if not isinstance(return_logprobs, bool):
        raise ValueError(f"return_logprobs must be a bool, got {return_logprobs!r}")
    if not _is_int_at_least(top_logprobs, 0):
        raise ValueError(f"top_logprobs must be an int >= 0, got {top_logprobs!r}")
    if top_logprobs and not return_logprobs:
        raise ValueError("top_logprobs needs return_logprobs=True")
    if top_logprobs > config.vocab_size:
        raise ValueError(f"top_logprobs must be <= vocab_size {config.vocab_size}, got {top_logprobs}")
    batch, prompt_len = check_prompt(config, prompt_ids, prompt_lengths)
    limit = config.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {prompt_len + max_new_tokens} "
            f"exceeds the model's max_position_embeddings {limit}"
        )
    # ThinKV's budget counts the classified segments' tokens only: it compresses at any budget.
    if compression.policy not in ("full", "thinkv") and compression.budget > limit:
        raise ValueError(
            f"budget {compression.budget} is larger than the model's max length {limit}: "
            f"use policy='full' (no compression is needed)"
        )
    if compression.policy == "streaming" and compression.num_sinks > compression.budget - 2:
        raise ValueError(
            f"streaming needs num_sinks <= budget - 2 (room for a recent window), got "
            f"num_sinks={compression.num_sinks}, budget={compression.budget}"
        )


def _check_config_types(config, compression) -> None:
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a longflow_jax.ModelConfig, got {type(config).__name__}")
    if not isinstance(compression, CompressionConfig):
        raise ValueError(f"compression must be a CompressionConfig, got {type(compression).__name__}")


def check_prompt(config: ModelConfig, prompt_ids, prompt_lengths) -> tuple[int, int]:
    """(batch, prompt_len) of a right-padded prompt batch the model can take; its values are checked when
    they are concrete."""
    if len(_shape(prompt_ids)) != 2:
        raise ValueError(f"prompt_ids must be [batch, prompt_len], got shape {_shape(prompt_ids)}")
    ids_dtype = jnp.result_type(prompt_ids if hasattr(prompt_ids, "dtype") else np.asarray(prompt_ids))
    if not jnp.issubdtype(ids_dtype, jnp.integer):
        raise ValueError(f"prompt_ids must be integer token ids, got dtype {ids_dtype}")
    batch, prompt_len = _shape(prompt_ids)
    if _shape(prompt_lengths) != (batch,):
        raise ValueError(f"prompt_lengths must have shape ({batch},), got {_shape(prompt_lengths)}")
    check_integer_counts("prompt_lengths", prompt_lengths)
    if batch < 1:
        raise ValueError("the batch is empty: prompt_ids has 0 rows")
    limit = config.max_position_embeddings
    if prompt_len > limit:
        raise ValueError(f"prompt length {prompt_len} exceeds the model's max_position_embeddings {limit}")
    if _is_concrete(prompt_lengths):
        lengths = np.asarray(prompt_lengths)
        bad = np.flatnonzero((lengths < 1) | (lengths > prompt_len))
        if bad.size:
            raise ValueError(
                f"prompt_lengths must be in [1, {prompt_len}]; row {int(bad[0])} has {int(lengths[bad[0]])}"
                + (" (zero-length prompts cannot be generated from)" if lengths[bad[0]] == 0 else "")
            )
    if _is_concrete(prompt_ids):
        ids = np.asarray(prompt_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
            raise ValueError(
                f"prompt_ids must be in [0, {config.vocab_size}), got range [{ids.min()}, {ids.max()}]"
            )
    return batch, prompt_len


def check_prefill_inputs(config, prompt_ids, prompt_lengths, compression, capacity) -> None:
    """`prefill`'s own checks (public, for callers who drive the loop themselves): the prompt as
    `generate` checks it, and a capacity the policy can fill."""
    _check_config_types(config, compression)
    _, prompt_len = check_prompt(config, prompt_ids, prompt_lengths)
    least = 2  # the compressing policies: a kept token and the new one
    if compression.policy == "full":
        least = prompt_len + 1  # the whole prompt and a new token
    elif compression.policy == "rkv":
        least = compression.budget + 1  # its buffer of new tokens beyond the budget
    elif compression.policy == "thinkv":
        # The prompt and one segment's window, exactly: a segment closes when the buffer is full.
        window = prompt_len + compression.thinkv.tau
        if not (_is_int_at_least(capacity, window) and capacity == window):
            raise ValueError(
                f"capacity must be prompt_len + tau = {window} for policy 'thinkv' (a prompt of "
                f"{prompt_len} tokens, tau {compression.thinkv.tau}: its window closes a segment when "
                f"full), got {capacity!r}"
            )
    if not _is_int_at_least(capacity, least):
        raise ValueError(
            f"capacity must be an int >= {least} for policy {compression.policy!r} with a prompt of "
            f"{prompt_len} tokens (buffer_capacity gives generate's), got {capacity!r}"
        )


def check_thinkv(compression: CompressionConfig, config: ModelConfig) -> None:
    """ThinKV's settings against the model: its layers exist and each tier's kind fits head_dim; a
    warning when the sparsity layers or thresholds are the uncalibrated defaults."""
    cfg = compression.thinkv
    cfg.calibrated(config.num_layers)
    for kind in thinkv.tier_kinds(cfg):
        if kind is not None:
            check_kv_quant(kind, compression.kv_quant_group, config.head_dim)
    if cfg.layers is None or cfg.thresholds is None:
        warnings.warn(
            "ThinKV runs without calibration (thinkv layers or thresholds not set): it uses the default "
            "sparsity layers and thresholds (docs/THINKV.md), so its thought types mean little",
            stacklevel=4,  # the caller of generate
        )


def check_params(params, config: ModelConfig) -> None:
    """The params pytree holds exactly the tensors the config asks for, at their shapes (`param_shapes`)."""
    if not isinstance(params, dict) or len(params.get("layers", ())) != config.num_layers:
        got = len(params.get("layers", ())) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"params must hold {config.num_layers} layers (config.num_layers), got {got}")
    want = dict(jax.tree_util.tree_flatten_with_path(param_shapes(config))[0])
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path in sorted(set(want) | set(got), key=jax.tree_util.keystr):
        name = "params" + jax.tree_util.keystr(path)
        if path not in got:
            raise ValueError(f"{name} is missing (expected shape {want[path].shape})")
        if path not in want:
            raise ValueError(f"{name} is not a tensor of this config's model")
        if tuple(_shape(got[path])) != want[path].shape:
            raise ValueError(f"{name} has shape {_shape(got[path])}, expected {want[path].shape}")


def params_and_config_of(model) -> tuple:
    """(params, config) of a model object that holds its weights: one with a `params_and_config()`
    method returning the params pytree (`model.py`'s layout) and its ModelConfig, such as
    `longflow_jax.nnx.Decoder`. A protocol, not a type, so the core imports no `flax.nnx`."""
    method = getattr(model, "params_and_config", None)
    if not callable(method):
        raise ValueError(
            f"expected params and a longflow_jax.ModelConfig, or a model with params_and_config() "
            f"(such as longflow_jax.nnx.Decoder) in their place, got {type(model).__name__}"
        )
    return method()


def generate(
    params,
    config: ModelConfig,
    prompt_ids,
    prompt_lengths=None,
    *,
    max_new_tokens: int,
    compression: CompressionConfig | None = None,
    sampling: SamplingConfig | None = None,
    attention_impl: str = "reference",
    seed=0,
    return_debug: bool = False,
    return_logprobs: bool = False,
    top_logprobs: int = 0,
    prefill_rows_per_chunk: int | None = None,
    mesh: Mesh | None = None,
) -> GenerationOutput:
    """Generate up to max_new_tokens per row from right-padded prompts.

    generate(params, config, prompt_ids, prompt_lengths, ...), or generate(model, prompt_ids,
    prompt_lengths, ...) for a model that holds its weights (`params_and_config_of`).
    params/config: from `longflow_jax.load` (or `init_random_params`). prompt_ids [B, P] int,
    prompt_lengths [B] int in [1, P]. compression: None is the full cache; CompressionConfig(
    policy="longflow", budget=2048) is LongFlow. sampling: None is greedy; its penalties and stop rules
    are in `SamplingConfig`. seed: an int or a PRNG key (sampling and "random").
    return_logprobs: also return each generated token's log-prob, and with top_logprobs=k the k best
    alternatives, under the distribution the token was drawn from before top-k / top-p truncation:
    the logits after the penalties and bans, divided by the temperature when sampling.
    prefill_rows_per_chunk: run the prompt over slices of at most this many rows (the largest divisor
    of B not above it), so a batch sized to fill memory with KV cache does not also need the whole
    batch's prompt activations at once; None: the whole batch in one pass.
    mesh: None runs on one device. A 1-D Mesh splits the rows over its devices, params replicated, and
    each decodes its rows with no communication. A ("data", "model") Mesh (`sharding.make_mesh`) also
    splits the weights and the KV buffer over "model", Megatron-style (`sharding`; `_mesh_program`
    says what runs where): the params go to `sharding.param_shardings(config, mesh)` (`load(dir,
    mesh=mesh)` restores them there). Each data shard's draws are seeded by the seed folded with its
    index. "data" must divide B. KV heads that do not divide by "model" are replicated, the usual GQA
    practice. attention_impl="pallas" runs per KV-head shard on a "model" axis > 1, and "sequence"
    granularity all-reduces the shards' importance (B x C floats a layer and step) before its argmin,
    so every shard evicts the same slot; "triton" is single-GPU.
    Jit-friendly without mesh: call it inside your own `jax.jit` (configs and max_new_tokens must be
    static there; a model's inside `nnx.jit`), with compiler_options=`COMPILER_OPTIONS` (what they
    save). `compile_generate` compiles it ahead of time for one shape.
    """
    if not isinstance(config, ModelConfig) and prompt_lengths is None:  # (model, prompt_ids, lengths)
        (params, config), prompt_ids, prompt_lengths = params_and_config_of(params), config, prompt_ids
    elif prompt_lengths is None:
        raise ValueError("generate(params, config, prompt_ids, prompt_lengths): prompt_lengths is missing")
    options = _options(
        max_new_tokens, compression, sampling, attention_impl, return_logprobs, top_logprobs,
        prefill_rows_per_chunk,
    )  # fmt: skip
    check_generate_inputs(config, prompt_ids, prompt_lengths, **options)
    if not isinstance(return_debug, bool):  # bool("no") is True
        raise ValueError(f"return_debug must be a bool, got {return_debug!r}")
    check_params(params, config)
    args = (params, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32), _as_key(seed))
    static = _static_options(config, return_debug, **options)
    if mesh is None:
        concrete = all(_is_concrete(x) for x in jax.tree.leaves(args))
        return (_generate_top_level if concrete else _generate)(*args, **static)
    check_mesh(mesh, _shape(prompt_ids)[0], attention_impl)
    fn, placement = _mesh_program(mesh, **static)
    return fn(*jax.device_put(args, placement))


def _options(
    max_new_tokens,
    compression,
    sampling,
    attention_impl,
    return_logprobs,
    top_logprobs,
    prefill_rows_per_chunk,
) -> dict:
    """generate's options as `check_generate_inputs` and `_static_options` take them, None configs filled."""
    return dict(
        max_new_tokens=max_new_tokens,
        compression=FULL if compression is None else compression,
        sampling=SamplingConfig() if sampling is None else sampling,
        attention_impl=attention_impl,
        return_logprobs=return_logprobs,
        top_logprobs=top_logprobs,
        prefill_rows_per_chunk=prefill_rows_per_chunk,
    )


def check_token_ids(name: str, ids, vocab_size: int) -> None:
    """ids (concrete): integer token ids in [0, vocab_size); a traced array is left to the caller."""
    if isinstance(ids, jax.core.Tracer):
        return
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer) or ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        span = f", range [{ids.min()}, {ids.max()}]" if ids.size else ""
        raise ValueError(f"{name} must hold token ids in [0, {vocab_size}), got dtype {ids.dtype}{span}")


def check_integer_counts(name: str, counts) -> None:
    """counts (concrete or traced) has an integer dtype: a float count would be truncated silently."""
    dtype = jnp.result_type(counts if hasattr(counts, "dtype") else np.asarray(counts))
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must be integer token counts, got dtype {dtype}")


def _as_key(seed):
    """seed as a PRNG key: an int (Python, numpy, or a scalar integer array, traced or not) is a seed,
    a raw uint32[2] key or a typed key array is used as it is."""
    if isinstance(seed, int | np.integer) and not isinstance(seed, bool):
        if not -(2**63) <= int(seed) < 2**64:
            raise ValueError(f"seed must be an int in [-2**63, 2**64) or a jax PRNG key, got {seed}")
        return jax.random.PRNGKey(seed)
    dtype, shape = getattr(seed, "dtype", None), getattr(seed, "shape", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
        return jax.random.key_data(seed)  # raw, as compile_generate's executables take it
    if dtype == jnp.uint32 and shape == (2,):
        return seed
    if dtype is not None and jnp.issubdtype(dtype, jnp.integer) and dtype != jnp.bool_ and shape == ():
        return jax.random.PRNGKey(seed)
    raise ValueError(f"seed must be an int or a jax PRNG key (uint32[2] or a typed key), got {seed!r}")


def _static_options(config, return_debug, *, max_new_tokens, top_logprobs, prefill_rows_per_chunk, **rest):
    """_generate's static arguments, as plain Python values (one jit cache entry per setting)."""
    rows = None if prefill_rows_per_chunk is None else int(prefill_rows_per_chunk)
    return dict(
        config=config,
        max_new_tokens=int(max_new_tokens),
        top_logprobs=int(top_logprobs),
        prefill_rows_per_chunk=rows,
        return_debug=bool(return_debug),
        **rest,
    )


def compile_generate(
    params_or_shapes,
    config: ModelConfig | None = None,
    *,
    batch: int,
    prompt_len: int,
    max_new_tokens: int,
    compression: CompressionConfig | None = None,
    sampling: SamplingConfig | None = None,
    attention_impl: str = "reference",
    return_debug: bool = False,
    return_logprobs: bool = False,
    top_logprobs: int = 0,
    prefill_rows_per_chunk: int | None = None,
    mesh: Mesh | None = None,
):
    """Compile `generate` ahead of time for one shape; returns (run, compile_seconds).

    run(params, prompt_ids [batch, prompt_len], prompt_lengths [batch], seed=0) -> GenerationOutput,
    as `generate` with the same arguments returns, with no tracing or compiling left to do.
    params_or_shapes: the params, or `param_shapes(config)` (run then takes params of those shapes); or,
    with config None, a model that holds its weights (`params_and_config_of`), and run then takes such a
    model of this config, or its params.
    mesh: as in `generate`; run then places its arguments on it (params already there stay in place).
    """
    if config is None:
        params_or_shapes, config = params_and_config_of(params_or_shapes)
    options = _options(
        max_new_tokens, compression, sampling, attention_impl, return_logprobs, top_logprobs,
        prefill_rows_per_chunk,
    )  # fmt: skip
    if not isinstance(return_debug, bool):
        raise ValueError(f"return_debug must be a bool, got {return_debug!r}")
    compiled, placement, seconds = _compiled_generate(
        params_or_shapes, config, batch, prompt_len, options, return_debug, mesh
    )

    def run(params, prompt_ids, prompt_lengths, seed=0) -> GenerationOutput:
        if hasattr(params, "params_and_config"):  # a model holding its weights
            params, model_config = params_and_config_of(params)
            if model_config != config:
                raise ValueError(f"compiled for {config}, got a model of {model_config}")
        if _shape(prompt_ids) != (batch, prompt_len) or _shape(prompt_lengths) != (batch,):
            raise ValueError(
                f"compiled for prompt_ids {(batch, prompt_len)} and prompt_lengths {(batch,)}, got "
                f"{_shape(prompt_ids)} and {_shape(prompt_lengths)}"
            )
        check_generate_inputs(config, prompt_ids, prompt_lengths, **options)
        args = (
            params,
            jnp.asarray(prompt_ids, jnp.int32),
            jnp.asarray(prompt_lengths, jnp.int32),
            _as_key(seed),
        )
        return compiled(*(args if placement is None else jax.device_put(args, placement)))

    return run, seconds


def _compiled_generate(params_or_shapes, config, batch, prompt_len, options, return_debug=False, mesh=None):
    """`_generate` compiled for [batch, prompt_len] prompts and `_options`' options (on mesh, if given):
    (the compiled program, the placement of its arguments or None, compile seconds)."""
    ids, lengths = _checked_job_shapes(config, batch, prompt_len, options)
    key = jax.eval_shape(jax.random.PRNGKey, 0)
    check_params(params_or_shapes, config)
    static = _static_options(config, return_debug, **options)
    if mesh is None:
        start = time.perf_counter()
        compiled = _generate_top_level.lower(params_or_shapes, ids, lengths, key, **static).compile()
        return compiled, None, time.perf_counter() - start
    check_mesh(mesh, batch, options["attention_impl"])
    fn, placement = _mesh_program(mesh, **static)
    params_or_shapes = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params_or_shapes, placement[0]
    )
    ids, lengths, key = (
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip((ids, lengths, key), placement[1:])
    )
    start = time.perf_counter()
    compiled = fn.lower(params_or_shapes, ids, lengths, key).compile()
    return compiled, placement, time.perf_counter() - start


def check_mesh(mesh: Mesh, batch: int, attention_impl: str) -> None:
    """A mesh `generate` can run on (`sharding.data_axis`), with a kernel that can run on its "model"
    axis (`attention.check_kernel_on_model_axis`)."""
    sharding.data_axis(mesh, batch)
    check_kernel_on_model_axis(attention_impl, sharding.model_axis_size(mesh))


@functools.lru_cache(maxsize=64)
def _mesh_program(mesh: Mesh, **static):
    """(`_generate` over mesh, jitted; the shardings of its params, prompt_ids, prompt_lengths and key).

    The rows are split over the data axis by `shard_map`: each data shard decodes its own rows and stops
    when they are done, its draws seeded by the key folded with its index. Over "model" XLA partitions
    each shard's program from the params' Megatron shardings (`sharding.param_shardings`): the matmuls
    split by heads and intermediate with an all-reduce after attention and after the MLP, the KV buffer
    split by KV heads, and every sum over heads that picks a slot ("sequence" granularity's importance,
    SnapKV's and the baselines' scores) all-reduced before its argmin, so every shard evicts the same
    slot. Only the kernels are placed by hand, with the all-reduce of their "sequence" importance
    (`attention._per_model_shard`). With a "model" axis of 1 the program is the data-parallel one, every
    axis manual.
    """
    config, return_debug = static["config"], static["return_debug"]
    axis = mesh.axis_names[0]
    model = sharding.model_axis_size(mesh)

    def rows_of_one_data_shard(params, ids, lengths, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(axis))  # independent draws per data shard
        return _generate(params, ids, lengths, key, **static)

    row = P(axis)
    specs = GenerationOutput(
        tokens=row,
        lengths=row,
        cache_occupancy=row,
        nonfinite=row,
        evicted_positions=P(None, None, axis) if return_debug else None,
        logprobs=row if static["return_logprobs"] else None,
        top_logprobs=row if static["top_logprobs"] else None,
        top_token_ids=row if static["top_logprobs"] else None,
    )
    by_row, replicated = NamedSharding(mesh, row), NamedSharding(mesh, P())
    placement = (sharding.param_shardings(config, mesh), by_row, by_row, replicated)
    fn = jax.shard_map(
        rows_of_one_data_shard,
        mesh=mesh,
        in_specs=(P(), row, row, P()),
        out_specs=specs,
        axis_names=set(mesh.axis_names) if model == 1 else {axis},
        check_vma=False,
    )
    return jax.jit(fn, in_shardings=placement, compiler_options=COMPILER_OPTIONS), placement


_GENERATE_STATIC = (
    "config",
    "max_new_tokens",
    "compression",
    "sampling",
    "attention_impl",
    "return_debug",
    "return_logprobs",
    "top_logprobs",
    "prefill_rows_per_chunk",
)


def _generate(
    params,
    prompt_ids,
    prompt_lengths,
    key,
    *,
    config,
    max_new_tokens,
    compression,
    sampling,
    attention_impl,
    return_debug,
    return_logprobs=False,
    top_logprobs=0,
    prefill_rows_per_chunk=None,
):
    batch, prompt_len = prompt_ids.shape
    compression = effective_compression(compression, prompt_len, max_new_tokens)
    capacity = buffer_capacity(compression, prompt_len, max_new_tokens)
    stop_ids = sampling.stop_ids(config.eos_token_ids)
    stop = jnp.asarray(stop_ids or (-1,), jnp.int32)
    pad = jnp.int32(config.pad_token_id)

    def choose(logits, key, num_generated, history):
        """One step's raw logits -> (next token [B], its log-probs or None, [B] bool: no token to draw:
        the logits are not finite, or the sampling controls banned every token)."""
        bad = ~jnp.all(jnp.isfinite(logits), axis=-1)
        logits = process_logits(logits, sampling, stop_ids, num_generated, history)
        bad = bad | ~jnp.any(jnp.isfinite(logits), axis=-1)  # argmax / categorical would give id 0
        token = sample_next(logits, key, sampling)
        return token, token_logprobs(logits, token, sampling, top_logprobs) if return_logprobs else None, bad

    def write_scores(buffers, scores, step, keep):
        """The log-prob buffers [B, max_new_tokens, ...] with column `step` set (0 where not keep)."""
        if buffers is None:
            return None
        put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(
            buf, jnp.where(keep.reshape(-1, *(1,) * (x.ndim - 1)), x, 0)[:, None], step, axis=1
        )
        return jax.tree_util.tree_map(put, buffers, scores)

    cache, logits = prefill_in_slices(
        params, config, prompt_ids, prompt_lengths, compression, capacity, prefill_rows_per_chunk
    )
    cache = ready_to_decode(sharding.split_kv_heads(cache), compression, attention_impl, max_new_tokens)
    history = init_history(prompt_ids, prompt_lengths, config.vocab_size, max_new_tokens, sampling)
    first, scores, bad = choose(logits, jax.random.fold_in(key, 0), 0, history)
    first = jnp.where(bad, pad, first)
    history = record_token(history, first)
    tokens = jnp.full((batch, max_new_tokens), pad, jnp.int32).at[:, 0].set(first)
    empty = lambda x: jnp.zeros((batch, max_new_tokens, *x.shape[1:]), x.dtype)
    scored = write_scores(jax.tree_util.tree_map(empty, scores), scores, 0, ~bad)
    groups = cache.layers[0].slot_pos.shape[1]
    debug = (
        jnp.full((max_new_tokens, config.num_layers, batch, groups), -1, jnp.int32) if return_debug else None
    )
    done = jnp.isin(first, stop) | bad
    held = tokens_held(cache.layers[0])
    state = (
        jnp.int32(1),
        tokens,
        first,
        done,
        (~bad).astype(jnp.int32),
        bad,
        cache,
        debug,
        history,
        scored,
        held,
    )

    def cond(state):
        step, _, _, done, *_ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tokens, current, done, lengths, nonfinite, cache, debug, history, scored, held = state
        step_key = jax.random.fold_in(key, step)
        positions = prompt_lengths + step - 1  # the position of `current`, whose KV is written now
        logits, cache, evicted = decode_step(
            params,
            config,
            cache,
            current,
            positions,
            jax.random.fold_in(step_key, 1),
            compression=compression,
            attention_impl=attention_impl,
        )
        held = jnp.where(done, held, tokens_held(cache.layers[0]))  # frozen once the row stopped
        if debug is not None:
            # A row that had stopped before this step wrote a pad (or its last token), not its context.
            evicted = jnp.where(done[None, :, None], -1, evicted)
            debug = jax.lax.dynamic_update_slice(debug, evicted[None], (step, 0, 0, 0))
        nxt, scores, bad = choose(logits, step_key, step, history)
        bad = ~done & bad
        nxt = jnp.where(done | bad, pad, nxt)
        history = record_token(history, nxt)
        scored = write_scores(scored, scores, step, ~done & ~bad)
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, step))
        lengths = lengths + (~done & ~bad).astype(jnp.int32)
        done = done | bad | jnp.isin(nxt, stop)
        nonfinite = nonfinite | bad
        return step + 1, tokens, nxt, done, lengths, nonfinite, cache, debug, history, scored, held

    _, tokens, _, _, lengths, nonfinite, cache, debug, _, scored, held = jax.lax.while_loop(cond, body, state)
    logprobs, best, best_ids = (None, None, None) if scored is None else scored
    return GenerationOutput(
        tokens=tokens,
        lengths=lengths,
        cache_occupancy=held,
        evicted_positions=debug,
        nonfinite=nonfinite,
        logprobs=logprobs,
        top_logprobs=best,
        top_token_ids=best_ids,
    )


# `generate` called outside any trace, and `compile_generate`: `_generate` as its own program, with
# COMPILER_OPTIONS. Inside a caller's trace `generate` calls `_generate` itself, whose ops join the
# caller's program (JAX takes compiler options only on the outermost jit).
_generate_top_level = jax.jit(_generate, static_argnames=_GENERATE_STATIC, compiler_options=COMPILER_OPTIONS)
