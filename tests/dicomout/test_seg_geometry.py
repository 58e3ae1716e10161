"""The SEG lies on the source images' own planes, whatever the loader did to the grid.

Label volumes are drawn in world coordinates (a sphere of label 1, another of label 2) on the
grid medseg loads; the SEG is read back frame by frame from its own plane positions and
compared, at every pixel's world point, with the labels the NIfTI output holds there."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

import medseg
from medseg.errors import OutputError
from medseg.io.dicom_seg import build_seg, labels_on_planes, read_source_planes, write_seg
from medseg.io.dicom_write import write_dicom_series
from medseg.volume import CTVolume, Geometry
from tests.conftest import need
from tests.dicomout.world import compare_with_volume, planes_with_labels, seg_frames
from tests.helpers import reindex


def _rotation(ax_deg: float, az_deg: float) -> np.ndarray:
    a, b = np.radians(ax_deg), np.radians(az_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


def world_labels(grid: CTVolume, offset_mm: float = 35.0, radius_mm: float = 25.0,
                 radius2_mm: float = 18.0) -> CTVolume:
    """uint8 labels on ``grid``: 1 in a sphere of ``radius_mm`` left of the grid's centre
    (LPS -x), 2 in a sphere of ``radius2_mm`` to its right, both defined in world millimetres
    (distances in an orthonormal grid are separable in its index axes, so this is quick)."""
    nk, nj, ni = grid.shape
    g = grid.geometry
    centre = g.index_to_world([[(ni - 1) / 2, (nj - 1) / 2, (nk - 1) / 2]])[0]
    out = np.zeros(grid.shape, np.uint8)
    shift = np.array([offset_mm, 0.0, 0.0])
    for label, c, r in ((1, centre - shift, radius_mm), (2, centre + shift, radius2_mm)):
        ci, cj, ck = g.world_to_index(c)[0]
        sx, sy, sz = g.spacing
        d2 = ((sz * (np.arange(nk) - ck)) ** 2)[:, None, None] \
            + ((sy * (np.arange(nj) - cj)) ** 2)[None, :, None] \
            + ((sx * (np.arange(ni) - ci)) ** 2)[None, None, :]
        out[d2 <= r * r] = label
    return grid.with_array(out)


def _synthetic_ct(direction: np.ndarray, shape=(30, 64, 72), spacing=(0.9, 1.1, 2.0)
                  ) -> CTVolume:
    arr = np.full(shape, -1000, np.int16)
    arr[:, 8:-8, 8:-8] = 40
    return CTVolume(arr, Geometry(origin=(-31.0, -35.5, 12.0), spacing=spacing,
                                  direction=direction))


def _check_world(image: CTVolume, labels: CTVolume, tmp: Path, *, nifti_labels: bool = True
                 ) -> None:
    """Write the SEG and the NIfTI of ``labels``; every SEG pixel agrees in world space with
    the NIfTI, frames sit on their source planes, and no labelled source plane is missing."""
    seg_path = write_seg(image, labels, tmp / "lungs.seg.dcm", method="threshold")
    ref = medseg.load(medseg.save(labels, tmp / "lungs.nii.gz")) if nifti_labels else labels
    agreement = compare_with_volume(seg_path, ref)
    assert agreement.labelled > 1000
    assert agreement.disagree_inside == 0, agreement
    assert agreement.fraction >= 0.99, agreement
    assert agreement.disagree_at_boundary <= 0.01 * agreement.labelled, agreement
    frames = seg_frames(seg_path)
    src_pos = {str(ds.SOPInstanceUID): np.array(ds.ImagePositionPatient, float)
               for ds in (pydicom.dcmread(f, stop_before_pixels=True)
                          for f in dict.fromkeys(image.metadata.source_files))}
    for pos, _iop, _sp, _seg, src, _pix in frames:
        np.testing.assert_allclose(pos, src_pos[src], atol=1e-3)
    present = {(src, segno) for _p, _i, _s, segno, src, pix in frames if pix.any()}
    assert planes_with_labels(list(image.metadata.source_files), ref) == present


@pytest.fixture(scope="module")
def ge_tilted(shared_data: Path) -> CTVolume:
    return medseg.load(need(shared_data, "dcm-qa-ct/In/GE"))


def test_gantry_tilt_and_variable_spacing(ge_tilted: CTVolume, tmp_path: Path) -> None:
    corrections = " ".join(ge_tilted.metadata.corrections)
    assert "gantry tilt" in corrections and "variable slice spacing" in corrections
    assert ge_tilted.metadata.sop_instance_uids == ()  # the grid is not the source slices
    labels = world_labels(ge_tilted)
    _check_world(ge_tilted, labels, tmp_path)
    seg = pydicom.dcmread(tmp_path / "lungs.seg.dcm")
    # 28 tilted source planes, not the 135 resampled slices
    assert len({f[4] for f in seg_frames(tmp_path / "lungs.seg.dcm")}) <= 28
    assert seg.FrameOfReferenceUID == ge_tilted.metadata.frame_of_reference_uid


def test_tilted_planes_fast_and_per_pixel_paths_agree(ge_tilted: CTVolume) -> None:
    _, planes = read_source_planes(ge_tilted)
    labels = world_labels(ge_tilted)
    fast = labels_on_planes(labels, planes)
    assert fast.any()
    np.testing.assert_array_equal(fast, labels_on_planes(labels, planes, per_pixel=True))


@pytest.fixture(scope="module")
def oblique(tmp_path_factory: pytest.TempPathFactory) -> CTVolume:
    folder = tmp_path_factory.mktemp("oblique") / "dicom"
    write_dicom_series(_synthetic_ct(_rotation(20.0, 15.0)), folder, uid_seed="oblique")
    return medseg.load(folder)


def test_oblique_series(oblique: CTVolume, tmp_path: Path) -> None:
    assert oblique.geometry.orientation_code() == "LPS"
    assert not np.allclose(oblique.direction, np.eye(3), atol=0.1)
    _check_world(oblique, world_labels(oblique, offset_mm=18, radius_mm=12, radius2_mm=9),
                 tmp_path)


def test_labels_on_another_grid_are_resampled_per_pixel(oblique: CTVolume,
                                                       tmp_path: Path) -> None:
    """Labels on an axis-aligned grid with other spacing (not the source planes): every
    pixel is looked up on its own, and still agrees with those labels in world space."""
    lo, hi = oblique.world_bounds()
    grid = CTVolume(np.zeros((40, 80, 90), np.uint8),
                    Geometry(origin=lo - 5, spacing=(hi - lo + 10) / [89, 79, 39]))
    labels = world_labels(grid, offset_mm=18, radius_mm=12, radius2_mm=9)
    _, planes = read_source_planes(oblique)
    frames = labels_on_planes(labels, planes)
    assert frames.any()
    np.testing.assert_array_equal(frames, labels_on_planes(labels, planes, per_pixel=True))
    _check_world(oblique, labels, tmp_path, nifti_labels=False)


@pytest.mark.parametrize("perm, flips", [((1, 0, 2), (True, False, True)),
                                         ((0, 1, 2), (False, True, False))],
                         ids=["transposed-flipped", "flipped-rows"])
def test_flipped_or_transposed_storage(perm, flips, tmp_path: Path) -> None:
    stored = reindex(_synthetic_ct(np.eye(3)), perm, flips)
    write_dicom_series(stored, tmp_path / "dicom", uid_seed="flip")
    image = medseg.load(tmp_path / "dicom")
    labels = world_labels(image, offset_mm=18, radius_mm=12, radius2_mm=9)
    _check_world(image, labels, tmp_path)
    # the same voxels in another index order give the very same SEG frames
    _, planes = read_source_planes(image)
    np.testing.assert_array_equal(labels_on_planes(labels, planes),
                                  labels_on_planes(reindex(labels, (2, 0, 1),
                                                           (True, False, True)), planes))


def test_regular_grid_is_the_identity(oblique: CTVolume) -> None:
    """Untouched grid: frame n is label slice k = n, by the shift path and per pixel."""
    labels = world_labels(oblique, offset_mm=18, radius_mm=12, radius2_mm=9)
    _, planes = read_source_planes(oblique)
    assert [p.sop_instance_uid for p in planes] == list(oblique.metadata.sop_instance_uids)
    np.testing.assert_array_equal(labels_on_planes(labels, planes), labels.array)
    np.testing.assert_array_equal(labels_on_planes(labels, planes, per_pixel=True),
                                  labels.array)


def test_enhanced_multiframe_source(tmp_path: Path) -> None:
    """One multi-frame image: frames reference it by frame number and decode back."""
    vol = _synthetic_ct(_rotation(10.0, 0.0), shape=(12, 40, 48))
    files = write_dicom_series(vol, tmp_path / "single", uid_seed="mf")
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(f) for f in files], series_instance_uid=hd.UID(), series_number=2,
        sop_instance_uid=hd.UID(), instance_number=1)
    (tmp_path / "mf").mkdir()
    mf.save_as(tmp_path / "mf" / "ct.dcm", enforce_file_format=True)
    image = medseg.load(tmp_path / "mf")
    labels = world_labels(image, offset_mm=12, radius_mm=8, radius2_mm=6)
    encoded = build_seg(image, labels, method="threshold")
    assert {p.frame_number for p in encoded.planes} == set(range(1, 13))
    seg = hd.seg.segread(io.BytesIO(encoded.data))
    back = seg.get_pixels_by_source_frame(
        str(mf.SOPInstanceUID), [p.frame_number or 0 for p in encoded.planes],
        combine_segments=True, assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(back, labels_on_planes(labels, encoded.planes))
    assert back.any()


def test_non_lung_labels_are_refused(oblique: CTVolume) -> None:
    labels = oblique.with_array(np.full(oblique.shape, 3, np.uint8))
    with pytest.raises(OutputError, match=r"values \[3\]"):
        build_seg(oblique, labels)


def test_non_dicom_volume_is_refused(tmp_path: Path) -> None:
    vol = _synthetic_ct(np.eye(3))
    image = medseg.load(medseg.save(vol, tmp_path / "ct.nii.gz"))
    with pytest.raises(OutputError, match="needs the DICOM images"):
        build_seg(image, image.with_array(np.zeros(image.shape, np.uint8)))


@pytest.mark.parametrize("values", [(1,), ()], ids=["right-only", "empty"])
def test_missing_segments(oblique: CTVolume, values: tuple[int, ...]) -> None:
    """One lung, or none: the SEG still describes both segments and decodes exactly."""
    labels = world_labels(oblique, offset_mm=18, radius_mm=12, radius2_mm=9)
    arr = np.where(np.isin(labels.array, values), labels.array, 0).astype(np.uint8)
    encoded = build_seg(oblique, labels.with_array(arr))
    assert len(encoded.dataset.SegmentSequence) == 2
    np.testing.assert_array_equal(encoded.frames, arr)
