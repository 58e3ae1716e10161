"""Anti-aliasing of noisy studies before the in-plane downsampling (issue 12: the consistency
row "noise 80 HU" of the robustness suite): the noise estimate, the sigma it chooses, and
that a clean study's preprocessing is untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medseg.inference.unet import InferenceSettings, random_model, unet_labels
from medseg.preprocess import (
    ANTIALIAS_FULL,
    NOISE_RAMP_HU,
    antialias_sigma,
    pixel_noise_hu,
    smooth_in_plane,
)
from medseg.volume import CTVolume, Geometry, VolumeMetadata


def _body(noise_hu: float, shape: tuple[int, int, int] = (8, 128, 128),
          seed: int = 0) -> np.ndarray:
    """Soft tissue (40 HU) in an ellipse, air around it, Gaussian pixel noise."""
    rng = np.random.default_rng(seed)
    _, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    arr = np.where((x / 0.9) ** 2 + (y / 0.7) ** 2 < 1, 40.0, -1000.0)
    return arr + rng.normal(0.0, noise_hu, shape)


@pytest.mark.parametrize("sd", [8.0, 20.0, 45.0])
def test_pixel_noise_is_measured_on_soft_tissue(sd: float) -> None:
    est = pixel_noise_hu(_body(sd), axial_axis=0)
    assert est == pytest.approx(sd, rel=0.15)
    # the same whatever the axial axis
    assert pixel_noise_hu(np.moveaxis(_body(sd), 0, 2), axial_axis=2) == \
        pytest.approx(est, rel=0.1)


def test_no_soft_tissue_no_estimate() -> None:
    assert pixel_noise_hu(np.full((4, 64, 64), -1000.0), axial_axis=0) == 0.0


def test_sigma_ramps_with_the_noise_and_the_downsampling() -> None:
    lo, hi = NOISE_RAMP_HU
    assert antialias_sigma(lo - 1, (0.7, 0.7)) == (0.0, 0.0)
    full = antialias_sigma(hi + 10, (0.7, 0.7))
    assert full[0] == pytest.approx(ANTIALIAS_FULL * (2.0 / 0.7 - 1.0))
    half = antialias_sigma((lo + hi) / 2, (0.7, 0.7))
    assert half[0] == pytest.approx(full[0] / 2)
    # no downsampling, no smoothing (3 mm pixels are upsampled to 2 mm)
    assert antialias_sigma(hi + 10, (3.0, 2.0)) == (0.0, 0.0)
    # anisotropic pixels: per axis
    s = antialias_sigma(hi + 10, (0.5, 1.0))
    assert s[0] > s[1] > 0


def test_smoothing_lowers_the_noise_keeps_the_affine() -> None:
    data = torch.from_numpy(_body(60.0, (3, 64, 64)).astype(np.float32))
    affine = torch.diag(torch.tensor([0.7, 0.7, 1.0], dtype=torch.float64))
    slab = MetaTensor(data, affine=affine)
    out = smooth_in_plane(slab, (0.9, 0.9))
    assert out.shape == slab.shape
    assert torch.equal(torch.as_tensor(out.affine), torch.as_tensor(slab.affine))
    inner = (slice(None), slice(30, 34), slice(20, 44))
    assert float(out.as_tensor()[inner].std()) < 0.5 * float(data[inner].std())
    assert smooth_in_plane(slab, (0.0, 0.0)) is slab


def _volume(noise_hu: float) -> CTVolume:
    arr = _body(noise_hu, (6, 96, 96)).astype(np.int16)
    return CTVolume(arr, Geometry(origin=(0.0, 0.0, 0.0), spacing=(0.8, 0.8, 2.0)),
                    VolumeMetadata(modality="CT"))


def test_unet_smooths_only_a_noisy_study() -> None:
    model = random_model()
    clean, noisy = InferenceSettings(), InferenceSettings()
    unet_labels(_volume(15.0), model, clean)
    unet_labels(_volume(70.0), model, noisy)
    assert clean.antialias_sigma_px == (0.0, 0.0)
    assert clean.input_noise_hu is not None and clean.input_noise_hu < NOISE_RAMP_HU[0]
    expected = ANTIALIAS_FULL * (2.0 / 0.8 - 1.0)
    assert noisy.antialias_sigma_px == pytest.approx((expected, expected), abs=1e-3)
