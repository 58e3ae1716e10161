"""Lung segmentation of one study: checks, inference, postprocessing, outputs.

``segment(volume)`` returns labels on the volume's exact grid (0 background, 1 right lung,
2 left lung); ``segment_study(input, out_dir)`` loads, segments and writes
``lungs.nii.gz``, ``segment.json``, the report and (for DICOM) the SEG and SR as one unit,
as ``medseg segment`` does: a locked output folder, a staging folder swapped in whole, the
earlier run's other outputs removed (the design is in :mod:`medseg.io.atomic`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg._version import __version__
from medseg.conventions import (
    MASK_NAME,
    OUTPUT_NAMES,
    REPORT_FILENAMES,
    SEG_FILENAME,
    SR_FILENAME,
    SUMMARY_FILENAME,
    Method,
)
from medseg.errors import ConfigError, InputError, ModalityError
from medseg.inference import DEFAULT_BATCH_SIZE, DEFAULT_MODEL
from medseg.inference.postprocess import LABEL_LEFT, LABEL_RIGHT, postprocess_labels
from medseg.inference.threshold import BODY_MIN_HU, threshold_labels
from medseg.io import load, save
from medseg.io.atomic import atomic_output, output_unit
from medseg.volume import CTVolume

if TYPE_CHECKING:
    from medseg.evaluate.labels import LabelConvention

__all__ = ["OUTPUT_NAMES", "REPORT_FILENAMES", "SUMMARY_FILENAME", "Method", "Segmentation",
           "StudyResult", "check_input", "segment", "segment_study"]

# SUMMARY_FILENAME (segment.json) is the commit record of a study's outputs: what ran, and
# which files belong to it. OUTPUT_NAMES are every file segment_study may write into its
# output folder; they are one unit: a run deletes those of an earlier run that it does not
# write itself. Both are defined in medseg.conventions.

#: Plausible adult total lung volume at CT (mL): roughly 2-9 L across sex, size, disease and
#: inspiration (e.g. COPDGene TLC/FRC ranges). Outside it a warning is written.
PLAUSIBLE_LUNG_ML = (1000.0, 10000.0)
#: Below this many slices the 3D postprocessing and volumes are unreliable (a warning).
FEW_SLICES = 10
#: Lung parenchyma has a median of about -850 HU (healthy, full inspiration) to about
#: -930 HU (severe emphysema); a segmented region whose median is below this is air (a
#: phantom, an air-filled cavity, air outside the patient), not lung: a warning.
AIR_MEDIAN_HU = -960.0
#: BodyPartExamined values under which a chest CT can be filed (DICOM PS3.16 CID 4031 and
#: common vendor values); another stated body part is a warning.
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "BREAST", "HEART", "TORSO", "WHOLEBODY",
                    "WHOLE BODY", "TRUNK", "CHESTABDOMEN", "CHEST_ABDOMEN", "CHEST_TO_PELVIS",
                    "CAP", "BODY", "ABDOMEN", "CTA", "PE")


@dataclass
class Segmentation:
    labels: CTVolume
    method: str
    model: dict[str, Any] | None
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    #: The quality verdict (:meth:`medseg.qc.QCResult.to_dict`), None when QC was not run.
    qc: dict[str, Any] | None = None
    #: What the postprocessing changed that a reader should know, per lung (mL):
    #: ``enclosed_tissue_ml``, soft tissue a lung closes around put back into it (rule 4, a
    #: lesion the network left out); ``image_edge_lung_ml``, aerated lung along a cut by the
    #: image's border that the network took for outside air (rule 5). None for the
    #: threshold method.
    postprocess: dict[str, Any] | None = None

    def volumes_ml(self) -> dict[str, float]:
        # count_nonzero per label: bincount would widen every voxel to int64 (10x slower)
        arr = self.labels.array
        v = self.labels.voxel_volume_ml()
        right = float(np.count_nonzero(arr == LABEL_RIGHT) * v)
        left = float(np.count_nonzero(arr == LABEL_LEFT) * v)
        return {"right": round(right, 2), "left": round(left, 2),
                "total": round(right + left, 2)}


@dataclass
class StudyResult:
    summary: dict[str, Any]
    volume: CTVolume
    segmentation: Segmentation
    out_dir: Path


def check_input(volume: CTVolume) -> list[str]:
    """Refuse what cannot be segmented (not CT, not HU, no body: a medseg error naming the
    input); returns the warnings for what can, with reservations. ``segment`` runs it first,
    ``medseg info`` too."""
    from medseg.hounsfield import check_hounsfield

    modality = volume.metadata.modality
    if modality is not None and modality.upper() != "CT":
        raise ModalityError(f"modality is {modality}; lung segmentation needs CT",
                            path=volume.metadata.source_path,
                            series=volume.metadata.series_instance_uid)
    warnings = check_hounsfield(volume)
    if not (volume.array > BODY_MIN_HU).any():
        raise InputError("no body in the volume: every voxel is air (below -500 HU)",
                         path=volume.metadata.source_path)
    part = (volume.metadata.body_part or "").strip().upper()
    if part and not any(p in part for p in CHEST_BODY_PARTS):
        warnings.append(f"BodyPartExamined is {volume.metadata.body_part!r}: medseg segments "
                        "the lungs in chest CT")
    if volume.shape[0] < FEW_SLICES:
        warnings.append(f"only {volume.shape[0]} slices: lung volumes and 3D postprocessing "
                        "are unreliable")
    return warnings


def segment(volume: CTVolume, *, method: str | Method = Method.UNET, model: Any = None,
            batch_size: int = DEFAULT_BATCH_SIZE, threads: int | None = None,
            progress: Callable[[int, int], None] | None = None,
            qc: bool = True, device: str = "cpu", upright: bool = True) -> Segmentation:
    """Segment the lungs of ``volume``; labels come back on its exact grid. With ``qc``
    (default) the mask's quality verdict (:func:`medseg.qc.quality_check`) is in
    ``.qc``. ``device``: ``cpu`` (default), ``auto``, ``cuda`` or ``cuda:N`` for the
    network (:mod:`medseg.inference.device`). ``upright``: a tilted patient's slices are
    turned upright for the network (:mod:`medseg.inference.pose`); False runs them as
    stored."""
    try:
        method = Method(method)
    except ValueError as exc:
        raise ConfigError(f"unknown method {method!r}; choose from "
                          f"{', '.join(m.value for m in Method)}") from exc
    warnings = check_input(volume)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model_info = None
    post: dict[str, Any] | None = None
    if method is Method.THRESHOLD:
        labels = threshold_labels(volume)
    else:
        from medseg.inference.unet import (
            InferenceSettings,
            slices_interpolated,
            thick_slice_factor,
            unet_labels,
        )
        from medseg.models import load_model
        from medseg.preprocess import pixel_noise_hu

        loaded = model if model is not None and not isinstance(model, (str, Path)) \
            else load_model(model or DEFAULT_MODEL)
        from medseg.inference.device import resolve_device

        settings = InferenceSettings(batch_size=batch_size, threads=threads,
                                     device=resolve_device(device), upright=upright)
        # thick slices: the network and the postprocessing work on the study with slices
        # interpolated between its own (the network's context nearer, as in training); the
        # labels are those of the study's own slices, on its exact grid
        axis = volume.axial_axis()
        factor = thick_slice_factor(float(volume.spacing[2 - axis]), loaded.spec) \
            if loaded.spec.view == "axial" else 1
        work = volume if factor == 1 else slices_interpolated(volume, axis, factor)
        raw = unet_labels(work, loaded, settings, progress=progress,
                          noise_hu=None if factor == 1 else pixel_noise_hu(volume.array, axis))
        timings.update({k: round(v, 3) for k, v in settings.timings.items()})
        t1 = time.perf_counter()
        added: dict[int, int] = {}
        edge_added: dict[int, int] = {}
        labels = postprocess_labels(raw, axis, hu=work.array, geometry=work.geometry,
                                    added=added, edge_added=edge_added)
        if factor > 1:
            labels = np.ascontiguousarray(
                np.take(labels, np.arange(0, labels.shape[axis], factor), axis=axis))
        timings["postprocess_s"] = round(time.perf_counter() - t1, 3)
        vml = work.voxel_volume_ml()
        post = {key: {"right": round(counts.get(LABEL_RIGHT, 0) * vml, 1),
                      "left": round(counts.get(LABEL_LEFT, 0) * vml, 1)}
                for key, counts in (("enclosed_tissue_ml", added),
                                    ("image_edge_lung_ml", edge_added))}
        model_info = {"name": loaded.spec.name, "sha256": loaded.sha256,
                      "architecture": loaded.spec.to_dict(), "device": settings.device,
                      "precision": settings.precision,
                      "input_noise_hu": settings.input_noise_hu,
                      "antialias_sigma_px": list(settings.antialias_sigma_px),
                      "context_factor": factor,
                      "tilt_deg": settings.tilt_deg, "upright_turn_deg": settings.turn_deg}
    timings["segment_s"] = round(time.perf_counter() - t0, 3)
    meta = volume.metadata.copy()
    meta.warnings = []
    result = Segmentation(CTVolume(labels, volume.geometry, meta), method.value, model_info,
                          timings, warnings, postprocess=post)
    vols = result.volumes_ml()
    if vols["right"] == 0 and vols["left"] == 0:
        result.warnings.append("no lung found: the mask is empty (is this a chest CT?)")
    else:
        for side, other in (("right", "left"), ("left", "right")):
            if vols[side] == 0:
                result.warnings.append(
                    f"only the {other} lung found: no {side} lung in the result (a field "
                    f"of view holding one side, a pneumonectomy or a collapsed {side} "
                    f"lung?)")
        median = float(np.median(volume.array[result.labels.array > 0]))
        if median < AIR_MEDIAN_HU:
            result.warnings.append(
                f"the segmented lungs have a median of {median:.0f} HU: that is air, not lung "
                f"parenchyma (about -850 to -930 HU): not a chest CT, or a phantom?")
        lo, hi = PLAUSIBLE_LUNG_ML
        if not lo <= vols["total"] <= hi:
            result.warnings.append(
                f"total lung volume {vols['total']:.0f} mL is outside the plausible "
                f"{lo:.0f}-{hi:.0f} mL: partial field of view, or not a chest CT?")
    if qc:
        _add_qc(result, volume)
    return result


def _add_qc(result: Segmentation, volume: CTVolume) -> None:
    """The mask's quality verdict into ``result.qc`` and its time into the timings."""
    from medseg.qc import quality_check

    t1 = time.perf_counter()
    result.qc = quality_check(volume, result.labels.array).to_dict()
    result.timings["qc_s"] = round(time.perf_counter() - t1, 3)


