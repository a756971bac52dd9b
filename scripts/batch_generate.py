"""Batch generation for a JSONL file of prompts:
python scripts/batch_generate.py --ckpt DIR --input IN.jsonl --output OUT.jsonl [--policy longflow ...]."""

import sys

from longflow_jax.batch import main

if __name__ == "__main__":
    sys.exit(main())
