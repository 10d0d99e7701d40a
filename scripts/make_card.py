"""Command-line entry point: `python scripts/make_card.py --results results.json --out README.md --model-name NAME
--repo-id ORG/NAME [--recipe recipe.json] [--set key=value ...] [--config CHECKPOINT]`. See `longvq.model_card`.
"""

import sys

from longvq.cli import card

if __name__ == "__main__":
    sys.exit(card())
