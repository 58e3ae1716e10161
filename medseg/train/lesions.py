"""Pathology inserted into real CT with labels known by construction.

Every lesion replaces lung voxels only (it is the lung's blob intersected with the lung mask),
so the lung label is unchanged by construction: a mass, a consolidation, a collapse, ground
glass or a cavity is lung, as in lungmask's convention and our model card. A pleural effusion
is the opposite case: fluid in the pleural space that compresses the lung, so its voxels are
taken *out* of the lung label (0 = not lung). The model learns the difference between a dense
lung and fluid outside it from these pairs.

Arrays are in the canonical frame of :mod:`medseg.preprocess`: indexed ``(z, y, x)`` with x
towards the patient's Left, y Posterior, z Superior (LPS), spacing ``(sz, sy, sx)`` in mm.
:func:`medseg.volume.to_canonical` / :func:`~medseg.volume.from_canonical` (re-exported here)
move a :class:`~medseg.volume.CTVolume`'s array there and back (axis permutations and flips
only, exact).

Kinds and where they are placed (``ANCHORS``):

* ``consolidation``: 20-60 mm, 35 +- 20 HU with air bronchograms, against the costal pleura,
  the mediastinum or the base;
* ``mass``: 10-70 mm soft tissue (25-55 HU), against the pleura, the mediastinum, the hilum or
  the spine (paravertebral), some spiculated;
* ``cavity``: a mass with an air-filled centre;
* ``collapse``: 40-90 mm of airless lung (40-70 HU) at the base or the hilum;
* ``ground_glass``: 15-45 mm, +250..+400 HU over the parenchyma (vessels stay visible);
* ``effusion`` (NOT lung): a posterior, dependent crescent of fluid (0-20 HU), thickest at the
  base, 8-40 mm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from medseg.volume import from_canonical, to_canonical

__all__ = ["KINDS", "LUNG_KINDS", "InsertedLesion", "from_canonical", "insert_effusion",
           "insert_lesion", "insert_random_pathology", "to_canonical"]

LUNG_KINDS = ("consolidation", "mass", "cavity", "collapse", "ground_glass")
KINDS = (*LUNG_KINDS, "effusion")
ANCHORS = {
    "consolidation": ("pleura", "mediastinum", "base"),
    "mass": ("pleura", "mediastinum", "hilum", "spine"),
    "cavity": ("pleura", "hilum"),
    "collapse": ("base", "hilum"),
    "ground_glass": ("pleura", "inside"),
}
#: Lesion diameters drawn uniformly (mm).
DIAMETER_MM = {"consolidation": (20.0, 60.0), "mass": (10.0, 70.0), "cavity": (20.0, 50.0),
               "collapse": (40.0, 90.0), "ground_glass": (15.0, 45.0)}


@dataclass
class InsertedLesion:
    kind: str
    anchor: str
    side: int                      # 1 right, 2 left
    diameter_mm: float
    voxels: int
    mask: npt.NDArray[np.bool_] = field(repr=False)


# -- shapes ----------------------------------------------------------------------------------
def _box(centre: npt.NDArray[np.float64], radius_vox: npt.NDArray[np.float64],
         shape: tuple[int, ...]) -> tuple[slice, ...]:
    lo = np.maximum(0, np.floor(centre - radius_vox - 2).astype(int))
    hi = np.minimum(np.asarray(shape), np.ceil(centre + radius_vox + 3).astype(int))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _blob(box: tuple[slice, ...], centre: npt.NDArray[np.float64], radius_mm: float,
          spacing: tuple[float, float, float], rng: np.random.Generator,
          irregular: float = 0.25, spiculated: bool = False) -> npt.NDArray[np.float64]:
    """Normalised distance (< 1 inside) of an irregular blob in ``box``: an ellipsoid with
    random axes whose radius is modulated by a smooth random field."""
    grids = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float64) for s in box],
                        indexing="ij")
    axes = radius_mm * rng.uniform(0.7, 1.3, 3)
    d2 = sum(((g - c) * sp / a) ** 2 for g, c, sp, a in zip(grids, centre, spacing, axes,
                                                              strict=True))
    dist = np.sqrt(d2)
    shape = dist.shape
    noise = rng.normal(0, 1, shape)
    sigma = [max(0.5, 0.35 * radius_mm / sp) for sp in spacing]
    field_ = ndimage.gaussian_filter(noise, sigma)
    field_ /= field_.std() + 1e-6
    dist = dist / (1.0 + irregular * np.clip(field_, -2, 2) * 0.5)
    if spiculated:
        fine = ndimage.gaussian_filter(rng.normal(0, 1, shape),
                                       [max(0.4, 1.0 / sp) for sp in spacing])
        fine /= fine.std() + 1e-6
        dist = dist / (1.0 + 0.25 * np.clip(fine, 0, 3))
    return np.asarray(dist)


def _soft_paint(hu: npt.NDArray[np.float32], box: tuple[slice, ...],
                inside: npt.NDArray[np.bool_], value: npt.NDArray[np.float32] | float,
                edge_sigma_vox: float = 0.6) -> None:
    """Replace ``hu[box]`` by ``value`` where ``inside``, blending a partial-volume edge
    (the blend never reaches outside ``inside``'s one-voxel dilation)."""
    alpha = ndimage.gaussian_filter(inside.astype(np.float32), edge_sigma_vox)
    alpha = np.where(inside, np.maximum(alpha, 0.5), alpha * ndimage.binary_dilation(inside))
    alpha = np.clip(alpha * 1.6, 0, 1)
    sub = hu[box]
    sub[...] = sub * (1 - alpha) + np.asarray(value, np.float32) * alpha


def _texture(shape: tuple[int, ...], mean: float, sd: float, rng: np.random.Generator,
             smooth_vox: float = 1.0) -> npt.NDArray[np.float32]:
    t = ndimage.gaussian_filter(rng.normal(0, 1, shape), smooth_vox)
    t /= t.std() + 1e-6
    noise = rng.normal(0, sd * 0.5, shape)
    return np.asarray(mean + sd * t + noise, np.float32)


# -- where ------------------------------------------------------------------------------------
def _anchor_voxel(lung: npt.NDArray[np.bool_], other: npt.NDArray[np.bool_], anchor: str,
                  rng: np.random.Generator) -> npt.NDArray[np.float64] | None:
    """A voxel (z, y, x) of ``lung`` at the named place, or None."""
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    if zs.size < 3:
        return None
    z_lo, z_hi = int(zs[0]), int(zs[-1])
    edge = lung & ~ndimage.binary_erosion(lung)
    pts = np.argwhere(edge if anchor not in ("inside", "hilum") else lung)
    if pts.size == 0:
        return None
    x_lung = pts[:, 2].astype(float)
    x_other = float(np.argwhere(other)[:, 2].mean()) if other.any() else None
    x_mid = float(np.median(x_lung))
    # medial direction: towards the other lung (or the body middle when it is absent)
    medial_sign = np.sign((x_other if x_other is not None else lung.shape[2] / 2) - x_mid) or 1
    rel_x = (x_lung - x_mid) * medial_sign  # > 0 medial
    span = max(1.0, float(np.ptp(x_lung)))
    zf = (pts[:, 0] - z_lo) / max(1, z_hi - z_lo)  # 0 base .. 1 apex
    y = pts[:, 1].astype(float)
    yf = (y - y.min()) / max(1.0, float(np.ptp(y)))  # 0 anterior .. 1 posterior
    if anchor == "pleura":
        ok = (rel_x < -0.15 * span) | (yf < 0.15) | (yf > 0.85)
    elif anchor == "mediastinum":
        ok = (rel_x > 0.3 * span) & (zf > 0.15) & (zf < 0.85)
    elif anchor == "spine":
        ok = (rel_x > 0.2 * span) & (yf > 0.7)
    elif anchor == "hilum":
        ok = (rel_x > 0.15 * span) & (zf > 0.35) & (zf < 0.7) & (yf > 0.3) & (yf < 0.7)
    elif anchor == "base":
        ok = zf < 0.25
    else:  # inside
        ok = (zf > 0.1) & (zf < 0.9)
    cand = pts[ok]
    if cand.size == 0:
        cand = pts
    return np.asarray(cand[int(rng.integers(len(cand)))], float)


def _lung_sides(labels: npt.NDArray[Any]) -> list[int]:
    return [s for s in (1, 2) if (labels == s).any()]


# -- insertion -------------------------------------------------------------------------------
def insert_lesion(hu: npt.NDArray[np.float32], labels: npt.NDArray[Any],
                  spacing: tuple[float, float, float], rng: np.random.Generator,
                  kind: str, anchor: str | None = None, side: int | None = None,
                  diameter_mm: float | None = None) -> InsertedLesion | None:
    """Insert one lung lesion in place (``hu`` changes, ``labels`` do not: the lesion is lung).
    Returns what was inserted (its voxel mask over the whole array), or None if there was no
    place for it."""
    if kind not in LUNG_KINDS:
        raise ValueError(f"unknown lesion kind {kind!r}; choose from {', '.join(LUNG_KINDS)}")
    sides = _lung_sides(labels)
    if not sides:
        return None
    side = side if side in sides else int(rng.choice(sides))
    anchor = anchor or str(rng.choice(ANCHORS[kind]))
    lung = labels == side
    other = (labels > 0) & ~lung
    where = _anchor_voxel(lung, other, anchor, rng)
    if where is None:
        return None
    lo, hi = DIAMETER_MM[kind]
    diameter = float(diameter_mm or rng.uniform(lo, hi))
    r = diameter / 2
    sp = np.asarray(spacing, float)
    # centred on the lung's edge at the anchor: cut by the lung mask, the lesion fills the
    # lung side and abuts the wall (pleura, mediastinum, spine) flat, as real ones do
    box = _box(where, np.full(3, r * 1.4) / sp, hu.shape)
    dist = _blob(box, where, r, spacing, rng, irregular=0.35 if kind != "mass" else 0.2,
                 spiculated=kind == "mass" and rng.random() < 0.4)
    inside = (dist < 1.0) & lung[box]
    if inside.sum() < 3:
        return None
    shape = inside.shape
    if kind == "consolidation":
        value = _texture(shape, 35.0, 20.0, rng)
        value = _air_bronchograms(value, inside, where, box, spacing, rng)
    elif kind == "mass":
        value = _texture(shape, float(rng.uniform(25, 55)), 12.0, rng)
    elif kind == "cavity":
        value = _texture(shape, float(rng.uniform(25, 50)), 12.0, rng)
        wall = float(rng.uniform(3, 8))
        value[dist < max(0.2, 1.0 - wall / r)] = np.float32(-990.0)
        value += rng.normal(0, 15, shape).astype(np.float32)
    elif kind == "collapse":
        value = _texture(shape, float(rng.uniform(40, 70)), 12.0, rng)
    else:  # ground glass: parenchyma raised, structure kept
        sub = hu[box]
        value = np.minimum(sub + np.float32(rng.uniform(250, 400)), -250.0).astype(np.float32)
        value = np.maximum(value, sub)
    _soft_paint(hu, box, inside, value)
    mask = np.zeros(hu.shape, bool)
    mask[box] = inside
    return InsertedLesion(kind, anchor, side, diameter, int(inside.sum()), mask)


def _air_bronchograms(value: npt.NDArray[np.float32], inside: npt.NDArray[np.bool_],
                      centre: npt.NDArray[np.float64], box: tuple[slice, ...],
                      spacing: tuple[float, float, float], rng: np.random.Generator
                      ) -> npt.NDArray[np.float32]:
    """Two to four air-filled tubes (radius 1-2.5 mm) branching through a consolidation."""
    grids = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float64) for s in box],
                        indexing="ij")
    pts = np.stack([g * sp for g, sp in zip(grids, spacing, strict=True)], -1)
    c = centre * np.asarray(spacing)
    out = value.copy()
    for _ in range(int(rng.integers(2, 5))):
        d = rng.normal(0, 1, 3)
        d /= np.linalg.norm(d)
        length = float(rng.uniform(15, 40))
        a, b = c - d * length * 0.5, c + d * length * 0.5
        ab = b - a
        t = np.clip(((pts - a) @ ab) / (ab @ ab), 0, 1)
        dist = np.linalg.norm(pts - (a + t[..., None] * ab), axis=-1)
        radius = float(rng.uniform(1.0, 2.5))
        tube = (dist < radius) & inside
        out[tube] = np.float32(-900.0) + rng.normal(0, 30, int(tube.sum())).astype(np.float32)
    return out


