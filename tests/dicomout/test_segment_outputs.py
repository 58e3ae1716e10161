"""`medseg segment` on DICOM writes lungs.seg.dcm and lungs.sr.dcm: checked on the real
Philips chest CT (U-Net, once per module) and on a small phantom (threshold)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

import medseg
from medseg.cli import main
from medseg.errors import OutputError
from medseg.inference import DEFAULT_MODEL
from medseg.io.dicom_seg import REQUIRED_PATIENT_STUDY
from medseg.io.dicom_sr import read_sr_measurements
from medseg.segment import StudyResult, segment_study
from medseg.synth import write_phantom_study
from tests.conftest import need
from tests.dicomout.world import compare_with_volume

DICOM_NAMES = {"lungs.seg.dcm", "lungs.sr.dcm"}


@pytest.fixture(scope="module")
def philips(shared_data: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[StudyResult, Path]:
    out = tmp_path_factory.mktemp("philips")
    result = segment_study(need(shared_data, "chest-ct-philips-141"), out, method="unet")
    return result, out


def test_seg_is_the_nifti_mask(philips: tuple[StudyResult, Path]) -> None:
    result, out = philips
    mask = medseg.load(out / "lungs.nii.gz")
    uids = result.volume.metadata.sop_instance_uids
    assert len(uids) == 141
    seg = hd.seg.segread(out / "lungs.seg.dcm")
    decoded = seg.get_pixels_by_source_instance(list(uids), combine_segments=True,
                                                assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(decoded, mask.array)  # voxel for voxel, slice k = file k
    agreement = compare_with_volume(out / "lungs.seg.dcm", mask)  # and in world space
    assert agreement.labelled == int(np.count_nonzero(mask.array))
    assert agreement.agree == agreement.labelled


def test_seg_references_codes_and_algorithm(philips: tuple[StudyResult, Path]) -> None:
    result, out = philips
    md = result.volume.metadata
    seg = pydicom.dcmread(out / "lungs.seg.dcm")
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == md.study_instance_uid
    assert seg.FrameOfReferenceUID == md.frame_of_reference_uid
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == md.series_instance_uid
    referenced = {str(i.ReferencedSOPInstanceUID) for i in series.ReferencedInstanceSequence}
    mask = medseg.load(out / "lungs.nii.gz").array
    with_lung = {md.sop_instance_uids[k] for k in np.flatnonzero(mask.any(axis=(1, 2)))}
    assert with_lung and with_lung <= referenced <= set(md.sop_instance_uids)
    sha = result.summary["model"]["sha256"]
    expected = {1: ("3341006", "Right lung"), 2: ("44029006", "Left lung")}
    for item in seg.SegmentSequence:
        code = item.SegmentedPropertyTypeCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator) == \
            (expected[item.SegmentNumber][0], "SCT")
        assert item.SegmentLabel == expected[item.SegmentNumber][1]
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "medseg" and algo.AlgorithmVersion == medseg.__version__
        assert sha in algo.AlgorithmParameters and DEFAULT_MODEL in algo.AlgorithmParameters


def test_sr_measurements_reference_the_seg(philips: tuple[StudyResult, Path]) -> None:
    result, out = philips
    summary = json.loads((out / "segment.json").read_text())
    seg = pydicom.dcmread(out / "lungs.seg.dcm", stop_before_pixels=True)
    values = read_sr_measurements(out / "lungs.sr.dcm")
    vols = summary["volumes_ml"]
    for key, side in (("right", "right"), ("left", "left"), ("lung", "total")):
        assert values[key]["volume_ml"] == pytest.approx(vols[side], abs=0.011)
    report = json.loads((out / "report.json").read_text())["measurements"]
    for key in ("right", "left", "lung"):
        for name in ("mld_hu", "laa950_pct", "pd15_hu"):
            assert values[key][name] == pytest.approx(report[key][name], abs=1e-6)
    sr = hd.sr.srread(out / "lungs.sr.dcm")
    assert sr.StudyInstanceUID == result.volume.metadata.study_instance_uid
    assert [e[2] for e in sr.get_evidence()] == [seg.SOPInstanceUID]
    groups = sr.content.get_volumetric_roi_measurement_groups()
    refs = {g.referenced_segment.referenced_sop_instance_uid: None for g in groups}
    assert list(refs) == [seg.SOPInstanceUID]
    assert sorted(n for g in groups for n in g.referenced_segment.referenced_segment_numbers
                  ) == [1, 2]
    units = {str(m.unit.value) for g in groups for m in g.get_measurements()}
    assert units == {"ml", "[hnsf'U]", "%"}
    (observer,) = sr.content.get_observer_contexts()
    assert f"medseg {medseg.__version__}" in str(observer)


def test_summary_lists_and_times_the_dicom_outputs(philips: tuple[StudyResult, Path]) -> None:
    _, out = philips
    summary = json.loads((out / "segment.json").read_text())
    assert summary["outputs"]["dicom_seg"] == "lungs.seg.dcm"
    assert summary["outputs"]["dicom_sr"] == "lungs.sr.dcm"
    assert 0 < summary["timings_s"]["dicom_seg"] < 10
    assert 0 < summary["timings_s"]["dicom_sr"] < 10
    assert not [p for p in out.iterdir() if ".partial" in p.name]


def test_seg_and_sr_carry_no_source_equipment_or_extra_patient_data(
        philips: tuple[StudyResult, Path], tmp_path: Path) -> None:
    """The Philips source has InstitutionName, InstitutionAddress, StationName, PatientAge,
    StudyDescription ...; the derived objects carry only the Patient and General Study
    attributes the IODs require (and validate with dciodvfy where it is installed)."""
    result, out = philips
    src = pydicom.dcmread(result.volume.metadata.source_files[0], stop_before_pixels=True)
    assert {"InstitutionName", "InstitutionAddress", "StationName", "PatientAge",
            "StudyDescription"} <= set(src.dir())
    for name in DICOM_NAMES:
        ds = pydicom.dcmread(out / name)
        found = {e.keyword for e in ds.iterall() if e.keyword}
        assert not found & {"InstitutionName", "InstitutionAddress", "StationName",
                            "InstitutionalDepartmentName", "PatientAge", "StudyDescription"}
        for kw in REQUIRED_PATIENT_STUDY:
            assert ds[kw].value == src[kw].value, (name, kw)
        assert ds.Manufacturer == "medseg" and src.Manufacturer != "medseg"
        if shutil.which("dciodvfy"):
            run = subprocess.run(["dciodvfy", str(out / name)], capture_output=True,
                                 text=True, timeout=120, check=False)
            errors = [ln for ln in (run.stdout + run.stderr).splitlines()
                      if ln.startswith("Error")]
            assert errors == [], (name, errors)


# -- small phantom: switches and failure ----------------------------------------------------
@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_phantom_study(tmp_path_factory.mktemp("phantom"), seed=2, shape=(24, 96, 96))


def test_phantom_dicom_writes_both(phantom: dict[str, Path], tmp_path: Path) -> None:
    res = segment_study(phantom["dicom"], tmp_path, method="threshold", report=False)
    assert {p.name for p in tmp_path.iterdir()} >= DICOM_NAMES
    values = read_sr_measurements(tmp_path / "lungs.sr.dcm")
    assert values["lung"]["volume_ml"] == pytest.approx(res.summary["volumes_ml"]["total"],
                                                        abs=0.011)


def test_non_dicom_input_writes_no_dicom(phantom: dict[str, Path], tmp_path: Path) -> None:
    res = segment_study(phantom["image"], tmp_path, method="threshold", report=False)
    assert not DICOM_NAMES & {p.name for p in tmp_path.iterdir()}
    assert "dicom_seg" not in res.summary["outputs"]


def test_cli_no_dicom_seg(phantom: dict[str, Path], tmp_path: Path) -> None:
    assert main(["segment", str(phantom["dicom"]), "-o", str(tmp_path), "--method",
                 "threshold", "--no-report", "--no-dicom-seg", "-q"]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"lungs.nii.gz", "segment.json"}


def test_failed_read_back_writes_nothing(phantom: dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import medseg.io.dicom_seg as dicom_seg

    real = dicom_seg.decode_seg_frames

    def off_by_one(*args: Any, **kwargs: Any) -> np.ndarray:
        pixels = real(*args, **kwargs).copy()
        pixels[pixels.shape[0] // 2, 0, 0] ^= 1
        return pixels

    monkeypatch.setattr(dicom_seg, "decode_seg_frames", off_by_one)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="read-back check failed"):
        segment_study(phantom["dicom"], out, method="threshold")
    assert not out.exists() or not any(out.iterdir())
