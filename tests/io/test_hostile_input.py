"""One bad slice, an absurd header: refused with the file (and slice) named, never a wrong
answer (issue 13).

Corrupted series are copies of real studies in ../shared/data (cip-ct64: 79 GE slices of
64 x 64, stored values = HU; chest-ct-philips-141: 141 Philips slices of 512 x 512, 12 bits
stored, intercept -1024) with one slice edited by pydicom. Volume files with absurd headers
are written by hand (a few hundred bytes that claim 30000 x 30000 x 1000 voxels). The real
studies themselves must pass every check.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement

import medseg
from medseg.cli import main
from medseg.errors import GeometryError, PixelDataError, UnreadableFileError
from medseg.io import verify_chosen
from medseg.io.limits import MAX_VOLUME_BYTES_ENV
from medseg.volume import CTVolume, Geometry
from tests.conftest import need

pytestmark = pytest.mark.shared_data

CIP = "cip-ct64/ct-64Dicom"
PHILIPS = "chest-ct-philips-141"
REAL_CT = {
    "lidc-idri-0001": "real-ct/lidc-idri-0001/data_767.tar.xz",
    "lungfcp-01-0001": "real-ct/lungfcp-01-0001/ct_fuzun45_data.tar.xz",
    "rider-pilot-0117": "real-ct/rider-pilot-0117/ct_stepha-mar-10.tar.xz",
}
Edit = Callable[[pydicom.Dataset], None]


# -- helpers ---------------------------------------------------------------------------------
def _copy_series(shared_data: Path, rel: str, dest: Path) -> Path:
    src = need(shared_data, rel)
    dest.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            shutil.copy(f, dest / f.name)
    return dest


def _in_order(folder: Path) -> list[Path]:
    """The files of the one series in ``folder``, in order along the slice normal."""
    scan = medseg.scan_dicom(folder)
    assert scan.chosen is not None and scan.chosen.plan is not None, scan.choice_reason
    s = scan.chosen
    return [Path(s.frames[i].path) for i in s.plan.order]


def _edit(path: Path, edit: Edit) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values we write
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path)


def _corrupt_middle(shared_data: Path, rel: str, dest: Path, edit: Edit
                    ) -> tuple[Path, Path, int, int]:
    """Copy ``rel`` to ``dest`` and edit its middle slice: (folder, file, slice number from
    1 along the normal, number of slices)."""
    folder = _copy_series(shared_data, rel, dest)
    files = _in_order(folder)
    k = len(files) // 2
    _edit(files[k], edit)
    return folder, files[k], k + 1, len(files)


def _reencode_8_bits(ds: pydicom.Dataset) -> None:
    """Pixel data re-encoded to 8 bits (values wrapped), header changed to match."""
    arr = ds.pixel_array
    arr8 = arr.astype(np.int8 if ds.PixelRepresentation == 1 else np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = arr8.tobytes()


def _bits_tag_only(ds: pydicom.Dataset) -> None:
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7


def _slope_zero(ds: pydicom.Dataset) -> None:
    ds.RescaleSlope = 0


def _slope_nan(ds: pydicom.Dataset) -> None:
    ds["RescaleSlope"] = DataElement(0x00281053, "DS", "NaN")


def _spacing_huge(ds: pydicom.Dataset) -> None:
    ds.PixelSpacing = [1e30, 1e30]


def _garbage_values(ds: pydicom.Dataset) -> None:
    """Random stored values over the whole 12-bit CT range, where the header says so."""
    arr = ds.pixel_array
    rng = np.random.default_rng(13)
    lo = -1024 if ds.PixelRepresentation == 1 and float(ds.RescaleIntercept) == 0 else 0
    ds.PixelData = rng.integers(lo, lo + 4096, arr.shape).astype(arr.dtype).tobytes()


def _intercept_off(ds: pydicom.Dataset) -> None:
    """The slice reads 1024 HU too bright: still inside the CT range, wrong for the series."""
    ds.RescaleIntercept = float(ds.RescaleIntercept) + 1024


def _intercept_up(ds: pydicom.Dataset) -> None:
    """The slice reads 6000 HU too bright: above the CT range."""
    ds.RescaleIntercept = float(ds.RescaleIntercept) + 6000


def _intercept_down(ds: pydicom.Dataset) -> None:
    """6000 HU too dark: the loader's out-of-field rule (at or below -1500 HU, connected
    to the border) turns most of it into air first; the neighbour check still sees it."""
    ds.RescaleIntercept = float(ds.RescaleIntercept) - 6000


def _far_away(ds: pydicom.Dataset) -> None:
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, z + 1e6]


# -- one bad slice, refused with its file named --------------------------------------------
#: name: (edit, study, error type, words of the reason, the reason names the slice number)
HEADER_CASES: dict[str, tuple[Edit, str, type[Exception], str]] = {
    "8-bit re-encoded (cip)": (_reencode_8_bits, CIP, PixelDataError,
                               "BitsAllocated 8, PixelRepresentation 1"),
    "8-bit re-encoded (philips)": (_reencode_8_bits, PHILIPS, PixelDataError,
                                   "BitsAllocated 8, PixelRepresentation 0"),
    "BitsAllocated 8, tag only": (_bits_tag_only, CIP, PixelDataError,
                                  "the header does not describe its pixel data"),
    "RescaleSlope 0": (_slope_zero, CIP, PixelDataError, "RescaleSlope is 0"),
    "RescaleSlope NaN": (_slope_nan, CIP, PixelDataError, "RescaleSlope 'NaN' is not a finite"),
    "PixelSpacing 1e30": (_spacing_huge, CIP, GeometryError,
                          "PixelSpacing (1e+30, 1e+30) mm is outside the plausible 0.05-10 mm"),
    "position 1 km away": (_far_away, CIP, GeometryError, "more than the plausible 2000 mm"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_bad_slice_header_is_refused_naming_the_file(shared_data: Path, tmp_path: Path,
                                                     case: str) -> None:
    edit, study, exc_type, words = HEADER_CASES[case]
    folder, bad, _, _ = _corrupt_middle(shared_data, study, tmp_path / "series", edit)
    with pytest.raises(exc_type) as info:
        medseg.load(folder)
    msg = str(info.value)
    assert words in msg
    assert bad.name in msg and str(folder) in msg
    # discovery already knows: the series is shown unusable with the same reason
    (series,) = medseg.scan_dicom(folder).series
    assert not series.usable and series.problem is not None and bad.name in series.problem


#: name: (edit, study, words of the reason)
VALUE_CASES: dict[str, tuple[Edit, str, str]] = {
    "garbage values (cip)": (_garbage_values, CIP, "differs from its neighbours"),
    "garbage values (philips)": (_garbage_values, PHILIPS, "differs from its neighbours"),
    "intercept +1024 HU": (_intercept_off, CIP, "differs from its neighbours"),
    "intercept +6000 HU": (_intercept_up, PHILIPS, "outside the plausible CT range"),
    "intercept -6000 HU": (_intercept_down, PHILIPS, "differs from its neighbours"),
}


@pytest.mark.parametrize("case", sorted(VALUE_CASES))
def test_bad_slice_values_are_refused_naming_the_slice(shared_data: Path, tmp_path: Path,
                                                       case: str) -> None:
    edit, study, words = VALUE_CASES[case]
    folder, bad, k, n = _corrupt_middle(shared_data, study, tmp_path / "series", edit)
    # the header is fine: discovery accepts the series, the pixels give it away
    assert medseg.scan_dicom(folder).chosen is not None
    with pytest.raises(PixelDataError) as info:
        medseg.load(folder)
    msg = str(info.value)
    assert words in msg
    assert f"slice {k} of {n} ({bad.name})" in msg and str(folder) in msg


def test_slope_of_every_slice_zero_is_refused(shared_data: Path, tmp_path: Path) -> None:
    folder = _copy_series(shared_data, CIP, tmp_path / "series")
    for f in sorted(folder.iterdir()):
        _edit(f, _slope_zero)
    with pytest.raises(PixelDataError, match="every slice: RescaleSlope is 0") as info:
        medseg.load(folder)
    assert str(folder) in str(info.value)


def test_a_slice_that_cannot_be_read_refuses_the_series(shared_data: Path,
                                                       tmp_path: Path) -> None:
    """Before, the file was skipped and the series loaded without it (at the end of the
    stack: a shorter volume, without a word)."""
    folder = _copy_series(shared_data, CIP, tmp_path / "series")
    last = _in_order(folder)[-1]
    _edit(last, lambda ds: setattr(ds, "SamplesPerPixel", 3))
    with pytest.raises(UnreadableFileError) as info:
        medseg.load(folder)
    assert last.name in str(info.value) and "cannot be read as slices" in str(info.value)


def test_per_slice_rescale_is_applied(shared_data: Path, tmp_path: Path) -> None:
    """Rescale parameters may differ between slices: each is converted by its own, exactly."""
    folder = _copy_series(shared_data, CIP, tmp_path / "series")
    reference = medseg.load(folder)
    files = _in_order(folder)
    k = len(files) // 2

    def halve(ds: pydicom.Dataset) -> None:  # stored = (HU - 24) / 2, slope 2, intercept 24
        hu = ds.pixel_array.astype(np.int32)
        even = hu - (hu % 2)
        ds.PixelData = ((even - 24) // 2).astype(ds.pixel_array.dtype).tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = 2, 24
    _edit(files[k], halve)
    vol = medseg.load(folder)
    expected = reference.array.copy()
    expected[k] -= expected[k] % 2
    np.testing.assert_array_equal(vol.array, expected)


# -- the real studies pass every check -----------------------------------------------------
@pytest.fixture(scope="module")
def real_ct(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real-ct archives, extracted once for this module (only those present)."""
    out: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("real-ct")
    for name, rel in REAL_CT.items():
        if (shared_data / rel).exists():
            with tarfile.open(shared_data / rel, "r:xz") as tf:
                tf.extractall(root / name, filter="data")
            out[name] = root / name
    return out


