"""``medseg batch`` end to end: a ten-study cohort with two broken studies on a local Dask
cluster (U-Net, model loaded once per worker), the pipeline file, the command line."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import medseg
from medseg.batch import Progress
from medseg.batch_cli import _BatchProgress, config_from_yaml
from medseg.cli import main
from medseg.errors import ConfigError
from tests.batch.conftest import (
    assert_nothing_partial,
    db_rows,
    set_modality,
    study_dirs,
    truncate_series,
)
from tests.conftest import REPO_ROOT, need

STUDY_FILES = {"lungs.nii.gz", "segment.json", "report.json", "report.html", "report.csv"}
DICOM_FILES = {"lungs.seg.dcm", "lungs.sr.dcm"}  # DICOM studies also get a SEG and an SR


def expected_files(study: Path) -> set[str]:
    """What 'medseg segment' writes for this study: the DICOM outputs for DICOM input only."""
    fmt = json.loads((study / "segment.json").read_text())["input"]["format"]
    return STUDY_FILES | DICOM_FILES if fmt == "dicom" else STUDY_FILES


@pytest.mark.slow
@pytest.mark.shared_data
def test_cohort_of_ten_with_two_broken_on_two_workers(
        tmp_path: Path, shared_data: Path, make_phantom: Callable[..., Path],
        phantom_pool: Callable[[int], Path], capsys: pytest.CaptureFixture[str]) -> None:
    src, refs, out = tmp_path / "cohort", tmp_path / "refs", tmp_path / "out"
    # six phantoms in every layout the folder rule knows
    make_phantom(src / "phantom dicom 1", 1)
    make_phantom(src / "phantom_2", 2, "study")  # dicom/ + image.nii.gz + labels.nii.gz
    make_phantom(src / "phantom_3.nii.gz", 3, "image")
    medseg.save(medseg.load(make_phantom(tmp_path / "p4.nii.gz", 4, "image")),
                src / "phantom_4.mha")
    make_phantom(src / "phantom_5", 5)
    make_phantom(src / "phantom_6", 6)
    # real data: the COPDGene study as a DICOM series and as NRRD
    shutil.copytree(need(shared_data, "cip-ct64/ct-64Dicom"), src / "cip_dicom")
    shutil.copyfile(need(shared_data, "cip-ct64/ct-64.nrrd"), src / "cip_nrrd.nrrd")
    # broken: an interrupted copy, and an MR series
    truncate_series(make_phantom(src / "broken_truncated", 7))
    set_modality(make_phantom(src / "wrong_modality", 8), "MR")
    refs.mkdir()
    for seed, name in ((1, "phantom dicom 1"), (2, "phantom_2"), (3, "phantom_3"),
                       (8, "wrong_modality")):
        shutil.copyfile(phantom_pool(seed) / "labels.nii.gz", refs / f"{name}.nii.gz")

    rc = main(["batch", str(src), "-o", str(out), "--workers", "2",
               "--reference-dir", str(refs)])
    captured = capsys.readouterr()
    assert rc == 1

    good = {"phantom_dicom_1", "phantom_2", "phantom_3", "phantom_4", "phantom_5",
            "phantom_6", "cip_dicom", "cip_nrrd"}
    bad = {"broken_truncated", "wrong_modality"}
    rows = db_rows(out)
    assert set(rows) == good | bad
    assert {k for k, r in rows.items() if r["status"] == "done"} == good
    assert rows["broken_truncated"]["error_type"] == "PixelDataError"
    assert "truncated" in rows["broken_truncated"]["error_message"]
    assert str(src / "broken_truncated") in rows["broken_truncated"]["error_message"]
    assert rows["wrong_modality"]["error_type"] == "ModalityError"
    assert "modality is MR" in rows["wrong_modality"]["error_message"]
    assert all(rows[k]["attempts"] == 1 for k in bad)  # input errors: no retry in the run

    # every finished study has what 'medseg segment' writes; nothing partial anywhere
    assert study_dirs(out) == good
    for sid in good:
        assert {p.name for p in (out / sid).iterdir()} == expected_files(out / sid)
        assert json.loads((out / sid / "report.json").read_text())["study_id"] == sid
    assert expected_files(out / "cip_dicom") == STUDY_FILES | DICOM_FILES
    assert expected_files(out / "cip_nrrd") == STUDY_FILES
    assert_nothing_partial(out, bad)

    # the model was loaded once per worker process, in two processes other than this one
    workers = {rows[k]["worker"] for k in good}
    assert 1 <= len(workers) <= 2
    assert all(not w.endswith(f":{os.getpid()}") for w in workers)
    assert all(rows[k]["model_loads"] == 1 for k in good)

    # summary: every study, failures with their reason
    with open(out / "summary.csv", newline="") as fh:
        summary = {r["study_id"]: r for r in csv.DictReader(fh)}
    assert set(summary) == good | bad
    assert summary["wrong_modality"]["error_type"] == "ModalityError"
    assert summary["wrong_modality"]["error_kind"] == "input"  # the study, not the machine
    assert summary["broken_truncated"]["status"] == "failed"
    assert float(summary["phantom_2"]["total_ml"]) > 0
    # every segmented study has its QC verdict, failed ones none; failures are listed first
    assert all(summary[k]["qc_verdict"] in ("ok", "review") for k in good)
    assert all(summary[k]["qc_verdict"] == "" for k in bad)
    order = list(summary)
    assert set(order[:len(bad)]) == bad
    assert summary["phantom_2"]["lung_dice"] != "" and summary["cip_dicom"]["lung_dice"] == ""
    assert "10 studies" in captured.out and "8 done" in captured.out
    assert "2 failed" in captured.out and "Dice vs reference" in captured.out
    assert "2 of 10 studies failed" in captured.err
    assert "broken_truncated" in captured.err and "ModalityError" in captured.err

    # the cohort validation counts the failed study with a reference as a missed lung
    with open(out / "validation" / "cohort_cases.csv", newline="") as fh:
        cases = list(csv.DictReader(fh))
    by_case = {(r["case_id"], r["label"]): r for r in cases}
    assert {c for c, _ in by_case} == {"phantom_dicom_1", "phantom_2", "phantom_3",
                                       "wrong_modality"}
    assert float(by_case[("wrong_modality", "lung")]["dice"]) == 0.0
    assert "ModalityError" in by_case[("wrong_modality", "lung")]["note"]
    assert (out / "validation" / "cohort.html").is_file()


def test_pipeline_file_runs_the_sample(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    shipped = REPO_ROOT / "pipelines" / "batch_lung.yaml"
    text = shipped.read_text()
    assert text.startswith("#") and "job: batch" in text
    cfg = config_from_yaml(shipped)
    assert cfg.source == "pipelines/sample_manifest.csv" and cfg.method == "unet"
    data = yaml.safe_load(text)
    data.update(source=str(REPO_ROOT / data["source"]), out_dir=str(tmp_path / "out"))
    local = tmp_path / "batch.yaml"
    local.write_text(yaml.safe_dump(data))
    assert main(["run", str(local), "-q"]) == 0
    out = tmp_path / "out"
    assert {p.name for p in (out / "phantom_000").iterdir()} == STUDY_FILES | DICOM_FILES
    report = json.loads((out / "phantom_000" / "report.json").read_text())
    assert report["metrics"] is not None  # the manifest's reference was used
    assert (out / "validation" / "cohort.html").is_file()
    assert capsys.readouterr().out == ""  # -q


@pytest.mark.parametrize(("change", "message"), [
    ({"wokers": 2}, "unknown key 'wokers' \\(did you mean 'workers'\\?\\)"),
    ({"workers": "two"}, "workers must be an integer"),
    ({"workers": 2, "scheduler": "tcp://127.0.0.1:8786"}, "workers or scheduler"),
    ({"method": "magic"}, "method must be one of"),
    ({"max_attempts": 0}, "max_attempts must be at least 1"),
    ({"job": "train"}, "expected 'job: batch'"),
])
def test_pipeline_file_is_validated(tmp_path: Path, change: dict[str, object],
                                    message: str) -> None:
    data = yaml.safe_load((REPO_ROOT / "pipelines" / "batch_lung.yaml").read_text())
    data.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message) as exc:
        config_from_yaml(path)
    assert str(path) in str(exc.value)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["batch", str(tmp_path / "nope"), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("medseg: error: ") and "nope" in err and len(err.splitlines()) == 1
    assert main(["batch", str(tmp_path), "-o", str(tmp_path / "out"), "--workers", "2",
                 "--scheduler", "tcp://127.0.0.1:1"]) == 1
    assert "workers or scheduler" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["batch", str(tmp_path), "-o", str(tmp_path / "out"), "--workers", "0"])
    assert exc.value.code == 2


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["batch", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--workers", "--scheduler", "--reference-dir", "--max-attempts",
                   "--show-phi", "manifest"):
        assert option in out


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_only() -> None:
    tty = _Tty()
    bar = _BatchProgress(True, tty)
    bar(Progress(total=4, done=1, failed=0, started=1))
    bar(Progress(total=4, done=2, failed=1, started=1))
    bar.note("something")
    bar(Progress(total=4, done=3, failed=1, started=1))
    text = tty.getvalue()
    assert "3/4 done, 1 failed" in text and "ETA" in text and "medseg: note: something" in text
    assert text.endswith("\n")
    for enabled, stream in ((False, _Tty()), (True, io.StringIO())):
        quiet = _BatchProgress(enabled, stream)
        quiet(Progress(total=2, done=1, failed=0, started=0))
        assert stream.getvalue() == ""
