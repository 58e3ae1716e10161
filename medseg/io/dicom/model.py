"""The records of DICOM discovery (files, frames, series, a scan) and the named limits
the checks use."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.uid import UID

from medseg.errors import InputError

__all__ = [
    "CT_FILL_HU",
    "DUPLICATE_POSITION_MM",
    "GAP_MULTIPLE_TOLERANCE",
    "GREYSCALE_PHOTOMETRIC",
    "MAX_OUTSIDE_FRACTION",
    "MIN_NEIGHBOUR_CHECK_PIXELS",
    "MIN_SLICES",
    "ORIENTATION_TOLERANCE",
    "PLAUSIBLE_CT_HU",
    "POSITION_TOLERANCE_MM",
    "SLICE_JUMP_MIN_HU",
    "SLICE_JUMP_RATIO",
    "SUPPORTED_BITS_ALLOCATED",
    "DicomScan",
    "FrameRecord",
    "SeriesInfo",
    "SkippedFile",
    "StackPlan",
]


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
    #: The header of each file (pixel data not read), by path: the DICOM SEG writer reuses
    #: them instead of reading every file again.
    headers: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
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
