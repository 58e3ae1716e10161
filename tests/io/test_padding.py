"""Scanner padding and out-of-field pixels (issue 12): set to air by the loaders, recorded in
``metadata.corrections``; values inside the body untouched; data not in HU still refused.

Real data: LIDC-IDRI-0001 (GE, -2048 HU outside the circle, a PixelPaddingValue that matches
no pixel) and RIDER Pilot 0117 (GE, PixelPaddingValue -2000 stored = -3024 HU), extracted once
per session from their ``.tar.xz``. Padded variants are copies of cip-ct64 (64x64x79, stored
values = HU) and NIfTI files written from it.
"""

from __future__ import annotations

import re
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

import medseg
from medseg.cli import main
from medseg.errors import InputError
from medseg.io.padding import OUT_OF_FIELD_MAX_HU, padding_stored_range
from medseg.preprocess import check_hounsfield
from medseg.volume import CTVolume, Geometry, VolumeMetadata
from tests.conftest import need

REAL = {
    # name: (tar.xz under the shared data, padding HU stored in the files, rule that finds it)
    "lidc-idri-0001": ("real-ct/lidc-idri-0001/data_767.tar.xz", -2048, "out-of-field"),
    "rider-pilot-0117": ("real-ct/rider-pilot-0117/ct_stepha-mar-10.tar.xz", -3024,
                         "PixelPaddingValue -2000"),
}
CIP = "cip-ct64/ct-64Dicom"
N = 64
_yy, _xx = np.mgrid[0:N, 0:N]
#: Outside the reconstruction circle of the 64x64 copies (touches every border).
OUTSIDE = (_yy - 31.5) ** 2 + (_xx - 31.5) ** 2 > 30.0 ** 2
#: A 3x3 blob well inside the body: far below air but not connected to the border.
BLOB = (slice(40, 43), slice(30, 33))


