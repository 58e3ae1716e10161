"""Synthetic chest-CT phantoms with exact lung labels.

``make_phantom(seed)`` draws a chest from the seed: body with subcutaneous fat, two lungs
(domed bases, rounded apices, the left one smaller with a cardiac notch), heart, spine, ribs,
aorta, trachea and main bronchi, branching vessels and a nodule inside the lungs, optional
pathology (consolidation against the pleura, ground glass, emphysema), parenchymal texture,
a kernel-like blur and noise. Labels: 0 background, 1 right lung, 2 left lung. The lungs
include their vessels, nodules and pathology (everything inside the pleura) and exclude the
trachea and main bronchi.

Options (all off by default, so the default phantoms never change): ``abdomen=True`` adds the
upper abdomen under the diaphragm (liver under the right dome, spleen, a stomach under the left
dome with a gas bubble and possibly an air-fluid level, colon with its hepatic and splenic
flexures and small-bowel loops, both partly gas-filled, mesenteric fat); ``effusion=True`` adds
pleural effusions (fluid layering posteriorly in the costophrenic recess, replacing lung:
label 0); ``coverage="abdomen"`` moves the scanned range down so that only the bottom 20-60 mm
of the lungs and the upper abdomen are in the volume. Stomach, bowel, liver and effusion are
never lung (label 0). The options draw from their own generators (seeded from ``[seed, k]``),
never from the main stream.

World frame: LPS (x to patient Left, y Posterior, z Superior), identity direction, so the
right lung (label 1) lies at smaller x. Deterministic: the same seed gives the same arrays.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from medseg.volume import CTVolume, Geometry, VolumeMetadata

__all__ = ["Coverage", "make_phantom", "write_phantom_study"]

#: Scanned z range: "chest" (the default, lungs centred) or "abdomen" (lung bases and upper
#: abdomen only).
Coverage = Literal["chest", "abdomen"]

# Typical CT numbers (HU); e.g. Hounsfield-scale tables in Bushberg, "The Essential Physics
# of Medical Imaging", and lung densitometry literature for the parenchyma.
AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
BLOOD_HU = 45.0
LUNG_HU = -850.0           # aerated parenchyma at full inspiration
EMPHYSEMA_HU = -960.0      # below the -950 HU LAA threshold
GROUND_GLASS_HU = -600.0
CONSOLIDATION_HU = 30.0
NODULE_HU = 30.0
CANCELLOUS_BONE_HU = 300.0
CORTICAL_BONE_HU = 900.0
RIB_HU = 600.0
LIVER_HU = 55.0            # unenhanced liver parenchyma
SPLEEN_HU = 45.0
FLUID_HU = (0.0, 20.0)     # simple fluid: effusion, gastric and small-bowel contents
TABLE_HU = 150.0
#: Scanners clip at -1024 (12-bit data with intercept -1024).
HU_FLOOR = -1024


@dataclass
class _Anatomy:
    body_ax: float
    body_ay: float
    fat: float
    lung_cx: float
    lung_cy: float
    lung_ax: tuple[float, float]  # right, left
    lung_ay: float
    z_base: float
    z_apex: float
    dome: tuple[float, float]
    heart: tuple[float, float, float, float, float, float]
    mediastinum_ax: float


def _draw_anatomy(rng: np.random.Generator, z_extent: float) -> _Anatomy:
    body_ax = rng.uniform(135, 185)
    body_ay = rng.uniform(95, 130)
    lung_len = rng.uniform(200, 270)
    z_mid = rng.uniform(-0.15, 0.15) * z_extent
    return _Anatomy(
        body_ax=body_ax, body_ay=body_ay, fat=rng.uniform(6, 25),
        lung_cx=rng.uniform(0.36, 0.46) * body_ax,
        lung_cy=rng.uniform(-0.05, 0.12) * body_ay,
        lung_ax=(rng.uniform(0.42, 0.52) * body_ax, rng.uniform(0.37, 0.47) * body_ax),
        lung_ay=rng.uniform(0.65, 0.8) * body_ay,
        z_base=z_mid - lung_len * 0.55, z_apex=z_mid + lung_len * 0.45,
        dome=(rng.uniform(25, 50), rng.uniform(18, 40)),
        heart=(rng.uniform(10, 35), rng.uniform(-0.45, -0.25) * body_ay,
               z_mid - lung_len * rng.uniform(0.2, 0.3),
               rng.uniform(50, 65), rng.uniform(40, 55), rng.uniform(50, 65)),
        mediastinum_ax=rng.uniform(0.12, 0.22) * body_ax,
    )


def _warp_fields(rng: np.random.Generator, shape: tuple[int, int, int],
                 spacing: tuple[float, float, float], amplitude: float) -> list[Any]:
    """Three smooth random displacement fields (mm) with ~60 mm correlation length."""
    out = []
    coarse = tuple(max(2, int(n * s / 60.0) + 2) for n, s in zip(shape, spacing[::-1],
                                                                 strict=True))
    for _ in range(3):
        field = rng.normal(0, 1, coarse)
        zoom = [n / c for n, c in zip(shape, coarse, strict=True)]
        f = ndimage.zoom(field, zoom, order=3)[: shape[0], : shape[1], : shape[2]]
        out.append((amplitude * f / max(float(np.abs(f).max()), 1e-6)).astype(np.float32))
    return out


def _segment_distance(px: npt.NDArray[Any], py: npt.NDArray[Any], pz: npt.NDArray[Any],
                      a: npt.NDArray[Any], b: npt.NDArray[Any]) -> npt.NDArray[Any]:
    ab = b - a
    t = ((px - a[0]) * ab[0] + (py - a[1]) * ab[1] + (pz - a[2]) * ab[2]) / max(ab @ ab, 1e-9)
    t = np.clip(t, 0, 1)
    return np.sqrt((px - a[0] - t * ab[0]) ** 2 + (py - a[1] - t * ab[1]) ** 2
                   + (pz - a[2] - t * ab[2]) ** 2)


class _Canvas:
    """World coordinates of the grid and a tube/sphere painter working in local boxes."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                 origin: npt.NDArray[np.float64]) -> None:
        self.shape = shape
        self.spacing = np.asarray(spacing, float)
        self.origin = origin
        nz, ny, nx = shape
        self.x = origin[0] + np.arange(nx) * spacing[0]
        self.y = origin[1] + np.arange(ny) * spacing[1]
        self.z = origin[2] + np.arange(nz) * spacing[2]

    def _box(self, lo: npt.NDArray[Any], hi: npt.NDArray[Any]) -> tuple[slice, slice, slice] | None:
        sl = []
        for axis, coords in ((2, self.z), (1, self.y), (0, self.x)):
            i0 = int(np.searchsorted(coords, lo[axis]))
            i1 = int(np.searchsorted(coords, hi[axis], side="right"))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return sl[0], sl[1], sl[2]

    def tube(self, a: npt.NDArray[Any], b: npt.NDArray[Any], r: float
             ) -> tuple[tuple[slice, slice, slice], npt.NDArray[np.bool_]] | None:
        lo = np.minimum(a, b) - r
        hi = np.maximum(a, b) + r
        box = self._box(lo, hi)
        if box is None:
            return None
        pz = self.z[box[0]][:, None, None]
        py = self.y[box[1]][None, :, None]
        px = self.x[box[2]][None, None, :]
        return box, _segment_distance(px, py, pz, a, b) <= r

    def ellipsoid(self, c: npt.NDArray[Any], axes: npt.NDArray[Any]
                  ) -> tuple[tuple[slice, slice, slice], npt.NDArray[np.bool_]] | None:
        box = self._box(c - axes, c + axes)
        if box is None:
            return None
        pz = self.z[box[0]][:, None, None]
        py = self.y[box[1]][None, :, None]
        px = self.x[box[2]][None, None, :]
        return box, (((px - c[0]) / axes[0]) ** 2 + ((py - c[1]) / axes[1]) ** 2
                     + ((pz - c[2]) / axes[2]) ** 2) < 1.0


