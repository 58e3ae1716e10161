"""Evaluation: segmentation metrics in physical units and cohort statistics.

``metrics`` holds pure functions on masks and label maps (spacing in array axis order, mm);
``cohort`` aggregates per-case metrics into summary statistics that keep failures visible.
See ``docs/concepts/metrics.md``.
"""

from __future__ import annotations

from medseg.evaluate.cohort import CohortAccumulator, MetricSummary
from medseg.evaluate.metrics import (
    DEFAULT_NSD_TOLERANCE_MM,
    LUNG_LABELS,
    METRIC_NAMES,
    BinaryMetrics,
    SurfaceMetrics,
    assd,
    binary_metrics,
    dice,
    hausdorff,
    hd95,
    iou,
    label_metrics,
    nsd,
    surface_metrics,
    to_jsonable,
    volume_diff_ml,
)

__all__ = [
    "DEFAULT_NSD_TOLERANCE_MM",
    "LUNG_LABELS",
    "METRIC_NAMES",
    "BinaryMetrics",
    "CohortAccumulator",
    "MetricSummary",
    "SurfaceMetrics",
    "assd",
    "binary_metrics",
    "dice",
    "hausdorff",
    "hd95",
    "iou",
    "label_metrics",
    "nsd",
    "surface_metrics",
    "to_jsonable",
    "volume_diff_ml",
]
