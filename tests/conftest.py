"""Shared fixtures and environment for the test tiers (unit / service / e2e / gpu)."""

from __future__ import annotations

import os

import pytest
import torch

# Offline, quiet, token auth off for the local clusters that tests start (ENVIRONMENT.md s2).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)
