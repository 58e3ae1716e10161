"""DICOM folders as hospitals export them: bad input, several series, DICOMDIR, multi-frame.

Built from copies of small real series in ../shared/data (cip-ct64: 79 files of 64x64)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid

import medseg
from medseg.cli import main
from medseg.errors import (
    NoSeriesError,
    NotAVolumeError,
    NotFoundError,
    PixelDataError,
    SeriesSelectionError,
)
from tests.conftest import need

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def cip_files(shared_data: Path) -> list[Path]:
    return sorted(need(shared_data, "cip-ct64/ct-64Dicom").iterdir())


@pytest.fixture(scope="module")
def cip_reference(shared_data: Path) -> medseg.CTVolume:
    return medseg.load(need(shared_data, "cip-ct64/ct-64Dicom"))


def _copy(files: list[Path], dest: Path, names: list[str] | None = None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        shutil.copy(f, dest / (names[i] if names else f.name))
    return dest


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="empty"):
        medseg.load(tmp_path)


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(NoSeriesError, match="not a DICOM file"):
        medseg.load(tmp_path)


def test_non_dicom_files_mixed_in(tmp_path: Path, cip_files: list[Path],
                                  cip_reference: medseg.CTVolume) -> None:
    _copy(cip_files, tmp_path)
    (tmp_path / "README.txt").write_text("exported by PACS")
    (tmp_path / "Thumbs.db").write_bytes(b"\x00\x01garbage" * 50)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "report.pdf").write_bytes(b"%PDF-1.4 ...")
    scan = medseg.scan_dicom(tmp_path)
    assert {s.reason for s in scan.skipped} == {"not a DICOM file"}
    assert len(scan.skipped) == 3
    vol = medseg.load(tmp_path)
    np.testing.assert_array_equal(vol.array, cip_reference.array)


def test_file_names_do_not_decide_order(tmp_path: Path, cip_files: list[Path],
                                        cip_reference: medseg.CTVolume) -> None:
    rng = np.random.default_rng(3)
    names = [f"x{n:04d}" for n in rng.permutation(len(cip_files))]
    _copy(cip_files, tmp_path, names)
    vol = medseg.load(tmp_path)
    np.testing.assert_array_equal(vol.array, cip_reference.array)
    assert vol.geometry.is_close(cip_reference.geometry)


def test_truncated_file_named(tmp_path: Path, cip_files: list[Path]) -> None:
    _copy(cip_files, tmp_path)
    victim = tmp_path / cip_files[40].name
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 3000])  # header intact, pixel data cut short
    with pytest.raises(PixelDataError, match=rf"{victim.name}: truncated file"):
        medseg.load(tmp_path)


def test_file_truncated_inside_header(tmp_path: Path, cip_files: list[Path]) -> None:
    _copy(cip_files, tmp_path)
    victim = tmp_path / cip_files[40].name
    victim.write_bytes(victim.read_bytes()[:300])
    scan = medseg.scan_dicom(tmp_path)
    assert any(s.path == str(victim) for s in scan.skipped)
    # the series now misses a slice in the middle: refused, not interpolated
    with pytest.raises(medseg.MissingSlicesError, match="1 slice"):
        medseg.load(tmp_path)


def test_missing_pixel_data(tmp_path: Path, cip_files: list[Path]) -> None:
    _copy(cip_files[:5], tmp_path)
    for f in tmp_path.iterdir():
        ds = pydicom.dcmread(f)
        del ds.PixelData
        ds.save_as(f)
    with pytest.raises(NoSeriesError, match="no pixel data"):
        medseg.load(tmp_path)


def _as_new_series(files: list[Path], dest: Path, **changes: object) -> Path:
    dest.mkdir(parents=True)
    uid = generate_uid()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        for k, v in changes.items():
            setattr(ds, k, v)
        ds.save_as(dest / f.name)
    return dest


def test_two_series_in_one_folder(tmp_path: Path, cip_files: list[Path],
                                  cip_reference: medseg.CTVolume,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    _copy(cip_files, tmp_path / "a")
    _as_new_series(cip_files[:30], tmp_path / "b", SeriesNumber=7)
    scan = medseg.scan_dicom(tmp_path)
    assert len(scan.series) == 2
    assert scan.chosen is not None
    assert scan.chosen.series_uid == cip_reference.metadata.series_instance_uid  # most slices
    assert "most slices" in scan.choice_reason
    other = next(s for s in scan.series if s is not scan.chosen)
    vol = medseg.load(tmp_path, series=other.series_uid)
    assert vol.shape[0] == 30
    with pytest.raises(SeriesSelectionError, match=r"no series 1\.2\.3 here; series found: "):
        medseg.load(tmp_path, series="1.2.3")
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"would use: {scan.chosen.series_uid}" in out and other.series_uid in out


def test_ct_preferred_over_larger_mr(tmp_path: Path, cip_files: list[Path],
                                     cip_reference: medseg.CTVolume) -> None:
    _copy(cip_files[:20], tmp_path / "ct")
    _as_new_series(cip_files, tmp_path / "mr", Modality="MR")
    vol = medseg.load(tmp_path)
    assert vol.metadata.modality == "CT" and vol.shape[0] == 20


def test_single_2d_image(tmp_path: Path, cip_files: list[Path]) -> None:
    _copy(cip_files[:1], tmp_path)
    with pytest.raises(NotAVolumeError, match="single 2D image"):
        medseg.load(tmp_path)
    with pytest.raises(NotAVolumeError, match="single 2D image"):
        medseg.load(tmp_path / cip_files[0].name)


def test_dicomdir(tmp_path: Path, cip_files: list[Path],
                  cip_reference: medseg.CTVolume) -> None:
    fs = FileSet()
    for f in cip_files:
        fs.add(pydicom.dcmread(f))
    fs.write(tmp_path / "export")
    fs._stage["t"].cleanup()  # pydicom's staging TemporaryDirectory, else a ResourceWarning
    dicomdir = tmp_path / "export" / "DICOMDIR"
    assert dicomdir.exists()
    for path in (dicomdir, tmp_path / "export"):
        vol = medseg.load(path)
        np.testing.assert_array_equal(vol.array, cip_reference.array)
    scan = medseg.scan_dicom(tmp_path / "export")
    assert any("DICOMDIR" in s.reason for s in scan.skipped)


def test_enhanced_multiframe_ct(tmp_path: Path, cip_files: list[Path],
                                cip_reference: medseg.CTVolume) -> None:
    """A Legacy Converted Enhanced CT (one multi-frame file, geometry in per-frame functional
    groups), made with highdicom from the single-frame series, loads to the same volume."""
    import highdicom as hd

    legacy = [pydicom.dcmread(f) for f in cip_files]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
            legacy_datasets=legacy, series_instance_uid=generate_uid(), series_number=99,
            sop_instance_uid=generate_uid(), instance_number=1)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path)
    vol = medseg.load(path)
    assert vol.shape == cip_reference.shape
    np.testing.assert_array_equal(vol.array, cip_reference.array)
    assert vol.geometry.is_close(cip_reference.geometry, atol_mm=1e-3)


def test_enhanced_ct_supplemental_frames(shared_data: Path) -> None:
    """pydicom's enhanced CT sample: 2 frames, both placed from the functional groups; two
    slices are not enough to check spacing, so it is listed but refused as a volume."""
    path = need(shared_data, "pydicom-data/data_store/data/eCT_Supplemental.dcm")
    scan = medseg.scan_dicom(path)
    (series,) = scan.series
    assert len(series.frames) == 2 and all(f.position is not None for f in series.frames)
    ds = pydicom.dcmread(path)
    expected = [list(map(float, fg.PlanePositionSequence[0].ImagePositionPatient))
                for fg in ds.PerFrameFunctionalGroupsSequence]
    assert [list(f.position) for f in series.frames] == expected
    with pytest.raises(NotAVolumeError, match="only 2 slices"):
        medseg.load(path)


def test_compressed_jpeg2000_series(shared_data: Path) -> None:
    vol = medseg.load(need(shared_data, "totalseg-example/example_ct_dicom"))
    scan = medseg.scan_dicom(need(shared_data, "totalseg-example/example_ct_dicom"))
    assert scan.chosen is not None
    assert any("JPEG 2000" in ts for ts in scan.chosen.to_dict()["transfer_syntaxes"])
    assert vol.shape == (20, 512, 512)
