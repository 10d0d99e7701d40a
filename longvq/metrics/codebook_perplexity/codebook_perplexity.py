"""Codebook perplexity, as a Hugging Face `evaluate` module shipped with LongVQ (load it with
`longvq.metrics.load("codebook_perplexity")` or `evaluate.load(<this folder>)`; no network needed)."""

import math

import evaluate
import numpy as np

from longvq.metrics import code_count_features, code_count_rows, metric_info, per_codebook

_DESCRIPTION = """
Codebook perplexity of a vector quantizer: exp of the entropy (nats) of its code assignment frequencies, i.e. the
effective number of codes in use. The input is, per codebook (e.g. per LongVQ layer), how many tokens each code
was assigned: the `code_counts` of the layers' `LongVQLayerStatistics`, summed over the batches of interest. S when
all S codes are used equally often; 1 when the codebook has collapsed onto one code.
"""

_KWARGS_DESCRIPTION = """
Args:
    code_counts: one row per codebook, one non-negative token count per code (rows may differ in length).
Returns:
    codebook_perplexity: the mean over codebooks of exp(entropy of count / total count); a codebook that was
        assigned no token has perplexity NaN; NaN for no codebook.
    codebook_perplexity_per_codebook: that perplexity for each codebook, in input order.
Example:
    >>> perplexity = longvq.metrics.load("codebook_perplexity")
    >>> perplexity.compute(code_counts=[[5, 0, 0, 0], [2, 2, 2, 2]])
    {'codebook_perplexity': 2.5, 'codebook_perplexity_per_codebook': [1.0, 4.0]}
"""


def _perplexity(counts: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return math.nan
    frequencies = counts[counts > 0] / total
    return float(np.exp(-(frequencies * np.log(frequencies)).sum()))


class CodebookPerplexity(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, code_count_features())

    def _compute(self, code_counts):
        perplexities = [_perplexity(counts) for counts in code_count_rows(code_counts)]
        return per_codebook("codebook_perplexity", perplexities)
