"""Task data for LongVQ experiments: the Long Range Arena tasks and stand-ins for the data sets that cannot be had
offline, byte-level language modelling, associative recall and raw speech, each as a `datasets.DatasetDict` with
"train", "validation" and "test" splits, built deterministically from a seed and cached on disk.

    from longvq.tasks import TASKS, TaskCollator, build_task
    data = build_task("listops", seed=0)                 # cached under ~/.cache/longvq/tasks/listops-<hash>/
    collator = TaskCollator(TASKS["listops"])            # a Trainer data_collator

Registry (`TASKS`; builder modules in brackets):

    listops         LRA ListOps, 10 classes, tokens (vocab 16)                              [listops]
    pathfinder      LRA Pathfinder 32 x 32 pixels as tokens (1,024)                         [pathfinder]
    pathx           LRA Path-X 128 x 128 pixels as tokens (16,384)                          [pathfinder]
    fashion_mnist   sequential Fashion-MNIST, pixels as tokens (784)                       [images]
    fashion_mnist_values   the same with pixels as float values, input_dim 1               [images]
    text            LRA Text stand-in: 4 KB byte windows, label = source corpus            [text]
    retrieval       LRA Retrieval stand-in: linked / unlinked Python-docs page pairs        [text]
    text_lm         byte-level LM (enwik8 stand-in), 90/5/5 contiguous split                [text]
    mqar            multi-query associative recall (Zoology)                                [recall]
    speech          espeak-ng keywords, raw 16 kHz audio values (16,000)                    [speech]

Columns: token inputs are `input_ids` (lists of ints, variable length allowed); continuous inputs are `values`
(lists of floats, one per step, input_dim 1); classification has `label` (a `ClassLabel`: its `.names` and
`num_classes` are authoritative when builder arguments change the number of classes); LM and token-label tasks have
per-position `labels`; every example has `length`. The cache convention is described in `longvq.tasks.common`
(`cache_dir=None`: `$LONGVQ_TASKS_CACHE` or `~/.cache/longvq/tasks`; a path; or False for no cache).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..metrics import IGNORE_INDEX
from .common import CACHE_ENV, TaskSourceMissing, default_cache_root
from .images import fashion_mnist
from .listops import listops
from .pathfinder import pathfinder
from .recall import mqar
from .speech import speech_keywords
from .text import retrieval, text_classification, text_lm


@dataclass(frozen=True)
class TaskInfo:
    """What the training CLI needs to know about a task to build a model and batches for it.

    kind: "classification" (one `label` per sequence), "lm" (`input_ids` and `labels` = the same ids; the causal LM
    shifts them itself) or "token_labels" (MQAR: `input_ids` and per-position `labels`, -100 = not scored, NOT
    shifted: the label at position t is the target for the output at t).
    vocab_size: number of input token ids including padding (None for continuous inputs).
    input_dim: features per step of continuous inputs (`values`), None for token inputs.
    max_length: the longest sequence the default builder arguments produce.
    """

    name: str
    family: str
    kind: str
    builder: Callable[..., Any]
    vocab_size: int | None
    input_dim: int | None
    num_labels: int | None
    max_length: int
    pad_token_id: int = 0
    description: str = ""


TASKS: dict[str, TaskInfo] = {
    info.name: info
    for info in (
        TaskInfo(
            "listops",
            "lra",
            "classification",
            listops,
            vocab_size=16,
            input_dim=None,
            num_labels=10,
            max_length=500,
            pad_token_id=0,
            description="LRA ListOps (MIN/MAX/MED/SM trees), lengths 50-500 by default (LRA: 500-2000 via "
            "longvq.tasks.listops.LRA_LISTOPS)",
        ),
        TaskInfo(
            "pathfinder",
            "lra",
            "classification",
            functools.partial(pathfinder, resolution=32),
            vocab_size=256,
            input_dim=None,
            num_labels=2,
            max_length=1024,
            pad_token_id=0,
            description="LRA Pathfinder, 32x32 pixels as tokens; all sequences have the same length",
        ),
        TaskInfo(
            "pathx",
            "lra",
            "classification",
            functools.partial(pathfinder, resolution=128),
            vocab_size=256,
            input_dim=None,
            num_labels=2,
            max_length=16384,
            pad_token_id=0,
            description="LRA Path-X, 128x128 pixels as tokens; all sequences have the same length",
        ),
        TaskInfo(
            "fashion_mnist",
            "image",
            "classification",
            fashion_mnist,
            vocab_size=256,
            input_dim=None,
            num_labels=10,
            max_length=784,
            pad_token_id=0,
            description="sequential Fashion-MNIST, pixels as tokens (apt-get install dataset-fashion-mnist)",
        ),
        TaskInfo(
            "fashion_mnist_values",
            "image",
            "classification",
            functools.partial(fashion_mnist, pixels="values"),
            vocab_size=None,
            input_dim=1,
            num_labels=10,
            max_length=784,
            pad_token_id=0,
            description="sequential Fashion-MNIST, pixels as values in [0, 1]",
        ),
        TaskInfo(
            "text",
            "lra",
            "classification",
            text_classification,
            vocab_size=257,
            input_dim=None,
            num_labels=4,
            max_length=4096,
            pad_token_id=256,
            description="LRA Text stand-in: 4 KB byte windows, label = source (gcide, python_docs, shakespeare, kjv)",
        ),
        TaskInfo(
            "retrieval",
            "lra",
            "classification",
            retrieval,
            vocab_size=258,
            input_dim=None,
            num_labels=2,
            max_length=2 * 4096 + 1,
            pad_token_id=257,
            description="LRA Retrieval stand-in: Python-docs page pairs, doc1 + [256] + doc2, label = linked",
        ),
        TaskInfo(
            "text_lm",
            "lm",
            "lm",
            text_lm,
            vocab_size=256,
            input_dim=None,
            num_labels=None,
            max_length=512,
            pad_token_id=0,
            description="byte-level LM on real English text (source='embedded' for the built-in corpus)",
        ),
        TaskInfo(
            "mqar",
            "recall",
            "token_labels",
            mqar,
            vocab_size=8192,
            input_dim=None,
            num_labels=None,
            max_length=256,
            pad_token_id=0,
            description="multi-query associative recall (Zoology), labels only at query positions",
        ),
        TaskInfo(
            "speech",
            "speech",
            "classification",
            speech_keywords,
            vocab_size=None,
            input_dim=1,
            num_labels=10,
            max_length=16000,
            pad_token_id=0,
            description="espeak-ng keywords (SC10 words), raw 16 kHz audio, 1 s clips",
        ),
    )
}


def build_task(name: str, seed: int = 0, cache_dir=None, **builder_kwargs):
    """Build (or load from the cache) task `name` of `TASKS` as a `DatasetDict` with "train", "validation" and
    "test"; `builder_kwargs` go to its builder (sizes, lengths, sources, ...). Raises ValueError on an unknown name,
    `TaskSourceMissing` when the task's data source is not installed (the message says what to install)."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; valid names: {', '.join(sorted(TASKS))}.")
    return TASKS[name].builder(seed=seed, cache_dir=cache_dir, **builder_kwargs)


