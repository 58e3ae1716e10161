"""Reading one DICOM file's header: frames, rescale, pixel storage, series fields and why a
file or a series is skipped."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from medseg.io import header
from medseg.io.dicom.model import (
    _DEFER_SIZE,
    _MEDIA_STORAGE_DIRECTORY,
    _SECONDARY_CAPTURE_PREFIX,
    _UNCOMPRESSED_LE,
    FrameRecord,
    SeriesInfo,
)
from medseg.io.padding import padding_stored_range

__all__ = ["looks_like_dicom"]


_str, _int, _float, _floats = header.text, header.integer, header.number, header.numbers


def _rescale(slope: Any, intercept: Any) -> tuple[float, float, str | None]:
    """(slope, intercept, problem): defaults 1 and 0 when a value is absent; a value that is
    present but not a finite number is kept as NaN and described in ``problem``."""
    out: list[float] = []
    bad: list[str] = []
    for name, value, default in (("RescaleSlope", slope, 1.0), ("RescaleIntercept",
                                                                 intercept, 0.0)):
        if value is None or value == "":
            out.append(default)
            continue
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = float("nan")
        if not np.isfinite(v):
            bad.append(f"{name} {str(value)!r}")
            v = float("nan")
        out.append(v)
    return out[0], out[1], ("; ".join(bad) or None)


def _pixel_bytes(ds: Dataset) -> int | None:
    """Length of a native PixelData element (None: absent, encapsulated or unknown)."""
    if "PixelData" not in ds:
        return None
    elem = ds.get_item(0x7FE00010, keep_deferred=True)
    value = getattr(elem, "value", None)
    if value is not None:
        return len(value) if isinstance(value, (bytes, bytearray)) else None
    length = getattr(elem, "length", None)
    if not isinstance(length, int) or length == 0xFFFFFFFF:
        return None  # encapsulated (compressed): the decoder checks the frame size
    return length


def looks_like_dicom(path: Path) -> bool:
    """Preamble + 'DICM', or (for preamble-less files) a first tag in group 0002/0008."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    return head[:2] in (b"\x02\x00", b"\x08\x00")


def _read_header(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path, defer_size=_DEFER_SIZE)
        except InvalidDicomError:
            return pydicom.dcmread(path, defer_size=_DEFER_SIZE, force=True)


def _pixel_offset(ds: Dataset, transfer_syntax: str) -> int | None:
    if transfer_syntax not in _UNCOMPRESSED_LE or "PixelData" not in ds:
        return None
    elem = ds.get_item(0x7FE00010, keep_deferred=True)
    tell = getattr(elem, "value_tell", None)
    if getattr(elem, "value", b"") is not None or tell is None:
        return None  # the value was read (small image): decode through pydicom instead
    return int(tell)


def _functional(fg: Dataset | None, shared: Dataset | None, seq: str, keyword: str) -> Any:
    for group in (fg, shared):
        if group is not None and seq in group and len(group[seq].value):
            item = group[seq].value[0]
            if keyword in item:
                return item[keyword].value
    return None


