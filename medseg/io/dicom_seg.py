"""DICOM SEG of the lung labels, on the planes of the source images.

What this module decides, and why (see ``docs/concepts/dicom-outputs.md``):

* **The SEG lies on the source images' own planes.** Viewers (OHIF, 3D Slicer) overlay a SEG
  frame on the image it references and expect the two to share their plane. The volume
  medseg segments is not always made of the source slices: the loader resamples gantry-tilted
  and unevenly spaced series onto a regular grid (``metadata.corrections``). So every frame is
  made the same way, whatever the grid: the world position (LPS mm) of each pixel of the
  source plane is computed from *that plane's own* ImagePositionPatient,
  ImageOrientationPatient and PixelSpacing, mapped to the label volume's continuous index and
  given the label of the nearest voxel. When the label grid is the source stack (the usual
  case) this mapping is the identity, and it is computed as an index shift rather than per
  pixel (:func:`labels_on_planes`; the general per-pixel path gives the same frames, which a
  test checks).
* **Single-frame series and one enhanced (multi-frame) image** are handled; a series spread
  over several multi-frame files is refused, since a SEG made by highdicom references either
  single-frame images or exactly one multi-frame image.
* **Read-back check**: the encoded SEG is decoded again with highdicom and compared with the
  frames it was made from, pixel for pixel and per source plane, before any byte reaches the
  disk. A mismatch raises :class:`~medseg.errors.OutputError` and nothing is written.
* **Only what the IOD needs of the source.** highdicom copies every patient and study
  attribute of the source and its scanner (manufacturer, institution, address, station) into
  a derived object; medseg keeps the Type 1/2 attributes of the Patient and General Study
  modules (:data:`REQUIRED_PATIENT_STUDY`) and drops the rest, unless the caller names them
  in ``keep``. The SEG's equipment (Manufacturer ...) is medseg's.
* Segment 1 is the right lung (SNOMED CT 3341006), segment 2 the left lung (44029006), both
  in the category "Anatomical Structure" (91723000), algorithm type AUTOMATIC, with an
  AlgorithmIdentificationSequence naming medseg, its version, the method and the model's
  name and SHA-256 (the lungmask convention 1 = right, 2 = left, as in ``lungs.nii.gz``).
"""

from __future__ import annotations

import copy
import difflib
import io
import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from medseg._version import __version__
from medseg.conventions import SEG_FILENAME
from medseg.errors import ConfigError, OutputError, UnreadableFileError
from medseg.io.atomic import atomic_output
from medseg.volume import CTVolume

__all__ = [
    "LEFT_LUNG",
    "PATIENT_STUDY_ATTRIBUTES",
    "REQUIRED_PATIENT_STUDY",
    "RIGHT_LUNG",
    "SEG_FILENAME",
    "EncodedSeg",
    "SourcePlane",
    "build_seg",
    "check_keep",
    "decode_seg_frames",
    "labels_on_planes",
    "read_source_planes",
    "restrict_source_attributes",
    "verify_seg",
    "warm_up_in_background",
    "write_seg",
]

