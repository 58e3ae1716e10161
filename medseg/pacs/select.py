"""Which series of a study to segment, from QIDO-RS attributes alone (nothing is
downloaded to decide).

A chest CT study usually holds a localizer, one or more axial reconstructions (thin and
thick, soft-tissue and lung kernels), coronal/sagittal reformats, MIPs, dose reports and
secondary captures. The rules of :class:`~medseg.pacs.options.SelectionRules` keep the
original axial CT series and prefer the thinnest slices (the most detail for the lung
boundary), then the most instances (the longest coverage). A study where nothing is
eligible is a :class:`~medseg.errors.SeriesSelectionError` that says, for each series,
why it was rejected: the user can then pick one by UID or relax a rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from medseg.errors import SeriesSelectionError
from medseg.pacs.client import SeriesRecord
from medseg.pacs.options import SelectionRules

__all__ = ["Choice", "choose_series", "rejection_reason", "tilt_deg"]


@dataclass(frozen=True)
class Choice:
    """The chosen series, and ``(series, reason)`` for each rejected one."""

    series: SeriesRecord
    rejected: tuple[tuple[SeriesRecord, str], ...]
    reason: str


def tilt_deg(orientation: Sequence[float]) -> float | None:
    """Angle in degrees between the slice normal (row x column cosines of
    ImageOrientationPatient) and the patient's head-feet (z) axis; ``None`` for a value
    that is not six numbers or has a degenerate normal."""
    if len(orientation) != 6:
        return None
    r, c = orientation[:3], orientation[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    if norm < 1e-6:
        return None
    return math.degrees(math.acos(min(1.0, abs(n[2]) / norm)))


def rejection_reason(rec: SeriesRecord, rules: SelectionRules) -> str | None:
    """Why ``rec`` is not eligible under ``rules``, or ``None`` when it is."""
    modality = (rec.modality or "").upper()
    if modality != rules.modality.upper():
        return f"modality {rec.modality or 'missing'}, not {rules.modality}"
    multiframe = (rec.n_frames or 1) > 1
    if rec.n_instances is not None and rec.n_instances < rules.min_instances and \
            not multiframe:
        return (f"{rec.n_instances} instance(s): a localizer or single image, not a volume "
                f"(at least {rules.min_instances} needed)")
    if rules.image_type:
        if rec.image_type is None:
            return (f"no ImageType (the rules require {'/'.join(rules.image_type)}; accept "
                    "any with --image-type any)")
        head = tuple(rec.image_type[: len(rules.image_type)])
        if head != tuple(v.upper() for v in rules.image_type):
            return (f"ImageType {'/'.join(rec.image_type)}, not "
                    f"{'/'.join(rules.image_type)} (derived, reformatted or secondary)")
    if rules.axial:
        if rec.orientation is None:
            return "no ImageOrientationPatient: cannot tell whether it is axial"
        tilt = tilt_deg(rec.orientation)
        if tilt is None:
            return f"invalid ImageOrientationPatient {list(rec.orientation)}"
        if tilt > rules.max_tilt_deg:
            return (f"not axial: the slice normal is {tilt:.0f} deg from the head-feet axis "
                    f"(at most {rules.max_tilt_deg:g}; a coronal/sagittal reformat?)")
    return None


def _rank_key(rec: SeriesRecord) -> tuple[float, int, int, str]:
    thickness = rec.slice_thickness if rec.slice_thickness is not None else math.inf
    return (thickness, -(rec.n_instances or 0),
            rec.number if rec.number is not None else 1 << 30, rec.series_uid)


def choose_series(series: Sequence[SeriesRecord], rules: SelectionRules | None = None, *,
                  study: str = "") -> Choice:
    """The series to segment among ``series`` (one study's), by ``rules`` (see the module
    docstring); :class:`~medseg.errors.SeriesSelectionError` listing every series and why
    it was rejected when none qualifies."""
    rules = rules or SelectionRules()
    eligible: list[SeriesRecord] = []
    rejected: list[tuple[SeriesRecord, str]] = []
    for rec in series:
        why = rejection_reason(rec, rules)
        if why is None:
            eligible.append(rec)
        else:
            rejected.append((rec, why))
    label = f"study {study}" if study else "the study"
    if not series:
        raise SeriesSelectionError(f"{label} has no series")
    if not eligible:
        details = "; ".join(f"series {r.series_uid} (#{r.number}, {r.modality}): {why}"
                            for r, why in rejected)
        raise SeriesSelectionError(f"{label} has no eligible {rules.modality} series: "
                                   f"{details}")
    eligible.sort(key=_rank_key)
    best = eligible[0]
    thickness = (f"{best.slice_thickness:g} mm slices" if best.slice_thickness is not None
                 else "slice thickness unknown")
    orient = "axial" if rules.axial else "any orientation"
    reason = (f"{rules.modality}, {orient}, {'/'.join(best.image_type or ('?',))}, {thickness}, "
              f"{best.n_instances} instances; the best of {len(eligible)} eligible of "
              f"{len(series)} series")
    return Choice(series=best, rejected=tuple(rejected) +
                  tuple((r, "eligible, but thicker slices or fewer instances")
                        for r in eligible[1:]), reason=reason)
