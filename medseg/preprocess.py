"""Preprocessing for the lung model, as invertible MONAI dictionary transforms.

The pipeline (see :func:`orientation_transform` and :func:`slab_transform`):

1. ``Orientationd`` to the canonical frame :data:`CANONICAL_AXCODES` (index axes pointing
   to patient Left, Posterior, Superior: the radiological axial view, rows top = anterior,
   columns left = patient right). Only axis permutations and flips: exact, no interpolation.
2. per slab of axial slices: ``Spacingd`` to the model's in-plane pixel spacing
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
from monai.data import MetaTensor
from monai.transforms import Compose, Orientationd, ScaleIntensityRanged, Spacingd

from medseg.errors import InputError
from medseg.volume import CTVolume

__all__ = [
    "CANONICAL_AXCODES",
    "HU_MAX",
    "HU_MIN",
    "MODEL_PIXEL_SPACING_MM",
    "check_hounsfield",
    "orientation_transform",
    "slab_as_2d",
    "slab_transform",
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

#: Plausibility window for "this volume is in HU": outside-body air must be near -1000.
#: The 1st percentile of the voxels, scanner padding left out (see below).
AIR_HU_RANGE = (-1100.0, -850.0)
#: Voxels below ``AIR_HU_RANGE[0]`` are taken for scanner padding outside the reconstruction
#: circle and left out of the percentile when they are at most this fraction of the volume.
#: The loaders already set padding to air (:mod:`medseg.io.padding`); this guards volumes
#: built in Python with padding still in them. Outside a circle inscribed in the square
#: matrix lies 1 - pi/4 = 21.5 % of a slice; more than half the volume below air is not CT.
MAX_PADDING_FRACTION = 0.5
#: ... and from this fraction on a warning says so (a few noisy air voxels are not worth one).
PADDING_WARN_FRACTION = 0.001


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


def check_hounsfield(volume: CTVolume) -> list[str]:
    """Raise if the volume is clearly not in HU; return warnings for doubtful cases.

    A CT in HU has air around the body near -1000 HU. A volume whose lowest values are far
    from that (e.g. raw stored values 0..4095 with the rescale not applied, or a normalised
    0..1 image) would give an all-background mask; medseg refuses it instead.

    Scanner padding (values below -1100 HU, outside the reconstruction circle) is not what
    the percentile looks at: the loaders set it to air, and for a volume built in Python that
    still holds it, values below ``AIR_HU_RANGE[0]`` are left out when they are at most
    :data:`MAX_PADDING_FRACTION` of the voxels (a warning says so); more is refused.
    """
    arr = volume.array
    flat = arr.reshape(-1)
    step = max(1, flat.size // 2_000_000)
    sample = flat[::step].astype(np.float32)
    lo, hi = AIR_HU_RANGE
    below = sample < lo
    frac_below = float(np.count_nonzero(below)) / sample.size
    warnings: list[str] = []
    if frac_below > MAX_PADDING_FRACTION:
        raise InputError(
            f"does not look like CT in Hounsfield units: {100 * frac_below:.0f} % of voxels "
            f"are below {lo:.0f} (air is near -1000; scanner padding outside the field of "
            f"view is at most {100 * MAX_PADDING_FRACTION:.0f} %)",
            path=volume.metadata.source_path)
    if frac_below > 0:
        sample = sample[~below]
    if frac_below >= PADDING_WARN_FRACTION:
        warnings.append(
            f"{100 * frac_below:.1f} % of voxels are below {lo:.0f} HU (scanner padding?); "
            "left out of the HU check")
    low = float(np.percentile(sample, 1))
    if not lo <= low <= hi:
        raise InputError(
            f"does not look like CT in Hounsfield units: the darkest 1 % of voxels is at "
            f"{low:.0f}, air should be near -1000 (range {lo:.0f}..{hi:.0f}); "
            "was the rescale slope/intercept lost, or the image normalised?",
            path=volume.metadata.source_path)
    return warnings
