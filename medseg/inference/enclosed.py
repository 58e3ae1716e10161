"""Dense tissue enclosed by a lung: tumour, consolidation, collapse that the network left out.

lungmask's convention (and medseg's) is that everything inside the pleura is lung: a mass
against the chest wall or the mediastinum, consolidation, collapse. A 2D network that sees
three slices calls part of such a lesion chest wall or mediastinum when it lies flat against
them (the robustness suite: 79 % of inserted masses and 51 % of consolidation inside
lung2d-v2's raw mask). The lesion leaves a *bite* in the lung's outline that a healthy lung
does not have; this step puts soft tissue back into the lung where the lung closes around it
in 3D (:func:`add_enclosed_tissue`). See ``docs/concepts/segmentation.md``.

Tissue needs the same lung above *and* below it, which keeps the liver and spleen under the
domes out, and with them every lesion that rests on something that is not lung:
consolidation lying on the aortic arch or filling the lowest recess (the robustness suite:
24 % and 19 % of two inserted consolidations inside lung2d-v8's mask). An **air
bronchogram**, the radiologist's sign that dense tissue is consolidated lung, lifts that
test: soft tissue inside the closing with the lung above *or* below it is taken when it
wraps a small gas pocket that no lung holds (an airway through the consolidation), in the
same connected piece (:func:`_bronchograms`). Effusions (no gas), masses (no airways) and
the organs under the domes are not affected; the suite's two consolidations go to 83 % and
78 % inside, every other row of the suite is unchanged (docs/model-card.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from medseg.inference.postprocess import bounding_box, per_lung
from medseg.volume import canonical_view

if TYPE_CHECKING:
    from medseg.volume import Geometry

__all__ = ["CLOSE_MM", "GAS_CONTACT_FRACTION", "SOFT_TISSUE_HU", "Z_REACH_MM",
           "add_enclosed_tissue"]

#: Radius (mm) of the ball of the 3D morphological closing of each lung: a bite narrower
#: than about twice this (a lesion up to about 4 cm across, and the flat part of a larger
#: one) is inside the closed lung. The lung's own concavities are much wider (the heart,
#: the diaphragm's dome: radii of curvature of 5-10 cm) and stay open, except at their rims.
CLOSE_MM = 20.0
#: A voxel is enclosed only if the same lung lies within this distance (mm) both above and
#: below it in its column: a lesion has lung over and under it; the liver and spleen under
#: the diaphragm's dome, the heart on the diaphragm and a posterior pleural effusion
#: (fluid lies in the lowest recess) do not have lung under them.
Z_REACH_MM = 30.0
#: The lung is opened by this many steps of the grid (about 6 mm) before it counts as lung
#: above or below: a network's false, thin sheet of lung inside the liver's dome (seen on
#: LIDC-IDRI-0001) must not vouch for the liver above it.
OPEN_STEPS = 2
#: Only soft tissue is put back (HU): tumour, consolidation, collapse, mucus are about 0-100
#: HU, a little more with contrast; fat (-100, e.g. the pericardial fat pad) is left out,
#: and so are contrast-filled vessels and the heart's blood (150-400 HU) and bone.
SOFT_TISSUE_HU = (-30.0, 150.0)
#: A piece of enclosed tissue with more than this fraction of its voxels next to gas that
#: is not lung is bowel or stomach wall under the lung (its gas is not lung), not a lesion.
GAS_CONTACT_FRACTION = 0.05
#: Pieces smaller than this (mL) are specks at the lung's rim, not a lesion left out.
MIN_PIECE_ML = 0.1
#: Gas not labelled lung (HU below this) for that rule.
GAS_HU = -800.0
#: Air bronchograms (:func:`_bronchograms`): a gas pocket that no lung holds, of
#: BRONCHOGRAM_MIN_ML to BRONCHOGRAM_MAX_ML and at least BRONCHOGRAM_MIN_VOXELS voxels, whose
#: face neighbours are at least BRONCHOGRAM_SHELL soft tissue inside the lung's closing or
#: that lung, at least BRONCHOGRAM_TISSUE of them that tissue, with that lung within
#: BRONCHOGRAM_LUNG_MM in its slices. The suite's airways through inserted consolidation are
#: 0.01-0.09 mL, their neighbours 51-75 % tissue and the rest lung; the maximum keeps a gas
#: pocket of a bowel loop or a cavity (about 1 mL) to the rule's gas-contact test; the
#: minimum size keeps noise out (the sample phantom's single voxels of soft tissue under
#: -800 HU next to the lung's floor made it add 162 mL of abdomen); the lung in the
#: pocket's slices keeps gas under the domes out. Chosen on the robustness suite and the
#: seven shared studies (none of which changes but cip-ct64, by 2.6 mL at its right hilum).
BRONCHOGRAM_MAX_ML = 0.3
BRONCHOGRAM_MIN_ML = 0.01
BRONCHOGRAM_MIN_VOXELS = 3
BRONCHOGRAM_SHELL = 0.9
BRONCHOGRAM_TISSUE = 0.45
BRONCHOGRAM_LUNG_MM = 10.0
#: Pockets are looked for in the new tissue's box grown by this (mm).
BRONCHOGRAM_BOX_MM = 20.0
#: The closing is computed on a grid of about this step (mm); the result is interpolated
#: back to every voxel, so the step costs well under a second on a 512 x 512 study.
GRID_MM = 3.0
#: The air-bronchogram extension of the rule (False: the over-and-under test alone).
BRONCHOGRAMS = True


def _reach(mask: npt.NDArray[np.bool_], k: int
           ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Where ``mask`` holds a voxel at most ``k`` steps after, and where at most ``k`` steps
    before, along axis 0 (the voxel itself excluded)."""
    n = mask.shape[0]
    idx = np.arange(n).reshape(-1, 1, 1)
    far = 10 * n + 10 * k + 10
    edge = np.full((1, *mask.shape[1:]), far)
    nxt = np.minimum.accumulate(np.where(mask, idx, far)[::-1], axis=0)[::-1]
    nxt = np.concatenate([nxt[1:], edge], axis=0)
    prv = np.maximum.accumulate(np.where(mask, idx, -far), axis=0)
    prv = np.concatenate([-edge, prv[:-1]], axis=0)
    return np.asarray(nxt - idx <= k), np.asarray(idx - prv <= k)


