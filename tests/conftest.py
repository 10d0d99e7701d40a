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
