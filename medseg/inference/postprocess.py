"""Postprocessing of lung label maps: sides by anatomy, gas and outside air dropped, every
plausible piece of a lung kept, enclosed holes filled (see :func:`postprocess_labels`).

Works inside the labels' bounding box, so the cost follows the lungs, not the volume.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt
from scipy import ndimage

if TYPE_CHECKING:
    from medseg.volume import Geometry

__all__ = ["LABEL_LEFT", "LABEL_RIGHT", "bounding_box", "midline_x", "postprocess_labels"]

LABEL_RIGHT = 1
LABEL_LEFT = 2

#: Body vs surrounding air (as :data:`medseg.inference.threshold.BODY_MIN_HU`): fat is about
#: -100 HU, air -1000. Also the HU below which a voxel is counted as gas.
BODY_MIN_HU = -500.0
#: A component smaller than this (mL) is a speck, not a piece of lung: dropped. Absolute, not
#: a fraction of the largest: a field of view holding only the lung bases has real lungs of
#: 40-70 mL (the abdominal totalseg example), and a lesion can cut off a piece of tens of mL
#: from a 3 L lung. The network's specks are under 5 mL (mostly under 1 mL).
MIN_PIECE_ML = 5.0
#: A component at least this large (mL) is lung: the gas, outside-air and "under" rules do
#: not apply (a whole lung is larger; the gas pockets a network mistakes for lung are far
#: smaller; 1 L is also the lower end of segment.PLAUSIBLE_LUNG_ML).
SURE_LUNG_ML = 1000.0
#: Median HU of a component that looks like lung: parenchyma is about -850 (healthy) to -930
#: (severe emphysema); partial volume at the bases with 3 mm voxels and ground glass raise it
#: (-765 and -794 for the lung bases of the abdominal example). Below the lower bound is pure
#: gas (stomach -967, colon -975 in that example: partial volume keeps 3 mm gas pockets just
#: above -970, so the bound is -960, segment.AIR_MEDIAN_HU).
LUNG_MEDIAN_HU = (-960.0, -700.0)
#: A component (not the largest) more than this fraction of whose face neighbours are gas
#: not labelled lung lies in air, outside the body (1.00 for the pockets between the back
#: and the table in chest-ct-philips-141; 0.04-0.10 for lungs and bowel gas).
AIR_SHELL_FRACTION = 0.5
#: Air outside the body hugging the skin, under a mattress cover or a blanket, is not
#: enclosed by gas on all sides (the shell rule above misses it). A component (under
#: :data:`SURE_LUNG_ML`) is dropped when at least :data:`AT_SKIN_FRACTION` of its voxels lie
#: within this in-plane distance (mm) of outside air (gas not labelled lung that reaches the
#: image's side borders): the strip of air between the back and the mattress cover that the
#: network labelled right lung in the abdominal totalseg example lies 6 mm from it (median;
#: 99 % within 10 mm), real lungs and lung bases 32-96 mm (median; at most 6 % of a lung's
#: voxels within 10 mm, RIDER's lung cut by the image border). Chest wall (skin, fat, muscle,
#: ribs, pleura) keeps a lung further than 10 mm from the skin.
SKIN_DEPTH_MM = 10.0
AT_SKIN_FRACTION = 0.5
#: Outside air is found on a grid subsampled in plane to about this step (mm).
SKIN_SAMPLE_MM = 2.0
#: A component that looks like lung by its HU is still tested by the "under" rule when it
#: is smaller than this (mL): the part of a lung that a lesion cuts off is a lobe or a
#: segment (hundreds of mL); a small lung-looking pocket under a lung is bowel gas mixed
#: with stool (LIDC-IDRI-0001's splenic flexure: 10 mL, median -866 HU, kept before).
SPLIT_PIECE_ML = 50.0
#: A component (not lung-like by HU, or smaller than SPLIT_PIECE_ML) is "under another" when
#: at least this
#: fraction of its voxels (most of them) have a voxel of another kept component superior to
#: them in the same column: below the diaphragm.
UNDER_FRACTION = 0.5
#: A component counts as lying on one side of the midline when at most this fraction of its
#: voxels lie across it (the anterior tip of a lung can reach past the midline; two lungs
#: joined in front of the mediastinum put far more than 5 % on each side).
SIDE_TOLERANCE = 0.05
#: The body's centre is unknown when it touches a lateral edge of the field of view in more
#: than this fraction of the lungs' slices (a field of view cut through the patient).
CROPPED_SLICE_FRACTION = 0.5
#: Dense bone: vertebral cancellous bone is about 200-300 HU, cortical bone above 500.
SPINE_MIN_HU = 200.0
#: The spine is searched within this lateral distance (mm) of the body's centre, in the
#: posterior half (the vertebral body and arch are about 40-50 mm wide; ribs lie outside).
SPINE_BAND_MM = 40.0
#: At least this much dense bone (mL) in that band for the spine to define the midline.
SPINE_MIN_ML = 2.0
#: The midline is estimated on a grid subsampled to about this step (mm) in plane.
MIDLINE_SAMPLE_MM = 2.0


def bounding_box(mask: npt.NDArray[np.bool_], margin: int = 1) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding ``mask`` (grown by ``margin``), None if empty."""
    if not mask.any():
        return None
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append(slice(max(0, int(idx[0]) - margin),
                         min(mask.shape[axis], int(idx[-1]) + 1 + margin)))
    return tuple(out)


