"""Segmentation metrics in physical units (millimetres, millilitres).

All functions are pure and take masks as NumPy arrays plus the voxel ``spacing`` **in array
axis order**: one positive float per array axis, in millimetres. medseg arrays are indexed
``(z, y, x)``, so a chest CT with 0.7 mm pixels and 2.5 mm slices has ``spacing=(2.5, 0.7,
0.7)``. :class:`medseg.CTVolume` stores its spacing in index order ``(sx, sy, sz)``; pass
``volume.spacing[::-1]``.

Definitions (``docs/concepts/metrics.md`` has the details and the comparison with MONAI,
DeepMind's ``surface-distance`` and ITK):

* **Surface** of a mask: its border voxels, i.e. voxels in the mask with at least one
  face neighbour (6-connectivity in 3D, 4 in 2D, ``2*ndim`` in general) outside it. Voxels
  outside the array count as outside, so a mask touching the array edge has a closed surface.
* Distances are Euclidean between voxel centres, in mm (``spacing`` applied per axis), from
  each border voxel of one mask to the nearest border voxel of the other; computed exactly
  with a KD-tree over the border voxels (see the doc for the measurement that chose it).
* ``hd``: the largest of all those distances (both directions), the Hausdorff distance.
* ``hd95``: the larger of the two *directed* 95th percentiles (linear interpolation), as
  MONAI's ``compute_hausdorff_distance(percentile=95)``.
* ``assd``: the mean over the union of both directed distance sets (each border voxel
  counts once), as MONAI's ``compute_average_surface_distance(symmetric=True)``.
* ``nsd``: normalised surface distance (surface Dice) at tolerance ``tau``: the number of
  border voxels of either mask within ``tau`` of the other surface, over the number of border
  voxels of both; voxel-counted, as MONAI's ``compute_surface_dice(use_subvoxels=False)``.
* ``volume_diff_ml``: predicted minus reference volume, in mL.

Empty masks: both empty gives ``dice = iou = nsd = 1`` and all distances 0; exactly one empty
gives ``dice = iou = nsd = 0`` and ``hd = hd95 = assd = +inf`` (never NaN), so a missed
structure counts as a failure and cannot disappear from a mean. :func:`to_jsonable` turns
``inf`` into the string ``"inf"`` for JSON.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from medseg.errors import InputError

__all__ = [
    "DEFAULT_NSD_TOLERANCE_MM",
    "LUNG_LABELS",
    "METRIC_NAMES",
    "BinaryMetrics",
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

#: Default NSD tolerance in mm. A convention of this module, not a standard: state the
#: tolerance whenever an NSD is reported.
DEFAULT_NSD_TOLERANCE_MM: Final = 2.0

#: Label groups evaluated by :func:`label_metrics`: name -> label values forming the mask.
LUNG_LABELS: Final[Mapping[str, tuple[int, ...]]] = {
    "right": (1,),
    "left": (2,),
    "lung": (1, 2),
}

#: The keys of :meth:`BinaryMetrics.as_dict`, in this order.
METRIC_NAMES: Final = ("dice", "iou", "hd", "hd95", "assd", "nsd", "volume_diff_ml")

#: A distance d counts as within tolerance tau when d <= tau * (1 + _TIE_RTOL): distances
#: are computed in floating point from coordinates ``index * spacing``, so a distance that is
#: exactly tau in exact arithmetic may come out one ulp above it.
_TIE_RTOL: Final = 1e-9
#: Label maps whose values lie in [0, this) are scanned for their values with a bincount.
_BINCOUNT_LIMIT: Final = 1 << 20

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class SurfaceMetrics:
    """Distance metrics of one pair of masks, in mm (``nsd`` is a fraction in [0, 1])."""

    hd: float
    hd95: float
    assd: float
    nsd: float
    nsd_tolerance_mm: float


@dataclass(frozen=True)
class BinaryMetrics:
    """All metrics of one pair of masks. Distances in mm, volume difference in mL."""

    dice: float
    iou: float
    hd: float
    hd95: float
    assd: float
    nsd: float
    volume_diff_ml: float

    def as_dict(self) -> dict[str, float]:
        """The metrics as a plain dict with the keys of :data:`METRIC_NAMES`."""
        return {name: float(getattr(self, name)) for name in METRIC_NAMES}


# --------------------------------------------------------------------------- validation


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    try:
        sp = tuple(float(s) for s in spacing)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"spacing must be a sequence of {ndim} numbers (mm, array axis order), "
            f"got {spacing!r}"
        ) from exc
    if len(sp) != ndim:
        raise InputError(
            f"spacing has {len(sp)} values but the masks have {ndim} axes; give one spacing "
            f"per array axis, in array axis order (z, y, x for a CT volume), got {sp}"
        )
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise InputError(f"spacing must be finite and positive (mm), got {sp}")
    return sp


def _as_mask(x: Any, name: str) -> BoolArray:
    arr = np.asarray(x)
    if arr.dtype == np.bool_:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"{name} must be a boolean mask, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.integer):
        bad = arr.size > 0 and (int(arr.min()) < 0 or int(arr.max()) > 1)
    else:
        bad = arr.size > 0 and not bool(np.isin(arr, (0.0, 1.0)).all())
    if bad:
        raise InputError(
            f"{name} must be a boolean mask (values 0/1), got values outside {{0, 1}} "
            f"(dtype {arr.dtype}); for a label map use label_metrics or pass labels == k"
        )
    return arr.astype(bool)


def _prepare(
    pred: Any, ref: Any, spacing: Sequence[float]
) -> tuple[BoolArray, BoolArray, tuple[float, ...]]:
    a = _as_mask(pred, "pred")
    b = _as_mask(ref, "ref")
    if a.shape != b.shape:
        raise InputError(f"pred and ref must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim == 0:
        raise InputError("pred and ref must have at least one axis, got 0-d arrays")
    return a, b, _check_spacing(spacing, a.ndim)


def distinct_values(arr: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """The distinct values of an integer (or boolean) array, sorted, as int64.

    A count over the value range (``np.bincount``) where that range is small, which is
    several times faster than ``np.unique``'s sort on a whole CT label map.
    """
    a = np.asarray(arr)
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.dtype == np.bool_:
        a = a.view(np.uint8)
    lo, hi = int(a.min()), int(a.max())
    if lo >= 0 and hi < _BINCOUNT_LIMIT and a.dtype.itemsize <= 4:
        if lo == hi:
            return np.array([lo], np.int64)
        return np.flatnonzero(np.bincount(a.ravel(), minlength=hi + 1)).astype(np.int64)
    return np.unique(a).astype(np.int64)


def _check_label_values(name: str, arr: npt.NDArray[Any], allowed: set[int],
                        groups: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse a label map holding values no group names (they would score as background)."""
    if arr.size == 0:
        return
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi - lo <= 64 and all(v in allowed for v in range(lo, hi + 1)):
        return  # every value in [lo, hi] is named: no need to list them
    extra = [int(v) for v in distinct_values(arr) if int(v) not in allowed]
    if extra:
        shown = ", ".join(str(v) for v in extra[:16]) + (
            f", ... ({len(extra)} in all)" if len(extra) > 16 else "")
        raise InputError(
            f"{name} holds label value(s) {shown} that no label group names (groups "
            f"{dict(groups)}): they would be scored as background. Read the map through its "
            "label convention with medseg.evaluate.score_label_maps (e.g. ref_labels="
            "'lung=255' or 'cip'), or pass labels= naming every lung value")


