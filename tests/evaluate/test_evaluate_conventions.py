"""`medseg evaluate` reads both maps through their label conventions: on the real cip-ct64
study (a medseg mask against its own wholeLung-64.nrrd and CIP lm-64.nrrd) and on cohorts
with binary, 255 and one-sided maps built at test time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import medseg
from medseg.cli import main
from medseg.errors import InputError
from medseg.evaluate import label_metrics
from medseg.report import study_report, write_study_report
from medseg.segment import segment_study
from medseg.validation import evaluate_cohort, evaluate_pair
from medseg.volume import CTVolume, Geometry
from tests.conftest import need


# -- cip-ct64: a medseg mask against the study's own references ---------------------------
@pytest.fixture(scope="module")
def cip(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = need(shared_data, "cip-ct64")
    out = tmp_path_factory.mktemp("cip")
    segment_study(root / "ct-64Dicom", out, method="unet", report=False, dicom_outputs=False)
    return {"pred": out / "lungs.nii.gz", "lm": root / "lm-64.nrrd",
            "whole": root / "wholeLung-64.nrrd"}


def _by_hand(pred_path: Path, lm_path: Path) -> dict[str, dict[str, float]]:
    """CIP's map converted by hand: regions 12-14 right, 9-11 left (any type)."""
    pred = medseg.load(pred_path)
    region = medseg.load(lm_path).array.astype(np.int64) % 256
    ref = np.zeros(region.shape, np.uint8)
    ref[(region >= 12) & (region <= 14)] = 1
    ref[(region >= 9) & (region <= 11)] = 2
    return label_metrics(pred.array, ref, pred.spacing[::-1])


def test_cip_label_map_is_refused_without_the_flag(
        cip: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(cip["pred"]), str(cip["lm"])]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(cip["lm"]) in err
    assert "0, 9, 10, 11, 12, 13, 14, 512" in err  # the values found
    assert "--ref-labels cip" in err


