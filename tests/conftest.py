"""Shared pytest fixtures: where the real data lives, and a skip when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (run beside ../shared)")
    return path


@pytest.fixture(scope="session")
def nih_dev_dir() -> Path:
    """../shared/data/nih_bbox_dev (438 NIH PNGs, 491 boxes)."""
    return _require(SHARED_DATA / "nih_bbox_dev")


@pytest.fixture(scope="session")
def nih_unboxed_dir() -> Path:
    """../shared/data/nih_unboxed (22 NIH PNGs without boxes)."""
    return _require(SHARED_DATA / "nih_unboxed")


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    """../shared/data/dicom (5 real chest DICOMs)."""
    return _require(SHARED_DATA / "dicom")
