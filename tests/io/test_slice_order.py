"""Property-based tests of slice ordering and stack geometry (no files: frame records only)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medseg.errors import InconsistentOrientationError, MissingSlicesError, NotAVolumeError
from medseg.io.dicom import FrameRecord, SeriesInfo
from medseg.io.dicom.checks import _plan_stack


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    if np.linalg.det(q) < 0:
        q[:, 2] *= -1
    return q


def _frames(positions: np.ndarray, row: np.ndarray, col: np.ndarray,
            instance: list[int] | None = None, spacing=(0.7, 0.8)) -> list[FrameRecord]:
    out = []
    for n, p in enumerate(positions):
        out.append(FrameRecord(
            path=f"/x/{n}.dcm", frame=None, sop_instance_uid=f"1.2.{n}",
            instance_number=instance[n] if instance else n + 1,
            position=tuple(float(v) for v in p),  # type: ignore[arg-type]
            orientation=tuple(float(v) for v in (*row, *col)),  # type: ignore[arg-type]
            pixel_spacing=spacing, rows=4, columns=5, slope=1.0, intercept=-1024.0,
            slice_thickness=1.0, acquisition_number=1, pixel_offset=None, bits_allocated=16,
            bits_stored=16, pixel_representation=1, transfer_syntax="1.2.840.10008.1.2.1"))
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(3, 40),
       gap=st.floats(0.3, 10.0), shuffle_instances=st.booleans())
def test_order_follows_the_normal_not_names_or_instance_numbers(
        seed: int, n: int, gap: float, shuffle_instances: bool) -> None:
    rng = np.random.default_rng(seed)
    rot = _rotation(rng)
    row, col, normal = rot[:, 0], rot[:, 1], rot[:, 2]
    origin = rng.uniform(-300, 300, 3)
    positions = origin + np.outer(np.arange(n) * gap, normal)
    perm = rng.permutation(n)
    instances = list(rng.permutation(n) + 1) if shuffle_instances else None
    s = SeriesInfo(series_uid="1.2.3", frames=_frames(positions[perm], row, col, instances))
    plan = _plan_stack(s)
    # the plan visits the frames in increasing position along the normal
    ordered = np.array([s.frames[i].position for i in plan.order])
    np.testing.assert_allclose(ordered, positions, atol=1e-6)
    assert plan.regular and plan.corrections == []
    np.testing.assert_allclose(plan.gaps, gap, atol=1e-6)
    np.testing.assert_allclose(plan.normal, np.cross(row, col), atol=1e-9)
    assert plan.tilt_deg == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(3, 30), tilt=st.floats(2.0, 30.0))
def test_tilt_is_measured(seed: int, n: int, tilt: float) -> None:
    rng = np.random.default_rng(seed)
    rot = _rotation(rng)
    row, col, normal = rot[:, 0], rot[:, 1], rot[:, 2]
    step = 2.0 * normal + 2.0 * np.tan(np.radians(tilt)) * col
    positions = np.outer(np.arange(n), step)
    s = SeriesInfo(series_uid="1.2.3", frames=_frames(positions[::-1], row, col))
    plan = _plan_stack(s)
    assert plan.tilt_deg == pytest.approx(tilt, abs=1e-6)
    assert not plan.regular
    assert any("gantry tilt" in c for c in plan.corrections)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(5, 30), gap=st.floats(0.5, 5.0),
       data=st.data())
def test_missing_slice_refused_anywhere(seed: int, n: int, gap: float,
                                        data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    rot = _rotation(rng)
    drop = data.draw(st.integers(1, n - 2))
    positions = np.delete(np.outer(np.arange(n) * gap, rot[:, 2]), drop, axis=0)
    s = SeriesInfo(series_uid="1.2.3", frames=_frames(positions, rot[:, 0], rot[:, 1]))
    with pytest.raises(MissingSlicesError, match=r"1 slice\(s\) missing"):
        _plan_stack(s)


def test_variable_spacing_is_corrected_not_refused() -> None:
    eye = np.eye(3)
    positions = np.outer([0.0, 1.0, 2.5, 4.7, 7.0], eye[:, 2])
    plan = _plan_stack(SeriesInfo(series_uid="1", frames=_frames(positions, eye[0], eye[1])))
    assert not plan.regular
    assert any("variable slice spacing" in c for c in plan.corrections)


def test_duplicates_and_orientation() -> None:
    eye = np.eye(3)
    positions = np.outer([0.0, 1.0, 1.0, 2.0], eye[:, 2])
    with pytest.raises(NotAVolumeError, match="share a position"):
        _plan_stack(SeriesInfo(series_uid="1", frames=_frames(positions, eye[0], eye[1])))
    frames = _frames(np.outer([0.0, 1.0, 2.0], eye[:, 2]), eye[0], eye[1])
    frames[1] = _frames(np.outer([1.0], eye[:, 2]), eye[0], eye[2])[0]
    with pytest.raises(InconsistentOrientationError, match="2 different orientations"):
        _plan_stack(SeriesInfo(series_uid="1", frames=frames))
