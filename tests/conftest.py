"""Shared fixtures. Real data is found through one helper: ``MEDSEG_SHARED_DATA`` or
``../shared/data`` beside the repository; tests that need it are skipped when it is absent
(and fail under CI=true, where it must be present)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    return Path(os.environ.get("MEDSEG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_dir()
    if not root.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must have the shared data, not found at {root}")
        pytest.skip(f"shared data not found at {root} (set MEDSEG_SHARED_DATA)")
    return root


def need(root: Path, rel: str) -> Path:
    """A path under the shared data, or skip the test naming what is missing."""
    p = root / rel
    if not p.exists():
        pytest.skip(f"{p} not present")
    return p