#: SNOMED CT codes of the segmented structures (DICOM CID 7710 / 4031).
RIGHT_LUNG = Code("3341006", "SCT", "Right lung")
LEFT_LUNG = Code("44029006", "SCT", "Left lung")
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
#: Label value -> (segment label, SNOMED code, display colour as sRGB), in the convention of
#: ``lungs.nii.gz``: the SEG's segment numbers are the label values.
SEGMENTS: dict[int, tuple[str, Code, tuple[int, int, int]]] = {
    1: ("Right lung", RIGHT_LUNG, (128, 174, 128)),
    2: ("Left lung", LEFT_LUNG, (241, 214, 145)),
}
#: Series number of the SEG (the SR uses the next one): far above scanner series numbers, so
#: a viewer lists derived objects after the images.
SEG_SERIES_NUMBER = 9901
#: How far (in voxels, over a whole plane) a source plane's index axis may lean off a label
#: grid axis for the plane to be mapped as an index shift instead of per pixel. At 1e-3
#: voxel only an exact tie between two voxels could go the other way.
AXIS_ALIGNED_TOLERANCE = 1e-3
#: Type 2 patient and study attributes highdicom copies from the source into the SEG.
_TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                        "ReferringPhysicianName")
#: The patient and study attributes the SEG and the SR carry from the source: the Type 1 and
#: 2 attributes of the Patient (PS3.3 C.7.1.1) and General Study (C.7.2.1) modules, which
#: both IODs require. Anything else of the source's patient or study (age, weight, study
#: description, clinical trial, other IDs ...) is left out unless asked for (``keep``).
REQUIRED_PATIENT_STUDY = ("StudyInstanceUID", *_TYPE2_PATIENT_STUDY)
#: Conditional (1C/2C) Patient and Patient Study attributes required for a non-human
#: patient: carried when the source has them.
_NON_HUMAN_PATIENT = ("PatientSpeciesDescription", "PatientSpeciesCodeSequence",
                      "PatientBreedDescription", "PatientBreedCodeSequence",
                      "BreedRegistrationSequence", "ResponsiblePerson", "ResponsiblePersonRole",
                      "ResponsibleOrganization", "PatientSexNeutered")
#: Every top-level attribute of the modules of the patient and study that highdicom copies
#: from a source into a derived object (PS3.3 C.7.1.1 Patient, C.7.1.3 Clinical Trial
#: Subject, C.7.2.1 General Study, C.7.2.2 Patient Study, C.7.2.3 Clinical Trial Study). Those
#: not required and not kept are removed again.
PATIENT_STUDY_ATTRIBUTES = frozenset({
    # Patient
    "ReferencedPatientSequence", "PatientName", "PatientID", "IssuerOfPatientID",
    "TypeOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "SourcePatientGroupIdentificationSequence", "GroupOfPatientsIdentificationSequence",
    "PatientBirthDate", "PatientBirthTime", "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar", "PatientAlternativeCalendar", "PatientSex",
    "QualityControlSubject", "StrainDescription", "StrainNomenclature", "StrainStockSequence",
    "StrainAdditionalInformation", "StrainCodeSequence", "GeneticModificationsSequence",
    "OtherPatientNames", "OtherPatientIDs", "OtherPatientIDsSequence",
    "ReferencedPatientPhotoSequence", "EthnicGroup", "EthnicGroupCodeSequence",
    "PatientSpeciesDescription", "PatientSpeciesCodeSequence", "PatientBreedDescription",
    "PatientBreedCodeSequence", "BreedRegistrationSequence", "ResponsiblePerson",
    "ResponsiblePersonRole", "ResponsibleOrganization", "PatientComments",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    # Clinical Trial Subject
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "IssuerOfClinicalTrialProtocolID", "OtherClinicalTrialProtocolIDsSequence",
    "ClinicalTrialSiteID", "ClinicalTrialSiteName", "IssuerOfClinicalTrialSiteID",
    "ClinicalTrialSubjectID", "IssuerOfClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID", "IssuerOfClinicalTrialSubjectReadingID",
    "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    # General Study
    "StudyDate", "StudyTime", "AccessionNumber", "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName", "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName", "ConsultingPhysicianIdentificationSequence",
    "StudyDescription", "ProcedureCodeSequence", "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "ReferencedStudySequence",
    "StudyInstanceUID", "StudyID", "RequestingService", "RequestingServiceCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    # Patient Study
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientAge",
    "PatientSize", "PatientSizeCodeSequence", "PatientBodyMassIndex", "MeasuredAPDimension",
    "MeasuredLateralDimension", "PatientWeight", "MedicalAlerts", "Allergies", "Occupation",
    "SmokingStatus", "AdditionalPatientHistory", "PregnancyStatus", "LastMenstrualDate",
    "PatientSexNeutered", "ReasonForVisit", "ReasonForVisitCodeSequence", "AdmissionID",
    "IssuerOfAdmissionIDSequence", "ServiceEpisodeID", "ServiceEpisodeDescription",
    "IssuerOfServiceEpisodeIDSequence", "PatientState",
    # Clinical Trial Study
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription",
    "LongitudinalTemporalOffsetFromEvent", "LongitudinalTemporalEventType",
    "ClinicalTrialTimePointTypeCodeSequence", "IssuerOfClinicalTrialTimePointID",
    "ConsentForClinicalTrialUseSequence",
})
#: DCM code of the ContributingEquipmentSequence item highdicom makes from the source's
#: scanner (manufacturer, model, institution, address, station, department): left out.
_ACQUISITION_EQUIPMENT = "109101"
_MAX_READERS = max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True)
class SourcePlane:
    """The geometry of one source frame, as its own header states it."""

    sop_instance_uid: str
    #: 1-based frame number in a multi-frame source; ``None`` for a single-frame image.
    frame_number: int | None
    #: ImagePositionPatient: LPS mm of the centre of pixel (row 0, column 0).
    position: tuple[float, float, float]
    #: Unit LPS vector along a row (column index increasing): ImageOrientationPatient[:3].
    row_dir: tuple[float, float, float]
    #: Unit LPS vector down a column (row index increasing): ImageOrientationPatient[3:].
    col_dir: tuple[float, float, float]
    #: PixelSpacing (between rows, between columns), mm.
    spacing_rc: tuple[float, float]
    rows: int
    columns: int


