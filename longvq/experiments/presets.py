"""The presets of the experiments: per task, `quick` (CPU sized: a couple of minutes at most, short sequences, small
data) and `full` (MEGA's published recipes for a GPU, Ma et al. 2023, README.lra / README.sc / enwik8, with LongVQ's
codebook added), and `get_preset`, which resolves one with overrides.

A preset has three sections: `model` (LongVQConfig fields; the baselines are derived from the LongVQ model),
`data` (keyword arguments of the task's builder) and `train` (optimisation and budget, `TRAIN_DEFAULTS` filled in).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any

from ..configuration_longvq import LongVQConfig

PRESET_NAMES = ("quick", "full")

TRAIN_DEFAULTS = {
    "learning_rate": 2e-3, "batch_size": 32, "eval_batch_size": 64, "max_steps": 100_000, "warmup_steps": 20,
    "weight_decay": 0.01, "max_grad_norm": 1.0, "adam_beta2": 0.98, "time_budget_s": None, "num_evaluations": 5,
    "logging_steps": 10, "min_learning_rate_ratio": 0.1,
}  # fmt: skip

QUICK_TIME_BUDGET_S = 60.0  # default training time of a quick preset (seconds of optimizer steps)

# Every quick preset starts from this CPU-sized LongVQ (about 0.1M parameters).
QUICK_MODEL = {
    "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "shared_representation_size": 32,
    "ema_projection_size": 16, "codebook_size": 32, "chunk_size": 32, "normalization_type": "layernorm",
    "normalize_before": True,
    # Causal even for classification (the full presets are bidirectional, as MEGA's): on a CPU budget the
    # bidirectional variant takes ~2x longer per step (two EMA directions, a 3-block window), and on quick ListOps it
    # stayed at chance after 150 steps where the causal one reached 32% (Llama: 33%); on quick Text both reach 99%.
    "bidirectional": False,
}  # fmt: skip

# What every full preset adds to its MEGA recipe: a 128-code codebook (LongVQ's S is not published; 128 is a choice),
# MEGA's EMA dimension, 20 evaluations, a log every 100 steps.
FULL_MODEL = {"ema_projection_size": 16, "codebook_size": 128, "truncation": None}
FULL_TRAIN = {"num_evaluations": 20, "logging_steps": 100}


def quick_preset(model: Mapping = (), data: Mapping = (), train: Mapping = ()) -> dict:
    """A quick (CPU) preset: `QUICK_MODEL` with `model` changes, builder arguments `data`, `TRAIN_DEFAULTS` with
    `QUICK_TIME_BUDGET_S` and `train` changes."""
    train = {**TRAIN_DEFAULTS, "time_budget_s": QUICK_TIME_BUDGET_S, **dict(train)}
    return {"model": {**QUICK_MODEL, **dict(model)}, "data": dict(data), "train": train}


def full_preset(*, model: Mapping, train: Mapping, data: Mapping = ()) -> dict:
    """A full (GPU) preset from a MEGA recipe (`mega_model`, `mega_train`): `FULL_MODEL` under the recipe's model,
    whose `dropout` is also the hidden and attention dropout and which is pre-norm for BatchNorm, post-norm
    otherwise (unless it says `normalize_before`); `TRAIN_DEFAULTS` and `FULL_TRAIN` under the recipe's training,
    whose batch is also the evaluation batch; the builder arguments `data`."""
    dropout = model["dropout"]
    model = {
        **FULL_MODEL, "hidden_dropout": dropout, "attention_dropout": dropout,
        "normalize_before": model["normalization_type"] == "batchnorm", **dict(model),
    }  # fmt: skip
    train = {**TRAIN_DEFAULTS, **FULL_TRAIN, "eval_batch_size": train["batch_size"], **dict(train)}
    return {"model": model, "data": dict(data), "train": train}


SMALL_SPLITS = {"num_train": 4000, "num_validation": 200, "num_test": 500}
LONG_SPLITS = {"num_train": 4000, "num_validation": 100, "num_test": 300}  # 500-1,000 tokens: evaluation costs


def mega_model(*, layers: int, width: int, ffn: int, shared: int, normalization: str, chunk: int, dropout: float,
               **fields) -> dict:  # fmt: skip
    """A MEGA recipe's model in LongVQConfig field names: depth, width D, FFN/value width H, shared width Z,
    normalisation, chunk size C, dropout, and any other `fields` (truncation, ...)."""
    return {
        "num_hidden_layers": layers, "hidden_size": width, "intermediate_size": ffn,
        "shared_representation_size": shared, "normalization_type": normalization, "chunk_size": chunk,
        "dropout": dropout, **fields,
    }  # fmt: skip


def mega_train(*, learning_rate: float, batch_size: int, weight_decay: float, max_steps: int,
               warmup_steps: int) -> dict:  # fmt: skip
    """A MEGA recipe's optimisation in preset setting names."""
    return {"learning_rate": learning_rate, "batch_size": batch_size, "weight_decay": weight_decay,
            "max_steps": max_steps, "warmup_steps": warmup_steps}  # fmt: skip


