"""Cohort statistics of per-case segmentation metrics, keeping failures visible.

:class:`CohortAccumulator` collects ``{label: {metric: value}}`` per case (the output of
:func:`medseg.evaluate.label_metrics`) and summarises each metric of each label.

The failure rule
----------------
A case *fails* for a label when its Dice is 0 or any of its distances (``hd``, ``hd95``,
``assd``) is infinite (a missed or hallucinated structure; see the empty-mask rules in
:mod:`medseg.evaluate.metrics`). ``n_failed`` counts them and is reported with every metric
of the label.

Statistics rule: a failed case is never dropped silently.

* Overlap metrics (``dice``, ``iou``, ``nsd``) and ``volume_diff_ml`` are always finite: their
  statistics are over **all** cases, so a missed lung enters the mean Dice as 0.
* Distance metrics (``hd``, ``hd95``, ``assd``): their statistics (mean, sd, median,
  quartiles, CI) are over the cases where the distance is **finite**; ``n_finite`` says how
  many those are and ``n - n_finite`` cases had an infinite distance. Both counts travel
  with every summary, so a mean HD95 never hides a missed lung.

The bootstrap CI is the percentile interval of the mean over ``n_bootstrap`` resamples (with
replacement) of the values used, drawn from ``numpy.random.default_rng(seed)`` re-seeded for
each summary: the same cohort always gives the same intervals. The module does no file I/O;
:meth:`CohortAccumulator.rows` and :meth:`CohortAccumulator.summary_rows` give flat dicts for
:class:`csv.DictWriter`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from medseg.errors import InputError
from medseg.evaluate.metrics import METRIC_NAMES, BinaryMetrics

__all__ = ["DISTANCE_METRICS", "HIGHER_IS_BETTER", "CohortAccumulator", "MetricSummary"]

#: Metrics in mm whose value is +inf when exactly one mask is empty.
DISTANCE_METRICS: Final = frozenset({"hd", "hd95", "assd"})
#: Metrics where a larger value is better; for the distances smaller is better, and for
#: ``volume_diff_ml`` a smaller absolute value is better.
HIGHER_IS_BETTER: Final = frozenset({"dice", "iou", "nsd"})

_CHUNK: Final = 4_000_000  # bootstrap values drawn per block, bounds memory


@dataclass(frozen=True)
class MetricSummary:
    """Summary of one metric of one label over the cohort.

    ``n``: cases with this label; ``n_failed``: of those, cases failed for the label;
    ``n_finite``: values the statistics are computed from (``n`` except for distances, where
    infinite values are left out). Statistics that cannot be computed are ``None``: all of
    them when ``n_finite`` is 0, ``sd`` and the CI when it is 1.
    """

    label: str
    metric: str
    n: int
    n_failed: int
    n_finite: int
    mean: float | None
    sd: float | None
    median: float | None
    q1: float | None
    q3: float | None
    ci95_low: float | None
    ci95_high: float | None


def _is_failed(values: Mapping[str, float]) -> bool:
    if values.get("dice") == 0.0:
        return True
    return any(math.isinf(values[m]) for m in DISTANCE_METRICS if m in values)


def _bootstrap_ci(
    x: npt.NDArray[np.float64], n_boot: int, seed: int, level: float
) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    per = max(1, _CHUNK // x.size)
    for start in range(0, n_boot, per):
        k = min(per, n_boot - start)
        idx = rng.integers(0, x.size, size=(k, x.size))
        means[start : start + k] = x[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


class CohortAccumulator:
    """Collects per-case, per-label metrics and summarises them.

    Parameters
    ----------
    n_bootstrap:
        Resamples for the bootstrap CI of the mean.
    seed:
        Seed of ``numpy.random.default_rng`` for the bootstrap (re-seeded per summary).
    """

    def __init__(self, *, n_bootstrap: int = 2000, seed: int = 0) -> None:
        if n_bootstrap < 1:
            raise InputError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
        self.n_bootstrap = n_bootstrap
        self.seed = seed
        self._cases: dict[str, dict[str, dict[str, float]]] = {}

    def add(
        self, case_id: str, metrics: Mapping[str, Mapping[str, float] | BinaryMetrics]
    ) -> None:
        """Record one case: ``{label: {metric: value}}`` (or ``{label: BinaryMetrics}``)."""
        if case_id in self._cases:
            raise InputError(f"case {case_id!r} was already added")
        if not metrics:
            raise InputError(f"case {case_id!r} has no metrics")
        case: dict[str, dict[str, float]] = {}
        for label, vals in metrics.items():
            raw = vals.as_dict() if isinstance(vals, BinaryMetrics) else vals
            clean: dict[str, float] = {}
            for name, v in raw.items():
                f = float(v)
                if math.isnan(f):
                    raise InputError(
                        f"case {case_id!r}, label {label!r}: {name} is NaN; medseg metrics "
                        "are never NaN (empty masks give 0/1 or inf)"
                    )
                clean[str(name)] = f
            case[str(label)] = clean
        self._cases[case_id] = case

    def __len__(self) -> int:
        return len(self._cases)

    @property
    def case_ids(self) -> list[str]:
        """Case ids in the order they were added."""
        return list(self._cases)

    def labels(self) -> list[str]:
        """Labels seen, in first-seen order."""
        seen: dict[str, None] = {}
        for case in self._cases.values():
            for label in case:
                seen.setdefault(label, None)
        return list(seen)

    def _metric_names(self, label: str) -> list[str]:
        names: dict[str, None] = {m: None for m in METRIC_NAMES}
        found: dict[str, None] = {}
        for case in self._cases.values():
            for m in case.get(label, {}):
                found.setdefault(m, None)
        ordered = [m for m in names if m in found]
        return ordered + [m for m in found if m not in names]

    def case_labels(self, case_id: str) -> list[str]:
        """The labels scored for ``case_id`` (a case scored as "lung" only has no sides)."""
        return list(self._cases[case_id])

    def failed(self, case_id: str, label: str) -> bool:
        """Whether ``case_id`` failed for ``label`` (Dice 0 or an infinite distance)."""
        return _is_failed(self._cases[case_id][label])

    def summary(self) -> dict[str, dict[str, MetricSummary]]:
        """``{label: {metric: MetricSummary}}``; see the module doc for the rules."""
        out: dict[str, dict[str, MetricSummary]] = {}
        for label in self.labels():
            cases = [c[label] for c in self._cases.values() if label in c]
            n_failed = sum(_is_failed(c) for c in cases)
            out[label] = {}
            for metric in self._metric_names(label):
                vals = np.array([c[metric] for c in cases if metric in c], dtype=np.float64)
                out[label][metric] = self._summarise(label, metric, vals, n_failed)
        return out

    def _summarise(
        self, label: str, metric: str, vals: npt.NDArray[np.float64], n_failed: int
    ) -> MetricSummary:
        finite = vals[np.isfinite(vals)]
        m = finite.size
        mean = sd = median = q1 = q3 = lo = hi = None
        if m >= 1:
            mean = float(finite.mean())
            median = float(np.median(finite))
            q1, q3 = (float(q) for q in np.quantile(finite, [0.25, 0.75]))
        if m >= 2:
            sd = float(finite.std(ddof=1))
            lo, hi = _bootstrap_ci(finite, self.n_bootstrap, self.seed, 0.95)
        return MetricSummary(
            label=label,
            metric=metric,
            n=int(vals.size),
            n_failed=n_failed,
            n_finite=int(m),
            mean=mean,
            sd=sd,
            median=median,
            q1=q1,
            q3=q3,
            ci95_low=lo,
            ci95_high=hi,
        )

    def worst_cases(self, label: str, metric: str = "dice", n: int = 5) -> list[tuple[str, float]]:
        """The ``n`` worst ``(case_id, value)`` for ``metric`` of ``label``, worst first.

        Worst is the lowest value for dice/iou/nsd, the highest (``inf`` first) for the
        distances and any other metric, the largest absolute value for ``volume_diff_ml``.
        Ties keep the order in which cases were added.
        """
        items = [
            (cid, c[label][metric])
            for cid, c in self._cases.items()
            if label in c and metric in c[label]
        ]
        if not items and label not in self.labels():
            raise InputError(f"no case has label {label!r}; labels: {self.labels()}")
        if metric in HIGHER_IS_BETTER:
            items.sort(key=lambda it: it[1])
        elif metric == "volume_diff_ml":
            items.sort(key=lambda it: -abs(it[1]))
        else:
            items.sort(key=lambda it: -it[1])
        return items[: max(0, n)]

    def rows(self) -> list[dict[str, str | float | bool]]:
        """One flat dict per (case, label): ``case_id``, ``label``, the metrics, ``failed``.

        Infinite distances stay ``float("inf")``; :mod:`csv` writes them as ``inf``, which
        ``float()`` reads back.
        """
        out: list[dict[str, str | float | bool]] = []
        for cid, case in self._cases.items():
            for label, vals in case.items():
                row: dict[str, str | float | bool] = {"case_id": cid, "label": label}
                row.update(vals)
                row["failed"] = _is_failed(vals)
                out.append(row)
        return out

    def summary_rows(self) -> list[dict[str, str | int | float | None]]:
        """:meth:`summary` flattened: one dict per (label, metric), for CSV."""
        return [asdict(s) for per in self.summary().values() for s in per.values()]