@dataclass
class EncodedSeg:
    """A SEG that has passed the read-back check, ready to write."""

    dataset: Dataset  # a highdicom.seg.Segmentation
    data: bytes
    #: Labels on each source plane (n_planes, rows, columns), what the SEG encodes.
    frames: npt.NDArray[np.uint8]
    planes: list[SourcePlane]


# -- source geometry ----------------------------------------------------------------------
def _read_header(path: str) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise UnreadableFileError(f"cannot re-read the source header for the DICOM SEG: {exc}",
                                  path=path) from exc


def read_source_planes(image: CTVolume) -> tuple[list[Dataset], list[SourcePlane]]:
    """The headers (without pixel data) of the files ``image`` was loaded from and the
    geometry of each of their frames, in the order highdicom pairs frames with sources:
    one plane per single-frame file in ``metadata.source_files`` order, or every frame of
    the one multi-frame file in frame order."""
    from medseg.io.dicom.headers import _frames_of

    md = image.metadata
    if md.source_format != "dicom" or not md.source_files:
        raise OutputError(f"a DICOM SEG needs the DICOM images the volume came from; this "
                          f"volume came from {md.source_format or 'an unknown source'}",
                          path=md.source_path)
    paths = list(dict.fromkeys(md.source_files))
    cached = md.source_headers  # what the loader read (in memory), else read again
    with ThreadPoolExecutor(_MAX_READERS) as pool:
        headers = list(pool.map(lambda p: cached[p] if p in cached else _read_header(p), paths))
    for ds in headers:
        # Type 2 patient/study attributes the SEG must carry; some scanners (and anonymisers)
        # leave them out, which DICOM allows to be written empty.
        for keyword in _TYPE2_PATIENT_STUDY:
            if keyword not in ds:
                setattr(ds, keyword, None)
    n_frames = [int(ds.get("NumberOfFrames", 1) or 1) for ds in headers]
    if len(headers) > 1 and max(n_frames) > 1:
        raise OutputError(
            f"the series is stored in {len(headers)} files of which "
            f"{sum(n > 1 for n in n_frames)} hold several frames: a DICOM SEG references "
            "either single-frame images or one multi-frame image, so none is written",
            path=md.source_path, series=md.series_instance_uid)
    planes: list[SourcePlane] = []
    for path, ds in zip(paths, headers, strict=True):
        for f in _frames_of(ds, Path(path)):
            if f.position is None or f.orientation is None or f.pixel_spacing is None:
                raise OutputError("a source frame lacks ImagePositionPatient, "
                                  "ImageOrientationPatient or PixelSpacing: the SEG frame "
                                  "cannot be placed on it", path=path,
                                  series=md.series_instance_uid)
            o = f.orientation
            planes.append(SourcePlane(
                sop_instance_uid=f.sop_instance_uid,
                frame_number=None if f.frame is None else f.frame + 1,
                position=f.position,
                row_dir=(o[0], o[1], o[2]),
                col_dir=(o[3], o[4], o[5]),
                spacing_rc=f.pixel_spacing,
                rows=f.rows, columns=f.columns,
            ))
    return headers, planes


