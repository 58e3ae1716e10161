"""Loading a chosen series into a :class:`~medseg.volume.CTVolume`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medseg.errors import InputError
from medseg.io.dicom.discovery import choose_series, scan_dicom
from medseg.io.dicom.model import CT_FILL_HU, DicomScan, FrameRecord, SeriesInfo
from medseg.io.dicom.pixels import (
    _padding_to_air,
    _read_frames,
    _resample_stack,
    _to_hu,
    check_slice_values,
)
from medseg.io.padding import applies_to_modality
from medseg.volume import CTVolume, Geometry, VolumeMetadata

__all__ = ["load_dicom", "load_series", "verify_chosen"]


def load_series(s: SeriesInfo) -> CTVolume:
    """Load a series found by :func:`scan_dicom` (raises its problem if it has one)."""
    if not s.usable or s.plan is None:
        raise s.error()
    plan = s.plan
    frames = [s.frames[i] for i in plan.order]
    hu, padding_corrections = _read_checked_slices(s, frames)
    positions = np.array([f.position for f in frames], float)
    if plan.regular:
        gap = float((plan.distances[-1] - plan.distances[0]) / (len(frames) - 1))
        geometry = Geometry(
            origin=positions[0],
            spacing=(plan.spacing_rc[1], plan.spacing_rc[0], gap),
            direction=np.column_stack([plan.row_dir, plan.col_dir, plan.normal]),
        )
        array: npt.NDArray[Any] = hu
    else:
        fill = CT_FILL_HU if s.modality == "CT" else float(hu.min())
        array, geometry = _resample_stack(hu, positions, plan, fill)
    thickness = [f.slice_thickness for f in frames if f.slice_thickness is not None]
    meta = VolumeMetadata(
        modality=s.modality,
        study_instance_uid=s.study_uid,
        series_instance_uid=s.series_uid,
        frame_of_reference_uid=s.frame_of_reference_uid,
        sop_class_uid=s.sop_class_uid,
        sop_instance_uids=tuple(f.sop_instance_uid for f in frames) if plan.regular else (),
        series_description=s.description,
        series_number=s.series_number,
        manufacturer=s.manufacturer,
        manufacturer_model=s.model,
        convolution_kernel=s.kernel,
        slice_thickness_mm=float(np.median(thickness)) if thickness else None,
        body_part=s.body_part,
        contrast_agent=s.contrast_agent,
        study_date=s.study_date,
        patient_id=s.patient_id,
        patient_name=s.patient_name,
        source_format="dicom",
        source_path=os.path.commonpath(s.files),
        source_files=tuple(f.path for f in frames),
        source_headers={p: s.headers[p] for p in dict.fromkeys(f.path for f in frames)
                        if p in s.headers},
        corrections=[*padding_corrections, *plan.corrections],
    )
    return CTVolume(array, geometry, meta)


def _read_checked_slices(s: SeriesInfo, frames: Sequence[FrameRecord]
                         ) -> tuple[npt.NDArray[Any], list[str]]:
    """The slices of ``s`` in HU, in the order of ``frames``, scanner padding set to air,
    each slice's values checked (CT): everything loading does before any resampling."""
    try:
        hu = _to_hu(_read_frames(frames), frames)
        padding_corrections = _padding_to_air(hu, frames, s.modality)
        if applies_to_modality(s.modality):
            check_slice_values(hu, frames)
    except InputError as exc:
        if exc.path is None:  # a file-level error already names its file
            exc.relocate(os.path.commonpath(s.files), s.series_uid)
        raise
    return hu, padding_corrections


def verify_chosen(scan: DicomScan) -> InputError | None:
    """Read the pixels of the series ``scan`` chose and run the checks that need them,
    exactly as loading does (what ``medseg info`` shows is what ``segment`` uses). If the
    series is refused, it is marked unusable with the reason, ``scan.chosen`` becomes None,
    ``scan.choice_reason`` says why, and the error is returned."""
    s = scan.chosen
    if s is None or s.plan is None:
        return None
    try:
        # what load_series does before resampling (which refuses nothing: its size was
        # checked with the plan)
        _read_checked_slices(s, [s.frames[i] for i in s.plan.order])
    except InputError as exc:
        s.problem, s.error_type = exc.reason, type(exc)
        scan.chosen = None
        scan.choice_reason = f"series {s.series_uid} is refused: {exc.reason}"
        return exc
    return None


def load_dicom(path: str | Path, *, series_uid: str | None = None) -> CTVolume:
    """Load the series medseg chooses under ``path`` (or ``series_uid``)."""
    scan = scan_dicom(path, series_uid=series_uid)
    chosen, _ = choose_series(scan.series, series_uid=series_uid, root=Path(path),
                              skipped=scan.skipped, strict=True)
    assert chosen is not None  # strict=True raises instead
    return load_series(chosen)