def _round_up(length: int, multiple: int | None) -> int:
    return length if not multiple else -(-length // multiple) * multiple


class TaskCollator:
    """A `Trainer` data collator for any task in `TASKS`: list of examples -> dict of tensors, right-padded to the
    longest example (rounded up to `pad_to_multiple_of`).

    - `input_ids` -> `input_ids` (B, T) LongTensor padded with `info.pad_token_id`, plus `attention_mask` (B, T)
      with 1 on real positions and 0 on padding. The mask comes from the example lengths, never from the ids (pixel
      or byte 0 is a real token).
    - `values` -> `inputs_embeds` (B, T, input_dim) float32, zero-padded, plus `attention_mask`.
    - `labels` (kinds "lm" / "token_labels") -> `labels` (B, T) LongTensor padded with -100.
    - `label` (kind "classification") -> `labels` (B,) LongTensor.

    Other columns (`length`, ...) are dropped. With `Trainer`, set `remove_unused_columns=False` for tasks with
    `values`: Trainer otherwise drops every column the model's forward does not name (`values` included) before the
    collator sees the batch.
    """

    def __init__(self, info: TaskInfo, pad_to_multiple_of: int | None = None):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"`pad_to_multiple_of` must be >= 1, got {pad_to_multiple_of}.")
        self.info = info
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Cannot collate an empty batch.")
        first = features[0]
        if "input_ids" in first:
            key, inputs = "input_ids", [np.asarray(f["input_ids"], dtype=np.int64) for f in features]
        elif "values" in first:
            key, inputs = "values", [np.asarray(f["values"], dtype=np.float32) for f in features]
            inputs = [x.reshape(len(x), -1) if x.ndim == 1 else x for x in inputs]
        else:
            raise KeyError("Each example needs `input_ids` or `values`.")
        lengths = [len(x) for x in inputs]
        batch_size, length = len(features), _round_up(max(lengths), self.pad_to_multiple_of)
        mask = torch.zeros(batch_size, length, dtype=torch.long)
        if key == "input_ids":
            padded = torch.full((batch_size, length), self.info.pad_token_id, dtype=torch.long)
        else:
            padded = torch.zeros(batch_size, length, inputs[0].shape[1], dtype=torch.float32)
        for row, (x, n) in enumerate(zip(inputs, lengths)):
            padded[row, :n] = torch.from_numpy(x)
            mask[row, :n] = 1
        batch = {"input_ids" if key == "input_ids" else "inputs_embeds": padded, "attention_mask": mask}
        if "labels" in first:
            labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
            for row, f in enumerate(features):
                values = torch.as_tensor(np.asarray(f["labels"], dtype=np.int64))
                labels[row, : len(values)] = values
            batch["labels"] = labels
        elif "label" in first:
            batch["labels"] = torch.tensor([int(f["label"]) for f in features], dtype=torch.long)
        return batch


collate = TaskCollator

__all__ = [
    "CACHE_ENV",
    "TASKS",
    "TaskCollator",
    "TaskInfo",
    "TaskSourceMissing",
    "build_task",
    "collate",
    "default_cache_root",
    "fashion_mnist",
    "listops",
    "mqar",
    "pathfinder",
    "retrieval",
    "speech_keywords",
    "text_classification",
    "text_lm",
]
