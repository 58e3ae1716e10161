"""Reading pixel data to HU, the checks on the values, scanner padding, and resampling a
tilted or unevenly spaced stack."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom

from medseg.errors import PixelDataError
from medseg.io.dicom.checks import _frame_names, _grid_gap, _resampled_shape
from medseg.io.dicom.model import (
    _MAX_WORKERS,
    _VALUE_CHECK_STRIDE,
    MAX_OUTSIDE_FRACTION,
    MIN_NEIGHBOUR_CHECK_PIXELS,
    PLAUSIBLE_CT_HU,
    SLICE_JUMP_MIN_HU,
    SLICE_JUMP_RATIO,
    FrameRecord,
    StackPlan,
)
from medseg.io.padding import (
    PaddingReport,
    applies_to_modality,
    describe_out_of_field,
    describe_tagged,
    replace_out_of_field,
    replace_tagged_padding,
)
from medseg.volume import Geometry

__all__ = ["check_slice_values"]


def _raw_dtype(f: FrameRecord) -> np.dtype[Any]:
    signed = f.pixel_representation == 1
    if f.bits_allocated == 8:
        return np.dtype(np.int8 if signed else np.uint8)
    if f.bits_allocated == 16:
        return np.dtype("<i2" if signed else "<u2")
    if f.bits_allocated == 32:
        return np.dtype("<i4" if signed else "<u4")
    raise PixelDataError(f"unsupported BitsAllocated {f.bits_allocated}", path=f.path)


def _fix_bits(arr: npt.NDArray[Any], f: FrameRecord) -> npt.NDArray[Any]:
    """Apply BitsStored as pydicom does: sign-extend signed values stored in fewer bits."""
    if f.bits_stored >= f.bits_allocated or f.pixel_representation != 1:
        return arr
    shift = f.bits_allocated - f.bits_stored
    return (arr << shift) >> shift


def _read_uncompressed(f: FrameRecord) -> npt.NDArray[Any]:
    dtype = _raw_dtype(f)
    count = f.rows * f.columns
    assert f.pixel_offset is not None
    try:
        arr = np.fromfile(f.path, dtype=dtype, count=count, offset=f.pixel_offset)
    except OSError as exc:
        raise PixelDataError(f"cannot read pixel data: {exc.strerror}", path=f.path) from exc
    if arr.size != count:
        raise PixelDataError(
            f"truncated file: pixel data holds {arr.size} of {count} pixels", path=f.path)
    return _fix_bits(arr.reshape(f.rows, f.columns), f)


def _decode_file(path: str) -> npt.NDArray[Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
            return np.asarray(ds.pixel_array)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PixelDataError(f"cannot decode pixel data: {msg}", path=path) from exc


def _read_frames(frames: Sequence[FrameRecord]) -> list[npt.NDArray[Any]]:
    """Raw stored values of each frame (before rescale), in the order given."""
    out: list[npt.NDArray[Any] | None] = [None] * len(frames)
    fast = [i for i, f in enumerate(frames) if f.pixel_offset is not None]
    slow: dict[str, list[int]] = {}
    for i, f in enumerate(frames):
        if f.pixel_offset is None:
            slow.setdefault(f.path, []).append(i)

    def decode(path: str) -> None:
        data = _decode_file(path)
        for i in slow[path]:
            fr = frames[i]
            arr = data[fr.frame] if (fr.frame is not None and data.ndim == 3) else data
            if arr.shape != (fr.rows, fr.columns):
                raise PixelDataError(
                    f"decoded frame has shape {arr.shape}, header says "
                    f"{(fr.rows, fr.columns)}", path=path)
            out[i] = arr

    def read_fast(i: int) -> None:
        out[i] = _read_uncompressed(frames[i])

    with ThreadPoolExecutor(_MAX_WORKERS) as pool:
        list(pool.map(read_fast, fast))
        list(pool.map(decode, slow))
    return [a for a in out if a is not None]


def _to_hu(raw: list[npt.NDArray[Any]], frames: Sequence[FrameRecord]) -> npt.NDArray[Any]:
    """Apply RescaleSlope/Intercept per frame, in one pass into a preallocated array.

    int16 when every slope and intercept is a whole number and every result fits (the usual
    CT case: half the memory of float32, and exact); float32 otherwise.
    """
    n = len(raw)
    rows, cols = raw[0].shape
    slopes = [f.slope for f in frames]
    inters = [f.intercept for f in frames]
    integral = all(float(v).is_integer() for v in (*slopes, *inters)) and all(
        r.dtype.kind in "iu" for r in raw)
    if integral:
        fits = True
        for r, m, b in zip(raw, slopes, inters, strict=False):
            lo, hi = int(r.min()) * m + b, int(r.max()) * m + b
            if min(lo, hi) < -32768 or max(lo, hi) > 32767:
                fits = False
                break
        if fits:
            out = np.empty((n, rows, cols), np.int16)
            for k, (r, m, b) in enumerate(zip(raw, slopes, inters, strict=False)):
                if m == 1:
                    np.add(r, np.int32(b), out=out[k], casting="unsafe")
                else:
                    out[k] = r.astype(np.int32) * int(m) + int(b)
            return out
    outf = np.empty((n, rows, cols), np.float32)
    # an absurd rescale overflows to inf here; check_slice_values refuses it, naming the slice
    with np.errstate(over="ignore", invalid="ignore"):
        for k, (r, m, b) in enumerate(zip(raw, slopes, inters, strict=False)):
            np.multiply(r, np.float32(m), out=outf[k], casting="unsafe")
            outf[k] += np.float32(b)
    return outf


def _resample_stack(hu: npt.NDArray[Any], positions: npt.NDArray[np.float64], plan: StackPlan,
                    fill: float) -> tuple[npt.NDArray[np.float32], Geometry]:
    """Resample sorted slices (n, rows, cols) placed at ``positions`` onto a regular grid with
    axes (row_dir, col_dir, normal), linear along the normal and bilinear in plane. The grid
    covers every acquired pixel."""
    from scipy.ndimage import map_coordinates

    dr, dc = plan.spacing_rc  # between rows (along col_dir), between columns (along row_dir)
    n, rows, cols = hu.shape
    rel = positions - positions[0]
    u = rel @ plan.row_dir  # in-plane offset of each slice origin along the row direction
    v = rel @ plan.col_dir
    d = plan.distances
    u_min, v_min = float(u.min()), float(v.min())
    gap = _grid_gap(plan)
    nk, nj, ni = _resampled_shape(positions, plan, rows, cols)
    out = np.empty((nk, nj, ni), np.float32)
    jj, ii = np.mgrid[0:nj, 0:ni].astype(np.float64)
    for k in range(nk):
        dk = d[0] + k * gap
        b = int(np.clip(np.searchsorted(d, dk - 1e-6), 1, n - 1))
        a = b - 1
        t = float(np.clip((dk - d[a]) / (d[b] - d[a]), 0.0, 1.0))
        acc = np.zeros((nj, ni), np.float64)
        for s, w in ((a, 1.0 - t), (b, t)):
            if w <= 1e-9:
                continue
            r = (v_min - v[s]) / dr + jj
            c = (u_min - u[s]) / dc + ii
            acc += w * map_coordinates(hu[s].astype(np.float32), [r, c], order=1,
                                       mode="constant", cval=fill)
        out[k] = acc
    origin = positions[0] + u_min * plan.row_dir + v_min * plan.col_dir
    direction = np.column_stack([plan.row_dir, plan.col_dir, plan.normal])
    return out, Geometry(origin=origin, spacing=(dc, dr, gap), direction=direction)


def check_slice_values(hu: npt.NDArray[Any], frames: Sequence[FrameRecord]) -> None:
    """Refuse a CT slice whose values cannot be a CT slice, naming it (position along the
    stack and file). ``hu``: the slices in HU (n, rows, cols) in the order of ``frames``,
    scanner padding already set to air.

    * more than :data:`MAX_OUTSIDE_FRACTION` of its pixels outside :data:`PLAUSIBLE_CT_HU`;
    * its mean absolute difference from *each* neighbour exceeds :data:`SLICE_JUMP_MIN_HU`
      and :data:`SLICE_JUMP_RATIO` times the difference between the two neighbours (for the
      first and last slice: between the next two), i.e. the neighbours agree with each
      other and not with it: one slice re-encoded, rescaled wrongly or overwritten (slices
      of at least :data:`MIN_NEIGHBOUR_CHECK_PIXELS` pixels, series of 3 slices and more).

    Raises :class:`~medseg.errors.PixelDataError` (path and series are filled in by the
    caller).
    """
    n, rows, cols = hu.shape
    step = _VALUE_CHECK_STRIDE if min(rows, cols) >= 128 else 1
    lo, hi = PLAUSIBLE_CT_HU

    def where(k: int) -> str:
        return f"slice {k + 1} of {n} ({_frame_names([frames[k]], frames)})"

    sub: list[npt.NDArray[np.float32]] = []
    for k in range(n):
        s = np.asarray(hu[k, ::step, ::step], np.float32)
        outside = float(np.count_nonzero((s < lo) | (s > hi) | ~np.isfinite(s))) / s.size
        if outside > MAX_OUTSIDE_FRACTION:
            raise PixelDataError(
                f"{where(k)}: {100 * outside:.0f} % of its pixels are outside the plausible CT "
                f"range {lo:g}..{hi:g} HU (median {float(np.median(s)):.6g}): the slice's "
                "pixel data or its rescale is wrong")
        sub.append(s)
    if n < 3 or rows * cols < MIN_NEIGHBOUR_CHECK_PIXELS:
        return

    def diff(a: int, b: int) -> float:
        return float(np.mean(np.abs(sub[a] - sub[b])))

    adjacent = [diff(k, k + 1) for k in range(n - 1)]
    for k in range(n):
        if k == 0:
            mine, theirs = adjacent[0], adjacent[1]
        elif k == n - 1:
            mine, theirs = adjacent[-1], adjacent[-2]
        else:
            mine, theirs = min(adjacent[k - 1], adjacent[k]), diff(k - 1, k + 1)
        if mine > SLICE_JUMP_MIN_HU and mine > SLICE_JUMP_RATIO * theirs:
            medians = ", ".join(f"{float(np.median(sub[j])):.0f}"
                                for j in (k - 1, k + 1) if 0 <= j < n)
            raise PixelDataError(
                f"{where(k)} differs from its neighbours by {mine:.0f} HU on average while "
                f"they differ from each other by {theirs:.0f} HU (median "
                f"{float(np.median(sub[k])):.0f} HU, neighbours' {medians} HU): its pixel "
                "data or rescale does not match the rest of the series")


def _padding_to_air(hu: npt.NDArray[Any], frames: Sequence[FrameRecord],
                    modality: str | None) -> list[str]:
    """Set scanner padding (PixelPaddingValue/RangeLimit) and out-of-field pixels of the
    slice stack ``hu`` to air, in place, before any resampling (see :mod:`medseg.io.padding`);
    return the corrections to record. CT (or unknown modality) only."""
    if not applies_to_modality(modality):
        return []
    out: list[str] = []
    stored = {f.padding_range for f in frames if f.padding_range is not None}
    if stored:
        ranges: list[tuple[float, float] | None] = []
        for f in frames:
            if f.padding_range is None:
                ranges.append(None)
                continue
            a, b = (f.padding_range[0] * f.slope + f.intercept,
                    f.padding_range[1] * f.slope + f.intercept)
            tol = 0.25 * abs(f.slope)  # float32 rounding; stored steps are |slope| apart
            ranges.append((min(a, b) - tol, max(a, b) + tol))
        report = replace_tagged_padding(hu, ranges)
        if report.n_voxels:
            rng = min(stored) if len(stored) == 1 else (min(r[0] for r in stored),
                                                       max(r[1] for r in stored))
            out.append(describe_tagged(report, rng))
    oof: PaddingReport = replace_out_of_field(hu, axis=0)
    if oof.n_voxels:
        out.append(describe_out_of_field(oof))
    return out
