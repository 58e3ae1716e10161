"""Time medseg's HD95 + ASSD + NSD against MONAI (and DeepMind's surface-distance) in one run.

Usage: python benchmarks/metrics_vs_monai.py [--small] [--repeats N] [--tolerance MM]
                                             [--backends] [--definitions]

Builds a lung-like pair of label maps on a 512x512x300 grid at 0.7 x 0.7 x 2.5 mm (x, y, z),
i.e. spacing (2.5, 0.7, 0.7) in array order (z, y, x): two wobbly ellipsoid lungs as the
reference; the prediction is the reference shifted by one voxel along x, dilated by one voxel
in the lower half, with 20 % of its boundary voxels flipped, and a 5 mm false-positive blob
30 mm lateral of the left lung. ``--small`` uses a 128x128x75 grid over the same field of view
(4x coarser). The timed pair is the "lung" mask (labels 1 and 2 together).

Timed, best of N after one untimed warm-up call each:
* medseg: ``surface_metrics`` (HD, HD95, ASSD and NSD from one set of distances);
* MONAI: ``compute_hausdorff_distance(percentile=95)`` + ``compute_average_surface_distance(
  symmetric=True)`` + ``compute_surface_dice`` (each computes its own distances);
* DeepMind ``surface_distance`` (if importable): ``compute_surface_distances`` once, then
  ``compute_robust_hausdorff(95)``, the area-weighted mean and
  ``compute_surface_dice_at_tolerance``.
Also timed: medseg ``label_metrics`` (all metrics for right, left and lung).

``--backends`` also times the three exact ways to get the surface distances on the same
crop: scipy.ndimage.distance_transform_edt, the ``edt`` package (if installed) and a KD-tree
over the border voxels (what medseg uses), and reports each one's largest difference from
scipy's distances. ``--definitions`` compares medseg's and DeepMind's ASSD and HD95 with the
continuous answer for a ball shifted by whole voxels.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.spatial import KDTree

import medseg
from medseg.evaluate import label_metrics, surface_metrics
from medseg.evaluate.metrics import _bbox, _border, _crop_padded, _union_box

FULL_SHAPE = (300, 512, 512)
FULL_SPACING = (2.5, 0.7, 0.7)  # array order (z, y, x)

U8 = npt.NDArray[np.uint8]
Mask = npt.NDArray[np.bool_]


def make_pair(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0
              ) -> tuple[U8, U8]:
    """(pred, ref) label maps (0 background, 1 right lung, 2 left lung)."""
    rng = np.random.default_rng(seed)
    ref = np.zeros(shape, np.uint8)
    centre = [n * s / 2 for n, s in zip(shape, spacing, strict=True)]
    lungs = ((1, -85.0, (130.0, 95.0, 65.0)), (2, 85.0, (125.0, 92.0, 58.0)))
    boxes = []
    for label, dx, semi in lungs:
        c = (centre[0], centre[1] + 10.0, centre[2] + dx)
        lo = [max(0, int((ci - 1.25 * si) / sp))
              for ci, si, sp in zip(c, semi, spacing, strict=True)]
        hi = [min(n, int((ci + 1.25 * si) / sp) + 1)
              for ci, si, sp, n in zip(c, semi, spacing, shape, strict=True)]
        z, y, x = (
            (np.arange(lo[a], hi[a]) * spacing[a] - c[a]).astype(np.float32).reshape(
                [-1 if b == a else 1 for b in range(3)])
            for a in range(3)
        )
        p = rng.uniform(0, 2 * np.pi, 6).astype(np.float32)
        q = (z / semi[0]) ** 2 + (y / semi[1]) ** 2 + (x / semi[2]) ** 2
        q -= 0.08 * np.sin(z / 23 + p[0]) * np.sin(y / 19 + p[1])
        q -= 0.06 * np.sin(x / 17 + p[2]) * np.cos(z / 31 + p[3])
        q -= 0.05 * np.sin((x + y) / 13 + p[4]) * np.sin(z / 11 + p[5])
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        ref[box][q < 1.0] = label
        boxes.append((label, box))
    pred = np.zeros_like(ref)
    half = shape[0] // 2
    for label, box in boxes:
        # work in the lung's box grown by 3 voxels (the perturbations move the boundary <= 2)
        grown = tuple(slice(max(0, b.start - 3), min(n, b.stop + 3))
                      for b, n in zip(box, shape, strict=True))
        m = np.roll(ref[grown] == label, 1, axis=2)
        lower = slice(max(0, half - grown[0].start), None)
        m[lower] = ndimage.binary_dilation(m[lower])
        border = m & ~ndimage.binary_erosion(m)
        outer = ndimage.binary_dilation(m) & ~m
        m[border & (rng.random(m.shape, dtype=np.float32) < 0.2)] = False
        m[outer & (rng.random(m.shape, dtype=np.float32) < 0.2)] = True
        pred[grown][m] = label
    # a false-positive blob (radius 5 mm) 30 mm lateral of the left lung
    c_blob = (centre[0], centre[1], centre[2] + 85.0 + 58.0 + 30.0)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    r2 = sum(((g * s - cb) ** 2) for g, s, cb in zip((zz, yy, xx), spacing, c_blob, strict=True))
    pred[r2 <= 25.0] = 2
    return pred, ref


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out = fn()  # warm-up, untimed
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def run_medseg(a: Mask, b: Mask, spacing: tuple[float, ...], tol: float) -> dict[str, float]:
    m = surface_metrics(a, b, spacing, tol)
    return {"hd": m.hd, "hd95": m.hd95, "assd": m.assd, "nsd": m.nsd}


def run_monai(a: Mask, b: Mask, spacing: tuple[float, ...], tol: float) -> dict[str, float]:
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    p, r = torch.from_numpy(a[None, None]), torch.from_numpy(b[None, None])
    kw: dict[str, Any] = {"include_background": True, "spacing": spacing}
    return {
        "hd95": compute_hausdorff_distance(p, r, percentile=95, **kw).item(),
        "assd": compute_average_surface_distance(p, r, symmetric=True, **kw).item(),
        "nsd": compute_surface_dice(p, r, [tol], **kw).item(),
    }


def run_deepmind(a: Mask, b: Mask, spacing: tuple[float, ...], tol: float) -> dict[str, float]:
    import surface_distance as sd

    d = sd.compute_surface_distances(b, a, spacing)  # (gt, pred)
    w = np.concatenate([d["surfel_areas_gt"], d["surfel_areas_pred"]])
    dist = np.concatenate([d["distances_gt_to_pred"], d["distances_pred_to_gt"]])
    return {
        "hd95": float(sd.compute_robust_hausdorff(d, 95)),
        "assd": float((dist * w).sum() / w.sum()),
        "nsd": float(sd.compute_surface_dice_at_tolerance(d, tol)),
    }


def time_backends(a: Mask, b: Mask, spacing: tuple[float, ...], repeats: int) -> None:
    """Directed distances both ways on medseg's padded crop, three exact ways."""
    box = _union_box(_bbox(a), _bbox(b))
    assert box is not None
    ba, bb = _border(_crop_padded(a, box)), _border(_crop_padded(b, box))
    print(f"crop {ba.shape} = {ba.size / 1e6:.1f} Mvoxels, border voxels "
          f"{int(ba.sum())} / {int(bb.sum())}")

    def scipy_edt() -> tuple[Any, Any]:
        return (ndimage.distance_transform_edt(~bb, sampling=spacing)[ba],
                ndimage.distance_transform_edt(~ba, sampling=spacing)[bb])

    def kdtree() -> tuple[Any, Any]:
        sp = np.asarray(spacing)
        pa, pb = np.argwhere(ba) * sp, np.argwhere(bb) * sp
        opts: dict[str, Any] = {"leafsize": 32, "balanced_tree": False, "compact_nodes": False}
        return (KDTree(pb, **opts).query(pa, workers=-1)[0],
                KDTree(pa, **opts).query(pb, workers=-1)[0])

    fns: dict[str, Callable[[], tuple[Any, Any]]] = {"scipy.ndimage.distance_transform_edt":
                                                     scipy_edt}
    try:
        import edt

        def edt_pkg() -> tuple[Any, Any]:
            kw: dict[str, Any] = {"anisotropy": spacing, "black_border": False,
                                  "parallel": os.cpu_count() or 1}
            return edt.edt(~bb, **kw)[ba], edt.edt(~ba, **kw)[bb]

        fns[f"edt {version('edt')} (parallel={os.cpu_count()}, float32)"] = edt_pkg
    except ImportError:
        print("edt package not installed: skipped")
    fns["scipy.spatial.KDTree over border voxels"] = kdtree
    ref: tuple[Any, Any] | None = None
    for name, fn in fns.items():
        t, out = best_of(fn, repeats)
        if ref is None:
            ref = out
        err = max(float(np.abs(out[0] - ref[0]).max()), float(np.abs(out[1] - ref[1]).max()))
        print(f"  {name:<48} {t:7.3f} s  max |d - d_scipy| = {err:.2e} mm")


