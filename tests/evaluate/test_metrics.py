"""medseg.evaluate.metrics: analytic shapes, empty masks, MONAI and DeepMind agreement.

See docs/concepts/metrics.md for the definitions these tests pin down.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from medseg.errors import InputError
from medseg.evaluate import (
    METRIC_NAMES,
    BinaryMetrics,
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

Mask = npt.NDArray[np.bool_]
ANISO = (2.5, 0.7, 0.9)  # (sz, sy, sx): array axis order


def blob_pair(seed: int, shape: tuple[int, int, int] = (14, 28, 24)) -> tuple[Mask, Mask]:
    """A smooth random blob (ref) and a perturbed copy (pred)."""
    rng = np.random.default_rng(seed)
    f = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    g = f + 3.0 * f.std() * ndimage.gaussian_filter(rng.standard_normal(shape), 1.0)
    t = np.quantile(f, 0.7)
    return g > t, f > t


def ball(shape: tuple[int, ...], spacing: tuple[float, ...], radius: float) -> Mask:
    """Voxels whose centre is within ``radius`` mm of the array centre."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    r2 = sum(((g - (n - 1) / 2) * s) ** 2 for g, n, s in zip(grids, shape, spacing, strict=True))
    return np.asarray(r2 <= radius * radius)


def border_points(m: Mask) -> npt.NDArray[np.intp]:
    """Border voxels by the documented definition, with scipy (6-connectivity, outside=0)."""
    return np.argwhere(m & ~ndimage.binary_erosion(m, border_value=0))


# --------------------------------------------------------------------------- analytic shapes


def test_identical_masks() -> None:
    a, _ = blob_pair(0)
    m = binary_metrics(a, a, ANISO)
    assert m == BinaryMetrics(1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def test_cube_shifted_two_voxels_along_3mm_axis() -> None:
    a = np.zeros((14, 10, 10), bool)
    a[2:8, 2:8, 2:8] = True
    b = np.roll(a, 2, axis=0)
    spacing = (3.0, 1.0, 1.0)
    m = binary_metrics(a, b, spacing)
    assert m.hd == 6.0  # exactly: coordinates are integers * 3.0
    assert m.hd95 == 6.0  # the 36 bottom (top) face voxels are 24 % of the 152 border voxels
    # directed sums, counted by hand (each direction alike, by symmetry): bottom face 36 x 6,
    # next layer's side ring 20 x 3, top face interior 12 x 1 + 4 x 2 (to the other's walls)
    assert m.assd == pytest.approx(2 * (36 * 6 + 20 * 3 + 12 * 1 + 4 * 2) / (2 * 152))
    assert m.dice == pytest.approx(2 * 4 * 36 / (2 * 216))
    assert m.volume_diff_ml == 0.0
    # the shift is along axis 0: the same shift along axis 2 (1 mm) gives 2 mm
    assert hausdorff(a, np.roll(a, 2, axis=2), spacing) == 2.0


def test_slab_added_along_finest_axis() -> None:
    """One extra layer on top of a box: every displaced border voxel is exactly s_z away."""
    nz, ny, nx = 4, 8, 10
    ref = np.zeros((9, 12, 14), bool)
    ref[2 : 2 + nz, 2 : 2 + ny, 2 : 2 + nx] = True
    pred = ref.copy()
    pred[2 + nz] = ref[2 + nz - 1]
    spacing = (0.5, 1.0, 1.5)  # extra layer along the finest axis: z-distance wins

    def n_border(a: int, b: int, c: int) -> int:
        return a * b * c - (a - 2) * (b - 2) * (c - 2)

    n_ref, n_pred = n_border(nz, ny, nx), n_border(nz + 1, ny, nx)
    away = (ny - 2) * (nx - 2) + ny * nx  # ref top-face interior + all of pred's top layer
    m = surface_metrics(pred, ref, spacing, nsd_tolerance_mm=0.4)
    assert m.hd == 0.5
    assert m.hd95 == 0.5  # 48/224 and 80/256 of the two directed sets are at 0.5 mm
    assert m.assd == pytest.approx(0.5 * away / (n_ref + n_pred))
    assert m.nsd == pytest.approx(1 - away / (n_ref + n_pred))
    assert nsd(pred, ref, spacing, tolerance_mm=0.5) == 1.0  # d <= tau counts as within
    assert volume_diff_ml(pred, ref, spacing) == pytest.approx(ny * nx * 0.75 / 1000)


@pytest.mark.parametrize("spacing", [(1.5, 1.5, 1.5), (2.0, 0.8, 1.1)])
def test_concentric_boxes_against_distance_to_a_box(spacing: tuple[float, float, float]) -> None:
    """Inner box and a box k voxels larger on every side: every directed distance has a closed
    form (distance of a point to an axis-aligned box, per-axis clamp), and HD is the
    corner-to-corner distance sqrt(sum (k s_i)^2) exactly."""
    k = 2
    inner = np.zeros((14, 16, 15), bool)
    outer = np.zeros_like(inner)
    lo_in, hi_in = np.array([5, 5, 5]), np.array([8, 10, 9])  # inclusive voxel ranges
    inner[5:9, 5:11, 5:10] = True
    lo_out, hi_out = lo_in - k, hi_in + k
    outer[3:11, 3:13, 3:12] = True
    s = np.asarray(spacing)
    # outer border -> inner: distance to the solid inner box (clamp); it is met on its border
    q = border_points(outer)
    d_out = np.sqrt(((np.maximum(0, np.maximum(lo_in - q, q - hi_in)) * s) ** 2).sum(axis=1))
    # inner border -> outer border: distance to the nearest of the six outer face planes
    p = border_points(inner)
    d_in = np.minimum((p - lo_out) * s, (hi_out - p) * s).min(axis=1)
    m = surface_metrics(outer, inner, spacing, nsd_tolerance_mm=2.5)
    assert m.hd == pytest.approx(math.sqrt(sum((k * x) ** 2 for x in spacing)), rel=1e-12)
    assert m.hd == pytest.approx(max(d_out.max(), d_in.max()), rel=1e-12)
    assert m.hd95 == pytest.approx(
        max(np.percentile(d_out, 95), np.percentile(d_in, 95)), rel=1e-12
    )
    assert m.assd == pytest.approx(np.concatenate([d_out, d_in]).mean(), rel=1e-12)
    both = np.concatenate([d_out, d_in])
    assert m.nsd == pytest.approx(np.mean(both <= 2.5), rel=1e-12)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.7, 0.7), (1.3, 0.6, 0.9)])