# --------------------------------------------------------------------------- geometry


def _bbox(m: npt.NDArray[Any]) -> list[tuple[int, int]] | None:
    """Half-open bounding box of the non-zero voxels, or None when there are none.

    Each axis is found on the sub-array already restricted along the previous axes, so only
    the first projection reads the whole array.
    """
    box: list[tuple[int, int]] = []
    sub = m
    for ax in range(m.ndim):
        other = tuple(i for i in range(m.ndim) if i != ax)
        nz = np.flatnonzero(sub.any(axis=other)) if other else np.flatnonzero(sub)
        if nz.size == 0:
            return None
        lo, hi = int(nz[0]), int(nz[-1]) + 1
        box.append((lo, hi))
        idx: list[slice] = [slice(None)] * m.ndim
        idx[ax] = slice(lo, hi)
        sub = sub[tuple(idx)]
    return box


def _union_box(
    a: list[tuple[int, int]] | None, b: list[tuple[int, int]] | None
) -> list[tuple[int, int]] | None:
    if a is None:
        return b
    if b is None:
        return a
    return [(min(x[0], y[0]), max(x[1], y[1])) for x, y in zip(a, b, strict=True)]


def _crop_padded(m: npt.NDArray[Any], box: list[tuple[int, int]]) -> npt.NDArray[Any]:
    """``m`` cropped to ``box`` with one voxel of zeros around it on every side.

    The zero margin makes "outside the array" count as outside the mask, whether or not the
    mask touches the array edge.
    """
    out = np.zeros(tuple(hi - lo + 2 for lo, hi in box), dtype=m.dtype)
    out[tuple(slice(1, -1) for _ in box)] = m[tuple(slice(lo, hi) for lo, hi in box)]
    return out


