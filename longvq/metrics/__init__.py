"""LongVQ's evaluation metrics as Hugging Face `evaluate` modules that ship inside the package, so they load without
network access (the Hub-hosted `evaluate` metrics cannot load offline):

- `accuracy`: fraction of scored predictions equal to their reference (config `"tokens"`: one row per sequence);
- `perplexity`: `exp` of the mean next-token negative log-likelihood, with that mean (`cross_entropy`, nats);
- `bits_per_byte`: the same mean in bits (bits per byte for byte-level models, bits per token otherwise);
- `codebook_usage` / `codebook_perplexity`: fraction of a codebook's codes in use / `exp(entropy)` of its code
  frequencies, from per-code token counts.

Positions whose reference is -100 (`ignore_index`) are not scored, as in transformers' losses; a metric over no
scored position (or no code count) is NaN. Each module is the folder `longvq/metrics/<name>/` holding `<name>.py`;
`path(name)` is that folder and `load(name)` is `evaluate.load(path(name))`:

    import evaluate
    from longvq import metrics

    bits_per_byte = metrics.load("bits_per_byte")
    bits_per_byte.compute(predictions=[[0.5, 1.5, 4.0]], references=[[104, 105, -100]])  # {'bits_per_byte': 1.4427}
    lm_metrics = evaluate.combine([metrics.load("perplexity"), metrics.load("bits_per_byte")])

`longvq.training`'s `Trainer` metric functions (`compute_lm_metrics`, `compute_classification_metrics`,
`compute_token_accuracy`) and its codebook counts (`CodeCounter`, `CodebookHealthCallback`) compute their values with
these modules.
"""

from __future__ import annotations

import math
from importlib import resources

import numpy as np

METRIC_NAMES = ("accuracy", "bits_per_byte", "codebook_perplexity", "codebook_usage", "perplexity")
IGNORE_INDEX = -100  # the label transformers' losses skip: never scored here, and what LongVQ's data pads labels with


def path(name: str) -> str:
    """The folder of the metric module `name` inside the installed package, for `evaluate.load(path(name))`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown LongVQ metric {name!r}; the metrics are {', '.join(METRIC_NAMES)}.")
    return str(resources.files(__name__).joinpath(name))


def load(name: str, config_name: str | None = None, **kwargs):
    """`evaluate.load(path(name), config_name, **kwargs)`: the `evaluate.Metric` of LongVQ's metric `name`, loaded
    from the package (no network). `kwargs` go to `evaluate.load`, e.g. `keep_in_memory=True` (no cache file)."""
    import evaluate

    return evaluate.load(path(name), config_name, **kwargs)


def scored_tokens(predictions, references, ignore_index: int = IGNORE_INDEX, dtype=np.float64):
    """For the token-level modules: `predictions` and `references` are rows (one per sequence; rows may differ in
    length, but a row of `predictions` must be as long as the same row of `references`). Returns the flat arrays of
    the scored positions, those whose reference is not `ignore_index`: (predictions as `dtype`, references as int64).
    """
    lengths = [len(row) for row in predictions]
    if lengths != [len(row) for row in references]:
        raise ValueError("Each row of `predictions` must have as many entries as the same row of `references`.")
    if not lengths:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
    flat_predictions = np.concatenate([np.asarray(row, dtype=dtype) for row in predictions])
    flat_references = np.concatenate([np.asarray(row, dtype=np.int64) for row in references])
    scored = flat_references != ignore_index
    return flat_predictions[scored], flat_references[scored]


# The arguments of the modules that score per-token negative log-likelihoods (perplexity, bits_per_byte).
TOKEN_NLL_ARGUMENTS = """Args:
    predictions: one row per sequence: the negative log-likelihood (nats) the model gives each target token.
    references: one row per sequence, aligned with `predictions`: the target token ids; positions equal to
        `ignore_index` are not scored (their prediction is ignored).
    ignore_index: reference value of unscored positions (default -100).
"""


def metric_info(description: str, inputs_description: str, features):
    """The `evaluate.MetricInfo` of one of these modules (no citation: they are this package's own)."""
    import evaluate

    return evaluate.MetricInfo(
        description=description, citation="", inputs_description=inputs_description, features=features
    )


def mean_negative_log_likelihood(predictions, references, ignore_index: int = IGNORE_INDEX) -> float:
    """Mean per-token negative log-likelihood (nats) over the scored positions (`scored_tokens`); NaN with none."""
    negative_log_likelihoods, _ = scored_tokens(predictions, references, ignore_index=ignore_index)
    return float(negative_log_likelihoods.mean()) if negative_log_likelihoods.size else math.nan


def token_features():
    """The input features of the token-level modules: per sequence, float64 values and int64 target ids."""
    import datasets

    values, ids = datasets.Sequence(datasets.Value("float64")), datasets.Sequence(datasets.Value("int64"))
    return datasets.Features({"predictions": values, "references": ids})


def code_count_features():
    """The input features of the codebook modules: per codebook, float64 token counts per code."""
    import datasets

    return datasets.Features({"code_counts": datasets.Sequence(datasets.Value("float64"))})


def per_codebook(name: str, values: list[float]) -> dict:
    """A codebook module's result: the mean over codebooks under `name` (NaN with none) and the list per codebook."""
    return {name: float(np.mean(values)) if values else math.nan, f"{name}_per_codebook": values}


def code_count_rows(code_counts) -> list[np.ndarray]:
    """For the codebook modules: one float64 array per codebook of how many tokens each of its codes was assigned;
    a codebook needs at least one code, and counts must be finite and non-negative."""
    rows = [np.asarray(row, dtype=np.float64) for row in code_counts]
    for index, row in enumerate(rows):
        if row.size == 0 or not np.all(np.isfinite(row)) or np.any(row < 0):
            raise ValueError(
                f"`code_counts` row {index} must hold one finite, non-negative count per code; got {row.tolist()}."
            )
    return rows


__all__ = [
    "IGNORE_INDEX", "METRIC_NAMES", "TOKEN_NLL_ARGUMENTS", "code_count_features", "code_count_rows", "load",
    "mean_negative_log_likelihood", "metric_info", "path", "per_codebook", "scored_tokens", "token_features",
]  # fmt: skip
