"""Multi-query associative recall (MQAR; Zoology, Arora et al. 2023).

A sequence of `seq_len` tokens starts with `num_kv_pairs` key-value pairs `k1 v1 k2 v2 ...` (distinct keys from the
lower half of the vocabulary, 1 .. vocab_size/2 - 1; distinct values from the upper half, vocab_size/2 ..
vocab_size - 1). In the rest of the sequence every key appears once more, as a query, at an even offset drawn
without replacement from a power law p(gap) ~ a * gap^(a - 1) with a = `power_a` (0.01, Zoology's default: most
queries come soon, some very late). All other positions hold 0.

`labels` has -100 everywhere except at the query positions, where it holds the value paired with the queried key:
the model's output at the query position must predict the value (labels are NOT shifted; see `TaskInfo.kind`
"token_labels"). Zoology grid: vocab 8192, (seq_len, num_kv_pairs) = (64, 4), (128, 8), (256, 16), (512, 64).
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from ..metrics import IGNORE_INDEX
from .common import (
    cached,
    check_fraction,
    check_positive,
    check_split_sizes,
    labelled_tokens_split,
    split_sizes,
)

DEFAULTS = {
    "vocab_size": 8192,
    "seq_len": 256,
    "num_kv_pairs": 16,
    "num_train": 10_000,
    "num_validation": 1_000,
    "num_test": 1_000,
}


def _random_subsets(rng, rows: int, population: int, size: int, log_weights=None, batch: int = 1024) -> np.ndarray:
    """(rows, size) indices into range(population), each row a sample without replacement, with probabilities
    proportional to exp(log_weights) (uniform if None). Uses the Gumbel-top-k trick: the k largest of
    log_weights + Gumbel noise are a weighted sample without replacement, which vectorises over rows (in batches to
    bound memory)."""
    out = np.empty((rows, size), dtype=np.int64)
    for start in range(0, rows, batch):
        count = min(batch, rows - start)
        scores = rng.gumbel(size=(count, population))
        if log_weights is not None:
            scores += log_weights
        top = np.argpartition(-scores, size - 1, axis=1)[:, :size]
        # argpartition leaves the top k unordered; order them by score so the sample's order is random too.
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start : start + count] = np.take_along_axis(top, order, axis=1)
    return out


def generate_mqar(seed, vocab_size, seq_len, num_kv_pairs, num_train, num_validation, num_test, power_a):
    """The three splits without caching: `input_ids` and `labels` (int32, length seq_len), `length`."""
    from datasets import DatasetDict

    rng = np.random.default_rng(seed)
    half = vocab_size // 2
    context = 2 * num_kv_pairs
    slots = (seq_len - context) // 2  # queries sit at even offsets of the query span
    gaps = np.arange(1, slots + 1, dtype=np.float64)
    log_p = np.log(power_a) + (power_a - 1) * np.log(gaps)
    splits = {}
    with tqdm(total=num_train + num_validation + num_test, desc="mqar", leave=False, mininterval=1.0) as bar:
        for split, n in split_sizes(num_train, num_validation, num_test).items():
            keys = _random_subsets(rng, n, half - 1, num_kv_pairs) + 1  # 1 .. half-1 (0 is the filler)
            values = _random_subsets(rng, n, vocab_size - half, num_kv_pairs) + half
            positions = context + 2 * _random_subsets(rng, n, slots, num_kv_pairs, log_p)
            inputs = np.zeros((n, seq_len), dtype=np.int32)
            inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
            labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int32)
            rows = np.arange(n)[:, None]
            inputs[rows, positions] = keys
            labels[rows, positions] = values
            splits[split] = labelled_tokens_split(inputs, labels, np.int32)
            bar.update(n)
    return DatasetDict(splits)


def mqar(
    seed: int = 0,
    cache_dir=None,
    *,
    vocab_size: int = DEFAULTS["vocab_size"],
    seq_len: int = DEFAULTS["seq_len"],
    num_kv_pairs: int = DEFAULTS["num_kv_pairs"],
    num_train: int = DEFAULTS["num_train"],
    num_validation: int = DEFAULTS["num_validation"],
    num_test: int = DEFAULTS["num_test"],
    power_a: float = 0.01,
):
    """MQAR as a cached `DatasetDict` (see the module docstring). Needs seq_len >= 4 * num_kv_pairs (room for the
    pairs and one query slot per key) and num_kv_pairs < vocab_size / 2 (distinct keys)."""
    check_split_sizes(num_train, num_validation, num_test)
    check_positive(vocab_size=vocab_size, seq_len=seq_len, num_kv_pairs=num_kv_pairs)
    if vocab_size < 4:
        raise ValueError(f"`vocab_size` must be >= 4, got {vocab_size}.")
    if num_kv_pairs > vocab_size // 2 - 1:
        raise ValueError(
            f"`num_kv_pairs` ({num_kv_pairs}) needs that many distinct keys in 1..vocab_size/2-1; "
            f"raise `vocab_size` ({vocab_size})."
        )
    if seq_len < 4 * num_kv_pairs:
        raise ValueError(f"`seq_len` ({seq_len}) must be >= 4 * num_kv_pairs ({4 * num_kv_pairs}).")
    check_fraction("power_a", power_a)
    if power_a <= 0:
        raise ValueError(f"`power_a` must be in (0, 1], got {power_a}.")
    arguments = {
        "seed": seed,
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "num_kv_pairs": num_kv_pairs,
        "num_train": num_train,
        "num_validation": num_validation,
        "num_test": num_test,
        "power_a": power_a,
    }
    return cached("mqar", arguments, cache_dir, lambda: generate_mqar(**arguments))
