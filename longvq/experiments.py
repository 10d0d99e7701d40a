"""Experiments over the task suite (`longvq.tasks`): presets, model builders for LongVQ and its baselines, and
`run_experiment`, one `transformers.Trainer` run that writes `results.json`, `curve.png` and the final model.

`scripts/train.py` (`longvq-train`), `scripts/eval_checkpoint.py` (`longvq-eval`) and `scripts/compare.py`
(`longvq-compare`) are thin wrappers over the functions here.

    from longvq.experiments import run_experiment
    results = run_experiment("listops", "longvq", "quick", "runs/listops-longvq", time_budget_s=60)
    print(results["metrics"]["test"]["accuracy"])

Architectures (`ARCHITECTURES`):

- `longvq`: LongVQ; bidirectional `LongVQForSequenceClassification` for classification tasks, causal
  `LongVQForCausalLM` for language modelling and MQAR.
- `llama`: a Hugging Face Llama (`LlamaForSequenceClassification` / `LlamaForCausalLM`, SDPA attention) with the same
  number of layers, its width and FFN size chosen so that its parameter count matches LongVQ's (`llama_config`).
  For continuous inputs (pixel or audio values passed as `inputs_embeds` of shape (B, T, input_dim)) it gets the same
  linear input encoder as LongVQ (`input_projection`, see `LlamaForSequenceClassificationWithInputEncoder`), so both
  models read the same numbers. Llama pools the last real token for classification (its own convention, it is
  causal); LongVQ mean-pools like MEGA.
- `mega_chunk`: LongVQ with `codebook_memory=False`: attention sees the current and neighbouring chunk only (the
  MEGA-chunk ablation); the EMA still carries information across chunks. Same parameters as `longvq`.

MQAR (`kind="token_labels"`: `labels[t]` is the target of the output at position t) is trained with the causal-LM
heads rather than a separate token-classification head, so the models stay ordinary generate()-capable language
models and are evaluated as such. The causal-LM loss scores `logits[t]` against `labels[t + 1]`; `TokenLabelShift`
therefore moves every label one position to the right (`labels'[t + 1] = labels[t]`, `labels'[0] = -100`) and appends
one padding position (attention mask 0) so the last label is kept. The output at position t is then trained (and
scored) exactly against `labels[t]`.

Budgets: with `time_budget_s`, training stops once the summed duration of the optimizer steps (evaluation and
logging excluded) reaches the budget, and the learning rate follows a warmup + cosine schedule over *that wall-clock
budget* (`BudgetClock`), so every architecture finishes its decay at the budget however fast its steps are: runs at
equal budget are comparisons at equal training time.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from .configuration_longvq import LongVQConfig
from .metrics import load as load_metric
from .modeling_longvq import LongVQForCausalLM, LongVQForSequenceClassification
from .training import (
    codebook_summary,
    compute_classification_metrics,
    compute_lm_metrics,
    parse_overrides,
    preprocess_logits_for_metrics,
    trainer_defaults,
)

ARCHITECTURES = ("longvq", "llama", "mega_chunk")
ARCHITECTURE_LABELS = {"longvq": "LongVQ", "llama": "Llama", "mega_chunk": "MEGA-chunk"}
PRESET_NAMES = ("quick", "full")
RESULTS_FILE = "results.json"
EXPERIMENT_FILE = "experiment.json"  # next to the saved model: what longvq-eval needs to rebuild the test split
CURVE_FILE = "curve.png"

# The metric each task kind is judged by, and whether higher is better.
PRIMARY_METRIC = {
    "classification": ("accuracy", True),
    "token_labels": ("accuracy", True),
    "lm": ("bpb", False),
}

# ---------------------------------------------------------------------------------------------------------------------
# Task registry access
# ---------------------------------------------------------------------------------------------------------------------


def task_registry():
    """The `longvq.tasks` module (`TASKS`, `build_task`, `TaskCollator`); a function so tests can substitute one."""
    from . import tasks

    return tasks


def task_info(task: str):
    """The `TaskInfo` of `task`; ValueError listing the known tasks otherwise."""
    tasks = task_registry().TASKS
    if task not in tasks:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(sorted(tasks))}.")
    return tasks[task]


# ---------------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------------

# A preset has three sections: `model` (LongVQConfig fields; the baselines are derived from it), `data` (keyword
# arguments of the task's builder) and `train` (optimisation and budget). `quick` presets are CPU sized: a couple of
# minutes at most, short sequences, small data; `full` presets are MEGA's published recipes (Ma et al. 2023,
# README.lra / README.sc / enwik8; see docs in shared/design) with LongVQ's codebook added, for a GPU.

_TRAIN_DEFAULTS = {
    "learning_rate": 2e-3, "batch_size": 32, "eval_batch_size": 64, "max_steps": 100_000, "warmup_steps": 20,
    "weight_decay": 0.01, "max_grad_norm": 1.0, "adam_beta2": 0.98, "time_budget_s": None, "num_evaluations": 5,
    "logging_steps": 10, "min_learning_rate_ratio": 0.1,
}  # fmt: skip

QUICK_TIME_BUDGET_S = 60.0  # default training time of a quick preset (seconds of optimizer steps)

# Every quick preset starts from this CPU-sized LongVQ (about 0.1M parameters).
_QUICK_MODEL = {
    "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "shared_representation_size": 32,
    "ema_projection_size": 16, "codebook_size": 32, "chunk_size": 32, "normalization_type": "layernorm",
    "normalize_before": True,
    "codebook_restart_threshold": 0.5,  # re-seed dead codes (as longvq-demo does): a tiny codebook collapses otherwise
    # Causal even for classification (the full presets are bidirectional, as MEGA's): on a CPU budget the
    # bidirectional variant takes ~2x longer per step (two EMA directions, a 3-block window), and on quick ListOps it
    # stayed at chance after 150 steps where the causal one reached 32% (Llama: 33%); on quick Text both reach 99%.
    "bidirectional": False,
}  # fmt: skip


def _quick(model: dict, data: dict, train: dict) -> dict:
    """A quick (CPU) preset: `_QUICK_MODEL` with `model` changes, builder arguments `data`, training `train`."""
    train = {**_TRAIN_DEFAULTS, "time_budget_s": QUICK_TIME_BUDGET_S, **train}
    return {"model": {**_QUICK_MODEL, **model}, "data": dict(data), "train": train}


def _full(layers, d, h, z, norm, lr, batch, wd, dropout, steps, warmup, chunk, truncation=None, data=None, **extra):
    """A full (GPU) preset from a MEGA recipe: layers, D, H, Z, normalisation (BatchNorm recipes are pre-norm, the
    others post-norm), learning rate, batch, weight decay, dropout, steps, warmup, chunk C, EMA truncation; plus a
    128-code codebook (LongVQ's S is not published; 128 is a choice)."""
    model = {
        "hidden_size": d, "num_hidden_layers": layers, "intermediate_size": h, "shared_representation_size": z,
        "ema_projection_size": 16, "codebook_size": 128, "chunk_size": chunk, "normalization_type": norm,
        "normalize_before": norm == "batchnorm", "dropout": dropout, "hidden_dropout": dropout,
        "attention_dropout": dropout, "truncation": truncation, **extra,
    }  # fmt: skip
    train = {
        "learning_rate": lr, "batch_size": batch, "eval_batch_size": batch, "weight_decay": wd, "max_steps": steps,
        "warmup_steps": warmup, "num_evaluations": 20, "logging_steps": 100,
    }  # fmt: skip
    return {"model": model, "data": dict(data or {}), "train": {**_TRAIN_DEFAULTS, **train}}


_SMALL_SPLITS = {"num_train": 4000, "num_validation": 200, "num_test": 500}
_LONG_SPLITS = {"num_train": 4000, "num_validation": 100, "num_test": 300}  # 500-1,000 tokens: evaluation costs

PRESETS: dict[str, dict[str, dict]] = {
    "listops": {
        "quick": _quick({}, {**_SMALL_SPLITS, "min_length": 40, "max_length": 160}, {"learning_rate": 3e-3}),
        "full": _full(6, 80, 160, 64, "layernorm", 1e-3, 64, 0.01, 0.1, 90_000, 3_000, 128, 1024,
                      data={"num_train": 96_000, "num_validation": 2_000, "num_test": 2_000, "min_length": 500,
                            "max_length": 2_000}),
    },
    "text": {
        "quick": _quick({}, {**_LONG_SPLITS, "window": 512}, {"learning_rate": 3e-3}),
        "full": _full(4, 128, 256, 64, "scalenorm", 4e-3, 50, 0.01, 0.1, 25_000, 10_000, 256, 1024),
    },
    "retrieval": {
        "quick": _quick({}, {**_LONG_SPLITS, "max_doc_bytes": 256}, {"learning_rate": 3e-3}),
        "full": _full(6, 128, 256, 64, "scalenorm", 3e-3, 64, 0.04, 0.1, 91_960, 10_000, 256, 1024),
    },
    "fashion_mnist": {
        "quick": _quick({"chunk_size": 28}, _LONG_SPLITS, {"learning_rate": 3e-3, "batch_size": 16}),
        # MEGA's LRA Image recipe (CIFAR-10 there).
        "full": _full(8, 160, 320, 96, "batchnorm", 1e-2, 50, 0.02, 0.0, 180_000, 9_000, 196),
    },
    "pathfinder": {
        "quick": _quick({}, _LONG_SPLITS, {"learning_rate": 3e-3, "batch_size": 16}),
        "full": _full(6, 128, 256, 64, "batchnorm", 1e-2, 128, 0.01, 0.0, 250_000, 50_000, 128),
    },
    "pathx": {
        # 16,384 tokens per image: on a CPU this preset only checks that Path-X runs (it is not in the comparison).
        "quick": _quick({"chunk_size": 128}, {"num_train": 200, "num_validation": 50, "num_test": 50},
                        {"batch_size": 4}),
        "full": _full(4, 64, 128, 32, "batchnorm", 1e-2, 128, 0.01, 0.0, 125_000, 10_000, 512, 4096,
                      data={"resolution": 128}),
    },
    "speech": {
        # 1 s clips average-pooled 8x (16 kHz -> 2 kHz, 2,000 steps) so a CPU gets through enough of them.
        "quick": _quick({"chunk_size": 64}, {"downsample": 8}, {"batch_size": 16}),
        # MEGA SC-raw base (6 layers, D=60, BatchNorm pre-norm, chunk and truncation 1000).
        "full": _full(6, 60, 120, 30, "batchnorm", 1e-2, 20, 0.01, 0.0, 250_000, 10_000, 1000, 1000),
    },
    "text_lm": {
        "quick": _quick({}, {"block_size": 256}, {"learning_rate": 3e-3, "batch_size": 16}),
        # MEGA enwik8 (12 layers, D=512, chunk 2048; causal, pre-norm LayerNorm, no truncation for decoding).
        "full": _full(12, 512, 1024, 128, "layernorm", 5e-3, 8, 0.1, 0.1, 400_000, 24_000, 2048,
                      normalize_before=True, codebook_size=512),
    },
    "mqar": {
        # Zoology's smallest grid point (64 tokens, 4 pairs) with a 64-token vocabulary; chunks of 16 so most queries
        # sit further back than the window (the previous and current chunk) reaches.
        "quick": _quick({"chunk_size": 16},
                        {**_SMALL_SPLITS, "vocab_size": 64, "seq_len": 64, "num_kv_pairs": 4},
                        {"learning_rate": 3e-3}),
        # No MEGA recipe for MQAR: Zoology-like sizes (4 layers, D=128) on the builder's default data.
        "full": _full(4, 128, 256, 64, "layernorm", 1e-3, 64, 0.01, 0.0, 20_000, 1_000, 64, normalize_before=True),
    },
}  # fmt: skip
PRESETS["text_lm"]["full"]["train"]["max_grad_norm"] = 0.25  # MEGA's enwik8 clip
PRESETS["fashion_mnist_values"] = copy.deepcopy(PRESETS["fashion_mnist"])  # the same images as float values


def _section_of(key: str, preset: dict) -> str:
    """Which preset section a bare `--set` key belongs to: train keys, then LongVQConfig fields, else builder data."""
    if key in preset["train"] or key in _TRAIN_DEFAULTS:
        return "train"
    if key in preset["model"] or key in inspect.signature(LongVQConfig.__init__).parameters:
        return "model"
    return "data"


def get_preset(
    task: str,
    preset: str | Mapping = "quick",
    overrides: Mapping[str, Any] | None = None,
) -> dict:
    """A deep copy of preset `preset` of `task` (or `preset` itself when it is a dict) with `overrides` applied.

    Override keys are `section.key` (`model.hidden_size`, `data.num_train`, `train.learning_rate`) or a bare key,
    which goes to `train` if it is a training setting, to `model` if it is a `LongVQConfig` field, else to `data`."""
    if not isinstance(preset, Mapping):
        if task not in PRESETS:
            raise ValueError(f"No presets for task {task!r}; tasks with presets: {', '.join(sorted(PRESETS))}.")
        if preset not in PRESETS[task]:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}.")
        preset = PRESETS[task][preset]
    resolved = copy.deepcopy(dict(preset))
    for section in ("model", "data"):
        resolved.setdefault(section, {})
    resolved["train"] = {**_TRAIN_DEFAULTS, **resolved.get("train", {})}
    for key, value in (overrides or {}).items():
        section, dot, name = key.partition(".")
        if not dot:
            section, name = _section_of(key, resolved), key
        if section not in ("model", "data", "train"):
            raise ValueError(f"Override {key!r}: the section must be model, data or train.")
        resolved[section][name] = value
    return resolved


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once; codebook buffers are not parameters)."""
    return sum(p.numel() for p in model.parameters())


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}.")


def longvq_config(info, preset: Mapping, arch: str = "longvq") -> LongVQConfig:
    """The LongVQ config of `preset` for task `info`: bidirectional for classification, causal otherwise, codebook
    memory off for `mega_chunk`. The preset's model section may override any of these."""
    fields = {
        "vocab_size": info.vocab_size or 1,  # continuous inputs never touch the (one-row) embedding table
        "input_dim": info.input_dim,
        "pad_token_id": info.pad_token_id,
        "bidirectional": info.kind == "classification",
        "codebook_memory": arch != "mega_chunk",
    }
    if info.kind == "classification":
        fields["num_labels"] = info.num_labels
    fields.update(preset["model"])
    if arch == "mega_chunk":
        fields["codebook_memory"] = False
    return LongVQConfig(**fields)


