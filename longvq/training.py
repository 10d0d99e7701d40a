"""Training LongVQ with the transformers `Trainer`: byte-level data sets built from the embedded corpus, evaluation
metrics (perplexity, bits per byte, accuracy), codebook helpers, and `train_causal_lm`, which `scripts/train_clm.py`
wraps in a command line.

Everything distributed is left to `Trainer`/accelerate: the same call runs in one process, under
`accelerate launch` (DDP, FSDP) or under `torchrun`. The model itself keeps the codebooks identical across processes
(its EMA k-means statistics are all-reduced inside `LongVQModel.forward`), so nothing here synchronises them.

    from longvq.training import byte_lm_datasets, train_causal_lm
    run = train_causal_lm("outputs/clm", max_steps=200, block_size=128)
    print(run.eval_metrics["eval_bpb"])

Not part of the Hub remote code (that is `configuration_longvq.py` and `modeling_longvq.py` only).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from functools import partial
from importlib import resources
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from .configuration_longvq import LongVQConfig
from .metrics import load as load_metric
from .modeling_longvq import LongVQForCausalLM, LongVQForSequenceClassification

BYTE_VOCAB_SIZE = 256
VALIDATION_FRACTION = 0.1

# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def load_corpus_bytes() -> bytes:
    """The embedded corpus `longvq/data/tiny_corpus.txt` (about 30 kB of English text) as raw bytes."""
    return resources.files("longvq").joinpath("data/tiny_corpus.txt").read_bytes()


def split_corpus(data: bytes, validation_fraction: float = VALIDATION_FRACTION) -> tuple[bytes, bytes]:
    """Contiguous split, as for enwik8: the first `1 - validation_fraction` of the bytes train, the rest validate."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"`validation_fraction` must be in (0, 1), got {validation_fraction!r}.")
    cut = int(len(data) * (1.0 - validation_fraction))
    return data[:cut], data[cut:]


def _windows(data: bytes, block_size: int, stride: int, offset: int = 0) -> np.ndarray:
    """(n, block_size) int64 windows of `data` starting at offset, offset + stride, ...; the ragged tail is dropped."""
    array = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    starts = np.arange(offset, len(array) - block_size + 1, stride)
    if len(starts) == 0:
        raise ValueError(f"`block_size` ({block_size}) is longer than the text to cut ({len(array) - offset} bytes).")
    return np.stack([array[s : s + block_size] for s in starts])


def byte_lm_datasets(
    block_size: int = 128,
    seed: int = 0,
    stride: int | None = None,
    validation_fraction: float = VALIDATION_FRACTION,
    data: bytes | None = None,
):
    """Byte-level causal-LM data: a `datasets.DatasetDict` with `train` and `validation` splits of fixed-length
    windows (`input_ids` and `labels`, both the window's byte ids; the model shifts the labels).

    The corpus (`data`, default: the embedded one) is split contiguously, 90/10 like enwik8, so no validation byte
    is ever trained on. Training windows start every `stride` bytes (default `block_size`: non-overlapping) from a
    random offset in `[0, stride)` drawn from `seed`, so different seeds see different window boundaries; validation
    windows are non-overlapping from the start of the held-out part and do not depend on `seed`. Shuffling is left
    to the `Trainer` (its sampler is seeded by `TrainingArguments.seed`/`data_seed`).
    """
    from datasets import Dataset, DatasetDict

    stride = block_size if stride is None else stride
    if block_size < 2 or stride < 1:
        raise ValueError(f"Need block_size >= 2 and stride >= 1, got {block_size} and {stride}.")
    train_bytes, validation_bytes = split_corpus(load_corpus_bytes() if data is None else data, validation_fraction)
    offset = int(np.random.default_rng(seed).integers(stride)) if stride > 1 else 0
    splits = {
        "train": _windows(train_bytes, block_size, stride, offset),
        "validation": _windows(validation_bytes, block_size, block_size),
    }
    return DatasetDict({
        name: Dataset.from_dict({"input_ids": windows.tolist(), "labels": windows.tolist()})
        for name, windows in splits.items()
    })  # fmt: skip


CLASSIFICATION_LABELS = ("forward", "reversed")