# -- labels on the source planes ----------------------------------------------------------
def _plane_affine(labels: CTVolume, plane: SourcePlane
                  ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64],
                             npt.NDArray[np.float64]]:
    """``(b, u, v)``: the continuous label index ``(i, j, k)`` of pixel (row r, column c) of
    ``plane`` is ``b + c * u + r * v``."""
    g = labels.geometry
    spacing = np.asarray(g.spacing)
    b = g.world_to_index(plane.position)[0]
    u = (g.direction.T @ np.asarray(plane.row_dir)) * plane.spacing_rc[1] / spacing
    v = (g.direction.T @ np.asarray(plane.col_dir)) * plane.spacing_rc[0] / spacing
    return b, u, v


def _nearest(x: npt.NDArray[np.float64]) -> npt.NDArray[np.intp]:
    """Nearest voxel index; an exact tie goes up, the same in both mapping paths."""
    return np.floor(x + 0.5).astype(np.intp)


def _plane_shift(labels_ijk: npt.NDArray[Any], b: npt.NDArray[np.float64],
                 u: npt.NDArray[np.float64], v: npt.NDArray[np.float64], rows: int,
                 cols: int) -> npt.NDArray[Any] | None:
    """The plane's labels when its rows and columns run along label index axes (a
    permutation, flip, shift or scale of the grid), else None."""
    a_col, a_row = int(np.argmax(np.abs(u))), int(np.argmax(np.abs(v)))
    if a_col == a_row:
        return None
    a_fix = 3 - a_col - a_row
    extent_c, extent_r = max(cols - 1, 1), max(rows - 1, 1)
    lean = (abs(v[a_col]) * extent_r, abs(u[a_row]) * extent_c,
            abs(u[a_fix]) * extent_c + abs(v[a_fix]) * extent_r)
    if max(lean) > AXIS_ALIGNED_TOLERANCE:
        return None
    shape_ijk = labels_ijk.shape
    idx_c = _nearest(b[a_col] + u[a_col] * np.arange(cols))
    idx_r = _nearest(b[a_row] + v[a_row] * np.arange(rows))
    fix = int(_nearest(np.asarray(b[a_fix])))
    ok_c = (idx_c >= 0) & (idx_c < shape_ijk[a_col])
    ok_r = (idx_r >= 0) & (idx_r < shape_ijk[a_row])
    out = np.zeros((rows, cols), labels_ijk.dtype)
    if not (0 <= fix < shape_ijk[a_fix]) or not ok_c.any() or not ok_r.any():
        return out
    index: list[Any] = [fix, fix, fix]
    index[a_col] = _as_slice(idx_c[ok_c])
    index[a_row] = _as_slice(idx_r[ok_r])
    if isinstance(index[a_col], slice) and isinstance(index[a_row], slice):
        # The usual case (same pixel grid, one voxel step per pixel): a strided view.
        block = labels_ijk[tuple(index)]
        block = block.T if a_col < a_row else block
    else:
        index[a_col] = idx_c[ok_c][None, :]
        index[a_row] = idx_r[ok_r][:, None]
        block = labels_ijk[tuple(index)]
    r0, c0 = int(np.argmax(ok_r)), int(np.argmax(ok_c))
    out[r0:r0 + block.shape[0], c0:c0 + block.shape[1]] = block
    return out


