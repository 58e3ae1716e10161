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
  a RescaleSlope of 0 or a non-finite rescale, an implausible PixelSpacing
  (:mod:`medseg.io.limits`),
  a file of the series that cannot be read as a slice. Rescale parameters may differ from
  slice to slice (each slice is converted by its own). Once the pixels are read, a CT slice
  whose values are mostly outside the CT range, or that differs wildly from both neighbours
  while they agree with each other, is refused too (:func:`check_slice_values`).
* **Sizes** (slice spacing, extent, the voxel count against a memory budget) are checked
  against :mod:`medseg.io.limits` before anything is allocated.

The package: :mod:`.model` (records, limits), :mod:`.headers` (one file's header),
:mod:`.checks` (slice headers, stack geometry), :mod:`.discovery` (series under a folder, the
choice), :mod:`.pixels` (values, padding, resampling), :mod:`.load` (a series to a volume).
"""

from __future__ import annotations

from medseg.io.dicom.discovery import choose_series, scan_dicom
from medseg.io.dicom.headers import looks_like_dicom
from medseg.io.dicom.load import load_dicom, load_series, verify_chosen
from medseg.io.dicom.model import DicomScan, FrameRecord, SeriesInfo, SkippedFile
from medseg.io.dicom.pixels import check_slice_values

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
