"""Shared pytest setup: offline Hugging Face libraries, a tiny-config factory and a fixed seed per test."""

import os

# Set at import, before any test module imports transformers/huggingface_hub: nothing may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import tiny_config as make_tiny_config  # noqa: E402


@pytest.fixture
def tiny_config():
    """Factory fixture: `tiny_config(**overrides)` returns a fresh tiny `LongVQConfig`."""
    return make_tiny_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (e.g. the 64K-token pass)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; skipped unless --runslow or -m slow is given")


def pytest_collection_modifyitems(config, items):
    # `python -m pytest -q tests` (CI) skips slow tests; `--runslow` or a -m expression naming them runs them.
    if config.getoption("--runslow") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