def _as_slice(idx: npt.NDArray[np.intp]) -> slice | npt.NDArray[np.intp]:
    """``idx`` as a slice when it steps by +1 or -1 (a view instead of a gather)."""
    if idx.size < 2:
        return slice(int(idx[0]), int(idx[0]) + 1)
    step = int(idx[1] - idx[0])
    if step not in (1, -1) or not np.all(np.diff(idx) == step):
        return idx
    stop = int(idx[-1]) + step
    return slice(int(idx[0]), None if stop < 0 else stop, step)


def _plane_general(labels_ijk: npt.NDArray[Any], b: npt.NDArray[np.float64],
                   u: npt.NDArray[np.float64], v: npt.NDArray[np.float64], rows: int,
                   cols: int) -> npt.NDArray[Any]:
    """The plane's labels by nearest neighbour, pixel by pixel (any orientation)."""
    c = np.arange(cols, dtype=np.float64)[None, :]
    r = np.arange(rows, dtype=np.float64)[:, None]
    idx = [_nearest(b[a] + c * u[a] + r * v[a]) for a in range(3)]
    ok = np.ones((rows, cols), bool)
    for a in range(3):
        ok &= (idx[a] >= 0) & (idx[a] < labels_ijk.shape[a])
    out = np.zeros((rows, cols), labels_ijk.dtype)
    out[ok] = labels_ijk[idx[0][ok], idx[1][ok], idx[2][ok]]
    return out


def labels_on_planes(labels: CTVolume, planes: Sequence[SourcePlane], *,
                     per_pixel: bool = False) -> npt.NDArray[np.uint8]:
    """The label of the nearest voxel of ``labels`` at every pixel of every plane, as an
    array ``(n_planes, rows, columns)``; pixels outside the label grid are 0.

    ``labels`` may be on any grid in the planes' frame of reference (the loaded, possibly
    resampled grid, or the same voxels in another index order). A plane whose rows and
    columns run along label index axes is mapped by an index shift; others pixel by pixel.
    ``per_pixel`` forces the pixel-by-pixel path (the two agree, which a test checks)."""
    if not planes:
        raise OutputError("no source planes to put the labels on")
    rows, cols = planes[0].rows, planes[0].columns
    if any(p.rows != rows or p.columns != cols for p in planes):
        raise OutputError("the source frames differ in size: a SEG needs one frame size")
    labels_ijk = np.asarray(labels.array).transpose(2, 1, 0)
    out = np.zeros((len(planes), rows, cols), np.uint8)
    for n, plane in enumerate(planes):
        b, u, v = _plane_affine(labels, plane)
        frame = None if per_pixel else _plane_shift(labels_ijk, b, u, v, rows, cols)
        out[n] = _plane_general(labels_ijk, b, u, v, rows, cols) if frame is None else frame
    return out


# -- what the derived objects carry from the source ---------------------------------------
def check_keep(keep: Sequence[str]) -> tuple[str, ...]:
    """``keep`` as a tuple of DICOM keywords; an unknown keyword is a
    :class:`~medseg.errors.ConfigError` with a close match."""
    from pydicom.datadict import keyword_dict

    out = tuple(str(k) for k in keep)
    for kw in out:
        if kw not in keyword_dict:
            close = difflib.get_close_matches(kw, list(keyword_dict), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"keep: {kw!r} is not a DICOM keyword{hint}")
    return out


