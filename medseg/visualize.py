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

from medseg.volume import CTVolume, to_canonical

__all__ = ["LUNG_WINDOW", "overlay_montage"]

#: Lung window (centre -600 HU, width 1500 HU), the usual display for lung parenchyma.
LUNG_WINDOW = (-1350.0, 150.0)
_COLOURS = {1: (0.95, 0.25, 0.2), 2: (0.2, 0.55, 0.95)}


def _to_lps(volume: CTVolume) -> tuple[npt.NDArray[Any], tuple[float, float, float]]:
    """Array (z, y, x) with axes flipped/permuted so that i -> L, j -> P, k -> S (nearest
    axis for oblique grids), and the matching spacing (x, y, z)."""
    arr, (sz, sy, sx) = to_canonical(volume)
    return arr, (sx, sy, sz)


def _outline(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Pixels of ``mask`` with a 4-neighbour outside it (the drawn contour)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _panel(sl_ct: npt.NDArray[Any], sl_lab: npt.NDArray[Any], size: tuple[int, int]
           ) -> npt.NDArray[np.uint8]:
    """One RGB panel of ``size`` (width, height): the CT slice in the lung window (bilinear),
    each lung tinted and outlined in its colour (labels resized nearest)."""
    from PIL import Image

    lo, hi = LUNG_WINDOW
    grey = np.clip((sl_ct.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255)
    grey_img = Image.fromarray(grey.astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    lab = np.asarray(Image.fromarray(sl_lab.astype(np.uint8)).resize(
        size, Image.Resampling.NEAREST))
    rgb = np.repeat(np.asarray(grey_img, np.float32)[..., None], 3, axis=2)
    for value, colour in _COLOURS.items():
        mask = lab == value
        if not mask.any():
            continue
        c = np.asarray(colour, np.float32) * 255
        rgb[mask] = 0.65 * rgb[mask] + 0.35 * c
        rgb[_outline(mask)] = c
    return rgb.round().astype(np.uint8)


def overlay_montage(image: CTVolume, labels: CTVolume, *, view: str = "axial", n: int = 6,
                    columns: int = 3, panel_width: int = 256,
                    highlight: int | None = None) -> bytes:
    """PNG bytes: ``n`` evenly spaced slices through the lungs with the right lung (label 1)
    in red and the left lung (label 2) in blue, tinted and outlined over the CT in a lung
    window; each panel ``panel_width`` pixels wide at the slice's true aspect ratio.

    ``highlight`` (axial view only) is a slice number as the panels count them (1 = most
    inferior): it replaces the nearest evenly spaced slice and is framed in red (the slice
    the quality check asks a person to look at).

    Drawn with numpy and Pillow (no plotting library): the report of a 512 x 512 x 141
    study is on the critical path of ``medseg segment``."""
    from PIL import Image, ImageDraw

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
    marked = -1
    if highlight is not None and view == "axial":
        marked = int(np.clip(highlight - 1, 0, ct.shape[0] - 1))
        picks[int(np.argmin(np.abs(picks - marked)))] = marked
        picks = np.unique(picks)
    rows = int(np.ceil(n / columns))
    height, width = np.take(ct, 0, axis=axis).shape  # pixels of one slice
    size = (panel_width, max(1, round(panel_width * height * aspect / width)))
    title_h, gap, legend_h = 16, 6, 18
    canvas = Image.new("RGB", (columns * (size[0] + gap) + gap,
                               rows * (size[1] + title_h + gap) + gap + legend_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, idx in enumerate(picks):
        sl_ct = np.take(ct, idx, axis=axis)
        sl_lab = np.take(lab, idx, axis=axis)
        if view == "coronal":
            sl_ct, sl_lab = sl_ct[::-1], sl_lab[::-1]  # superior at the top
        x0 = gap + (i % columns) * (size[0] + gap)
        y0 = gap + (i // columns) * (size[1] + title_h + gap)
        look = idx == marked
        draw.text((x0, y0), f"{view} {idx + 1}/{ct.shape[axis]}" + ("  look here" if look
                                                                    else ""),
                  fill="#c62828" if look else "black")
        canvas.paste(Image.fromarray(_panel(sl_ct, sl_lab, size)), (x0, y0 + title_h))
        if look:
            draw.rectangle((x0 - 3, y0 + title_h - 3, x0 + size[0] + 2,
                            y0 + title_h + size[1] + 2), outline="#c62828", width=3)
    draw.text((gap, canvas.height - legend_h + 2), "red: right lung (1)   blue: left lung (2)"
              "   patient right on image left", fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
