"""Preprocessing for the lung model, as invertible MONAI dictionary transforms.

The pipeline (see :func:`orientation_transform` and :func:`slab_transform`):

1. ``Orientationd`` to the canonical frame :data:`CANONICAL_AXCODES` (index axes pointing
   to patient Left, Posterior, Superior: the radiological axial view, rows top = anterior,
   columns left = patient right). Only axis permutations and flips: exact, no interpolation.
2. per slab of axial slices, only on a noisy study (pixel noise above
   :data:`NOISE_RAMP_HU`'s lower end, :func:`pixel_noise_hu`): a Gaussian smoothing in plane
   before the downsampling (anti-aliasing, :func:`antialias_sigma`), so that the pixel
   noise does not pass unattenuated through the bilinear resampling; then
   ``Spacingd`` to the model's in-plane pixel spacing
   (:data:`MODEL_PIXEL_SPACING_MM`), slice spacing unchanged; ``ScaleIntensityRanged``
   clipping HU to [:data:`HU_MIN`, :data:`HU_MAX`] and scaling to [0, 1].

MONAI records every applied transform on the MetaTensor, so ``Invertd`` brings the model's
probabilities back onto the oriented grid exactly (bilinear), and the orientation is undone
by its own inverse: the output lands on the input's exact grid.

World coordinates: MONAI's affines are RAS; medseg converts explicitly with
``Geometry.affine_ras`` when it builds the MetaTensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from medseg._monai import Compose, MetaTensor, Orientationd, ScaleIntensityRanged, Spacingd
from medseg.hounsfield import check_hounsfield
from medseg.volume import CTVolume

__all__ = [
    "CANONICAL_AXCODES",
    "HU_MAX",
    "HU_MIN",
    "MODEL_PIXEL_SPACING_MM",
    "NOISE_RAMP_HU",
    "antialias_sigma",
    "check_hounsfield",
    "orientation_transform",
    "pixel_noise_hu",
    "slab_as_2d",
    "slab_transform",
    "smooth_in_plane",
    "study_antialias",
    "to_metatensor",
]

#: Canonical frame of the model's input, in MONAI's (nibabel) axis-code convention: the
#: letters name where each index axis points. "LPS" = i to Left, j to Posterior, k to
#: Superior, which is how a DICOM axial slice is displayed.
CANONICAL_AXCODES = "LPS"
#: Lower HU clip: air. Scanners store -1024 as their floor (12-bit data, intercept -1024).
HU_MIN = -1024.0
#: Upper HU clip: above soft tissue and contrast-enhanced blood; bone saturates. The same
#: window as lungmask's R231 preprocessing (Hofmanninger et al. 2020, Eur Radiol Exp 4:50).
HU_MAX = 600.0
#: In-plane pixel spacing the model works at (mm): a 512 mm field of view fits one 256-pixel
#: window (lungmask R231 also works at 256x256 per slice); boundaries land between pixels
#: after bilinear inversion of the probabilities; compute is bounded whatever the matrix.
MODEL_PIXEL_SPACING_MM = 2.0
#: Pixel noise (HU, :func:`pixel_noise_hu`) over which the in-plane anti-aliasing ramps from
#: none to full (:data:`ANTIALIAS_FULL`). The real CT at hand measures 12.6-24.1 HU (RIDER,
#: LIDC, cip-ct64, LungFCP, the abdominal example, chest-ct-philips-141: untouched, their
#: outputs unchanged); LIDC with N(0, 80 HU) added measures 57 HU, and without smoothing
#: lung2d-v2 labels part of the liver dome lung on it (robustness suite: Dice 0.984 to the
#: clean mask; with the anti-aliasing 0.994).
NOISE_RAMP_HU = (30.0, 50.0)
#: Full anti-aliasing: Gaussian sigma = this x (downsampling factor - 1) pixels, the rule of
#: scikit-image's ``rescale(anti_aliasing=True)``.
ANTIALIAS_FULL = 0.5
#: Soft tissue (HU) whose neighbouring pixels' differences measure the noise.
NOISE_TISSUE_HU = (-100.0, 150.0)


def pixel_noise_hu(array: npt.NDArray[Any], axial_axis: int, n_slices: int = 12) -> float:
    """Pixel noise (HU) of a CT volume: the robust standard deviation (1.4826 x MAD) of the
    differences between horizontally neighbouring in-plane pixels that are both soft tissue
    (:data:`NOISE_TISSUE_HU`), over ``n_slices`` evenly spaced axial slices, divided by
    sqrt(2). Soft tissue is smooth at this scale, so the differences are mostly noise. 0 when
    fewer than 1000 pixel pairs qualify (a phantom without soft tissue)."""
    n = array.shape[axial_axis]
    lo, hi = NOISE_TISSUE_HU
    diffs = []
    for k in np.unique(np.linspace(0, n - 1, min(n, n_slices)).astype(int)):
        sl = np.take(array, int(k), axis=axial_axis).astype(np.float32)
        a, b = sl[:, 1:], sl[:, :-1]
        ok = (a > lo) & (a < hi) & (b > lo) & (b < hi)
        diffs.append((a - b)[ok])
    d = np.concatenate(diffs) if diffs else np.zeros(0, np.float32)
    if d.size < 1000:
        return 0.0
    return float(np.median(np.abs(d - np.median(d))) * 1.4826 / np.sqrt(2.0))


def antialias_sigma(noise_hu: float, spacing_mm: tuple[float, float],
                    target_mm: float = MODEL_PIXEL_SPACING_MM) -> tuple[float, float]:
    """In-plane Gaussian sigma (pixels, per axis) applied before resampling from
    ``spacing_mm`` to ``target_mm``: 0 below :data:`NOISE_RAMP_HU`, rising linearly to
    :data:`ANTIALIAS_FULL` x (``target_mm`` / spacing - 1) at its upper end; 0 on an axis
    that is not downsampled."""
    lo, hi = NOISE_RAMP_HU
    strength = ANTIALIAS_FULL * min(1.0, max(0.0, (noise_hu - lo) / (hi - lo)))
    s0, s1 = (strength * max(0.0, target_mm / s - 1.0) for s in spacing_mm)
    return float(s0), float(s1)


def study_antialias(volume: CTVolume, oriented: MetaTensor,
                    target_mm: float = MODEL_PIXEL_SPACING_MM, noise_hu: float | None = None
                    ) -> tuple[float, tuple[float, float]]:
    """The pixel noise (HU, :func:`pixel_noise_hu`) of ``volume`` (or ``noise_hu``, given)
    and the in-plane sigma (:func:`antialias_sigma`) for its oriented form ``oriented``
    (``(1, I, J, K)``, the in-plane spacing read from its affine): the one decision inference
    and training share."""
    noise = pixel_noise_hu(volume.array, volume.axial_axis()) if noise_hu is None else noise_hu
    in_plane = np.linalg.norm(np.asarray(oriented.affine)[:3, :2], axis=0)
    return noise, antialias_sigma(noise, (float(in_plane[0]), float(in_plane[1])), target_mm)


def smooth_in_plane(slab: MetaTensor, sigma: tuple[float, float]) -> MetaTensor:
    """A 2D slab ``(slices, I, J)`` (:func:`slab_as_2d`) smoothed in plane by a Gaussian of
    ``sigma`` pixels per axis (edges replicated), same affine."""
    from scipy import ndimage

    if max(sigma) <= 0:
        return slab
    data = ndimage.gaussian_filter(slab.as_tensor().numpy(), sigma=(0.0, *sigma),
                                   mode="nearest", truncate=3.0)
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(data)), affine=slab.affine)


def to_metatensor(volume: CTVolume, array: npt.NDArray[Any] | None = None) -> MetaTensor:
    """Channel-first MetaTensor ``(1, i, j, k)`` with the volume's RAS affine (MONAI's
    convention). ``array`` replaces the voxels (same grid)."""
    arr = volume.array if array is None else array
    data = torch.from_numpy(arr.transpose(2, 1, 0))[None]  # a strided view, no copy
    return MetaTensor(data, affine=torch.as_tensor(volume.geometry.affine_ras, dtype=torch.float64))


def slab_as_2d(oriented: MetaTensor, k0: int, k1: int) -> MetaTensor:
    """Slices ``k0:k1`` of an oriented ``(1, I, J, K)`` volume as a 2D MetaTensor
    ``(k1 - k0, I, J)`` whose channels are the slices, with the in-plane spacing as its 2D
    affine (world position is irrelevant to in-plane resampling, which is inverted exactly)."""
    spacing = torch.linalg.norm(oriented.affine[:3, :3].double(), dim=0)
    affine = torch.diag(torch.tensor([float(spacing[0]), float(spacing[1]), 1.0],
                                     dtype=torch.float64))
    data = oriented.as_tensor()[0, :, :, k0:k1].permute(2, 0, 1).float()
    return MetaTensor(data, affine=affine)


def orientation_transform(keys: str | list[str] = "image") -> Orientationd:
    # labels given explicitly: nibabel's axis-code convention for a RAS-affine MetaTensor
    # (MONAI's default, stated here so a change of MONAI's default cannot flip the frame).
    return Orientationd(keys=keys, axcodes=CANONICAL_AXCODES,
                        labels=(("L", "R"), ("P", "A"), ("I", "S")))


def slab_transform(keys: str = "image", pixel_spacing_mm: float = MODEL_PIXEL_SPACING_MM
                   ) -> Compose:
    """In-plane resampling to the model spacing, then HU clip and scale to [0, 1]."""
    return Compose([
        Spacingd(keys=keys, pixdim=(pixel_spacing_mm, pixel_spacing_mm, -1.0),
                 mode="bilinear", padding_mode="border", dtype=np.float32),
        ScaleIntensityRanged(keys=keys, a_min=HU_MIN, a_max=HU_MAX, b_min=0.0, b_max=1.0,
                             clip=True),
    ])
