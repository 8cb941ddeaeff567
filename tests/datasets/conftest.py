"""Fixtures for dataset tests: small generated shapes datasets in Roboflow's COCO layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.datasets.demo import ShapesSpec, write_shapes_dataset

SMALL_SPEC = ShapesSpec(splits=(("train", 6), ("valid", 3)), min_size=64, max_size=96)


@pytest.fixture
def shapes_root(tmp_path: Path) -> Path:
    """A fresh, valid dataset (Roboflow layout, with the id-0 placeholder category)."""
    return write_shapes_dataset(tmp_path / "dataset", SMALL_SPEC)


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """Where sanitized annotation files go (deliberately outside the dataset root)."""
    return tmp_path / "prepared"