def byte_classification_datasets(block_size: int = 64, seed: int = 0, validation_fraction: float = 0.2, data=None):
    """A small two-class byte-level sequence-classification task for tests and examples.

    Every non-overlapping window of the corpus appears twice: as written (label 0, `forward`) and with its bytes in
    reverse order (label 1, `reversed`). Both copies contain exactly the same bytes, so a bag-of-bytes model is at
    chance and the classifier has to use byte order (e.g. "the " versus " eht"); a tiny bidirectional LongVQ
    (D=32, 2 layers) gets above 90% validation accuracy in about 300 steps of batch 16 at learning rate 1e-3.
    The windows are split contiguously like `byte_lm_datasets` (both copies of a window land in the same split), and
    the training split is shuffled with `seed`. Columns: `input_ids`, `labels` (int).
    """
    from datasets import Dataset, DatasetDict

    train_bytes, validation_bytes = split_corpus(load_corpus_bytes() if data is None else data, validation_fraction)
    splits = {}
    for name, part in (("train", train_bytes), ("validation", validation_bytes)):
        windows = _windows(part, block_size, block_size)
        inputs = np.concatenate([windows, windows[:, ::-1]])
        labels = np.concatenate([np.zeros(len(windows), dtype=np.int64), np.ones(len(windows), dtype=np.int64)])
        order = np.random.default_rng(seed).permutation(len(inputs)) if name == "train" else np.arange(len(inputs))
        splits[name] = Dataset.from_dict({"input_ids": inputs[order].tolist(), "labels": labels[order].tolist()})
    return DatasetDict(splits)


# ---------------------------------------------------------------------------------------------------------------------
# Metrics for Trainer
# ---------------------------------------------------------------------------------------------------------------------


def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """For a causal LM under `Trainer.evaluate`: reduce the (B, T, V) logits of a batch to the (B, T) next-token
    negative log-likelihood in nats (position t scores `labels[t + 1]`; the last position and ignored labels hold 0),
    so evaluation never accumulates full-vocabulary logits. Pair with `compute_lm_metrics`."""
    if isinstance(logits, tuple):
        logits = logits[0]
    targets = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets.masked_fill(targets == -100, 0), reduction="none"
    )
    nll = nll.masked_fill(targets == -100, 0.0)
    return F.pad(nll, (0, 1))


def compute_lm_metrics(eval_prediction) -> dict[str, float]:
    """`compute_metrics` for a causal LM (after `preprocess_logits_for_metrics`): the mean next-token cross-entropy
    in nats, `perplexity = exp(cross_entropy)` and `bpb = cross_entropy / ln 2` (bits per byte, as tokens are bytes
    for the byte-level models; bits per token otherwise), from the `perplexity` and `bits_per_byte` modules of
    `longvq.metrics`; NaN when no label is scored. Trainer reports them as `eval_cross_entropy`, `eval_perplexity`,
    `eval_bpb`. They exclude the small commitment term that `eval_loss` includes."""
    nll, labels = eval_prediction.predictions, eval_prediction.label_ids
    if isinstance(nll, tuple):
        nll = nll[0]
    # nll[:, t] scores labels[:, t + 1]. The metrics pool the scored tokens of all rows, so the evaluation set goes in
    # as a single row: `evaluate` stores its inputs in Arrow, and one long row is much cheaper than one per window.
    tokens = {"predictions": [np.asarray(nll)[:, :-1].ravel()], "references": [np.asarray(labels)[:, 1:].ravel()]}
    perplexity = load_metric("perplexity", keep_in_memory=True).compute(**tokens)
    bits = load_metric("bits_per_byte", keep_in_memory=True).compute(**tokens)
    return {"cross_entropy": perplexity["cross_entropy"], "perplexity": perplexity["perplexity"],
            "bpb": bits["bits_per_byte"]}  # fmt: skip


def compute_classification_metrics(eval_prediction) -> dict[str, float]:
    """`compute_metrics` for single-label sequence classification: `accuracy` (Trainer: `eval_accuracy`), from the
    `accuracy` module of `longvq.metrics`."""
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return load_metric("accuracy", keep_in_memory=True).compute(
        predictions=np.argmax(logits, axis=-1), references=np.asarray(labels)
    )


# ---------------------------------------------------------------------------------------------------------------------
# Codebooks
# ---------------------------------------------------------------------------------------------------------------------