class LlamaInputEncoderMixin:
    """Gives a Llama model LongVQ's linear input encoder for continuous inputs: `inputs_embeds` of shape
    (B, T, input_dim) (or (B, T) when input_dim is 1) go through `input_projection` (input_dim -> hidden_size) before
    the decoder, exactly as `LongVQModel` encodes them. `config.input_dim` must be set."""

    def _add_input_encoder(self, config):
        self.input_projection = nn.Linear(config.input_dim, config.hidden_size)

    def _encode(self, inputs_embeds):
        if inputs_embeds is not None:
            if inputs_embeds.dim() == 2:
                inputs_embeds = inputs_embeds.unsqueeze(-1)
            inputs_embeds = self.input_projection(inputs_embeds.to(self.input_projection.weight.dtype))
        return inputs_embeds


def _llama_classes():
    """Llama heads, imported lazily, plus the input-encoder subclasses (defined once)."""
    global _LLAMA_CLASSES
    if _LLAMA_CLASSES is None:
        from transformers import LlamaForCausalLM, LlamaForSequenceClassification

        class LlamaForSequenceClassificationWithInputEncoder(LlamaInputEncoderMixin, LlamaForSequenceClassification):
            """`LlamaForSequenceClassification` reading continuous inputs through a linear encoder."""

            def __init__(self, config):
                super().__init__(config)
                self._add_input_encoder(config)

            def forward(
                self,
                input_ids=None,
                attention_mask=None,
                inputs_embeds=None,
                labels=None,
                **kwargs,
            ):
                return super().forward(
                    input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=self._encode(inputs_embeds),
                    labels=labels, **kwargs,
                )  # fmt: skip

        _LLAMA_CLASSES = {
            "LlamaForCausalLM": LlamaForCausalLM,
            "LlamaForSequenceClassification": LlamaForSequenceClassification,
            "LlamaForSequenceClassificationWithInputEncoder": LlamaForSequenceClassificationWithInputEncoder,
        }
    return _LLAMA_CLASSES