def restrict_source_attributes(derived: Dataset, source: Dataset, keep: Sequence[str] = ()
                               ) -> None:
    """Strip ``derived`` (a SEG or SR just built from ``source``) down to what it needs of
    the source: the patient and study attributes of :data:`REQUIRED_PATIENT_STUDY` (and the
    non-human patient ones if present), not the source's other patient/study attributes and
    not its acquisition equipment (scanner, institution, address, station), which highdicom
    copies into ContributingEquipmentSequence. Each keyword of ``keep`` is carried from
    ``source`` as it is there (if it is); keeping an attribute the derived object writes
    itself (Manufacturer, SeriesInstanceUID ...) is a :class:`~medseg.errors.ConfigError`."""
    keep = check_keep(keep)
    own = [kw for kw in keep if kw in derived and kw not in PATIENT_STUDY_ATTRIBUTES]
    if own:
        raise ConfigError(f"keep: {', '.join(own)} written by medseg itself in the derived "
                          "object; it cannot be taken from the source")
    allowed = {*REQUIRED_PATIENT_STUDY, *_NON_HUMAN_PATIENT, *keep}
    for kw in PATIENT_STUDY_ATTRIBUTES - allowed:
        if kw in derived:
            del derived[kw]
    if "ContributingEquipmentSequence" in derived:
        items = [item for item in derived.ContributingEquipmentSequence
                 if not any(c.get("CodeValue") == _ACQUISITION_EQUIPMENT
                            for c in item.get("PurposeOfReferenceCodeSequence", []))]
        if items:
            derived.ContributingEquipmentSequence = items
        else:
            del derived.ContributingEquipmentSequence
    for kw in keep:
        if kw in source and kw not in derived:
            derived[kw] = copy.deepcopy(source[kw])


def _non_negative_slice_spacing(seg: Dataset) -> None:
    """SpacingBetweenSlices of the Pixel Measures macro must not be negative (PS3.3
    C.7.6.16.2.1); highdicom copies it from the source, and Philips writes it negative."""
    for group in seg.get("SharedFunctionalGroupsSequence", []):
        for measures in group.get("PixelMeasuresSequence", []):
            value = measures.get("SpacingBetweenSlices")
            if value is not None and float(value) < 0:
                measures.SpacingBetweenSlices = abs(float(value))


# -- building, checking, writing ----------------------------------------------------------
def _algorithm(method: str, model: dict[str, Any] | None) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    params = {"method": method}
    if model:
        params.update({"model": str(model.get("name")), "model_sha256": str(model.get("sha256"))})
    # The U-Net is a neural network; the threshold baseline is a HU threshold followed by
    # connected components and morphology.
    family = codes.cid7162.ArtificialIntelligence if method == "unet" \
        else codes.cid7162.MorphologicalOperations
    return hd.AlgorithmIdentificationSequence(name="medseg", family=family,
                                              version=__version__, source="medseg",
                                              parameters=params)


def _segment_descriptions(method: str, model: dict[str, Any] | None) -> list[Any]:
    import highdicom as hd

    algorithm = _algorithm(method, model)
    out = []
    for number, (label, code, rgb) in SEGMENTS.items():
        out.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=ANATOMICAL_STRUCTURE,
            segmented_property_type=code,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=generate_uid(),
            tracking_id=f"medseg {label.lower()}",
            display_color=hd.color.CIELabColor.from_rgb(*rgb),
        ))
    return out


_WARM_LOCK = threading.Lock()
_WARM_THREAD: threading.Thread | None = None


def _load_dicom_standard() -> None:
    """Import highdicom and load the tables of the DICOM standard it reads lazily on the
    first SEG it builds (about 1 s of JSON parsing on a 2-core CPU). They are cached for the
    process (``functools.lru_cache`` in ``highdicom._standard_utils``, a private module: a
    highdicom without it only loses the head start)."""
    try:
        import highdicom  # noqa: F401
        from highdicom import _standard_utils as std

        std.get_sop_class_iod_map()
        std.get_iod_module_map()
        std.get_module_attribute_map()
    except Exception:  # noqa: BLE001 - a warm-up only: build_seg works (slower) without it
        return