def _quantizers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every vector quantizer in `model` (also inside DDP/PEFT wrappers), in module order."""
    return [m for m in model.modules() if hasattr(m, "codebook_sum") and hasattr(m, "codebook_count")]


def codebook_summary(model: torch.nn.Module) -> dict[str, Any]:
    """A fingerprint of the codebook buffers, to compare replicas or runs: `sha256` of the raw bytes of every layer's
    `codebook_sum` and `codebook_count` (bitwise identity), and per layer the float64 sums of both buffers."""
    digest = hashlib.sha256()
    layers = []
    for quantizer in _quantizers(model):
        sums, counts = quantizer.codebook_sum.detach().cpu(), quantizer.codebook_count.detach().cpu()
        digest.update(sums.contiguous().numpy().tobytes())
        digest.update(counts.contiguous().numpy().tobytes())
        layers.append({"codebook_sum": float(sums.double().sum()), "codebook_count": float(counts.double().sum())})
    return {"sha256": digest.hexdigest(), "layers": layers}


def _longvq_stacks(model: torch.nn.Module) -> list:
    stacks = [m for m in model.modules() if hasattr(m, "codebook_updates")]
    if not stacks:
        raise ValueError("No LongVQ model found in `model`.")
    return stacks


def freeze_codebooks(model: torch.nn.Module) -> torch.nn.Module:
    """Stop the EMA k-means codebook updates of every LongVQ stack in `model` (PEFT models and wrappers included);
    the codebook buffers then stay bitwise constant in training-mode forwards, and everything else (dropout,
    gradients, commitment loss) is unchanged. Returns `model`; `unfreeze_codebooks` undoes it.

    Used for LoRA fine-tuning: an adapter file stores adapter weights only, so a codebook that moved during
    fine-tuning would be lost when the adapter is loaded onto the base model, and adapters sharing one base
    model must not alter it. (Sets `LongVQModel.codebook_updates`, like `LongVQPreTrainedModel.freeze_codebooks`.)
    """
    for stack in _longvq_stacks(model):
        stack.codebook_updates = False
    return model


def unfreeze_codebooks(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `freeze_codebooks`."""
    for stack in _longvq_stacks(model):
        stack.codebook_updates = True
    return model


def codebooks_frozen(model: torch.nn.Module) -> bool:
    """Whether every LongVQ stack in `model` has its codebook updates switched off."""
    return all(not stack.codebook_updates for stack in _longvq_stacks(model))


