"""The data of an experiment, from the task registry `longvq.tasks`: the task's `TaskInfo`, its splits for a
preset (`build_datasets`, with the `downsample` data option), the collator (`make_collator`; `TokenLabelShift` for
per-position labels) and the chance level of a classification split.

MQAR (`kind="token_labels"`: `labels[t]` is the target of the output at position t) is trained with the causal-LM
heads rather than a separate token-classification head, so the models stay ordinary generate()-capable language
models and are evaluated as such. The causal-LM loss scores `logits[t]` against `labels[t + 1]`; `TokenLabelShift`
therefore moves every label one position to the right (`labels'[t + 1] = labels[t]`, `labels'[0] = -100`) and appends
one padding position (attention mask 0) so the last label is kept. The output at position t is then trained (and
scored) exactly against `labels[t]`.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Mapping

import numpy as np
import torch

from .. import tasks
from ..metrics import IGNORE_INDEX


def task_info(task: str):
    """The `TaskInfo` of `task` in `longvq.tasks.TASKS`; ValueError listing the known tasks otherwise."""
    if task not in tasks.TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(sorted(tasks.TASKS))}.")
    return tasks.TASKS[task]


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
        column = torch.full_like(labels[:, :1], IGNORE_INDEX)
        batch["labels"] = torch.cat([column, labels], dim=1)
        batch["input_ids"] = torch.cat([input_ids, torch.full_like(input_ids[:, :1], self.pad_token_id)], dim=1)
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        batch["attention_mask"] = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
        return batch


def make_collator(info):
    """The task's `TaskCollator`, shifted for `token_labels` tasks."""
    collator = tasks.TaskCollator(info)
    if info.kind == "token_labels":
        collator = TokenLabelShift(collator, info.pad_token_id)
    return collator


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


def build_datasets(info, preset: Mapping, seed: int = 0, cache_dir=None):
    """The task's splits for `preset`'s data section. Builder arguments the builder does not take are dropped with a
    warning (the registry's builders differ in what they accept); returns (datasets, used data arguments)."""
    builder_parameters = inspect.signature(info.builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in builder_parameters.values())
    data = dict(preset["data"])
    downsample = data.pop("downsample", None)
    unknown = [key for key in data if not takes_any and key not in builder_parameters]
    if unknown:
        warnings.warn(f"Task {info.name!r}: builder ignores preset data arguments {unknown}.", stacklevel=2)
        data = {k: v for k, v in data.items() if k not in unknown}
    datasets = tasks.build_task(info.name, seed=seed, cache_dir=cache_dir, **data)
    if downsample and downsample > 1:
        datasets = downsample_values(datasets, downsample)
        data["downsample"] = downsample
    return datasets, data


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


def majority_rate(split) -> float:
    """Accuracy of always predicting the most frequent class of `split` (its `label` column): the chance level."""
    counts = np.bincount(np.asarray(split["label"], dtype=np.int64))
    return float(counts.max() / max(counts.sum(), 1))


__all__ = [
    "TokenLabelShift", "build_datasets", "downsample_values", "majority_rate", "make_collator", "resolve_info",
    "task_info",
]  # fmt: skip