_FASHION_MNIST = {
    "quick": quick_preset(model={"chunk_size": 28}, data=LONG_SPLITS, train={"learning_rate": 3e-3, "batch_size": 16}),
    # MEGA's LRA Image recipe (CIFAR-10 there).
    "full": full_preset(
        model=mega_model(layers=8, width=160, ffn=320, shared=96, normalization="batchnorm", chunk=196,
                         dropout=0.0),
        train=mega_train(learning_rate=1e-2, batch_size=50, weight_decay=0.02, max_steps=180_000, warmup_steps=9_000),
    ),
}

PRESETS: dict[str, dict[str, dict]] = {
    "listops": {
        "quick": quick_preset(data={**SMALL_SPLITS, "min_length": 40, "max_length": 160},
                              train={"learning_rate": 3e-3}),
        "full": full_preset(
            model=mega_model(layers=6, width=80, ffn=160, shared=64, normalization="layernorm", chunk=128,
                             dropout=0.1, truncation=1024),
            train=mega_train(learning_rate=1e-3, batch_size=64, weight_decay=0.01, max_steps=90_000,
                             warmup_steps=3_000),
            data={"num_train": 96_000, "num_validation": 2_000, "num_test": 2_000, "min_length": 500,
                  "max_length": 2_000},
        ),
    },
    "text": {
        "quick": quick_preset(data={**LONG_SPLITS, "window": 512}, train={"learning_rate": 3e-3}),
        "full": full_preset(
            model=mega_model(layers=4, width=128, ffn=256, shared=64, normalization="scalenorm", chunk=256,
                             dropout=0.1, truncation=1024),
            train=mega_train(learning_rate=4e-3, batch_size=50, weight_decay=0.01, max_steps=25_000,
                             warmup_steps=10_000),
        ),
    },
    "retrieval": {
        "quick": quick_preset(data={**LONG_SPLITS, "max_doc_bytes": 256}, train={"learning_rate": 3e-3}),
        "full": full_preset(
            model=mega_model(layers=6, width=128, ffn=256, shared=64, normalization="scalenorm", chunk=256,
                             dropout=0.1, truncation=1024),
            train=mega_train(learning_rate=3e-3, batch_size=64, weight_decay=0.04, max_steps=91_960,
                             warmup_steps=10_000),
        ),
    },
    "fashion_mnist": _FASHION_MNIST,
    "fashion_mnist_values": copy.deepcopy(_FASHION_MNIST),  # the same images as float values
    "pathfinder": {
        "quick": quick_preset(data=LONG_SPLITS, train={"learning_rate": 3e-3, "batch_size": 16}),
        "full": full_preset(
            model=mega_model(layers=6, width=128, ffn=256, shared=64, normalization="batchnorm", chunk=128,
                             dropout=0.0),
            train=mega_train(learning_rate=1e-2, batch_size=128, weight_decay=0.01, max_steps=250_000,
                             warmup_steps=50_000),
        ),
    },
    "pathx": {
        # 16,384 tokens per image: on a CPU this preset only checks that Path-X runs (it is not in the comparison).
        "quick": quick_preset(model={"chunk_size": 128}, data={"num_train": 200, "num_validation": 50, "num_test": 50},
                              train={"batch_size": 4}),
        "full": full_preset(
            model=mega_model(layers=4, width=64, ffn=128, shared=32, normalization="batchnorm", chunk=512,
                             truncation=4096, dropout=0.0),
            train=mega_train(learning_rate=1e-2, batch_size=128, weight_decay=0.01, max_steps=125_000,
                             warmup_steps=10_000),
            data={"resolution": 128},
        ),
    },
    "speech": {
        # 1 s clips average-pooled 8x (16 kHz -> 2 kHz, 2,000 steps) so a CPU gets through enough of them.
        "quick": quick_preset(model={"chunk_size": 64}, data={"downsample": 8}, train={"batch_size": 16}),
        # MEGA SC-raw base (6 layers, D=60, BatchNorm pre-norm, chunk and truncation 1000).
        "full": full_preset(
            model=mega_model(layers=6, width=60, ffn=120, shared=30, normalization="batchnorm", chunk=1000,
                             truncation=1000, dropout=0.0),
            train=mega_train(learning_rate=1e-2, batch_size=20, weight_decay=0.01, max_steps=250_000,
                             warmup_steps=10_000),
        ),
    },
    "text_lm": {
        "quick": quick_preset(data={"block_size": 256}, train={"learning_rate": 3e-3, "batch_size": 16}),
        # MEGA enwik8 (12 layers, D=512, chunk 2048; causal, pre-norm LayerNorm, no truncation for decoding; its
        # gradient clip 0.25), with a 512-code codebook.
        "full": full_preset(
            model=mega_model(layers=12, width=512, ffn=1024, shared=128, normalization="layernorm", chunk=2048,
                             dropout=0.1, normalize_before=True, codebook_size=512),
            train={**mega_train(learning_rate=5e-3, batch_size=8, weight_decay=0.1, max_steps=400_000,
                                warmup_steps=24_000), "max_grad_norm": 0.25},
        ),
    },
    "mqar": {
        # Zoology's smallest grid point (64 tokens, 4 pairs) with a 64-token vocabulary; chunks of 16 so most queries
        # sit further back than the window (the previous and current chunk) reaches.
        "quick": quick_preset(model={"chunk_size": 16},
                              data={**SMALL_SPLITS, "vocab_size": 64, "seq_len": 64, "num_kv_pairs": 4},
                              train={"learning_rate": 3e-3}),
        # No MEGA recipe for MQAR: Zoology-like sizes (4 layers, D=128) on the builder's default data.
        "full": full_preset(
            model=mega_model(layers=4, width=128, ffn=256, shared=64, normalization="layernorm", chunk=64,
                             normalize_before=True, dropout=0.0),
            train=mega_train(learning_rate=1e-3, batch_size=64, weight_decay=0.01, max_steps=20_000,
                             warmup_steps=1_000),
        ),
    },
}


def _section_of(key: str, preset: dict) -> str:
    """Which preset section a bare `--set` key belongs to: train keys, then LongVQConfig fields, else builder data."""
    if key in preset["train"] or key in TRAIN_DEFAULTS:
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
    resolved["train"] = {**TRAIN_DEFAULTS, **resolved.get("train", {})}
    for key, value in (overrides or {}).items():
        section, dot, name = key.partition(".")
        if not dot:
            section, name = _section_of(key, resolved), key
        if section not in ("model", "data", "train"):
            raise ValueError(f"Override {key!r}: the section must be model, data or train.")
        resolved[section][name] = value
    return resolved


__all__ = [
    "FULL_MODEL", "FULL_TRAIN", "LONG_SPLITS", "PRESETS", "PRESET_NAMES", "QUICK_MODEL", "QUICK_TIME_BUDGET_S",
    "SMALL_SPLITS", "TRAIN_DEFAULTS", "full_preset", "get_preset", "mega_model", "mega_train", "quick_preset",
]  # fmt: skip
