"""Fixtures of the batch tests: small phantom studies (generated once per session, copied
into each test's folder), broken studies, and helpers to read the state database."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from medseg.batch import BatchConfig


@pytest.fixture
def make_phantom(phantom_pool: Callable[[int], Path]) -> Callable[..., Path]:
    """``make_phantom(dest, seed, what="dicom"|"image"|"study")``: copy a pool phantom's
    DICOM folder, its NIfTI image, or its whole study folder to ``dest``."""

    def make(dest: Path, seed: int, what: str = "dicom") -> Path:
        src = phantom_pool(seed)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if what == "dicom":
            shutil.copytree(src / "dicom", dest)
        elif what == "image":
            shutil.copyfile(src / "image.nii.gz", dest)
        elif what == "study":
            shutil.copytree(src, dest)
        else:
            raise ValueError(what)
        return dest

    return make


def truncate_series(folder: Path) -> None:
    """Cut every file of a DICOM folder to half its size (an interrupted copy)."""
    for f in sorted(folder.iterdir()):
        os.truncate(f, f.stat().st_size // 2)


def set_modality(folder: Path, modality: str) -> None:
    """Rewrite the Modality tag of every file of a DICOM folder."""
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        ds.Modality = modality
        ds.save_as(f)


def db_rows(out_dir: Path) -> dict[str, dict[str, Any]]:
    """``{study_id: row}`` of ``OUT_DIR/batch.sqlite`` (read-only)."""
    conn = sqlite3.connect(f"file:{out_dir / 'batch.sqlite'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return {r["study_id"]: dict(r) for r in conn.execute("SELECT * FROM studies")}
    finally:
        conn.close()


def study_dirs(out_dir: Path) -> set[str]:
    """Names of the study output folders (not hidden, not the validation report)."""
    return {p.name for p in out_dir.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name != "validation"}


def assert_nothing_partial(out_dir: Path, failed: set[str]) -> None:
    """No output folder for failed studies, no staging leftovers, no partial files."""
    assert not (failed & study_dirs(out_dir))
    staging = out_dir / ".staging"
    assert not staging.exists() or not any(staging.iterdir())
    assert not [p for p in out_dir.rglob("*partial*")]


def threshold_config(src: Path, out: Path, **kw: Any) -> BatchConfig:
    """A batch config for ``src`` -> ``out`` with the fast threshold method."""
    return BatchConfig(source=str(src), out_dir=str(out), method="threshold", **kw)


@pytest.fixture
def cohort(tmp_path: Path, make_phantom: Callable[..., Path]) -> Path:
    """Two good phantom studies (p1, p2) and one with a truncated slice (broken)."""
    src = tmp_path / "cohort"
    for seed in (1, 2):
        make_phantom(src / f"p{seed}", seed)
    truncate_series(make_phantom(src / "broken", 3))
    return src
