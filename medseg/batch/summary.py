"""The cohort outputs of a batch: ``OUT_DIR/summary.csv`` (one row per study, failures
included, with their reason) and, when studies have references, the cohort validation
report in ``OUT_DIR/validation/`` (``cohort.html``, ``cohort_cases.csv``,
``cohort_summary.csv``, as ``medseg evaluate --pred-dir`` writes).

The validation follows :func:`medseg.validation.evaluate_cohort`'s rules: a study that
failed is scored as an empty prediction (a missed lung: Dice 0, infinite distances) with the
reason in the case's note, so failures count in the statistics instead of dropping out.
The metrics of a segmented study are read back from its ``report.json``, which the worker
computed with the same function (:func:`medseg.evaluate.label_metrics`) on the same arrays:
nothing is recomputed, so the validation of a 1000-study cohort costs seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.batch.state import StudyRow
from medseg.errors import MedsegError

__all__ = ["SUMMARY_COLUMNS", "Validation", "summary_rows", "write_summary",
           "write_validation"]

SUMMARY_COLUMNS = ("study_id", "status", "qc_verdict", "qc_reasons", "attempts", "source",
                   "reference", "right_ml",
                   "left_ml", "total_ml", "lung_dice", "right_dice", "left_dice",
                   "n_warnings", "warnings", "seconds", "started_at", "finished_at", "worker",
                   "error_kind", "error_type", "error_message")


def summary_rows(rows: list[StudyRow]) -> list[dict[str, Any]]:
    """Flat dicts with :data:`SUMMARY_COLUMNS` (empty strings where a value is missing).
    Studies to look at come first: failed ones, then those whose QC verdict is ``review``,
    then the rest, each group in the given order."""
    out = []
    for r in sorted(rows, key=_look_first):
        vols = r.result.get("volumes_ml") or {}
        dice = r.result.get("dice") or {}
        warnings = r.result.get("warnings") or []
        failed = r.status != "done"
        out.append({
            "study_id": r.study_id, "status": r.status,
            "qc_verdict": "" if failed else (r.result.get("qc_verdict") or ""),
            "qc_reasons": "" if failed else "; ".join(r.result.get("qc_reasons") or []),
            "attempts": r.attempts,
            "source": r.source, "reference": r.reference or "",
            "right_ml": vols.get("right", ""), "left_ml": vols.get("left", ""),
            "total_ml": vols.get("total", ""),
            "lung_dice": dice.get("lung", ""), "right_dice": dice.get("right", ""),
            "left_dice": dice.get("left", ""),
            "n_warnings": "" if failed else len(warnings), "warnings": "; ".join(warnings),
            "seconds": "" if r.seconds is None else r.seconds,
            "started_at": r.started_at or "", "finished_at": r.finished_at or "",
            "worker": r.worker or "",
            "error_kind": (r.error_kind or "") if failed else "",
            "error_type": (r.error_type or "") if failed else "",
            "error_message": (r.error_message or "") if failed else "",
        })
    return out


def _look_first(r: StudyRow) -> int:
    if r.status != "done":
        return 0
    return 1 if r.result.get("qc_verdict") == "review" else 2


def write_summary(out: Path, rows: list[StudyRow]) -> Path:
    """Write ``out/summary.csv`` atomically."""
    from medseg.io.atomic import write_text
    from medseg.report import csv_text

    # csv_text escapes cells against formula injection (a study id "=..." stays text)
    return write_text(out / "summary.csv", csv_text(summary_rows(rows), SUMMARY_COLUMNS))


@dataclass
class Validation:
    """The cohort validation of a batch: the accumulator (for printing statistics), the
    notes per case and the files written."""

    accumulator: Any
    notes: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)


def _report_metrics(folder: Path) -> dict[str, dict[str, float]] | None:
    try:
        data = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    metrics = data.get("metrics")
    if not metrics:
        return None
    # report.json writes an infinite distance as the string "inf"; float() reads it back
    return {label: {k: float(v) for k, v in m.items() if v is not None}
            for label, m in metrics.items()}


def write_validation(out: Path, rows: list[StudyRow], log: Callable[[str], None], *,
                     reference_labels: str = "auto") -> Validation | None:
    """Score the studies that have a reference and write ``out/validation/``; ``None`` when
    no study has one."""
    from medseg.evaluate import CohortAccumulator, score_label_maps
    from medseg.report import write_cohort_report
    from medseg.validation import read_labels

    with_ref = [r for r in rows if r.reference]
    if not with_ref:
        return None
    acc = CohortAccumulator()
    notes: dict[str, str] = {}
    for r in with_ref:
        metrics = _report_metrics(out / r.study_id) if r.status == "done" else None
        if metrics is None:
            try:
                ref = read_labels(Path(r.reference or ""))
                metrics = score_label_maps(np.zeros(ref.shape, np.uint8), ref.array,
                                           ref.spacing[::-1], ref_path=r.reference,
                                           ref_labels=reference_labels).metrics
            except MedsegError as exc:
                log(f"{r.study_id}: not in the validation report: its reference cannot be "
                    f"used: {exc}")
                continue
            reason = (f"{r.error_type}: {r.error_message}" if r.status != "done"
                      else "no metrics in report.json")
            notes[r.study_id] = f"scored as an empty prediction: segmentation failed: {reason}"
        acc.add(r.study_id, metrics)
    if len(acc) == 0:
        return None
    outputs = write_cohort_report(acc, out / "validation", title="Batch validation",
                                  notes=notes)
    return Validation(accumulator=acc, notes=notes, outputs=outputs)
