"""ListOps (Nangia & Bowman 2018) with the Long Range Arena settings (Tay et al. 2021).

An example is a prefix expression over the digits 0-9 with the operators `[MIN`, `[MAX`, `[MED` (median, floored
like LRA's `int(np.median(...))`) and `[SM` (sum modulo 10), each closed by `]`, e.g.
`[MAX 2 9 [MIN 4 7 ] 0 ]` -> 9. The label is the value of the whole expression (10 classes).

Trees are drawn like LRA's generator: starting at depth 1, a node is a leaf (uniform digit) with probability
`leaf_probability` (always at `max_depth`), else an operator with 2..`max_args` children. Only trees whose token
count lies in [min_length, max_length] are kept, duplicates are dropped, and the unique trees are cut into
train / validation / test in order (so no expression occurs in two splits). LRA: 96,000 / 2,000 / 2,000 trees of
500-2,000 tokens (`LRA_LISTOPS`); the defaults here are CPU-sized.

Tokens (`VOCAB`): 0 pad, 1-10 digits 0-9, 11 `[MIN`, 12 `[MAX`, 13 `[MED`, 14 `[SM`, 15 `]`; vocabulary 16.
LRA's text form also has parentheses, which its loaders strip, so they are left out.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from .common import (
    cached,
    check_fraction,
    check_positive,
    check_split_sizes,
    classification_split,
    split_sizes,
)

PAD, DIGIT_0, CLOSE = 0, 1, 15
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
OPERATOR_IDS = {name: 11 + i for i, name in enumerate(OPERATORS)}
VOCAB = ("<pad>", *(str(d) for d in range(10)), *OPERATORS, "]")
VOCAB_SIZE = len(VOCAB)
NUM_CLASSES = 10
DEFAULTS = {"num_train": 2000, "num_validation": 200, "num_test": 200, "min_length": 50, "max_length": 500}
LRA_LISTOPS = {"num_train": 96_000, "num_validation": 2_000, "num_test": 2_000, "min_length": 500, "max_length": 2_000}


def apply_operator(op_id: int, values: list[int]) -> int:
    """The value of operator token `op_id` applied to `values` (digits 0-9)."""
    if op_id == OPERATOR_IDS["[MIN"]:
        return min(values)
    if op_id == OPERATOR_IDS["[MAX"]:
        return max(values)
    if op_id == OPERATOR_IDS["[MED"]:
        return int(np.median(values))
    return sum(values) % 10


class _TooLong(Exception):
    """Raised inside the sampler as soon as a tree passes max_length, so overlong trees cost little."""


class _Sampler:
    """Draws ListOps trees as token lists, evaluating them on the way (post-order).

    Uniform random numbers are drawn from numpy in blocks of 64k and consumed from a Python list, which is several
    times faster than one `Generator` call per node and still fully determined by the seed."""

    def __init__(self, rng: np.random.Generator, leaf_probability: float, max_depth: int, max_args: int):
        self.rng, self.leaf_probability, self.max_depth, self.max_args = rng, leaf_probability, max_depth, max_args
        self.buffer: list[float] = []
        self.position = 0

    def _uniform(self) -> float:
        if self.position == len(self.buffer):
            self.buffer, self.position = self.rng.random(65536).tolist(), 0
        self.position += 1
        return self.buffer[self.position - 1]

    def sample(self, max_length: int) -> tuple[list[int], int] | None:
        """One tree: (tokens, value), or None if it grew past `max_length` tokens."""
        self.tokens: list[int] = []
        self.limit = max_length
        try:
            value = self._node(1)
        except _TooLong:
            return None
        return self.tokens, value

    def _node(self, depth: int) -> int:
        tokens = self.tokens
        if depth >= self.max_depth or self._uniform() < self.leaf_probability:
            digit = int(self._uniform() * 10)
            tokens.append(DIGIT_0 + digit)
            if len(tokens) > self.limit:
                raise _TooLong
            return digit
        op_id = 11 + int(self._uniform() * 4)
        num_args = 2 + int(self._uniform() * (self.max_args - 1))
        tokens.append(op_id)
        values = [self._node(depth + 1) for _ in range(num_args)]
        tokens.append(CLOSE)
        if len(tokens) > self.limit:
            raise _TooLong
        return apply_operator(op_id, values)


def evaluate_tokens(tokens) -> int:
    """Evaluate a ListOps token sequence with an explicit stack (independent of the sampler; used by the tests)."""
    stack: list[list[int]] = [[]]
    operators: list[int] = []
    for token in tokens:
        token = int(token)
        if DIGIT_0 <= token < DIGIT_0 + 10:
            stack[-1].append(token - DIGIT_0)
        elif token in OPERATOR_IDS.values():
            operators.append(token)
            stack.append([])
        elif token == CLOSE:
            values = stack.pop()
            stack[-1].append(apply_operator(operators.pop(), values))
        else:
            raise ValueError(f"Unexpected token id {token} in a ListOps sequence.")
    if operators or len(stack) != 1 or len(stack[0]) != 1:
        raise ValueError("Unbalanced ListOps sequence.")
    return stack[0][0]


def detokenize(tokens) -> str:
    """Token ids -> the readable expression, e.g. `[MAX 2 9 ]`."""
    return " ".join(VOCAB[int(t)] for t in tokens if int(t) != PAD)


def generate_listops(
    seed: int,
    num_train: int,
    num_validation: int,
    num_test: int,
    min_length: int,
    max_length: int,
    max_depth: int = 10,
    max_args: int = 10,
    leaf_probability: float = 0.75,
    max_attempts: int | None = None,
):
    """Generate the three splits (no caching): a `DatasetDict` with `input_ids` (uint8 token ids), `label`
    (ClassLabel 0-9) and `length`. Raises RuntimeError if `max_attempts` trees (default 1000 per wanted example)
    yield too few unique trees in the length range."""
    from datasets import DatasetDict

    total = num_train + num_validation + num_test
    max_attempts = 1000 * total if max_attempts is None else max_attempts
    sampler = _Sampler(np.random.default_rng(seed), leaf_probability, max_depth, max_args)
    seen: set[bytes] = set()
    rows: list[np.ndarray] = []
    labels: list[int] = []
    attempts = 0
    with tqdm(total=total, desc="listops", unit="tree", leave=False, mininterval=1.0) as progress:
        while len(rows) < total:
            if attempts >= max_attempts:
                raise RuntimeError(
                    f"ListOps: only {len(rows)} of {total} unique trees with {min_length} <= length <= {max_length} "
                    f"after {attempts} draws; widen the length range or lower the split sizes."
                )
            attempts += 1
            drawn = sampler.sample(max_length)
            if drawn is None or len(drawn[0]) < min_length:
                continue
            tokens = np.asarray(drawn[0], dtype=np.uint8)
            key = tokens.tobytes()
            if key in seen:
                continue
            seen.add(key)
            rows.append(tokens)
            labels.append(drawn[1])
            progress.update(1)

    class_names = [str(d) for d in range(NUM_CLASSES)]
    splits, start = {}, 0
    for name, size in split_sizes(num_train, num_validation, num_test).items():
        part, part_labels = rows[start : start + size], labels[start : start + size]
        splits[name] = classification_split("input_ids", part, part_labels, class_names, np.uint8)
        start += size
    return DatasetDict(splits)


def listops(
    seed: int = 0,
    cache_dir=None,
    *,
    num_train: int = DEFAULTS["num_train"],
    num_validation: int = DEFAULTS["num_validation"],
    num_test: int = DEFAULTS["num_test"],
    min_length: int = DEFAULTS["min_length"],
    max_length: int = DEFAULTS["max_length"],
    max_depth: int = 10,
    max_args: int = 10,
    leaf_probability: float = 0.75,
):
    """ListOps as a `DatasetDict` ("train", "validation", "test"), cached (see `longvq.tasks.common`).

    Columns: `input_ids` (variable length in [min_length, max_length], ids from `VOCAB`), `label` (0-9), `length`.
    LRA sizes: `listops(**LRA_LISTOPS)` (about 2 minutes on one core: ~1,000 accepted trees per second).
    """
    check_split_sizes(num_train, num_validation, num_test)
    check_positive(min_length=min_length, max_length=max_length, max_depth=max_depth, max_args=max_args)
    if max_length < min_length:
        raise ValueError(f"`max_length` ({max_length}) must be >= `min_length` ({min_length}).")
    if max_args < 2:
        raise ValueError(f"`max_args` must be >= 2, got {max_args}.")
    check_fraction("leaf_probability", leaf_probability)
    arguments = {
        "seed": seed,
        "num_train": num_train,
        "num_validation": num_validation,
        "num_test": num_test,
        "min_length": min_length,
        "max_length": max_length,
        "max_depth": max_depth,
        "max_args": max_args,
        "leaf_probability": leaf_probability,
    }
    return cached("listops", arguments, cache_dir, lambda: generate_listops(**arguments))