_LLAMA_CLASSES = None


def _llama_class(info):
    classes = _llama_classes()
    if info.kind == "classification":
        key = "LlamaForSequenceClassificationWithInputEncoder" if info.input_dim else "LlamaForSequenceClassification"
    else:
        if info.input_dim:
            raise ValueError(f"Task {info.name!r}: continuous inputs are supported for classification only.")
        key = "LlamaForCausalLM"
    return classes[key]


def _llama_fields(info, hidden: int, intermediate: int, layers: int, preset: Mapping) -> dict:
    head_dim = 16 if hidden < 256 else 64
    return {
        "vocab_size": info.vocab_size or 1,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // head_dim,
        "num_key_value_heads": hidden // head_dim,
        "head_dim": head_dim,
        "max_position_embeddings": max(4096, 2 * int(getattr(info, "max_length", 0) or 0)),
        "attention_dropout": float(preset["model"].get("attention_dropout", 0.0) or 0.0),
        "tie_word_embeddings": True,
        "pad_token_id": info.pad_token_id,
        "num_labels": info.num_labels or 2,
        "input_dim": info.input_dim,
        "use_cache": False,
        "bos_token_id": None,  # no special tokens in these tasks (and none exist for continuous inputs)
        "eos_token_id": None,
    }


def llama_config(info, preset: Mapping, target_parameters: int):
    """A `LlamaConfig` with LongVQ's depth whose parameter count is as close as possible to `target_parameters`.

    The width is the multiple of 16 (heads of 16 dims; 64 from width 256) whose standard SwiGLU FFN (8/3 x width)
    lands nearest the target; the FFN width is then adjusted in steps of 8 to close the remaining gap."""
    from transformers import LlamaConfig

    layers = preset["model"].get("num_hidden_layers", 2)
    cls = _llama_class(info)

    def count(hidden, intermediate):
        with torch.device("meta"):
            return count_parameters(cls(LlamaConfig(**_llama_fields(info, hidden, intermediate, layers, preset))))

    def round8(x):
        return max(8, round(x / 8.0) * 8)

    best = None
    for hidden in range(16, 2049, 16):
        if hidden >= 256 and hidden % 64:
            continue
        n = count(hidden, round8(8 * hidden / 3))
        if best is None or abs(n - target_parameters) < abs(best[1] - target_parameters):
            best = (hidden, n)
        if n > 2 * target_parameters:
            break
    hidden = best[0]
    # Each FFN unit costs 3 x hidden x layers parameters: solve for the FFN width, then take the best neighbour.
    base = count(hidden, 8)
    ideal = round8(8 + (target_parameters - base) / (3 * hidden * layers))
    intermediate = min((max(8, ideal + delta) for delta in (-8, 0, 8)),
                       key=lambda m: abs(count(hidden, m) - target_parameters))  # fmt: skip
    config = LlamaConfig(**_llama_fields(info, hidden, intermediate, layers, preset))
    config._attn_implementation = "sdpa"
    return config


