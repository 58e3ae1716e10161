"""Under ``CI=true`` a missing prerequisite (the shared data, a tool) fails the test; on a
user's machine it skips with the reason. Runs tests/ci_probe.py in a subprocess with
``MEDSEG_SHARED_DATA`` pointing at a folder that does not exist."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


def _run_probe(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["MEDSEG_SHARED_DATA"] = str(tmp_path / "renamed-shared-data")
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
         str(REPO_ROOT / "tests" / "ci_probe.py")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_missing_prerequisites_fail_under_ci(tmp_path: Path) -> None:
    proc = _run_probe(tmp_path, ci=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 failed, 1 error" in out  # the fixture errors, the helper fails
    assert "CI must have the shared data" in out
    assert "CI must have the medseg-no-such-tool executable" in out


@pytest.mark.slow
def test_missing_prerequisites_skip_elsewhere(tmp_path: Path) -> None:
    proc = _run_probe(tmp_path, ci=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "2 skipped" in out
    assert "shared data not found" in out