@pytest.mark.parametrize("rel", [PHILIPS, CIP, "totalseg-example/example_ct_dicom",
                                 "dcm-qa-ct/In/GE", "dcm-qa-ct/In/Philips", *REAL_CT])
def test_real_dicom_studies_pass_every_check(shared_data: Path, real_ct: dict[str, Path],
                                             rel: str) -> None:
    if rel in REAL_CT:
        need(shared_data, REAL_CT[rel])
        folder = real_ct[rel]
    else:
        folder = need(shared_data, rel)
    scan = medseg.scan_dicom(folder)
    assert scan.chosen is not None, scan.choice_reason
    assert verify_chosen(scan) is None
    assert scan.chosen is not None and scan.chosen.usable


@pytest.mark.parametrize("rel", ["cip-ct64/ct-64.nrrd", "cip-ct64/wholeLung-64.nrrd",
                                 "totalseg-example/example_ct.nii.gz"])
def test_real_volume_files_pass_every_check(shared_data: Path, rel: str) -> None:
    assert medseg.load(need(shared_data, rel)).array.size > 0


# -- sizes checked before allocating --------------------------------------------------------
HUGE = (30000, 30000, 1000)


def _nifti_header_only(path: Path, shape: tuple[int, ...], spacing: float = 0.7) -> Path:
    """A NIfTI-1 header claiming ``shape`` int16 voxels, followed by 4 KiB of zeros."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape(shape)
    hdr.set_sform(np.diag([spacing, spacing, 1.0, 1.0]), code=1)
    hdr["magic"] = b"n+1"
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\0" * 4 + b"\0" * 4096
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def _nrrd_header_only(path: Path, shape: tuple[int, ...], encoding: str = "raw") -> Path:
    sizes = " ".join(map(str, shape))
    text = (f"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"
            f"sizes: {sizes}\nspace directions: (0.7,0,0) (0,0.7,0) (0,0,1)\n"
            f"kinds: domain domain domain\nendian: little\nencoding: {encoding}\n"
            "space origin: (0,0,0)\n\n")
    data = b"\0" * 4096
    path.write_bytes(text.encode() + (gzip.compress(data) if encoding == "gzip" else data))
    return path


def _mha_header_only(path: Path, shape: tuple[int, ...]) -> Path:
    text = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
            f"DimSize = {' '.join(map(str, shape))}\nElementSpacing = 0.7 0.7 1\n"
            "ElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    path.write_bytes(text.encode() + b"\0" * 4096)
    return path


WRITERS: dict[str, Callable[[Path, tuple[int, ...]], Path]] = {
    "huge.nii": _nifti_header_only, "huge.nii.gz": _nifti_header_only,
    "huge.nrrd": _nrrd_header_only, "huge.mha": _mha_header_only,
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_huge_header_refused_by_the_memory_budget(tmp_path: Path, name: str) -> None:
    path = WRITERS[name](tmp_path / name, HUGE)
    with pytest.raises(PixelDataError) as info:
        medseg.load(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "30000 x 30000 x 1000" in msg
    assert "more than the budget" in msg and MAX_VOLUME_BYTES_ENV in msg


@pytest.mark.parametrize(("name", "words"), [
    ("big.nii", "truncated file or corrupt header"),
    ("big.nii.gz", "deflate compresses at most 1032:1"),
    ("big.nrrd", "truncated file or corrupt header"),
    ("big.mha", "truncated file or corrupt header"),
])
def test_header_larger_than_the_file_refused(tmp_path: Path, name: str, words: str) -> None:
    """Within the budget, the claim (200 MiB) is checked against the bytes on disk (4 KiB,
    or a few hundred bytes of deflate)."""
    path = WRITERS[name.replace("big", "huge")](tmp_path / name, (512, 512, 400))
    with pytest.raises(PixelDataError) as info:
        medseg.load(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "512 x 512 x 400" in msg and words in msg


def test_budget_can_be_lowered(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = need(shared_data, "cip-ct64/ct-64.nrrd")
    monkeypatch.setenv(MAX_VOLUME_BYTES_ENV, "100000")
    with pytest.raises(PixelDataError, match=r"64 x 64 x 79 voxels .* more than the budget"):
        medseg.load(path)
    folder = need(shared_data, CIP)
    with pytest.raises(PixelDataError, match=r"79 x 64 x 64 voxels .* more than the budget"):
        medseg.load(folder)


@pytest.mark.parametrize(("suffix", "spacing", "words"), [
    (".nii.gz", (0.7, 0.7, 1e30), "coarsest voxel spacing 1e+30 mm"),
    (".nrrd", (0.001, 0.001, 1.0), "two finest voxel spacings (0.001, 0.001) mm"),
    (".mha", (0.7, 0.7, 60.0), "coarsest voxel spacing 60 mm"),
])
def test_implausible_volume_spacing_refused(tmp_path: Path, suffix: str,
                                            spacing: tuple[float, float, float],
                                            words: str) -> None:
    vol = CTVolume(np.full((4, 5, 6), -1000, np.int16),
                   Geometry(origin=(0, 0, 0), spacing=spacing))
    path = medseg.save(vol, tmp_path / f"v{suffix}")
    with pytest.raises(GeometryError) as info:
        medseg.load(path)
    assert str(info.value).startswith(str(path)) and words in str(info.value)


def test_volume_extent_over_two_metres_refused(tmp_path: Path) -> None:
    vol = CTVolume(np.full((3, 4, 300), -1000, np.int16),
                   Geometry(origin=(0, 0, 0), spacing=(8.0, 1.0, 1.0)))
    path = medseg.save(vol, tmp_path / "long.nii.gz")
    with pytest.raises(GeometryError, match=r"spans 2400 x 4 x 3 mm, more than the plausible"):
        medseg.load(path)


# -- the command line ----------------------------------------------------------------------
def test_segment_refuses_a_bad_slice_and_writes_nothing(
        shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, bad, k, n = _corrupt_middle(shared_data, CIP, tmp_path / "series", _intercept_off)
    out = tmp_path / "out"
    assert main(["segment", str(folder), "-o", str(out), "--method", "threshold",
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"medseg: error: {folder}") and len(err.strip().splitlines()) == 1
    assert f"slice {k} of {n} ({bad.name})" in err
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert written == []


@pytest.mark.parametrize(("edit", "words"), [
    (_slope_zero, "RescaleSlope is 0"),  # a header check: discovery refuses
    (_garbage_values, "differs from its neighbours"),  # a pixel check: info reads the pixels
])
def test_info_shows_the_refusal(shared_data: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str], edit: Edit,
                                words: str) -> None:
    intact = _copy_series(shared_data, CIP, tmp_path / "intact")
    assert main(["info", str(intact)]) == 0
    assert "would use:" in capsys.readouterr().out
    folder, bad, _, _ = _corrupt_middle(shared_data, CIP, tmp_path / "series", edit)
    assert main(["info", str(folder)]) == 1
    captured = capsys.readouterr()
    assert "would use:" not in captured.out
    assert "cannot be used:" in captured.out and words in captured.out
    assert bad.name in captured.out
    assert captured.err.startswith(f"medseg: error: {folder}: nothing to use:")
    assert len(captured.err.strip().splitlines()) == 1
    assert main(["info", str(folder), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    (series,) = data["series"]
    assert data["chosen_series"] is None and series["usable"] is False
    assert words in series["problem"] and bad.name in series["problem"]
    # and segment says the same
    assert main(["segment", str(folder), "-o", str(tmp_path / "out"), "--method",
                 "threshold", "--quiet"]) == 1
    assert words in capsys.readouterr().err
