"""Finding the series under a folder or DICOMDIR, and choosing the one to load."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from medseg.conventions import VOLUME_SUFFIXES
from medseg.errors import (
    InputError,
    NoSeriesError,
    NotFoundError,
    SeriesSelectionError,
    UnreadableFileError,
)
from medseg.io.dicom.checks import _plan_stack
from medseg.io.dicom.headers import (
    _file_skip_reason,
    _frames_of,
    _read_header,
    _series_fields,
    _series_skip_reason,
    _str,
    looks_like_dicom,
)
from medseg.io.dicom.model import _MAX_NAMED_FILES, DicomScan, SeriesInfo, SkippedFile

__all__ = ["choose_series", "scan_dicom"]


def _iter_files(root: Path) -> Iterable[Path]:
    if root.is_file():
        if root.name.upper() == "DICOMDIR":
            yield from _dicomdir_files(root)
        else:
            yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _dicomdir_files(path: Path) -> Iterable[Path]:
    """The files a DICOMDIR references (ReferencedFileID of each directory record)."""
    try:
        ds = pydicom.dcmread(path)
        records = ds.DirectoryRecordSequence
    except (InvalidDicomError, OSError, ValueError, AttributeError) as exc:
        raise UnreadableFileError(f"cannot read DICOMDIR: {exc}", path=path) from exc
    for rec in records:
        ref = rec.get("ReferencedFileID")
        if ref:
            parts = [ref] if isinstance(ref, str) else list(ref)
            yield path.parent.joinpath(*[str(p) for p in parts])


def _read_one(path: Path) -> tuple[Path, Dataset | None, str | None]:
    if path.name.lower().endswith(VOLUME_SUFFIXES):
        return path, None, "a NIfTI/NRRD/MHA volume, not DICOM (pass the file itself)"
    if not looks_like_dicom(path):
        return path, None, "not a DICOM file"
    try:
        ds = _read_header(path)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on bad files
        return path, None, f"unreadable DICOM ({type(exc).__name__}: {exc})"
    if len(ds) == 0:
        return path, None, "not a DICOM file"
    return path, ds, None


def scan_dicom(path: str | Path, *, series_uid: str | None = None) -> DicomScan:
    """Discover the series under ``path`` (a folder, a DICOMDIR or one DICOM file) and pick
    the one medseg would load (see :func:`choose_series`)."""
    root = Path(path)
    if not root.exists():
        raise NotFoundError("no such file or folder", path=root)
    files = list(_iter_files(root))
    if not files:
        raise NotFoundError("the folder is empty", path=root)
    skipped: list[SkippedFile] = []
    by_uid: dict[str, SeriesInfo] = {}
    # Files skipped although they are instances of an image series: (uid, SOP class, skip).
    broken: list[tuple[str, str | None, SkippedFile]] = []
    # Serial on purpose: header parsing holds the GIL, and threads measured slower here.
    for fpath, ds, reason in map(_read_one, files):
        if ds is None:
            skipped.append(SkippedFile(str(fpath), reason or "unreadable"))
            continue
        reason = _file_skip_reason(ds)
        uid = _str(ds, "SeriesInstanceUID") or "(no SeriesInstanceUID)"
        if reason is not None:
            skipped.append(SkippedFile(str(fpath), reason, uid))
            broken.append((uid, _str(ds, "SOPClassUID"), skipped[-1]))
            continue
        try:
            samples = int(ds.get("SamplesPerPixel", 1))
        except (TypeError, ValueError):
            samples = 0
        if samples != 1:
            skipped.append(SkippedFile(str(fpath), "colour image (SamplesPerPixel > 1)"
                                       if samples > 1 else "malformed SamplesPerPixel", uid))
            broken.append((uid, _str(ds, "SOPClassUID"), skipped[-1]))
            continue
        try:
            with warnings.catch_warnings():
                # pydicom converts values on access and warns about invalid ones (a DS
                # "NaN"); the checks below judge the values themselves
                warnings.simplefilter("ignore")
                frames = _frames_of(ds, fpath)
                fields = _series_fields(ds) if uid not in by_uid else {}
        except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
            skipped.append(SkippedFile(str(fpath), f"malformed image header: {exc}", uid))
            broken.append((uid, _str(ds, "SOPClassUID"), skipped[-1]))
            continue
        if uid not in by_uid:
            by_uid[uid] = SeriesInfo(series_uid=uid, **fields)
        by_uid[uid].frames.extend(frames)
        by_uid[uid].headers[str(fpath)] = ds

    series: list[SeriesInfo] = []
    for s in by_uid.values():
        reason = _series_skip_reason(s)
        if reason is not None:
            skipped.extend(SkippedFile(f, reason, s.series_uid) for f in s.files)
            continue
        # A file of the same series and SOP class that could not be read as a slice: the
        # series would load without it (a slab short at one end, or a gap), so refuse it.
        lost = [sk for uid, sop, sk in broken
                if uid == s.series_uid and sop is not None and sop == s.sop_class_uid]
        if lost:
            dirs = {os.path.dirname(f) for f in s.files} | {os.path.dirname(sk.path)
                                                           for sk in lost}
            folder = os.path.commonpath(sorted(dirs))
            names = ", ".join(f"{os.path.relpath(sk.path, folder)} ({sk.reason})"
                              for sk in lost[:_MAX_NAMED_FILES])
            more = f" and {len(lost) - _MAX_NAMED_FILES} more" \
                if len(lost) > _MAX_NAMED_FILES else ""
            s.problem = (f"{len(lost)} file(s) of this series cannot be read as slices: "
                         f"{names}{more}; without them the volume would be incomplete")
            s.error_type = UnreadableFileError
            series.append(s)
            continue
        try:
            s.plan = _plan_stack(s)
        except InputError as exc:
            s.problem, s.error_type = exc.reason, type(exc)
        series.append(s)
    series.sort(key=lambda s: (s.series_number if s.series_number is not None else 1 << 30,
                               s.series_uid))
    chosen, why = choose_series(series, series_uid=series_uid, root=root, skipped=skipped,
                                strict=False)
    return DicomScan(str(root), series, skipped, chosen, why)


def choose_series(
    series: Sequence[SeriesInfo],
    *,
    series_uid: str | None = None,
    root: Path | None = None,
    skipped: Sequence[SkippedFile] = (),
    strict: bool = True,
) -> tuple[SeriesInfo | None, str]:
    """Pick the series to load.

    With ``series_uid``: that series (SeriesInstanceUID, exact). Otherwise, among the series
    that form a volume: CT before other modalities, then ORIGINAL before DERIVED image type,
    then the most slices, then the thinnest slice spacing, then the lowest series number.
    With ``strict`` a failure raises; otherwise it returns ``(None, reason)``.
    """
    def fail(exc: InputError) -> tuple[SeriesInfo | None, str]:
        if strict:
            raise exc
        return None, exc.reason

    if series_uid is not None:
        match = [s for s in series if s.series_uid == series_uid]
        if not match:
            known = ", ".join(s.series_uid for s in series) or "none"
            return fail(SeriesSelectionError(
                f"no series {series_uid} here; series found: {known}", path=root))
        s = match[0]
        if not s.usable:
            return fail(s.error())
        return s, "requested with --series"
    usable = [s for s in series if s.usable]
    if not usable:
        if len(series) == 1:
            return fail(series[0].error())
        if series:
            why = "; ".join(f"series {s.series_uid}: {s.problem}" for s in series)
            return fail(NoSeriesError(f"no usable image series ({why})", path=root))
        reasons = sorted({s.reason for s in skipped})
        detail = f" (skipped: {'; '.join(reasons)})" if reasons else ""
        return fail(NoSeriesError(f"no DICOM image series found{detail}", path=root))

    def key(s: SeriesInfo) -> tuple[Any, ...]:
        assert s.plan is not None  # usable series have a plan
        return (
            s.modality != "CT",
            "DERIVED" in s.image_type,
            -len(s.frames),
            float(np.median(s.plan.gaps)),
            s.series_number if s.series_number is not None else 1 << 30,
            s.series_uid,
        )

    best = min(usable, key=key)
    if len(usable) == 1:
        return best, "the only series that forms a volume"
    return best, (f"chosen among {len(usable)} usable series: CT first, then ORIGINAL, "
                  "most slices, thinnest spacing, lowest series number")
