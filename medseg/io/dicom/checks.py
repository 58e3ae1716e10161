"""Checks of a series before its pixels are read: each slice's header, then the stack's
geometry (order along the normal, gaps, tilt, extent) and the plan for reading it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from medseg.errors import (
    GeometryError,
    InconsistentOrientationError,
    InputError,
    MissingSlicesError,
    NotAVolumeError,
    PixelDataError,
)
from medseg.io.dicom.model import (
    _MAX_NAMED_FILES,
    DUPLICATE_POSITION_MM,
    GAP_MULTIPLE_TOLERANCE,
    GREYSCALE_PHOTOMETRIC,
    MIN_SLICES,
    ORIENTATION_TOLERANCE,
    POSITION_TOLERANCE_MM,
    SUPPORTED_BITS_ALLOCATED,
    FrameRecord,
    SeriesInfo,
    StackPlan,
)
from medseg.io.limits import (
    SLICE_SPACING_RANGE_MM,
    check_extent,
    check_pixel_spacing,
    check_volume_size,
)

__all__: list[str] = []


def _frame_names(frames: Sequence[FrameRecord], among: Sequence[FrameRecord]) -> str:
    """The files of ``frames`` relative to the series folder (with the frame number for
    multi-frame files), at most :data:`_MAX_NAMED_FILES` of them, the rest counted."""
    dirs = {os.path.dirname(f.path) for f in among}
    root = os.path.commonpath(sorted(dirs)) if dirs else ""
    names = []
    for f in frames[:_MAX_NAMED_FILES]:
        name = os.path.relpath(f.path, root) if root else f.path
        names.append(name if f.frame is None else f"{name} frame {f.frame + 1}")
    more = len(frames) - len(names)
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def _frame_problem(f: FrameRecord) -> tuple[type[InputError], str] | None:
    """Why one frame's header cannot be trusted on its own, or None."""
    if f.bad_rescale:
        return PixelDataError, (f"{f.bad_rescale} is not a finite number: its pixels cannot "
                                "be converted to HU")
    if f.slope == 0:
        return PixelDataError, (f"RescaleSlope is 0: every pixel would read {f.intercept:g} "
                                "HU whatever was measured")
    if f.bits_allocated not in SUPPORTED_BITS_ALLOCATED:
        return PixelDataError, (f"BitsAllocated {f.bits_allocated} is not one of "
                                f"{', '.join(map(str, SUPPORTED_BITS_ALLOCATED))}")
    if not 1 <= f.bits_stored <= f.bits_allocated:
        return PixelDataError, (f"BitsStored {f.bits_stored} does not fit BitsAllocated "
                                f"{f.bits_allocated}")
    if f.pixel_representation not in (0, 1):
        return PixelDataError, f"PixelRepresentation {f.pixel_representation} is not 0 or 1"
    if f.photometric is not None and f.photometric.upper() not in GREYSCALE_PHOTOMETRIC:
        return PixelDataError, (f"PhotometricInterpretation {f.photometric} is not a "
                                "grey-scale image")
    if f.pixel_bytes is not None:
        need = f.rows * f.columns * f.file_frames * f.bits_allocated // 8
        if f.pixel_bytes not in (need, need + 1):  # + 1: the pad byte of an odd length
            return PixelDataError, (
                f"PixelData holds {f.pixel_bytes} bytes but the header describes "
                f"{f.file_frames} frame(s) of {f.rows} x {f.columns} pixels of "
                f"{f.bits_allocated} bits ({need} bytes): the header does not describe its "
                "pixel data (edited tags or re-encoded pixels)")
    if f.pixel_spacing is not None:
        why = check_pixel_spacing(f.pixel_spacing, what="PixelSpacing")
        if why:
            return GeometryError, why
    return None


def _storage(f: FrameRecord) -> tuple[int, int, str]:
    """How a slice stores its pixels; every slice of a series must agree. BitsStored may
    differ (a PACS that recompresses some slices rewrites it), each slice is read with its
    own, and the values are checked after the rescale."""
    return (f.bits_allocated, f.pixel_representation, (f.photometric or "?").upper())


def _check_slice_headers(frames: Sequence[FrameRecord]) -> None:
    """Refuse the series if a slice's header cannot be trusted (named), or if its slices
    store their pixels differently (the odd ones named)."""
    bad = [(f, p) for f in frames if (p := _frame_problem(f)) is not None]
    if bad:
        exc_type, why = bad[0][1]
        same = [f for f, (_, w) in bad if w == why]
        if len(same) == len(frames):
            raise exc_type(f"every slice: {why}")
        others = len(bad) - len(same)
        extra = f"; {others} more slice(s) have other header problems" if others else ""
        raise exc_type(f"slice file {_frame_names(same, frames)}: {why}{extra}")
    storages = [_storage(f) for f in frames]
    counts: dict[tuple[int, int, str], int] = {}
    for st in storages:
        counts[st] = counts.get(st, 0) + 1
    if len(counts) > 1:
        common = max(counts, key=lambda k: counts[k])
        odd = [f for f, st in zip(frames, storages, strict=True) if st != common]
        odd_st = _storage(odd[0])

        def fmt(st: tuple[int, int, str]) -> str:
            return f"BitsAllocated {st[0]}, PixelRepresentation {st[1]}, {st[2]}"
        raise PixelDataError(
            f"slice file {_frame_names(odd, frames)} store(s) pixels as {fmt(odd_st)} where "
            f"the other {counts[common]} slices use {fmt(common)}: the slices of one series "
            "are stored alike; a slice stored otherwise was re-encoded or corrupted")