def _vessel_tree(rng: np.random.Generator, start: npt.NDArray[Any], direction: npt.NDArray[Any],
                 radius: float, depth: int) -> list[tuple[Any, Any, float]]:
    segs: list[tuple[Any, Any, float]] = []
    stack = [(start, direction / np.linalg.norm(direction), radius, depth)]
    while stack:
        p, d, r, n = stack.pop()
        length = rng.uniform(25, 45) * (r / radius) ** 0.5 + 10
        q = p + d * length
        segs.append((p, q, r))
        if n > 0 and r > 1.2:
            for _ in range(2):
                nd = d + rng.normal(0, 0.55, 3)
                stack.append((q, nd / np.linalg.norm(nd), r * rng.uniform(0.62, 0.8), n - 1))
    return segs


def _diaphragm_height(an: _Anatomy, xw: npt.NDArray[Any], yw: npt.NDArray[Any]
                      ) -> npt.NDArray[Any]:
    """z (warped frame) of the lung bases: the domes under the lungs, z_base elsewhere."""
    h = np.full(np.broadcast_shapes(xw.shape, yw.shape), an.z_base)
    for sign, ax, dome in ((-1.0, an.lung_ax[0], an.dome[0]), (1.0, an.lung_ax[1], an.dome[1])):
        r2 = ((xw - sign * an.lung_cx) / ax) ** 2 + ((yw - an.lung_cy) / an.lung_ay) ** 2
        h = np.maximum(h, an.z_base + dome * np.clip(1 - r2, 0, 1))
    return h


