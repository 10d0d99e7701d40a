"""Bits per byte from per-token negative log-likelihoods, as a Hugging Face `evaluate` module shipped with LongVQ
(load it with `longvq.metrics.load("bits_per_byte")` or `evaluate.load(<this folder>)`; no network needed)."""

import math

import evaluate

from longvq.metrics import IGNORE_INDEX, TOKEN_NLL_ARGUMENTS, metric_info, mean_negative_log_likelihood, token_features

_DESCRIPTION = """
Bits per byte: the mean negative log-likelihood per scored token in bits (nats / ln 2), pooled over all
sequences. For byte-level models (one token per byte, as enwik8 results are reported) this is bits per byte; for
other tokenizers it is bits per token. The inputs are per-token negative log-likelihoods in nats, as for the
`perplexity` module. Tokens whose reference is `ignore_index` (default -100) are not scored.
"""

_KWARGS_DESCRIPTION = TOKEN_NLL_ARGUMENTS + """Returns:
    bits_per_byte: mean negative log-likelihood per scored token / ln 2; NaN when no position is scored.
Example:
    >>> bits_per_byte = longvq.metrics.load("bits_per_byte")
    >>> bits_per_byte.compute(predictions=[[0.5, 1.5], [4.0]], references=[[104, 105], [-100]])
    {'bits_per_byte': 1.4426950408889634}
"""


class BitsPerByte(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, token_features())

    def _compute(self, predictions, references, ignore_index=IGNORE_INDEX):
        return {"bits_per_byte": mean_negative_log_likelihood(predictions, references, ignore_index) / math.log(2)}
