"""The per-study report: ``report.json`` (versioned schema), ``report.html``, ``report.csv``.

Schema (``schema_version`` 1)::

    {"schema": "medseg.study-report", "schema_version": 1,
     "study_id": str,
     "provenance": {"medseg_version", "python", "numpy", "torch"},
     "inputs": {"image": {"path", "format", "series_instance_uid", "sha256", "n_files"},
                "reference": {...} | null},
     "parameters": {"method", "model": {"name", "sha256", "precision"} | null}
                (precision: "fp32" or "bf16", what the network ran in; absent in reports
                written before 2026-12-07),
     "grid": {"shape_zyx", "spacing", "origin", "direction", "orientation"},
     "measurements": {right|left|lung: {volume_ml, n_voxels, mld_hu, laa950_pct, pd15_hu}},
     "histogram": {"bin_edges_hu", "counts": {right|left|lung: [...]}},
     "metrics": {right|left|lung: {dice, iou, hd, hd95, assd, nsd, volume_diff_ml}} | null
                (only "lung" when the reference has one label for both lungs),
     "warnings": [str],
     "qc": {"verdict": "ok" | "review", "reasons": [str], "notes": [str],
            "slice": int | null, "signals": {...}} | null   (medseg.qc; schema 1 readers
            that do not know the key can ignore it),
     "patient": {"id", "name", "study_date"}  (only with show_phi)}

Distances are in mm; an infinite distance (a missed lung) is written as the string "inf".
The report holds no timestamps or timings, so the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from medseg._version import __version__
from medseg.checksums import sha256_file
from medseg.evaluate import to_jsonable
from medseg.evaluate.labels import DEFAULT_REF_LABELS, LabelConvention, score_label_maps
from medseg.io.atomic import write_text
from medseg.quantify import quantify
from medseg.report._csv import csv_text
from medseg.report._render import environment, png_data_uri, svg_data_uri
from medseg.report._svg import line_chart_svg
from medseg.visualize import overlay_montage
from medseg.volume import CTVolume

__all__ = ["SCHEMA_VERSION", "csv_row", "input_checksums", "render_study_files", "study_report",
           "write_files", "write_study_report"]

SCHEMA = "medseg.study-report"
SCHEMA_VERSION = 1
_LABELS = ("right", "left", "lung")


def input_checksums(volume: CTVolume) -> dict[str, Any]:
    """SHA-256 of what the volume was read from: the file, or for a DICOM series the
    SHA-256 over its files' digests in slice order (independent of the folder's path)."""
    md = volume.metadata
    files = list(dict.fromkeys(md.source_files)) or ([md.source_path] if md.source_path
                                                     else [])
    if not files or not all(Path(f).is_file() for f in files):
        return {"sha256": None, "n_files": 0}
    if len(files) == 1:
        digest = sha256_file(files[0])
    else:
        outer = hashlib.sha256()
        for f in files:
            outer.update(bytes.fromhex(sha256_file(f)))
        digest = outer.hexdigest()
    return {"sha256": digest, "n_files": len(files)}



def _input_entry(volume: CTVolume) -> dict[str, Any]:
    md = volume.metadata
    return {"path": md.source_path, "format": md.source_format,
            "series_instance_uid": md.series_instance_uid, **input_checksums(volume)}


def _torch_version() -> str | None:
    """torch's version without importing it (seconds in a fresh process, and a report of
    the threshold method does not otherwise need torch)."""
    loaded = sys.modules.get("torch")
    if loaded is not None:
        return str(loaded.__version__)
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def study_report(image: CTVolume, labels: CTVolume, *, study_id: str,
                 method: str | None = None, model: dict[str, Any] | None = None,
                 reference: CTVolume | None = None, warnings: list[str] | None = None,
                 show_phi: bool = False,
                 reference_labels: str | LabelConvention = DEFAULT_REF_LABELS,
                 qc: dict[str, Any] | None = None,
                 quantified: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report as a dict (JSON-ready after :func:`medseg.evaluate.to_jsonable`).
    ``reference`` (labels on the same grid) adds validation metrics; its values are read
    through ``reference_labels`` (default ``auto``: right=1,left=2, or lung=1 for a 0/1
    mask; see :mod:`medseg.evaluate.labels`), and a value it does not name is an
    :class:`~medseg.errors.InputError`. How the reference was read goes into the warnings
    when it changes what is scored (only "lung" for a one-label reference).
    ``quantified``: :func:`medseg.quantify.quantify`'s result for these labels, if the
    caller has it already (computed here otherwise)."""
    q = quantified if quantified is not None else quantify(image, labels)
    metrics = None
    notes: list[str] = []
    if reference is not None:
        if not reference.same_grid(labels, atol_mm=1e-3):
            from medseg.errors import GeometryError

            raise GeometryError("reference and prediction grids differ: "
                                + labels.grid_difference(reference),
                                path=reference.metadata.source_path)
        score = score_label_maps(labels.array, reference.array, image.spacing[::-1],
                                 ref_labels=reference_labels,
                                 ref_path=reference.metadata.source_path,
                                 flags=("pred_labels=", "reference_labels="))
        metrics = score.metrics
        notes = [f"reference: {n}" for n in score.notes]
    md = image.metadata
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "study_id": study_id,
        "provenance": {"medseg_version": __version__, "python": platform.python_version(),
                       "numpy": np.__version__, "torch": _torch_version()},
        "inputs": {"image": _input_entry(image),
                   "reference": _input_entry(reference) if reference is not None else None},
        "parameters": {"method": method,
                       "model": {"name": model["name"], "sha256": model["sha256"],
                                 **({"precision": model["precision"]}
                                    if model.get("precision") else {})}
                       if model else None},
        "grid": {"shape_zyx": list(image.shape), **image.geometry.to_dict()},
        "acquisition": {"modality": md.modality, "manufacturer": md.manufacturer,
                        "model": md.manufacturer_model, "kernel": md.convolution_kernel,
                        "slice_thickness_mm": md.slice_thickness_mm,
                        "contrast_agent": md.contrast_agent},
        "measurements": q["measurements"],
        "histogram": q["histogram"],
        "metrics": metrics,
        "warnings": list(dict.fromkeys([*(warnings or []), *q["warnings"], *notes])),
        "qc": qc,
    }
    if show_phi:
        report["patient"] = {"id": md.patient_id, "name": md.patient_name,
                             "study_date": md.study_date}
    return report