def build_model(arch: str, info, preset: str | Mapping = "quick") -> nn.Module:
    """A freshly initialised model of architecture `arch` (`longvq`, `llama`, `mega_chunk`) for task `info` (a
    `TaskInfo`) at preset `preset` (a name or a resolved preset dict). Seed with `transformers.set_seed` first."""
    _check_arch(arch)
    if isinstance(preset, str):
        preset = get_preset(info.name, preset)
    config = longvq_config(info, preset, arch)
    longvq_cls = LongVQForSequenceClassification if info.kind == "classification" else LongVQForCausalLM
    if arch != "llama":
        return longvq_cls(config)
    with torch.device("meta"):
        target = count_parameters(longvq_cls(config))
    llama_cfg = llama_config(info, preset, target)
    model = _llama_class(info)(llama_cfg)
    model.config._attn_implementation = "sdpa"
    return model


def load_model(checkpoint: str, arch: str, info) -> nn.Module:
    """Load a model saved by `run_experiment` (safetensors) for evaluation."""
    _check_arch(arch)
    if arch == "llama":
        return _llama_class(info).from_pretrained(checkpoint, attn_implementation="sdpa")
    cls = LongVQForSequenceClassification if info.kind == "classification" else LongVQForCausalLM
    return cls.from_pretrained(checkpoint)


# ---------------------------------------------------------------------------------------------------------------------
# Data collation and metrics
# ---------------------------------------------------------------------------------------------------------------------


class TokenLabelShift:
    """Wraps a `TaskCollator` for `token_labels` tasks so a causal-LM head learns "output t predicts labels[t]".

    Causal-LM losses score `logits[t]` against `labels[t + 1]`. The wrapper shifts the labels one step right
    (`labels'[:, t + 1] = labels[:, t]`, `labels'[:, 0] = -100`) and appends one padding position (token
    `pad_token_id`, attention mask 0) so the label of the last position is not lost; the causal model's outputs at
    positions < T never see that extra position."""

    def __init__(self, collator, pad_token_id: int = 0):
        self.collator, self.pad_token_id = collator, pad_token_id

    def __call__(self, features):
        batch = dict(self.collator(features))
        labels, input_ids = batch["labels"], batch["input_ids"]
        column = torch.full_like(labels[:, :1], -100)
        batch["labels"] = torch.cat([column, labels], dim=1)
        batch["input_ids"] = torch.cat([input_ids, torch.full_like(input_ids[:, :1], self.pad_token_id)], dim=1)
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        batch["attention_mask"] = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
        return batch


def preprocess_token_predictions(logits, labels):
    """For `token_labels` under `Trainer.evaluate`: reduce (B, T, V) logits to (B, T) predicted ids."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def compute_token_accuracy(eval_prediction) -> dict[str, float]:
    """Accuracy over the scored positions of a `TokenLabelShift`ed batch: the prediction at position t (the output
    of `logits[t]`) against `labels[t + 1]` (the original label of position t), -100 excluded; from the `accuracy`
    module of `longvq.metrics` (config "tokens"), NaN when nothing is scored."""
    predictions, labels = (
        eval_prediction.predictions,
        np.asarray(eval_prediction.label_ids),
    )
    if isinstance(predictions, tuple):
        predictions = predictions[0]
    predictions = np.asarray(predictions)[:, :-1]
    targets = labels[:, 1:]
    # Accuracy pools all scored positions, so they go in as one row (one Arrow row is cheapest for `evaluate`).
    accuracy = load_metric("accuracy", "tokens", keep_in_memory=True).compute(
        predictions=[predictions.ravel()], references=[targets.ravel()]
    )
    return {**accuracy, "scored_positions": int((targets != -100).sum())}


def _metric_functions(kind: str):
    if kind == "classification":
        return compute_classification_metrics, None
    if kind == "lm":
        return compute_lm_metrics, preprocess_logits_for_metrics
    if kind == "token_labels":
        return compute_token_accuracy, preprocess_token_predictions
    raise ValueError(f"Unknown task kind {kind!r}.")


def make_collator(info):
    """The task's `TaskCollator`, shifted for `token_labels` tasks."""
    collator = task_registry().TaskCollator(info)
    if info.kind == "token_labels":
        collator = TokenLabelShift(collator, info.pad_token_id)
    return collator


def build_datasets(info, preset: Mapping, seed: int = 0, cache_dir=None):
    """The task's splits for `preset`'s data section. Builder arguments the builder does not take are dropped with a
    warning (the registry's builders differ in what they accept); returns (datasets, used data arguments)."""
    builder_parameters = inspect.signature(info.builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in builder_parameters.values())
    data = dict(preset["data"])
    downsample = data.pop("downsample", None)
    unknown = [key for key in data if not takes_any and key not in builder_parameters]
    if unknown:
        import warnings

        warnings.warn(
            f"Task {info.name!r}: builder ignores preset data arguments {unknown}.",
            stacklevel=2,
        )
        data = {k: v for k, v in data.items() if k not in unknown}
    datasets = task_registry().build_task(info.name, seed=seed, cache_dir=cache_dir, **data)
    if downsample and downsample > 1:
        datasets = downsample_values(datasets, downsample)
        data["downsample"] = downsample
    return datasets, data


def downsample_values(datasets, factor: int):
    """Average-pool the `values` column of every split by `factor` (a trailing partial window is averaged too), e.g.
    16 kHz audio to 2 kHz with factor 8; `length` follows. The `downsample` entry of a preset's data section."""
    if "values" not in datasets["train"].column_names:
        raise ValueError("`downsample` applies to tasks with continuous `values` only.")

    def pool(example):
        values = np.asarray(example["values"], dtype=np.float32)
        padded = np.pad(values, (0, -len(values) % factor), mode="edge").reshape(-1, factor)
        out = {"values": padded.mean(axis=1).tolist()}
        if "length" in example:
            out["length"] = len(out["values"])
        return out

    return datasets.map(pool, desc=f"downsample x{factor}")


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def resolve_info(info, datasets, data_args: Mapping):
    """`info` updated for the builder arguments actually used: the vocabulary (MQAR's `vocab_size` argument) and the
    number of classes (the `label` column's `ClassLabel` is authoritative)."""
    changes = {}
    if info.vocab_size is not None and "vocab_size" in data_args:
        changes["vocab_size"] = int(data_args["vocab_size"])
    label = datasets["train"].features.get("label")
    if info.kind == "classification" and getattr(label, "num_classes", None):
        changes["num_labels"] = int(label.num_classes)
    return dataclasses.replace(info, **changes) if changes else info


def _health_callbacks(model) -> list:
    """`longvq.training.CodebookHealthCallback` (codebook usage / perplexity in every training log) for LongVQ
    models, when that version of `longvq.training` provides it."""
    from . import training

    callback = getattr(training, "CodebookHealthCallback", None)
    return [callback()] if callback is not None and hasattr(model.config, "codebook_size") else []