def _frames_of(ds: Dataset, path: Path) -> list[FrameRecord]:
    ts = str(getattr(ds.file_meta, "TransferSyntaxUID", "1.2.840.10008.1.2")) if hasattr(
        ds, "file_meta") else "1.2.840.10008.1.2"
    rows, cols = int(ds.Rows), int(ds.Columns)
    bits_alloc = int(ds.get("BitsAllocated", 16))
    n_frames = _int(ds, "NumberOfFrames") or 1
    common: dict[str, Any] = dict(
        path=str(path),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        instance_number=_int(ds, "InstanceNumber"),
        rows=rows,
        columns=cols,
        acquisition_number=_int(ds, "AcquisitionNumber"),
        bits_allocated=bits_alloc,
        bits_stored=int(ds.get("BitsStored", bits_alloc)),
        pixel_representation=int(ds.get("PixelRepresentation", 0)),
        transfer_syntax=ts,
        photometric=_str(ds, "PhotometricInterpretation"),
        pixel_bytes=_pixel_bytes(ds),
        file_frames=n_frames,
    )
    common["padding_range"] = padding_stored_range(
        ds.get("PixelPaddingValue"), ds.get("PixelPaddingRangeLimit"),
        pixel_representation=int(ds.get("PixelRepresentation", 0)),
        bits_allocated=bits_alloc, bits_stored=int(ds.get("BitsStored", bits_alloc)))
    offset = _pixel_offset(ds, ts)
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds \
            else None
        per_frame = ds.PerFrameFunctionalGroupsSequence
        frame_bytes = rows * cols * bits_alloc // 8
        out = []
        for i in range(n_frames):
            fg = per_frame[i] if i < len(per_frame) else None
            slope, intercept, bad_rescale = _rescale(
                _functional(fg, shared, "PixelValueTransformationSequence", "RescaleSlope"),
                _functional(fg, shared, "PixelValueTransformationSequence",
                            "RescaleIntercept"))
            out.append(FrameRecord(
                frame=i,
                position=_floats(_functional(fg, shared, "PlanePositionSequence",
                                             "ImagePositionPatient"), 3),  # type: ignore[arg-type]
                orientation=_floats(_functional(fg, shared, "PlaneOrientationSequence",
                                                "ImageOrientationPatient"), 6),  # type: ignore[arg-type]
                pixel_spacing=_floats(_functional(fg, shared, "PixelMeasuresSequence",
                                                  "PixelSpacing"), 2),  # type: ignore[arg-type]
                slope=slope,
                intercept=intercept,
                bad_rescale=bad_rescale,
                slice_thickness=_float(_functional(fg, shared, "PixelMeasuresSequence",
                                                   "SliceThickness")),
                pixel_offset=None if offset is None else offset + i * frame_bytes,
                **common,
            ))
        return out
    frames_pos = _floats(ds.get("ImagePositionPatient"), 3)
    slope, intercept, bad_rescale = _rescale(ds.get("RescaleSlope"), ds.get("RescaleIntercept"))
    record = dict(
        position=frames_pos,
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
        slope=slope,
        intercept=intercept,
        bad_rescale=bad_rescale,
        slice_thickness=_float(ds.get("SliceThickness")),
    )
    if n_frames > 1:
        # Classic multi-frame without per-frame geometry: the frames cannot be placed.
        return [FrameRecord(frame=i, pixel_offset=None, **record, **common)  # type: ignore[arg-type]
                for i in range(n_frames)]
    return [FrameRecord(frame=None, pixel_offset=offset, **record, **common)]  # type: ignore[arg-type]


def _series_fields(ds: Dataset) -> dict[str, Any]:
    return dict(
        study_uid=_str(ds, "StudyInstanceUID"),
        modality=_str(ds, "Modality"),
        description=_str(ds, "SeriesDescription"),
        series_number=_int(ds, "SeriesNumber"),
        sop_class_uid=_str(ds, "SOPClassUID"),
        image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
        manufacturer=_str(ds, "Manufacturer"),
        model=_str(ds, "ManufacturerModelName"),
        kernel=_str(ds, "ConvolutionKernel"),
        frame_of_reference_uid=_str(ds, "FrameOfReferenceUID"),
        body_part=_str(ds, "BodyPartExamined"),
        contrast_agent=_str(ds, "ContrastBolusAgent"),
        study_date=_str(ds, "StudyDate"),
        patient_id=_str(ds, "PatientID"),
        patient_name=_str(ds, "PatientName"),
        gantry_tilt_tag=_float(ds.get("GantryDetectorTilt")),
    )


def _file_skip_reason(ds: Dataset) -> str | None:
    media_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    if media_class == _MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        return "DICOMDIR index (the files it lists are read directly)"
    if "PixelData" not in ds and "FloatPixelData" not in ds \
            and "DoubleFloatPixelData" not in ds:
        return "no pixel data (not an image: report, presentation state, raw data...)"
    if "Rows" not in ds or "Columns" not in ds:
        return "pixel data without Rows/Columns"
    return None


def _series_skip_reason(s: SeriesInfo) -> str | None:
    if any(t in ("LOCALIZER", "SCOUT", "TOPOGRAM", "SCANOGRAM") for t in s.image_type):
        return "localizer/scout image (ImageType " + "\\".join(s.image_type) + ")"
    if (s.sop_class_uid or "").startswith(_SECONDARY_CAPTURE_PREFIX):
        return "secondary capture (screenshot or derived picture, no patient geometry)"
    return None
