"""`batch` tells a bad study (input: spends attempts) from a failing machine (full disk,
no permission, out of memory: spends none, retried by the next run), records the kind and
says which is which in its summary."""

from __future__ import annotations

import errno
import gzip
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from medseg.batch import StateDB, run_batch
from medseg.batch.runner import StudyTask, _lost_task, failure_kind
from medseg.batch_cli import run
from medseg.errors import (
    ConfigError,
    NotFoundError,
    OutputError,
    PacsConnectionError,
    PacsNotFoundError,
    PixelDataError,
)
from medseg.io.atomic import is_partial_of
from medseg.io.dicom_seg import SEG_FILENAME
from tests.batch.conftest import (
    assert_nothing_partial,
    db_rows,
    study_dirs,
    threshold_config,
)
from tests.conftest import need, small_tmpfs


def _from(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(("exc", "kind"), [
    (NotFoundError("no such folder", path="/x"), "input"),
    (PixelDataError("truncated", path="/x"), "input"),
    (ConfigError("bad"), "input"),
    (OutputError("highdicom refused to build the DICOM SEG"), "input"),  # made of the study
    (PacsNotFoundError("unknown study", url="http://pacs"), "input"),
    (OSError(errno.ENOSPC, "No space left on device"), "machine"),
    (PermissionError(errno.EACCES, "Permission denied"), "machine"),
    (MemoryError(), "machine"),
    (_from(OutputError("cannot write: No space left on device", path="/o/lungs.nii.gz"),
           OSError(errno.ENOSPC, "No space left on device")), "machine"),
    (_from(OutputError("cannot write", path="/o"), PermissionError(errno.EROFS, "ro")),
     "machine"),
    (PacsConnectionError("refused", url="http://pacs"), "machine"),
    (gzip.BadGzipFile("Not a gzipped file"), "unexpected"),  # an OSError about the data
    (KeyError("x"), "unexpected"),
])
def test_failure_kind(exc: BaseException, kind: str) -> None:
    assert failure_kind(exc) == kind


def test_a_lost_worker_is_a_machine_failure(tmp_path: Path) -> None:
    task = StudyTask(study_id="s", source="/src/s", reference=None, staging=str(tmp_path),
                     method="threshold", model=None, threads=None, show_phi=False)
    res = _lost_task(task, RuntimeError("KilledWorker"))
    assert (res["error_kind"], res["retryable"]) == ("machine", True)


def test_a_machine_failure_gives_its_attempt_back(tmp_path: Path) -> None:
    with StateDB(tmp_path / "s.sqlite") as db:
        db.sync("a", "/src/a", None, "{}")
        for _ in range(3):
            db.mark_running("a")
            db.mark_failed("a", "OutputError", "no space", error_kind="machine",
                           spend_attempt=False)
        row = db.get("a")
        assert row is not None and (row.status, row.attempts, row.error_kind) == \
            ("failed", 0, "machine")
        db.mark_running("a")
        db.mark_failed("a", "PixelDataError", "truncated", error_kind="input")
        row = db.get("a")
        assert row is not None and (row.attempts, row.error_kind) == (1, "input")
        with pytest.raises(ValueError, match="error_kind must be one of"):
            db.mark_failed("a", "X", "y", error_kind="cosmic rays")
        db.mark_running("a")
        assert db.recover_interrupted() == ["a"]
        row = db.get("a")
        assert row is not None and (row.attempts, row.error_kind) == (2, "interrupted")


def test_a_version_1_database_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with StateDB(path) as db:
        db.sync("a", "/src/a", None, "{}")
        db.mark_running("a")
        db.mark_failed("a", "PixelDataError", "truncated")
    conn = sqlite3.connect(path)  # what medseg 0.x with schema 1 left
    conn.execute("ALTER TABLE studies DROP COLUMN error_kind")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with StateDB(path) as db:
        row = db.get("a")
        assert row is not None and (row.status, row.attempts, row.error_kind) == \
            ("failed", 1, None)
        db.mark_running("a")
        db.mark_failed("a", "OSError", "no space", error_kind="machine", spend_attempt=False)
        row = db.get("a")
        assert row is not None and (row.attempts, row.error_kind) == (1, "machine")
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() \
        == ("2",)
    conn.close()


def _disk_full_for(study: str, calls: list[str]) -> Callable[..., Any]:
    """``Path.write_bytes`` that fails with ENOSPC on ``study``'s DICOM SEG."""
    real = Path.write_bytes

    def write_bytes(self: Path, data: Any) -> int:
        if is_partial_of(self.name, SEG_FILENAME) and f"/.staging/{study}-" in str(self):
            calls.append(study)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    return write_bytes


def test_a_full_disk_spends_no_attempt_and_a_resume_retries_it(
        cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """ENOSPC simulated in the SEG writer of one study (runs without root; a real full disk
    is below): it is a machine failure, retried within the run, never out of attempts, and
    done by the run after space is freed; the broken study is an input failure."""
    out = tmp_path / "out"
    calls: list[str] = []
    monkeypatch.setattr(Path, "write_bytes", _disk_full_for("p1", calls))
    for n in (1, 2, 3):  # however often the disk is full, p1 keeps its attempts
        assert run(threshold_config(cohort, out)) == 1
        rows = db_rows(out)
        assert (rows["p1"]["status"], rows["p1"]["error_kind"], rows["p1"]["attempts"]) == \
            ("failed", "machine", 0)
        assert "No space left on device" in rows["p1"]["error_message"]
        assert len(calls) == 2 * n  # tried twice in each run (max_attempts 2)
        assert (rows["broken"]["error_kind"], rows["broken"]["attempts"]) == \
            ("input", min(n, 2))
        assert_nothing_partial(out, {"p1", "broken"})
    printed = capsys.readouterr()
    assert "2 failed (1 input, 1 machine)" in printed.out
    err = printed.err  # the three runs' failure tables; the last run's rows come last
    p1_line = [line for line in err.splitlines() if line.strip().startswith("p1 ")][-1]
    assert "0/2" in p1_line and " machine " in p1_line and "OutputError" in p1_line
    broken_line = [line for line in err.splitlines() if line.strip().startswith("broken ")][-1]
    assert "2/2" in broken_line and " input " in broken_line
    assert "No attempt was used" in err and "Fix the input" in err

    monkeypatch.undo()  # space freed
    result = run_batch(threshold_config(cohort, out))
    assert result.processed == ["p1"]  # broken is out of attempts, p1 is not
    rows = db_rows(out)
    assert (rows["p1"]["status"], rows["p1"]["error_kind"]) == ("done", None)
    assert study_dirs(out) == {"p1", "p2"}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs, unmounted afterwards."""
    with small_tmpfs(tmp_path / "disk", "2m",
                     "test_a_full_disk_spends_no_attempt_and_a_resume_retries_it covers the "
                     "logic with a simulated ENOSPC") as mnt:
        yield mnt


@pytest.mark.shared_data
def test_a_real_full_disk_then_resume(shared_data: Path, tmp_path: Path,
                                      small_disk: Path) -> None:
    """The output folder on a 2 MB tmpfs, 1.5 MB of it taken: cip-ct64's outputs (about
    700 kB) do not fit. The study fails as a machine failure with nothing partial left;
    once the space is freed, the same command does it."""
    cip = need(shared_data, "cip-ct64/ct-64Dicom")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"study_id,path\ncip,{cip}\n")
    out = small_disk / "out"
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 1_500_000)
    cfg = threshold_config(manifest, out, max_attempts=1)
    first = run_batch(cfg)
    (row,) = first.rows
    assert (row.status, row.error_kind, row.attempts) == ("failed", "machine", 0)
    assert "No space left on device" in str(row.error_message)
    assert_nothing_partial(out, {"cip"})
    assert study_dirs(out) == set()
    filler.unlink()  # space freed
    second = run_batch(cfg)  # even with --max-attempts 1: the machine's failure used none
    assert second.processed == ["cip"] and second.exhausted == []
    (row,) = second.rows
    assert (row.status, row.attempts) == ("done", 1)
    assert study_dirs(out) == {"cip"}