def insert_effusion(hu: npt.NDArray[np.float32], labels: npt.NDArray[Any],
                    spacing: tuple[float, float, float], rng: np.random.Generator,
                    side: int | None = None, depth_mm: float | None = None
                    ) -> InsertedLesion | None:
    """A dependent (posterior) pleural effusion at one lung's base: fluid replaces the
    lung's posterior part, thickest at the base and thinning upwards; those voxels become
    label 0 (not lung). ``hu`` and ``labels`` change in place."""
    sides = _lung_sides(labels)
    if not sides:
        return None
    side = side if side in sides else int(rng.choice(sides))
    lung = labels == side
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    if zs.size < 3:
        return None
    depth = float(depth_mm or rng.uniform(8, 40))
    height = float(rng.uniform(2.0, 5.0)) * depth  # how far up it reaches (mm)
    z_base = int(zs[0])
    eff = np.zeros(lung.shape, bool)
    # per slice: lung voxels within t(z) mm of the lung's posterior edge in their column
    for z in zs:
        above = (z - z_base) * spacing[0]
        t = depth * max(0.0, 1.0 - above / height) ** 0.7
        if t <= 0:
            break
        sl = lung[z]
        cols = np.flatnonzero(sl.any(axis=0))
        if cols.size == 0:
            continue
        # posterior edge per column: the largest y of the lung in that column
        post = sl.shape[0] - 1 - np.argmax(sl[::-1, :], axis=0)
        yy = np.arange(sl.shape[0])[:, None]
        band = sl & (yy > post[None, :] - t / spacing[1])
        eff[z] = band
    # the fluid is a smooth layer: open a little so single voxels do not remain
    eff = ndimage.binary_opening(eff, iterations=1) & lung
    if eff.sum() < 10:
        return None
    box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in np.nonzero(eff))
    inside = eff[box]
    value = _texture(inside.shape, float(rng.uniform(0, 20)), 6.0, rng, smooth_vox=1.5)
    _soft_paint(hu, box, inside, value)
    labels[eff] = 0
    return InsertedLesion("effusion", "base", side, depth, int(eff.sum()), eff)


def insert_random_pathology(hu: npt.NDArray[np.float32], labels: npt.NDArray[Any],
                            spacing: tuple[float, float, float], rng: np.random.Generator,
                            n_lesions: int = 3, effusion_probability: float = 0.3
                            ) -> list[InsertedLesion]:
    """``n_lesions`` lesions of random kinds and, with the given probability, an effusion."""
    out = []
    for _ in range(n_lesions):
        kind = str(rng.choice(LUNG_KINDS, p=[0.3, 0.3, 0.1, 0.15, 0.15]))
        les = insert_lesion(hu, labels, spacing, rng, kind)
        if les is not None:
            out.append(les)
    if rng.random() < effusion_probability:
        eff = insert_effusion(hu, labels, spacing, rng)
        if eff is not None:
            out.append(eff)
    return out
