"""Shared test set-up: GPU tests skip cleanly on machines without CUDA; the helper modules of
this folder (``procs``) import from every sub-folder; the checkout root is taken off ``sys.path``.

``python -m pytest`` puts the working directory (the checkout root) first on ``sys.path``. An
``import kernels`` is handed back to the installed package anyway (``tokenloom.common.shadow``),
but ``importlib.util.find_spec("kernels")``, which libraries use to ask whether a package is
installed, would still answer with our folder. tokenloom itself is installed (editable), so the
tests need nothing from the root: dropping it makes every lookup see what an installed user sees.

Tests are laid out like the package: tests/common, comm, launch, kernels, parallel, placement,
simulator, cli, integrations.
"""

import sys
from pathlib import Path

import pytest
import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # procs.py and friends


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