@pytest.mark.parametrize(("r_in", "r_out"), [(8.0, 11.0), (6.0, 13.0)])
def test_concentric_spheres(spacing: tuple[float, float, float], r_in: float, r_out: float) -> None:
    """HD, HD95 and ASSD are the radius difference within one largest voxel step s_max.

    Every border voxel of a digital ball of radius R has its centre in the shell
    (R - s_max, R] (it is inside and a face neighbour, at most s_max away, is outside), so
    every surface distance exceeds (r_out - r_in) - s_max; and the digital surfaces are dense
    (no gap wider than a voxel step), so none exceeds it by more than s_max.
    """
    shape = tuple(int(2 * r_out / s) + 5 for s in spacing)
    m = surface_metrics(ball(shape, spacing, r_out), ball(shape, spacing, r_in), spacing)
    dr, smax = r_out - r_in, max(spacing)
    for value in (m.hd, m.hd95, m.assd):
        assert abs(value - dr) <= smax
    assert m.hd >= m.hd95 >= dr - smax


def test_disjoint_masks() -> None:
    a = np.zeros((6, 20, 6), bool)
    b = np.zeros_like(a)
    a[2:4, 2:5, 2:4] = True
    b[2:4, 12:15, 2:4] = True
    m = binary_metrics(a, b, (1.0, 0.5, 1.0))
    assert (m.dice, m.iou, m.nsd) == (0.0, 0.0, 0.0)
    # every voxel is on the border; a voxel at index j along axis 1 is (12 - j) * 0.5 mm
    # from b (same z and x), and b's voxels at 14 - j likewise: {5, 4.5, 4} mm
    assert (m.hd, m.hd95, m.assd) == (5.0, 5.0, 4.5)


def test_mask_touching_the_array_edge_has_a_closed_surface() -> None:
    full = np.ones((5, 5, 5), bool)
    smaller = full.copy()
    smaller[0] = False
    m = surface_metrics(full, smaller, (2.0, 1.0, 1.0))
    assert m.hd == 2.0  # the z=0 face of `full` is surface: 2 mm from `smaller`'s face


