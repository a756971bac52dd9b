"""Small helpers shared by the tests."""

import functools
import importlib
import json

from longflow_jax.testing import random_prompts

# The package re-exports the function `generate`, which shadows the submodule as an attribute.
generate_module = importlib.import_module("longflow_jax.generate")


def make_prompts(config, lengths, seed=None):
    """Right-padded random prompts [B, max(lengths)] (no pad id inside a row) and their lengths."""
    return random_prompts(config.vocab_size, lengths, seed)


def count_decode_step_traces(monkeypatch):
    """Patch generate's decode_step to count how often it is traced; returns the counter dict."""
    calls = {"n": 0}
    original = generate_module.decode_step

    @functools.wraps(original)
    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(generate_module, "decode_step", counting)
    return calls


def bounded_mask(kv_valid, kv_len):
    """The kernels' kv_len contract in plain jnp: slot c of row b counts iff kv_valid and c < kv_len."""
    import jax.numpy as jnp

    return kv_valid & (jnp.arange(kv_valid.shape[1])[None, :] < jnp.asarray(kv_len)[:, None])


def write_jsonl(path, lines):
    """Write JSONL: dicts as JSON, strings as they are (for malformed lines); returns the path as str."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)