def _add_effusion(rng: np.random.Generator, hu: npt.NDArray[Any], labels: npt.NDArray[Any],
                  an: _Anatomy, xw: npt.NDArray[Any], yw: npt.NDArray[Any],
                  zw: npt.NDArray[Any]) -> None:
    """Pleural effusion(s): fluid layering posteriorly (supine) in the costophrenic recess.

    The fluid takes the place of lung (label set to 0); the adjacent lung is compressed
    (denser, still lung).
    """
    side = rng.choice(["right", "left", "both"], p=[0.4, 0.3, 0.3])
    for lab, sign, ax in ((1, -1.0, an.lung_ax[0]), (2, 1.0, an.lung_ax[1])):
        depth0 = rng.uniform(0.3, 1.0)      # AP fraction of the lung filled at the base
        height = rng.uniform(40.0, 140.0)   # mm above the lowest lung point it climbs
        meniscus = rng.uniform(0.3, 1.2)    # rises along the lateral and medial walls
        fluid_hu = rng.uniform(*FLUID_HU)
        compressed_hu = rng.uniform(-620.0, -480.0)
        if side != "both" and (lab == 1) != (side == "right"):
            continue
        u = (xw - sign * an.lung_cx) / ax
        v = (yw - an.lung_cy) / an.lung_ay
        t = np.clip(1 - (zw - an.z_base) / height, 0, 1)
        threshold = 1 - depth0 * t ** 0.7 * (1 + meniscus * u ** 2)
        side_lung = labels == lab
        fluid = side_lung & (t > 0) & (v > threshold)
        if not fluid.any():
            continue
        band = side_lung & ~fluid & (t > 0) & (v > threshold - 0.12)
        hu[band] = np.maximum(hu[band], compressed_hu)
        hu[fluid] = fluid_hu
        labels[fluid] = 0


def _catmull_rom(points: npt.NDArray[Any], per_segment: int) -> npt.NDArray[Any]:
    p = np.vstack([points[:1], points, points[-1:]])
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        for t in np.linspace(0, 1, per_segment, endpoint=False):
            out.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                              + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3))
    out.append(p[-2])
    return np.array(out)


