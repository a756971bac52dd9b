"""Per-chip memory of tensor-parallel generate on 8-chip TPU slices: the README's table.

Weights (`sharding.per_chip_param_bytes`) and the KV buffer of LongFlow at C = 2048 slots
(`sharding.per_chip_bytes`) on each chip of a (data, model) mesh, for Qwen3-8B and
DeepSeek-R1-Distill-Qwen-32B in bf16; activations and XLA's workspace come on top.
Usage: python scripts/memory_table.py [--batch 8]
"""

from __future__ import annotations

import argparse

from longflow_jax import CompressionConfig, ModelConfig
from longflow_jax.sharding import per_chip_bytes

# fmt: off
MODELS = {
    "Qwen3-8B": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=40960, qk_norm=True, dtype="bfloat16"),
    "R1-Distill-32B": ModelConfig(  # DeepSeek-R1-Distill-Qwen-32B: the Qwen2 architecture
        model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_layers=64,
        num_heads=40, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1e6,
        max_position_embeddings=131072, qkv_bias=True, dtype="bfloat16"),
}
# fmt: on
CHIPS = {"v5e": 16, "v6e": 32, "v5p": 95}  # GB of HBM per chip
MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]


def table(batch: int, prompt_len: int = 1024, max_new_tokens: int = 16384, budget: int = 2048) -> str:
    compression = CompressionConfig(policy="longflow", budget=budget)
    head = "| model | mesh (data, model) | weights / chip | KV / chip | total | " + " | ".join(
        f"{chip}-8 ({gb} GB)" for chip, gb in CHIPS.items()
    )
    lines = [head + " |", "|" + "---|" * (5 + len(CHIPS))]
    for name, config in MODELS.items():
        for data, model in MESHES:
            weights, kv = per_chip_bytes(
                config, compression, batch=batch, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                data=data, model=model,
            )  # fmt: skip
            total = (weights + kv) / 1e9
            fits = " | ".join("fits" if total < gb else "-" for gb in CHIPS.values())
            sizes = f"{weights / 1e9:.1f} GB | {kv / 1e9:.2f} GB | {total:.1f} GB"
            lines.append(f"| {name} | ({data}, {model}) | {sizes} | {fits} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="rows in all (a multiple of 8)")
    print(table(parser.parse_args().batch))
