"""The codebooks of LongVQ models under training: a fingerprint of their buffers (`codebook_summary`), whether their
updates are switched off (`codebooks_frozen`; `LongVQPreTrainedModel.freeze_codebooks` switches them), how many
tokens each code is assigned (`CodeCounter`) and the `Trainer` callback that logs codebook health
(`CodebookHealthCallback`). Everything here finds the LongVQ modules inside any wrapper (DDP, PEFT, ...)."""

from __future__ import annotations

import hashlib
from functools import partial
from typing import Any

import torch
from transformers import TrainerCallback

from .. import metrics


def _quantizers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every vector quantizer in `model` (also inside DDP/PEFT wrappers), in module order."""
    return [m for m in model.modules() if hasattr(m, "codebook_sum") and hasattr(m, "codebook_count")]


def longvq_stacks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every `LongVQModel` (the layer stack) in `model`, also inside wrappers; ValueError if there is none."""
    stacks = [m for m in model.modules() if hasattr(m, "codebook_updates")]
    if not stacks:
        raise ValueError("No LongVQ model found in `model`.")
    return stacks


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


def codebooks_frozen(model: torch.nn.Module) -> bool:
    """Whether every LongVQ stack in `model` has its codebook updates switched off
    (`LongVQPreTrainedModel.freeze_codebooks`; through a PEFT model, `peft_model.freeze_codebooks()` reaches it)."""
    return all(not stack.codebook_updates for stack in longvq_stacks(model))


class CodeCounter:
    """Counts, per LongVQ layer of `model`, the real tokens assigned to each code in its forwards from now until
    `remove()`: forward hooks sum the per-code counts every layer reports (`LongVQLayerStatistics.code_counts`).

    With `training_only`, forwards of a stack in eval mode are not counted. Forwards that activation checkpointing
    replays in the backward pass are never counted twice (they run outside the stack's forward).
    """

    def __init__(self, model: torch.nn.Module, training_only: bool = False):
        stacks = longvq_stacks(model)
        attentions = [layer.attention for stack in stacks for layer in stack.layers]
        self.training_only = training_only
        self.counts: list[torch.Tensor | None] = [None] * len(attentions)
        self._in_forward = False
        self._handles = []
        for stack in stacks:
            self._handles.append(stack.register_forward_pre_hook(self._enter))
            self._handles.append(stack.register_forward_hook(self._leave))
        for index, attention in enumerate(attentions):
            self._handles.append(attention.register_forward_hook(partial(self._collect, index)))

    def _enter(self, module, args):
        self._in_forward = module.training or not self.training_only

    def _leave(self, module, args, output):
        self._in_forward = False

    def _collect(self, index, module, args, output):
        statistics = output[1]
        if not self._in_forward or statistics is None:
            return
        counts = statistics.code_counts.detach().float().cpu()
        self.counts[index] = counts if self.counts[index] is None else self.counts[index] + counts

    def health(self) -> dict[str, Any] | None:
        """Codebook usage and perplexity of the tokens counted so far, from the `codebook_usage` and
        `codebook_perplexity` modules of `longvq.metrics`: the means over layers (`codebook_usage`,
        `codebook_perplexity`) and the lists per layer (`codebook_usage_per_codebook`,
        `codebook_perplexity_per_codebook`); None while some layer has counted nothing."""
        if not self.counts or any(counts is None for counts in self.counts):
            return None
        import evaluate

        modules = [metrics.load(name, keep_in_memory=True) for name in ("codebook_usage", "codebook_perplexity")]
        return evaluate.combine(modules).compute(code_counts=[counts.numpy() for counts in self.counts])

    def reset(self) -> None:
        """Forget the counts so far (the hooks stay)."""
        self.counts = [None] * len(self.counts)

    def remove(self) -> None:
        """Remove the hooks; the counts stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class CodebookHealthCallback(TrainerCallback):
    """Adds codebook health to every training log of a `Trainer`, from the code assignments of all real training
    tokens this process saw since the previous log (every micro-batch forward in training mode, by a `CodeCounter`
    attached at `on_train_begin`):

    - `codebook_usage_layer{i}`: fraction of layer i's S codes assigned at least one token;
    - `codebook_perplexity_layer{i}`: `exp(entropy)` of layer i's code assignment frequencies (S when all codes are
      used equally, 1 when the codebook has collapsed onto one code);
    - `codebook_usage`, `codebook_perplexity`: their means over layers.

    Values are added to the `logs` dict and to `state.log_history`; reporting callbacks see them if this callback
    comes before them (`train_causal_lm` puts it first).
    """

    def __init__(self):
        self.counter: CodeCounter | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.counter is not None:
            self.counter.remove()
        self.counter = CodeCounter(model, training_only=True)

    def metrics(self) -> dict[str, float]:
        """The health metrics of the tokens counted so far ({} if none), without resetting them."""
        health = self.counter.health() if self.counter is not None else None
        if health is None:
            return {}
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
        self.counter.reset()
        logs.update(health)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(health)

    def on_train_end(self, args, state, control, **kwargs):
        self.counter.remove()


__all__ = ["CodeCounter", "CodebookHealthCallback", "codebook_summary", "codebooks_frozen", "longvq_stacks"]