class BudgetClock(TrainerCallback):
    """Measures training time as the summed duration of optimizer steps (evaluation, logging and saving excluded),
    stops training at `budget_s` seconds, and requests `num_evaluations` evenly spaced evaluations (by time with a
    budget, by step otherwise) for the learning curve. `progress()` in [0, 1] drives the budget LR schedule."""

    def __init__(
        self,
        budget_s: float | None = None,
        max_steps: int | None = None,
        num_evaluations: int = 0,
    ):
        self.budget_s, self.max_steps, self.num_evaluations = (
            budget_s,
            max_steps,
            num_evaluations,
        )
        self.elapsed = 0.0
        self.steps = 0
        self._started = None
        self._next_evaluation = 1

    def progress(self) -> float:
        fractions = []
        if self.budget_s:
            fractions.append(self.elapsed / self.budget_s)
        if self.max_steps:
            fractions.append(self.steps / self.max_steps)
        return min(1.0, max(fractions, default=0.0))

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._started is not None:
            self.elapsed += time.perf_counter() - self._started
            self._started = None
        self.steps = state.global_step
        if self.budget_s is not None and self.elapsed >= self.budget_s:
            control.should_training_stop = True
        due = self.num_evaluations and self._next_evaluation < self.num_evaluations
        if due and self.progress() >= self._next_evaluation / self.num_evaluations:
            self._next_evaluation += 1
            control.should_evaluate = True
        return control


class ExperimentTrainer(Trainer):
    """`Trainer` with a warmup + cosine learning-rate schedule over the `BudgetClock`'s progress (wall-clock budget
    or steps), decaying to `min_learning_rate_ratio` of the peak, and a count of the real tokens trained on."""

    def __init__(self, *args, clock: BudgetClock, warmup_steps: int = 0, min_learning_rate_ratio: float = 0.1,
                 **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.clock, self.schedule_warmup, self.min_ratio = (
            clock,
            warmup_steps,
            min_learning_rate_ratio,
        )
        self.tokens_trained = 0

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            warmup, low, clock = self.schedule_warmup, self.min_ratio, self.clock

            def factor(step):
                ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
                return ramp * (low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * clock.progress())))

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        reference = inputs.get("input_ids", inputs.get("inputs_embeds"))
        self.tokens_trained += int(mask.sum()) if mask is not None else int(np.prod(reference.shape[:2]))
        return super().training_step(model, inputs, num_items_in_batch)


@torch.no_grad()
def codebook_usage(model: nn.Module, dataloader, max_batches: int = 8) -> dict[str, Any] | None:
    """Mean per-layer codebook usage (fraction of codes used by a batch's real tokens) and code perplexity over up
    to `max_batches` evaluation batches, plus the fingerprint of `codebook_summary`; None for non-LongVQ models."""
    if not hasattr(model.config, "codebook_size"):
        return None
    was_training = model.training
    model.eval()
    usage, perplexity = [], []
    device = next(model.parameters()).device
    for index, batch in enumerate(dataloader):
        if index >= max_batches:
            break
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        out = model(**inputs)
        usage.append(out.codebook_usage.float().cpu())
        perplexity.append(out.codebook_perplexity.float().cpu())
    model.train(was_training)
    if not usage:
        return None
    usage_layers, perplexity_layers = (
        torch.stack(usage).mean(0),
        torch.stack(perplexity).mean(0),
    )
    return {
        "codebook_size": model.config.codebook_size,
        "usage_per_layer": [round(float(u), 4) for u in usage_layers],
        "perplexity_per_layer": [round(float(p), 2) for p in perplexity_layers],
        "mean_usage": float(usage_layers.mean()),
        "sha256": codebook_summary(model)["sha256"],
    }


def _strip_prefix(metrics: Mapping, prefix: str) -> dict:
    """Trainer metrics without their `eval_`/`test_` prefix and without runtime bookkeeping."""
    skip = ("runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time")
    out = {}
    for key, value in metrics.items():
        name = key[len(prefix) + 1 :] if key.startswith(prefix + "_") else key
        if name not in skip:
            out[name] = value
    return out


def _training_arguments(
    output_dir: str, train: Mapping, seed: int, max_steps: int, progress: bool
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        seed=seed,
        max_steps=max_steps,
        per_device_train_batch_size=train["batch_size"],
        per_device_eval_batch_size=train["eval_batch_size"],
        learning_rate=train["learning_rate"],
        weight_decay=train["weight_decay"],
        max_grad_norm=train["max_grad_norm"],
        adam_beta2=train["adam_beta2"],
        logging_steps=train["logging_steps"],
        eval_strategy="no",  # evaluations come from BudgetClock, spaced over the budget
        save_strategy="no",
        disable_tqdm=not progress,
        remove_unused_columns=False,  # the collator reads `values`/`label` columns no forward() names
        **trainer_defaults(),
    )