def _add_abdomen(rng: np.random.Generator, hu: npt.NDArray[Any], cv: _Canvas, an: _Anatomy,
                 xw: npt.NDArray[Any], yw: npt.NDArray[Any], zw: npt.NDArray[Any]) -> None:
    """Upper abdomen under the diaphragm, painted into the plain soft tissue of ``hu``.

    Every organ keeps a soft-tissue diaphragm (3-6 mm) from the lungs, heart, bones, vessels
    and fat drawn before, and gas/fluid lumens also a wall (2-4 mm). Labels are untouched
    (nothing here is lung).
    """
    sx, sy, sz = (float(v) for v in cv.spacing)
    bx, by, zb = an.body_ax, an.body_ay, an.z_base
    dome_r, dome_l = an.dome
    ks = np.flatnonzero((cv.z >= zb - 300.0) & (cv.z <= zb + max(an.dome) + 30.0))
    d_dia = rng.uniform(3.0, 6.0)
    wall = rng.uniform(2.0, 4.0)
    if ks.size == 0:
        return
    kb = slice(int(ks[0]), int(ks[-1]) + 1)
    sub = hu[kb]
    soft = sub == SOFT_TISSUE_HU
    below = zw[kb] < _diaphragm_height(an, xw[kb], yw[kb])
    dist = ndimage.distance_transform_edt(soft, sampling=(sz, sy, sx))
    ok_wall = np.zeros(hu.shape, bool)
    ok_wall[kb] = soft & below & (dist >= d_dia)
    ok_lumen = np.zeros(hu.shape, bool)
    ok_lumen[kb] = ok_wall[kb] & (dist >= d_dia + wall)
    yy = cv.y[None, :, None]

    # mesenteric / retroperitoneal fat, mottled with soft tissue, inside the muscle wall
    cavity = ok_wall[kb] & (dist >= rng.uniform(8.0, 16.0))
    tex = ndimage.gaussian_filter(rng.normal(0, 1, sub.shape).astype(np.float32),
                                  sigma=(5.0 / sz, 5.0 / sy, 5.0 / sx))
    tex /= max(float(tex.std()), 1e-6)
    sub[cavity & (tex > rng.uniform(-0.6, 0.4))] = FAT_HU + rng.uniform(-15, 15)

    def solid(center: list[float], axes: list[float], value: float) -> None:
        res = cv.ellipsoid(np.array(center), np.array(axes))
        if res is not None:
            box, m = res
            hu[box][m & ok_wall[box]] = value

    # liver under the right dome (its top is carved by the diaphragm), spleen posterolateral
    liver_az = rng.uniform(80.0, 110.0)
    solid([-0.35 * bx, rng.uniform(-0.1, 0.05) * by, zb + dome_r - 0.75 * liver_az],
          [0.65 * bx, 0.8 * by, liver_az], LIVER_HU + rng.uniform(-5, 10))
    spleen_az = rng.uniform(40.0, 60.0)
    solid([0.62 * bx, 0.45 * by, zb + 0.3 * dome_l - 0.6 * spleen_az],
          [rng.uniform(20, 30), rng.uniform(40, 55), spleen_az], SPLEEN_HU + rng.uniform(-5, 5))

    def hollow(path: npt.NDArray[Any], radius: float, wall_mm: float) -> npt.NDArray[np.bool_]:
        """Paint a tube's wall (soft tissue); return its lumen (full-size mask)."""
        lumen = np.zeros(hu.shape, bool)
        for a, b in itertools.pairwise(path):
            res = cv.tube(a, b, radius + wall_mm)
            if res is not None:
                box, m = res
                hu[box][m & ok_wall[box]] = SOFT_TISSUE_HU
        for a, b in itertools.pairwise(path):
            res = cv.tube(a, b, radius)
            if res is not None:
                box, m = res
                lumen[box] |= m & ok_lumen[box]
        return lumen

    # small-bowel loops: smaller, lower and anterior; fluid with gas in some
    for _ in range(int(rng.integers(3, 9))):
        p = np.array([rng.uniform(-0.45, 0.45) * bx, rng.uniform(-0.6, 0.1) * by,
                      zb - rng.uniform(70, 240)])
        d = rng.normal(0, 1, 3)
        pts = [p]
        for _ in range(int(rng.integers(4, 8))):
            d = d / np.linalg.norm(d) + rng.normal(0, 0.7, 3)
            pts.append(pts[-1] + d / np.linalg.norm(d) * rng.uniform(18, 32))
        lumen = hollow(_catmull_rom(np.array(pts), 4), rng.uniform(8, 13), rng.uniform(1.5, 3))
        level = p[1] + rng.uniform(-15, 20) if rng.random() < 0.6 else -np.inf
        hu[lumen] = rng.uniform(*FLUID_HU)
        hu[lumen & (yy < level)] = AIR_HU

    # colon: ascending, hepatic flexure, transverse (sagging, anterior), splenic flexure high
    # under the left dome, descending; gas non-dependent, mottled stool elsewhere
    chilaiditi = rng.random() < 0.25
    hepatic = ([-0.45 * bx, -0.5 * by, zb + 0.4 * dome_r] if chilaiditi else
               [-0.5 * bx, -0.35 * by, zb - rng.uniform(40, 110)])
    ctrl = np.array([
        [-0.55 * bx, 0.15 * by, zb - 280], [-0.6 * bx, 0.05 * by, zb - 150], hepatic,
        [rng.uniform(-0.1, 0.1) * bx, -0.62 * by, zb - rng.uniform(60, 140)],
        [0.55 * bx, rng.uniform(-0.2, 0.2) * by, zb + rng.uniform(-0.3, 0.4) * dome_l - 10],
        [0.62 * bx, 0.1 * by, zb - 120], [0.6 * bx, 0.15 * by, zb - 280]])
    ctrl += rng.normal(0, 6, ctrl.shape)
    lumen = hollow(_catmull_rom(ctrl, 6), rng.uniform(12, 20), rng.uniform(1.5, 3))
    sub_l = lumen[kb]
    stool = rng.uniform(-80, 20) + 40 * tex
    sub[sub_l] = stool[sub_l]
    gas = sub_l & ((yy < rng.uniform(-0.4, 0.3) * by) | (tex > 1.2))
    sub[gas] = AIR_HU

    # stomach: fundus under the left dome plus the body/antrum running down, forward and
    # medially; 50-300 mL of gas anteriorly (supine), fluid below an air-fluid level
    f_axes = np.array([rng.uniform(35, 55), rng.uniform(30, 50), rng.uniform(45, 70)])
    fundus = np.array([an.lung_cx * rng.uniform(0.6, 1.0), an.lung_cy + rng.uniform(-0.3, 0.1) * by,
                       zb + dome_l * rng.uniform(0.3, 0.8) - 0.5 * f_axes[2]])
    antrum = fundus + np.array([-rng.uniform(25, 50), -rng.uniform(15, 35), -rng.uniform(45, 70)])
    a_axes = np.array([rng.uniform(30, 40), rng.uniform(22, 32), rng.uniform(35, 50)])
    target_ml = rng.uniform(50, 300)
    fluid_hu = rng.uniform(*FLUID_HU)
    lumen = np.zeros(hu.shape, bool)
    for c, axes in ((fundus, f_axes), (antrum, a_axes)):
        res = cv.ellipsoid(c, axes + wall)
        if res is not None:
            box, m = res
            hu[box][m & ok_wall[box]] = SOFT_TISSUE_HU + 5
    for c, axes in ((fundus, f_axes), (antrum, a_axes)):
        res = cv.ellipsoid(c, axes)
        if res is not None:
            box, m = res
            lumen[box] |= m & ok_lumen[box]
    if lumen.any():
        ys = np.broadcast_to(yy, hu.shape)[lumen]
        frac = min(1.0, target_ml / (ys.size * sx * sy * sz / 1000.0))
        level = float(np.quantile(ys, frac))
        hu[lumen] = fluid_hu
        hu[lumen & (yy <= level)] = AIR_HU


