"""A tilted patient: the tilt is measured (body outline, else the bones' mirror symmetry),
the network sees the slices turned upright, the labels come back on the study's own grid
(docs/model-card.md, "A rotated patient": LIDC-IDRI-0001 turned 12 deg, Dice to the clean
mask 0.970 -> 0.989)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

import medseg
from medseg.inference.pose import MIN_TILT_DEG, Pose, body_tilt, turn_slices
from medseg.models import DEFAULT_MODEL, load_model
from medseg.segment import segment
from medseg.volume import CTVolume, to_canonical
from tests.helpers import dice

ROOT = Path(__file__).resolve().parents[2]
PHANTOM = ROOT / "sample_data" / "phantom_000" / "image.nii.gz"


def _axis_deg(img: np.ndarray) -> float:
    """Major axis of a 2D mask (I, J), deg from I towards J."""
    ii, jj = np.nonzero(img > 0.5)
    c = np.cov(np.stack([ii, jj]).astype(float))
    return float(0.5 * np.degrees(np.arctan2(2 * c[0, 1], c[0, 0] - c[1, 1])))


def _ellipse(angle_deg: float, n: int = 96) -> np.ndarray:
    ii, jj = np.mgrid[:n, :n] - (n - 1) / 2
    t = np.radians(angle_deg)
    u, v = ii * np.cos(t) + jj * np.sin(t), -ii * np.sin(t) + jj * np.cos(t)
    return ((u / 40) ** 2 + (v / 20) ** 2 <= 1).astype(np.float32)


@pytest.mark.parametrize("angle", [-17.0, 12.0])
def test_turn_slices_brings_a_tilted_axis_onto_i_and_back(angle: float) -> None:
    img = _ellipse(angle)
    assert _axis_deg(img) == pytest.approx(angle, abs=0.5)
    x = torch.from_numpy(img)[None, None]
    upright = turn_slices(x, angle)
    assert abs(_axis_deg(upright[0, 0].numpy())) < 0.5
    back = turn_slices(upright, -angle)[0, 0].numpy()
    assert dice(back > 0.5, img > 0.5) > 0.99


def _tilt(volume: CTVolume) -> Pose:
    arr, sp = to_canonical(volume)  # (S, P, L) -> (L, P, S) = the model's (I, J, K)
    return body_tilt(np.transpose(arr, (2, 1, 0)), (sp[2], sp[1], sp[0]))


def _turned(volume: CTVolume, angle: float, array: np.ndarray | None = None,
            order: int = 1) -> np.ndarray:
    ax = volume.axial_axis()
    plane = tuple(a for a in range(3) if a != ax)
    src = volume.array.astype(np.float32) if array is None else array
    return ndimage.rotate(src, angle, axes=plane, reshape=False, order=order,
                          cval=-1024.0 if array is None else 0)


@pytest.mark.parametrize("angle", [-12.0, 12.0, 25.0])
def test_the_tilt_of_a_turned_study_is_measured(angle: float) -> None:
    vol = medseg.load(PHANTOM)
    own = _tilt(vol)
    assert own.tilt_deg is not None and abs(own.tilt_deg) < MIN_TILT_DEG
    turned = _tilt(vol.with_array(_turned(vol, angle)))
    assert turned.tilt_deg is not None
    # ndimage turns the (y, x) plane of this LPS phantom against the (I, J) convention
    assert turned.tilt_deg - own.tilt_deg == pytest.approx(-angle, abs=1.0)
    assert turned.turn_deg == turned.tilt_deg


def test_the_bones_measure_the_tilt_when_the_field_of_view_cuts_the_body() -> None:
    vol = medseg.load(PHANTOM)
    ax = vol.axial_axis()
    tight = _turned(vol, 12.0)
    # a field of view 60 % of the image's width: the body's sides are cut at the border
    w = vol.shape[2]
    assert ax == 0
    sub = CTVolume(np.ascontiguousarray(tight[..., int(0.2 * w):int(0.8 * w)]),
                   vol.geometry, vol.metadata)
    pose = _tilt(sub)
    assert pose.tilt_deg is not None, pose.reason
    assert pose.tilt_deg - _tilt(vol).tilt_deg == pytest.approx(-12.0, abs=2.0)


def test_no_tilt_for_one_hemithorax_or_no_body() -> None:
    vol = medseg.load(PHANTOM)
    half = vol.array[..., : vol.shape[2] // 2 + 4]
    pose = _tilt(CTVolume(np.ascontiguousarray(half), vol.geometry, vol.metadata))
    assert pose.tilt_deg is None and pose.turn_deg == 0.0 and pose.reason
    air = CTVolume(np.full((8, 64, 64), -1000, np.int16), vol.geometry, vol.metadata)
    assert _tilt(air) == Pose(None, reason="no body")


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return load_model(DEFAULT_MODEL)


def test_a_tilted_study_is_segmented_upright_on_its_own_grid(model) -> None:  # type: ignore[no-untyped-def]
    vol = medseg.load(PHANTOM)
    clean = segment(vol, model=model, qc=False)
    # a phantom lies nearly straight: not turned, labels as without the feature
    assert clean.model is not None and clean.model["upright_turn_deg"] == 0.0
    assert np.array_equal(clean.labels.array,
                          segment(vol, model=model, qc=False, upright=False).labels.array)
    tilted = vol.with_array(_turned(vol, 15.0))
    res = segment(tilted, model=model, qc=False)
    assert res.model is not None and abs(res.model["upright_turn_deg"] + 15) < 3.0
    assert res.labels.shape == vol.shape
    assert res.labels.geometry == tilted.geometry
    expect = _turned(vol, 15.0, np.asarray(clean.labels.array), order=0)
    got = np.asarray(res.labels.array)
    for side in (1, 2):
        assert dice(got == side, expect == side) > 0.98


def test_a_turned_study_stored_in_reverse_gets_the_same_labels(model) -> None:  # type: ignore[no-untyped-def]
    from medseg.train.robustness import _consistency_volumes

    vol = medseg.load(PHANTOM)
    tilted = vol.with_array(_turned(vol, 15.0))
    ax = tilted.axial_axis()
    reverse = _consistency_volumes(tilted, np.random.default_rng(0))["reversed storage"]
    a = segment(tilted, model=model, qc=False)
    b = segment(reverse, model=model, qc=False)
    assert a.model is not None and b.model is not None
    assert a.model["upright_turn_deg"] == b.model["upright_turn_deg"] != 0.0
    assert np.array_equal(np.flip(np.asarray(b.labels.array), ax), np.asarray(a.labels.array))