def warm_up_in_background() -> None:
    """Start :func:`_load_dicom_standard` in a daemon thread, once per process, so that it
    overlaps the network (whose torch kernels release the GIL) instead of adding to the
    command's time. :func:`build_seg` waits for it."""
    global _WARM_THREAD
    with _WARM_LOCK:
        if _WARM_THREAD is None:
            _WARM_THREAD = threading.Thread(target=_load_dicom_standard,
                                            name="medseg-dicom-warm-up", daemon=True)
            _WARM_THREAD.start()


def _wait_for_warm_up() -> None:
    with _WARM_LOCK:
        thread = _WARM_THREAD
    if thread is not None:
        thread.join()


def decode_seg_frames(data: bytes, planes: Sequence[SourcePlane]) -> npt.NDArray[np.uint8]:
    """Decode a BINARY SEG's bytes back to labels on ``planes`` (segment numbers, 0 where
    no segment), from the file itself: its bit-packed frames and, per frame, the segment
    (SegmentIdentificationSequence) and the source image and frame it was derived from
    (DerivationImageSequence). Raises ``ValueError`` for a frame whose source is not one of
    ``planes``, a pixel claimed by two segments, or pixel data of the wrong length.

    This is medseg's read-back check (:func:`verify_seg`): it reads what a viewer reads,
    with pydicom alone, in a fraction of highdicom's full decode (which builds lookup tables
    for every access pattern); the tests check both decoders agree."""
    ds = pydicom.dcmread(io.BytesIO(data))
    n, rows, cols = int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns)
    if str(ds.SegmentationType) != "BINARY" or int(ds.BitsAllocated) != 1:
        raise ValueError(f"not a BINARY SEG (SegmentationType {ds.SegmentationType}, "
                         f"BitsAllocated {ds.BitsAllocated})")
    packed = np.frombuffer(ds.PixelData, np.uint8)
    need = n * rows * cols
    if packed.size * 8 < need:
        raise ValueError(f"PixelData holds {packed.size * 8} bits for {n} frames of "
                         f"{rows} x {cols}")
    bits = np.unpackbits(packed, bitorder="little")[:need].reshape(n, rows, cols)
    index = {(p.sop_instance_uid, p.frame_number): k for k, p in enumerate(planes)}
    out = np.zeros((len(planes), rows, cols), np.uint8)
    claimed = np.zeros((len(planes), rows, cols), np.uint8)
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != n:
        raise ValueError(f"{len(per_frame)} per-frame groups for {n} frames")
    for i, item in enumerate(per_frame):
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        frame = source.get("ReferencedFrameNumber")
        key = (str(source.ReferencedSOPInstanceUID),
               int(frame) if frame is not None and planes[0].frame_number is not None
               else None)
        if key not in index:
            raise ValueError(f"frame {i + 1} is derived from {key[0]}"
                             f"{'' if key[1] is None else f' frame {key[1]}'}, not one of "
                             "the source planes")
        k = index[key]
        on = bits[i].astype(bool)
        out[k][on] = segment
        claimed[k] += on
    if (claimed > 1).any():
        raise ValueError(f"{int((claimed > 1).sum())} pixel(s) belong to two segments")
    return out


def verify_seg(data: bytes, frames: npt.NDArray[np.uint8], planes: Sequence[SourcePlane], *,
               path: str | Path | None = None) -> None:
    """Decode the encoded SEG ``data`` again (:func:`decode_seg_frames`) and check it gives
    ``frames`` on each source plane, pixel for pixel; raise :class:`OutputError` naming the
    first plane that differs."""
    try:
        decoded = decode_seg_frames(data, planes)
    except (ValueError, KeyError, AttributeError, IndexError, TypeError) as exc:
        raise OutputError(f"the DICOM SEG does not decode again ({exc}); nothing written",
                          path=path) from exc
    if decoded.shape != frames.shape:
        raise OutputError(f"the DICOM SEG decodes to shape {decoded.shape}, not "
                          f"{frames.shape}; nothing written", path=path)
    differ = np.flatnonzero((decoded != frames).reshape(len(planes), -1).any(axis=1))
    if differ.size:
        p = planes[int(differ[0])]
        n_bad = int(np.count_nonzero(decoded != frames))
        raise OutputError(
            f"read-back check failed: the decoded DICOM SEG differs from the labels in "
            f"{n_bad} pixel(s) on {differ.size} source plane(s), first SOPInstanceUID "
            f"{p.sop_instance_uid}; nothing written", path=path)


