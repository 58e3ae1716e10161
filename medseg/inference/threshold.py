"""The classical baseline: HU threshold, body mask, connected components.

Used as ``medseg segment --method threshold`` and as a comparator in evaluations. Known
limits (by construction): dense lung tissue (consolidation, tumour touching the pleura,
fluid) above :data:`LUNG_MAX_HU` is left out unless enclosed by aerated lung; trachea and
main bronchi are included where they connect to a lung; lungs that touch each other in
front of the mediastinum are split at the sagittal midline.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from medseg.inference.postprocess import (
    LABEL_LEFT,
    LABEL_RIGHT,
    bounding_box,
    postprocess_labels,
)
from medseg.volume import CTVolume

__all__ = ["BODY_MIN_HU", "outside_air", "threshold_labels"]

#: Body vs surrounding air: fat is about -100 HU, air -1000; -500 sits between.
BODY_MIN_HU = -500.0
#: Aerated lung: parenchyma is about -850 HU, soft tissue +40; -320 HU separates them
#: (a common threshold in classical lung segmentation, e.g. Hu et al. 2001, IEEE TMI 20:490).
LUNG_MAX_HU = -320.0
#: Components smaller than this (mL) are not lungs (bowel gas, noise).
MIN_COMPONENT_ML = 20.0
#: A second component counts as the other lung when it holds at least this fraction of the
#: largest one; otherwise the lungs are joined and the largest component is split.
SECOND_LUNG_FRACTION = 0.15


def outside_air(air: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Air connected, within its own slice, to that slice's border (around the body, under
    the table). Slice by slice: in 3D the airways would join the lungs to the air above the
    head or shoulders wherever the scan extends beyond the body."""
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    lab, n = ndimage.label(air, structure=in_plane)
    if n == 0:
        return np.zeros_like(air)
    border = np.unique(np.concatenate([
        lab[:, 0, :].ravel(), lab[:, -1, :].ravel(), lab[:, :, 0].ravel(), lab[:, :, -1].ravel(),
    ]))
    border = border[border > 0]
    return np.isin(lab, border)


def threshold_labels(volume: CTVolume) -> npt.NDArray[np.uint8]:
    """Right (1) / left (2) lung labels (z, y, x) by thresholding; empty if none found."""
    hu = volume.array
    out = np.zeros(volume.shape, np.uint8)
    air = hu < LUNG_MAX_HU
    inside = air & ~outside_air(hu < BODY_MIN_HU)
    box = bounding_box(inside)
    if box is None:
        return out
    lab, n = ndimage.label(inside[box])
    if n == 0:
        return out
    sizes = np.bincount(lab[inside[box]], minlength=n + 1)
    sizes[0] = 0
    min_vox = MIN_COMPONENT_ML / volume.voxel_volume_ml()
    order = [int(i) for i in np.argsort(sizes)[::-1] if sizes[i] >= min_vox]
    if not order:
        return out
    sub = np.zeros(lab.shape, np.uint8)
    geometry = volume.geometry
    offset = np.array([box[2].start, box[1].start, box[0].start], float)

    def world_x(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
        k, j, i = np.nonzero(mask)
        return np.asarray(geometry.index_to_world(np.c_[i, j, k] + offset)[:, 0])

    if len(order) >= 2 and sizes[order[1]] >= SECOND_LUNG_FRACTION * sizes[order[0]]:
        a, b = (lab == order[0]), (lab == order[1])
        # LPS: +x is patient left, so the right lung has the smaller mean x
        right, left = (a, b) if world_x(a).mean() < world_x(b).mean() else (b, a)
        sub[right] = LABEL_RIGHT
        sub[left] = LABEL_LEFT
    else:
        joined = lab == order[0]
        k, j, i = np.nonzero(joined)
        x = geometry.index_to_world(np.c_[i, j, k] + offset)[:, 0]
        mid = float(np.median(x))
        sub[k[x < mid], j[x < mid], i[x < mid]] = LABEL_RIGHT
        sub[k[x >= mid], j[x >= mid], i[x >= mid]] = LABEL_LEFT
    out[box] = sub
    return postprocess_labels(out, volume.axial_axis())
