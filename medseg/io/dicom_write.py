"""Writing a volume as a DICOM CT series (phantoms for sample_data/ and tests).

One uncompressed (Explicit VR Little Endian) CT Image Storage file per slice ``k``:
ImagePositionPatient is the world position of voxel (0, 0, k), ImageOrientationPatient the
directions of the ``i`` and ``j`` axes, PixelSpacing ``[sy, sx]`` (DICOM order: between rows,
then between columns). Stored values are signed int16 with RescaleSlope 1 and
RescaleIntercept 0, so integer HU round-trip exactly (values are rounded and clipped to the
int16 range). With ``uid_seed`` every UID is derived from the seed, so the same volume and
seed give byte-identical files. The series is written into a temporary sibling folder and
renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medseg._version import __version__
from medseg.errors import OutputError
from medseg.volume import CTVolume

__all__ = ["write_dicom_series"]

#: Fixed study date/time: files are reproducible byte for byte.
_DATE, _TIME = "20260101", "120000"


def _uid(seed: str | None, *parts: object) -> UID:
    if seed is None:
        return generate_uid()
    return generate_uid(entropy_srcs=[seed, *[str(p) for p in parts]])


def _ds(value: float) -> str:
    """A DICOM DS string (at most 16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if len(text) > 16:
        text = f"{value:.8g}"
    return "0" if text in ("-0", "") else text


def write_dicom_series(
    volume: CTVolume,
    out_dir: str | Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    uid_seed: str | None = None,
    series_description: str = "medseg",
    series_number: int = 1,
    patient_name: str = "PHANTOM^MEDSEG",
    patient_id: str = "MEDSEG-PHANTOM",
    modality: str = "CT",
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """Write ``volume`` (HU) as a DICOM series into ``out_dir`` (which must not exist or be
    empty). Returns the files written."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError("output folder exists and is not empty", path=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    study = UID(study_uid) if study_uid else _uid(uid_seed, "study")
    series = UID(series_uid) if series_uid else _uid(uid_seed, "series")
    frame_uid = _uid(uid_seed, "frame")
    g = volume.geometry
    sx, sy, sz = g.spacing
    iop = [float(v) for v in (*g.direction[:, 0], *g.direction[:, 1])]
    hu = np.clip(np.rint(volume.array), -32768, 32767).astype("<i2")
    nk = volume.shape[0]
    positions = g.index_to_world(np.c_[np.zeros(nk), np.zeros(nk), np.arange(nk)])
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    files = []
    try:
        for k in range(nk):
            sop_uid = _uid(uid_seed, "sop", k)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
            meta.ImplementationVersionName = f"medseg {__version__}"[:16]
            ds = Dataset()
            ds.file_meta = meta
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = sop_uid
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = _DATE
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = _TIME
            ds.AccessionNumber = ""
            ds.Modality = modality
            ds.Manufacturer = "medseg"
            ds.ManufacturerModelName = "phantom"
            ds.ReferringPhysicianName = ""
            ds.StudyDescription = "medseg synthetic chest CT"
            ds.SeriesDescription = series_description
            ds.PatientName = patient_name
            ds.PatientID = patient_id
            ds.PatientBirthDate = ""
            ds.PatientSex = "O"
            ds.BodyPartExamined = "CHEST"
            ds.SliceThickness = _ds(sz)
            ds.KVP = "120"
            ds.ConvolutionKernel = volume.metadata.convolution_kernel or "STANDARD"
            ds.PatientPosition = "HFS"
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series
            ds.StudyID = "1"
            ds.SeriesNumber = series_number
            ds.AcquisitionNumber = 1
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [_ds(v) for v in positions[k]]
            ds.ImageOrientationPatient = [_ds(v) for v in iop]
            ds.FrameOfReferenceUID = frame_uid
            ds.PositionReferenceIndicator = ""
            ds.SliceLocation = _ds(float(positions[k] @ np.cross(iop[:3], iop[3:])))
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
            ds.PixelSpacing = [_ds(sy), _ds(sx)]
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1
            ds.RescaleIntercept = "0"
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
            ds.WindowCenter = "-600"
            ds.WindowWidth = "1500"
            for key, value in (extra or {}).items():
                setattr(ds, key, value)
            ds.PixelData = hu[k].tobytes()
            path = tmp / f"IM{k + 1:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(out / path.name)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files
