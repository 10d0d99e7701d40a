"""Training LongVQ with the transformers `Trainer`, by job:

- `data`: byte-level data sets cut from the embedded corpus (`byte_lm_datasets`, `byte_classification_datasets`);
- `evaluation`: the `Trainer` metric functions (perplexity and bits per byte, accuracy, per-position accuracy),
  computed by the `evaluate` modules of `longvq.metrics`;
- `codebooks`: codebook fingerprints, code counts and `CodebookHealthCallback` (codebook usage and perplexity in
  every training log);
- `recipes`: `trainer_defaults`, `train_causal_lm`, `classification_trainer`, activation checkpointing under either
  transformers name, `LORA_TARGET_MODULES`;
- `cli`: the `longvq-train-clm` command, also `python -m longvq.training` (and so `torchrun -m longvq.training`,
  `accelerate launch -m longvq.training`).

Everything distributed is left to `Trainer`/accelerate: the same call runs in one process, under
`accelerate launch` (DDP, FSDP) or under `torchrun`. The model itself keeps the codebooks identical across processes
(its EMA k-means statistics are all-reduced inside `LongVQModel.forward`), so nothing here synchronises them.

    from longvq.training import byte_lm_datasets, train_causal_lm
    run = train_causal_lm("outputs/clm", max_steps=200, block_size=128)
    print(run.eval_metrics["eval_bpb"])

Not part of the Hub remote code (that is `configuration_longvq.py` and `modeling_longvq.py` only).
"""

from .cli import main
from .codebooks import CodebookHealthCallback, CodeCounter, codebook_summary, codebooks_frozen, longvq_stacks
from .data import (
    CLASSIFICATION_LABELS,
    VALIDATION_FRACTION,
    byte_classification_datasets,
    byte_lm_datasets,
    load_corpus_bytes,
    split_corpus,
)
from .evaluation import (
    compute_classification_metrics,
    compute_lm_metrics,
    compute_token_accuracy,
    preprocess_logits_for_metrics,
    preprocess_token_predictions,
)
from .recipes import (
    DEFAULT_BYTE_LM_CONFIG,
    LORA_TARGET_MODULES,
    TrainingRun,
    byte_lm_config,
    checkpointing_arguments,
    classification_trainer,
    enable_activation_checkpointing,
    train_causal_lm,
    trainer_defaults,
)

__all__ = [
    "CLASSIFICATION_LABELS",
    "DEFAULT_BYTE_LM_CONFIG",
    "LORA_TARGET_MODULES",
    "VALIDATION_FRACTION",
    "CodeCounter",
    "CodebookHealthCallback",
    "TrainingRun",
    "byte_classification_datasets",
    "byte_lm_config",
    "byte_lm_datasets",
    "checkpointing_arguments",
    "classification_trainer",
    "codebook_summary",
    "codebooks_frozen",
    "compute_classification_metrics",
    "compute_lm_metrics",
    "compute_token_accuracy",
    "enable_activation_checkpointing",
    "load_corpus_bytes",
    "longvq_stacks",
    "main",
    "preprocess_logits_for_metrics",
    "preprocess_token_predictions",
    "split_corpus",
    "train_causal_lm",
    "trainer_defaults",
]