def test_2d_masks() -> None:
    a = np.zeros((10, 10), bool)
    a[2:6, 2:6] = True
    b = np.roll(a, 1, axis=1)
    assert hausdorff(a, b, (1.0, 0.5)) == 0.5
    assert dice(a, b) == pytest.approx(0.75)
    assert iou(a, b) == pytest.approx(0.6)


# --------------------------------------------------------------------------- empty masks


def test_both_empty() -> None:
    e = np.zeros((4, 5, 6), bool)
    m = binary_metrics(e, e, ANISO)
    assert m == BinaryMetrics(1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@pytest.mark.parametrize("empty_pred", [True, False])
def test_one_empty_is_a_failure_with_infinite_distances(empty_pred: bool) -> None:
    a, _ = blob_pair(1)
    e = np.zeros_like(a)
    pred, ref = (e, a) if empty_pred else (a, e)
    m = binary_metrics(pred, ref, ANISO)
    assert (m.dice, m.iou, m.nsd) == (0.0, 0.0, 0.0)
    assert m.hd == m.hd95 == m.assd == math.inf  # never NaN
    vol = a.sum() * math.prod(ANISO) / 1000
    assert m.volume_diff_ml == pytest.approx(-vol if empty_pred else vol)
    assert hausdorff(pred, ref, ANISO) == hd95(pred, ref, ANISO) == assd(pred, ref, ANISO)


def test_label_metrics_missed_left_lung() -> None:
    ref = np.zeros((8, 20, 30), np.uint8)
    ref[2:6, 4:16, 3:12] = 1
    ref[2:6, 4:16, 17:27] = 2
    pred = np.where(ref == 2, 0, ref).astype(np.uint8)
    out = label_metrics(pred, ref, ANISO)
    assert list(out) == ["right", "left", "lung"]
    assert all(list(v) == list(METRIC_NAMES) for v in out.values())
    assert out["right"]["dice"] == 1.0 and out["right"]["hd"] == 0.0
    assert out["left"]["dice"] == 0.0 and out["left"]["hd95"] == math.inf
    assert 0.0 < out["lung"]["dice"] < 1.0 and math.isfinite(out["lung"]["hd"])
    assert out["lung"]["volume_diff_ml"] == pytest.approx(out["left"]["volume_diff_ml"])
    text = json.dumps(to_jsonable(out), allow_nan=False)
    assert json.loads(text)["left"]["hd"] == "inf"


def test_label_metrics_match_binary_metrics() -> None:
    a, b = blob_pair(2)
    c, d = blob_pair(3)
    pred = np.where(a, 1, np.where(c & ~a, 2, 0)).astype(np.int16)
    ref = np.where(b, 1, np.where(d & ~b, 2, 0)).astype(np.int16)
    out = label_metrics(pred, ref, ANISO, nsd_tolerance_mm=1.3)
    for name, vals in (("right", (1,)), ("left", (2,)), ("lung", (1, 2))):
        expect = binary_metrics(np.isin(pred, vals), np.isin(ref, vals), ANISO, 1.3)
        assert out[name] == pytest.approx(expect.as_dict(), rel=1e-12)


def test_label_metrics_all_background() -> None:
    z = np.zeros((3, 4, 5), np.uint8)
    out = label_metrics(z, z, ANISO)
    assert out["lung"] == BinaryMetrics(1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0).as_dict()


def test_to_jsonable() -> None:
    x: Any = {"a": math.inf, "b": [-math.inf, np.float32(0.5), np.int64(3)], "c": math.nan}
    assert to_jsonable(x) == {"a": "inf", "b": ["-inf", 0.5, 3], "c": None}
    m = BinaryMetrics(0.0, 0.0, math.inf, math.inf, math.inf, 0.0, -1.5)
    assert json.loads(json.dumps(to_jsonable(m), allow_nan=False))["hd"] == "inf"
    assert float(to_jsonable(m)["hd"]) == math.inf


# --------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    ("pred", "ref", "spacing", "match"),
    [
        (np.zeros((3, 4, 5), bool), np.zeros((3, 4, 6), bool), (1, 1, 1), "same shape"),
        (np.zeros((3, 4, 5), bool), np.zeros((3, 4, 5), bool), (1, 1), "one spacing per"),
        (np.zeros((3, 4, 5), bool), np.zeros((3, 4, 5), bool), (1, -1, 1), "positive"),
        (np.zeros((3, 4, 5), bool), np.zeros((3, 4, 5), bool), (1, math.nan, 1), "positive"),
        (np.full((3, 4, 5), 2), np.zeros((3, 4, 5), bool), (1, 1, 1), "label_metrics"),
        (np.zeros((3, 4, 5), bool), np.zeros((3, 4, 5), bool), "abc", "sequence"),
    ],
)
def test_input_errors(pred: Any, ref: Any, spacing: Any, match: str) -> None:
    with pytest.raises(InputError, match=match):
        binary_metrics(pred, ref, spacing)


