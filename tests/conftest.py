"""Fixtures shared by several test files."""
from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config):
    """The marker of tests that start processes (deselect them with -m "not slow")."""
    config.addinivalue_line("markers", "slow: starts processes; seconds to minutes")


@pytest.fixture(scope="session")
def generated(tmp_path_factory) -> Path:
    """A tiny generated dataset: 3 classes, 8 training and 5 validation JPEGs each, 48 px. Read-only."""
    from image_classification.data.generated import generate_dataset
    return generate_dataset(tmp_path_factory.mktemp("generated"), num_classes=3, train_per_class=8, val_per_class=5,
                            image_size=48, seed=0)
