"""Postprocessing of lung label maps: largest component per lung, enclosed holes filled.

Works inside the labels' bounding box, so the cost follows the lungs, not the volume.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

__all__ = ["LABEL_LEFT", "LABEL_RIGHT", "bounding_box", "postprocess_labels"]

LABEL_RIGHT = 1
LABEL_LEFT = 2


def bounding_box(mask: npt.NDArray[np.bool_], margin: int = 1) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding ``mask`` (grown by ``margin``), None if empty."""
    if not mask.any():
        return None
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append(slice(max(0, int(idx[0]) - margin),
                         min(mask.shape[axis], int(idx[-1]) + 1 + margin)))
    return tuple(out)


def _largest_component(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return np.asarray(lab == int(np.argmax(sizes)))


def _fill_holes(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Fill holes enclosed in each axial slice (a nodule or vessel surrounded by lung in its
    slice, even if open above or below). This includes every hole enclosed in 3D: a cavity
    closed in 3D is closed in each slice through it."""
    filled = mask.copy()
    for k in range(filled.shape[0]):
        if filled[k].any():
            filled[k] = ndimage.binary_fill_holes(filled[k])
    return filled


def postprocess_labels(labels: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """Keep the largest connected component of each lung and fill enclosed holes (only into
    background, never over the other lung). ``labels`` is (z, y, x)."""
    out = np.zeros(labels.shape, np.uint8)
    box = bounding_box(labels > 0)
    if box is None:
        return out
    sub = labels[box]
    res = out[box]
    kept = {}
    for lab in (LABEL_RIGHT, LABEL_LEFT):
        if (sub == lab).any():
            kept[lab] = _largest_component(sub == lab)
    for lab, mask in kept.items():
        others = [m for other, m in kept.items() if other != lab]
        filled = _fill_holes(mask)
        for m in others:
            filled &= ~m
        res[filled & (res == 0)] = lab
    return out