class CodebookHealthCallback(TrainerCallback):
    """Adds codebook health to every training log of a `Trainer`, from the code assignments of all real training
    tokens this process saw since the previous log (every micro-batch forward in training mode):

    - `codebook_usage_layer{i}`: fraction of layer i's S codes assigned at least one token;
    - `codebook_perplexity_layer{i}`: `exp(entropy)` of layer i's code assignment frequencies (S when all codes are
      used equally, 1 when the codebook has collapsed onto one code);
    - `codebook_usage`, `codebook_perplexity`: their means over layers.

    The counts are the per-code statistics each layer reports (`LongVQLayerStatistics.code_counts`), collected by
    forward hooks registered at `on_train_begin`; forwards replayed by activation checkpointing in the backward pass
    are not counted twice. Values are added to the `logs` dict and to `state.log_history`; reporting callbacks see
    them if this callback comes before them (`train_causal_lm` puts it first).
    """

    def __init__(self):
        self._counts: list[torch.Tensor | None] = []
        self._handles: list = []
        self._in_forward = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._remove_hooks()
        stacks = _longvq_stacks(model)
        layers = [layer.attention for stack in stacks for layer in stack.layers]
        self._counts = [None] * len(layers)
        for stack in stacks:
            self._handles.append(stack.register_forward_pre_hook(self._enter))
            self._handles.append(stack.register_forward_hook(self._leave))
        for index, attention in enumerate(layers):
            self._handles.append(attention.register_forward_hook(partial(self._collect, index)))

    def _enter(self, module, args):
        self._in_forward = module.training

    def _leave(self, module, args, output):
        self._in_forward = False  # checkpoint recomputes during backward run outside the stack's forward

    def _collect(self, index, module, args, output):
        statistics = output[1]
        if not self._in_forward or statistics is None:
            return
        counts = statistics.code_counts.detach().float().cpu()
        self._counts[index] = counts if self._counts[index] is None else self._counts[index] + counts

    def metrics(self) -> dict[str, float]:
        """The health metrics of the tokens collected so far ({} if none), without resetting them; computed by the
        `codebook_usage` and `codebook_perplexity` modules of `longvq.metrics`."""
        if not self._counts or any(counts is None for counts in self._counts):
            return {}
        import evaluate

        health = evaluate.combine([
            load_metric("codebook_usage", keep_in_memory=True), load_metric("codebook_perplexity", keep_in_memory=True)
        ]).compute(code_counts=[counts.numpy() for counts in self._counts])  # fmt: skip
        logs = {}
        per_layer = zip(health["codebook_usage_per_codebook"], health["codebook_perplexity_per_codebook"])
        for index, (usage, perplexity) in enumerate(per_layer):
            logs[f"codebook_usage_layer{index}"] = usage
            logs[f"codebook_perplexity_layer{index}"] = perplexity
        logs["codebook_usage"] = health["codebook_usage"]
        logs["codebook_perplexity"] = health["codebook_perplexity"]
        return logs

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # training logs only, not evaluation or the final summary
            return
        health = self.metrics()
        self._counts = [None] * len(self._counts)
        logs.update(health)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(health)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hooks()

    def _remove_hooks(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ---------------------------------------------------------------------------------------------------------------------
# PEFT
# ---------------------------------------------------------------------------------------------------------------------

# The nn.Linear layers of every LongVQ block, for `peft.LoraConfig(target_modules=...)` (the same set PEFT's
# "all-linear" picks): `attention.value_proj` (D -> H), `attention.mix_proj` (D -> D+Z+H+D: update gate, shared q/k
# representation, reset gate, hidden), `attention.out_proj` (H -> D), `feed_forward.fc1`, `feed_forward.fc2`. Heads:
# `lm_head` (tied to the embedding by default) and the classifier `score` (PEFT's SEQ_CLS task keeps `score` fully
# trainable by itself). The EMA (`ema.damping_logit`, `decay_logit`, `expansion`, `projection`, `residual_weight`),
# the q/k affine (`attention.query_key_scale`, `query_key_offset`) and the relative bias (`position_bias.weight`, or
# `alpha`/`beta` when rotary) are raw parameters that LoRA cannot adapt: they stay frozen unless their modules
# (`ema`, `position_bias`) are listed in `modules_to_save`. The codebook is a buffer, see `freeze_codebooks`.
LORA_TARGET_MODULES = ("value_proj", "mix_proj", "out_proj", "fc1", "fc2")

# ---------------------------------------------------------------------------------------------------------------------
# Models and Trainer
# ---------------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------------
# Command line (scripts/train_clm.py)
# ---------------------------------------------------------------------------------------------------------------------


def parse_overrides(items) -> dict[str, Any]:
    """`["model.hidden_size=32", "learning_rate=1e-3"]` -> {"model.hidden_size": 32, "learning_rate": 0.001}; values
    are parsed as JSON when possible (numbers, true/false/null, lists), else kept as strings."""
    import json

    overrides = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Overrides must be key=value, got {item!r}.")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def _parse_overrides(text: str | None) -> dict:
    """`"dropout=0.1,chunk_size=64"` (the --config_overrides option) -> {"dropout": 0.1, "chunk_size": 64}."""
    return parse_overrides(filter(None, (part.strip() for part in (text or "").split(","))))


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        description="Train a byte-level LongVQ causal LM on the embedded corpus with the transformers Trainer. Runs "
        "unchanged as `python scripts/train_clm.py`, `accelerate launch --multi_gpu --num_processes N "
        "scripts/train_clm.py` (DDP; on a machine without GPUs it runs N CPU processes over gloo) or `torchrun "
        "--nproc_per_node N scripts/train_clm.py`. (`accelerate launch --cpu --num_processes N` starts a single "
        "process unless MPI is configured.)",
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model_name_or_path", default=None, help="local LongVQForCausalLM folder to start from")
    parser.add_argument("--config_overrides", default=None, help="e.g. 'hidden_size=128,chunk_size=64,dropout=0.1'")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=None)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--lr_scheduler_type", default="cosine")
    parser.add_argument("--warmup_steps", type=int, default=0)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--optim", default="adamw_torch")
    parser.add_argument("--activation_checkpointing", action="store_true")
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--eval_steps", type=int, default=None)
    parser.add_argument("--save_steps", type=int, default=None)
    parser.add_argument("--save_total_limit", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", default=None, help="checkpoint folder, or 'latest'")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--use_cpu", action="store_true", help="train on CPU even when a GPU is available")
    parser.add_argument("--no_save_model", action="store_true", help="do not write the final model")
    parser.add_argument("--results_file", default="results.json", help="written into --output_dir by process 0")
    parser.add_argument(
        "--rank_codebooks", action="store_true",
        help="every process writes its codebook fingerprint to <output_dir>/codebooks/rank<k>.json",
    )  # fmt: skip
    return parser


