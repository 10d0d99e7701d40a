"""Command-line entry point: `python scripts/export_checkpoint.py outputs/demo exports/longvq-demo --repo-id ORG/NAME`.

Loads a local LongVQ causal-LM checkpoint and writes a push_to_hub-ready folder (remote code, auto_map for all heads,
safetensors, generation config, byte tokenizer, README.md model card). See `longvq.hub`.
"""

import sys

from longvq.cli import export

if __name__ == "__main__":
    sys.exit(export())