def run_experiment(
    task: str,
    arch: str = "longvq",
    preset: str | Mapping = "quick",
    output_dir: str = "runs/experiment",
    seed: int = 0,
    time_budget_s: float | None = None,
    max_steps: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    cache_dir=None,
    progress: bool = False,
    save_model: bool = True,
    plot: bool = True,
) -> dict:
    """Train architecture `arch` on `task` with `preset` (+ `overrides`), evaluate on the test split, and write
    `results.json`, `curve.png` and (with `save_model`) the model (safetensors) plus `experiment.json` into
    `output_dir`. Returns the results dict.

    `time_budget_s` / `max_steps` override the preset's budget: training stops at whichever comes first (a time budget
    with no step limit runs until the budget). With neither set anywhere, ValueError.

    results: task, family, kind, arch, preset, seed, params, steps, train_time_s (summed optimizer-step time, what the
    budget measures), wall_time_s (the whole call, data building and evaluation included), tokens_per_s (real tokens
    trained per second of train_time_s), metric / higher_is_better (the task's primary metric), metrics
    (validation and test, Trainer's metrics without prefix), codebook (usage on the test split; LongVQ only),
    curve (logged training loss and evaluations by step), config (the model config), resolved preset, data arguments.
    """
    started = time.perf_counter()
    _check_arch(arch)
    info = task_info(task)
    resolved = get_preset(task, preset, overrides)
    train = resolved["train"]
    if time_budget_s is not None:
        train["time_budget_s"] = time_budget_s
    if max_steps is not None:
        train["max_steps"] = max_steps
    elif time_budget_s is not None and not isinstance(preset, Mapping):
        train["max_steps"] = _TRAIN_DEFAULTS["max_steps"]
    budget, step_limit = train["time_budget_s"], train["max_steps"]
    if not budget and not step_limit:
        raise ValueError("Give a time budget or a step limit.")
    os.makedirs(output_dir, exist_ok=True)

    datasets, data_args = build_datasets(info, resolved, seed=seed, cache_dir=cache_dir)
    info = resolve_info(info, datasets, data_args)
    set_seed(seed)
    model = build_model(arch, info, resolved)
    compute_metrics, preprocess = _metric_functions(info.kind)
    clock = BudgetClock(budget, step_limit, train["num_evaluations"])
    trainer = ExperimentTrainer(
        model=model,
        args=_training_arguments(
            output_dir,
            train,
            seed,
            step_limit or _TRAIN_DEFAULTS["max_steps"],
            progress,
        ),
        data_collator=make_collator(info),
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"],
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess,
        callbacks=[*_health_callbacks(model), clock],
        clock=clock,
        warmup_steps=train["warmup_steps"],
        min_learning_rate_ratio=train["min_learning_rate_ratio"],
    )
    if not progress:  # without progress bars Trainer prints every log dict; keep quiet runs quiet
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    trainer.train()
    validation = _strip_prefix(trainer.evaluate(), "eval")
    test = _strip_prefix(trainer.evaluate(datasets["test"], metric_key_prefix="test"), "test")
    codebook = codebook_usage(trainer.model, trainer.get_test_dataloader(datasets["test"]))
    metric, higher = PRIMARY_METRIC[info.kind]
    results = {
        "task": task,
        "family": info.family,
        "kind": info.kind,
        "arch": arch,
        "preset": preset if isinstance(preset, str) else "custom",
        "seed": seed,
        "params": count_parameters(trainer.model),
        "steps": trainer.state.global_step,
        "train_time_s": round(clock.elapsed, 2),
        "time_budget_s": budget,
        "tokens_per_s": round(trainer.tokens_trained / max(clock.elapsed, 1e-9), 1),
        "metric": metric,
        "higher_is_better": higher,
        "metrics": {"validation": validation, "test": test},
        "codebook": codebook,
        "curve": _curve(trainer.state.log_history),
        "config": trainer.model.config.to_diff_dict(),
        "model_class": type(trainer.model).__name__,
        "preset_settings": resolved,
        "data_args": data_args,
        "dataset_sizes": {split: len(ds) for split, ds in datasets.items()},
        "chance": majority_rate(datasets["test"]) if info.kind == "classification" else None,
    }
    if save_model:
        trainer.save_model(output_dir)
        experiment = {k: results[k] for k in ("task", "arch", "preset", "seed", "data_args", "model_class")}
        experiment["eval_batch_size"] = train["eval_batch_size"]
        _write_json(os.path.join(output_dir, EXPERIMENT_FILE), experiment)
    results["wall_time_s"] = round(time.perf_counter() - started, 2)
    _write_json(os.path.join(output_dir, RESULTS_FILE), results)
    if plot:
        plot_curve(results, os.path.join(output_dir, CURVE_FILE))
    return results


def majority_rate(split) -> float:
    """Accuracy of always predicting the most frequent class of `split` (its `label` column): the chance level."""
    counts = np.bincount(np.asarray(split["label"], dtype=np.int64))
    return float(counts.max() / max(counts.sum(), 1))


def _curve(log_history) -> dict:
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evaluations = [{"step": e["step"], **_strip_prefix(e, "eval")} for e in log_history if "eval_loss" in e]
    usage = [(e["step"], e["codebook_usage"]) for e in log_history if "codebook_usage" in e]
    return {"train_loss": train, "evaluations": evaluations, "codebook_usage": usage}


def _write_json(path: str, payload) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=str)