@pytest.fixture(scope="session")
def real_ct(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real padded series, extracted once per session (lazily: only those present)."""
    out: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("real-ct")
    for name, (rel, _, _) in REAL.items():
        tar = shared_data / rel
        if not tar.exists():
            continue
        dest = root / name
        with tarfile.open(tar, "r:xz") as tf:
            tf.extractall(dest, filter="data")
        out[name] = dest
    return out


def _replaced(corrections: list[str]) -> int:
    return sum(int(m.group(1).replace(",", "")) for c in corrections
               if (m := re.search(r"set to -1024 HU \(air\) in ([\d,]+) voxels", c)))


# -- the real series ---------------------------------------------------------------------
@pytest.mark.shared_data
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_padded_series(shared_data: Path, real_ct: dict[str, Path], name: str) -> None:
    rel, pad_hu, rule = REAL[name]
    need(shared_data, rel)
    vol = medseg.load(real_ct[name])
    assert vol.array.min() >= -1024
    assert check_hounsfield(vol) == []
    (corr,) = [c for c in vol.metadata.corrections if "(air)" in c]
    assert rule in corr and f"were {pad_hu} HU" in corr, corr
    # voxel for voxel against the stored pixels * slope + intercept, file by file
    n_pad = n_lung = 0
    raw_min = raw_max = 0.0
    for k, f in enumerate(vol.metadata.source_files):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) \
            + float(ds.RescaleIntercept)
        raw_min, raw_max = min(raw_min, hu.min()), max(raw_max, hu.max())
        pad = hu <= OUT_OF_FIELD_MAX_HU
        got = vol.array[k].astype(np.float64)
        np.testing.assert_array_equal(got[~pad], hu[~pad])  # body, lungs, air: unchanged
        assert (got[pad] == -1024).all()
        n_pad += int(pad.sum())
        n_lung += int(((hu > -950) & (hu < -700)).sum())
    assert raw_min == pad_hu
    assert vol.array.max() == raw_max
    assert n_lung > 1_000_000  # the lungs were compared, and are unchanged
    assert _replaced(vol.metadata.corrections) == n_pad > 0


@pytest.mark.shared_data
def test_info_lists_nifti_correction(shared_data: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    ref = medseg.load(need(shared_data, CIP))
    arr = ref.array.copy()
    arr[:, OUTSIDE] = -3024
    path = medseg.save(ref.with_array(arr), tmp_path / "padded.nii.gz")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "correction: out-of-field pixels" in out and "were -3024 HU" in out


# -- padded copies of cip-ct64 -----------------------------------------------------------
def _write_copy(files: list[Path], dest: Path, *, pad_stored: int | None,
                tag: tuple[str, int] | None = None, limit: tuple[str, int] | None = None,
                blob: int | None = None, shift: int = 0, drop_rescale: bool = False) -> Path:
    """DICOM copies: outside the circle set to ``pad_stored``; optional PixelPaddingValue
    (VR, value) and PixelPaddingRangeLimit; a low blob inside; stored values shifted."""
    dest.mkdir(parents=True)
    for f in files:
        ds = pydicom.dcmread(f)
        arr = ds.pixel_array.astype(np.int32) + shift
        if pad_stored is not None:
            arr[OUTSIDE] = pad_stored
        if blob is not None:
            arr[BLOB] = blob
        ds.PixelData = arr.astype(np.int16).tobytes()
        if tag is not None:
            ds.add_new(0x00280120, tag[0], tag[1])
        if limit is not None:
            ds.add_new(0x00280121, limit[0], limit[1])
        if drop_rescale:
            for kw in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
                if kw in ds:
                    delattr(ds, kw)
        ds.save_as(dest / f.name)
    return dest


@pytest.fixture(scope="module")
def cip(shared_data: Path) -> tuple[list[Path], CTVolume]:
    folder = need(shared_data, CIP)
    return sorted(folder.iterdir()), medseg.load(folder)


def _expected(ref: CTVolume) -> np.ndarray:
    exp = ref.array.copy()
    exp[:, OUTSIDE] = -1024
    return exp


@pytest.mark.shared_data
@pytest.mark.parametrize("variant", ["no-tag", "tag-SS", "tag-US-bit-pattern", "tag-range"])
def test_padded_dicom_copies(cip: tuple[list[Path], CTVolume], tmp_path: Path,
                             variant: str) -> None:
    files, ref = cip
    assert ref.array.min() > -1100 and not ref.metadata.corrections  # unpadded original
    kwargs: dict = {
        "no-tag": {"blob": -2048},
        "tag-SS": {"tag": ("SS", -2048)},
        "tag-US-bit-pattern": {"tag": ("US", 65536 - 2048)},  # as GE writes it (LIDC: 63536)
        "tag-range": {"tag": ("SS", -3024), "limit": ("SS", -2000)},
    }[variant]
    vol = medseg.load(_write_copy(files, tmp_path / variant, pad_stored=-2048, **kwargs))
    exp = _expected(ref)
    if variant == "no-tag":
        exp[:, BLOB[0], BLOB[1]] = -2048  # inside the body: not touched
    np.testing.assert_array_equal(vol.array, exp)
    n_out = int(OUTSIDE.sum()) * ref.shape[0]
    assert _replaced(vol.metadata.corrections) == n_out
    (corr,) = vol.metadata.corrections
    assert "were -2048 HU" in corr
    assert ("PixelPaddingValue" in corr) == (variant != "no-tag"), corr


@pytest.mark.shared_data
def test_tag_value_at_air_is_left_alone(cip: tuple[list[Path], CTVolume],
                                        tmp_path: Path) -> None:
    """A PixelPaddingValue that maps to air or above cannot be told from measured values: no
    voxel of the body changes (the out-of-field rule still finds the -2048 ring)."""
    files, ref = cip
    vol = medseg.load(_write_copy(files, tmp_path / "t", pad_stored=-2048, tag=("SS", 0)))
    np.testing.assert_array_equal(vol.array, _expected(ref))
    assert len(vol.metadata.corrections) == 1 and "out-of-field" in vol.metadata.corrections[0]


@pytest.mark.shared_data
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_padded_nifti(cip: tuple[list[Path], CTVolume], tmp_path: Path, dtype: type) -> None:
    _, ref = cip
    arr = ref.array.astype(dtype)
    arr[:, OUTSIDE] = -3024
    arr[:, BLOB[0], BLOB[1]] = -3024
    path = medseg.save(ref.with_array(arr), tmp_path / "padded.nii.gz")
    vol = medseg.load(path)
    exp = _expected(ref)
    exp[:, BLOB[0], BLOB[1]] = -3024
    np.testing.assert_array_equal(vol.array, exp.astype(vol.array.dtype))
    assert _replaced(vol.metadata.corrections) == int(OUTSIDE.sum()) * ref.shape[0]
    assert "were -3024 HU" in vol.metadata.corrections[0]


# -- not HU: still refused ---------------------------------------------------------------
def _segment_refuses(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    rc = main(["segment", str(path), "-o", str(tmp_path / "out"), "--method", "threshold",
               "-q"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert err.startswith("medseg: error: ") and str(path) in err and "Traceback" not in err
    assert "Hounsfield" in err
    return err


@pytest.mark.shared_data
def test_raw_stored_values_refused(cip: tuple[list[Path], CTVolume], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Stored values 0..4095 (HU + 1024) with the rescale removed."""
    files, _ = cip
    folder = _write_copy(files, tmp_path / "raw", pad_stored=None, shift=1024,
                         drop_rescale=True)
    vol = medseg.load(folder)
    assert vol.array.min() >= 0 and vol.array.max() <= 4095 and not vol.metadata.corrections
    _segment_refuses(folder, tmp_path, capsys)


@pytest.mark.shared_data
def test_normalised_nifti_refused(cip: tuple[list[Path], CTVolume], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    _, ref = cip
    a = ref.array.astype(np.float32)
    norm = (a - a.min()) / (a.max() - a.min())
    path = medseg.save(ref.with_array(norm), tmp_path / "norm.nii.gz")
    _segment_refuses(path, tmp_path, capsys)


# -- units -------------------------------------------------------------------------------
def test_padding_tag_as_stored_values() -> None:
    kw = {"bits_allocated": 16, "bits_stored": 16}
    assert padding_stored_range(63536, None, pixel_representation=1, **kw) == (-2000, -2000)
    assert padding_stored_range(-2000, None, pixel_representation=1, **kw) == (-2000, -2000)
    assert padding_stored_range(0, None, pixel_representation=0, **kw) == (0, 0)
    assert padding_stored_range(-1024, -3024, pixel_representation=1, **kw) == (-3024, -1024)
    assert padding_stored_range(4000, None, pixel_representation=1, bits_allocated=16,
                                bits_stored=12) == (-96, -96)
    assert padding_stored_range(None, 5, pixel_representation=1, **kw) is None


def _body(padding: float | None, radius: float = 30.0) -> CTVolume:
    rng = np.random.default_rng(1)
    arr = np.full((8, N, N), -1000.0) + rng.normal(0, 10, (8, N, N))
    arr[:, (_yy - 31.5) ** 2 / 0.6 + (_xx - 31.5) ** 2 < 24.0 ** 2] = 40.0
    if padding is not None:
        arr[:, (_yy - 31.5) ** 2 + (_xx - 31.5) ** 2 > radius ** 2] = padding
    return CTVolume(arr.astype(np.float32), Geometry(origin=(0, 0, 0), spacing=(1, 1, 1)),
                    VolumeMetadata(modality="CT"))


def test_check_hounsfield_tolerates_padding_built_in_python() -> None:
    assert check_hounsfield(_body(None)) == []
    (warning,) = check_hounsfield(_body(-2048.0))
    assert "scanner padding" in warning
    with pytest.raises(InputError, match="% of voxels are below -1100"):
        check_hounsfield(_body(-2048.0, radius=20.0))  # 61 % below air: not CT
    raw = _body(None)
    raw.array = raw.array + 1024  # rescale lost: air at 24
    with pytest.raises(InputError, match="does not look like CT in Hounsfield units"):
        check_hounsfield(raw)
