"""DICOM SR (TID 1500 Measurement Report) of the lung measurements, referencing the SEG.

The report holds, per lung (right, left) and for both lungs together, the measurements of
:func:`medseg.quantify.quantify`: volume (mL), mean lung density (HU), LAA-950 (%) and PD15
(HU). Units are UCUM (``ml``, ``[hnsf'U]``, ``%``), so viewers and PACS analytics read them
without a lookup table. Why the groups look as they do:

* Each lung is a TID 1411 *Volumetric ROI* group whose region is the SEG segment it was
  measured on (Referenced Segment: the SEG's SOP instance and segment number, and the source
  CT series the segmentation was made from). This is how 3D Slicer's QuantitativeReporting
  and OHIF tie a number to a region.
* TID 1411 references exactly one segment, and the whole lung is two; its group is a TID 1501
  *Measurements* group with finding site "Lung", whose measurements each cite the SEG instance
  as their source image.
* The observer is the device: medseg and its version (TID 1004). The SR joins the source's
  study (patient and study attributes are copied from the SEG, itself copied from the CT),
  with only the attributes the IOD requires (as the SEG; see
  :func:`medseg.io.dicom_seg.restrict_source_attributes`).
* LAA-950 and PD15 have no code in DICOM or SNOMED CT; they carry codes of the local scheme
  ``99MEDSEG`` (PS3.16 §8.2 allows private schemes prefixed "99") with meanings that say what
  they are.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from medseg._version import __version__
from medseg.conventions import LAA_THRESHOLD_HU, PD_PERCENTILE, SR_FILENAME
from medseg.errors import OutputError
from medseg.io.atomic import atomic_output
from medseg.io.dicom_seg import (
    LEFT_LUNG,
    RIGHT_LUNG,
    SEG_SERIES_NUMBER,
    check_keep,
    restrict_source_attributes,
)
from medseg.volume import CTVolume

__all__ = ["SR_FILENAME", "EncodedSR", "build_sr", "read_sr_measurements", "write_sr"]

LUNG = Code("39607008", "SCT", "Lung")
#: What was reported: a CT of the chest (LOINC; DICOM CID 100 is extensible).
CT_CHEST = Code("24627-2", "LN", "CT Chest")
#: UCUM units.
UNIT_ML = Code("ml", "UCUM", "milliliter")
UNIT_HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
UNIT_PERCENT = Code("%", "UCUM", "Percent")
#: Measurement names: volume (SCT), mean attenuation (DCM), and the two emphysema indices,
#: which have no standard code (local scheme 99MEDSEG).
VOLUME = Code("118565006", "SCT", "Volume")
MEAN_ATTENUATION = Code("112181", "DCM", "Mean Attenuation Coefficient")
LAA950 = Code("LAA950", "99MEDSEG", f"Percent of lung volume below {LAA_THRESHOLD_HU:.0f} HU")
PD15 = Code("PD15", "99MEDSEG", f"{PD_PERCENTILE:.0f}th percentile of lung density")
#: (key in quantify's measurements, group label, finding site, segment number or None).
GROUPS: tuple[tuple[str, str, Code, int | None], ...] = (
    ("right", "Right lung", RIGHT_LUNG, 1),
    ("left", "Left lung", LEFT_LUNG, 2),
    ("lung", "Both lungs", LUNG, None),
)
#: (key in a quantify measurement dict, name, unit).
MEASUREMENTS: tuple[tuple[str, Code, Code], ...] = (
    ("volume_ml", VOLUME, UNIT_ML),
    ("mld_hu", MEAN_ATTENUATION, UNIT_HU),
    ("laa950_pct", LAA950, UNIT_PERCENT),
    ("pd15_hu", PD15, UNIT_HU),
)
#: A fixed UID for the medseg "device" of a version (TID 1004 needs one): the same software
#: version is the same observer in every report.
DEVICE_UID = generate_uid(entropy_srcs=["medseg", __version__])


@dataclass
class EncodedSR:
    """An SR that parsed again after encoding, ready to write."""

    dataset: Dataset  # a highdicom.sr.Comprehensive3DSR
    data: bytes


def _measurements(values: dict[str, Any], source: Any = None) -> list[Any]:
    import highdicom as hd

    out = []
    for key, name, unit in MEASUREMENTS:
        value = values.get(key)
        if value is None:  # an empty lung has a volume (0) but no density
            continue
        out.append(hd.sr.Measurement(name=name, value=float(value), unit=unit,
                                     referenced_images=source))
    return out


def build_sr(image: CTVolume, labels: CTVolume, seg: Dataset, *,
             measurements: dict[str, Any], keep: Sequence[str] = ()) -> EncodedSR:
    """A TID 1500 Measurement Report of the lung ``measurements`` of ``labels`` on
    ``image`` (:func:`medseg.quantify.quantify`'s ``measurements``: the IO layer writes
    them, it does not compute them) referencing the segments of
    ``seg`` (the SEG made by :func:`medseg.io.dicom_seg.build_seg`). Like the SEG, it
    carries only the patient and study attributes the IOD requires, plus those named in
    ``keep`` (taken from ``seg``, so give the SEG the same ``keep``)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    keep = check_keep(keep)
    md = image.metadata
    algorithm = hd.sr.AlgorithmIdentification(name="medseg", version=__version__)
    seg_class, seg_uid = str(seg.SOPClassUID), str(seg.SOPInstanceUID)
    groups: list[Any] = []
    for key, label, site, segment in GROUPS:
        tracking = hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=label)
        values = measurements.get(key) or {}
        if segment is not None:
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg_class, sop_instance_uid=seg_uid,
                    segment_number=segment,
                    source_series=hd.sr.SourceSeriesForSegmentation(
                        str(md.series_instance_uid))),
                finding_type=site, finding_sites=[hd.sr.FindingSite(site)],
                algorithm_id=algorithm, measurements=_measurements(values)))
        else:
            source = [hd.sr.SourceImageForMeasurement(seg_class, seg_uid)]
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, finding_type=site,
                finding_sites=[hd.sr.FindingSite(site)], algorithm_id=algorithm,
                measurements=_measurements(values, source)))
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID, name=f"medseg {__version__}", manufacturer_name="medseg",
            model_name="medseg lung segmentation"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CT_CHEST, imaging_measurements=groups)
    try:
        with warnings.catch_warnings():
            # as for the SEG: a one-component PatientName is the source's, copied unchanged
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended "
                                    "person name", category=UserWarning)
            sr = hd.sr.Comprehensive3DSR(
                evidence=[seg], content=report[0],
                series_instance_uid=generate_uid(), series_number=SEG_SERIES_NUMBER + 1,
                sop_instance_uid=generate_uid(), instance_number=1, manufacturer="medseg",
                is_complete=True, series_description="medseg lung measurements")
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"highdicom refused to build the DICOM SR: {exc}",
                          path=md.source_path, series=md.series_instance_uid) from exc
    restrict_source_attributes(sr, seg, keep)
    sr.SoftwareVersions = __version__
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    try:
        read_sr_measurements(data)
    except (ValueError, KeyError, AttributeError, IndexError) as exc:
        raise OutputError(f"the DICOM SR does not parse again ({exc}); nothing written",
                          path=md.source_path) from exc
    return EncodedSR(dataset=sr, data=data)