# -- the parts of a phantom, drawn in this order from one random stream ------------------------
@dataclass
class _Drawing:
    """A phantom being drawn: the random stream, the canvas and anatomy, the two arrays, the
    world coordinates (broadcastable) and what later parts need of earlier ones."""

    rng: np.random.Generator
    cv: _Canvas
    an: _Anatomy
    hu: npt.NDArray[np.float32]
    labels: npt.NDArray[np.uint8]
    x: npt.NDArray[Any]
    y: npt.NDArray[Any]
    z: npt.NDArray[Any]
    body: npt.NDArray[np.bool_] | None = None
    r_body: npt.NDArray[Any] | None = None      # (x/ax)^2 + (y/ay)^2 of the body ellipse
    xw: npt.NDArray[Any] | None = None          # warped coordinates the lungs are drawn in
    yw: npt.NDArray[Any] | None = None
    zw: npt.NDArray[Any] | None = None
    lung_any: npt.NDArray[np.bool_] | None = None

    @classmethod
    def start(cls, rng: np.random.Generator, cv: _Canvas, an: _Anatomy) -> _Drawing:
        shape = (len(cv.z), len(cv.y), len(cv.x))
        return cls(rng=rng, cv=cv, an=an, hu=np.full(shape, AIR_HU, np.float32),
                   labels=np.zeros(shape, np.uint8), x=cv.x[None, None, :],
                   y=cv.y[None, :, None], z=cv.z[:, None, None])

    @property
    def lung_len(self) -> float:
        return float(self.an.z_apex - self.an.z_base)


def _draw_body(d: _Drawing) -> None:
    """An ellipse of fat around soft tissue, slowly narrowing toward the neck."""
    an, x, y, z = d.an, d.x, d.y, d.z
    taper = 1.0 - 0.25 * np.clip((z - an.z_apex + 40) / 120, 0, 1)
    d.r_body = (x / (an.body_ax * taper)) ** 2 + (y / (an.body_ay * taper)) ** 2
    d.body = d.r_body < 1.0
    inner_ax = an.body_ax * taper - an.fat
    inner_ay = an.body_ay * taper - an.fat
    d.hu[d.body] = FAT_HU
    d.hu[d.body & ((x / inner_ax) ** 2 + (y / inner_ay) ** 2 < 1.0)] = SOFT_TISSUE_HU


def _draw_lungs(d: _Drawing) -> None:
    """Two lungs, drawn in smoothly warped coordinates so no two phantoms share a shape: an
    elliptic cross-section, a half-ellipsoid apex in the top 40 %, a domed base."""
    an, rng, cv = d.an, d.rng, d.cv
    shape = d.hu.shape
    sx, sy, sz = cv.spacing
    warp = _warp_fields(rng, (shape[0], shape[1], shape[2]), (sx, sy, sz),
                        amplitude=rng.uniform(4, 14))
    xw, yw, zw = d.x + warp[0], d.y + warp[1], d.z + warp[2]
    d.xw, d.yw, d.zw = xw, yw, zw
    assert d.body is not None
    for lab, sign, ax, dome in ((1, -1.0, an.lung_ax[0], an.dome[0]),
                                (2, 1.0, an.lung_ax[1], an.dome[1])):
        cx = sign * an.lung_cx
        u = (xw - cx) / ax
        v = (yw - an.lung_cy) / an.lung_ay
        r2 = u ** 2 + v ** 2
        t_top = np.clip((zw - (an.z_base + 0.6 * d.lung_len)) / (0.4 * d.lung_len), 0, 1)
        scale = np.sqrt(np.clip(1 - t_top ** 2, 0, 1))
        base = an.z_base + dome * np.clip(1 - r2, 0, 1)
        lung = (r2 < scale ** 2) & (zw > base) & (zw < an.z_apex)
        d.labels[lung & d.body] = lab


