"""Shared test set-up: GPU tests skip cleanly on machines without CUDA; the helper modules of
this folder (``procs``) import from every sub-folder.

Tests are laid out like the package: tests/common, comm, launch, kernels, parallel, placement,
simulator, cli, integrations.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # procs.py and friends


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