def csv_row(report: dict[str, Any]) -> dict[str, Any]:
    """One flat row: study id, volumes and densitometry per lung, metrics if any."""
    row: dict[str, Any] = {"study_id": report["study_id"],
                           "method": report["parameters"]["method"]}
    for label in _LABELS:
        for key, value in report["measurements"][label].items():
            if key != "n_voxels":
                row[f"{label}_{key}"] = value
    if report["metrics"]:
        for label in _LABELS:
            for key, value in report["metrics"].get(label, {}).items():
                row[f"{label}_{key}"] = value
    row["n_warnings"] = len(report["warnings"])
    qc = report.get("qc")
    row["qc_verdict"] = qc["verdict"] if qc else ""
    row["qc_reasons"] = "; ".join(qc["reasons"]) if qc else ""
    return dict(to_jsonable(row))


def _histogram_svg(report: dict[str, Any]) -> str:
    """The lungs' HU histograms (% of each lung's voxels per bin) as an SVG document."""
    edges = np.asarray(report["histogram"]["bin_edges_hu"], float)
    centres = ((edges[:-1] + edges[1:]) / 2).tolist()
    series = []
    for label, colour in (("right", "#e0402f"), ("left", "#3389f2")):
        counts = np.asarray(report["histogram"]["counts"][label], float)
        if counts.sum():
            series.append((f"{label} lung", colour, (100 * counts / counts.sum()).tolist()))
    return line_chart_svg(centres, series, x_range=(-1100.0, 0.0), x_label="HU",
                          y_label="% of lung voxels", vline=(-950.0, "\u2212950 HU"),
                          empty_text="no lung voxels")


def render_html(report: dict[str, Any], image: CTVolume, labels: CTVolume) -> str:
    qc = report.get("qc") or {}
    look = qc.get("slice") if qc.get("verdict") == "review" else None
    images = {
        "axial": png_data_uri(overlay_montage(image, labels, view="axial", n=6,
                                              highlight=look)),
        "coronal": png_data_uri(overlay_montage(image, labels, view="coronal", n=3)),
        "histogram": svg_data_uri(_histogram_svg(report)),
    }
    return str(environment().get_template("study.html.j2").render(
        r=report, images=images, labels=_LABELS))


def render_study_files(report: dict[str, Any], image: CTVolume, labels: CTVolume
                       ) -> dict[str, str]:
    """The texts of ``report.json``, ``report.html`` and ``report.csv``, in memory."""
    return {"report.json": json.dumps(to_jsonable(report), indent=2) + "\n",
            "report.html": render_html(report, image, labels),
            "report.csv": csv_text([csv_row(report)])}


def write_study_report(report: dict[str, Any], image: CTVolume, labels: CTVolume,
                       out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.html`` and ``report.csv`` into ``out_dir``: all are
    rendered in memory first, then each is written atomically."""
    files = render_study_files(report, image, labels)
    return write_files(Path(out_dir), files)


def write_files(out: Path, files: dict[str, str]) -> dict[str, Path]:
    return {name: write_text(out / name, text) for name, text in files.items()}
