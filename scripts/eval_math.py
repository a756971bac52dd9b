"""Math accuracy under KV-cache policies:
python scripts/eval_math.py --ckpt DIR --input gsm8k.jsonl --output rows.jsonl --policies full,longflow,h2o
--budgets 512,1024 [--max-new-tokens 4096 --batch-size 16]."""

import sys

from longflow_jax.eval_math import main

if __name__ == "__main__":
    sys.exit(main())
