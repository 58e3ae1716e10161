"""Shared fixtures. Real data is found through one helper: ``MEDSEG_SHARED_DATA`` or
``../shared/data`` beside the repository; tests that need it are skipped when it is absent
(and fail under CI=true, where it must be present)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    return Path(os.environ.get("MEDSEG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_dir()
    if not root.is_dir():
        if in_ci():
            pytest.fail(f"CI must have the shared data, not found at {root}")
        pytest.skip(f"shared data not found at {root} (set MEDSEG_SHARED_DATA)")
    return root


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing(what: str) -> None:
    """Skip the test naming what is missing, or fail it under CI=true, where everything the
    tests need is installed by the project's own files (``.ci/``)."""
    if in_ci():
        pytest.fail(f"CI must have {what}")
    pytest.skip(f"{what} not present")


def need(root: Path, rel: str) -> Path:
    """A path under the shared data (skipped when absent, a failure under CI)."""
    p = root / rel
    if not p.exists():
        missing(str(p))
    return p


def need_tool(name: str) -> str:
    """An executable on PATH (skipped when absent, a failure under CI)."""
    path = shutil.which(name)
    if path is None:
        missing(f"the {name} executable")
        raise AssertionError  # unreachable: missing() skips or fails
    return path


@contextlib.contextmanager
def small_tmpfs(mnt: Path, size: str, why_skippable: str) -> Iterator[Path]:
    """A real full disk: a tmpfs of ``size`` (e.g. "1m") mounted on ``mnt``, unmounted
    afterwards. Mounting needs root (CAP_SYS_ADMIN); without it the test is skipped, naming
    ``why_skippable`` (the tests that cover the logic with a simulated ENOSPC)."""
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip(f"no mount command: cannot make a {size} tmpfs for the full-disk test")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"mounting a {size} tmpfs needs root (CAP_SYS_ADMIN): "
                    f"{proc.stderr.strip() or proc.returncode}; {why_skippable}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


#: Small phantoms: a whole chest in 24 x 64 x 64 voxels, about a second of U-Net on one core.
PHANTOM_SHAPE = (24, 64, 64)
PHANTOM_SPACING = (5.5, 5.5, 11.0)


@pytest.fixture(scope="session")
def phantom_pool(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """``pool(seed)``: the folder of a phantom study (``dicom/``, ``image.nii.gz``,
    ``labels.nii.gz``), written on first use and shared by the session: copy, never
    modify."""
    root = tmp_path_factory.mktemp("phantoms")

    def get(seed: int) -> Path:
        out = root / f"seed{seed}"
        if not out.exists():
            from medseg.synth import write_phantom_study

            write_phantom_study(out, seed=seed, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
        return out

    return get