def _default_study_id(path: Path) -> str:
    """The input's name without volume suffixes (``ct.nii.gz`` -> ``ct``)."""
    from medseg.io.atomic import split_suffix

    return split_suffix(path.resolve())[0] if path.is_file() else path.resolve().name


def segment_study(input_path: str | Path, out_dir: str | Path, *, series: str | None = None,
                  method: str | Method = Method.UNET, model: Any = None,
                  batch_size: int = DEFAULT_BATCH_SIZE, threads: int | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  reference: str | Path | None = None, report: bool = True,
                  study_id: str | None = None, show_phi: bool = False,
                  dicom_outputs: bool = True,
                  reference_labels: str | LabelConvention = "auto",
                  device: str = "cpu") -> StudyResult:
    """Load ``input_path``, segment, write ``lungs.nii.gz``, ``segment.json`` and (unless
    ``report`` is false) ``report.json/.html/.csv`` in ``out_dir``; with ``reference``
    (labels on the input's grid, read through ``reference_labels``, the grammar of
    :class:`medseg.evaluate.LabelConvention`: default ``auto``) the report holds validation
    metrics. ``device`` runs the network on the CPU (default) or a GPU (see :func:`segment`).
    For DICOM input (unless ``dicom_outputs`` is false) also ``lungs.seg.dcm`` (DICOM SEG
    on the source images' planes) and ``lungs.sr.dcm`` (TID 1500 measurement report); see
    :mod:`medseg.io.dicom_seg`.

    The outputs are one unit (:func:`medseg.io.atomic.output_unit`): ``out_dir`` is locked
    for the whole run (a second run into it fails at once with an
    :class:`~medseg.errors.OutputError`), every file is written into a staging folder and
    the set is swapped in whole; the :data:`OUTPUT_NAMES` this run does not write (e.g. an
    earlier DICOM run's SEG and SR, or ``report.*`` with ``report=False``) are deleted, any
    other file in ``out_dir`` is left alone. If anything fails or is interrupted before the
    swap, ``out_dir`` is as it was; what a killed run left is finished or removed by the next
    run into the folder."""
    from medseg.evaluate.labels import LabelConvention
    from medseg.inference.device import resolve_device

    conv = LabelConvention.parse(reference_labels)  # a bad convention fails before any work
    device = resolve_device(device)  # so does a GPU that is not there
    with output_unit(out_dir, names=OUTPUT_NAMES, record=SUMMARY_FILENAME) as staging:
        summary, volume, result = _segment_into(
            input_path, staging, series=series, method=method, model=model,
            batch_size=batch_size, threads=threads, progress=progress, reference=reference,
            report=report, study_id=study_id, show_phi=show_phi, dicom_outputs=dicom_outputs,
            reference_labels=conv, device=device)
    return StudyResult(summary=summary, volume=volume, segmentation=result,
                       out_dir=Path(out_dir))