def plot_curve(results: Mapping, path: str) -> None:
    """Training loss and the validation metric against the step, side by side."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    label = f"{ARCHITECTURE_LABELS[results['arch']]} ({results['params'] / 1e3:.0f}k params)"
    curve, metric = results["curve"], results["metric"]
    if curve["train_loss"]:
        steps, losses = zip(*curve["train_loss"])
        left.plot(steps, losses, label=label)
    left.set(xlabel="step", ylabel="training loss", title=f"{results['task']}: training loss")
    points = [(e["step"], e[metric]) for e in curve["evaluations"] if metric in e]
    if points:
        steps, values = zip(*points)
        right.plot(steps, values, marker="o", label=label)
    right.set(
        xlabel="step",
        ylabel=f"validation {metric}",
        title=f"{results['task']}: validation {metric}",
    )
    for axis in (left, right):
        axis.grid(alpha=0.3)
        if axis.lines:  # a run shorter than one logging interval has no loss points
            axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation of a saved checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def evaluate_checkpoint(checkpoint: str, task: str | None = None, arch: str | None = None, split: str = "test",
                        seed: int | None = None, cache_dir=None, batch_size: int | None = None) -> dict:  # fmt: skip
    """Metrics of a model saved by `run_experiment` on a split of its task (rebuilt from `experiment.json`, so the
    same data arguments and seed give the same examples). `task`/`arch`/`seed` override what the file says."""
    path = os.path.join(checkpoint, EXPERIMENT_FILE)
    experiment = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            experiment = json.load(f)
    task = task or experiment.get("task")
    if task is None:
        raise ValueError(f"{checkpoint} has no {EXPERIMENT_FILE}; pass the task.")
    info = task_info(task)
    arch = arch or experiment.get("arch") or "longvq"
    seed = experiment.get("seed", 0) if seed is None else seed
    model = load_model(checkpoint, arch, info)
    data_args = dict(experiment.get("data_args", {}))
    downsample = data_args.pop("downsample", None)
    datasets = task_registry().build_task(task, seed=seed, cache_dir=cache_dir, **data_args)
    if downsample and downsample > 1:
        datasets = downsample_values(datasets, downsample)
    if split not in datasets:
        raise ValueError(f"Unknown split {split!r}; the task has {', '.join(datasets)}.")
    compute_metrics, preprocess = _metric_functions(info.kind)
    from transformers.trainer_callback import PrinterCallback

    with tempfile.TemporaryDirectory() as scratch:  # Trainer wants an output folder; evaluation writes nothing
        args = TrainingArguments(
            output_dir=scratch, per_device_eval_batch_size=batch_size or experiment.get("eval_batch_size", 64),
            disable_tqdm=True, remove_unused_columns=False, **trainer_defaults(),
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, data_collator=make_collator(info), compute_metrics=compute_metrics,
                          preprocess_logits_for_metrics=preprocess)  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # stdout carries the JSON only
        metrics = _strip_prefix(trainer.evaluate(datasets[split], metric_key_prefix=split), split)
    metric, _ = PRIMARY_METRIC[info.kind]
    return {"checkpoint": checkpoint, "task": task, "arch": arch, "split": split, "metric": metric,
            "metrics": metrics}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Comparison (scripts/compare.py)
# ---------------------------------------------------------------------------------------------------------------------

# Published test numbers for orientation (MEGA paper, Ma et al. 2023, Table 2 and its SC / enwik8 results; the
# Transformer row as re-run in MEGA's LRA table). Different data sizes, sequence lengths and models ~100x larger than
# the quick presets: they say where the full recipes land, not what a quick run should reach.
PUBLISHED = {
    "listops": ("LRA ListOps (2K tokens)", "63.14", "58.76", "37.11"),
    "text": ("LRA Text (4K bytes)", "90.43", "90.19", "65.21"),
    "retrieval": ("LRA Retrieval (2 x 4K bytes)", "91.25", "90.97", "79.14"),
    "fashion_mnist": ("LRA Image = sCIFAR-10 (other data)", "90.44", "85.80", "42.94"),
    "pathfinder": ("LRA Pathfinder (32 px)", "96.01", "94.41", "71.83"),
    "pathx": ("LRA Path-X (128 px)", "97.98", "93.81", "fails (50)"),
    "speech": ("Speech Commands raw 16 kHz", "96.92", "–", "–"),
    "text_lm": ("enwik8 bits/byte, 39M params", "1.02", "–", "–"),
    "mqar": ("–", "–", "–", "–"),
}
# Path-X is left out: 16K-token images do not train within a CPU budget (every model would sit at chance).
COMPARISON_TASKS = ("listops", "pathfinder", "mqar", "text", "retrieval", "fashion_mnist", "speech", "text_lm")


def format_metric(value: float | None, metric: str) -> str:
    """Accuracy as a percentage with one decimal, bits per byte with three."""
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if metric == "accuracy" else f"{value:.3f}"


def comparison_table(results: list[Mapping], budget_s: float | None = None, notes: Mapping[str, str] | None = None,
                     archs=ARCHITECTURES) -> str:  # fmt: skip
    """One markdown table from `run_experiment` results (any order; one per task and arch): per task the test metric
    of each architecture (the best in bold), their parameter counts and steps, and the published MEGA / MEGA-chunk /
    Transformer numbers for orientation. `notes` maps a task to a message shown instead of numbers (e.g. a task
    whose data is not installed)."""
    by_task: dict[str, dict[str, Mapping]] = {}
    for result in results:
        by_task.setdefault(result["task"], {})[result["arch"]] = result
    labels = [ARCHITECTURE_LABELS[a] for a in archs]
    header = ["Task", "Metric", "Chance", *labels, "Params (" + " / ".join(labels) + ")", "Steps (" + " / ".join(labels) + ")",
              "Paper: setting", "Paper MEGA", "Paper MEGA-chunk", "Paper Transformer"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    tasks = [t for t in COMPARISON_TASKS if t in by_task or t in (notes or {})]
    tasks += sorted(t for t in {*by_task, *(notes or {})} if t not in tasks)
    for task in tasks:
        published = PUBLISHED.get(task, ("–", "–", "–", "–"))
        runs = by_task.get(task, {})
        if not runs:
            cells = [task, "–", "–", (notes or {}).get(task, "not run"), *([""] * (len(archs) + 1))]
            lines.append("| " + " | ".join([*cells, *published]) + " |")
            continue
        any_run = next(iter(runs.values()))
        metric, higher = any_run["metric"], any_run["higher_is_better"]
        values = {a: runs[a]["metrics"]["test"].get(metric) if a in runs else None for a in archs}
        present = [v for v in values.values() if v is not None]
        best = (max(present) if higher else min(present)) if present else None
        shown = []
        for arch in archs:
            text = format_metric(values[arch], metric)
            # Bold the best only when it is better than some other run (three runs at chance: nothing in bold).
            is_best = values[arch] is not None and values[arch] == best and any(v != best for v in present)
            shown.append(f"**{text}**" if is_best else text)
        params = " / ".join(f"{runs[a]['params'] / 1e3:.1f}k" if a in runs else "–" for a in archs)
        steps = " / ".join(str(runs[a]["steps"]) if a in runs else "–" for a in archs)
        metric_name = "accuracy" if metric == "accuracy" else "bits/byte (lower is better)"
        chance = format_metric(any_run.get("chance"), metric)
        lines.append("| " + " | ".join([task, metric_name, chance, *shown, params, steps, *published]) + " |")
    intro = []
    if budget_s is not None:
        intro.append(f"Every model trained for the same {budget_s:g} s of optimizer steps (quick presets, CPU).")
    intro.append("Test-split metrics; paper columns are full-size models on the full benchmarks, for orientation only "
                 "(different data, lengths and scale).")  # fmt: skip
    return " ".join(intro) + "\n\n" + "\n".join(lines) + "\n"


def run_comparison(output_dir: str, tasks=COMPARISON_TASKS, archs=ARCHITECTURES, time_budget_s: float = 60.0,
                   seed: int = 0, progress: bool = False, cache_dir=None,
                   overrides=None) -> tuple[list[dict], str]:  # fmt: skip
    """Quick presets of every task in `tasks` for every arch in `archs`, each for the same `time_budget_s`, in
    `output_dir/<task>/<arch>/`; writes `comparison.md` (the table) and `comparison.json` (the results without
    curves) to `output_dir`. A task whose data source is not installed (`TaskSourceMissing`) is noted in the table
    and skipped. Returns (results, table)."""
    from .tasks.common import TaskSourceMissing

    os.makedirs(output_dir, exist_ok=True)
    results, notes = [], {}
    for task in tasks:
        for arch in archs:
            try:
                result = run_experiment(task, arch, "quick", os.path.join(output_dir, task, arch), seed=seed,
                                        time_budget_s=time_budget_s, progress=progress, cache_dir=cache_dir,
                                        overrides=overrides, save_model=False)  # fmt: skip
            except TaskSourceMissing as error:
                notes[task] = f"skipped: {error}".replace("|", "/").replace("\n", " ")
                break
            results.append(result)
            test = result["metrics"]["test"].get(result["metric"])
            print(f"{task:>14} {arch:>10}: test {result['metric']} {format_metric(test, result['metric'])} | "
                  f"{result['steps']} steps | {result['params']} params | {result['wall_time_s']:.0f} s wall",
                  flush=True)  # fmt: skip
    table = comparison_table(results, time_budget_s, notes, archs)
    if results:
        plot_comparison(results, os.path.join(output_dir, "comparison.png"))
    with open(os.path.join(output_dir, "comparison.md"), "w", encoding="utf-8") as f:
        f.write(table)
    _write_json(os.path.join(output_dir, "comparison.json"), [{k: v for k, v in r.items() if k != "curve"}
                                                              for r in results])  # fmt: skip
    return results, table


def plot_comparison(results: list[Mapping], path: str) -> None:
    """One panel per task: each architecture's validation metric against its training time. A budgeted run evaluates
    at equal fractions of its budget (`BudgetClock`) and once more at the end, so evaluation k of n sits at k/n of the
    training time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    columns = min(4, len(tasks))
    rows = -(-len(tasks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for axis, task in zip(axes.flat, tasks):
        for result in (r for r in results if r["task"] == task):
            metric = result["metric"]
            values = [e[metric] for e in result["curve"]["evaluations"] if metric in e]
            times = [result["train_time_s"] * (k + 1) / len(values) for k in range(len(values))]
            label = f"{ARCHITECTURE_LABELS[result['arch']]} ({result['params'] / 1e3:.0f}k)"
            axis.plot(times, [100 * v if metric == "accuracy" else v for v in values], marker="o", label=label)
            axis.set(title=task, xlabel="training time (s)",
                     ylabel="val. accuracy (%)" if metric == "accuracy" else "val. bits/byte")  # fmt: skip
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(tasks) :]:
        axis.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------------------------------


def _known_tasks() -> list[str]:
    try:
        return sorted(task_registry().TASKS)
    except ImportError:
        return sorted(PRESETS)


def build_train_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="longvq-train",
        description="Train LongVQ, a same-size Llama or the MEGA-chunk ablation on one task with the transformers "
        "Trainer; writes results.json, curve.png and the model (safetensors) to --output-dir.",
    )
    parser.add_argument("--task", required=True, choices=_known_tasks())
    parser.add_argument("--arch", default="longvq", choices=ARCHITECTURES)
    parser.add_argument("--preset", default="quick", choices=PRESET_NAMES)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="step limit (default: the preset's)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds of training (default: the preset's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="preset override, e.g. model.hidden_size=128, learning_rate=1e-3, data.num_train=500; "
                        "repeatable")  # fmt: skip
    parser.add_argument("--cache-dir", default=None, help="task data cache (default: $LONGVQ_TASKS_CACHE or ~/.cache)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-save-model", action="store_true")
    return parser


