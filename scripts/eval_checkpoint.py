"""`longvq-eval`: metrics of a checkpoint written by `longvq-train` on its task's test split, as JSON on stdout.

    python scripts/eval_checkpoint.py runs/listops-longvq
    python scripts/eval_checkpoint.py runs/listops-longvq --split validation

The task, architecture, seed and data arguments are read from the checkpoint's experiment.json. The logic lives in
`longvq.experiments` (`evaluate_checkpoint`, `evaluate_main`).
"""

import sys

from longvq.cli import evaluate

if __name__ == "__main__":
    sys.exit(evaluate())
