"""Scanner padding and pixels outside the reconstruction circle, set to air.

A CT scanner reconstructs a circle (the scan field of view) inside a square matrix. The
pixels outside the circle hold no measurement; many scanners store them as a value far below
air (GE: -2048 or -3024 HU, others -32768 stored), sometimes declared in the DICOM header as
PixelPaddingValue. Left in the volume, that value is not air to the model, the threshold
baseline, the HU sanity check or the measurements (mean HU, emphysema index). The loaders
therefore set it to :data:`AIR_HU` and record what they did in ``metadata.corrections``.

Two rules, both only for CT (or a volume whose modality is unknown):

1. **The DICOM tag** (PS3.3 C.7.5.1.1.2): PixelPaddingValue, with PixelPaddingRangeLimit the
   inclusive range between the two values, in *stored* pixel values (interpreted with
   PixelRepresentation, before the rescale). Voxels in that range whose value after the
   rescale is below air (< -1024 HU) are padding; a padding value that maps to air or above
   cannot be told apart from a measured value and is left alone.
2. **Without the tag**: voxels at or below :data:`OUT_OF_FIELD_MAX_HU` (-1500 HU) whose
   in-plane 4-connected region touches the border of the slice: the region outside the
   reconstruction circle. Nothing real is that low (air is -1000 HU; reconstruction floors
   are -1024; quantum noise in air reaches at most about -1200 even at low dose), while every
   padding value in use is lower (-2000, -2048, -3024, -32768 ...). A low value enclosed by
   the body, not connected to the border, is never changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from medseg.volume import CTVolume

__all__ = [
    "AIR_HU",
    "OUT_OF_FIELD_MAX_HU",
    "PaddingReport",
    "applies_to_modality",
    "correct_padding",
    "describe_out_of_field",
    "describe_tagged",
    "padding_stored_range",
    "replace_out_of_field",
    "replace_tagged_padding",
]

#: The value padding is replaced with: air, the floor scanners store (12-bit data with
#: intercept -1024), and the model's lower HU clip.
AIR_HU = -1024
#: Values at or below this (HU) that are connected to the slice border are out-of-field
#: padding even without a PixelPaddingValue tag. Far below air (-1000) and any noise around it
#: (scanners floor at -1024; noise in air stays above about -1200), far above every padding
#: value in use (-2000, -2048, -3024, -32768 HU).
OUT_OF_FIELD_MAX_HU = -1500.0
#: Distinct replaced values listed one by one in the correction; more are given as a range.
_MAX_LISTED_VALUES = 4


@dataclass
class PaddingReport:
    """What one rule replaced: voxel count per original value."""

    counts: dict[float, int] = field(default_factory=dict)

    @property
    def n_voxels(self) -> int:
        return sum(self.counts.values())

    def add(self, values: npt.NDArray[Any]) -> None:
        uniq, cnt = np.unique(values, return_counts=True)
        for v, c in zip(uniq.tolist(), cnt.tolist(), strict=True):
            self.counts[float(v)] = self.counts.get(float(v), 0) + int(c)

    def values_text(self) -> str:
        """The replaced values: ``were -2048 HU``, several with their counts, or a range."""
        vals = sorted(self.counts)
        if len(vals) == 1:
            return f"were {_num(vals[0])} HU"
        if len(vals) <= _MAX_LISTED_VALUES:
            return "were " + ", ".join(f"{_num(v)} HU ({self.counts[v]:,})" for v in vals)
        return f"were {_num(vals[0])}..{_num(vals[-1])} HU, {len(vals)} distinct values"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.6g}"


def _as_stored(value: Any, pixel_representation: int, bits_allocated: int,
               bits_stored: int) -> int | None:
    """A PixelPadding* tag value as a stored pixel value. The tag's VR is US or SS following
    PixelRepresentation, but writers (and implicit-VR readers) often give the unsigned
    bit pattern of a signed value (GE: 63536 for -2000): reinterpret it as the pixels are."""
    try:
        v = int(value[0] if isinstance(value, (list, tuple)) else value)
    except (TypeError, ValueError, IndexError):
        return None
    if pixel_representation == 1 and v >= 0:
        if bits_allocated in (8, 16, 32) and v >= 1 << (bits_allocated - 1):
            v -= 1 << bits_allocated
        elif 0 < bits_stored < bits_allocated and v >= 1 << (bits_stored - 1):
            v -= 1 << bits_stored
    return v


def padding_stored_range(value: Any, limit: Any, *, pixel_representation: int,
                         bits_allocated: int, bits_stored: int) -> tuple[int, int] | None:
    """Inclusive range of stored values that PixelPaddingValue (and PixelPaddingRangeLimit,
    when present) declare as padding; None without a usable PixelPaddingValue."""
    if value is None:
        return None
    v = _as_stored(value, pixel_representation, bits_allocated, bits_stored)
    if v is None:
        return None
    lim = None if limit is None else _as_stored(limit, pixel_representation, bits_allocated,
                                                 bits_stored)
    if lim is None:
        return (v, v)
    return (min(v, lim), max(v, lim))


def replace_tagged_padding(array: npt.NDArray[Any],
                           hu_ranges: Sequence[tuple[float, float] | None]) -> PaddingReport:
    """Rule 1, in place on a stack of slices ``(n, rows, cols)`` in HU: in slice ``k``, the
    voxels within ``hu_ranges[k]`` (inclusive; the tag's stored range after that slice's
    rescale) and below air become :data:`AIR_HU`."""
    report = PaddingReport()
    for k, rng in enumerate(hu_ranges):
        if rng is None:
            continue
        lo, hi = rng
        hi = min(hi, AIR_HU - 1e-3)  # at or above air: not distinguishable, left alone
        if lo > hi:
            continue
        sl = array[k]
        mask = (sl >= lo) & (sl <= hi)
        if mask.any():
            report.add(sl[mask])
            sl[mask] = AIR_HU
    return report


def replace_out_of_field(array: npt.NDArray[Any], axis: int = 0) -> PaddingReport:
    """Rule 2, in place: in each plane across ``axis``, voxels at or below
    :data:`OUT_OF_FIELD_MAX_HU` whose 4-connected region touches the plane's border become
    :data:`AIR_HU`."""
    report = PaddingReport()
    if array.dtype.kind not in "if" or array.size == 0 \
            or float(array.min()) > OUT_OF_FIELD_MAX_HU:
        return report
    planes = np.moveaxis(array, axis, 0)  # a view: writes go to ``array``
    for k in range(planes.shape[0]):
        sl = planes[k]
        low = sl <= OUT_OF_FIELD_MAX_HU
        if not low.any():
            continue
        labels, n = ndimage.label(low)
        if n == 0:
            continue
        border = np.unique(np.concatenate(
            [labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        border = border[border > 0]
        if border.size == 0:
            continue
        mask = np.isin(labels, border)
        report.add(sl[mask])
        sl[mask] = AIR_HU
    return report


def describe_tagged(report: PaddingReport, stored: tuple[int, int]) -> str:
    tag = (f"PixelPaddingValue {stored[0]}" if stored[0] == stored[1] else
           f"PixelPaddingValue/PixelPaddingRangeLimit {stored[0]}..{stored[1]}")
    return (f"scanner padding ({tag}, stored values) set to {AIR_HU} HU (air) in "
            f"{report.n_voxels:,} voxels ({report.values_text()})")


def describe_out_of_field(report: PaddingReport) -> str:
    return (f"out-of-field pixels (at or below {_num(OUT_OF_FIELD_MAX_HU)} HU, connected to "
            f"the slice border) set to {AIR_HU} HU (air) in {report.n_voxels:,} voxels "
            f"({report.values_text()})")


def applies_to_modality(modality: str | None) -> bool:
    """Padding correction is for CT (or an unknown modality): MR, PET... are left alone."""
    return modality is None or modality.strip().upper() in ("", "CT")


def correct_padding(volume: CTVolume) -> CTVolume:
    """Rule 2 on a loaded volume (any format), planes across its axial axis; records the
    correction. Returns ``volume`` (its array replaced by a corrected copy when needed)."""
    if not applies_to_modality(volume.metadata.modality):
        return volume
    arr = volume.array
    if arr.dtype.kind not in "if" or float(arr.min()) > OUT_OF_FIELD_MAX_HU:
        return volume
    if not arr.flags.writeable:
        arr = arr.copy()
    report = replace_out_of_field(arr, axis=volume.axial_axis())
    if report.n_voxels:
        volume.array = arr
        volume.metadata.corrections.append(describe_out_of_field(report))
    return volume
