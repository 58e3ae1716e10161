"""Thick slices: the network and the postprocessing see slices interpolated between the
study's own (context about 2.5 mm away, as in training), the labels are those of the
study's own slices on its exact grid (docs/benchmarks.md: the robustness suite's 5 mm row
0.977 -> 0.982, every other row unchanged but cip-ct64's held-out half, 4 mm, within 0.001).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import medseg
import medseg.inference.unet as unet
from medseg.inference.unet import slices_interpolated, thick_slice_factor
from medseg.models import DEFAULT_MODEL, load_model
from medseg.segment import segment
from medseg.synth import make_phantom
from tests.helpers import dice

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("slice_mm", "factor"), [(0.8, 1), (2.5, 1), (3.0, 1), (4.0, 2),
                                                  (5.0, 2), (7.5, 3), (10.0, 4)])
def test_factor_by_slice_thickness(slice_mm: float, factor: int) -> None:
    spec = load_model(DEFAULT_MODEL).spec
    assert thick_slice_factor(slice_mm, spec) == factor
    # a model whose context is a distance in mm chooses its own context slices
    assert thick_slice_factor(slice_mm, dataclasses.replace(spec, context_step_mm=15.0)) == 1


def test_interpolated_slices_keep_the_originals_and_the_world() -> None:
    vol, _ = make_phantom(seed=3, shape=(8, 32, 32), spacing=(2.0, 2.0, 5.0))
    ax = vol.axial_axis()
    up = slices_interpolated(vol, ax, 2)
    assert up.shape[ax] == 2 * vol.shape[ax] - 1
    assert np.array_equal(np.take(up.array, np.arange(0, up.shape[ax], 2), axis=ax),
                          vol.array.astype(np.float32))
    mid = np.take(up.array, [1], axis=ax)
    pair = np.take(vol.array.astype(np.float32), [0, 1], axis=ax).mean(axis=ax, keepdims=True)
    assert np.allclose(mid, pair)
    # slice 2k of the result lies where slice k of the original does
    for k in (0, 3, vol.shape[ax] - 1):
        ijk = [0.0, 0.0, 0.0]
        ijk[2 - ax] = k
        ijk2 = list(ijk)
        ijk2[2 - ax] = 2 * k
        assert np.allclose(vol.geometry.index_to_world([ijk]), up.geometry.index_to_world([ijk2]))


def test_thick_study_is_labelled_on_its_own_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    image = medseg.load(ROOT / "sample_data" / "phantom_000" / "image.nii.gz")  # 5 mm slices
    model = load_model(DEFAULT_MODEL)
    seen: list[tuple[int, ...]] = []
    real = unet.unet_labels

    def spy(volume: medseg.CTVolume, *args: object, **kw: object) -> np.ndarray:
        seen.append(volume.shape)
        return real(volume, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(unet, "unet_labels", spy)
    res = segment(image, model=model, qc=False)
    assert res.model is not None and res.model["context_factor"] == 2
    ax = image.axial_axis()
    assert seen and seen[0][ax] == 2 * image.shape[ax] - 1  # the interpolated stack
    assert res.labels.shape == image.shape  # the labels: on the study's own grid
    assert np.allclose(res.labels.geometry.affine, image.geometry.affine)
    # and right: the sample phantom's exact labels (Dice 0.979 / 0.997 with context 5 mm
    # away, 0.979 / 0.997 with it 2.5 mm away)
    truth = medseg.load(ROOT / "sample_data" / "phantom_000" / "labels.nii.gz").array
    lab = np.asarray(res.labels.array)
    for side in (1, 2):
        assert dice(lab == side, truth == side) > 0.97, side
