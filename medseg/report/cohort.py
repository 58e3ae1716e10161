"""The cohort validation report: ``cohort.html``, ``cohort_cases.csv`` (every case and label)
and ``cohort_summary.csv`` (per label and metric: n, failures, mean, SD, median, IQR,
bootstrap 95% CI). Cases are listed worst first (lowest Dice of both lungs together); a
failed case (a missed lung: Dice 0 or an infinite distance) is marked, never dropped. CSV
cells are escaped against formula injection (:mod:`medseg.report._csv`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg._version import __version__
from medseg.evaluate import CohortAccumulator
from medseg.io.atomic import write_text
from medseg.report._csv import csv_text
from medseg.report._render import environment, figure_png, png_data_uri, pyplot

__all__ = ["write_cohort_report"]

_BOX_METRICS = (("dice", "Dice"), ("hd95", "HD95 (mm)"), ("assd", "ASSD (mm)"),
                ("nsd", "NSD"))


def _box_plots(acc: CohortAccumulator, labels: list[str]) -> bytes:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(_BOX_METRICS), figsize=(11, 3.2))
    rows = acc.rows()
    for ax, (metric, title) in zip(axes, _BOX_METRICS, strict=True):
        data, names, n_inf = [], [], []
        for label in labels:
            vals = np.array([float(r[metric]) for r in rows if r["label"] == label
                             and metric in r])
            data.append(vals[np.isfinite(vals)])
            n_inf.append(int((~np.isfinite(vals)).sum()))
            names.append("both" if label == "lung" else label)
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names)
        for x, (vals, k) in enumerate(zip(data, n_inf, strict=True), start=1):
            ax.scatter(np.full(len(vals), x) + np.linspace(-0.08, 0.08, len(vals)), vals,
                       s=8, color="0.3", zorder=3)
            if k:
                ax.annotate(f"{k} failed (∞)", (x, 1.0), xycoords=("data", "axes fraction"),
                            ha="center", va="top", fontsize=7, color="#b00")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    return figure_png(fig)


def write_cohort_report(acc: CohortAccumulator, out_dir: str | Path, *,
                        title: str = "Cohort validation",
                        notes: dict[str, str] | None = None) -> dict[str, Path]:
    """Write the cohort report of ``acc`` into ``out_dir``. ``notes`` (case id -> text)
    are shown beside cases, e.g. why a prediction is missing."""
    out = Path(out_dir)
    if len(acc) == 0:
        from medseg.errors import InputError

        raise InputError("the cohort is empty: no case to report")
    labels = acc.labels()
    order_label = "lung" if "lung" in labels else labels[0]
    worst = [cid for cid, _ in acc.worst_cases(order_label, "dice", n=len(acc))]
    rows_by_case: dict[str, dict[str, dict[str, Any]]] = {}
    for r in acc.rows():
        rows_by_case.setdefault(str(r["case_id"]), {})[str(r["label"])] = r
    cases = [{"id": cid, "labels": rows_by_case[cid],
              "failed": any(bool(v["failed"]) for v in rows_by_case[cid].values()),
              "note": (notes or {}).get(cid, "")} for cid in worst]
    summary = acc.summary()
    html = environment().get_template("cohort.html.j2").render(
        title=title, version=__version__, n=len(acc), labels=labels, cases=cases,
        summary=summary, metrics=[m for m in ("dice", "iou", "hd", "hd95", "assd", "nsd",
                                              "volume_diff_ml")
                                  if m in summary[order_label]],
        n_failed={lab: max(s.n_failed for s in summary[lab].values()) for lab in labels},
        boxplot=png_data_uri(_box_plots(acc, labels)))
    case_rows = [dict(r, note=(notes or {}).get(str(r["case_id"]), "")) for r in acc.rows()]
    return {"html": write_text(out / "cohort.html", html),
            "cases_csv": write_text(out / "cohort_cases.csv", csv_text(case_rows)),
            "summary_csv": write_text(out / "cohort_summary.csv",
                                      csv_text(acc.summary_rows()))}
