"""Command-line entry point: train a byte-level LongVQ causal LM on the embedded corpus with the transformers Trainer.

    python scripts/train_clm.py --output_dir runs/clm --max_steps 500
    torchrun --nproc_per_node 2 scripts/train_clm.py --output_dir runs/clm                  # DDP (gloo on CPU)
    accelerate launch --multi_gpu --num_processes 8 scripts/train_clm.py --output_dir runs/clm   # DDP on 8 GPUs
    accelerate launch --config_file fsdp.yaml scripts/train_clm.py --output_dir runs/clm       # FSDP

On a machine without GPUs, `accelerate launch --multi_gpu --num_processes 2` runs 2 CPU processes over gloo
(`accelerate launch --cpu --num_processes 2` starts a single process unless MPI is configured). Process 0 writes
`results.json` (losses, eval loss / bits per byte, codebook fingerprint) into --output_dir. Options: --help; the logic
lives in `longvq.training`.
"""

import sys

from longvq.cli import train_clm

if __name__ == "__main__":
    sys.exit(train_clm())