def ball(shape: tuple[int, ...], spacing: tuple[float, ...], centre: tuple[float, ...],
         radius: float) -> Mask:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    r2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing, strict=True))
    return np.asarray(r2 <= radius * radius)


def definitions_table() -> None:
    """A 40 mm ball against the same ball shifted by k voxels along z or x: the continuous
    answer is known (ASSD -> the mean of |sqrt(R^2 - 2 R d u + d^2) - R| over u = cos(theta)
    uniform in [-1, 1], about d/2; directed HD95 about 0.95 d), so each definition's
    discretisation error shows."""
    radius = 40.0
    print(f"\ndefinitions: ball R={radius:g} mm vs the same ball shifted by k voxels "
          "(ASSD and HD95 in mm):")
    print(f"  {'spacing':<16}{'shift':<18}{'ASSD true':>10}{'medseg':>8}{'DeepMind':>9}"
          f"{'HD95 true':>11}{'medseg':>8}{'DeepMind':>9}")
    u = np.linspace(-1.0, 1.0, 200_001)
    for spacing in ((1.0, 1.0, 1.0), (2.5, 0.7, 0.7)):
        shape = tuple(int(2 * radius / s) + 8 for s in spacing)
        centre = tuple((n - 1) / 2 for n in shape)
        b = ball(shape, spacing, centre, radius)
        for axis, k in ((0, 1), (0, 3), (2, 1), (2, 3)):
            moved = list(centre)
            moved[axis] += k
            a = ball(shape, spacing, tuple(moved), radius)
            d = k * spacing[axis]
            true_assd = float(np.abs(np.sqrt(radius**2 - 2 * radius * d * u + d * d)
                                     - radius).mean())
            m = surface_metrics(a, b, spacing)
            try:
                dm = run_deepmind(a, b, spacing, 1.0)
                dm_assd, dm_hd95 = f"{dm['assd']:9.3f}", f"{dm['hd95']:9.3f}"
            except ImportError:
                dm_assd = dm_hd95 = f"{'-':>9}"
            shift = f"{k} along {'zyx'[axis]} = {d:.1f}"
            print(f"  {spacing!s:<16}{shift:<18}{true_assd:10.3f}{m.assd:8.3f}{dm_assd}"
                  f"{0.95 * d:11.3f}{m.hd95:8.3f}{dm_hd95}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="128x128x75 grid, 4x coarser")
    ap.add_argument("--repeats", type=int, default=3, help="best of N (default 3)")
    ap.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance, mm")
    ap.add_argument("--backends", action="store_true", help="also time EDT vs edt vs KD-tree")
    ap.add_argument("--definitions", action="store_true",
                    help="also compare medseg and DeepMind with the continuous answer")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI's own deprecations
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # surface-distance's

    shape, spacing = FULL_SHAPE, FULL_SPACING
    if args.small:
        shape = (75, 128, 128)
        spacing = (10.0, 2.8, 2.8)
    t0 = time.perf_counter()
    pred, ref = make_pair(shape, spacing, args.seed)
    a, b = pred > 0, ref > 0
    print(f"pair: shape {shape} (z, y, x), spacing {spacing} mm (array order), built in "
          f"{time.perf_counter() - t0:.1f} s; lung voxels pred {int(a.sum())} ref {int(b.sum())}")
    import monai
    import scipy
    import torch

    print(f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''}, "
          f"python {platform.python_version()}, numpy {np.__version__}, scipy "
          f"{scipy.__version__}, torch {torch.__version__} (threads {torch.get_num_threads()}), "
          f"monai {monai.__version__}, medseg {medseg.__version__}")
    tol = args.tolerance
    results: dict[str, tuple[float, dict[str, float]]] = {}
    results["medseg"] = best_of(lambda: run_medseg(a, b, spacing, tol), args.repeats)
    results["MONAI"] = best_of(lambda: run_monai(a, b, spacing, tol), args.repeats)
    try:
        import surface_distance  # noqa: F401

        results["DeepMind"] = best_of(lambda: run_deepmind(a, b, spacing, tol), args.repeats)
    except ImportError:
        print("surface-distance (DeepMind) not importable: skipped")
    t_lab, lab = best_of(lambda: label_metrics(pred, ref, spacing, tol), args.repeats)

    print(f"\nHD95 + ASSD + NSD(tau={tol} mm) of the lung mask, best of {args.repeats}:")
    t_med = results["medseg"][0]
    for name, (t, _) in results.items():
        ratio = "" if name == "medseg" else f"  ({t / t_med:.1f}x medseg)"
        print(f"  {name:<9} {t:8.3f} s{ratio}")
    print(f"  medseg label_metrics (all 7 metrics x right, left, lung): {t_lab:.3f} s")
    print(f"\n{'metric':<10}" + "".join(f"{n:>14}" for n in results))
    for key in ("hd95", "assd", "nsd"):
        print(f"{key:<10}" + "".join(f"{r[1][key]:>14.6f}" for r in results.values()))
    print(f"medseg hd = {results['medseg'][1]['hd']:.6f} mm; per label:")
    for name, vals in lab.items():
        print(f"  {name:<6} " + " ".join(f"{k}={v:.4g}" for k, v in vals.items()))
    if args.backends:
        print("\ndistance backends (both directions, lung pair):")
        time_backends(a, b, spacing, args.repeats)
    if args.definitions:
        definitions_table()


if __name__ == "__main__":
    main()