def read_sr_measurements(data: bytes | str | Path) -> dict[str, dict[str, float]]:
    """``{"right": {"volume_ml": ...}, "left": ..., "lung": ...}`` from an SR written by
    :func:`build_sr` (parsed with highdicom), e.g. to compare with ``segment.json``."""
    import highdicom as hd

    sr = hd.sr.srread(io.BytesIO(data) if isinstance(data, bytes) else data)
    by_name = {(name.value, name.scheme_designator): key for key, name, _ in MEASUREMENTS}
    by_site = {label: key for key, label, _, _ in GROUPS}
    report = sr.content
    if not isinstance(report, hd.sr.MeasurementReport):  # srread parses TID 1500 into one
        raise ValueError("the SR content is not a TID 1500 Measurement Report")
    out: dict[str, dict[str, float]] = {}
    for group in report.get_volumetric_roi_measurement_groups() + \
            report.get_image_measurement_groups():
        key = by_site[str(group.tracking_identifier)]
        out[key] = {by_name[(m.name.value, m.name.scheme_designator)]: float(m.value)
                    for m in group.get_measurements()}
    return out


def write_sr(image: CTVolume, labels: CTVolume, seg: Dataset, path: str | Path, *,
             measurements: dict[str, Any], keep: Sequence[str] = ()) -> Path:
    """Build and atomically write the SR (see :func:`build_sr`) to ``path``."""
    encoded = build_sr(image, labels, seg, measurements=measurements, keep=keep)
    target = Path(path)
    with atomic_output(target) as tmp:
        tmp.write_bytes(encoded.data)
    return target