def test_label_metrics_input_errors() -> None:
    z = np.zeros((3, 4, 5), np.uint8)
    with pytest.raises(InputError, match="same shape"):
        label_metrics(z, z[:, :, :4], ANISO)
    with pytest.raises(InputError, match="integer label map"):
        label_metrics(z.astype(np.float32), z, ANISO)
    with pytest.raises(InputError, match="must not contain 0"):
        label_metrics(z, z, ANISO, labels={"bg": (0,)})
    with pytest.raises(InputError, match="tolerance"):
        label_metrics(z, z, ANISO, nsd_tolerance_mm=-1.0)


def test_uint8_masks_accepted() -> None:
    a, b = blob_pair(4)
    assert binary_metrics(a.astype(np.uint8), b.astype(np.uint8), ANISO) == binary_metrics(
        a, b, ANISO
    )


# --------------------------------------------------------------------------- properties

small_masks = arrays(bool, st.tuples(*[st.integers(2, 7)] * 3))
spacings = st.tuples(*[st.floats(0.3, 4.0)] * 3)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), spacing=spacings)
def test_properties(data: st.DataObject, spacing: tuple[float, float, float]) -> None:
    a = data.draw(small_masks)
    b = data.draw(arrays(bool, a.shape))
    m = binary_metrics(a, b, spacing, nsd_tolerance_mm=1.0)
    r = binary_metrics(b, a, spacing, nsd_tolerance_mm=1.0)
    assert 0.0 <= m.dice <= 1.0 and 0.0 <= m.iou <= m.dice
    assert 0.0 <= m.nsd <= 1.0
    # symmetric: swapping pred and ref permutes the two directed sets, nothing else
    keys = ("dice", "iou", "hd", "hd95", "assd", "nsd")
    assert [getattr(m, k) for k in keys] == [getattr(r, k) for k in keys]
    assert m.volume_diff_ml == pytest.approx(-r.volume_diff_ml)
    assert not any(math.isnan(v) for v in m.as_dict().values())
    assert m.hd >= m.hd95 >= 0.0 and m.hd >= m.assd >= 0.0
    if a.any() and b.any():
        assert math.isfinite(m.hd)
    if np.array_equal(a, b):
        assert (m.dice, m.hd, m.nsd) == (1.0, 0.0, 1.0)


# --------------------------------------------------------------------------- MONAI

# MONAI 1.6 warns (FutureWarning) about its own deprecated always_return_as_numpy argument.
monai_warnings = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")


def _monai(a: Mask, b: Mask, spacing: tuple[float, ...], tol: float) -> dict[str, float]:
    import monai.metrics as mm
    import torch
    p, r = torch.from_numpy(a[None, None]), torch.from_numpy(b[None, None])
    kw: dict[str, Any] = {"include_background": True, "spacing": spacing}
    return {
        "hd": mm.compute_hausdorff_distance(p, r, **kw).item(),
        "hd95": mm.compute_hausdorff_distance(p, r, percentile=95, **kw).item(),
        "assd": mm.compute_average_surface_distance(p, r, symmetric=True, **kw).item(),
        "nsd": mm.compute_surface_dice(p, r, [tol], **kw).item(),
        "nsd_subvoxel": mm.compute_surface_dice(p, r, [tol], use_subvoxels=True, **kw).item(),
    }


