"""Plausibility limits every loader applies before it trusts a header.

A header is a claim; a corrupt or hostile one claims absurd things (a pixel 1e30 mm wide,
30000 x 30000 x 1000 voxels in a 400-byte file). Each loader checks the claim against these
limits *before* allocating or computing anything from it, and refuses with a
:mod:`medseg.errors` exception naming the file, the value and the limit. The limits are far
outside anything a CT scanner writes, so a real study never meets them (every study in
``../shared/data`` is checked by the test suite); they are documented in
``docs/concepts/dicom-loading.md`` ("Plausibility limits").
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from medseg.errors import ConfigError, GeometryError, PixelDataError

__all__ = [
    "DEFAULT_MAX_VOLUME_BYTES",
    "MAX_DEFLATE_RATIO",
    "MAX_EXTENT_MM",
    "MAX_VOLUME_BYTES_ENV",
    "PIXEL_SPACING_RANGE_MM",
    "SLICE_SPACING_RANGE_MM",
    "WORKING_BYTES_PER_VOXEL",
    "check_extent",
    "check_pixel_spacing",
    "check_slice_spacing",
    "check_volume_geometry",
    "check_volume_size",
    "max_volume_bytes",
]

#: In-plane pixel spacing (mm) a CT image can have. Clinical CT: about 0.2-1.5 mm; micro-CT
#: of specimens reaches 0.05 mm; a 64 x 64 thumbnail of a chest (cip-ct64) 4.2 mm. Outside
#: this the value is a corrupt header (1e30, 1e-9) and every distance and volume computed
#: from it would be wrong.
PIXEL_SPACING_RANGE_MM = (0.05, 10.0)
#: Distance between neighbouring slices (mm). Thin-slice CT: 0.5 mm and up; interspaced HRCT
#: protocols: 1 mm slices every 10-30 mm. Below 0.05 mm two slices are the same plane written
#: twice with rounding noise; resampling onto such a grid would multiply the slice count.
SLICE_SPACING_RANGE_MM = (0.05, 50.0)
#: Largest extent of a volume along any axis (mm): a whole-body CT is about 2 m long, and the
#: widest bore is 0.9 m.
MAX_EXTENT_MM = 2000.0
#: deflate (gzip, zlib: .nii.gz, NRRD gzip, MHA CompressedData) cannot compress better than
#: 1032:1 (zlib technical details, "maximum compression factor"); a header claiming more
#: voxel bytes than ``compressed size x 1032`` lies.
MAX_DEFLATE_RATIO = 1032
#: Bytes per voxel of the arrays medseg works in (float32 HU, probabilities): the unit of the
#: memory budget, whatever the type on disk.
WORKING_BYTES_PER_VOXEL = 4
#: Default memory budget for one volume, in working bytes (8 GiB: 2^31 voxels, e.g.
#: 1024 x 1024 x 2048; a 512 x 512 x 1000 chest CT is 1 GiB).
DEFAULT_MAX_VOLUME_BYTES = 8 << 30
#: Environment variable that overrides the budget (bytes), for machines with more memory.
MAX_VOLUME_BYTES_ENV = "MEDSEG_MAX_VOLUME_BYTES"


def max_volume_bytes() -> int:
    """The memory budget for one volume: ``$MEDSEG_MAX_VOLUME_BYTES`` or the default."""
    text = os.environ.get(MAX_VOLUME_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_VOLUME_BYTES
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{MAX_VOLUME_BYTES_ENV}={text!r} is not a positive number of bytes")
    return value


def _fmt_shape(shape: Sequence[int]) -> str:
    return " x ".join(str(int(n)) for n in shape)


def _fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def check_volume_size(shape: Sequence[int], *, path: str | Path | None,
                      itemsize: int | None = None, data_bytes: int | None = None,
                      compression: str | None = None, series: str | None = None) -> None:
    """Refuse a claimed voxel grid before anything is allocated for it.

    ``shape``: the voxel counts the header claims; ``itemsize``: bytes per stored voxel;
    ``data_bytes``: bytes the file actually holds for the voxel data (None: unknown);
    ``compression``: None for raw data, ``"deflate"`` for gzip/zlib (bounded by
    :data:`MAX_DEFLATE_RATIO`), anything else is not bounded. Raises
    :class:`~medseg.errors.PixelDataError` naming the file, the shape and the reason.
    """
    dims = [int(n) for n in shape]
    text = _fmt_shape(dims)
    if any(n <= 0 for n in dims):
        raise PixelDataError(f"the header claims an empty voxel grid ({text})",
                             path=path, series=series)
    n_vox = math.prod(dims)
    budget = max_volume_bytes()
    need = n_vox * WORKING_BYTES_PER_VOXEL
    if need > budget:
        raise PixelDataError(
            f"the header claims {text} voxels ({n_vox:.3g}): {_fmt_bytes(need)} in memory, "
            f"more than the budget of {_fmt_bytes(budget)} (set {MAX_VOLUME_BYTES_ENV} to "
            "raise it if the volume is real)", path=path, series=series)
    if itemsize is None or data_bytes is None:
        return
    claimed = n_vox * itemsize
    if compression is None and data_bytes < claimed:
        raise PixelDataError(
            f"the header claims {text} voxels of {itemsize} byte(s) ({_fmt_bytes(claimed)}) "
            f"but the file holds {_fmt_bytes(data_bytes)} of voxel data: truncated file or "
            "corrupt header", path=path, series=series)
    if compression == "deflate" and claimed > data_bytes * MAX_DEFLATE_RATIO:
        raise PixelDataError(
            f"the header claims {text} voxels of {itemsize} byte(s) ({_fmt_bytes(claimed)}) "
            f"but {_fmt_bytes(data_bytes)} of compressed data can hold at most "
            f"{_fmt_bytes(data_bytes * MAX_DEFLATE_RATIO)} (deflate compresses at most "
            f"{MAX_DEFLATE_RATIO}:1): corrupt header", path=path, series=series)


def _in_range(value: float, bounds: tuple[float, float]) -> bool:
    return math.isfinite(value) and bounds[0] <= value <= bounds[1]


def check_pixel_spacing(spacing: Sequence[float], *, what: str = "pixel spacing") -> str | None:
    """Why an in-plane spacing (mm) is implausible, or None."""
    lo, hi = PIXEL_SPACING_RANGE_MM
    bad = [v for v in spacing if not _in_range(float(v), PIXEL_SPACING_RANGE_MM)]
    if bad:
        vals = ", ".join(f"{float(v):.6g}" for v in spacing)
        return f"{what} ({vals}) mm is outside the plausible {lo:g}-{hi:g} mm"
    return None


def check_slice_spacing(spacing: float, *, what: str = "slice spacing") -> str | None:
    """Why a spacing between slices (mm) is implausible, or None."""
    lo, hi = SLICE_SPACING_RANGE_MM
    if not _in_range(float(spacing), SLICE_SPACING_RANGE_MM):
        return f"{what} {float(spacing):.6g} mm is outside the plausible {lo:g}-{hi:g} mm"
    return None


def check_extent(extent_mm: Sequence[float], *, what: str = "the volume") -> str | None:
    """Why the extent (mm, per axis) is implausible, or None."""
    worst = max(float(v) for v in extent_mm)
    if not math.isfinite(worst) or worst > MAX_EXTENT_MM:
        vals = " x ".join(f"{float(v):.6g}" for v in extent_mm)
        return (f"{what} spans {vals} mm, more than the plausible {MAX_EXTENT_MM:g} mm "
                "along an axis")
    return None


def check_volume_geometry(spacing: Sequence[float], shape_ijk: Sequence[int], *,
                          path: str | Path | None) -> None:
    """Plausible spacing and extent for a volume file (NIfTI, NRRD, MHA), in index order.

    Which axis is "in plane" is not stated in a volume file: the two finest spacings must be
    plausible pixel spacings, the coarsest a plausible slice spacing. Raises
    :class:`~medseg.errors.GeometryError`.
    """
    sp = [float(v) for v in spacing]
    fine = sorted(sp)[:2]
    reason = check_pixel_spacing(fine, what="the two finest voxel spacings") \
        or check_slice_spacing(max(sp), what="the coarsest voxel spacing") \
        or check_extent([s * n for s, n in zip(sp, shape_ijk, strict=True)])
    if reason:
        raise GeometryError(f"implausible geometry: {reason} (spacing "
                            f"{', '.join(f'{v:.6g}' for v in sp)} mm)", path=path)
