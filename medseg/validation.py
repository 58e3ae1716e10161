"""Validation of label maps against references, from files: one pair, or a cohort of pairs
matched by name. Grids must be the same in world space (else a clear error says how they
differ); each map is read through its label convention (``pred_labels``, default
``right=1,left=2``; ``ref_labels``, default ``auto``: see :mod:`medseg.evaluate.labels`), so a
binary, 255 or CIP reference is never mis-scored silently; metrics come from
:mod:`medseg.evaluate`, reports from :mod:`medseg.report`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.conventions import LABEL_SUFFIXES, MASK_NAME
from medseg.errors import GeometryError, MedsegError, NotFoundError
from medseg.evaluate import CohortAccumulator
from medseg.evaluate.labels import (
    DEFAULT_PRED_LABELS,
    DEFAULT_REF_LABELS,
    LabelConvention,
    LabelScore,
    ResolvedLabels,
    as_label_array,
    resolve_labels,
    score_resolved,
)
from medseg.io import load
from medseg.io.atomic import split_suffix
from medseg.volume import CTVolume

__all__ = ["CohortResult", "evaluate_cohort", "evaluate_pair", "match_pairs"]

#: Suffixes of the label files matched by name in a cohort.
VOLUME_SUFFIXES = LABEL_SUFFIXES
#: The options that set the conventions, named in messages (the CLI passes its flags).
PY_FLAGS = ("pred_labels=", "ref_labels=")


def read_labels(path: Path) -> CTVolume:
    """A label volume, its values checked to be integer labels (named after ``path``)."""
    vol = load(path)
    return vol.with_array(as_label_array(vol.array, path=path))


def _check_grids(pred: CTVolume, ref: CTVolume) -> None:
    if not pred.same_grid(ref, atol_mm=1e-3):
        raise GeometryError("prediction and reference grids differ: "
                            + pred.grid_difference(ref), path=pred.metadata.source_path)


def _resolve(vol: CTVolume, conv: LabelConvention, role: str, path: Path,
             flag: str) -> ResolvedLabels:
    return resolve_labels(vol.array, conv, role=role, path=path, flag=flag)


def evaluate_pair(pred_path: str | Path, ref_path: str | Path, *,
                  pred_labels: str | LabelConvention = DEFAULT_PRED_LABELS,
                  ref_labels: str | LabelConvention = DEFAULT_REF_LABELS,
                  flags: tuple[str, str] = PY_FLAGS) -> dict[str, Any]:
    """Metrics of one prediction against its reference, each read through its label
    convention. Returns ``{"pred", "ref", "labels": {"pred", "ref"}, "metrics", "notes"}``:
    ``labels`` are the conventions applied (``auto`` resolved), ``metrics`` has right, left
    and lung, or only lung when a map has no sides (``notes`` say so). A value outside a
    convention raises :class:`~medseg.errors.InputError` naming the file and the values."""
    p_conv = LabelConvention.parse(pred_labels)
    r_conv = LabelConvention.parse(ref_labels)
    pred_path, ref_path = Path(pred_path), Path(ref_path)
    pred, ref = read_labels(pred_path), read_labels(ref_path)
    _check_grids(pred, ref)
    p = _resolve(pred, p_conv, "prediction", pred_path, flags[0])
    r = _resolve(ref, r_conv, "reference", ref_path, flags[1])
    score = score_resolved(p, r, pred.spacing[::-1], pred_flag=flags[0])
    return {"pred": str(pred_path), "ref": str(ref_path),
            "labels": {"pred": score.pred_labels, "ref": score.ref_labels},
            "metrics": score.metrics, "notes": list(score.notes)}


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
        return [c for c in acc.case_ids if any(acc.failed(c, lab)
                                                for lab in acc.case_labels(c))]


def evaluate_cohort(pred_dir: str | Path, ref_dir: str | Path, out_dir: str | Path | None,
                    *, title: str = "Cohort validation",
                    pred_labels: str | LabelConvention = DEFAULT_PRED_LABELS,
                    ref_labels: str | LabelConvention = DEFAULT_REF_LABELS,
                    flags: tuple[str, str] = PY_FLAGS) -> CohortResult:
    """Every reference in ``ref_dir`` scored against its prediction; a missing or unusable
    prediction (unreadable, on another grid, or holding values ``pred_labels`` does not
    name) is scored as an empty mask (a failure, with the reason in the notes), so it
    counts in the statistics. A reference holding values ``ref_labels`` does not name is
    an error of the run (:class:`~medseg.errors.InputError` naming it): the convention must
    be given. Notes also say when a case was scored as ``lung`` only. Writes the cohort
    report into ``out_dir`` if given."""
    from medseg.report import write_cohort_report

    p_conv = LabelConvention.parse(pred_labels)
    r_conv = LabelConvention.parse(ref_labels)
    pairs, unmatched = match_pairs(Path(pred_dir), Path(ref_dir))
    result = CohortResult(CohortAccumulator(), unmatched_predictions=unmatched)
    for cid, (pred_path, ref_path) in pairs.items():
        ref = read_labels(ref_path)
        r = _resolve(ref, r_conv, "reference", ref_path, flags[1])
        notes: list[str] = []
        try:
            if pred_path is None:
                raise NotFoundError("no prediction for this reference", path=Path(pred_dir))
            pred = read_labels(pred_path)
            _check_grids(pred, ref)
            score: LabelScore = score_resolved(
                _resolve(pred, p_conv, "prediction", pred_path, flags[0]), r,
                pred.spacing[::-1], pred_flag=flags[0])
        except MedsegError as exc:
            notes.append(f"scored as an empty prediction: {exc}")
            empty = resolve_labels(np.zeros(ref.shape, np.uint8), p_conv, role="prediction")
            score = score_resolved(empty, r, ref.spacing[::-1], pred_flag=flags[0])
        notes.extend(n for n in score.notes if n not in notes)
        if notes:
            result.notes[cid] = "; ".join(notes)
        result.accumulator.add(cid, score.metrics)
    if out_dir is not None:
        result.outputs = write_cohort_report(result.accumulator, out_dir, title=title,
                                             notes=result.notes)
    return result