def _seg_and_sr(volume: CTVolume, result: Segmentation, measurements: dict[str, Any]
                ) -> tuple[Any, Any, dict[str, float]]:
    """The DICOM SEG (built and read back) and SR, in memory (no file is written here), and
    their times: :func:`_segment_into`'s second thread."""
    from medseg.io.dicom_seg import build_seg
    from medseg.io.dicom_sr import build_sr

    t1 = time.perf_counter()
    seg = build_seg(volume, result.labels, method=result.method, model=result.model)
    t2 = time.perf_counter()
    sr = build_sr(volume, result.labels, seg.dataset, measurements=measurements)
    return seg, sr, {"dicom_seg": round(t2 - t1, 3),
                     "dicom_sr": round(time.perf_counter() - t2, 3)}


def _segment_into(input_path: str | Path, staging: Path, *, series: str | None,
                  method: str | Method, model: Any, batch_size: int, threads: int | None,
                  progress: Callable[[int, int], None] | None,
                  reference: str | Path | None, report: bool, study_id: str | None,
                  show_phi: bool, dicom_outputs: bool,
                  reference_labels: str | LabelConvention = "auto", device: str = "cpu"
                  ) -> tuple[dict[str, Any], CTVolume, Segmentation]:
    """:func:`segment_study`'s work: every output is made (and the SEG read back) in memory,
    then written into ``staging``; returns the summary, the volume and the segmentation."""
    t0 = time.perf_counter()
    volume = load(input_path, series=series)
    ref = load(reference) if reference is not None else None
    t_load = time.perf_counter() - t0
    with_seg = dicom_outputs and volume.metadata.source_format == "dicom"
    if with_seg:
        from medseg.io.dicom_seg import warm_up_in_background

        warm_up_in_background()  # the SEG writer's tables load while the network runs
    result = segment(volume, method=method, model=model, batch_size=batch_size,
                     threads=threads, progress=progress, qc=False, device=device)
    # The lung measurements, then the DICOM SEG (built and read back) and SR are made in
    # memory in a second thread while this one runs QC and makes the report (from those
    # measurements): they need only the labels, and much of each side's work (bit packing
    # in one, scipy, numpy and PNG encoding in the other) releases the GIL. Their timings
    # overlap (docs/benchmarks.md). Every file is written by this thread, after both.
    from concurrent.futures import ThreadPoolExecutor

    from medseg.quantify import quantify

    dicom_files: dict[str, str] = {}
    dicom_data: dict[str, bytes] = {}
    dicom_timings: dict[str, float] = {}
    report_files: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-outputs")
    try:
        numbers = pool.submit(quantify, volume, result.labels) if report or with_seg \
            else None
        dicom = pool.submit(lambda: _seg_and_sr(volume, result,
                                                numbers.result()["measurements"])) \
            if with_seg and numbers is not None else None
        _add_qc(result, volume)
        t1 = time.perf_counter()
        if report and numbers is not None:
            from medseg.report.study import render_study_files, study_report

            sid = study_id or _default_study_id(Path(input_path))
            report_dict = study_report(volume, result.labels, study_id=sid,
                                       method=result.method, model=result.model,
                                       reference=ref, warnings=result.warnings,
                                       show_phi=show_phi, qc=result.qc,
                                       reference_labels=reference_labels,
                                       quantified=numbers.result())
            report_files = render_study_files(report_dict, volume, result.labels)
        t_report = time.perf_counter() - t1
        if dicom is not None:
            seg, sr, dicom_timings = dicom.result()
            dicom_files = {"dicom_seg": SEG_FILENAME, "dicom_sr": SR_FILENAME}
            dicom_data = {SEG_FILENAME: seg.data, SR_FILENAME: sr.data}
    finally:  # after a failure or an interrupt, what has not started never starts
        pool.shutdown(wait=True, cancel_futures=True)
    t1 = time.perf_counter()
    mask_path = save(result.labels, staging / MASK_NAME)
    t_write = time.perf_counter() - t1
    md = volume.metadata
    summary: dict[str, Any] = {
        "medseg_version": __version__,
        "method": result.method,
        "model": result.model,
        "input": {
            "path": str(input_path),
            "format": md.source_format,
            "series_instance_uid": md.series_instance_uid,
            "modality": md.modality,
            "shape_zyx": list(volume.shape),
            **volume.geometry.to_dict(),
            "corrections": list(md.corrections),
        },
        "outputs": {"labels": mask_path.name},
        "labels": {"0": "background", str(LABEL_RIGHT): "right lung",
                   str(LABEL_LEFT): "left lung"},
        "volumes_ml": result.volumes_ml(),
        "warnings": result.warnings,
        "qc": result.qc,
        "postprocess": result.postprocess,
        "timings_s": {"load": round(t_load, 3), **result.timings,
                      "write": round(t_write, 3),
                      "total": round(time.perf_counter() - t0, 3)},
    }
    if dicom_data:
        for name, data in dicom_data.items():
            with atomic_output(staging / name) as tmp:
                tmp.write_bytes(data)
        summary["outputs"].update(dicom_files)
        summary["timings_s"].update(dicom_timings)
        summary["timings_s"]["total"] = round(time.perf_counter() - t0, 3)
    if report_files:
        from medseg.report.study import write_files

        write_files(staging, report_files)
        summary["outputs"]["report"] = sorted(report_files)
        summary["timings_s"]["report"] = round(t_report, 3)
        summary["timings_s"]["total"] = round(time.perf_counter() - t0, 3)
    with atomic_output(staging / SUMMARY_FILENAME) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return summary, volume, result
