"""Perplexity from per-token negative log-likelihoods, as a Hugging Face `evaluate` module shipped with LongVQ (load
it with `longvq.metrics.load("perplexity")` or `evaluate.load(<this folder>)`; no network needed)."""


import evaluate
import numpy as np

from longvq.metrics import IGNORE_INDEX, TOKEN_NLL_ARGUMENTS, metric_info, mean_negative_log_likelihood, token_features

_DESCRIPTION = """
Perplexity of a language model: exp of its mean negative log-likelihood (cross-entropy, in nats) per scored
token, pooled over all sequences. The inputs are the model's per-token negative log-likelihoods, e.g.
`torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")`, or what
`longvq.training.preprocess_logits_for_metrics` returns under `Trainer.evaluate`. Tokens whose reference is
`ignore_index` (default -100) are not scored.
"""

_KWARGS_DESCRIPTION = TOKEN_NLL_ARGUMENTS + """Returns:
    perplexity: exp(cross_entropy) (inf if that overflows); NaN when no position is scored.
    cross_entropy: mean negative log-likelihood per scored token, in nats; NaN when no position is scored.
Example:
    >>> perplexity = longvq.metrics.load("perplexity")
    >>> perplexity.compute(predictions=[[0.5, 1.5], [1.0, 7.0]], references=[[10, 11], [12, -100]])
    {'perplexity': 2.718281828459045, 'cross_entropy': 1.0}
"""


class Perplexity(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, token_features())

    def _compute(self, predictions, references, ignore_index=IGNORE_INDEX):
        cross_entropy = mean_negative_log_likelihood(predictions, references, ignore_index)
        with np.errstate(over="ignore"):
            perplexity = float(np.exp(cross_entropy))
        return {"perplexity": perplexity, "cross_entropy": cross_entropy}