def _border(m: BoolArray) -> BoolArray:
    """Border voxels of a mask that has a zero margin of one voxel on every side.

    A voxel is on the border when it is in the mask and at least one of its ``2*ndim`` face
    neighbours is not.
    """
    core = tuple(slice(1, -1) for _ in range(m.ndim))
    inner = m[core].copy()
    for ax in range(m.ndim):
        for sl in (slice(0, -2), slice(2, None)):
            idx = list(core)
            idx[ax] = sl
            inner &= m[tuple(idx)]
    border = m.copy()
    border[core] ^= inner  # inner is a subset of m: m & ~inner
    return border


def _points_mm(flat: npt.NDArray[np.intp], shape: tuple[int, ...], sp: FloatArray) -> FloatArray:
    """Coordinates in mm of voxels given by flat indices (flatnonzero + unravel_index is ~4x
    faster than argwhere on large crops)."""
    idx = np.unravel_index(flat, shape)
    pts = np.empty((flat.size, len(shape)), dtype=np.float64)
    for ax, ix in enumerate(idx):
        np.multiply(ix, sp[ax], out=pts[:, ax])
    return pts


def _surface_distances(
    a: BoolArray, b: BoolArray, spacing: tuple[float, ...]
) -> tuple[FloatArray, FloatArray]:
    """Directed distances ∂a -> ∂b and ∂b -> ∂a (mm) of two non-empty, padded masks.

    Exact Euclidean nearest-neighbour distances from a KD-tree over the border voxels of the
    other mask; border voxels shared by both masks have distance 0 and are not queried.
    """
    # imported here: scipy.spatial costs 0.16 s, and most commands that import the metrics
    # (segment's report, QC) never measure a surface distance
    from scipy.spatial import KDTree

    sp = np.asarray(spacing, dtype=np.float64)
    ba = _border(a).ravel()
    bb = _border(b).ravel()
    fa = np.flatnonzero(ba)
    fb = np.flatnonzero(bb)
    pa = _points_mm(fa, a.shape, sp)
    pb = _points_mm(fb, b.shape, sp)
    a_away = ~bb[fa]
    b_away = ~ba[fb]
    # balanced_tree/compact_nodes off: faster to build, and each tree serves one batch query.
    opts: dict[str, Any] = {"leafsize": 32, "balanced_tree": False, "compact_nodes": False}
    d_ab = np.zeros(fa.size, dtype=np.float64)
    d_ba = np.zeros(fb.size, dtype=np.float64)
    if a_away.any():
        d_ab[a_away] = KDTree(pb, **opts).query(pa[a_away], k=1, workers=-1)[0]
    if b_away.any():
        d_ba[b_away] = KDTree(pa, **opts).query(pb[b_away], k=1, workers=-1)[0]
    return d_ab, d_ba


def _surface_from_distances(d_ab: FloatArray, d_ba: FloatArray, tol: float) -> SurfaceMetrics:
    n = d_ab.size + d_ba.size
    limit = tol * (1.0 + _TIE_RTOL)
    within = np.count_nonzero(d_ab <= limit) + np.count_nonzero(d_ba <= limit)
    return SurfaceMetrics(
        hd=float(max(d_ab.max(), d_ba.max())),
        hd95=float(max(np.percentile(d_ab, 95.0), np.percentile(d_ba, 95.0))),
        assd=float((d_ab.sum() + d_ba.sum()) / n),
        nsd=float(within / n),
        nsd_tolerance_mm=tol,
    )


def _check_tolerance(tol: float) -> float:
    t = float(tol)
    if not (math.isfinite(t) and t >= 0):
        raise InputError(f"NSD tolerance must be a finite number >= 0 (mm), got {tol!r}")
    return t