def _odd_ones(frames: Sequence[FrameRecord], values: Sequence[Any]) -> list[FrameRecord]:
    """The frames whose value differs from the most common one."""
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    common = max(counts, key=lambda k: counts[k])
    return [f for f, v in zip(frames, values, strict=True) if v != common]


def _plan_stack(s: SeriesInfo) -> StackPlan:
    """Check the frames of ``s`` form a volume; raise an InputError subclass if not."""
    frames = s.frames
    if len(frames) == 1:
        raise NotAVolumeError("a single 2D image, not a volume")
    if len(frames) < MIN_SLICES:
        raise NotAVolumeError(
            f"only {len(frames)} slices: a volume needs at least {MIN_SLICES} so that its "
            "spacing can be checked")
    if any(f.position is None or f.orientation is None for f in frames):
        lacking = [f for f in frames if f.position is None or f.orientation is None]
        raise GeometryError(
            f"{len(lacking)} of {len(frames)} slices lack ImagePositionPatient/"
            f"ImageOrientationPatient (or hold non-finite values) "
            f"({_frame_names(lacking, frames)}): their place in space is unknown")
    if any(f.pixel_spacing is None for f in frames):
        lacking = [f for f in frames if f.pixel_spacing is None]
        raise GeometryError(
            f"PixelSpacing is missing or not two finite numbers in {len(lacking)} of "
            f"{len(frames)} slices ({_frame_names(lacking, frames)}): the in-plane size of a "
            "pixel is unknown")
    _check_slice_headers(frames)
    shapes = {(f.rows, f.columns) for f in frames}
    if len(shapes) > 1:
        odd = _odd_ones(frames, [(f.rows, f.columns) for f in frames])
        raise InconsistentOrientationError(
            f"slices have different sizes {sorted(shapes)} ({_frame_names(odd, frames)} "
            "differ from the others)")
    spacings = np.array([f.pixel_spacing for f in frames], float)
    if np.ptp(spacings, axis=0).max() > 1e-4:
        odd = _odd_ones(frames, [tuple(np.round(r, 4)) for r in spacings.tolist()])
        raise InconsistentOrientationError(
            f"slices have different PixelSpacing {sorted({tuple(r) for r in spacings.tolist()})}"
            f" ({_frame_names(odd, frames)} differ from the others)")
    iops = np.array([f.orientation for f in frames], float)
    if np.abs(iops - iops[0]).max() > ORIENTATION_TOLERANCE:
        n_orient = len({tuple(np.round(r, 3)) for r in iops})
        raise InconsistentOrientationError(
            f"slices have {n_orient} different orientations (ImageOrientationPatient); "
            "a series must be one stack of parallel slices")
    row_dir, col_dir = iops[0, :3], iops[0, 3:]
    if abs(np.linalg.norm(row_dir) - 1) > 0.01 or abs(np.linalg.norm(col_dir) - 1) > 0.01 \
            or abs(row_dir @ col_dir) > 0.01:
        raise GeometryError(f"ImageOrientationPatient is not two orthonormal vectors: {iops[0]}")
    # Orthonormalise exactly (Gram-Schmidt) so the direction matrix is a rotation.
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir - (col_dir @ row_dir) * row_dir
    col_dir /= np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)

    positions = np.array([f.position for f in frames], float)
    dist = positions @ normal
    inst = np.array([f.instance_number if f.instance_number is not None else 0 for f in frames])
    order = np.lexsort((inst, dist))
    dist_sorted = dist[order]
    gaps = np.diff(dist_sorted)
    n_dup = int(np.sum(gaps < DUPLICATE_POSITION_MM))
    if n_dup:
        acq = {f.acquisition_number for f in frames}
        detail = f" ({len(acq)} acquisition numbers)" if len(acq) > 1 else ""
        raise NotAVolumeError(
            f"{n_dup + 1} slices share a position{detail}: the series holds several "
            "volumes (phases, echoes, repeats); medseg reads one 3D volume")
    # In-plane drift: how far each slice's origin is from the line through the first
    # slice's origin along the normal. A straight stack has ~0; gantry tilt grows linearly.
    p0 = positions[order[0]]
    rel = positions[order] - p0
    inplane = rel - np.outer(rel @ normal, normal)
    drift = float(np.linalg.norm(inplane, axis=1).max())
    extent = float(dist_sorted[-1] - dist_sorted[0])
    tilt_deg = float(np.degrees(np.arctan2(np.linalg.norm(inplane[-1]), extent)))
    spacing_rc = (float(spacings[0, 0]), float(spacings[0, 1]))
    in_order = [frames[i] for i in order]
    _check_stack_extent(in_order, spacing_rc, extent + drift)
    corrections: list[str] = []

    median_gap = float(np.median(gaps))
    ideal = dist_sorted[0] + np.arange(len(dist_sorted)) * (extent / (len(gaps)))
    uniform = float(np.abs(dist_sorted - ideal).max()) <= POSITION_TOLERANCE_MM
    if not uniform:
        multiples = np.round(gaps / median_gap)
        is_multiple = np.abs(gaps - multiples * median_gap) <= np.maximum(
            POSITION_TOLERANCE_MM, GAP_MULTIPLE_TOLERANCE * median_gap)
        if is_multiple.all() and multiples.max() >= 2:
            where = int(np.argmax(multiples >= 2))
            n_missing = int(np.sum(multiples - 1))
            raise MissingSlicesError(
                f"{n_missing} slice(s) missing: gap of {gaps[where]:.3f} mm after slice "
                f"{where + 1} of {len(frames)} where the spacing is {median_gap:.3f} mm")
        corrections.append(
            f"variable slice spacing ({gaps.min():.3f}-{gaps.max():.3f} mm) resampled to a "
            f"regular {_target_gap(gaps):.3f} mm grid")
    _check_gaps(in_order, gaps)
    tilted = drift > POSITION_TOLERANCE_MM
    if tilted:
        corrections.append(
            f"gantry tilt {tilt_deg:.2f} deg (slices drift {drift:.2f} mm in plane) corrected by "
            "resampling onto a grid aligned with the slice planes")
    plan = StackPlan(
        order=[int(i) for i in order], row_dir=row_dir, col_dir=col_dir, normal=normal,
        distances=dist_sorted, gaps=gaps, spacing_rc=spacing_rc, tilt_deg=tilt_deg,
        inplane_drift_mm=drift, regular=uniform and not tilted, corrections=corrections,
    )
    f0 = frames[0]
    check_volume_size((len(frames), f0.rows, f0.columns) if plan.regular
                      else _resampled_shape(positions[order], plan, f0.rows, f0.columns),
                      path=None)
    return plan


