"""Accuracy, as a Hugging Face `evaluate` module shipped with LongVQ (load it with `longvq.metrics.load("accuracy")`
or `evaluate.load(<this folder>)`; no network needed)."""

import math

import datasets
import evaluate
import numpy as np

from longvq.metrics import IGNORE_INDEX, metric_info, scored_tokens

_DESCRIPTION = """
Accuracy: the fraction of scored predictions equal to their reference. A reference equal to `ignore_index`
(default -100, the label transformers' losses ignore) is not scored. Configuration "default" takes one prediction
and one reference per example (sequence classification); configuration "tokens" takes one row per sequence (one
prediction per token, e.g. recall tasks), pooled over all scored tokens.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids; config "tokens": one row of predicted token ids per sequence.
    references: the true ids, shaped like `predictions`; entries equal to `ignore_index` are not scored.
    ignore_index: reference value of unscored entries (default -100).
Returns:
    accuracy: scored predictions equal to their reference / scored predictions; NaN when nothing is scored.
Examples:
    >>> accuracy = longvq.metrics.load("accuracy")
    >>> accuracy.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, -100])
    {'accuracy': 0.6666666666666666}
    >>> token_accuracy = longvq.metrics.load("accuracy", "tokens")
    >>> token_accuracy.compute(predictions=[[5, 6], [7, 8, 9]], references=[[5, -100], [7, 0, 9]])
    {'accuracy': 0.75}
"""

CONFIGS = ("default", "tokens")


class Accuracy(evaluate.Metric):
    def _info(self):
        if self.config_name not in CONFIGS:
            raise ValueError(f"Unknown accuracy config {self.config_name!r}; choose one of {CONFIGS}.")
        label = datasets.Value("int64")
        feature = datasets.Sequence(label) if self.config_name == "tokens" else label
        features = datasets.Features({"predictions": feature, "references": feature})
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, features)

    def _compute(self, predictions, references, ignore_index=IGNORE_INDEX):
        rows = (predictions, references) if self.config_name == "tokens" else ([predictions], [references])
        predictions, references = scored_tokens(*rows, ignore_index=ignore_index, dtype=np.int64)
        return {"accuracy": float((predictions == references).mean()) if references.size else math.nan}
