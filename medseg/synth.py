"""Synthetic chest-CT phantoms with exact lung labels.

``make_phantom(seed)`` draws a chest from the seed: body with subcutaneous fat, two lungs
(domed bases, rounded apices, the left one smaller with a cardiac notch), heart, spine, ribs,
aorta, trachea and main bronchi, branching vessels and a nodule inside the lungs, optional
pathology (consolidation against the pleura, ground glass, emphysema), parenchymal texture,
a kernel-like blur and noise. Labels: 0 background, 1 right lung, 2 left lung. The lungs
include their vessels, nodules and pathology (everything inside the pleura) and exclude the
trachea and main bronchi.

World frame: LPS (x to patient Left, y Posterior, z Superior), identity direction, so the
right lung (label 1) lies at smaller x. Deterministic: the same seed gives the same arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from medseg.volume import CTVolume, Geometry, VolumeMetadata

__all__ = ["make_phantom", "write_phantom_study"]

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


def make_phantom(
    seed: int = 0,
    shape: tuple[int, int, int] = (64, 128, 128),
    spacing: tuple[float, float, float] = (2.7, 2.7, 5.0),
    *,
    noise_hu: float | None = None,
    blur_mm: float | None = None,
    nodule: bool = True,
    pathology: bool | None = None,
) -> tuple[CTVolume, CTVolume]:
    """A chest-CT phantom (int16 HU) and its labels (uint8), on the same grid.

    ``shape`` is (z, y, x); ``spacing`` is (sx, sy, sz) mm. ``noise_hu``, ``blur_mm`` and
    ``pathology`` are drawn from the seed when None.
    """
    rng = np.random.default_rng(seed)
    nz, ny, nx = (int(v) for v in shape)
    sx, sy, sz = (float(v) for v in spacing)
    extent = np.array([nx * sx, ny * sy, nz * sz])
    origin = -(np.array([nx - 1, ny - 1, nz - 1]) * np.array([sx, sy, sz])) / 2
    cv = _Canvas((nz, ny, nx), (sx, sy, sz), origin)
    an = _draw_anatomy(rng, float(extent[2]))
    noise_hu = float(rng.uniform(8, 45)) if noise_hu is None else noise_hu
    blur_mm = float(rng.uniform(0.3, 1.6)) if blur_mm is None else blur_mm
    pathology = bool(rng.random() < 0.6) if pathology is None else pathology

    z = cv.z[:, None, None]
    y = cv.y[None, :, None]
    x = cv.x[None, None, :]
    # body: an ellipse slowly narrowing toward the neck
    taper = 1.0 - 0.25 * np.clip((z - an.z_apex + 40) / 120, 0, 1)
    r_body = (x / (an.body_ax * taper)) ** 2 + (y / (an.body_ay * taper)) ** 2
    hu = np.full((nz, ny, nx), AIR_HU, np.float32)
    body = r_body < 1.0
    inner_ax = an.body_ax * taper - an.fat
    inner_ay = an.body_ay * taper - an.fat
    hu[body] = FAT_HU
    hu[body & ((x / inner_ax) ** 2 + (y / inner_ay) ** 2 < 1.0)] = SOFT_TISSUE_HU

    # lungs, drawn in smoothly warped coordinates so no two phantoms share a shape
    warp = _warp_fields(rng, (nz, ny, nx), (sx, sy, sz), amplitude=rng.uniform(4, 14))
    xw, yw, zw = x + warp[0], y + warp[1], z + warp[2]
    labels = np.zeros((nz, ny, nx), np.uint8)
    lung_len = an.z_apex - an.z_base
    for lab, sign, ax, dome in ((1, -1.0, an.lung_ax[0], an.dome[0]),
                                (2, 1.0, an.lung_ax[1], an.dome[1])):
        cx = sign * an.lung_cx
        u = (xw - cx) / ax
        v = (yw - an.lung_cy) / an.lung_ay
        r2 = u ** 2 + v ** 2
        # apex: cross-section shrinks like a half ellipsoid in the top 40 %
        t_top = np.clip((zw - (an.z_base + 0.6 * lung_len)) / (0.4 * lung_len), 0, 1)
        scale = np.sqrt(np.clip(1 - t_top ** 2, 0, 1))
        # base: a dome, higher in the middle of the lung
        base = an.z_base + dome * np.clip(1 - r2, 0, 1)
        lung = (r2 < scale ** 2) & (zw > base) & (zw < an.z_apex)
        labels[lung & body] = lab
    # heart and mediastinum carve the lungs (the left lung gets a cardiac notch)
    hx, hy, hz, hax, hay, haz = an.heart
    heart = ((xw - hx) / hax) ** 2 + ((yw - hy) / hay) ** 2 + ((zw - hz) / haz) ** 2 < 1
    med_ax = an.mediastinum_ax
    mediastinum = ((xw - 8) / med_ax) ** 2 + ((yw + 0.1 * an.body_ay) / (0.8 * an.body_ay)) ** 2 < 1
    labels[heart | mediastinum] = 0
    lung_any = labels > 0
    hu[lung_any] = LUNG_HU
    # texture: smooth fluctuation plus a posterior (dependent) density gradient
    tex = ndimage.gaussian_filter(rng.normal(0, 1, (nz, ny, nx)).astype(np.float32),
                                  sigma=(3.0 / sz, 3.0 / sy, 3.0 / sx))
    tex *= 25.0 / max(float(tex.std()), 1e-6)
    grad = 60.0 * np.clip((y - an.lung_cy) / an.lung_ay, -1, 1)
    hu = np.where(lung_any, hu + tex + grad, hu)
    hu[heart] = BLOOD_HU

    # pathology inside the lungs (part of the lung label)
    if pathology:
        for _ in range(int(rng.integers(1, 3))):
            kind = rng.choice(["consolidation", "ground_glass", "emphysema"])
            idx = np.argwhere(lung_any)
            if idx.size == 0:
                break
            k, j, i = idx[int(rng.integers(len(idx)))]
            c = np.array([cv.x[i], cv.y[j], cv.z[k]])
            r = rng.uniform(12, 35)
            blob = (x - c[0]) ** 2 + (y - c[1]) ** 2 + ((z - c[2]) * 0.8) ** 2 < r ** 2
            blob &= lung_any
            value = {"consolidation": CONSOLIDATION_HU, "ground_glass": GROUND_GLASS_HU,
                     "emphysema": EMPHYSEMA_HU}[str(kind)]
            hu[blob] = value + rng.normal(0, 15)
    # vessels: a tree from each hilum
    for lab, sign in ((1, -1.0), (2, 1.0)):
        hilum = np.array([sign * an.lung_cx * 0.55, an.lung_cy, an.z_base + 0.55 * lung_len])
        for d in ([sign, 0.2, 0.6], [sign, 0.1, -0.7], [sign, -0.6, 0.0], [sign, 0.6, -0.2],
                  [0.5 * sign, 0.8, 0.4], [0.5 * sign, -0.5, -0.6]):
            for a, b, r in _vessel_tree(rng, hilum, np.array(d, float), rng.uniform(3, 5.5), 5):
                res = cv.tube(a, b, r)
                if res is None:
                    continue
                box, m = res
                m &= labels[box] == lab
                hu[box][m] = BLOOD_HU + rng.normal(0, 10)
    # nodule, inside one lung
    if nodule:
        idx = np.argwhere(lung_any)
        if idx.size:
            k, j, i = idx[int(rng.integers(len(idx)))]
            r = rng.uniform(4, 10)
            res = cv.tube(np.array([cv.x[i], cv.y[j], cv.z[k]]),
                          np.array([cv.x[i], cv.y[j], cv.z[k]]), r)
            if res is not None:
                box, m = res
                m &= labels[box] > 0
                hu[box][m] = NODULE_HU
    # airways: trachea down the midline, main bronchi to each lung; not lung
    carina = np.array([0.0, an.lung_cy - 0.15 * an.lung_ay, an.z_base + 0.62 * lung_len])
    top = carina + np.array([0.0, -10.0, 400.0])
    airway_segments = [(top, carina, rng.uniform(7, 10))]
    for sign, angle in ((-1.0, rng.uniform(20, 35)), (1.0, rng.uniform(35, 50))):
        length = rng.uniform(35, 50)
        heading = np.array([sign * np.sin(np.radians(angle)), 0.1, -np.cos(np.radians(angle))])
        airway_segments.append((carina, carina + heading * length, rng.uniform(5, 7)))
    for a, b, r in airway_segments:
        wall = cv.tube(a, b, r + 1.5)
        if wall is not None:
            box, m = wall
            hu[box][m & (labels[box] == 0)] = SOFT_TISSUE_HU
        lumen = cv.tube(a, b, r)
        if lumen is not None:
            box, m = lumen
            hu[box][m] = AIR_HU
            labels[box][m] = 0
        if wall is not None:
            box, m = wall
            labels[box][m] = 0
    # aorta (descending, left of the spine) and spine and ribs: outside the lungs
    spine_y = an.body_ay * 0.72
    aorta = cv.tube(np.array([25.0, spine_y - 35, -1000.0]), np.array([25.0, spine_y - 35, 1000.0]),
                    rng.uniform(10, 14))
    if aorta is not None:
        box, m = aorta
        hu[box][m] = BLOOD_HU
        labels[box][m] = 0
    spine_r = rng.uniform(14, 20)
    d_spine = np.sqrt(x ** 2 + (y - spine_y) ** 2)
    hu = np.where(np.broadcast_to(d_spine < spine_r, hu.shape), CANCELLOUS_BONE_HU, hu)
    hu = np.where(np.broadcast_to((d_spine >= spine_r) & (d_spine < spine_r + 2.5), hu.shape),
                  CORTICAL_BONE_HU, hu)
    labels[np.broadcast_to(d_spine < spine_r + 2.5, labels.shape)] = 0
    rib_period = rng.uniform(22, 30)
    rib_phase = rng.uniform(0, rib_period)
    rib_band = np.abs(((z - rib_phase) % rib_period) - rib_period / 2) < 5
    ring = (r_body < (1 - (an.fat + 4) / an.body_ay) ** 2) & \
        (r_body > (1 - (an.fat + 12) / an.body_ay) ** 2)
    ribs = ring & rib_band & (y > -0.6 * an.body_ay) & (labels == 0)  # outside the pleura
    hu[ribs] = RIB_HU
    # table under the patient
    table = (y > an.body_ay + 15) & (y < an.body_ay + 25) & (np.abs(x) < 200)
    hu[np.broadcast_to(table, hu.shape)] = TABLE_HU
    # reconstruction circle: many scanners store -1024 (or less) outside it
    if rng.random() < 0.5:
        fov_r = 0.5 * min(extent[0], extent[1]) * rng.uniform(0.95, 1.0)
        outside = np.broadcast_to(x ** 2 + y ** 2 > fov_r ** 2, hu.shape)
        hu[outside] = HU_FLOOR
        labels[outside] = 0
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
