"""Local data for the tiny lm-evaluation-harness tasks of tests/test_lm_eval.py: JSON-lines files next to this module,
read without any download (the task YAMLs name `load` as their `custom_dataset` and the file in `dataset_kwargs`)."""

import json
from pathlib import Path

import datasets


def load(file: str, **metadata) -> datasets.DatasetDict:
    """The rows of the JSON-lines `file` (next to this module) as a `test` split; `metadata` (model arguments that
    lm-evaluation-harness passes to every custom dataset) is not needed."""
    lines = Path(__file__).with_name(file).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
