"""Per-study and cohort reports: schema, escaping, PHI hidden, failures visible, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import medseg
from medseg.cli import main
from medseg.evaluate import CohortAccumulator, label_metrics
from medseg.report import study_report, write_cohort_report, write_study_report
from medseg.volume import CTVolume, Geometry, VolumeMetadata


def _study(name: str = "<script>alert(1)</script>") -> tuple[CTVolume, CTVolume]:
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in (12, 40, 48)], indexing="ij")
    hu = np.full(z.shape, 40, np.int16)
    right = ((x + 0.45) / 0.3) ** 2 + (y / 0.5) ** 2 + (z / 1.2) ** 2 < 1
    left = ((x - 0.45) / 0.3) ** 2 + (y / 0.5) ** 2 + (z / 1.2) ** 2 < 1
    hu[right | left] = -860
    hu[right & (y > 0.2)] = -970
    lab = (right * 1 + left * 2).astype(np.uint8)
    meta = VolumeMetadata(modality="CT", patient_name=name, patient_id="PID-12345",
                          study_date="20250101", convolution_kernel="B30f",
                          slice_thickness_mm=1.0, source_format="dicom")
    geo = Geometry(origin=(-20, -10, 5), spacing=(0.8, 0.8, 1.0))
    return CTVolume(hu, geo, meta), CTVolume(lab, geo)


def test_study_report_files_schema_and_no_phi(tmp_path: Path) -> None:
    image, labels = _study()
    rep = study_report(image, labels, study_id="case<1>", method="unet", reference=labels)
    paths = write_study_report(rep, image, labels, tmp_path)
    data = json.loads(paths["report.json"].read_text())
    assert data["schema"] == "medseg.study-report" and data["schema_version"] == 1
    assert data["metrics"]["lung"]["dice"] == 1.0
    assert data["measurements"]["right"]["laa950_pct"] > 0
    assert "patient" not in data
    html = paths["report.html"].read_text()
    assert "PID-12345" not in html and "alert(1)" not in html
    assert "case&lt;1&gt;" in html  # autoescaped
    assert html.count("data:image/png;base64,") == 2  # embedded, self-contained
    assert html.count("data:image/svg+xml;base64,") == 1  # the HU histogram
    assert "src=\"http" not in html
    rows = list(csv.DictReader(paths["report.csv"].read_text().splitlines()))
    assert rows[0]["study_id"] == "case<1>" and float(rows[0]["lung_dice"]) == 1.0


def test_study_report_phi_only_when_asked(tmp_path: Path) -> None:
    image, labels = _study("Doe^Jane")
    rep = study_report(image, labels, study_id="s", show_phi=True)
    html = write_study_report(rep, image, labels, tmp_path)["report.html"].read_text()
    assert "Doe^Jane" in html and "PID-12345" in html
    assert json.loads((tmp_path / "report.json").read_text())["patient"]["id"] == "PID-12345"


def test_study_report_refuses_reference_on_another_grid() -> None:
    image, labels = _study()
    moved = CTVolume(labels.array, Geometry(origin=(-20, -10, 9), spacing=(0.8, 0.8, 1.0)))
    with pytest.raises(medseg.GeometryError, match="origin 4 mm apart"):
        study_report(image, labels, study_id="s", reference=moved)


def test_same_inputs_same_report_bytes(tmp_path: Path) -> None:
    image, labels = _study()
    for d in ("a", "b"):
        write_study_report(study_report(image, labels, study_id="s"), image, labels,
                           tmp_path / d)
    for name in ("report.json", "report.html", "report.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def _cohort(n: int = 5) -> CohortAccumulator:
    _, labels = _study()
    acc = CohortAccumulator()
    ref = labels.array
    for i in range(n):
        pred = np.roll(ref, i, axis=2)
        if i == 2:
            pred = np.where(pred == 2, 0, pred).astype(np.uint8)  # left lung missed
        acc.add(f"case{i}", label_metrics(pred, ref, (1.0, 0.8, 0.8)))
    return acc


def test_cohort_report_lists_the_failure_first(tmp_path: Path) -> None:
    paths = write_cohort_report(_cohort(), tmp_path, notes={"case2": "left <missed>"})
    html = paths["html"].read_text()
    assert "1 failed (left lung)" in html
    first = html.index("<td class=\"l\">case2 (failed)</td>")
    assert all(first < html.index(f">case{i}<") for i in (0, 1, 3, 4))
    assert "left &lt;missed&gt;" in html
    rows = list(csv.DictReader(paths["cases_csv"].read_text().splitlines()))
    failed = {(r["case_id"], r["label"]) for r in rows if r["failed"] == "True"}
    assert ("case2", "left") in failed
    summary_rows = csv.DictReader(paths["summary_csv"].read_text().splitlines())
    summary = {(r["label"], r["metric"]): r for r in summary_rows}
    left_dice = summary[("left", "dice")]
    assert int(left_dice["n"]) == 5 and int(left_dice["n_failed"]) == 1
    assert float(left_dice["mean"]) < 0.85  # the missed lung's 0 is in the mean


def _write_cases(tmp_path: Path) -> tuple[Path, Path]:
    _, labels = _study()
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    for i in range(5):
        medseg.save(labels, ref_dir / f"case{i}.nii.gz")
        if i == 4:
            continue  # no prediction for case4: must show up as a failure
        pred = labels.with_array(np.roll(labels.array, i, axis=1))
        target = pred_dir / f"case{i}" / "lungs.nii.gz" if i % 2 else pred_dir / f"case{i}.nii.gz"
        medseg.save(pred, target)
    medseg.save(labels, pred_dir / "extra.nii.gz")
    return pred_dir, ref_dir


def test_cli_evaluate_cohort(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred_dir, ref_dir = _write_cases(tmp_path)
    rc = main(["evaluate", "--pred-dir", str(pred_dir), "--ref-dir", str(ref_dir), "-o",
               str(tmp_path / "report"), "--json", "--fail-on-failure"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert out["failed"] == ["case4"]
    assert "no prediction" in out["notes"]["case4"]
    assert out["unmatched_predictions"] == ["extra"]
    assert {r["case_id"] for r in out["cases"]} == {f"case{i}" for i in range(5)}
    assert (tmp_path / "report" / "cohort.html").is_file()


def test_cli_evaluate_pair_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, labels = _study()
    a = medseg.save(labels, tmp_path / "a.nii.gz")
    b = medseg.save(labels.with_array(np.roll(labels.array, 2, axis=0)), tmp_path / "b.nrrd")
    assert main(["evaluate", str(a), str(b), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["metrics"]
    assert set(m) == {"right", "left", "lung"}
    assert set(m["lung"]) == {"dice", "iou", "hd", "hd95", "assd", "nsd", "volume_diff_ml"}
    assert 1.0 < m["lung"]["hd"] <= 2.0 + 1e-9  # shifted 2 slices of 1 mm: at most 2 mm


def test_cli_evaluate_grid_mismatch_is_one_clear_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, labels = _study()
    a = medseg.save(labels, tmp_path / "a.nii.gz")
    other = CTVolume(labels.array, Geometry(origin=(0, 0, 0), spacing=(1.0, 0.8, 1.0)))
    b = medseg.save(other, tmp_path / "b.nii.gz")
    assert main(["evaluate", str(a), str(b)]) == 1
    err = capsys.readouterr().err
    assert "grids differ" in err and "spacing" in err and "Traceback" not in err


def test_cli_evaluate_empty_prediction_is_inf_not_nan(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, labels = _study()
    a = medseg.save(labels.with_array(np.zeros(labels.shape, np.uint8)), tmp_path / "a.nii.gz")
    b = medseg.save(labels, tmp_path / "b.nii.gz")
    assert main(["evaluate", str(a), str(b), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["metrics"]
    assert m["lung"]["dice"] == 0.0 and m["lung"]["hd95"] == "inf"


def test_histogram_chart_is_valid_svg_without_matplotlib() -> None:
    """The study report's HU histogram: an SVG document (one line per lung, round ticks, the
    -950 HU line), drawn without starting matplotlib."""
    import subprocess
    import sys
    import xml.etree.ElementTree as ET

    from medseg.report._svg import nice_ticks
    from medseg.report.study import _histogram_svg

    assert nice_ticks(-1100, 0, 6) == [-1000, -800, -600, -400, -200, 0]
    assert nice_ticks(0, 6.8) == [0, 2, 4, 6]
    edges = list(range(-1100, 101, 10))
    counts = {"right": [0] * 120, "left": [0] * 120}
    counts["right"][20:40] = [5] * 20
    rep = {"histogram": {"bin_edges_hu": edges, "counts": counts}}
    root = ET.fromstring(_histogram_svg(rep))
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{ns}svg"
    lines = root.findall(f"{ns}polyline")
    assert len(lines) == 1 and lines[0].get("stroke") == "#e0402f"  # the empty left lung: none
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert "\u2212950 HU" in texts and "right lung" in texts and "left lung" not in texts
    code = ("import sys; from medseg.report.study import _histogram_svg; "
            f"_histogram_svg({rep!r}); print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_report_names_the_precision_the_network_ran_in(tmp_path: Path) -> None:
    image, labels = _study()
    model = {"name": "lung2d-v8", "sha256": "ab" * 32, "precision": "bf16"}
    rep = study_report(image, labels, study_id="p", method="unet", model=model)
    assert rep["parameters"]["model"] == model
    html = write_study_report(rep, image, labels, tmp_path)["report.html"].read_text()
    assert "abababababab</code>, bf16)" in html
    # a model record without it (an older segment.json) still renders
    old = study_report(image, labels, study_id="p", method="unet",
                       model={"name": "m", "sha256": "cd" * 32})
    assert old["parameters"]["model"] == {"name": "m", "sha256": "cd" * 32}
