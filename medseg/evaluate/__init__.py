"""Evaluation: segmentation metrics in physical units and cohort statistics.

``metrics`` holds pure functions on masks and label maps (spacing in array axis order, mm);
``cohort`` aggregates per-case metrics into summary statistics that keep failures visible;
``labels`` reads label maps through a stated label convention (right=1,left=2, lung=1,
lung=1-255, cip ...) and refuses values the convention does not name.
See ``docs/concepts/metrics.md``.
"""

from __future__ import annotations

from medseg.evaluate.cohort import CohortAccumulator, MetricSummary
from medseg.evaluate.labels import (
    DEFAULT_PRED_LABELS,
    DEFAULT_REF_LABELS,
    LabelConvention,
    LabelScore,
    ResolvedLabels,
    resolve_labels,
    score_label_maps,
)
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
    "DEFAULT_PRED_LABELS",
    "DEFAULT_REF_LABELS",
    "LUNG_LABELS",
    "METRIC_NAMES",
    "BinaryMetrics",
    "CohortAccumulator",
    "LabelConvention",
    "LabelScore",
    "MetricSummary",
    "ResolvedLabels",
    "SurfaceMetrics",
    "assd",
    "binary_metrics",
    "dice",
    "hausdorff",
    "hd95",
    "iou",
    "label_metrics",
    "nsd",
    "resolve_labels",
    "score_label_maps",
    "surface_metrics",
    "to_jsonable",
    "volume_diff_ml",
]