def _metrics_prepared(
    a: BoolArray, b: BoolArray, spacing: tuple[float, ...], tol: float, *, surface: bool
) -> tuple[int, int, int, SurfaceMetrics | None]:
    """(|a|, |b|, |a & b|, surface metrics or None when not asked) of validated masks."""
    box = _union_box(_bbox(a), _bbox(b))
    if box is None:
        sm = SurfaceMetrics(0.0, 0.0, 0.0, 1.0, tol) if surface else None
        return 0, 0, 0, sm
    ca = _crop_padded(a, box)
    cb = _crop_padded(b, box)
    na = int(np.count_nonzero(ca))
    nb = int(np.count_nonzero(cb))
    inter = int(np.count_nonzero(ca & cb))
    if not surface:
        return na, nb, inter, None
    if na == 0 or nb == 0:
        inf = math.inf
        return na, nb, inter, SurfaceMetrics(inf, inf, inf, 0.0, tol)
    d_ab, d_ba = _surface_distances(ca, cb, spacing)
    return na, nb, inter, _surface_from_distances(d_ab, d_ba, tol)


def _overlap(na: int, nb: int, inter: int) -> tuple[float, float]:
    if na + nb == 0:
        return 1.0, 1.0
    return 2.0 * inter / (na + nb), inter / (na + nb - inter)


# --------------------------------------------------------------------------- public API


def surface_metrics(
    pred: Any,
    ref: Any,
    spacing: Sequence[float],
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
) -> SurfaceMetrics:
    """HD, HD95, ASSD and NSD of two masks from one computation of the surface distances.

    Cheaper than calling :func:`hausdorff`, :func:`hd95`, :func:`assd` and :func:`nsd`
    separately: the cost is in the distances, computed here once.

    Parameters
    ----------
    pred, ref:
        Boolean masks (or 0/1 arrays) of the same shape.
    spacing:
        Voxel size in mm, one value per array axis, **in array axis order** (``(sz, sy, sx)``
        for a ``(z, y, x)`` volume).
    nsd_tolerance_mm:
        The NSD tolerance ``tau`` in mm; a distance ``d <= tau`` counts as within.
    """
    a, b, sp = _prepare(pred, ref, spacing)
    tol = _check_tolerance(nsd_tolerance_mm)
    sm = _metrics_prepared(a, b, sp, tol, surface=True)[3]
    assert sm is not None
    return sm


def hausdorff(pred: Any, ref: Any, spacing: Sequence[float]) -> float:
    """Hausdorff distance (the maximum, both directions) in mm. See :func:`surface_metrics`."""
    return surface_metrics(pred, ref, spacing).hd


def hd95(pred: Any, ref: Any, spacing: Sequence[float]) -> float:
    """Max of the two directed 95th-percentile surface distances, mm (MONAI's definition)."""
    return surface_metrics(pred, ref, spacing).hd95