def build_seg(image: CTVolume, labels: CTVolume, *, method: str = "unet",
              model: dict[str, Any] | None = None,
              sources: tuple[list[Dataset], list[SourcePlane]] | None = None,
              keep: Sequence[str] = ()) -> EncodedSeg:
    """Encode ``labels`` (0 background, 1 right lung, 2 left lung) as a BINARY DICOM SEG on
    the planes of the DICOM images ``image`` was loaded from, and check it decodes back to
    the same labels. ``model`` is :attr:`medseg.segment.Segmentation.model` (name and
    sha256), ``sources`` what :func:`read_source_planes` returned (read when None).

    Of the source's patient and study the SEG carries only what the IOD requires
    (:data:`REQUIRED_PATIENT_STUDY`), plus the top-level attributes named in ``keep``
    (DICOM keywords, e.g. ``("InstitutionName", "StudyDescription")``): see
    :func:`restrict_source_attributes`."""
    _wait_for_warm_up()  # the tables loaded (or loading) in the background: wait for them
    import highdicom as hd

    keep = check_keep(keep)
    md = image.metadata
    arr = labels.array
    if arr.size and (arr.min() < 0 or arr.max() > max(SEGMENTS)):
        extra = sorted(set(np.unique(arr).tolist()) - {0, *SEGMENTS})
        raise OutputError(f"labels hold values {extra} beyond 0, 1 (right lung) and 2 (left "
                          "lung): not a lung label map", path=labels.metadata.source_path)
    headers, planes = sources if sources is not None else read_source_planes(image)
    frames = labels_on_planes(labels, planes)
    try:
        with warnings.catch_warnings():
            # highdicom warns about a one-component PatientName ("REMOVED", "ANON"): it is the
            # source's name, copied unchanged, and not for medseg to rewrite.
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended "
                                    "person name", category=UserWarning)
            seg = hd.seg.Segmentation(
                source_images=headers,
                pixel_array=frames,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=_segment_descriptions(method, model),
                series_instance_uid=generate_uid(),
                series_number=SEG_SERIES_NUMBER,
                sop_instance_uid=generate_uid(),
                instance_number=1,
                manufacturer="medseg",
                manufacturer_model_name=f"medseg lung segmentation ({method})",
                software_versions=__version__,
                device_serial_number=f"medseg-{__version__}",
                content_label="LUNGS",
                content_description="Right and left lung (medseg)",
                series_description="medseg lungs",
                # A SEG with no lung at all still records that nothing was found.
                omit_empty_frames=bool(frames.any()),
            )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"highdicom refused to build the DICOM SEG: {exc}",
                          path=md.source_path, series=md.series_instance_uid) from exc
    restrict_source_attributes(seg, headers[0], keep)
    _non_negative_slice_spacing(seg)
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    verify_seg(data, frames, planes, path=md.source_path)
    return EncodedSeg(dataset=seg, data=data, frames=frames, planes=planes)


def write_seg(image: CTVolume, labels: CTVolume, path: str | Path, *, method: str = "unet",
              model: dict[str, Any] | None = None, keep: Sequence[str] = ()) -> Path:
    """Build, check and atomically write the SEG (see :func:`build_seg`) to ``path``."""
    encoded = build_seg(image, labels, method=method, model=model, keep=keep)
    target = Path(path)
    with atomic_output(target) as tmp:
        tmp.write_bytes(encoded.data)
    return target
