"""Ready-made `Trainer` recipes: the `TrainingArguments` every recipe shares (`trainer_defaults`), activation
checkpointing under the installed transformers' name for it, a small byte-level LM config, `train_causal_lm` (train
or continue training a causal LM and evaluate it), `classification_trainer` (fine-tune a sequence classifier) and the
LoRA target modules of a LongVQ block."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..configuration_longvq import LongVQConfig
from ..modeling_longvq import LongVQForCausalLM, LongVQForSequenceClassification
from ..tokenization import BYTE_VOCAB_SIZE
from .codebooks import CodebookHealthCallback
from .data import byte_lm_datasets
from .evaluation import compute_classification_metrics, compute_lm_metrics, preprocess_logits_for_metrics

# The nn.Linear layers of every LongVQ block, for `peft.LoraConfig(target_modules=...)` (the same set PEFT's
# "all-linear" picks): `attention.value_proj` (D -> H), `attention.mix_proj` (D -> D+Z+H+D: update gate, shared q/k
# representation, reset gate, hidden), `attention.out_proj` (H -> D), `feed_forward.fc1`, `feed_forward.fc2`. Heads:
# `lm_head` (tied to the embedding by default) and the classifier `score` (PEFT's SEQ_CLS task keeps `score` fully
# trainable by itself). The EMA (`ema.damping_logit`, `decay_logit`, `expansion`, `projection`, `residual_weight`),
# the q/k affine (`attention.query_key_scale`, `query_key_offset`) and the relative bias (`position_bias.weight`, or
# `alpha`/`beta` when rotary) are raw parameters that LoRA cannot adapt: they stay frozen unless their modules
# (`ema`, `position_bias`) are listed in `modules_to_save`. The codebook is a buffer: freeze it with
# `LongVQPreTrainedModel.freeze_codebooks()` before fine-tuning.
LORA_TARGET_MODULES = ("value_proj", "mix_proj", "out_proj", "fc1", "fc2")

DEFAULT_BYTE_LM_CONFIG = dict(
    vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
    shared_representation_size=32, ema_projection_size=8, codebook_size=32, chunk_size=32,
)  # fmt: skip


def checkpointing_arguments(enabled: bool) -> dict[str, bool]:
    """The `TrainingArguments` entry that turns activation checkpointing on or off: `activation_checkpointing` since
    transformers 5.23, `gradient_checkpointing` before."""
    from transformers import TrainingArguments

    names = {argument.name for argument in fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def enable_activation_checkpointing(model, **checkpoint_kwargs):
    """`model.activation_checkpointing_enable(...)` (transformers >= 5.23; `gradient_checkpointing_enable` before),
    with `checkpoint_kwargs` passed to `torch.utils.checkpoint` (e.g. `use_reentrant=False`)."""
    if hasattr(model, "activation_checkpointing_enable"):
        return model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs or None)
    return model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs or None)


def trainer_defaults() -> dict[str, Any]:
    """`TrainingArguments` shared by every recipe here: no experiment trackers, the CPU when there is no GPU, data
    loaded in the main process, and no DDP buffer broadcast: the model keeps its codebook buffers identical on every
    process (all-reduced statistics), so broadcasting them from process 0 at each forward is redundant (and would
    hide a replica that diverged)."""
    return {
        "report_to": "none", "use_cpu": not torch.cuda.is_available(), "dataloader_num_workers": 0,
        "ddp_broadcast_buffers": False,
    }  # fmt: skip


def byte_lm_config(**overrides) -> LongVQConfig:
    """A small byte-level causal-LM config (256 ids, D=64, 2 layers, S=32, C=32) with `overrides` applied."""
    return LongVQConfig(**{**DEFAULT_BYTE_LM_CONFIG, **overrides})


@dataclass
class TrainingRun:
    """What `train_causal_lm` returns: the `Trainer` (its model, state and log history) and the final metrics."""

    trainer: Any
    train_metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)

    @property
    def model(self):
        return self.trainer.model

    @property
    def losses(self) -> list[float]:
        """The logged training losses, in step order."""
        return [entry["loss"] for entry in self.trainer.state.log_history if "loss" in entry]
def train_causal_lm(
    output_dir: str,
    *,
    model: LongVQForCausalLM | None = None,
    config: LongVQConfig | dict | None = None,
    datasets=None,
    block_size: int = 128,
    seed: int = 0,
    max_steps: int = 100,
    per_device_train_batch_size: int = 8,
    per_device_eval_batch_size: int | None = None,
    gradient_accumulation_steps: int = 1,
    learning_rate: float = 2e-3,
    lr_scheduler_type: str = "cosine",
    warmup_steps: int = 0,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    optim: str = "adamw_torch",
    activation_checkpointing: bool = False,
    logging_steps: int = 10,
    eval_steps: int | None = None,
    save_steps: int | None = None,
    save_total_limit: int | None = None,
    resume_from_checkpoint: str | bool | None = None,
    evaluate: bool = True,
    save_final_model: bool = True,
    callbacks: list | None = None,
    **training_arguments,
) -> TrainingRun:
    """Train (or continue training) a byte-level LongVQ causal LM with `Trainer` and return a `TrainingRun`.

    Args:
        output_dir: where `Trainer` writes checkpoints (`checkpoint-<step>/`) and, if `save_final_model`, the final
            model (safetensors + config) and its `trainer_state.json`.
        model / config: the model to train, or a `LongVQConfig` (or a dict of overrides of `byte_lm_config()`) to
            build one from, initialised after `transformers.set_seed(seed)`; default: `byte_lm_config()`.
        datasets: a mapping with `train` and `validation` splits of `input_ids`/`labels`; default
            `byte_lm_datasets(block_size, seed)`.
        max_steps, per_device_train_batch_size, gradient_accumulation_steps, learning_rate, ...: as in
            `TrainingArguments`; the global batch is per-device batch x accumulation steps x processes.
        activation_checkpointing: recompute each LongVQ block in the backward pass
            (`TrainingArguments(activation_checkpointing=True)`); the codebook is still updated once per forward.
        eval_steps / save_steps: evaluate / checkpoint every so many steps (None: evaluate at the end only, and no
            intermediate checkpoints).
        resume_from_checkpoint: a `checkpoint-<step>` folder, or True for the latest one in `output_dir`; model
            weights, codebook buffers, optimizer, scheduler, RNG states and the data position are restored.
        evaluate: run a final evaluation on the validation split.
        callbacks: extra `TrainerCallback`s. A `CodebookHealthCallback` is always added (first, so that reporting
            callbacks see its values) unless one is passed: training logs carry codebook usage and perplexity.
        **training_arguments: any other `TrainingArguments` field (e.g. `ddp_broadcast_buffers`, `fsdp`, `bf16`).

    Evaluation reports `eval_loss` (cross-entropy plus the weighted commitment loss), `eval_cross_entropy`,
    `eval_perplexity` and `eval_bpb`.
    """
    from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

    set_seed(seed)
    if model is None:
        if config is None or isinstance(config, dict):
            config = byte_lm_config(**(config or {}))
        model = LongVQForCausalLM(config)
    if datasets is None:
        datasets = byte_lm_datasets(block_size=block_size, seed=seed)

    # Every parameter takes part in every forward of the causal LM.
    defaults = {**trainer_defaults(), "disable_tqdm": True, "ddp_find_unused_parameters": False}
    args = TrainingArguments(
        output_dir=output_dir,
        seed=seed,
        max_steps=max_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        per_device_eval_batch_size=per_device_eval_batch_size or per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=learning_rate,
        lr_scheduler_type=lr_scheduler_type,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        optim=optim,
        **checkpointing_arguments(activation_checkpointing),
        logging_steps=logging_steps,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        **{**defaults, **training_arguments},
    )
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=default_data_collator,
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"],
        processing_class=None,  # bytes are the tokens: there is no tokenizer to save
        compute_metrics=compute_lm_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        callbacks=callbacks,
    )
    # Codebook health in every training log, ahead of the printing/reporting callbacks so that they include it.
    health = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CodebookHealthCallback)), None)
    if health is None:
        health = CodebookHealthCallback()
    else:
        trainer.callback_handler.callbacks.remove(health)
    trainer.callback_handler.callbacks.insert(0, health)
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    run = TrainingRun(trainer=trainer, train_metrics=dict(result.metrics))
    if evaluate:
        run.eval_metrics = trainer.evaluate()
    if save_final_model:
        trainer.save_model(output_dir)
        trainer.save_state()
    return run


def classification_trainer(
    output_dir: str,
    model: LongVQForSequenceClassification,
    datasets,
    *,
    seed: int = 0,
    max_steps: int = 50,
    per_device_train_batch_size: int = 16,
    learning_rate: float = 1e-3,
    **training_arguments,
):
    """A `Trainer` that fine-tunes a sequence classifier on `datasets` (`train`/`validation` with `input_ids` and
    integer `labels`) and reports `eval_accuracy`; call `.train()` / `.evaluate()` on it. (On the tiny test models
    learning rates above ~2e-3 tend to get stuck at chance on `byte_classification_datasets`.)"""
    from transformers import Trainer, TrainingArguments, default_data_collator

    defaults = {
        **trainer_defaults(), "disable_tqdm": True, "save_strategy": "no", "logging_steps": 10,
        "lr_scheduler_type": "constant", "ddp_find_unused_parameters": False,
    }  # fmt: skip
    args = TrainingArguments(
        output_dir=output_dir,
        seed=seed,
        max_steps=max_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        learning_rate=learning_rate,
        **{**defaults, **training_arguments},
    )
    return Trainer(
        model=model,
        args=args,
        data_collator=default_data_collator,
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"],
        processing_class=None,
        compute_metrics=compute_classification_metrics,
    )


__all__ = [
    "DEFAULT_BYTE_LM_CONFIG", "LORA_TARGET_MODULES", "TrainingRun", "byte_lm_config", "checkpointing_arguments",
    "classification_trainer", "enable_activation_checkpointing", "train_causal_lm", "trainer_defaults",
]  # fmt: skip