def _carve_heart_and_mediastinum(d: _Drawing) -> npt.NDArray[np.bool_]:
    """The heart and mediastinum carve the lungs (the left lung gets a cardiac notch);
    returns the heart."""
    an, xw, yw, zw = d.an, d.xw, d.yw, d.zw
    assert xw is not None and yw is not None and zw is not None
    hx, hy, hz, hax, hay, haz = an.heart
    heart = ((xw - hx) / hax) ** 2 + ((yw - hy) / hay) ** 2 + ((zw - hz) / haz) ** 2 < 1
    med_ax = an.mediastinum_ax
    mediastinum = ((xw - 8) / med_ax) ** 2 + ((yw + 0.1 * an.body_ay) / (0.8 * an.body_ay)) ** 2 < 1
    d.labels[heart | mediastinum] = 0
    d.lung_any = d.labels > 0
    d.hu[d.lung_any] = LUNG_HU
    return np.asarray(heart)


def _lung_texture(d: _Drawing, heart: npt.NDArray[np.bool_]) -> None:
    """Parenchyma: smooth fluctuation plus a posterior (dependent) density gradient; blood
    in the heart."""
    an, cv = d.an, d.cv
    sx, sy, sz = cv.spacing
    assert d.lung_any is not None
    tex = ndimage.gaussian_filter(d.rng.normal(0, 1, d.hu.shape).astype(np.float32),
                                  sigma=(3.0 / sz, 3.0 / sy, 3.0 / sx))
    tex *= 25.0 / max(float(tex.std()), 1e-6)
    grad = 60.0 * np.clip((d.y - an.lung_cy) / an.lung_ay, -1, 1)
    d.hu = np.where(d.lung_any, d.hu + tex + grad, d.hu)
    d.hu[heart] = BLOOD_HU


def _lung_pathology(d: _Drawing) -> None:
    """One or two blobs of consolidation, ground glass or emphysema (part of the lung)."""
    rng, cv, x, y, z = d.rng, d.cv, d.x, d.y, d.z
    assert d.lung_any is not None
    for _ in range(int(rng.integers(1, 3))):
        kind = rng.choice(["consolidation", "ground_glass", "emphysema"])
        idx = np.argwhere(d.lung_any)
        if idx.size == 0:
            break
        k, j, i = idx[int(rng.integers(len(idx)))]
        c = np.array([cv.x[i], cv.y[j], cv.z[k]])
        r = rng.uniform(12, 35)
        blob = (x - c[0]) ** 2 + (y - c[1]) ** 2 + ((z - c[2]) * 0.8) ** 2 < r ** 2
        blob &= d.lung_any
        value = {"consolidation": CONSOLIDATION_HU, "ground_glass": GROUND_GLASS_HU,
                 "emphysema": EMPHYSEMA_HU}[str(kind)]
        d.hu[blob] = value + rng.normal(0, 15)


def _vessels(d: _Drawing) -> None:
    """A vessel tree from each hilum, inside its own lung."""
    an, rng = d.an, d.rng
    for lab, sign in ((1, -1.0), (2, 1.0)):
        hilum = np.array([sign * an.lung_cx * 0.55, an.lung_cy, an.z_base + 0.55 * d.lung_len])
        for direction in ([sign, 0.2, 0.6], [sign, 0.1, -0.7], [sign, -0.6, 0.0],
                          [sign, 0.6, -0.2], [0.5 * sign, 0.8, 0.4], [0.5 * sign, -0.5, -0.6]):
            for a, b, r in _vessel_tree(rng, hilum, np.array(direction, float),
                                        rng.uniform(3, 5.5), 5):
                res = d.cv.tube(a, b, r)
                if res is None:
                    continue
                box, m = res
                m &= d.labels[box] == lab
                d.hu[box][m] = BLOOD_HU + rng.normal(0, 10)


def _nodule(d: _Drawing) -> None:
    """A solid nodule (4-10 mm radius) inside one lung."""
    rng, cv = d.rng, d.cv
    assert d.lung_any is not None
    idx = np.argwhere(d.lung_any)
    if not idx.size:
        return
    k, j, i = idx[int(rng.integers(len(idx)))]
    r = rng.uniform(4, 10)
    centre = np.array([cv.x[i], cv.y[j], cv.z[k]])
    res = cv.tube(centre, centre.copy(), r)
    if res is not None:
        box, m = res
        m &= d.labels[box] > 0
        d.hu[box][m] = NODULE_HU