def main(argv=None):
    """Entry point of `scripts/train_clm.py`: train, evaluate, save, and write a results JSON (process 0)."""
    import json
    import os
    import warnings

    args = build_parser().parse_args(argv)
    # train_causal_lm turns DDP's buffer broadcast off on purpose (see there); torch now flags the argument's name.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    model = None
    if args.model_name_or_path:
        if not os.path.isdir(args.model_name_or_path):
            raise FileNotFoundError(f"--model_name_or_path {args.model_name_or_path!r} is not a checkpoint folder")
        model = LongVQForCausalLM.from_pretrained(args.model_name_or_path, **_parse_overrides(args.config_overrides))
    resume = True if args.resume_from_checkpoint == "latest" else args.resume_from_checkpoint
    run = train_causal_lm(
        args.output_dir,
        model=model,
        config=None if model is not None else _parse_overrides(args.config_overrides),
        block_size=args.block_size,
        seed=args.seed,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        optim=args.optim,
        activation_checkpointing=args.activation_checkpointing,
        logging_steps=args.logging_steps,
        eval_steps=args.eval_steps,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        resume_from_checkpoint=resume,
        save_final_model=not args.no_save_model,
        bf16=args.bf16,
        **({"use_cpu": True} if args.use_cpu else {}),
    )
    trainer, training_args = run.trainer, run.trainer.args
    codebooks = codebook_summary(trainer.model)
    if args.rank_codebooks:
        folder = os.path.join(args.output_dir, "codebooks")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank{training_args.process_index}.json"), "w", encoding="utf-8") as f:
            json.dump({"rank": training_args.process_index, **codebooks}, f, indent=2)
    if trainer.is_world_process_zero():
        losses = run.losses
        results = {
            "world_size": training_args.world_size,
            "global_batch_size": training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps
            * training_args.world_size,
            "steps": trainer.state.global_step,
            "train_loss": run.train_metrics.get("train_loss"),
            "final_train_loss": losses[-1] if losses else None,
            "losses": losses,
            "eval_loss": run.eval_metrics.get("eval_loss"),
            "eval_bpb": run.eval_metrics.get("eval_bpb"),
            "eval_perplexity": run.eval_metrics.get("eval_perplexity"),
            "codebooks": codebooks,
            "args": vars(args),
        }
        with open(os.path.join(args.output_dir, args.results_file), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        shown = {
            k: "n/a" if results[k] is None else f"{results[k]:.4f}"
            for k in ("final_train_loss", "eval_loss", "eval_bpb")
        }
        print(
            f"steps {results['steps']} | final train loss {shown['final_train_loss']} | eval loss "
            f"{shown['eval_loss']} | eval {shown['eval_bpb']} bits/byte | {args.output_dir}"
        )
    run.trainer.accelerator.wait_for_everyone()
    return run


__all__ = [
    "LORA_TARGET_MODULES",
    "CodebookHealthCallback",
    "TrainingRun",
    "byte_classification_datasets",
    "byte_lm_config",
    "byte_lm_datasets",
    "classification_trainer",
    "codebook_summary",
    "codebooks_frozen",
    "compute_classification_metrics",
    "compute_lm_metrics",
    "freeze_codebooks",
    "load_corpus_bytes",
    "main",
    "preprocess_logits_for_metrics",
    "split_corpus",
    "train_causal_lm",
    "unfreeze_codebooks",
]
