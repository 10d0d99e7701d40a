"""`longvq-train`: train LongVQ, a same-size Llama or the MEGA-chunk ablation on one task of `longvq.tasks`.

    python scripts/train.py --task listops --arch longvq --preset quick --output-dir runs/listops-longvq
    python scripts/train.py --task mqar --arch llama --time-budget 120 --set learning_rate=1e-3 --output-dir runs/mq

Writes results.json, curve.png and the model (safetensors) into --output-dir. The logic lives in
`longvq.experiments` (`run_experiment`, `train_main`); options: --help.
"""

import sys

from longvq.cli import train

if __name__ == "__main__":
    sys.exit(train())
