"""Every CSV medseg writes escapes cells against formula injection (OWASP: a leading
= + - @ tab or CR gets a single quote), and numbers, negative ones included, stay numbers."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medseg.batch.state import StudyRow
from medseg.batch.summary import write_summary
from medseg.errors import OutputError
from medseg.evaluate import CohortAccumulator, label_metrics
from medseg.report import study_report, write_cohort_report, write_study_report
from medseg.report._csv import csv_cell, csv_text
from tests.report.test_reports import _study

EVIL = ["=HYPERLINK(\"http://x\",\"a\")", "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A2)",
        "\t=1", "\r=1"]


@pytest.mark.parametrize("text", [*EVIL, "=", "-", "-inf", "- 5", "-1e5x"])
def test_formula_cells_are_prefixed(text: str) -> None:
    assert csv_cell(text) == "'" + text


@pytest.mark.parametrize("value", ["study-1", "", "a=b", " =1", "'=1", "-850.5", "+3", "1e-3",
                                   "-.5", "-7", -850.5, -7, 0.0, float("-inf"), None, True])
def test_other_cells_are_unchanged(value: Any) -> None:
    assert csv_cell(value) is value


def test_csv_text_round_trip_and_unknown_keys() -> None:
    rows = [{"id": "=1+1", "hu": -850.5, "n": -3}, {"id": "ok", "note": "@x"}]
    back = list(csv.DictReader(csv_text(rows).splitlines()))
    assert back == [{"id": "'=1+1", "hu": "-850.5", "n": "-3", "note": ""},
                    {"id": "ok", "hu": "", "n": "", "note": "'@x"}]
    assert float(back[0]["hu"]) == -850.5
    with pytest.raises(OutputError, match="not columns"):
        csv_text(rows, ["id"])


@pytest.mark.parametrize("study_id", EVIL)
def test_report_csv_escapes_the_study_id(study_id: str, tmp_path: Path) -> None:
    image, labels = _study()
    shifted = labels.with_array(np.roll(labels.array, 2, axis=2))
    rep = study_report(image, labels, study_id=study_id, reference=shifted)
    path = write_study_report(rep, image, labels, tmp_path)["report.csv"]
    with open(path, newline="") as fh:  # a CR inside a quoted cell stays a CR
        (row,) = csv.DictReader(fh)
    assert row["study_id"] == "'" + study_id
    assert float(row["lung_mld_hu"]) < -800  # negative HU: a number, not prefixed
    assert float(row["right_volume_diff_ml"]) == pytest.approx(
        rep["metrics"]["right"]["volume_diff_ml"])


def test_cohort_csvs_escape_case_ids_and_notes(tmp_path: Path) -> None:
    _, labels = _study()
    acc = CohortAccumulator(n_bootstrap=10)
    ref = labels.array
    for i, cid in enumerate(EVIL[:4]):
        acc.add(cid, label_metrics(np.roll(ref, i, axis=2), ref, (1.0, 0.8, 0.8)))
    paths = write_cohort_report(acc, tmp_path, notes={EVIL[0]: "-bad note"})
    rows = list(csv.DictReader(paths["cases_csv"].read_text().splitlines()))
    assert {r["case_id"] for r in rows} == {"'" + c for c in EVIL[:4]}
    assert {r["note"] for r in rows if r["case_id"] == "'" + EVIL[0]} == {"'-bad note"}
    assert all(not r["case_id"].startswith(("=", "+", "-", "@")) for r in rows)
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    text = paths["summary_csv"].read_text()
    assert "\n=" not in text and ",=" not in text


def test_batch_summary_escapes_study_ids_and_messages(tmp_path: Path) -> None:
    rows = [
        StudyRow(study_id="=cmd|' /C calc'!A0", source="@src", reference=None, params="",
                 status="done", attempts=1,
                 result={"volumes_ml": {"right": 1200.5, "left": 1100.0, "total": 2300.5},
                         "dice": {"lung": 0.97}, "warnings": ["-warning"]}),
        StudyRow(study_id="+s2", source="s2", reference=None, params="", status="failed",
                 attempts=2, error_type="InputError", error_message="=HYPERLINK(1)",
                 seconds=-0.0),
    ]
    path = write_summary(tmp_path, rows)
    got = {r["study_id"]: r for r in csv.DictReader(path.read_text().splitlines())}
    assert set(got) == {"'=cmd|' /C calc'!A0", "'+s2"}
    done = got["'=cmd|' /C calc'!A0"]
    assert done["source"] == "'@src" and done["warnings"] == "'-warning"
    assert float(done["right_ml"]) == 1200.5 and float(done["lung_dice"]) == 0.97
    assert got["'+s2"]["error_message"] == "'=HYPERLINK(1)"
    assert got["'+s2"]["seconds"] == "-0.0"  # a number, not escaped


def test_csv_text_matches_the_csv_module_on_safe_cells() -> None:
    import io

    rows = [{"a": 1.25, "b": float("inf"), "c": True, "d": None, "e": 'x, "y"', "f": "a\nb"},
            {"a": np.float64(-0.5), "b": -3, "c": "plain", "d": "", "e": "", "f": ""}]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    assert csv_text(rows) == buf.getvalue()
