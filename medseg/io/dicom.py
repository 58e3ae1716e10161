"""DICOM series discovery, checking and loading.

What this module decides, and why (see also ``docs/concepts/dicom-loading.md``):

* **Discovery** walks a folder tree (or reads a DICOMDIR), reads every file's header once
  and groups image frames by SeriesInstanceUID. Non-DICOM files, DICOMDIR indexes, objects
  without pixel data (SR, presentation states...), localizers/scouts, secondary captures and
  colour images are skipped, each with its reason.
* **Order** is by position along the slice normal (the cross product of the orientation
  cosines), never by file name or InstanceNumber alone.
* **Regular stacks** (uniform spacing along the normal, no in-plane drift) are returned
  exactly: voxel centres are the DICOM pixel positions.
* **Gantry tilt** and **variable slice spacing** are *corrected*, as dcm2niix does: the
  slices are resampled (linear along the normal, bilinear in plane) onto a regular grid
  aligned with the slice planes, whose in-plane extent grows to keep every pixel, and the
  correction is recorded in ``metadata.corrections``.
* **Missing slices** (a gap that is a whole multiple of the regular spacing),
  **inconsistent orientation or in-plane grid**, **duplicate positions** (several phases or
  echoes in one series), **a single slice** and **missing position/orientation tags** are
  *refused* with a :mod:`medseg.errors` exception naming the folder, series and reason:
  interpolating across missing anatomy or guessing geometry would fabricate data.
* **One bad slice** is refused, naming the slice's file, before its pixels are trusted:
  a header that does not describe its pixel data (the PixelData length differs from
  Rows x Columns x BitsAllocated), a pixel storage (BitsAllocated, PixelRepresentation,
  PhotometricInterpretation) that differs from the rest of the series,
  a RescaleSlope of 0 or a non-finite rescale, an implausible PixelSpacing (:mod:`.limits`),
  a file of the series that cannot be read as a slice. Rescale parameters may differ from
  slice to slice (each slice is converted by its own). Once the pixels are read, a CT slice
  whose values are mostly outside the CT range, or that differs wildly from both neighbours
  while they agree with each other, is refused too (:func:`check_slice_values`).
* **Sizes** (slice spacing, extent, the voxel count against a memory budget) are checked
  against :mod:`medseg.io.limits` before anything is allocated.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from medseg.conventions import VOLUME_SUFFIXES
from medseg.errors import (
    GeometryError,
    InconsistentOrientationError,
    InputError,
    MissingSlicesError,
    NoSeriesError,
    NotAVolumeError,
    NotFoundError,
    PixelDataError,
    SeriesSelectionError,
    UnreadableFileError,
)
from medseg.io import header
from medseg.io.limits import (
    SLICE_SPACING_RANGE_MM,
    check_extent,
    check_pixel_spacing,
    check_volume_size,
)
from medseg.io.padding import (
    PaddingReport,
    applies_to_modality,
    describe_out_of_field,
    describe_tagged,
    padding_stored_range,
    replace_out_of_field,
    replace_tagged_padding,
)
from medseg.volume import CTVolume, Geometry, VolumeMetadata

__all__ = [
    "DicomScan",
    "FrameRecord",
    "SeriesInfo",
    "SkippedFile",
    "check_slice_values",
    "choose_series",
    "load_dicom",
    "load_series",
    "looks_like_dicom",
    "scan_dicom",
    "verify_chosen",
]

# -- named constants ----------------------------------------------------------------------
#: Orientation cosines of two slices are "the same" within this (DICOM writes ~6 decimals;
#: 1e-3 is about 0.06 degrees).
ORIENTATION_TOLERANCE = 1e-3
#: A slice whose position is off a regular grid by less than this (mm) is on the grid.
#: Scanners round ImagePositionPatient to 0.001-0.01 mm; 0.02 mm is far below any voxel.
POSITION_TOLERANCE_MM = 0.02
#: Relative tolerance on slice gaps when deciding whether a gap is a whole multiple of the
#: regular spacing (a missing slice) rather than just a different spacing.
GAP_MULTIPLE_TOLERANCE = 0.05
#: Two slices closer than this along the normal share a position.
DUPLICATE_POSITION_MM = 1e-3
#: Value given to resampled voxels that no slice covers: air in HU for CT.
CT_FILL_HU = -1024
#: Fewest slices accepted as a volume: with two, uniform spacing and missing slices cannot be
#: told apart (any two positions look regular), so the geometry could not be checked.
MIN_SLICES = 3
#: Header elements longer than this are not read during discovery (pixel data is read later).
_DEFER_SIZE = 2048
#: Pixel storage medseg reads (PS3.3 C.7.6.3: CT images are 16-bit; 8 and 32 occur elsewhere).
SUPPORTED_BITS_ALLOCATED = (8, 16, 32)
#: Grey-scale photometric interpretations (colour images are skipped during discovery).
GREYSCALE_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")
#: Per-slice value check of CT (:func:`check_slice_values`). The plausible range of a CT
#: pixel after the rescale and after scanner padding was set to air: reconstructions floor
#: at -1024 HU and noise in air stays above about -1200 HU; 4000 HU is above dense bone,
#: iodine and the standard 12-bit top (3071 HU). Only metal goes beyond (extended scales),
#: and only in a small part of a slice.
PLAUSIBLE_CT_HU = (-1200.0, 4000.0)
#: A CT slice with more than this fraction of its pixels outside :data:`PLAUSIBLE_CT_HU` is
#: not CT in HU (the rest of the series being CT): refused.
MAX_OUTSIDE_FRACTION = 0.5
#: Neighbour check: the mean absolute difference between a slice and each neighbour, against
#: the difference between the two neighbours themselves (two slice gaps apart, so larger than
#: either single gap in real anatomy). Measured on every real CT series in ../shared/data
#: (philips-141, LIDC, LungFCP, RIDER, TotalSegmentator, cip-ct64, dcm-qa-ct GE and Philips):
#: the ratio is at most 1.04. On the corrupted copies of cip-ct64 and philips-141 the tests
#: make, one slice re-encoded to 8 bits gives 7.6-8.1, one rescaled 1024 HU off 15-30, one
#: of random values 24-52. A slice is refused when both its differences exceed this ratio
#: times its neighbours' and :data:`SLICE_JUMP_MIN_HU`.
SLICE_JUMP_RATIO = 4.0
#: ... and exceed this mean absolute difference (HU), so that near-uniform images (phantoms,
#: air) cannot trip the ratio. Real neighbours differ by 10-150 HU (measured as above, 5 mm
#: slices of a head the most); the corrupted slices above by 262-1783 HU.
SLICE_JUMP_MIN_HU = 150.0
#: The neighbour check needs slices of at least this many pixels: the mean difference of a
#: few pixels is noise (a 3 x 3 test image), while any CT slice has thousands.
MIN_NEIGHBOUR_CHECK_PIXELS = 32 * 32
#: The value check looks at every ``_VALUE_CHECK_STRIDE``-th row and column of slices of
#: 128 x 128 pixels and more (speed; 128 x 128 sampled that way is 4096 pixels).
_VALUE_CHECK_STRIDE = 2
#: Files named in one message; more are counted.
_MAX_NAMED_FILES = 3

_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_UNCOMPRESSED_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
_MAX_WORKERS = max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class SkippedFile:
    """A file (or a whole series) discovery did not use, and why."""

    path: str
    reason: str
    series_uid: str | None = None


@dataclass(frozen=True)
class FrameRecord:
    """One 2D frame: a single-frame instance or one frame of a multi-frame instance."""

    path: str
    frame: int | None
    sop_instance_uid: str
    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns)
    rows: int
    columns: int
    slope: float
    intercept: float
    slice_thickness: float | None
    acquisition_number: int | None
    #: File offset of uncompressed little-endian pixel data, None when it must be decoded.
    pixel_offset: int | None
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    transfer_syntax: str
    #: PixelPaddingValue [.. PixelPaddingRangeLimit] as an inclusive range of stored values.
    padding_range: tuple[int, int] | None = None
    photometric: str | None = None
    #: Length of the native (not encapsulated) PixelData element of the file, None if unknown.
    pixel_bytes: int | None = None
    #: Number of frames the file holds (for the PixelData length check).
    file_frames: int = 1
    #: Rescale values as written, where they are not finite numbers (shown when refused).
    bad_rescale: str | None = None


@dataclass
class StackPlan:
    """How the frames of a series form a volume (the result of the geometry checks)."""

    order: list[int]  # indices into SeriesInfo.frames, along the normal
    row_dir: npt.NDArray[np.float64]
    col_dir: npt.NDArray[np.float64]
    normal: npt.NDArray[np.float64]
    distances: npt.NDArray[np.float64]  # along the normal, sorted
    gaps: npt.NDArray[np.float64]
    spacing_rc: tuple[float, float]
    tilt_deg: float
    inplane_drift_mm: float
    regular: bool
    corrections: list[str] = field(default_factory=list)


@dataclass
class SeriesInfo:
    """Everything discovery learned about one series, and whether it can be loaded."""

    series_uid: str
    study_uid: str | None = None
    modality: str | None = None
    description: str | None = None
    series_number: int | None = None
    sop_class_uid: str | None = None
    image_type: tuple[str, ...] = ()
    manufacturer: str | None = None
    model: str | None = None
    kernel: str | None = None
    frame_of_reference_uid: str | None = None
    body_part: str | None = None
    contrast_agent: str | None = None
    study_date: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    gantry_tilt_tag: float | None = None
    frames: list[FrameRecord] = field(default_factory=list)
    #: Why this series cannot be loaded (None: it can). ``error_type`` is the exception.
    problem: str | None = None
    error_type: type[InputError] = InputError
    plan: StackPlan | None = None

    @property
    def files(self) -> list[str]:
        return sorted({f.path for f in self.frames})

    @property
    def usable(self) -> bool:
        return self.problem is None and self.plan is not None

    def error(self) -> InputError:
        folder = os.path.commonpath(self.files) if self.files else None
        return self.error_type(self.problem or "unusable series", path=folder,
                               series=self.series_uid)

    def shape_zyx(self) -> tuple[int, int, int] | None:
        if not self.frames:
            return None
        f = self.frames[0]
        return (len(self.frames), f.rows, f.columns)

    def to_dict(self) -> dict[str, Any]:
        f0 = self.frames[0] if self.frames else None
        out: dict[str, Any] = {
            "series_instance_uid": self.series_uid,
            "study_instance_uid": self.study_uid,
            "series_number": self.series_number,
            "description": self.description,
            "modality": self.modality,
            "manufacturer": self.manufacturer,
            "image_type": list(self.image_type),
            "n_files": len(self.files),
            "n_slices": len(self.frames),
            "rows": f0.rows if f0 else None,
            "columns": f0.columns if f0 else None,
            "transfer_syntaxes": sorted({UID(f.transfer_syntax).name for f in self.frames}),
            "usable": self.usable,
            "problem": self.problem,
        }
        if self.plan is not None:
            p = self.plan
            out.update(
                pixel_spacing_mm=[round(p.spacing_rc[1], 6), round(p.spacing_rc[0], 6)],
                slice_spacing_mm={
                    "min": round(float(p.gaps.min()), 4),
                    "median": round(float(np.median(p.gaps)), 4),
                    "max": round(float(p.gaps.max()), 4),
                },
                orientation_cosines=[round(float(v), 6) for v in (*p.row_dir, *p.col_dir)],
                gantry_tilt_deg=round(p.tilt_deg, 3),
                regular_grid=p.regular,
                corrections=list(p.corrections),
            )
        return out


@dataclass
class DicomScan:
    """The result of :func:`scan_dicom`: series found, files skipped, the one medseg uses."""

    root: str
    series: list[SeriesInfo]
    skipped: list[SkippedFile]
    chosen: SeriesInfo | None
    choice_reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.root,
            "series": [s.to_dict() for s in self.series],
            "skipped": [
                {"path": s.path, "reason": s.reason, "series_instance_uid": s.series_uid}
                for s in self.skipped
            ],
            "chosen_series": self.chosen.series_uid if self.chosen else None,
            "choice_reason": self.choice_reason,
        }


# -- header parsing: medseg.io.header --------------------------------------------------------
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


# -- slice header checks ------------------------------------------------------------------
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


# -- geometry checks ----------------------------------------------------------------------
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


# -- discovery ----------------------------------------------------------------------------
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


# -- pixel data ---------------------------------------------------------------------------
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


# -- resampling (tilt / variable spacing) -------------------------------------------------
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


# -- loading ------------------------------------------------------------------------------
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


def load_dicom(path: str | Path, *, series_uid: str | None = None) -> CTVolume:
    """Load the series medseg chooses under ``path`` (or ``series_uid``)."""
    scan = scan_dicom(path, series_uid=series_uid)
    chosen, _ = choose_series(scan.series, series_uid=series_uid, root=Path(path),
                              skipped=scan.skipped, strict=True)
    assert chosen is not None  # strict=True raises instead
    return load_series(chosen)
