"""`longvq-compare`: LongVQ vs a same-size Llama vs the MEGA-chunk ablation on the quick presets of every task, each
run for the same training time; writes comparison.md (one markdown table, with the published MEGA / Transformer
numbers for orientation) and comparison.json.

    OMP_NUM_THREADS=1 python scripts/compare.py --output-dir runs/compare --time-budget 30
    python scripts/compare.py --tasks listops mqar --archs longvq mega_chunk

The logic lives in `longvq.experiments` (`run_comparison`, `comparison_table`, `compare_main`).
"""

import sys

from longvq.cli import compare

if __name__ == "__main__":
    sys.exit(compare())