@monai_warnings
@pytest.mark.parametrize("seed", range(6))
def test_equals_monai_on_random_blobs(seed: int) -> None:
    """Same surface (6-connected border, outside counts as outside), same distances, same
    HD95 (max of the directed linear-interpolated 95th percentiles), same symmetric ASSD
    (mean over the union) and same voxel-counted NSD; MONAI returns float32, hence 1e-6.
    tau = 1.3 mm is no lattice distance of this spacing, so no tie can fall either way."""
    a, b = blob_pair(seed)
    tol = 1.3
    mine = surface_metrics(a, b, ANISO, tol)
    ref = _monai(a, b, ANISO, tol)
    for key in ("hd", "hd95", "assd", "nsd"):
        assert getattr(mine, key) == pytest.approx(ref[key], rel=1e-6, abs=1e-6), key


@monai_warnings
def test_monai_empty_mask_differences() -> None:
    """Where medseg deliberately differs: MONAI gives NaN when both masks are empty (medseg:
    perfect) and NaN for HD95 when one is (medseg: inf), which nan-means drop silently."""
    a, _ = blob_pair(0)
    e = np.zeros_like(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MONAI: "... is all 0"
        both = _monai(e, e, ANISO, 1.0)
        one = _monai(e, a, ANISO, 1.0)
    assert all(math.isnan(both[k]) for k in ("hd", "hd95", "assd", "nsd"))
    assert math.isnan(one["hd95"]) and one["hd"] == one["assd"] == math.inf and one["nsd"] == 0
    assert surface_metrics(e, e, ANISO, 1.0) == surface_metrics(a, a, ANISO, 1.0)
    assert surface_metrics(e, a, ANISO).hd95 == math.inf


# --------------------------------------------------------------------------- DeepMind

# surface-distance 0.1 imports scipy.ndimage.filters/morphology (deprecated namespaces) and
# crashes on empty masks under NumPy 2 (np.Inf): only non-empty masks are given to it.
dm_warnings = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _deepmind(a: Mask, b: Mask, spacing: tuple[float, ...], tol: float) -> dict[str, float]:
    import surface_distance as sd  # a dev dependency: CI must run these, never skip them
    d = sd.compute_surface_distances(b, a, spacing)  # (gt, pred)
    w = np.concatenate([d["surfel_areas_gt"], d["surfel_areas_pred"]])
    dist = np.concatenate([d["distances_gt_to_pred"], d["distances_pred_to_gt"]])
    return {
        "hd": float(sd.compute_robust_hausdorff(d, 100)),
        "hd95": float(sd.compute_robust_hausdorff(d, 95)),
        "assd": float((dist * w).sum() / w.sum()),
        "nsd": float(sd.compute_surface_dice_at_tolerance(d, tol)),
    }


@dm_warnings
@monai_warnings
@pytest.mark.parametrize("seed", range(4))
def test_deepmind_differences_are_the_documented_ones(seed: int) -> None:
    """DeepMind's surface is the set of mixed 2x2x2 voxel cells (points on the dual lattice),
    weighted by surfel area. Every such cell holds a 6-border voxel of the mask and every
    6-border voxel is a corner of one, so the two surfaces of one mask are within h (half the
    voxel diagonal) of each other and the two Hausdorff distances differ by at most 2h.
    HD95, ASSD and NSD differ both by those surface points (masks differing by a voxel share
    more mixed cells than border voxels) and by the area weighting: no bound holds, and the
    docs give measured differences. What is checked is the link to MONAI's
    use_subvoxels=True, which computes DeepMind's NSD."""
    a, b = blob_pair(seed)
    tol = 1.3
    h = 0.5 * math.sqrt(sum(s * s for s in ANISO))
    mine = surface_metrics(a, b, ANISO, tol)
    dm = _deepmind(a, b, ANISO, tol)
    assert abs(mine.hd - dm["hd"]) <= 2 * h
    assert dm["nsd"] == pytest.approx(_monai(a, b, ANISO, tol)["nsd_subvoxel"], abs=1e-6)


@dm_warnings
def test_deepmind_agrees_where_the_definitions_coincide() -> None:
    a = np.zeros((14, 10, 10), bool)
    a[2:8, 2:8, 2:8] = True
    b = np.roll(a, 2, axis=0)
    assert _deepmind(a, a, (3.0, 1.0, 1.0), 1.0) == {"hd": 0, "hd95": 0, "assd": 0, "nsd": 1}
    assert _deepmind(a, b, (3.0, 1.0, 1.0), 1.0)["hd"] == hausdorff(a, b, (3.0, 1.0, 1.0)) == 6
