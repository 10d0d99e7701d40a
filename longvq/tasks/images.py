"""Sequential Fashion-MNIST: classify 28 x 28 greyscale images read pixel by pixel (the offline stand-in for
sequential CIFAR / sMNIST; CIFAR-10 is not installable offline).

Source: Debian `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-
ubyte.gz`, MIT): 60,000 training and 10,000 test images, 10 balanced classes. The validation split is a seeded random
subset of the official training images (`num_validation`, default 5,000), disjoint from the training split; the test
split is the official test set. `num_train` / `num_test` take seeded random subsets.

Pixels as `pixels="tokens"` (`input_ids`, ids 0-255, vocabulary 256) or `pixels="values"` (`values`, float pixel/255,
input_dim 1). `side=32` zero-pads the images to 32 x 32 (sequence 1,024, the sCIFAR length); default 28 (784).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .common import (
    TaskSourceMissing,
    cached,
    check_non_negative,
    classification_split,
)

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get install dataset-fashion-mnist"
CLASS_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path) -> np.ndarray:
    """Read a gzip-compressed idx file (the MNIST format): big-endian magic (0, 0, dtype code 0x08 = uint8,
    number of dimensions), one big-endian int32 per dimension, then the uint8 data. Returns the array, e.g.
    (n, 28, 28) images or (n,) labels."""
    with gzip.open(path) as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {data[:4]!r}).")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {array.size} values.")
    return array.reshape(shape)


def load_fashion_mnist(source_dir=DEFAULT_SOURCE_DIR) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images (60000, 28, 28) uint8, labels (60000,) uint8), "test": (...)} from the idx-gz files."""
    source = Path(source_dir)
    arrays = {}
    for split, names in FILES.items():
        paths = [source / name for name in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            expected = ", ".join(FILES["train"] + FILES["test"])
            raise TaskSourceMissing(
                f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with `{INSTALL_HINT}` "
                f"(Debian/Ubuntu), or pass `source_dir` pointing at a folder with {expected}."
            )
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{source}: {split} images {images.shape} and labels {labels.shape} do not match.")
        arrays[split] = (images, labels)
    return arrays


def generate_fashion_mnist(seed, num_train, num_validation, num_test, pixels, side, source_dir):
    """The three splits without caching (see `fashion_mnist`)."""
    from datasets import DatasetDict

    arrays = load_fashion_mnist(source_dir)
    rng = np.random.default_rng(seed)
    train_images, train_labels = arrays["train"]
    test_images, test_labels = arrays["test"]
    available = len(train_images) - num_validation
    if available < 1:
        raise ValueError(f"`num_validation` ({num_validation}) leaves no training images of {len(train_images)}.")
    if num_train is not None and num_train > available:
        raise ValueError(f"`num_train` ({num_train}) exceeds the {available} training images left after validation.")
    if num_test is not None and num_test > len(test_images):
        raise ValueError(f"`num_test` ({num_test}) exceeds the {len(test_images)} test images.")
    order = rng.permutation(len(train_images))
    validation_index = np.sort(order[:num_validation])
    train_index = np.sort(order[num_validation:] if num_train is None else order[num_validation:][:num_train])
    test_index = np.arange(len(test_images))
    if num_test is not None:
        test_index = np.sort(rng.permutation(len(test_images))[:num_test])

    column = "input_ids" if pixels == "tokens" else "values"
    splits = {}
    for name, images, labels, index in (
        ("train", train_images, train_labels, train_index),
        ("validation", train_images, train_labels, validation_index),
        ("test", test_images, test_labels, test_index),
    ):
        chosen = images[index]
        if side > chosen.shape[1]:
            before = (side - chosen.shape[1]) // 2
            after = side - chosen.shape[1] - before
            chosen = np.pad(chosen, ((0, 0), (before, after), (before, after)))
        flat = chosen.reshape(len(chosen), -1)
        data = flat if pixels == "tokens" else flat.astype(np.float32) / 255.0
        splits[name] = classification_split(column, data, labels[index], CLASS_NAMES, data.dtype)
    return DatasetDict(splits)


def fashion_mnist(
    seed: int = 0,
    cache_dir=None,
    *,
    num_train: int | None = None,
    num_validation: int = 5000,
    num_test: int | None = None,
    pixels: str = "tokens",
    side: int = 28,
    source_dir=DEFAULT_SOURCE_DIR,
):
    """Sequential Fashion-MNIST as a cached `DatasetDict`: `input_ids` (pixels="tokens") or `values`
    (pixels="values"), `label` (10 classes), `length` (side**2). `num_train=None` / `num_test=None` keep all
    (55,000 / 10,000 with the default validation size). Raises `TaskSourceMissing` (install
    `dataset-fashion-mnist`) when the idx files are not in `source_dir`."""
    if pixels not in ("tokens", "values"):
        raise ValueError(f"`pixels` must be 'tokens' or 'values', got {pixels!r}.")
    if num_train is not None:
        check_non_negative(num_train=num_train)
        if num_train == 0:
            raise ValueError("`num_train` must be a positive integer or None, got 0.")
    if num_test is not None:
        check_non_negative(num_test=num_test)
    check_non_negative(num_validation=num_validation)
    if side not in (28, 32):
        raise ValueError(f"`side` must be 28 or 32, got {side!r}.")
    for name in FILES["train"] + FILES["test"]:
        if not (Path(source_dir) / name).is_file():
            load_fashion_mnist(source_dir)  # raises TaskSourceMissing with the install hint
    arguments = {
        "seed": seed,
        "num_train": num_train,
        "num_validation": num_validation,
        "num_test": num_test,
        "pixels": pixels,
        "side": side,
        "source_dir": str(source_dir),
    }
    return cached("fashion_mnist", arguments, cache_dir, lambda: generate_fashion_mnist(**arguments))
