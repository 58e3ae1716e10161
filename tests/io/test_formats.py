"""NIfTI / NRRD / MHA reading and writing: exact round trips, explicit RAS<->LPS, refusals."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg import io
from medseg.errors import (
    ConfigError,
    GeometryError,
    NotAVolumeError,
    NotFoundError,
    OutputError,
    PixelDataError,
    UnreadableFileError,
)
from medseg.volume import CTVolume, Geometry


def _oblique() -> np.ndarray:
    a = np.radians(23.0)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    return rot @ np.diag([-1.0, 1.0, 1.0])


def _volume(direction: np.ndarray, spacing=(0.85, 1.2, 0.9), dtype=np.int16) -> CTVolume:
    rng = np.random.default_rng(0)
    arr = rng.integers(-1024, 2000, size=(7, 9, 11)).astype(dtype)
    return CTVolume(arr, Geometry(origin=(-120.25, 33.5, -710.125), spacing=spacing,
                                  direction=direction))


DIRECTIONS = {
    "identity": np.eye(3),
    "ras": np.diag([-1.0, -1.0, 1.0]),
    "flip_z": np.diag([1.0, 1.0, -1.0]),
    "coronal": np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]),
    "oblique": _oblique(),
}


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_round_trip_exact(tmp_path: Path, suffix: str, name: str) -> None:
    vol = _volume(DIRECTIONS[name])
    out = io.save(vol, tmp_path / f"v{suffix}")
    back = io.load(out)
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.array.dtype == vol.array.dtype
    # NIfTI stores the affine in float32: 1e-4 mm is far below any voxel
    assert back.geometry.is_close(vol.geometry, atol_mm=1e-4, atol_dir=1e-6)
    assert not list(tmp_path.glob(".*partial*")), "temporary file left behind"


def test_nifti_written_in_ras_with_scanner_codes(tmp_path: Path) -> None:
    vol = _volume(np.eye(3))
    path = io.save(vol, tmp_path / "v.nii.gz")
    img = nib.load(str(path))
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    # voxel (0,0,0) is at LPS origin, i.e. RAS (-x, -y, z)
    np.testing.assert_allclose(img.affine[:3, 3], (120.25, -33.5, -710.125), atol=1e-4)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    # nibabel's (x, y, z) array is our (z, y, x) transposed
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), vol.array.transpose(2, 1, 0))


def _nifti(tmp_path: Path, data: np.ndarray, affine: np.ndarray, code: int = 1) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=code)
    img.set_qform(affine, code=code)
    path = tmp_path / "x.nii.gz"
    nib.save(img, str(path))
    return path


def test_nifti_with_nans_refused(tmp_path: Path) -> None:
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    path = _nifti(tmp_path, data, np.eye(4))
    with pytest.raises(PixelDataError, match=r"x\.nii\.gz: 1 voxel\(s\) are NaN"):
        io.load(path)


def test_nifti_with_singular_affine_refused(tmp_path: Path) -> None:
    aff = np.eye(4)
    aff[:3, 2] = aff[:3, 1]  # two axes pointing the same way
    path = tmp_path / "s.nii.gz"
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), aff)
    img.header.set_sform(aff, code=1)
    nib.save(img, str(path))
    with pytest.raises(GeometryError, match=r"s\.nii\.gz: .*(singular|orthonormal)"):
        io.load(path)


def test_nifti_without_geometry_refused(tmp_path: Path) -> None:
    path = _nifti(tmp_path, np.zeros((4, 4, 4), np.int16), np.eye(4), code=0)
    with pytest.raises(GeometryError, match="neither sform nor qform"):
        io.load(path)


@pytest.mark.parametrize("shape", [(8, 8), (4, 4, 4, 3)])
def test_nifti_not_3d_refused(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = _nifti(tmp_path, np.zeros(shape, np.int16), np.eye(4))
    with pytest.raises(NotAVolumeError, match="dimensions"):
        io.load(path)


def test_truncated_nifti_refused(tmp_path: Path) -> None:
    path = io.save(_volume(np.eye(3)), tmp_path / "t.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableFileError, match=r"t\.nii\.gz"):
        io.load(path)


def test_missing_path_and_bad_suffix(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no such file"):
        io.load(tmp_path / "nope.nii.gz")
    with pytest.raises(ConfigError, match="unknown output format"):
        io.save(_volume(np.eye(3)), tmp_path / "out.png")
    with pytest.raises(ConfigError, match="--series applies to DICOM"):
        io.load(io.save(_volume(np.eye(3)), tmp_path / "v.nrrd"), series="1.2.3")


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out" / "v.nii.gz"

    def boom(img: object, filename: str) -> None:
        Path(filename).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(OutputError, match="No space left"):
        io.save(_volume(np.eye(3)), target)
    assert list(target.parent.iterdir()) == []


def test_existing_output_replaced_only_when_complete(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    target = io.save(_volume(np.eye(3)), tmp_path / "v.nii.gz")
    before = target.read_bytes()

    def boom(img: object, filename: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        io.save(_volume(np.eye(3), dtype=np.int32), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.nii.gz"]


def test_outputs_get_the_users_usual_permissions(tmp_path: Path) -> None:
    """Atomic writes go through mkstemp (mode 0600); the result must not stay private."""
    import os

    from medseg.io.atomic import atomic_output

    old = os.umask(0o022)
    os.umask(old)
    with atomic_output(tmp_path / "x.json") as tmp:
        tmp.write_text("{}")
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~old