def _split_largest(mask: npt.NDArray[np.bool_]
                   ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int32], tuple[slice, ...]]:
    """The largest 6-connected component of ``mask``, and the other components (the
    fragments) as ids > 0 in ``mask``'s bounding box grown by one voxel (returned too).
    Labelled inside that box: one lung's box is about half of both lungs' box."""
    box = bounding_box(mask, margin=1) or (slice(0, 0),) * mask.ndim
    sub = mask[box]
    comp, n = ndimage.label(sub)
    if n <= 1:
        return mask, np.zeros(sub.shape, np.int32), box
    sizes = np.bincount(comp[sub])  # over the mask only: 30x faster than over the volume
    sizes[0] = 0
    largest = comp == int(np.argmax(sizes))
    main = np.zeros(mask.shape, bool)
    main[box] = largest
    comp[largest] = 0
    return main, comp, box


def _touching(fragments: npt.NDArray[np.int32], box: tuple[slice, ...],
              target: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The fragments (component ids > 0 in ``box``) that share a face with ``target``.
    ``box`` has a one-voxel margin around the fragments, so every target voxel next to one
    is inside it. No new labelling: the six face neighbours of each fragment voxel (a few
    thousand voxels, not the box) are looked up in the target."""
    out = np.zeros(target.shape, bool)
    where = np.nonzero(fragments)
    if where[0].size == 0:
        return out
    ids = fragments[where]
    t = target[box]
    hit = np.zeros(int(ids.max()) + 1, bool)
    for axis in range(fragments.ndim):
        for step in (-1, 1):
            moved = where[axis] + step
            inside = (moved >= 0) & (moved < fragments.shape[axis])
            nb = tuple(moved[inside] if a == axis else w[inside] for a, w in enumerate(where))
            hit[ids[inside][t[nb]]] = True
    out[box][where] = hit[ids]  # out[box] is a view: only fragment voxels are written
    return out


def _fill_holes(mask: npt.NDArray[np.bool_], axial_axis: int) -> npt.NDArray[np.bool_]:
    """Fill holes enclosed in each axial slice (a nodule or vessel surrounded by lung in its
    slice, even if open above or below). This includes every hole enclosed in 3D: a cavity
    closed in 3D is closed in each slice through it. One labelling of the background with
    in-plane connectivity does all slices at once: a hole is a background component that
    does not reach its slice's border.

    Works in the mask's bounding box grown by one voxel: in each slice that margin is a ring
    of background joined to everything outside the box, so a component reaching it reaches
    the slice's border (where the box meets the array's edge, the edge is the border)."""
    box = bounding_box(mask, margin=1)
    if box is None:
        return mask
    out = mask.copy()
    out[box] = _fill_holes_in(mask[box], axial_axis)
    return out


def _fill_holes_in(mask: npt.NDArray[np.bool_], axial_axis: int) -> npt.NDArray[np.bool_]:
    in_plane = np.zeros((3, 3, 3), bool)
    centre: list[Any] = [slice(None)] * 3
    centre[axial_axis] = 1
    in_plane[tuple(centre)] = ndimage.generate_binary_structure(2, 1)
    background, n = ndimage.label(~mask, structure=in_plane)
    if n == 0:
        return mask
    border = np.zeros(n + 1, bool)
    for axis in range(3):
        if axis == axial_axis:
            continue
        for end in (0, -1):
            border[np.take(background, end, axis=axis)] = True
    border[0] = True
    return np.asarray(mask | ~border[background])


_T = TypeVar("_T")
_R = TypeVar("_R")


def per_lung(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    """``[fn(x) for x in items]``, the two lungs' work in two threads: SciPy's labelling,
    distance transforms and morphology release the GIL (1.8-2.0x on 2 cores, session
    measurement), and the postprocessing otherwise runs on one core. Each call sees only
    its own item; results come back in order."""
    if len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=len(items), thread_name_prefix="medseg-lung") as ex:
        return list(ex.map(fn, items))


def _fill_and_write(out_box: npt.NDArray[np.uint8], kept: dict[int, npt.NDArray[np.bool_]],
                    axial_axis: int) -> None:
    """Holes filled per lung (only into background, never over the other lung)."""
    fills = per_lung(lambda mask: _fill_holes(mask, axial_axis), list(kept.values()))
    for (lab, _), filled in zip(kept.items(), fills, strict=True):
        for other, m in kept.items():
            if other != lab:
                filled &= ~m
        out_box[filled & (out_box == 0)] = lab


def _postprocess_by_label(labels: npt.NDArray[Any], axial_axis: int) -> npt.NDArray[np.uint8]:
    """Without geometry: the largest component of each label, the fragment rule, holes."""
    out = np.zeros(labels.shape, np.uint8)
    box = bounding_box(labels > 0)
    if box is None:
        return out
    sub = labels[box]
    split = {lab: _split_largest(sub == lab) for lab in (LABEL_RIGHT, LABEL_LEFT)
             if (sub == lab).any()}
    main = {lab: m for lab, (m, _, _) in split.items()}
    kept = dict(main)
    for lab, other in ((LABEL_RIGHT, LABEL_LEFT), (LABEL_LEFT, LABEL_RIGHT)):
        if lab not in main or other not in main:
            continue
        _, fragments, fbox = split[lab]
        kept[other] = kept[other] | _touching(fragments, fbox, main[other])
    _fill_and_write(out[box], kept, axial_axis)
    return out


# -- anatomy: sides by world position, gas and outside air dropped ----------------------------

def _coefficients(geometry: Geometry, row: int) -> npt.NDArray[np.float64]:
    """World coordinate ``row`` (0 x, 1 y, 2 z, LPS mm) per unit step of each array axis
    (z, y, x) = index axes (k, j, i)."""
    lin = geometry.direction * np.asarray(geometry.spacing)[None, :]
    return np.asarray(lin[row, ::-1], float)


def _component_median(hu: npt.NDArray[Any], comp: npt.NDArray[np.int32],
                      where: tuple[slice, ...], c: int) -> float:
    return float(np.median(hu[where][comp[where] == c]))


def _shell_gas_fraction(hu: npt.NDArray[Any], union: npt.NDArray[np.bool_],
                        comp: npt.NDArray[np.int32], where: tuple[slice, ...],
                        c: int) -> float:
    """Fraction of the component's outer face neighbours that are gas (below
    :data:`BODY_MIN_HU`) not labelled lung: near 1 for air outside the body (between the
    back and the table), under 0.15 for a lung wrapped in chest wall, mediastinum or
    diaphragm. ``where`` is the component's box in ``comp``'s coordinates."""
    grown = tuple(slice(max(0, s.start - 1), min(n, s.stop + 1))
                  for s, n in zip(where, comp.shape, strict=True))
    mask = comp[grown] == c
    shell = ndimage.binary_dilation(mask) & ~mask
    if not shell.any():
        return 0.0
    gas = (hu[grown] < BODY_MIN_HU) & ~union[grown]
    return float(np.count_nonzero(gas & shell) / np.count_nonzero(shell))


def _at_skin_fractions(hu: npt.NDArray[Any], lungs: npt.NDArray[np.bool_],
                       comp: npt.NDArray[np.int32], box: tuple[slice, ...],
                       objects: Sequence[tuple[slice, ...] | None], candidates: list[int],
                       geometry: Geometry, axial_axis: int) -> dict[int, float]:
    """Per candidate component: the fraction of its voxels within :data:`SKIN_DEPTH_MM` (in
    plane) of outside air: gas (below :data:`BODY_MIN_HU`) not labelled lung, 3D-connected to
    the image's side borders, over the candidates' axial range. On a grid subsampled in
    plane to about :data:`SKIN_SAMPLE_MM`; each distance map covers only a candidate's box
    grown by the depth (farther air cannot be within it). ``comp`` is in ``box``'s frame,
    ``hu`` and ``lungs`` on the whole grid."""
    if not candidates:
        return {}
    spacing = np.asarray(geometry.spacing, float)[::-1]   # per array axis
    step = [1 if a == axial_axis else max(1, int(SKIN_SAMPLE_MM // spacing[a]))
            for a in range(3)]
    grow = [0 if a == axial_axis else int(np.ceil(SKIN_DEPTH_MM / spacing[a]))
            for a in range(3)]
    starts = [s.start for s in box]
    lo_ax = min(starts[axial_axis] + objects[c - 1][axial_axis].start  # type: ignore[index]
                for c in candidates)
    hi_ax = max(starts[axial_axis] + objects[c - 1][axial_axis].stop  # type: ignore[index]
                for c in candidates)
    sl = [slice(0, n, st) for n, st in zip(hu.shape, step, strict=True)]
    sl[axial_axis] = slice(lo_ax, hi_ax)
    free = (hu[tuple(sl)] < BODY_MIN_HU) & ~lungs[tuple(sl)]
    lab, n = ndimage.label(free)
    faces = [np.take(lab, i, axis=a).ravel() for a in range(3) if a != axial_axis
             for i in (0, -1)]
    border = np.zeros(n + 1, bool)
    border[np.concatenate(faces)] = True
    border[0] = False
    outside = border[lab]
    origin = [s.start for s in sl]   # full-grid index of the sampled grid's 0
    sampling = [1e6 if a == axial_axis else spacing[a] * step[a] for a in range(3)]
    fractions: dict[int, float] = {}
    for c in candidates:
        obj = objects[c - 1]
        assert obj is not None
        full = [(starts[a] + obj[a].start - grow[a], starts[a] + obj[a].stop + grow[a])
                for a in range(3)]
        # the sampled positions inside that range, as sampled-grid indices
        rng = [(max(0, -(-(lo - origin[a]) // step[a])),
                min(outside.shape[a], -(-(hi - origin[a]) // step[a])))
               for a, (lo, hi) in enumerate(full)]
        region = tuple(slice(a0, a1) for a0, a1 in rng)
        air = outside[region]
        idx = [np.arange(a0, a1) * step[a] + origin[a] - starts[a]
               for a, (a0, a1) in enumerate(rng)]
        inside = [(i >= 0) & (i < comp.shape[a]) for a, i in enumerate(idx)]
        mine = np.zeros(air.shape, bool)
        if air.any() and all(m.any() for m in inside):
            sub = comp[np.ix_(*(i[m] for i, m in zip(idx, inside, strict=True)))]
            mine[np.ix_(*inside)] = sub == c
        if not mine.any():
            fractions[c] = 0.0
            continue
        dist = ndimage.distance_transform_edt(~air, sampling=sampling)
        fractions[c] = float(np.mean(dist[mine] <= SKIN_DEPTH_MM))
    return fractions


def _under_fraction(comp: npt.NDArray[np.int32], alive: npt.NDArray[np.bool_],
                    where: tuple[slice, ...], c: int, axial_axis: int,
                    superior_up: bool) -> float:
    """Fraction of component ``c``'s voxels that have a voxel of another (kept) component
    superior to them in the same in-plane column. Different 6-connected components never
    touch along a column, so something that is not lung always lies between the two."""
    cols = list(where)
    cols[axial_axis] = slice(None)  # the whole axial range above and below the component
    sub = comp[tuple(cols)]
    own = sub == c
    other = alive[sub] & ~own
    t = np.arange(sub.shape[axial_axis]).reshape(
        [-1 if a == axial_axis else 1 for a in range(3)])
    if superior_up:   # index grows superiorly: the most superior other voxel has the max index
        top = np.where(other, t, -1).max(axis=axial_axis, keepdims=True)
        above = top > t
    else:
        top = np.where(other, t, sub.shape[axial_axis]).min(axis=axial_axis, keepdims=True)
        above = top < t
    n = np.count_nonzero(own)
    return float(np.count_nonzero(above & own) / n) if n else 0.0


def midline_x(hu: npt.NDArray[Any], geometry: Geometry, axial_axis: int,
               axial: slice, ap: slice) -> tuple[float, str]:
    """World x (LPS mm) of the patient's midline over the lungs' axial range, and how it was
    found: ``"spine"``, ``"body"`` or, where the body touches a lateral edge of the field of
    view in most slices (one hemithorax reconstructed), ``"isocentre"`` (x = 0)."""
    cx = _coefficients(geometry, 0)
    cy = _coefficients(geometry, 1)
    in_plane = [a for a in range(3) if a != axial_axis]
    lat = max(in_plane, key=lambda a: abs(cx[a]))
    apx = in_plane[0] if in_plane[1] == lat else in_plane[1]
    spacing = np.asarray(geometry.spacing)[::-1]  # per array axis
    sl: list[slice] = [slice(None)] * 3
    sl[axial_axis] = axial
    sl[apx] = slice(ap.start, ap.stop, max(1, int(MIDLINE_SAMPLE_MM // spacing[apx])))
    sl[lat] = slice(0, hu.shape[lat], max(1, int(MIDLINE_SAMPLE_MM // spacing[lat])))
    index = [np.arange(hu.shape[a])[sl[a]] for a in range(3)]
    view = np.moveaxis(hu[tuple(sl)], (axial_axis, apx, lat), (0, 1, 2))
    ia, iy, il = index[axial_axis], index[apx], index[lat]
    body = view > BODY_MIN_HU
    has = np.asarray(body.any(axis=(1, 2)), bool)
    if not has.any():
        return 0.0, "isocentre"
    touching = np.asarray(body[:, :, 0].any(axis=1) | body[:, :, -1].any(axis=1), bool)
    if touching[has].mean() > CROPPED_SLICE_FRACTION:
        return 0.0, "isocentre"
    origin = np.asarray(geometry.origin, float)

    def world_x(a: npt.ArrayLike, y: npt.ArrayLike, la: npt.ArrayLike) -> npt.NDArray[Any]:
        # index offsets of each axis in world x (standard orientations: x = lateral only)
        return np.asarray(cx[axial_axis] * a + cx[apx] * y + cx[lat] * la + origin[0])

    lateral = np.asarray(body.any(axis=1), bool)
    ok = has & ~touching
    first = np.argmax(lateral, axis=1)
    last = lateral.shape[1] - 1 - np.argmax(lateral[:, ::-1], axis=1)
    # the middle antero-posterior row of each slice, and the body's left-right centre on it
    mid_ap = world_x(ia[:, None], iy[len(iy) // 2], il[None, :])
    rows = np.arange(len(ia))
    centres = (mid_ap[rows, first] + mid_ap[rows, last]) / 2.0
    centre = float(np.median(centres[ok]))
    ya = cy[axial_axis] * ia[:, None, None] + cy[apx] * iy[None, :, None] + \
        cy[lat] * il[None, None, :] + origin[1]
    posterior = ya > float(np.median(ya))   # LPS: +y is posterior
    # bone behind the body's centre: world x only where there is bone (a few % of the grid)
    ka, ky, kl = np.nonzero((view > SPINE_MIN_HU) & posterior & ok[:, None, None])
    bx = world_x(ia[ka], iy[ky], il[kl])
    bx = bx[np.abs(bx - centre) < SPINE_BAND_MM]
    sample_ml = float(np.prod([spacing[a] * max(1, (sl[a].step or 1)) for a in range(3)])) / 1000
    if bx.size * sample_ml >= SPINE_MIN_ML:
        return float(np.median(bx)), "spine"
    return centre, "body"


def _right_counts(comp: npt.NDArray[np.int32], n: int, box: tuple[slice, ...],
                  geometry: Geometry, mid: float) -> npt.NDArray[np.int64]:
    """Voxels of each component whose world x is below ``mid`` (patient right), one
    array slice at a time (x is linear in the indices: no volume of coordinates)."""
    cx = _coefficients(geometry, 0)
    start = [s.start for s in box]
    r1 = np.arange(comp.shape[1]) + start[1]
    r2 = np.arange(comp.shape[2]) + start[2]
    plane = geometry.origin[0] - mid + cx[1] * r1[:, None] + cx[2] * r2[None, :]
    counts = np.zeros(n + 1, np.int64)
    for p in range(comp.shape[0]):
        cs = comp[p]
        right = (plane < -cx[0] * (p + start[0])) & (cs > 0)
        counts += np.bincount(cs[right], minlength=n + 1)
    return counts


def _postprocess_by_anatomy(labels: npt.NDArray[Any], axial_axis: int,
                            hu: npt.NDArray[Any] | None,
                            geometry: Geometry, enclosed: bool = True,
                            added: dict[int, int] | None = None,
                            at_skin: bool = True) -> npt.NDArray[np.uint8]:
    out = np.zeros(labels.shape, np.uint8)
    lungs = (labels == LABEL_RIGHT) | (labels == LABEL_LEFT)
    box = bounding_box(lungs)
    if box is None:
        return out
    sub = labels[box]
    union: npt.NDArray[np.bool_] = np.asarray(lungs[box])
    hub = hu[box] if hu is not None else None
    comp, n = ndimage.label(union)  # 6-connectivity (see postprocess_labels)
    sizes = np.bincount(comp[union], minlength=n + 1)
    sizes[0] = 0
    n_right = np.bincount(comp[sub == LABEL_RIGHT], minlength=n + 1)
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    objects = ndimage.find_objects(comp)
    largest = int(np.argmax(sizes))
    alive = sizes * voxel_ml >= MIN_PIECE_ML
    alive[0] = False
    small = [c for c in range(1, n + 1) if alive[c] and sizes[c] * voxel_ml < SURE_LUNG_ML]
    # rule 2: gas and air outside the body are not lung
    median: dict[int, float] = {}
    if hub is not None:
        median = {c: _component_median(hub, comp, objects[c - 1], c) for c in small}
        lung_like = {c for c in range(1, n + 1) if alive[c] and (
            sizes[c] * voxel_ml >= SURE_LUNG_ML
            or LUNG_MEDIAN_HU[0] <= median[c] <= LUNG_MEDIAN_HU[1])}
        for c in small:
            if median[c] < LUNG_MEDIAN_HU[0] and lung_like - {c}:
                alive[c] = False   # pure gas: stomach, bowel, trachea, pneumothorax
            elif c != largest and _shell_gas_fraction(hub, union, comp, objects[c - 1],
                                                      c) > AIR_SHELL_FRACTION:
                alive[c] = False   # air outside the body labelled lung
    if hu is not None and at_skin:
        fractions = _at_skin_fractions(hu, lungs, comp, box, objects,
                                       [c for c in small if alive[c]], geometry, axial_axis)
        for c, frac in fractions.items():
            if frac >= AT_SKIN_FRACTION:
                alive[c] = False   # air against the skin (under a cover) labelled lung
    superior_up = bool(_coefficients(geometry, 2)[axial_axis] > 0)
    under = [c for c in small if alive[c] and not (
        c in median and LUNG_MEDIAN_HU[0] <= median[c] <= LUNG_MEDIAN_HU[1]
        and sizes[c] * voxel_ml >= SPLIT_PIECE_ML)]
    drop = [c for c in under if _under_fraction(comp, alive, objects[c - 1], c, axial_axis,
                                                superior_up) >= UNDER_FRACTION]
    alive[drop] = False
    if not alive.any():
        return out
    # rule 1: sides by the patient's midline
    lut = np.zeros(n + 1, np.uint8)   # 0 dropped, 1/2 side, VOXELWISE network labels
    alive_ids = np.flatnonzero(alive)
    if hu is not None:
        kept_boxes = [objects[c - 1] for c in alive_ids]
        lo = [min(b[a].start for b in kept_boxes) for a in range(3)]
        hi = [max(b[a].stop for b in kept_boxes) for a in range(3)]
        in_plane = [a for a in range(3) if a != axial_axis]
        cx = _coefficients(geometry, 0)
        apx = min(in_plane, key=lambda a: abs(cx[a]))
        mid, how = midline_x(hu, geometry, axial_axis,
                              slice(box[axial_axis].start + lo[axial_axis],
                                    box[axial_axis].start + hi[axial_axis]),
                              slice(box[apx].start + lo[apx], box[apx].start + hi[apx]))
    else:
        mid, how = 0.0, "isocentre"
    right = _right_counts(comp, n, box, geometry, mid)
    for c in (int(i) for i in alive_ids):
        frac = right[c] / sizes[c]
        side = LABEL_RIGHT if frac > 0.5 else LABEL_LEFT
        network = LABEL_RIGHT if 2 * n_right[c] >= sizes[c] else LABEL_LEFT
        if min(frac, 1.0 - frac) > SIDE_TOLERANCE or (how == "isocentre" and side != network):
            lut[c] = _VOXELWISE
        else:
            lut[c] = side
    res = lut[comp]
    vw = res == _VOXELWISE
    kept = {lab: res == lab for lab in (LABEL_RIGHT, LABEL_LEFT)}
    if vw.any():
        _voxelwise(sub, vw, kept, comp, sizes, lut, voxel_ml)
    if hub is not None and enclosed:
        # rule 4: soft tissue the lung closes around (a lesion) is lung
        from medseg.inference.enclosed import add_enclosed_tissue

        counts = add_enclosed_tissue(kept, hub, geometry)
        if added is not None:
            added.update(counts)
    _fill_and_write(out[box], {k: m for k, m in kept.items() if m.any()}, axial_axis)
    return out


_VOXELWISE = 255


def _voxelwise(sub: npt.NDArray[Any], vw: npt.NDArray[np.bool_],
               kept: dict[int, npt.NDArray[np.bool_]], comp: npt.NDArray[np.int32],
               sizes: npt.NDArray[np.int64], lut: npt.NDArray[np.uint8],
               voxel_ml: float) -> None:
    """Components that keep the network's labels voxel by voxel (they cross the midline,
    or no side could be decided): each label's pieces, today's fragment rule against the
    largest piece of each lung, pieces below the size floor dropped. Adds to ``kept``."""
    vbox = bounding_box(vw, margin=1) or (slice(0, 0),) * 3
    area = vw[vbox]
    pieces: dict[int, tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]] = {}
    for lab in (LABEL_RIGHT, LABEL_LEFT):
        p, _ = ndimage.label(area & (sub[vbox] == lab))
        psizes = np.bincount(p[p > 0]) if p.any() else np.zeros(1, np.int64)
        pieces[lab] = (p, psizes)
    biggest_side = {lab: int(sizes[lut == lab].max()) if (lut == lab).any() else 0
                    for lab in (LABEL_RIGHT, LABEL_LEFT)}
    main: dict[int, int] = {}
    for lab, (_, psizes) in pieces.items():
        if len(psizes) > 1 and psizes.max() > biggest_side[lab]:
            main[lab] = int(np.argmax(psizes))
    floor = MIN_PIECE_ML / voxel_ml
    for lab, other in ((LABEL_RIGHT, LABEL_LEFT), (LABEL_LEFT, LABEL_RIGHT)):
        p, psizes = pieces[lab]
        if len(psizes) <= 1:
            continue
        mine = p > 0
        frag = np.where(p == main[lab], 0, p).astype(np.int32) if lab in main else p
        to_other = np.zeros(p.shape, bool)
        if other in main:
            target = pieces[other][0] == main[other]
            to_other = _touching(frag, (slice(None),) * 3, target)
        keep_ids = psizes >= floor
        keep_ids[0] = False
        if lab in main:
            keep_ids[main[lab]] = True
        stay = mine & keep_ids[p] & ~to_other
        kept[lab][vbox] |= stay
        kept[other][vbox] |= to_other


def postprocess_labels(labels: npt.NDArray[Any], axial_axis: int = 0, *,
                       hu: npt.NDArray[Any] | None = None,
                       geometry: Geometry | None = None,
                       enclosed: bool = True,
                       added: dict[int, int] | None = None,
                       image_edge: bool = True,
                       edge_added: dict[int, int] | None = None,
                       at_skin: bool = True) -> npt.NDArray[np.uint8]:
    """Clean the network's right (1) / left (2) lung labels; holes enclosed in each axial
    slice are filled (vessels, nodules, tumour surrounded by lung), only into background,
    never over the other lung. ``axial_axis`` is the array axis across axial slices
    (:meth:`medseg.volume.CTVolume.axial_axis`), so the result does not depend on how the
    study is stored (axial, coronal or sagittal slices, either direction).

    **Without** ``geometry`` (the old call): the largest 6-connected component of each
    label; a fragment of one label touching the other lung's main component goes to that
    lung (the 2D network's slip: a lateral patch of one lung labelled as the other, as
    lungmask does); other fragments are dropped.

    **With** ``geometry`` (and ``hu``, the CT on the same grid), anatomy decides:

    1. Components are those of the union of both labels, 6-connected (face neighbours):
       diagonal contacts do not join the stomach to a lung base or the two lungs at a
       corner, and any two components are then separated along every column by a voxel
       that is not lung (rule 2). **Side** by the patient's world position (LPS: x below
       the midline is the patient's right, label 1): a component with at most
       :data:`SIDE_TOLERANCE` of its voxels across the midline gets that side's label
       whatever the network said; a component crossing it (lungs joined in front of the
       mediastinum) keeps the network's labels voxel by voxel. The **midline** is the
       median world x of dense bone (> :data:`SPINE_MIN_HU`) within
       :data:`SPINE_BAND_MM` of the body's lateral centre in the posterior half (the
       spine), else the body's centre (HU > -500, median over the lungs' slices); where
       the body touches a lateral edge of the field of view in more than
       :data:`CROPPED_SLICE_FRACTION` of the lungs' slices (one hemithorax reconstructed)
       the centre is unknown and world x = 0 is used (the scanner isocentre, where
       patients are centred), but a component is then relabelled only when the network's
       majority agrees (x = 0 is not trusted against it: origins can be arbitrary); with
       no ``hu``, the same. Otherwise the network's labels stand.
    2. **Not lung**: components smaller than :data:`SURE_LUNG_ML` are dropped when their
       median HU is below ``LUNG_MEDIAN_HU[0]`` (pure gas: stomach, bowel, trachea,
       pneumothorax) and some other component looks like lung (else a phantom's air is
       left for the caller's "that is air" warning); when most of their face neighbours
       are gas not labelled lung (> :data:`AIR_SHELL_FRACTION`: air outside the body,
       between the back and the table; never the largest component); when at least
       :data:`AT_SKIN_FRACTION` of their voxels lie within :data:`SKIN_DEPTH_MM` in plane of
       outside air (air hugging the skin under a mattress cover or a blanket; with
       ``at_skin``, the default); and, unless their
       median looks like lung (within :data:`LUNG_MEDIAN_HU`) and they hold at least
       :data:`SPLIT_PIECE_ML` (a piece a lesion cut off), when at least
       :data:`UNDER_FRACTION` of their voxels have another kept component superior to them
       in the same column (something under a lung, below the diaphragm).
    3. Every component of at least :data:`MIN_PIECE_ML` that survives rule 2 is kept (a
       lesion can split a lung); smaller specks are dropped, so a lung absent from the
       field of view is not invented from fragments. In components keeping the network's
       labels, the fragment rule above applies against the largest piece of each lung.
    4. With ``enclosed`` (default) and ``hu``: **soft tissue the lung closes around** is
       added to that lung (:func:`medseg.inference.enclosed.add_enclosed_tissue`): a tumour,
       consolidation or collapse against the chest wall or the mediastinum that the
       network left out; ``added``, if given, receives the voxels it added per label.
       Then holes are filled per axial slice.
    5. With ``image_edge`` (default) and ``hu``: **lung cut by the image's edge**
       (:func:`medseg.inference.image_edge.add_lung_at_image_edge`): where the border of the
       image matrix cuts a lung, the aerated lung along the cut that the network took for
       outside air is added to the lung it touches; ``edge_added``, if given, receives the
       voxels added per label.
    """
    if geometry is None:
        return _postprocess_by_label(labels, axial_axis)
    if hu is not None and hu.shape != labels.shape:
        raise ValueError(f"hu {hu.shape} and labels {labels.shape} differ in shape")
    out = _postprocess_by_anatomy(labels, axial_axis, hu, geometry, enclosed, added, at_skin)
    if hu is not None and image_edge:
        from medseg.inference.image_edge import add_lung_at_image_edge

        counts = add_lung_at_image_edge(out, hu, geometry)
        if edge_added is not None:
            edge_added.update(counts)
    return out
