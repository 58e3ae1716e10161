"""The state database and what a second run does with it: skip verified studies, redo
tampered ones, retry failures up to the limit, recover from a killed run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import medseg.segment
from medseg.batch import StateDB, run_batch
from medseg.batch.state import checksum_folder, verify_outputs
from medseg.errors import OutputError
from tests.batch.conftest import (
    assert_nothing_partial,
    db_rows,
    study_dirs,
    threshold_config,
)


def test_db_lifecycle(tmp_path: Path) -> None:
    with StateDB(tmp_path / "s.sqlite") as db:
        assert db.sync("a", "/src/a", None, "{}") == "new"
        assert db.sync("a", "/src/a", None, "{}") == "same"
        assert db.mark_running("a") == 1
        db.mark_done("a", {"x.txt": {"sha256": "00", "size": 1}}, started_at=None,
                     seconds=1.5, worker="h:1", model_loads=1, result={"k": 1})
        row = db.get("a")
        assert row is not None and row.status == "done" and row.attempts == 1
        assert row.outputs == {"x.txt": {"sha256": "00", "size": 1}} and row.result == {"k": 1}
        assert row.started_at and row.finished_at and row.seconds == 1.5
        # another source under the same id is a new study: pending, no attempts, no outputs
        assert db.sync("a", "/src/other", None, "{}") == "changed"
        row = db.get("a")
        assert row is not None and (row.status, row.attempts, row.outputs) == ("pending", 0, {})
        db.mark_running("a")
        assert db.recover_interrupted() == ["a"]
        row = db.get("a")
        assert row is not None and (row.status, row.error_type) == ("failed", "Interrupted")
        assert row.attempts == 1  # a killed attempt counts
        db.mark_running("a")
        db.release("a")  # Ctrl-C gives the attempt back
        row = db.get("a")
        assert row is not None and (row.status, row.attempts) == ("pending", 1)
    assert (tmp_path / "s.sqlite").exists()


def test_verify_outputs(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    rec = checksum_folder(tmp_path)
    assert verify_outputs(tmp_path, rec) is None
    (tmp_path / "a.txt").write_text("hellO")  # same size, other bytes
    assert "SHA-256 differs" in str(verify_outputs(tmp_path, rec))
    (tmp_path / "a.txt").write_text("hello!")
    assert "changed size" in str(verify_outputs(tmp_path, rec))
    (tmp_path / "a.txt").unlink()
    assert "missing" in str(verify_outputs(tmp_path, rec))
    assert verify_outputs(tmp_path, {}) == "no outputs recorded"


def test_second_run_skips_verified_and_redoes_tampered(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = run_batch(threshold_config(cohort, out))
    assert sorted(first.processed) == ["broken", "p1", "p2"]
    assert [r.study_id for r in first.failed] == ["broken"]
    assert study_dirs(out) == {"p1", "p2"}
    recorded = db_rows(out)
    lungs = out / "p2" / "lungs.nii.gz"
    data = bytearray(lungs.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte changed
    lungs.write_bytes(bytes(data))
    notes: list[str] = []
    second = run_batch(threshold_config(cohort, out), log=notes.append)
    assert second.skipped == ["p1"]
    assert sorted(second.processed) == ["broken", "p2"]  # broken: its second attempt
    assert any("p2" in n and "SHA-256 differs" in n for n in notes)
    rows = db_rows(out)
    assert rows["p1"]["finished_at"] == recorded["p1"]["finished_at"]  # untouched
    assert rows["p2"]["status"] == "done" and rows["p2"]["attempts"] == 1
    assert rows["broken"]["attempts"] == 2
    with StateDB(out / "batch.sqlite") as db:
        for sid in ("p1", "p2"):
            row = db.get(sid)
            assert row is not None and verify_outputs(out / sid, row.outputs) is None
    assert_nothing_partial(out, {"broken"})


def test_failed_study_is_retried_up_to_max_attempts(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for attempt in (1, 2):
        run_batch(threshold_config(cohort, out))
        row = db_rows(out)["broken"]
        assert (row["status"], row["attempts"]) == ("failed", attempt)
        assert row["error_type"] == "PixelDataError" and "truncated" in row["error_message"]
        assert row["traceback"] is None  # an expected medseg error: its message says it all
    third = run_batch(threshold_config(cohort, out))
    assert third.processed == [] and third.exhausted == ["broken"]
    assert db_rows(out)["broken"]["attempts"] == 2
    assert [r.study_id for r in third.failed] == ["broken"]
    # a higher limit gives it one more try
    fourth = run_batch(threshold_config(cohort, out, max_attempts=3))
    assert fourth.processed == ["broken"] and db_rows(out)["broken"]["attempts"] == 3
    assert_nothing_partial(out, {"broken"})
    # the summary keeps the failure and its reason
    summary = (out / "summary.csv").read_text()
    assert "broken,failed,,,3," in summary and "PixelDataError" in summary


def test_unexpected_error_is_retried_at_once_and_keeps_a_traceback(
        cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = medseg.segment.segment_study
    calls: dict[str, int] = {}

    def flaky(input_path: str, out_dir: Path, **kw: Any) -> Any:
        name = Path(input_path).name
        calls[name] = calls.get(name, 0) + 1
        if name == "p1" and calls[name] == 1:
            raise RuntimeError("transient failure")
        if name == "p2":
            raise KeyError("always")
        return real(input_path, out_dir, **kw)

    monkeypatch.setattr(medseg.segment, "segment_study", flaky)
    out = tmp_path / "out"
    result = run_batch(threshold_config(cohort, out))
    rows = db_rows(out)
    assert (rows["p1"]["status"], rows["p1"]["attempts"]) == ("done", 2)
    assert (rows["p2"]["status"], rows["p2"]["attempts"]) == ("failed", 2)
    assert rows["p2"]["error_type"] == "KeyError"
    assert str(cohort / "p2") in rows["p2"]["error_message"]
    assert "Traceback" in rows["p2"]["traceback"] and "flaky" in rows["p2"]["traceback"]
    # an input error is not retried within the run
    assert rows["broken"]["attempts"] == 1 and calls["broken"] == 1
    assert {r.study_id for r in result.failed} == {"p2", "broken"}
    assert_nothing_partial(out, {"p2", "broken"})


def test_killed_run_leftovers_are_cleaned(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_batch(threshold_config(cohort, out))
    # what a run killed in the middle leaves: a study "running", its staging folder, and
    # (killed between the rename and the database update) an unrecorded output folder
    with StateDB(out / "batch.sqlite") as db:
        db.sync("p1", str(cohort / "p1"), None, db.get("p1").params)  # type: ignore[union-attr]
        db.reset("p1", "simulated")
        db.mark_running("p1")
    (out / ".staging" / "p1-deadbeef").mkdir(parents=True)
    (out / ".staging" / "p1-deadbeef" / "lungs.nii.gz").write_bytes(b"partial")
    notes: list[str] = []
    result = run_batch(threshold_config(cohort, out), log=notes.append)
    assert result.interrupted == ["p1"]
    assert "p1" in result.processed
    assert any("staging" in n for n in notes)
    assert db_rows(out)["p1"]["status"] == "done"
    assert_nothing_partial(out, {"broken"})


def test_changed_parameters_redo_the_study(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_batch(threshold_config(cohort, out))
    result = run_batch(threshold_config(cohort, out, show_phi=True))
    assert sorted(result.processed) == ["broken", "p1", "p2"]
    assert result.skipped == []


def test_one_run_per_output_folder(cohort: Path, tmp_path: Path) -> None:
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / "batch.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OutputError, match="another 'medseg batch'"):
            run_batch(threshold_config(cohort, out))


def test_a_folder_that_is_not_a_study_output_is_never_deleted(cohort: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "p1").mkdir(parents=True)
    (out / "p1" / "precious.dcm").write_bytes(b"user data")
    with pytest.raises(OutputError, match="not medseg outputs"):
        run_batch(threshold_config(cohort, out))
    assert (out / "p1" / "precious.dcm").read_bytes() == b"user data"


def test_ctrl_c_gives_the_attempt_back(cohort: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real = medseg.segment.segment_study

    def interrupted(input_path: str, out_dir: Path, **kw: Any) -> Any:
        if Path(input_path).name == "p1":
            raise KeyboardInterrupt
        return real(input_path, out_dir, **kw)

    monkeypatch.setattr(medseg.segment, "segment_study", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_batch(threshold_config(cohort, out))
    rows = db_rows(out)
    assert (rows["p1"]["status"], rows["p1"]["attempts"]) == ("pending", 0)
    assert not any((out / ".staging").iterdir())
    assert "p1" not in study_dirs(out)
