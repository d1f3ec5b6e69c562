"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The packed CIFAR-10 directory (train.npz, test.npz): $TDC_DATA_ROOT, else ../shared/data/cifar10.

    Required, never skipped: the data tests are meaningless without real data.
    """
    env = os.environ.get("TDC_DATA_ROOT")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
    missing = [f for f in ("train.npz", "test.npz") if not (root / f).is_file()]
    if missing:
        pytest.fail(
            f"packed CIFAR-10 data is required but {missing} not found in {root}; "
            "set TDC_DATA_ROOT to a directory holding train.npz and test.npz "
            "(layout: shared/data/cifar10/README.md)",
            pytrace=False,
        )
    return root
