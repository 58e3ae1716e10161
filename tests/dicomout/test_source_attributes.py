"""The SEG and the SR carry only the patient and study attributes their IODs require, plus
what the caller asks to keep: not the scanner's institution, address, station or other
patient details. Checked on a small DICOM series with such attributes written at test time,
and with dciodvfy (dicom3tools) where it is installed."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

import medseg
from medseg.errors import ConfigError
from medseg.io.dicom_seg import (
    PATIENT_STUDY_ATTRIBUTES,
    REQUIRED_PATIENT_STUDY,
    EncodedSeg,
    build_seg,
)
from medseg.io.dicom_sr import EncodedSR, build_sr, read_sr_measurements
from medseg.io.dicom_write import write_dicom_series
from medseg.quantify import quantify
from medseg.volume import CTVolume, Geometry
from tests.conftest import need_tool

#: Attributes of the source a derived object does not need, with telltale values.
EXTRA: dict[str, Any] = {
    "InstitutionName": "St Elsewhere Hospital",
    "InstitutionAddress": "1 Secret Road, Springfield",
    "StationName": "CTSTATION7",
    "InstitutionalDepartmentName": "Radiology Dept North",
    "Manufacturer": "ScannerCorp",
    "ManufacturerModelName": "Scanmaster 9000",
    "DeviceSerialNumber": "SN-424242",
    "PatientAge": "061Y",
    "PatientWeight": "72",
    "PatientComments": "claustrophobic patient",
    "AdditionalPatientHistory": "smoker 40 pack-years",
    "StudyDescription": "CT THORAX LOW DOSE",
    "PhysiciansOfRecord": "House^Gregory",
    "OtherPatientNames": "Smith^Jane",
    "ClinicalTrialSponsorName": "LungTrialSponsor",
    "SpacingBetweenSlices": "-2.5",  # as Philips writes it: negative
}
#: Required attributes, with values to find again in the SEG and the SR.
REQUIRED: dict[str, Any] = {
    "PatientName": "Doe^John", "PatientID": "PID-777", "PatientBirthDate": "19600101",
    "PatientSex": "M", "AccessionNumber": "ACC-99", "ReferringPhysicianName": "Ref^Doc",
}
TELLTALES = [v.encode() for k, v in EXTRA.items()
             if k not in ("SpacingBetweenSlices", "PatientWeight")]  # digits: in UIDs too


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[CTVolume, CTVolume]:
    arr = np.full((12, 48, 56), -1000, np.int16)
    arr[:, 6:-6, 6:-6] = 40
    ct = CTVolume(arr, Geometry(origin=(-30.0, -25.0, 10.0), spacing=(1.0, 1.0, 2.5)))
    folder = tmp_path_factory.mktemp("attrs") / "dicom"
    write_dicom_series(ct, folder, uid_seed="attrs", extra={**EXTRA, **REQUIRED},
                       patient_name=REQUIRED["PatientName"], patient_id=REQUIRED["PatientID"])
    image = medseg.load(folder)
    lab = np.zeros(image.shape, np.uint8)
    lab[2:10, 10:38, 8:26] = 1
    lab[2:10, 10:38, 30:48] = 2
    return image, image.with_array(lab)


def _objects(study: tuple[CTVolume, CTVolume], keep: tuple[str, ...] = ()
             ) -> tuple[EncodedSeg, EncodedSR]:
    image, labels = study
    seg = build_seg(image, labels, method="threshold", keep=keep)
    measurements = quantify(image, labels)["measurements"]
    return seg, build_sr(image, labels, seg.dataset, measurements=measurements, keep=keep)


def _keywords(ds: Dataset) -> set[str]:
    """Every keyword anywhere in ``ds``, sequences included."""
    return {e.keyword for e in ds.iterall() if e.keyword}


def test_source_has_the_attributes(study: tuple[CTVolume, CTVolume]) -> None:
    src = pydicom.dcmread(study[0].metadata.source_files[0], stop_before_pixels=True)
    for kw, value in {**EXTRA, **REQUIRED}.items():
        assert str(src[kw].value) == value, kw


def test_seg_and_sr_carry_only_the_required_attributes(
        study: tuple[CTVolume, CTVolume]) -> None:
    seg, sr = _objects(study)
    src = pydicom.dcmread(study[0].metadata.source_files[0], stop_before_pixels=True)
    for name, data in (("SEG", seg.data), ("SR", sr.data)):
        ds = pydicom.dcmread(io.BytesIO(data))
        for telltale in TELLTALES:
            assert telltale not in data, (name, telltale)
        found = _keywords(ds)
        for kw in ("InstitutionName", "InstitutionAddress", "StationName",
                   "InstitutionalDepartmentName", "PatientAge", "PatientWeight",
                   "PatientComments", "StudyDescription", "ClinicalTrialSponsorName"):
            assert kw not in found, (name, kw)
        for kw in REQUIRED_PATIENT_STUDY:
            assert kw in ds, (name, kw)
            assert ds[kw].value == src[kw].value, (name, kw)
        assert ds.Manufacturer == "medseg"
        purposes = {c.CodeValue for item in ds.get("ContributingEquipmentSequence", [])
                    for c in item.PurposeOfReferenceCodeSequence}
        assert "109101" not in purposes, name  # no acquisition-equipment item
        leftover = {e.keyword for e in ds} & PATIENT_STUDY_ATTRIBUTES
        assert leftover <= set(REQUIRED_PATIENT_STUDY), (name, leftover)
    seg_ds = pydicom.dcmread(io.BytesIO(seg.data))
    measures = seg_ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SpacingBetweenSlices) == 2.5  # never negative
    assert set(read_sr_measurements(sr.data)) == {"right", "left", "lung"}


def test_keep_carries_named_attributes(study: tuple[CTVolume, CTVolume]) -> None:
    seg, sr = _objects(study, keep=("InstitutionName", "StudyDescription"))
    for data in (seg.data, sr.data):
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.InstitutionName == EXTRA["InstitutionName"]
        assert ds.StudyDescription == EXTRA["StudyDescription"]
        assert b"CTSTATION7" not in data and b"061Y" not in data


@pytest.mark.parametrize(("keep", "match"), [
    (("InstitutionNam",), "not a DICOM keyword.*did you mean 'InstitutionName'"),
    (("Manufacturer",), "Manufacturer written by medseg itself"),
    (("SeriesInstanceUID",), "written by medseg itself"),
])
def test_keep_errors(study: tuple[CTVolume, CTVolume], keep: tuple[str, ...],
                     match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_seg(study[0], study[1], method="threshold", keep=keep)


def _dciodvfy_errors(data: bytes, tmp: Path) -> list[str]:
    path = tmp / "object.dcm"
    path.write_bytes(data)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True,
                         timeout=120, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines()
            if line.startswith("Error")]


def test_dciodvfy_finds_no_error(study: tuple[CTVolume, CTVolume], tmp_path: Path) -> None:
    need_tool("dciodvfy")  # dicom3tools (.ci/system-packages.txt)
    seg, sr = _objects(study, keep=("InstitutionName",))
    assert _dciodvfy_errors(seg.data, tmp_path) == []
    assert _dciodvfy_errors(sr.data, tmp_path) == []