def assd(pred: Any, ref: Any, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance in mm: mean over both directed distance sets."""
    return surface_metrics(pred, ref, spacing).assd


def nsd(
    pred: Any, ref: Any, spacing: Sequence[float], tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM
) -> float:
    """Normalised surface distance (surface Dice) at ``tolerance_mm``, voxel-counted."""
    return surface_metrics(pred, ref, spacing, tolerance_mm).nsd


def dice(pred: Any, ref: Any) -> float:
    """Dice coefficient ``2|A∩B| / (|A|+|B|)``; 1.0 when both masks are empty."""
    a, b, _ = _prepare(pred, ref, (1.0,) * np.ndim(pred))
    na, nb, inter, _sm = _metrics_prepared(a, b, (), 0.0, surface=False)
    return _overlap(na, nb, inter)[0]


def iou(pred: Any, ref: Any) -> float:
    """Intersection over union (Jaccard) ``|A∩B| / |A∪B|``; 1.0 when both are empty."""
    a, b, _ = _prepare(pred, ref, (1.0,) * np.ndim(pred))
    na, nb, inter, _sm = _metrics_prepared(a, b, (), 0.0, surface=False)
    return _overlap(na, nb, inter)[1]


def volume_diff_ml(pred: Any, ref: Any, spacing: Sequence[float]) -> float:
    """Predicted minus reference volume in mL (1 mL = 1000 mm³)."""
    a, b, sp = _prepare(pred, ref, spacing)
    voxel_ml = math.prod(sp) / 1000.0
    return (int(np.count_nonzero(a)) - int(np.count_nonzero(b))) * voxel_ml


def binary_metrics(
    pred: Any,
    ref: Any,
    spacing: Sequence[float],
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
) -> BinaryMetrics:
    """Dice, IoU, HD, HD95, ASSD, NSD and volume difference of two masks, in one pass.

    ``spacing`` is in array axis order, mm; see :func:`surface_metrics`.
    """
    a, b, sp = _prepare(pred, ref, spacing)
    tol = _check_tolerance(nsd_tolerance_mm)
    return _binary_prepared(a, b, sp, tol)


def _binary_prepared(
    a: BoolArray, b: BoolArray, sp: tuple[float, ...], tol: float
) -> BinaryMetrics:
    na, nb, inter, sm = _metrics_prepared(a, b, sp, tol, surface=True)
    assert sm is not None
    d, j = _overlap(na, nb, inter)
    return BinaryMetrics(
        dice=d,
        iou=j,
        hd=sm.hd,
        hd95=sm.hd95,
        assd=sm.assd,
        nsd=sm.nsd,
        volume_diff_ml=(na - nb) * math.prod(sp) / 1000.0,
    )


def label_metrics(
    pred_labels: Any,
    ref_labels: Any,
    spacing: Sequence[float],
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    labels: Mapping[str, Sequence[int]] = LUNG_LABELS,
) -> dict[str, dict[str, float]]:
    """Metrics per label group of two label maps.

    Returns ``{name: {"dice": ..., "iou": ..., "hd": ..., "hd95": ..., "assd": ...,
    "nsd": ..., "volume_diff_ml": ...}}`` for each group of ``labels``; by default
    ``{"right": (1,), "left": (2,), "lung": (1, 2)}``, where "lung" is both lungs as one mask.
    ``spacing`` is in array axis order, mm.

    A value other than 0 that no group names is an :class:`InputError` listing the values
    (it would silently count as background: a 0/255 reference would score Dice 0). For maps
    in another convention (binary, 255, CIP) use
    :func:`medseg.evaluate.score_label_maps`, which reads them through a stated convention.
    """
    p = np.asarray(pred_labels)
    r = np.asarray(ref_labels)
    for name, arr in (("pred_labels", p), ("ref_labels", r)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            raise InputError(f"{name} must be an integer label map, got dtype {arr.dtype}")
    if p.shape != r.shape:
        raise InputError(
            f"pred_labels and ref_labels must have the same shape, got {p.shape} and {r.shape}"
        )
    if p.ndim == 0:
        raise InputError("label maps must have at least one axis, got 0-d arrays")
    sp = _check_spacing(spacing, p.ndim)
    tol = _check_tolerance(nsd_tolerance_mm)
    groups = {name: tuple(int(v) for v in vals) for name, vals in labels.items()}
    if any(0 in vals or not vals for vals in groups.values()):
        raise InputError(f"label groups must be non-empty and must not contain 0, got {groups}")
    allowed = {0, *(v for vals in groups.values() for v in vals)}
    # Crop both maps once to the joint box of all non-zero labels: each group's masks are
    # then made from the small crop, not from the whole volume.
    box = _union_box(_bbox(p), _bbox(r))
    if box is not None:
        p = p[tuple(slice(lo, hi) for lo, hi in box)]
        r = r[tuple(slice(lo, hi) for lo, hi in box)]
    else:
        p = p[tuple(slice(0, 0) for _ in range(p.ndim))]
        r = r[tuple(slice(0, 0) for _ in range(r.ndim))]
    # Every non-zero voxel is inside the box: check the values on the crops.
    _check_label_values("pred_labels", p, allowed, groups)
    _check_label_values("ref_labels", r, allowed, groups)
    out: dict[str, dict[str, float]] = {}
    for name, vals in groups.items():
        a = p == vals[0] if len(vals) == 1 else np.isin(p, vals)
        b = r == vals[0] if len(vals) == 1 else np.isin(r, vals)
        out[name] = _binary_prepared(a, b, sp, tol).as_dict()
    return out


# --------------------------------------------------------------------------- JSON


def to_jsonable(x: Any) -> Any:
    """``x`` with every non-finite float replaced, ready for :func:`json.dumps`.

    ``+inf`` becomes the string ``"inf"`` and ``-inf`` ``"-inf"`` (a failure stays visible
    and distinguishable from a missing value); NaN, which these metrics never produce,
    becomes ``None``. Dicts, lists, tuples, dataclasses, NumPy scalars and arrays are
    converted recursively; other values are returned unchanged. ``float("inf")`` reads the
    strings back.
    """
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, float | np.floating):
        v = float(x)
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return [to_jsonable(v) for v in x.tolist()]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: to_jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_jsonable(v) for v in x]
    return x
