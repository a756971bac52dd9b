"""longflow-jax: decode-time KV cache compression (LongFlow) for reasoning models in JAX."""
