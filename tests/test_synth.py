"""The phantom generator: deterministic, anatomically sane labels, exact DICOM round trip."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

import medseg
from medseg.cli import main
from medseg.errors import OutputError
from medseg.io.dicom_write import write_dicom_series
from medseg.synth import AIR_HU, make_phantom
from medseg.volume import CTVolume, Geometry
from tests.helpers import reindex


@pytest.fixture(scope="module")
def phantom() -> tuple[CTVolume, CTVolume]:
    return make_phantom(seed=3, shape=(60, 128, 128), spacing=(2.7, 2.7, 5.0), pathology=False)


def test_deterministic() -> None:
    a, la = make_phantom(seed=5, shape=(20, 64, 64))
    b, lb = make_phantom(seed=5, shape=(20, 64, 64))
    c, _ = make_phantom(seed=6, shape=(20, 64, 64))
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(la.array, lb.array)
    assert not np.array_equal(a.array, c.array)


def _world_x(vol: CTVolume, mask: np.ndarray) -> float:
    k, j, i = np.nonzero(mask)
    return float(vol.geometry.index_to_world(np.c_[i, j, k])[:, 0].mean())


def test_labels_anatomy(phantom: tuple[CTVolume, CTVolume]) -> None:
    image, labels = phantom
    assert image.same_grid(labels)
    assert image.array.dtype == np.int16 and labels.array.dtype == np.uint8
    lab, hu = labels.array, image.array
    right, left = lab == 1, lab == 2
    assert right.any() and left.any()
    # LPS: +x is the patient's left, so the right lung lies at smaller x
    assert _world_x(labels, right) < 0 < _world_x(labels, left)
    v_right, v_left = right.sum(), left.sum()
    assert 0.8 < v_right / v_left < 2.0
    total_ml = (v_right + v_left) * labels.voxel_volume_ml()
    assert 2000 < total_ml < 9000
    parenchyma = hu[(lab > 0) & (hu < -500)]
    assert -900 < float(np.median(parenchyma)) < -750
    # vessels and the nodule (dense) are inside the lung label
    assert ((lab > 0) & (hu > -100)).sum() > 50
    # body soft tissue
    soft = hu[(lab == 0) & (hu > -50) & (hu < 120)]
    assert 20 < float(np.median(soft)) < 60


def test_airways_are_not_lung(phantom: tuple[CTVolume, CTVolume]) -> None:
    image, labels = phantom
    hu, lab = image.array, labels.array
    # the trachea: air in the midline just below the lung apices, labelled background
    ni = hu.shape[2]
    k = int(np.flatnonzero((lab > 0).any(axis=(1, 2)))[-1]) - 2
    mid = slice(ni // 2 - 3, ni // 2 + 3)
    trachea = (hu[k, :, mid] < -900) & (lab[k, :, mid] == 0)
    assert trachea.sum() >= 4
    assert not ((hu[k, :, mid] < AIR_HU + 100) & (lab[k, :, mid] > 0)).any()


def test_synth_cli_writes_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", str(tmp_path / "p"), "--seed", "2", "--shape", "16,48,48"]) == 0
    img = medseg.load(tmp_path / "p" / "image.nii.gz")
    dcm = medseg.load(tmp_path / "p" / "dicom")
    lab = medseg.load(tmp_path / "p" / "labels.nii.gz")
    np.testing.assert_array_equal(img.array, dcm.array)
    assert dcm.geometry.is_close(img.geometry) and lab.same_grid(img)
    assert dcm.metadata.modality == "CT"


def test_dicom_write_refuses_non_empty_folder(tmp_path: Path) -> None:
    image, _ = make_phantom(seed=1, shape=(4, 16, 16))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        write_dicom_series(image, tmp_path / "d")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), nk=st.integers(3, 6), nj=st.integers(3, 9),
       ni=st.integers(3, 9), sx=st.floats(0.3, 3.0), sy=st.floats(0.3, 3.0),
       sz=st.floats(0.5, 5.0), angle=st.floats(0.0, np.pi), flip=st.booleans())
def test_dicom_round_trip_any_geometry(tmp_path_factory: pytest.TempPathFactory, seed: int,
                                       nk: int, nj: int, ni: int, sx: float, sy: float,
                                       sz: float, angle: float, flip: bool) -> None:
    rng = np.random.default_rng(seed)
    rot = _rotation(rng.normal(size=3), angle)
    if flip:
        rot[:, 2] *= -1  # k against the slice normal: the loader returns it reversed
    arr = rng.integers(-1024, 2000, (nk, nj, ni)).astype(np.int16)
    vol = CTVolume(arr, Geometry(origin=rng.uniform(-300, 300, 3), spacing=(sx, sy, sz),
                                 direction=rot))
    out = tmp_path_factory.mktemp("rt") / "series"
    write_dicom_series(vol, out, uid_seed=str(seed))
    back = medseg.load(out)
    expected = reindex(vol, (0, 1, 2), (False, False, True)) if flip else vol
    np.testing.assert_array_equal(back.array, expected.array)
    # DS strings keep 6 decimals: positions within 1e-5 mm
    assert back.geometry.is_close(expected.geometry, atol_mm=1e-4, atol_dir=1e-5)


# make_phantom(seed=0, shape=(48, 96, 96)) before the abdomen/effusion options existed
_DEFAULT_SHA256 = "17833399bdce51251e6272bbe6a38950675786653605dc873ae4961734fc89b7"
_SMALL = {"shape": (32, 64, 64), "spacing": (5.5, 5.5, 8.0)}


def test_defaults_byte_identical() -> None:
    image, labels = make_phantom(seed=0, shape=(48, 96, 96))
    h = hashlib.sha256(image.array.tobytes())
    h.update(labels.array.tobytes())
    assert h.hexdigest() == _DEFAULT_SHA256
    # explicit "off" options are the defaults
    image2, labels2 = make_phantom(seed=0, shape=(48, 96, 96), abdomen=False, effusion=False,
                                   coverage="chest")
    np.testing.assert_array_equal(image.array, image2.array)
    np.testing.assert_array_equal(labels.array, labels2.array)


def test_options_deterministic() -> None:
    kw = {"abdomen": True, "effusion": True, "coverage": "abdomen", "shape": (16, 48, 48),
          "spacing": (7.5, 7.5, 10.0)}
    a, la = make_phantom(seed=4, **kw)  # type: ignore[arg-type]
    b, lb = make_phantom(seed=4, **kw)  # type: ignore[arg-type]
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(la.array, lb.array)
    c, _ = make_phantom(seed=4, abdomen=None, effusion=None, coverage=None, shape=(8, 32, 32))
    d, _ = make_phantom(seed=4, abdomen=None, effusion=None, coverage=None, shape=(8, 32, 32))
    np.testing.assert_array_equal(c.array, d.array)
    with pytest.raises(ValueError, match="coverage"):
        make_phantom(seed=4, shape=(4, 16, 16), coverage="pelvis")  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [1, 2])
def test_abdomen_gas_is_not_lung(seed: int) -> None:
    plain, lab_plain = make_phantom(seed=seed, coverage="abdomen", **_SMALL)  # type: ignore[arg-type]
    image, labels = make_phantom(seed=seed, coverage="abdomen", abdomen=True, **_SMALL)  # type: ignore[arg-type]
    hu, lab = image.array, labels.array
    # the abdomen never changes the labels (the same main random stream: same noise too)
    np.testing.assert_array_equal(lab, lab_plain.array)
    gas = (hu.astype(np.int32) - plain.array < -500) & (hu < -900)
    assert not (lab[gas] > 0).any()
    voxel_ml = labels.voxel_volume_ml()
    assert gas.sum() * voxel_ml > 50
    # the scan holds only the lung bases: lungs in the top slices, not in the bottom half
    lung_z = np.flatnonzero((lab > 0).any(axis=(1, 2)))
    assert lung_z.size and lung_z.min() > lab.shape[0] // 2
    # gas lies below the lung base: under the lung in its column, and apart from it by a
    # soft-tissue diaphragm (and the stomach/bowel wall)
    lung = lab > 0
    k, j, i = np.nonzero(gas)
    under = np.array([lung[kk + 1:, jj, ii].any() for kk, jj, ii in zip(k, j, i, strict=True)])
    assert under.sum() * voxel_ml > 20
    sx, sy, sz = labels.geometry.spacing
    dist = ndimage.distance_transform_edt(~lung, sampling=(sz, sy, sx))
    assert float(dist[gas].min()) >= 5.0
    # some of it right under the left lung (the stomach fundus)
    left = lab == 2
    assert any(left[kk + 1:, jj, ii].any() for kk, jj, ii in zip(k, j, i, strict=True))


def test_abdomen_in_chest_coverage_keeps_lungs() -> None:
    plain, lab_plain = make_phantom(seed=3, **_SMALL)  # type: ignore[arg-type]
    image, labels = make_phantom(seed=3, abdomen=True, **_SMALL)  # type: ignore[arg-type]
    np.testing.assert_array_equal(labels.array, lab_plain.array)
    changed = image.array != plain.array
    assert changed.any()
    # organs only under the lungs: nothing changes in the top half of the chest
    assert not changed[image.array.shape[0] // 2:].any()


@pytest.mark.parametrize("seed", [1, 3])
def test_effusion_replaces_lung(seed: int) -> None:
    plain, lab_plain = make_phantom(seed=seed, **_SMALL)  # type: ignore[arg-type]
    image, labels = make_phantom(seed=seed, effusion=True, **_SMALL)  # type: ignore[arg-type]
    hu, lab, lab0 = image.array, labels.array, lab_plain.array
    pleural = lab0 > 0
    assert (lab > 0).sum() < pleural.sum()
    assert not ((lab > 0) & ~pleural).any()  # the lung only shrinks
    fluid = pleural & (plain.array < -500) & (hu >= -10) & (hu <= 40)
    assert fluid.sum() * labels.voxel_volume_ml() > 20
    assert not (lab[fluid] > 0).any()
    lost = pleural & (lab == 0)
    assert -10 < float(np.median(hu[lost])) < 40
    # dependent: the fluid lies posterior (larger y in LPS) to the lung it replaced
    _, j_fluid, _ = np.nonzero(lost)
    _, j_lung, _ = np.nonzero(pleural)
    assert j_fluid.mean() > j_lung.mean()
    # and low: in the bottom part of the lungs
    k_fluid = np.nonzero(lost)[0]
    k_lung = np.nonzero(pleural)[0]
    assert np.median(k_fluid) < np.median(k_lung)
