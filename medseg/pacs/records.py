"""What QIDO-RS and STOW-RS answers become: study and series records, store results and the
words for DICOM failure reasons."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset

from medseg.errors import (
    PacsStoreError,
)
from medseg.io.header import first, first_float, first_int, strings

__all__ = ["FAILURE_REASONS", "SeriesRecord", "StoreResult", "StudyRecord"]


#: DICOM PS3.18 / PS3.7 failure reasons a STOW-RS answer gives (FailureReason, 0008,1197).
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match the SOP class, or the study in the URL",
    0xC000: "cannot understand",
    0xC122: "referenced transfer syntax not supported",
}


@dataclass(frozen=True)
class StudyRecord:
    """One QIDO-RS study result. Patient identifiers are kept apart: ``to_dict`` holds
    them only with ``show_phi``."""

    study_uid: str
    date: str | None
    time: str | None
    description: str | None
    modalities: tuple[str, ...]
    n_series: int | None
    n_instances: int | None
    patient_id: str | None = field(default=None, repr=False)
    patient_name: str | None = field(default=None, repr=False)
    accession: str | None = field(default=None, repr=False)

    @classmethod
    def from_dataset(cls, ds: Dataset) -> StudyRecord:
        name = first(ds, "PatientName")
        return cls(study_uid=str(ds.get("StudyInstanceUID", "")),
                   date=first(ds, "StudyDate"), time=first(ds, "StudyTime"),
                   description=first(ds, "StudyDescription"),
                   modalities=strings(ds, "ModalitiesInStudy"),
                   n_series=first_int(ds, "NumberOfStudyRelatedSeries"),
                   n_instances=first_int(ds, "NumberOfStudyRelatedInstances"),
                   patient_id=first(ds, "PatientID"),
                   patient_name=str(name) if name is not None else None,
                   accession=first(ds, "AccessionNumber"))

    def to_dict(self, show_phi: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "study_instance_uid": self.study_uid, "study_date": self.date,
            "study_time": self.time, "study_description": self.description,
            "modalities": list(self.modalities), "series": self.n_series,
            "instances": self.n_instances}
        if show_phi:
            out.update(patient_id=self.patient_id, patient_name=self.patient_name,
                       accession_number=self.accession)
        return out


@dataclass(frozen=True)
class SeriesRecord:
    """One QIDO-RS series result, with what the series selection rules look at."""

    study_uid: str
    series_uid: str
    modality: str | None
    number: int | None
    description: str | None
    n_instances: int | None
    image_type: tuple[str, ...] | None
    orientation: tuple[float, ...] | None
    slice_thickness: float | None
    pixel_spacing: tuple[float, ...] | None = None
    n_frames: int | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> SeriesRecord:
        def floats(keyword: str) -> tuple[float, ...] | None:
            try:
                vals = tuple(float(v) for v in strings(ds, keyword))
            except ValueError:
                return None
            return vals or None

        image_type = strings(ds, "ImageType")
        return cls(study_uid=str(ds.get("StudyInstanceUID", "")),
                   series_uid=str(ds.get("SeriesInstanceUID", "")),
                   modality=first(ds, "Modality"), number=first_int(ds, "SeriesNumber"),
                   description=first(ds, "SeriesDescription"),
                   n_instances=first_int(ds, "NumberOfSeriesRelatedInstances"),
                   image_type=tuple(v.upper() for v in image_type) if image_type else None,
                   orientation=floats("ImageOrientationPatient"),
                   slice_thickness=first_float(ds, "SliceThickness"),
                   pixel_spacing=floats("PixelSpacing"),
                   n_frames=first_int(ds, "NumberOfFrames"))

    @classmethod
    def from_instance(cls, ds: Dataset, *, n_instances: int | None = None) -> SeriesRecord:
        """The record of an instance's series from the instance's own header (WADO-RS
        metadata, or a file received by the DICOM node): an enhanced multi-frame instance
        keeps its orientation and slice thickness in the shared functional groups."""
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared:
            ds = copy.copy(ds)
            group = shared[0]
            for seq, keyword in (("PlaneOrientationSequence", "ImageOrientationPatient"),
                                 ("PixelMeasuresSequence", "SliceThickness")):
                inner = group.get(seq)
                if inner and keyword not in ds and keyword in inner[0]:
                    setattr(ds, keyword, inner[0].get(keyword))
        rec = cls.from_dataset(ds)
        if n_instances is not None:
            rec = dataclasses.replace(rec, n_instances=n_instances)
        return rec

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeriesRecord:
        """The inverse of :meth:`to_dict`."""
        def tup(v: Any) -> tuple[Any, ...] | None:
            return tuple(v) if v else None

        return cls(study_uid=data["study_instance_uid"],
                   series_uid=data["series_instance_uid"], modality=data.get("modality"),
                   number=data.get("series_number"),
                   description=data.get("series_description"),
                   n_instances=data.get("instances"), image_type=tup(data.get("image_type")),
                   orientation=tup(data.get("orientation")),
                   slice_thickness=data.get("slice_thickness_mm"),
                   pixel_spacing=tup(data.get("pixel_spacing_mm")),
                   n_frames=data.get("frames"))

    def needs_metadata(self) -> bool:
        """QIDO-RS servers need not return instance-level attributes for a series; then
        one instance's metadata is fetched."""
        return self.image_type is None or self.orientation is None or \
            self.slice_thickness is None

    def to_dict(self) -> dict[str, Any]:
        return {"study_instance_uid": self.study_uid, "series_instance_uid": self.series_uid,
                "modality": self.modality, "series_number": self.number,
                "series_description": self.description, "instances": self.n_instances,
                "image_type": list(self.image_type) if self.image_type else None,
                "orientation": list(self.orientation) if self.orientation else None,
                "slice_thickness_mm": self.slice_thickness,
                "pixel_spacing_mm": list(self.pixel_spacing) if self.pixel_spacing else None,
                "frames": self.n_frames}


@dataclass
class StoreResult:
    """What a STOW-RS store did: SOP instance UIDs stored, failed (with the reason), and
    warnings the server gave for stored instances."""

    stored: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def raise_for_failures(self, url: str) -> None:
        """:class:`~medseg.errors.PacsStoreError` naming the first failed files and why."""
        if not self.failed:
            return
        items = [f"{self.files.get(uid, uid)}: {why}" for uid, why in
                 list(self.failed.items())[:5]]
        more = f" (and {len(self.failed) - 5} more)" if len(self.failed) > 5 else ""
        raise PacsStoreError(f"STOW-RS: {len(self.failed)} of {len(self.files)} instance(s) "
                             f"not stored: {'; '.join(items)}{more}", url=url)


def _reason_text(code: Any) -> str:
    try:
        n = int(code)
    except (TypeError, ValueError):
        return str(code)
    word = FAILURE_REASONS.get(n) or ("refused" if 0xA000 <= n < 0xD000 else "failed")
    return f"{word} (0x{n:04X})"
