"""Shared fixtures and markers. Everything runs on the CPU unless marked `gpu`."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait for the hub: weights come from local files
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# Official-model fixtures and key lists (copied from the team's shared/reference).
REFERENCE = Path(__file__).resolve().parent / "reference"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE
