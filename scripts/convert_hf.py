"""Convert a Hugging Face checkpoint: python scripts/convert_hf.py HF_DIR OUT_DIR [--dtype bfloat16]."""

import sys

from longflow_jax.convert import main

if __name__ == "__main__":
    sys.exit(main())