def _check_stack_extent(frames: Sequence[FrameRecord], spacing_rc: tuple[float, float],
                        length_mm: float) -> None:
    """Plausible extent (:mod:`medseg.io.limits`) of a stack whose ``frames`` are in order
    along the normal, ``length_mm`` long (with in-plane drift)."""
    f0 = frames[0]
    dr, dc = spacing_rc
    why = check_extent((f0.columns * dc, f0.rows * dr, length_mm), what="the series")
    if why:
        raise GeometryError(f"{why} (slices from {_frame_names([frames[0]], frames)} to "
                            f"{_frame_names([frames[-1]], frames)})")


def _check_gaps(frames: Sequence[FrameRecord], gaps: npt.NDArray[np.float64]) -> None:
    """Plausible spacing between neighbouring slices (``frames`` in order)."""
    lo, hi = SLICE_SPACING_RANGE_MM
    for k, gap in enumerate(gaps):
        if not lo <= gap <= hi:
            raise GeometryError(
                f"slices {k + 1} and {k + 2} of {len(frames)} "
                f"({_frame_names(frames[k:k + 2], frames)}) are {gap:.6g} mm apart, outside "
                f"the plausible slice spacing {lo:g}-{hi:g} mm")


def _resampled_shape(positions: npt.NDArray[np.float64], plan: StackPlan, rows: int,
                     cols: int) -> tuple[int, int, int]:
    """(nk, nj, ni) of the regular grid :func:`_resample_stack` builds."""
    dr, dc = plan.spacing_rc
    rel = positions - positions[0]
    u = rel @ plan.row_dir
    v = rel @ plan.col_dir
    d = plan.distances
    ni = int(np.ceil((u.max() - u.min()) / dc - 1e-6)) + cols
    nj = int(np.ceil((v.max() - v.min()) / dr - 1e-6)) + rows
    # ceil: the grid reaches the last slice (the top plane may lie up to one gap beyond it)
    nk = int(np.ceil((d[-1] - d[0]) / _grid_gap(plan) - 1e-6)) + 1
    return nk, nj, ni


def _grid_gap(plan: StackPlan) -> float:
    """Slice spacing of the regular grid of a resampled stack."""
    d = plan.distances
    if np.allclose(plan.gaps, plan.gaps[0], atol=POSITION_TOLERANCE_MM):
        return float((d[-1] - d[0]) / (len(d) - 1))
    return _target_gap(plan.gaps)


def _target_gap(gaps: npt.NDArray[np.float64]) -> float:
    """Slice spacing of the regular grid a variable-spacing series is resampled onto: the
    smallest gap, so no acquired slice is under-sampled (dcm2niix's choice too)."""
    return float(gaps.min())
