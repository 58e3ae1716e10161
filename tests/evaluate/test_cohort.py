"""medseg.evaluate.cohort: failures stay visible in the summary statistics."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest

from medseg.errors import InputError
from medseg.evaluate import BinaryMetrics, CohortAccumulator, MetricSummary, label_metrics

INF = math.inf


def _case(dice: float, hd95: float) -> dict[str, float]:
    return {
        "dice": dice,
        "iou": dice / (2 - dice),
        "hd": hd95 * 2,
        "hd95": hd95,
        "assd": hd95 / 3,
        "nsd": dice,
        "volume_diff_ml": 10 * (1 - dice),
    }


def five_cases() -> CohortAccumulator:
    """Five cases; case-3 has an empty left-lung prediction (Dice 0, infinite distances)."""
    acc = CohortAccumulator(n_bootstrap=500, seed=1)
    dices = [0.97, 0.95, 0.0, 0.96, 0.93]
    for i, d in enumerate(dices):
        left = _case(d, 2.0 + i) if d > 0 else _case(0.0, INF)
        acc.add(f"case-{i + 1}" if i != 2 else "case-3", {"right": _case(0.98, 1.5), "left": left})
    return acc


def test_failed_case_counted_and_not_dropped() -> None:
    acc = five_cases()
    s = acc.summary()
    left = s["left"]
    assert isinstance(left["dice"], MetricSummary)
    assert {m.n for m in left.values()} == {5}
    assert {m.n_failed for m in left.values()} == {1}
    assert s["right"]["dice"].n_failed == 0
    # the missed lung's Dice 0 is in the mean
    assert left["dice"].mean == pytest.approx((0.97 + 0.95 + 0.0 + 0.96 + 0.93) / 5)
    assert left["dice"].n_finite == 5
    # distances: statistics over the finite cases, and the count says one was infinite
    assert left["hd95"].n_finite == 4
    assert left["hd95"].mean == pytest.approx((2.0 + 3.0 + 5.0 + 6.0) / 4)
    assert left["hd95"].median == pytest.approx(4.0)
    assert left["hd95"].q1 == pytest.approx(2.75) and left["hd95"].q3 == pytest.approx(5.25)
    assert left["hd95"].sd == pytest.approx(np.std([2.0, 3.0, 5.0, 6.0], ddof=1))
    assert acc.failed("case-3", "left") and not acc.failed("case-1", "left")


def test_worst_cases_lists_the_failure_first() -> None:
    acc = five_cases()
    assert acc.worst_cases("left", "dice", n=2) == [("case-3", 0.0), ("case-5", 0.93)]
    assert acc.worst_cases("left", "hd95", n=2) == [("case-3", INF), ("case-5", 6.0)]
    assert acc.worst_cases("left", "volume_diff_ml", n=1) == [("case-3", 10.0)]
    assert len(acc.worst_cases("left", "dice", n=99)) == 5
    with pytest.raises(InputError, match="no case has label"):
        acc.worst_cases("heart")


def test_bootstrap_ci_is_deterministic_and_brackets_the_mean() -> None:
    a, b = five_cases().summary(), five_cases().summary()
    assert a == b
    dice = a["left"]["dice"]
    assert dice.ci95_low is not None and dice.ci95_high is not None and dice.mean is not None
    assert dice.ci95_low <= dice.mean <= dice.ci95_high
    assert dice.ci95_low >= 0.0  # the 0 of the failed case is resampled too
    # identical values: a zero-width interval
    r = a["right"]["dice"]
    assert (r.ci95_low, r.ci95_high, r.sd) == pytest.approx((0.98, 0.98, 0.0), abs=1e-12)


def test_bootstrap_matches_a_direct_computation() -> None:
    acc = CohortAccumulator(n_bootstrap=2000, seed=7)
    vals = [0.5, 0.9, 0.7, 0.8, 0.95, 0.6]
    for i, v in enumerate(vals):
        acc.add(str(i), {"lung": {"dice": v}})
    s = acc.summary()["lung"]["dice"]
    x = np.array(vals)
    idx = np.random.default_rng(7).integers(0, x.size, size=(2000, x.size))
    lo, hi = np.quantile(x[idx].mean(axis=1), [0.025, 0.975])
    assert (s.ci95_low, s.ci95_high) == pytest.approx((lo, hi))


def test_all_failed_and_single_case() -> None:
    acc = CohortAccumulator()
    acc.add("a", {"lung": _case(0.0, INF)})
    s = acc.summary()["lung"]
    assert s["hd95"].n_finite == 0 and s["hd95"].mean is None and s["hd95"].median is None
    assert s["dice"].mean == 0.0 and s["dice"].sd is None and s["dice"].ci95_low is None


def test_rows_for_csv_round_trip() -> None:
    acc = five_cases()
    rows = acc.rows()
    assert len(rows) == 10
    assert rows[0]["case_id"] == "case-1" and rows[0]["label"] == "right"
    failed = [r for r in rows if r["failed"]]
    assert [(r["case_id"], r["label"]) for r in failed] == [("case-3", "left")]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    back = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert float(back[5]["hd95"]) == INF
    srows = acc.summary_rows()
    assert len(srows) == 2 * 7
    assert srows[0]["label"] == "right" and srows[0]["metric"] == "dice"
    assert {"n", "n_failed", "n_finite", "mean", "ci95_low", "ci95_high"} <= set(srows[0])


def test_add_accepts_label_metrics_and_binary_metrics() -> None:
    ref = np.zeros((6, 10, 16), np.uint8)
    ref[1:5, 2:8, 2:7] = 1
    ref[1:5, 2:8, 9:14] = 2
    pred = np.where(ref == 2, 0, ref).astype(np.uint8)
    acc = CohortAccumulator(n_bootstrap=100)
    acc.add("x", label_metrics(pred, ref, (2.5, 0.7, 0.7)))
    acc.add("y", {"left": BinaryMetrics(0.9, 0.8, 3.0, 2.0, 1.0, 0.95, 1.0)})
    assert acc.labels() == ["right", "left", "lung"]
    assert acc.case_ids == ["x", "y"] and len(acc) == 2
    assert acc.summary()["left"]["dice"].n_failed == 1


def test_add_errors() -> None:
    acc = CohortAccumulator()
    acc.add("a", {"lung": {"dice": 1.0}})
    with pytest.raises(InputError, match="already added"):
        acc.add("a", {"lung": {"dice": 1.0}})
    with pytest.raises(InputError, match="NaN"):
        acc.add("b", {"lung": {"hd": math.nan}})
    with pytest.raises(InputError, match="no metrics"):
        acc.add("c", {})
    with pytest.raises(InputError, match="n_bootstrap"):
        CohortAccumulator(n_bootstrap=0)
