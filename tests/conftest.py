import glob
import os

# On a CPU-only machine compile time dominates this suite (tiny models, many shapes): LLVM's optimization
# of XLA's CPU code costs more than the run time it saves. Set before jax starts a backend; subprocesses
# inherit it; a user's own setting wins.
_xla_flags = os.environ.get("XLA_FLAGS", "")
if not glob.glob("/dev/nvidia[0-9]*") and "xla_backend_optimization_level" not in _xla_flags:
    os.environ["XLA_FLAGS"] = f"{_xla_flags} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def pytest_collection_modifyitems(config, items):
    if on_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (jax.devices()[0].platform != 'gpu')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """(hf_dir, converted_dir) per model family, built once per test session."""
    from longflow_jax.convert import convert
    from longflow_jax.testing import make_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for family, extra in [
        (
            "llama",
            dict(
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                }
            ),
        ),
        ("qwen2", {}),
        ("qwen3", {}),
    ]:
        hf_dir = make_tiny_hf_checkpoint(str(root / f"hf_{family}"), family, **extra)
        convert(hf_dir, str(root / f"lf_{family}"))
        out[family] = (hf_dir, str(root / f"lf_{family}"))
    return out


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory):
    """A converted tiny Qwen3 with the tiny chat tokenizer (eos <|im_end|> = 4). Its seed makes the greedy
    reply to test_batch's long prompt end with <|im_end|> after 5 tokens (budget 32)."""
    from longflow_jax.convert import convert
    from longflow_jax.testing import make_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("chat")
    convert(
        make_tiny_hf_checkpoint(str(root / "hf"), "qwen3", seed=643, with_tokenizer=True), str(root / "ckpt")
    )
    return str(root / "ckpt")