def train_main(argv=None) -> dict:
    """`longvq-train`: one run of `run_experiment`; prints a one-line summary and returns the results."""
    args = build_train_parser().parse_args(argv)
    results = run_experiment(
        args.task, args.arch, args.preset, args.output_dir, seed=args.seed, time_budget_s=args.time_budget,
        max_steps=args.max_steps, overrides=parse_overrides(args.set), cache_dir=args.cache_dir,
        progress=not args.no_progress, save_model=not args.no_save_model,
    )  # fmt: skip
    test = results["metrics"]["test"].get(results["metric"])
    usage = results["codebook"]["mean_usage"] if results["codebook"] else None
    print(
        f"{args.task} / {ARCHITECTURE_LABELS[args.arch]} ({results['params']:,} params): test {results['metric']} "
        f"{format_metric(test, results['metric'])} after {results['steps']} steps in {results['train_time_s']:.0f} s "
        f"({results['tokens_per_s']:.0f} tokens/s)"
        + (f", codebook usage {100 * usage:.0f}%" if usage is not None else "")
        + f" -> {args.output_dir}"
    )
    return results


def evaluate_main(argv=None) -> dict:
    """`longvq-eval CHECKPOINT`: metrics of a saved model on its task's test split, as JSON on stdout."""
    import argparse

    parser = argparse.ArgumentParser(prog="longvq-eval", description="Evaluate a checkpoint written by longvq-train.")
    parser.add_argument("checkpoint")
    parser.add_argument("--task", default=None, help="default: the task recorded in the checkpoint")
    parser.add_argument("--arch", default=None, choices=ARCHITECTURES, help="default: recorded in the checkpoint")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        parser.error(f"checkpoint folder {args.checkpoint!r} does not exist")
    metrics = evaluate_checkpoint(args.checkpoint, task=args.task, arch=args.arch, split=args.split,
                                  cache_dir=args.cache_dir, batch_size=args.batch_size)  # fmt: skip
    print(json.dumps(metrics, indent=2))
    return metrics


def compare_main(argv=None) -> str:
    """`longvq-compare`: the quick-preset comparison; prints the table and writes it to --output-dir."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="longvq-compare",
        description="LongVQ vs a same-size Llama vs the MEGA-chunk ablation on the quick presets at equal training "
        "time; writes comparison.md / comparison.json.",
    )
    parser.add_argument("--output-dir", default="runs/compare")
    parser.add_argument("--tasks", nargs="+", default=list(COMPARISON_TASKS))
    parser.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--time-budget", type=float, default=QUICK_TIME_BUDGET_S, help="seconds per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--progress", action="store_true", help="progress bars for every run")
    parser.add_argument("--rebuild-table", action="store_true",
                        help="only rewrite comparison.md from the comparison.json in --output-dir")  # fmt: skip
    args = parser.parse_args(argv)
    if args.rebuild_table:
        with open(os.path.join(args.output_dir, "comparison.json"), encoding="utf-8") as f:
            results = json.load(f)
        budgets = {r.get("time_budget_s") for r in results}
        archs = [arch for arch in ARCHITECTURES if any(r["arch"] == arch for r in results)]
        table = comparison_table(results, budgets.pop() if len(budgets) == 1 else None, archs=archs)
        with open(os.path.join(args.output_dir, "comparison.md"), "w", encoding="utf-8") as f:
            f.write(table)
        print(table)
        return table
    unknown = [t for t in args.tasks if t not in _known_tasks()]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(_known_tasks())}")
    _, table = run_comparison(args.output_dir, args.tasks, args.archs, args.time_budget, args.seed,
                              progress=args.progress, cache_dir=args.cache_dir)  # fmt: skip
    print(table)
    return table


__all__ = [
    "ARCHITECTURES",
    "COMPARISON_TASKS",
    "PRESETS",
    "PRESET_NAMES",
    "PUBLISHED",
    "BudgetClock",
    "ExperimentTrainer",
    "TokenLabelShift",
    "build_datasets",
    "build_model",
    "codebook_usage",
    "compare_main",
    "comparison_table",
    "compute_token_accuracy",
    "count_parameters",
    "evaluate_checkpoint",
    "evaluate_main",
    "format_metric",
    "get_preset",
    "llama_config",
    "load_model",
    "longvq_config",
    "make_collator",
    "parse_overrides",
    "plot_comparison",
    "plot_curve",
    "run_comparison",
    "run_experiment",
    "task_info",
    "train_main",
]
