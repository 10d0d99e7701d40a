"""Byte-level data sets for training and tests, cut from the corpus embedded in the package
(`longvq/data/tiny_corpus.txt`) or from any bytes given: a causal-LM set (`byte_lm_datasets`) and a two-class
sequence-classification set (`byte_classification_datasets`), both split contiguously like enwik8."""

from __future__ import annotations

from importlib import resources

import numpy as np

VALIDATION_FRACTION = 0.1
CLASSIFICATION_LABELS = ("forward", "reversed")


def load_corpus_bytes() -> bytes:
    """The embedded corpus `longvq/data/tiny_corpus.txt` (about 30 kB of English text) as raw bytes."""
    return resources.files("longvq").joinpath("data/tiny_corpus.txt").read_bytes()


def split_corpus(data: bytes, validation_fraction: float = VALIDATION_FRACTION) -> tuple[bytes, bytes]:
    """Contiguous split, as for enwik8: the first `1 - validation_fraction` of the bytes train, the rest validate."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"`validation_fraction` must be in (0, 1), got {validation_fraction!r}.")
    cut = int(len(data) * (1.0 - validation_fraction))
    return data[:cut], data[cut:]


def _windows(data: bytes, block_size: int, stride: int, offset: int = 0) -> np.ndarray:
    """(n, block_size) int64 windows of `data` starting at offset, offset + stride, ...; the ragged tail is dropped."""
    array = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    starts = np.arange(offset, len(array) - block_size + 1, stride)
    if len(starts) == 0:
        raise ValueError(f"`block_size` ({block_size}) is longer than the text to cut ({len(array) - offset} bytes).")
    return np.stack([array[s : s + block_size] for s in starts])


def byte_lm_datasets(
    block_size: int = 128,
    seed: int = 0,
    stride: int | None = None,
    validation_fraction: float = VALIDATION_FRACTION,
    data: bytes | None = None,
):
    """Byte-level causal-LM data: a `datasets.DatasetDict` with `train` and `validation` splits of fixed-length
    windows (`input_ids` and `labels`, both the window's byte ids; the model shifts the labels).

    The corpus (`data`, default: the embedded one) is split contiguously, 90/10 like enwik8, so no validation byte
    is ever trained on. Training windows start every `stride` bytes (default `block_size`: non-overlapping) from a
    random offset in `[0, stride)` drawn from `seed`, so different seeds see different window boundaries; validation
    windows are non-overlapping from the start of the held-out part and do not depend on `seed`. Shuffling is left
    to the `Trainer` (its sampler is seeded by `TrainingArguments.seed`/`data_seed`).
    """
    from datasets import Dataset, DatasetDict

    stride = block_size if stride is None else stride
    if block_size < 2 or stride < 1:
        raise ValueError(f"Need block_size >= 2 and stride >= 1, got {block_size} and {stride}.")
    train_bytes, validation_bytes = split_corpus(load_corpus_bytes() if data is None else data, validation_fraction)
    offset = int(np.random.default_rng(seed).integers(stride)) if stride > 1 else 0
    splits = {
        "train": _windows(train_bytes, block_size, stride, offset),
        "validation": _windows(validation_bytes, block_size, block_size),
    }
    return DatasetDict({
        name: Dataset.from_dict({"input_ids": windows.tolist(), "labels": windows.tolist()})
        for name, windows in splits.items()
    })  # fmt: skip


def byte_classification_datasets(block_size: int = 64, seed: int = 0, validation_fraction: float = 0.2, data=None):
    """A small two-class byte-level sequence-classification task for tests and examples.

    Every non-overlapping window of the corpus appears twice: as written (label 0, `forward`) and with its bytes in
    reverse order (label 1, `reversed`). Both copies contain exactly the same bytes, so a bag-of-bytes model is at
    chance and the classifier has to use byte order (e.g. "the " versus " eht"); a tiny bidirectional LongVQ
    (D=32, 2 layers) gets above 90% validation accuracy in about 300 steps of batch 16 at learning rate 1e-3.
    The windows are split contiguously like `byte_lm_datasets` (both copies of a window land in the same split), and
    the training split is shuffled with `seed`. Columns: `input_ids`, `labels` (int).
    """
    from datasets import Dataset, DatasetDict

    train_bytes, validation_bytes = split_corpus(load_corpus_bytes() if data is None else data, validation_fraction)
    splits = {}
    for name, part in (("train", train_bytes), ("validation", validation_bytes)):
        windows = _windows(part, block_size, block_size)
        inputs = np.concatenate([windows, windows[:, ::-1]])
        labels = np.concatenate([np.zeros(len(windows), dtype=np.int64), np.ones(len(windows), dtype=np.int64)])
        order = np.random.default_rng(seed).permutation(len(inputs)) if name == "train" else np.arange(len(inputs))
        splits[name] = Dataset.from_dict({"input_ids": inputs[order].tolist(), "labels": labels[order].tolist()})
    return DatasetDict(splits)


__all__ = [
    "CLASSIFICATION_LABELS", "VALIDATION_FRACTION", "byte_classification_datasets", "byte_lm_datasets",
    "load_corpus_bytes", "split_corpus",
]  # fmt: skip
