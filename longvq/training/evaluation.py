"""`Trainer` metric functions (`compute_metrics` / `preprocess_logits_for_metrics`), one per kind of prediction, each
computed by the `evaluate` modules of `longvq.metrics`:

- causal language modelling: `preprocess_logits_for_metrics` + `compute_lm_metrics` (cross-entropy, perplexity,
  bits per byte);
- sequence classification: `compute_classification_metrics` (accuracy);
- per-position labels of a causal LM (MQAR): `preprocess_token_predictions` + `compute_token_accuracy` (accuracy over
  the scored positions).

In all of them logits at position t are scored against `labels[t + 1]` where the labels are sequences (the causal-LM
convention), and labels equal to `IGNORE_INDEX` are not scored.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import metrics
from ..metrics import IGNORE_INDEX


def _first(output):
    """The logits (or reduced predictions) of a model output that may be a tuple."""
    return output[0] if isinstance(output, tuple) else output


def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """For a causal LM under `Trainer.evaluate`: reduce the (B, T, V) logits of a batch to the (B, T) next-token
    negative log-likelihood in nats (position t scores `labels[t + 1]`; the last position and ignored labels hold 0),
    so evaluation never accumulates full-vocabulary logits. Pair with `compute_lm_metrics`."""
    targets = labels[:, 1:]
    ignored = targets == IGNORE_INDEX
    nll = F.cross_entropy(_first(logits)[:, :-1].float().transpose(1, 2), targets.masked_fill(ignored, 0),
                          reduction="none")  # fmt: skip
    return F.pad(nll.masked_fill(ignored, 0.0), (0, 1))


def _shifted_row(predictions, labels) -> dict[str, list[np.ndarray]]:
    """`predictions[:, t]` paired with `labels[:, t + 1]`, as one row of each: the metric modules pool the scored
    positions of all rows, and `evaluate` stores its inputs in Arrow, where one long row is much cheaper than one per
    sequence."""
    return {
        "predictions": [np.asarray(_first(predictions))[:, :-1].ravel()],
        "references": [np.asarray(labels)[:, 1:].ravel()],
    }


def compute_lm_metrics(eval_prediction) -> dict[str, float]:
    """`compute_metrics` for a causal LM (after `preprocess_logits_for_metrics`): the mean next-token cross-entropy
    in nats, `perplexity = exp(cross_entropy)` and `bpb = cross_entropy / ln 2` (bits per byte, as tokens are bytes
    for the byte-level models; bits per token otherwise), from the `perplexity` and `bits_per_byte` modules of
    `longvq.metrics`; NaN when no label is scored. Trainer reports them as `eval_cross_entropy`, `eval_perplexity`,
    `eval_bpb`. They exclude the small commitment term that `eval_loss` includes."""
    tokens = _shifted_row(eval_prediction.predictions, eval_prediction.label_ids)
    perplexity = metrics.load("perplexity", keep_in_memory=True).compute(**tokens)
    bits = metrics.load("bits_per_byte", keep_in_memory=True).compute(**tokens)
    return {"cross_entropy": perplexity["cross_entropy"], "perplexity": perplexity["perplexity"],
            "bpb": bits["bits_per_byte"]}  # fmt: skip


def compute_classification_metrics(eval_prediction) -> dict[str, float]:
    """`compute_metrics` for single-label sequence classification: `accuracy` (Trainer: `eval_accuracy`), from the
    `accuracy` module of `longvq.metrics`."""
    return metrics.load("accuracy", keep_in_memory=True).compute(
        predictions=np.argmax(_first(eval_prediction.predictions), axis=-1),
        references=np.asarray(eval_prediction.label_ids),
    )


def preprocess_token_predictions(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """For per-position labels under `Trainer.evaluate`: reduce (B, T, V) logits to (B, T) predicted ids."""
    return _first(logits).argmax(dim=-1)


def compute_token_accuracy(eval_prediction) -> dict[str, float]:
    """`compute_metrics` for per-position labels of a causal LM (after `preprocess_token_predictions`): accuracy of
    the prediction at position t (the output of `logits[t]`) against `labels[t + 1]` (for labels shifted by
    `longvq.experiments.TokenLabelShift`, the original label of position t), ignored labels excluded, from the
    `accuracy` module of `longvq.metrics` (config "tokens"); NaN when nothing is scored. Also reports
    `scored_positions`."""
    tokens = _shifted_row(eval_prediction.predictions, eval_prediction.label_ids)
    accuracy = metrics.load("accuracy", "tokens", keep_in_memory=True).compute(**tokens)
    return {**accuracy, "scored_positions": int((tokens["references"][0] != IGNORE_INDEX).sum())}


__all__ = [
    "compute_classification_metrics", "compute_lm_metrics", "compute_token_accuracy", "preprocess_logits_for_metrics",
    "preprocess_token_predictions",
]  # fmt: skip
