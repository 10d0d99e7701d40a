"""Codebook usage, as a Hugging Face `evaluate` module shipped with LongVQ (load it with
`longvq.metrics.load("codebook_usage")` or `evaluate.load(<this folder>)`; no network needed)."""


import evaluate

from longvq.metrics import code_count_features, code_count_rows, metric_info, per_codebook

_DESCRIPTION = """
Codebook usage of a vector quantizer: the fraction of its codes that were assigned at least one token. The input
is, per codebook (e.g. per LongVQ layer), how many tokens each code was assigned: the `code_counts` of the layers'
`LongVQLayerStatistics`, summed over the batches of interest. 1 when every code is used; 1/S when the codebook has
collapsed onto one of its S codes.
"""

_KWARGS_DESCRIPTION = """
Args:
    code_counts: one row per codebook, one non-negative token count per code (rows may differ in length).
Returns:
    codebook_usage: the mean over codebooks of the fraction of codes with a non-zero count; NaN for no codebook.
    codebook_usage_per_codebook: that fraction for each codebook, in input order.
Example:
    >>> usage = longvq.metrics.load("codebook_usage")
    >>> usage.compute(code_counts=[[3, 0, 1, 0], [2, 2, 2, 2]])
    {'codebook_usage': 0.75, 'codebook_usage_per_codebook': [0.5, 1.0]}
"""


class CodebookUsage(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, code_count_features())

    def _compute(self, code_counts):
        usages = [float((counts > 0).mean()) for counts in code_count_rows(code_counts)]
        return per_codebook("codebook_usage", usages)