def _airways(d: _Drawing) -> None:
    """The trachea down the midline and a main bronchus to each lung: air in a soft-tissue
    wall, not lung."""
    an, rng = d.an, d.rng
    carina = np.array([0.0, an.lung_cy - 0.15 * an.lung_ay, an.z_base + 0.62 * d.lung_len])
    top = carina + np.array([0.0, -10.0, 400.0])
    segments = [(top, carina, rng.uniform(7, 10))]
    for sign, angle in ((-1.0, rng.uniform(20, 35)), (1.0, rng.uniform(35, 50))):
        length = rng.uniform(35, 50)
        heading = np.array([sign * np.sin(np.radians(angle)), 0.1, -np.cos(np.radians(angle))])
        segments.append((carina, carina + heading * length, rng.uniform(5, 7)))
    for a, b, r in segments:
        wall = d.cv.tube(a, b, r + 1.5)
        if wall is not None:
            box, m = wall
            d.hu[box][m & (d.labels[box] == 0)] = SOFT_TISSUE_HU
        lumen = d.cv.tube(a, b, r)
        if lumen is not None:
            box, m = lumen
            d.hu[box][m] = AIR_HU
            d.labels[box][m] = 0
        if wall is not None:
            box, m = wall
            d.labels[box][m] = 0


def _aorta_spine_and_ribs(d: _Drawing) -> None:
    """The descending aorta (left of the spine), the spine and the ribs: outside the lungs."""
    an, rng, x, y, z = d.an, d.rng, d.x, d.y, d.z
    assert d.r_body is not None
    spine_y = an.body_ay * 0.72
    aorta = d.cv.tube(np.array([25.0, spine_y - 35, -1000.0]),
                      np.array([25.0, spine_y - 35, 1000.0]), rng.uniform(10, 14))
    if aorta is not None:
        box, m = aorta
        d.hu[box][m] = BLOOD_HU
        d.labels[box][m] = 0
    spine_r = rng.uniform(14, 20)
    d_spine = np.sqrt(x ** 2 + (y - spine_y) ** 2)
    d.hu = np.where(np.broadcast_to(d_spine < spine_r, d.hu.shape), CANCELLOUS_BONE_HU, d.hu)
    d.hu = np.where(np.broadcast_to((d_spine >= spine_r) & (d_spine < spine_r + 2.5),
                                    d.hu.shape), CORTICAL_BONE_HU, d.hu)
    d.labels[np.broadcast_to(d_spine < spine_r + 2.5, d.labels.shape)] = 0
    rib_period = rng.uniform(22, 30)
    rib_phase = rng.uniform(0, rib_period)
    rib_band = np.abs(((z - rib_phase) % rib_period) - rib_period / 2) < 5
    ring = (d.r_body < (1 - (an.fat + 4) / an.body_ay) ** 2) & \
        (d.r_body > (1 - (an.fat + 12) / an.body_ay) ** 2)
    ribs = ring & rib_band & (y > -0.6 * an.body_ay) & (d.labels == 0)  # outside the pleura
    d.hu[ribs] = RIB_HU


def _table_and_field_of_view(d: _Drawing, extent: npt.NDArray[np.float64]) -> None:
    """The table under the patient, and (half the time) the scanner's padding value outside
    the reconstruction circle."""
    x, y = d.x, d.y
    table = (y > d.an.body_ay + 15) & (y < d.an.body_ay + 25) & (np.abs(x) < 200)
    d.hu[np.broadcast_to(table, d.hu.shape)] = TABLE_HU
    # reconstruction circle: many scanners store -1024 (or less) outside it
    if d.rng.random() < 0.5:
        fov_r = 0.5 * min(extent[0], extent[1]) * d.rng.uniform(0.95, 1.0)
        outside = np.broadcast_to(x ** 2 + y ** 2 > fov_r ** 2, d.hu.shape)
        d.hu[outside] = HU_FLOOR
        d.labels[outside] = 0


