"""Geometry is sacred: masks land on the input's exact grid, whatever its orientation.

With an untrained (seeded) network these are exact tests of the plumbing: canonical
orientation makes the network see the same pixels for every axis order, so the labels must
agree voxel for voxel in world space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import medseg
from medseg.inference.unet import InferenceSettings, random_model, unet_labels
from medseg.volume import CTVolume, Geometry
from tests.helpers import labels_on_grid, reindex


def _body(shape=(20, 48, 56), spacing=(0.85, 1.2, 0.9)) -> CTVolume:
    """A CT-like volume with asymmetric structure (so flips would show)."""
    rng = np.random.default_rng(1)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    arr = np.full(shape, -1000.0)
    arr[(x / 0.9) ** 2 + (y / 0.7) ** 2 < 1] = 40
    arr[((x + 0.4) / 0.3) ** 2 + (y / 0.4) ** 2 + (z / 1.5) ** 2 < 1] = -850
    arr[((x - 0.45) / 0.25) ** 2 + ((y - 0.1) / 0.35) ** 2 < 1] = -800
    arr += rng.normal(0, 15, shape)
    return CTVolume(arr.astype(np.int16), Geometry(origin=(-30.0, -20.5, 100.0),
                                                   spacing=spacing))


CASES = {
    "flip_x": ((0, 1, 2), (True, False, False)),
    "flip_y": ((0, 1, 2), (False, True, False)),
    "flip_z": ((0, 1, 2), (False, False, True)),
    "ras": ((0, 1, 2), (True, True, False)),
    "transpose_xy": ((1, 0, 2), (False, False, False)),
    "coronal": ((0, 2, 1), (False, True, False)),
    "sagittal": ((2, 1, 0), (True, False, False)),
}


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.mark.parametrize("spacing", [(0.85, 1.2, 0.9), (0.7, 0.7, 2.5)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_labels_in_world_for_any_axis_order(case: str, spacing, model) -> None:
    base = _body(spacing=spacing)
    ref = base.with_array(unet_labels(base, model, InferenceSettings()))
    assert ref.array.any(), "the untrained network should still label something"
    other = reindex(base, *CASES[case])
    lab = unet_labels(other, model, InferenceSettings())
    assert lab.shape == other.shape
    back = labels_on_grid(other.with_array(lab), base)
    np.testing.assert_array_equal(back, ref.array)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
@pytest.mark.parametrize("case", ["ras", "coronal"])
def test_output_grid_equals_input_grid_on_disk(tmp_path: Path, suffix: str, case: str) -> None:
    vol = reindex(_body(), *CASES[case])
    src = medseg.save(vol, tmp_path / f"in{suffix}")
    from medseg.segment import segment_study

    res = segment_study(src, tmp_path / "out", method="threshold")
    mask = medseg.load(tmp_path / "out" / "lungs.nii.gz")
    inp = medseg.load(src)
    assert mask.shape == inp.shape
    assert mask.geometry.is_close(inp.geometry, atol_mm=1e-4)
    assert mask.array.dtype == np.uint8
    assert res.summary["input"]["orientation"] == inp.geometry.orientation_code()


def test_slab_boundaries_do_not_matter(model) -> None:
    vol = _body(shape=(30, 40, 40))
    a = unet_labels(vol, model, InferenceSettings(slab_slices=7))
    b = unet_labels(vol, model, InferenceSettings(slab_slices=64))
    np.testing.assert_array_equal(a, b)