def _shifted(pts: tuple[npt.NDArray[np.intp], ...], axis: int, d: int,
             shape: tuple[int, ...]) -> tuple[npt.NDArray[np.intp], ...]:
    """Voxel indices ``pts`` moved by ``d`` along ``axis`` (clipped at the array's edge)."""
    return tuple(np.clip(q + d, 0, n - 1) if a == axis else q
                 for a, (q, n) in enumerate(zip(pts, shape, strict=True)))


def _candidates(lung: npt.NDArray[np.bool_], any_lung: npt.NDArray[np.bool_],
                hu: npt.NDArray[Any], spacing: tuple[float, float, float],
                modes: tuple[bool, ...] = (True,)) -> list[tuple[npt.NDArray[np.intp], ...]]:
    """For each of ``modes``: the soft-tissue voxels (indices) inside one lung's closing with
    that lung within :data:`Z_REACH_MM` above and below it (True), or above or below it
    but not both (False). The closing is computed once for all."""
    step = [max(1, round(GRID_MM / s)) for s in spacing]
    grid = [s * t for s, t in zip(spacing, step, strict=True)]
    off = [t // 2 for t in step]
    coarse = lung[off[0]::step[0], off[1]::step[1], off[2]::step[2]]
    # closing = the points farther than CLOSE_MM from everything outside the dilation
    dist_out = ndimage.distance_transform_edt(~coarse, sampling=grid)
    closed_depth = ndimage.distance_transform_edt(dist_out <= CLOSE_MM, sampling=grid)
    # over and under: the lung without its thin sheets (a network's false sheet of lung
    # inside the liver's dome must not vouch for the liver above it)
    solid = ndimage.binary_opening(coarse, ndimage.generate_binary_structure(3, 1),
                                   iterations=OPEN_STEPS)
    after, before = _reach(solid, int(np.ceil(Z_REACH_MM / grid[0])))
    both_ways = after & before
    inner = ~ndimage.binary_erosion(coarse)
    return [_candidate_voxels(lung, any_lung, hu, closed_depth, inner,
                              both_ways if both else (after | before) & ~both_ways,
                              step, grid, off)
            for both in modes]


def _candidate_voxels(lung: npt.NDArray[np.bool_], any_lung: npt.NDArray[np.bool_],
                      hu: npt.NDArray[Any], closed_depth: npt.NDArray[np.float64],
                      inner: npt.NDArray[np.bool_], reach: npt.NDArray[np.bool_],
                      step: list[int], grid: list[float], off: list[int]
                      ) -> tuple[npt.NDArray[np.intp], ...]:
    """:func:`_candidates` for one reach."""
    coarse_shape = closed_depth.shape
    # cells that may hold enclosed tissue: near the closing's inside, lung over and under,
    # not deep inside the lung (its holes are filled later anyway)
    near = (closed_depth > CLOSE_MM - max(grid)) & reach & inner
    if not near.any():
        return tuple(np.zeros(0, np.intp) for _ in range(3))
    up = near
    for axis in range(3):
        up = np.repeat(up, step[axis], axis=axis)
    # cell k covers the voxels k * step .. (k + 1) * step - 1 (its sample is in the middle)
    up = np.pad(up, [(0, max(0, n - u)) for n, u in zip(lung.shape, up.shape, strict=True)]
                )[:lung.shape[0], :lung.shape[1], :lung.shape[2]]
    pts = np.nonzero(up & ~any_lung)
    # the HU test on a 3 x 3 in-plane mean: noise alone must not make fat soft tissue
    mean = np.zeros(pts[0].shape, np.float32)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            mean += hu[pts[0], np.clip(pts[1] + dy, 0, lung.shape[1] - 1),
                       np.clip(pts[2] + dx, 0, lung.shape[2] - 1)]
    mean /= 9
    lo, hi = SOFT_TISSUE_HU
    soft = (mean > lo) & (mean < hi)
    pts = tuple(p[soft] for p in pts)
    depth = ndimage.map_coordinates(
        closed_depth, np.stack([(p - o) / t for p, o, t in zip(pts, off, step, strict=True)]),
        order=1, mode="nearest")
    # the closing on a coarse grid is blurred by about a cell: a voxel a little less deep
    # is taken too when a surely enclosed voxel lies in its cell or a neighbouring one (the
    # edge of a lesion against the chest wall), never elsewhere along the lung's surface
    sure = depth > CLOSE_MM
    rim = ~sure & (depth > CLOSE_MM - max(grid))
    if rim.any() and sure.any():
        cells = tuple(np.minimum(p // t, n - 1)
                      for p, t, n in zip(pts, step, coarse_shape, strict=True))
        occupied = np.zeros(coarse_shape, bool)
        occupied[tuple(c[sure] for c in cells)] = True
        occupied = ndimage.binary_dilation(occupied, np.ones((3, 3, 3), bool))
        sure |= rim & occupied[cells]
    pts = tuple(p[sure] for p in pts)
    return pts


def _near_gas(pts: tuple[npt.NDArray[np.intp], ...], hu: npt.NDArray[Any],
              any_lung: npt.NDArray[np.bool_], ignore: npt.NDArray[np.bool_] | None = None
              ) -> npt.NDArray[np.bool_]:
    """Which of the voxels ``pts`` have a face neighbour that is gas and no lung (and not in
    ``ignore``)."""
    near_gas = np.zeros(pts[0].shape, bool)
    for axis in range(3):
        for d in (-1, 1):
            nb = _shifted(pts, axis, d, hu.shape)
            gas = (hu[nb] < GAS_HU) & ~any_lung[nb]
            if ignore is not None:
                gas &= ~ignore[nb]
            near_gas |= gas
    return near_gas


def _pieces(pts: tuple[npt.NDArray[np.intp], ...], shape: tuple[int, ...],
            near_gas: npt.NDArray[np.bool_], voxel_ml: float,
            extra: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.bool_]:
    """The connected pieces of the voxels ``pts`` that border gas on at most
    :data:`GAS_CONTACT_FRACTION` of their voxels and hold at least :data:`MIN_PIECE_ML`
    (and, with ``extra``, touch it)."""
    found = np.zeros(shape, bool)
    if pts[0].size == 0:
        return found
    box = tuple(slice(int(p.min()), int(p.max()) + 1) for p in pts)
    found[pts] = True
    comp, n = ndimage.label(found[box])
    ids = comp[tuple(p - b.start for p, b in zip(pts, box, strict=True))]
    sizes = np.bincount(ids, minlength=n + 1)
    gas_n = np.bincount(ids[near_gas], minlength=n + 1)
    keep = (gas_n <= GAS_CONTACT_FRACTION * sizes) & (sizes * voxel_ml >= MIN_PIECE_ML)
    if extra is not None:
        grown = ndimage.binary_dilation(extra[box], ndimage.generate_binary_structure(3, 1),
                                        iterations=3)
        touching = np.zeros(n + 1, bool)
        touching[np.unique(comp[grown & (comp > 0)])] = True
        keep &= touching
    keep[0] = False
    found[box] = keep[comp]
    return found


def _bronchograms(tissue: npt.NDArray[np.bool_], new: npt.NDArray[np.bool_],
                  lung: npt.NDArray[np.bool_], any_lung: npt.NDArray[np.bool_],
                  hu: npt.NDArray[Any], spacing: tuple[float, float, float]
                  ) -> npt.NDArray[np.bool_]:
    """Gas pockets beside the tissue ``new`` that no lung holds, small
    (:data:`BRONCHOGRAM_MIN_ML` to :data:`BRONCHOGRAM_MAX_ML`) and wrapped in ``tissue`` and
    ``lung`` (:data:`BRONCHOGRAM_SHELL`, at least :data:`BRONCHOGRAM_TISSUE` of it
    ``tissue``), with that lung within :data:`BRONCHOGRAM_LUNG_MM` in their slices: the
    air bronchograms of consolidated lung (or the air of a small cavity)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out = np.zeros(hu.shape, bool)
    margin = [int(np.ceil(BRONCHOGRAM_BOX_MM / s)) for s in spacing]
    box = bounding_box(new, margin=0)
    if box is None:
        return out
    box = tuple(slice(max(0, q.start - m), q.stop + m) for q, m in zip(box, margin, strict=True))
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    gas = (hu[box] < GAS_HU) & ~any_lung[box]
    comp, n = ndimage.label(gas)
    if n == 0:
        return out
    # only the pieces of gas within three voxels (in the slice) of the new tissue
    near = ndimage.binary_dilation(new[box], in_plane, iterations=3) & gas
    wanted = np.zeros(n + 1, bool)
    wanted[np.unique(comp[near])] = True
    # gas running into the box's border is part of a larger piece (an airway, the lung's
    # rim), whatever the box shows of it
    for axis in range(3):
        for end in (0, -1):
            wanted[np.unique(np.take(comp, end, axis=axis))] = False
    wanted[0] = False
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    wanted &= (sizes * voxel_ml <= BRONCHOGRAM_MAX_ML) & \
        (sizes * voxel_ml >= BRONCHOGRAM_MIN_ML) & (sizes >= BRONCHOGRAM_MIN_VOXELS)
    if not wanted.any():
        return out
    pts = np.nonzero(wanted[comp])
    ids = comp[pts]
    shape = gas.shape
    # the tissue's 3 x 3 HU test leaves out the voxels beside the gas (their mean holds
    # its air): a pocket's neighbours within two voxels in the slice of that tissue count
    t = ndimage.binary_dilation(tissue[box], in_plane, iterations=2)
    lg = lung[box]
    wrapped = np.zeros(n + 1)
    by_tissue = np.zeros(n + 1)
    faces = np.zeros(n + 1)
    for axis in range(3):
        for d in (-1, 1):
            nb = _shifted(pts, axis, d, shape)
            edge = ~gas[nb]
            faces += np.bincount(ids[edge], minlength=n + 1)
            by_tissue += np.bincount(ids[edge & t[nb]], minlength=n + 1)
            wrapped += np.bincount(ids[edge & (t[nb] | lg[nb])], minlength=n + 1)
    ok = wanted & (faces > 0) & (wrapped >= BRONCHOGRAM_SHELL * np.maximum(faces, 1)) & \
        (by_tissue >= BRONCHOGRAM_TISSUE * np.maximum(faces, 1))
    # near the lung in its own slices (not gas under the dome, below the lung's slices)
    reach_px = [int(np.ceil(BRONCHOGRAM_LUNG_MM / s)) for s in spacing[1:]]
    objects = ndimage.find_objects(comp)
    for i in np.flatnonzero(ok):
        sl = objects[i - 1]
        if sl is None:
            ok[i] = False
            continue
        win = (sl[0], *(slice(max(0, q.start - r), q.stop + r)
                        for q, r in zip(sl[1:], reach_px, strict=True)))
        ok[i] = bool(lg[win].any())
    out[box] = ok[comp]
    return out


def _enclosed_in(lung: npt.NDArray[np.bool_], any_lung: npt.NDArray[np.bool_],
                 hu: npt.NDArray[Any], spacing: tuple[float, float, float]
                 ) -> npt.NDArray[np.bool_]:
    """The enclosed soft tissue of one lung (arrays with the axial axis first, cut to the
    lung's bounding box)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    pts, *rest = _candidates(lung, any_lung, hu, spacing,
                             (True, False) if BRONCHOGRAMS else (True,))
    found = _pieces(pts, lung.shape, _near_gas(pts, hu, any_lung), voxel_ml)
    if rest and rest[0][0].size:
        # consolidation holding air bronchograms needs the lung over it or under it only
        new = np.zeros(lung.shape, bool)
        new[rest[0]] = True
        tissue = new.copy()
        tissue[pts] = True
        air = _bronchograms(tissue, new, lung, any_lung, hu, spacing)
        if air.any():
            one = np.nonzero(tissue)
            found |= _pieces(one, lung.shape, _near_gas(one, hu, any_lung, air), voxel_ml,
                             extra=air)
    return found | _skin(found, lung, any_lung, hu)


def _skin(found: npt.NDArray[np.bool_], lung: npt.NDArray[np.bool_],
          any_lung: npt.NDArray[np.bool_], hu: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """The voxels between found tissue and its lung (face neighbours of both, in neither,
    below soft tissue's upper bound): the lesion's edge, which partial volume with the
    air of the lung takes below the soft-tissue range."""
    pts = np.nonzero(found)
    skin = np.zeros(found.shape, bool)
    if pts[0].size == 0:
        return skin
    for axis in range(3):
        for d in (-1, 1):
            nb = _shifted(pts, axis, d, found.shape)
            ok = ~any_lung[nb] & ~found[nb] & (hu[nb] < SOFT_TISSUE_HU[1])
            cand = tuple(q[ok] for q in nb)
            by_lung = np.zeros(cand[0].shape, bool)
            for axis2 in range(3):
                for d2 in (-1, 1):
                    by_lung |= lung[_shifted(cand, axis2, d2, found.shape)]
            skin[tuple(q[by_lung] for q in cand)] = True
    return skin


def add_enclosed_tissue(kept: dict[int, npt.NDArray[np.bool_]], hu: npt.NDArray[Any],
                        geometry: Geometry) -> dict[int, int]:
    """Add to each lung's mask (``kept``: label -> mask, changed in place; all on ``hu``'s
    grid, ``geometry``) the soft-tissue voxels (:data:`SOFT_TISSUE_HU`) that it encloses
    and that no lung holds: inside the lung's 3D closing by a ball of :data:`CLOSE_MM`,
    with the same lung (its thin sheets opened away) within :data:`Z_REACH_MM` above and
    below, in a connected piece of at least :data:`MIN_PIECE_ML` that does not border gas
    outside the lungs (more than :data:`GAS_CONTACT_FRACTION` of it). A voxel claimed by
    both lungs goes to neither. The work is done in the patient's frame, so the answer
    does not depend on how the study is stored. Returns the voxels added per label."""
    view, sp = canonical_view(geometry)  # views: writes reach the arrays

    any_lung = np.zeros(hu.shape, bool)
    for m in kept.values():
        any_lung |= m
    h, anyl = view(hu), view(any_lung)
    views = {lab: view(mask) for lab, mask in kept.items()}
    todo = [(lab, m, box) for lab, m in views.items()
            if (box := bounding_box(m, margin=0)) is not None]

    def enclosed(item: tuple[int, Any, tuple[slice, ...]]) -> npt.NDArray[np.bool_]:
        _, m, box = item
        return _enclosed_in(m[box], anyl[box], h[box], sp)

    found = {lab: (box, f) for (lab, _, box), f in zip(todo, per_lung(enclosed, todo),
                                                        strict=True)}
    claims = np.zeros(h.shape, np.uint8)
    for box, f in found.values():
        claims[box] += f
    added: dict[int, int] = {}
    for lab, (box, f) in found.items():
        f &= claims[box] == 1
        view(kept[lab])[box] |= f
        added[lab] = int(np.count_nonzero(f))
    return added