def make_phantom(
    seed: int = 0,
    shape: tuple[int, int, int] = (64, 128, 128),
    spacing: tuple[float, float, float] = (2.7, 2.7, 5.0),
    *,
    noise_hu: float | None = None,
    blur_mm: float | None = None,
    nodule: bool = True,
    pathology: bool | None = None,
    abdomen: bool | None = False,
    effusion: bool | None = False,
    coverage: Coverage | None = "chest",
) -> tuple[CTVolume, CTVolume]:
    """A chest-CT phantom (int16 HU) and its labels (uint8), on the same grid.

    ``shape`` is (z, y, x); ``spacing`` is (sx, sy, sz) mm. ``noise_hu``, ``blur_mm`` and
    ``pathology`` are drawn from the seed when None.

    ``abdomen``: the upper abdomen under the diaphragm (liver, spleen, stomach with a gas
    bubble and possibly an air-fluid level, gas-containing colon and small bowel, fat).
    ``effusion``: pleural effusion(s), fluid layering posteriorly in the pleural space; it
    replaces lung, so the lung label shrinks. ``coverage="abdomen"``: the volume holds only the
    bottom 20-60 mm of the lungs and the upper abdomen. None draws the option from the seed
    (abdomen with p 0.5, always with coverage "abdomen"; effusion p 0.3; coverage "abdomen"
    p 0.3). These options use generators of their own, so with them off (the default) the
    phantom is exactly the one of earlier versions.
    """
    rng = np.random.default_rng(seed)
    # the options draw from separate streams, never from ``rng``
    u_cov, u_abd, u_eff, u_top = np.random.default_rng([seed, 1]).random(4)
    if coverage is None:
        coverage = "abdomen" if u_cov < 0.3 else "chest"
    if coverage not in ("chest", "abdomen"):
        raise ValueError(f"coverage must be 'chest' or 'abdomen', not {coverage!r}")
    if abdomen is None:
        abdomen = coverage == "abdomen" or bool(u_abd < 0.5)
    if effusion is None:
        effusion = bool(u_eff < 0.3)
    nz, ny, nx = (int(v) for v in shape)
    sx, sy, sz = (float(v) for v in spacing)
    extent = np.array([nx * sx, ny * sy, nz * sz])
    origin = -(np.array([nx - 1, ny - 1, nz - 1]) * np.array([sx, sy, sz])) / 2
    an = _draw_anatomy(rng, float(extent[2]))
    if coverage == "abdomen":
        # top slice 20-60 mm above the lowest point of the lungs
        origin[2] = an.z_base + 20.0 + 40.0 * float(u_top) - (nz - 1) * sz
    cv = _Canvas((nz, ny, nx), (sx, sy, sz), origin)
    noise_hu = float(rng.uniform(8, 45)) if noise_hu is None else noise_hu
    blur_mm = float(rng.uniform(0.3, 1.6)) if blur_mm is None else blur_mm
    pathology = bool(rng.random() < 0.6) if pathology is None else pathology

    d = _Drawing.start(rng, cv, an)
    _draw_body(d)
    _draw_lungs(d)
    heart = _carve_heart_and_mediastinum(d)
    _lung_texture(d, heart)
    if pathology:
        _lung_pathology(d)
    _vessels(d)
    if nodule:
        _nodule(d)
    _airways(d)
    _aorta_spine_and_ribs(d)
    _table_and_field_of_view(d, extent)
    hu, labels = d.hu, d.labels
    xw, yw, zw = d.xw, d.yw, d.zw
    assert xw is not None and yw is not None and zw is not None
    # optional structures, drawn last from their own generators
    if effusion:
        _add_effusion(np.random.default_rng([seed, 3]), hu, labels, an, xw, yw, zw)
    if abdomen:
        _add_abdomen(np.random.default_rng([seed, 2]), hu, cv, an, xw, yw, zw)
    # acquisition: kernel-like blur then noise
    if blur_mm > 0:
        hu = ndimage.gaussian_filter(hu, sigma=(blur_mm / sz, blur_mm / sy, blur_mm / sx))
    hu += rng.normal(0, noise_hu, hu.shape).astype(np.float32)
    image = np.clip(np.rint(hu), HU_FLOOR, 3071).astype(np.int16)
    geometry = Geometry(origin=origin, spacing=(sx, sy, sz))
    meta = VolumeMetadata(modality="CT", source_format="synthetic", manufacturer="medseg",
                          series_description=f"medseg phantom seed {seed}",
                          convolution_kernel=f"blur{blur_mm:.1f}mm",
                          slice_thickness_mm=sz)
    return (CTVolume(image, geometry, meta),
            CTVolume(labels, geometry, VolumeMetadata(source_format="synthetic")))


def write_phantom_study(out_dir: str | Path, seed: int = 0,
                        shape: tuple[int, int, int] = (64, 128, 128),
                        spacing: tuple[float, float, float] = (2.7, 2.7, 5.0),
                        **kwargs: Any) -> dict[str, Path]:
    """Write a phantom as ``dicom/`` (a CT series), ``image.nii.gz`` and ``labels.nii.gz``."""
    from medseg.io import save
    from medseg.io.dicom_write import write_dicom_series

    out = Path(out_dir)
    image, labels = make_phantom(seed, shape, spacing, **kwargs)
    paths = {
        "dicom": out / "dicom",
        "image": save(image, out / "image.nii.gz"),
        "labels": save(labels, out / "labels.nii.gz"),
    }
    write_dicom_series(image, paths["dicom"], uid_seed=f"medseg-phantom-{seed}",
                       series_description=f"medseg phantom seed {seed}")
    return paths
