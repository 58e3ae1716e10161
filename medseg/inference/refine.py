"""A 3D refinement of the slice networks' lung probability: the whole study at once.

The axial U-Net sees three slices; a lesion that rests on something that is not lung (the
aortic arch, the liver's dome, the chest wall) looks like that thing to it, and it leaves
the lesion out (docs/model-card.md, "Where the lost lesions lie"). The refinement network
sees the lung's 3D shape: a small 3D U-Net on a coarse grid (``grid_mm``, 4 mm) takes the CT
and the slice networks' lung probability and returns a correction of the probability's
logit. The correction is smooth (it lives on the coarse grid); it is brought back to the
model's 2 mm grid by trilinear interpolation and added there, so the outline's detail
stays the slice network's:

    p_lung' = sigmoid(logit(p_right + p_left) + upsampled correction)

and p_lung' is shared between the sides in the slice network's proportion. The network is
trained on the training studies' copies with pathology inserted, its labels known by
construction (:mod:`medseg.train.refine`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from monai.networks.nets import UNet

__all__ = ["Refiner", "build_refiner_network", "coarse_size", "refine_probabilities",
           "refiner_input"]

#: Smallest coarse grid along any axis (voxels).
MIN_COARSE = 8
#: The refinement U-Net halves the grid this many times: inputs are padded to a multiple
#: of 2 ** this.
DEPTH = 3
#: Probabilities are clamped to [EPS, 1 - EPS] before the logit.
EPS = 1e-4


@dataclass
class Refiner:
    """A loaded refinement network (:func:`medseg.models.load_model` of a card with
    ``"kind": "refine3d"``)."""

    name: str
    network: torch.nn.Module
    grid_mm: float
    sha256: str
    path: str


def build_refiner_network(channels: tuple[int, ...] = (16, 32, 64, 128),
                          num_res_units: int = 1) -> UNet:
    """MONAI 3D U-Net: (CT, lung probability) in, the logit's correction out."""
    from medseg._monai import UNet

    return UNet(spatial_dims=3, in_channels=2, out_channels=1, channels=channels,
                strides=(2,) * (len(channels) - 1), num_res_units=num_res_units)


def logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(EPS, 1 - EPS)
    return torch.log(p) - torch.log1p(-p)


def coarse_size(shape: tuple[int, ...], slice_mm: float, pixel_mm: float,
                grid_mm: float) -> tuple[int, int, int]:
    """The coarse grid's size for a prepared (K, I, J) stack: K slices ``slice_mm`` apart,
    ``pixel_mm`` pixels."""
    k, i, j = (int(s) for s in shape[-3:])
    return (max(MIN_COARSE, round(k * slice_mm / grid_mm)),
            max(MIN_COARSE, round(i * pixel_mm / grid_mm)),
            max(MIN_COARSE, round(j * pixel_mm / grid_mm)))


def refiner_input(image: torch.Tensor, p_lung: torch.Tensor,
                  size: tuple[int, int, int]) -> torch.Tensor:
    """(2, *size): the prepared CT (K, I, J) and the lung probability (K, I, J),
    trilinearly resampled to the coarse grid."""
    x = torch.stack([image.float(), p_lung.float()])[None]
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)[0]


def pad_to_depth(x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., K, I, J) padded at the far ends to a multiple of 2 ** DEPTH (zeros: air
    for the CT, no lung)."""
    m = 2 ** DEPTH
    k, i, j = x.shape[-3:]
    return F.pad(x, (0, (-j) % m, 0, (-i) % m, 0, (-k) % m))


def correction(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The network's logit correction (K, I, J) on the coarse grid of ``x`` (2, K, I, J)."""
    k, i, j = x.shape[-3:]
    first = next(network.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    with torch.inference_mode():
        d = network(pad_to_depth(x)[None].to(device))
    return d[0, 0, :k, :i, :j].float().cpu()


def refine_probabilities(refiner: Refiner, probs: torch.Tensor, image: torch.Tensor,
                         slice_mm: float, pixel_mm: float) -> torch.Tensor:
    """Refined lung probabilities (2, K, I, J) from the slice networks' ``probs`` (right,
    left) and the prepared CT ``image`` (K, I, J) on the model's grid."""
    p_lung = probs[0] + probs[1]
    size = coarse_size(tuple(image.shape), slice_mm, pixel_mm, refiner.grid_mm)
    d = correction(refiner.network, refiner_input(image, p_lung, size))
    d = F.interpolate(d[None, None], size=tuple(image.shape), mode="trilinear",
                      align_corners=False)[0, 0]
    refined = torch.sigmoid(logit(p_lung) + d)
    # each side keeps its share of the slice networks' lung (an even split where they saw
    # none: the postprocessing decides sides by the body's midline)
    share = (probs[0] + EPS) / (p_lung + 2 * EPS)
    return torch.stack([refined * share, refined * (1 - share)])
