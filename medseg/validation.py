"""Validation of label maps against references, from files: one pair, or a cohort of pairs
matched by name. Grids must be the same in world space (else a clear error says how they
differ); metrics come from :mod:`medseg.evaluate`, reports from :mod:`medseg.report`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import GeometryError, InputError, MedsegError, NotFoundError
from medseg.evaluate import CohortAccumulator, label_metrics
from medseg.io import load
from medseg.io._atomic import split_suffix
from medseg.volume import CTVolume

__all__ = ["CohortResult", "evaluate_cohort", "evaluate_pair", "match_pairs"]

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: What ``medseg segment`` / ``medseg batch`` write in each study folder.
MASK_NAME = "lungs.nii.gz"


def _labels(path: Path) -> CTVolume:
    vol = load(path)
    arr = vol.array
    if arr.dtype.kind == "f":
        if not np.array_equal(arr, np.round(arr)):
            raise InputError("not a label map: non-integer values", path=path)
        arr = arr.astype(np.int32)
    return vol.with_array(arr)


def metrics_on_same_grid(pred: CTVolume, ref: CTVolume) -> dict[str, dict[str, float]]:
    if not pred.same_grid(ref, atol_mm=1e-3):
        raise GeometryError("prediction and reference grids differ: "
                            + pred.grid_difference(ref), path=pred.metadata.source_path)
    return label_metrics(pred.array, ref.array, pred.spacing[::-1])


def evaluate_pair(pred_path: str | Path, ref_path: str | Path) -> dict[str, Any]:
    """Metrics of one prediction against its reference (labels 1 right, 2 left)."""
    pred, ref = _labels(Path(pred_path)), _labels(Path(ref_path))
    return {"pred": str(pred_path), "ref": str(ref_path),
            "metrics": metrics_on_same_grid(pred, ref)}


def _case_id(path: Path) -> str:
    return split_suffix(path)[0]


def match_pairs(pred_dir: Path, ref_dir: Path
                ) -> tuple[dict[str, tuple[Path | None, Path]], list[str]]:
    """``{case_id: (prediction or None, reference)}`` and the predictions without a
    reference. A reference ``REF_DIR/<id>.nii.gz`` (or .nii/.nrrd/.mha) matches a
    prediction ``PRED_DIR/<id>.<ext>`` or ``PRED_DIR/<id>/lungs.nii.gz``."""
    for d in (pred_dir, ref_dir):
        if not d.is_dir():
            raise NotFoundError("not a folder", path=d)
    refs = {_case_id(p): p for p in sorted(ref_dir.iterdir())
            if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)}
    if not refs:
        raise NotFoundError("no reference label files (.nii.gz, .nii, .nrrd, .mha)",
                            path=ref_dir)
    preds: dict[str, Path] = {}
    for p in sorted(pred_dir.iterdir()):
        if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES):
            preds[_case_id(p)] = p
        elif p.is_dir() and (p / MASK_NAME).is_file():
            preds[p.name] = p / MASK_NAME
    pairs = {cid: (preds.get(cid), ref) for cid, ref in refs.items()}
    return pairs, sorted(set(preds) - set(refs))


@dataclass
class CohortResult:
    accumulator: CohortAccumulator
    notes: dict[str, str] = field(default_factory=dict)
    unmatched_predictions: list[str] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        acc = self.accumulator
        return [c for c in acc.case_ids if any(acc.failed(c, lab) for lab in acc.labels())]


def evaluate_cohort(pred_dir: str | Path, ref_dir: str | Path, out_dir: str | Path | None,
                    *, title: str = "Cohort validation") -> CohortResult:
    """Every reference in ``ref_dir`` scored against its prediction; a missing or unusable
    prediction is scored as an empty mask (a failure, with the reason in the notes), so it
    counts in the statistics. Writes the cohort report into ``out_dir`` if given."""
    from medseg.report import write_cohort_report

    pairs, unmatched = match_pairs(Path(pred_dir), Path(ref_dir))
    result = CohortResult(CohortAccumulator(), unmatched_predictions=unmatched)
    for cid, (pred_path, ref_path) in pairs.items():
        ref = _labels(ref_path)
        try:
            if pred_path is None:
                raise NotFoundError("no prediction for this reference", path=Path(pred_dir))
            metrics = metrics_on_same_grid(_labels(pred_path), ref)
        except MedsegError as exc:
            result.notes[cid] = f"scored as an empty prediction: {exc}"
            metrics = label_metrics(np.zeros(ref.shape, np.uint8), ref.array,
                                    ref.spacing[::-1])
        result.accumulator.add(cid, metrics)
    if out_dir is not None:
        result.outputs = write_cohort_report(result.accumulator, out_dir, title=title,
                                             notes=result.notes)
    return result