def test_cip_label_map_scores_both_lungs_with_the_flag(
        cip: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(cip["pred"]), str(cip["lm"]), "--ref-labels", "cip",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["labels"] == {"pred": "right=1,left=2", "ref": "cip"}
    m = out["metrics"]
    assert list(m) == ["right", "left", "lung"]
    expect = _by_hand(cip["pred"], cip["lm"])
    for side in expect:
        assert m[side] == pytest.approx(expect[side], rel=1e-9)
    for side in ("right", "left", "lung"):
        assert m[side]["dice"] > 0.95, (side, m[side])


def test_whole_lung_mask_scores_lung_with_a_note(
        cip: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(cip["pred"]), str(cip["whole"])]) == 0
    text = capsys.readouterr().out
    assert "(lung=1)" in text and "note: the reference holds only the values 0 and 1" in text
    assert "note: scored 'lung' (both lungs together) only" in text
    assert main(["evaluate", str(cip["pred"]), str(cip["whole"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["metrics"]) == ["lung"]
    # wholeLung-64 is lm-64's regions 9-14: the same lung score as the CIP map
    assert out["metrics"]["lung"] == pytest.approx(_by_hand(cip["pred"], cip["lm"])["lung"])
    assert out["metrics"]["lung"]["dice"] > 0.95
    assert main(["evaluate", str(cip["pred"]), str(cip["whole"]), "--ref-labels", "lung=1",
                 "--json"]) == 0
    explicit = json.loads(capsys.readouterr().out)
    assert explicit["metrics"] == out["metrics"] and len(explicit["notes"]) == 1


def test_cip_reference_in_the_study_report(cip: dict[str, Path], tmp_path: Path) -> None:
    pred = medseg.load(cip["pred"])
    with pytest.raises(InputError, match="reference_labels='cip'"):
        study_report(pred, pred, study_id="cip", reference=medseg.load(cip["lm"]))
    rep = study_report(pred, pred, study_id="cip", reference=medseg.load(cip["lm"]),
                       reference_labels="cip")
    assert rep["metrics"]["left"]["dice"] > 0.95
    rep = study_report(pred, pred, study_id="cip", reference=medseg.load(cip["whole"]))
    assert list(rep["metrics"]) == ["lung"]
    assert any(w.startswith("reference: the reference holds only") for w in rep["warnings"])
    paths = write_study_report(rep, pred, pred, tmp_path)  # the page renders lung only
    assert "Agreement with the reference" in paths["report.html"].read_text()
    assert "lung_dice" in paths["report.csv"].read_text()


# -- cohorts and the Python API on small maps ---------------------------------------------
def _labels(shift: int = 0) -> CTVolume:
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in (10, 32, 40)], indexing="ij")
    x = x - shift * 0.05
    right = ((x + 0.45) / 0.3) ** 2 + (y / 0.5) ** 2 + (z / 1.1) ** 2 < 1
    left = ((x - 0.45) / 0.3) ** 2 + (y / 0.5) ** 2 + (z / 1.1) ** 2 < 1
    return CTVolume((right * 1 + left * 2).astype(np.uint8),
                    Geometry(origin=(-20, -10, 5), spacing=(0.8, 0.8, 2.0)))


def test_pair_api_reports_conventions_and_notes(tmp_path: Path) -> None:
    lab = _labels()
    pred = medseg.save(_labels(1), tmp_path / "pred.nii.gz")
    ref = medseg.save(lab.with_array(np.where(lab.array > 0, 255, 0).astype(np.uint8)),
                      tmp_path / "ref.nrrd")
    with pytest.raises(InputError, match="ref_labels='lung=255'"):
        evaluate_pair(pred, ref)
    res = evaluate_pair(pred, ref, ref_labels="lung=255")
    assert res["labels"] == {"pred": "right=1,left=2", "ref": "lung=255"}
    assert list(res["metrics"]) == ["lung"] and res["metrics"]["lung"]["dice"] > 0.85
    assert res["notes"] and "do not tell right from left" in res["notes"][0]


def _cohort(tmp_path: Path, refs: dict[str, Any], preds: dict[str, Any]) -> tuple[Path, Path]:
    lab = _labels()
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    for cid, arr in refs.items():
        medseg.save(lab.with_array(np.asarray(arr, np.uint8)), ref_dir / f"{cid}.nii.gz")
    for cid, arr in preds.items():
        medseg.save(lab.with_array(np.asarray(arr, np.uint8)), pred_dir / f"{cid}.nii.gz")
    return pred_dir, ref_dir


def test_cohort_mixes_sided_and_binary_references(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lab = _labels().array
    pred = _labels(1).array
    pred_dir, ref_dir = _cohort(tmp_path, {"a": lab, "b": lab > 0}, {"a": pred, "b": pred})
    rc = main(["evaluate", "--pred-dir", str(pred_dir), "--ref-dir", str(ref_dir), "-o",
               str(tmp_path / "out"), "--json", "--fail-on-failure"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["failed"] == []
    labels = {(r["case_id"], r["label"]) for r in out["cases"]}
    assert labels == {("a", "right"), ("a", "left"), ("a", "lung"), ("b", "lung")}
    assert "only the values 0 and 1" in out["notes"]["b"] and "a" not in out["notes"]
    dice = {(r["case_id"], r["label"]): r["dice"] for r in out["cases"]}
    assert dice[("a", "lung")] == pytest.approx(dice[("b", "lung")])
    rc = main(["evaluate", "--pred-dir", str(pred_dir), "--ref-dir", str(ref_dir), "-o",
               str(tmp_path / "out")])
    assert rc == 0 and "note: b: the reference holds only" in capsys.readouterr().out


def test_cohort_refuses_a_255_reference_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lab = _labels().array
    pred_dir, ref_dir = _cohort(tmp_path, {"a": lab, "c": np.where(lab > 0, 255, 0)},
                                {"a": lab, "c": lab})
    assert main(["evaluate", "--pred-dir", str(pred_dir), "--ref-dir", str(ref_dir), "-o",
                 str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert str(ref_dir / "c.nii.gz") in err and "--ref-labels lung=255" in err
    assert not (tmp_path / "out").exists()


def test_cohort_prediction_in_another_convention_is_a_visible_failure(tmp_path: Path) -> None:
    lab = _labels().array
    pred_dir, ref_dir = _cohort(tmp_path, {"a": lab, "d": lab},
                                {"a": lab, "d": np.where(lab > 0, 255, 0)})
    result = evaluate_cohort(pred_dir, ref_dir, None)
    assert result.failed == ["d"]
    assert "scored as an empty prediction" in result.notes["d"]
    assert "255" in result.notes["d"] and "pred_labels=" in result.notes["d"]
    ok = evaluate_cohort(pred_dir, ref_dir, None, pred_labels="lung=1-255")
    assert ok.failed == [] and ok.accumulator.labels() == ["lung"]


def test_cli_rejects_a_bad_spec(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "a.nii.gz", "b.nii.gz", "--ref-labels", "rigth=1,left=2"])
    assert exc.value.code == 2
    assert "did you mean 'right'" in capsys.readouterr().err
