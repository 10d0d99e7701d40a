"""The models of an experiment: the LongVQ config of a task at a preset, and the freshly initialised (or saved)
model of each architecture, LongVQ itself or a baseline of `BASELINES` built from it.

Architectures (`ARCHITECTURES`): `longvq`, bidirectional `LongVQForSequenceClassification` for classification tasks
and causal `LongVQForCausalLM` for language modelling and MQAR; `llama` and `mega_chunk`, the baselines built from
that LongVQ model (see `longvq.experiments.baselines`).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..configuration_longvq import LongVQConfig
from .baselines import BASELINES, LONGVQ_CLASSES, Reference
from .presets import get_preset

ARCHITECTURES = ("longvq", "llama", "mega_chunk")
ARCHITECTURE_LABELS = {"longvq": "LongVQ", **{arch: BASELINES[arch].label for arch in ARCHITECTURES[1:]}}

# The model head each task kind trains: per-position labels (MQAR) are read off causal-LM outputs.
KIND_HEADS = {"classification": "sequence_classification", "lm": "causal_lm", "token_labels": "causal_lm"}


def check_arch(arch: str) -> None:
    """ValueError naming the architectures unless `arch` is one of `ARCHITECTURES`."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}.")


def longvq_config(info, preset: Mapping) -> LongVQConfig:
    """The LongVQ config of `preset` for task `info`: bidirectional for classification, causal otherwise. The
    preset's model section may override any of these."""
    fields = {
        "vocab_size": info.vocab_size or 1,  # continuous inputs never touch the (one-row) embedding table
        "input_dim": info.input_dim,
        "pad_token_id": info.pad_token_id,
        "bidirectional": info.kind == "classification",
    }
    if info.kind == "classification":
        fields["num_labels"] = info.num_labels
    return LongVQConfig(**{**fields, **preset["model"]})


def build_model(arch: str, info, preset: str | Mapping = "quick") -> nn.Module:
    """A freshly initialised model of architecture `arch` (`longvq`, `llama`, `mega_chunk`) for task `info` (a
    `TaskInfo`) at preset `preset` (a name or a resolved preset dict). Seed with `transformers.set_seed` first."""
    check_arch(arch)
    if isinstance(preset, str):
        preset = get_preset(info.name, preset)
    reference = Reference(longvq_config(info, preset), KIND_HEADS[info.kind], info.max_length)
    return reference.longvq() if arch == "longvq" else BASELINES[arch].build(reference)


def load_model(checkpoint: str, arch: str, info) -> nn.Module:
    """Load a model saved by `run_experiment` (safetensors) for evaluation."""
    check_arch(arch)
    if arch == "longvq":
        return LONGVQ_CLASSES[KIND_HEADS[info.kind]].from_pretrained(checkpoint)
    return BASELINES[arch].load(checkpoint, KIND_HEADS[info.kind], info.input_dim)


__all__ = [
    "ARCHITECTURES", "ARCHITECTURE_LABELS", "KIND_HEADS", "build_model", "check_arch", "load_model", "longvq_config",
]  # fmt: skip
