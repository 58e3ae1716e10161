"""Overlay montages of a lung mask on its CT (PNG), for reports and documentation.

Views are shown in the radiological convention whatever the storage order: the volume is
resampled (nearest, on its own grid's axes after reorientation to LPS) so that axial slices
show the patient's right on the image's left and anterior at the top, and coronal slices show
superior at the top.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import numpy.typing as npt

from medseg.volume import CTVolume

__all__ = ["LUNG_WINDOW", "overlay_montage"]

#: Lung window (centre -600 HU, width 1500 HU), the usual display for lung parenchyma.
LUNG_WINDOW = (-1350.0, 150.0)
_COLOURS = {1: (0.95, 0.25, 0.2), 2: (0.2, 0.55, 0.95)}


def _to_lps(volume: CTVolume) -> tuple[npt.NDArray[Any], tuple[float, float, float]]:
    """Array (z, y, x) with axes flipped/permuted so that i -> L, j -> P, k -> S (nearest
    axis for oblique grids), and the matching spacing."""
    direction = volume.direction
    perm = [int(np.argmax(np.abs(direction[:, axis]))) for axis in range(3)]
    arr = volume.array.transpose(2, 1, 0)  # (i, j, k)
    order = [perm.index(w) for w in range(3)]  # index axis giving world axis w
    arr = arr.transpose(order)
    spacing = [volume.spacing[a] for a in order]
    for w in range(3):
        if direction[w, order[w]] < 0:
            arr = np.flip(arr, axis=w)
    return np.ascontiguousarray(arr.transpose(2, 1, 0)), (spacing[0], spacing[1], spacing[2])


def overlay_montage(image: CTVolume, labels: CTVolume, *, view: str = "axial", n: int = 6,
                    columns: int = 3, width_in: float = 9.0, dpi: int = 80) -> bytes:
    """PNG bytes: ``n`` evenly spaced slices through the lungs with the right lung (label 1)
    in red and the left lung (label 2) in blue outlined over the CT in a lung window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ct, (sx, sy, sz) = _to_lps(image)
    lab, _ = _to_lps(labels)
    lung = lab > 0
    if view == "axial":
        axis, aspect = 0, sy / sx
    elif view == "coronal":
        axis, aspect = 1, sz / sx
    else:
        raise ValueError(f"view must be 'axial' or 'coronal', got {view!r}")
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(lung.any(axis=other))
    if present.size == 0:
        present = np.arange(ct.shape[axis])
    picks = np.linspace(present[0], present[-1], n + 2)[1:-1].round().astype(int)
    rows = int(np.ceil(n / columns))
    panel = np.take(ct, 0, axis=axis).shape  # (height, width) in pixels
    height_ratio = panel[0] * aspect / panel[1]
    fig, axes = plt.subplots(rows, columns, squeeze=False, figsize=(
        width_in, width_in / columns * rows * height_ratio + 0.3 * rows))
    lo, hi = LUNG_WINDOW
    for ax, idx in zip(axes.ravel(), picks, strict=False):
        sl_ct = np.take(ct, idx, axis=axis)
        sl_lab = np.take(lab, idx, axis=axis)
        if view == "coronal":
            sl_ct, sl_lab = sl_ct[::-1], sl_lab[::-1]  # superior at the top
        ax.imshow(sl_ct, cmap="gray", vmin=lo, vmax=hi, aspect=aspect,
                  interpolation="nearest")
        rgba = np.zeros((*sl_lab.shape, 4))
        for value, colour in _COLOURS.items():
            rgba[sl_lab == value] = (*colour, 0.35)
        ax.imshow(rgba, aspect=aspect, interpolation="nearest")
        for value, colour in _COLOURS.items():
            if (sl_lab == value).any():
                ax.contour(sl_lab == value, levels=[0.5], colors=[colour], linewidths=0.8)
        ax.set_title(f"{view} {idx + 1}/{ct.shape[axis]}", fontsize=8)
        ax.axis("off")
    for ax in axes.ravel()[len(picks):]:
        ax.axis("off")
    fig.text(0.01, 0.005, "red: right lung (1)   blue: left lung (2)   patient right on "
             "image left", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
