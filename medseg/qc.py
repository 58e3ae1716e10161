"""Quality control of a lung mask: signals a person can read, and a verdict ``ok`` or
``review`` with the reasons.

``quality_check(image, labels)`` works on any lung label map on the CT's grid (1 right lung,
2 left lung), from medseg or from another tool (``medseg qc``); ``medseg segment`` runs it
on every study and writes the result into ``segment.json``, the report and the batch
summary. The design and the measured sensitivity and false-alarm rate are in
``docs/concepts/quality-control.md``.

Each signal compares the mask with what the CT itself says, so that a wrong mask shows
whatever model made it:

``missing_lung``
    a lung label is empty.
``volume_ratio``
    right / left volume outside :data:`VOLUME_RATIO_RANGE`.
``wrong_side``
    more than :data:`WRONG_SIDE_MAX` of a lung label lies across the patient's midline
    (spine, else the body's centre), or the right lung's centroid is left of the left
    lung's: the sides are swapped, or one hemithorax was labelled as two lungs.
``lung_contact``
    the two labels share more than :data:`CONTACT_MAX_CM2` of surface: one lung split into
    two labels (the lungs normally meet only at thin junction lines).
``aerated_missed``
    aerated tissue inside the body that looks like lung parenchyma (components of at least
    :data:`MISSED_MIN_ML`, median HU within :data:`PARENCHYMA_MEDIAN_HU`) lies more than one
    working voxel away from the mask: a lung or part of one left out, or a shifted mask.
``edge_in_lung``
    the fraction of the voxels just outside the mask that are aerated lung-like tissue
    exceeds :data:`EDGE_AERATED_MAX`: the mask's border does not follow the lung's (a
    shifted or shrunken mask).
``gas_in_mask``
    gas (below :data:`GAS_HU`) labelled lung whose walls are soft tissue (median HU of the
    surrounding shell above :data:`WALL_MIN_HU`; at least :data:`GAS_MIN_ML`): stomach,
    bowel or airway gas called lung. Emphysema and thin-walled bullae have lung around them;
    a thick-walled cavity in a tumour (which is lung) is flagged too: the reason says so.
``dense_left_out``
    dense tissue (above :data:`DENSE_HU`) that a lung surrounds within an axial slice (a
    hole of any size) or that its in-slice closing (half-width
    :data:`ENCLOSED_RADIUS_MM`) encloses, with lung above and below it (so not the liver
    dome that a lung base rings), left out of the mask, at least
    :data:`DENSE_MIN_ML`: a tumour or consolidation dropped from the lung. A lesion against
    the chest wall or the mediastinum that leaves a wide bite in the lung's outline is NOT
    found this way (measured: docs/concepts/quality-control.md).
``chest_wall_bite``
    dense tissue (above :data:`DENSE_HU`) in a bite of a lung's outline: inside the lung's
    3D closing with a ball of radius :data:`BITE_RADIUS_MM`, with lung above and below it,
    within :data:`BITE_NEAR_SKIN_MM` (in plane) of the air around the body (so against the
    chest wall, not the hilum or the heart), left out of the mask, in pieces of at least
    :data:`BITE_MIN_ML`, on a grid of every :data:`BITE_STEP`-th working voxel (about 6
    mm): a pleural-based tumour or consolidation dropped (pleural fluid or thickening
    shows the same way). Not checked when the lungs run into the side of the field of
    view, nor for a mask without sides.
``at_skin``
    a piece of the mask (at least :data:`SKIN_MIN_ML`) most of whose voxels lie within
    :data:`SKIN_DEPTH_MM` (in plane) of the air around the body (air not labelled lung that
    reaches the slice's border): air under a mattress cover or a blanket, against the skin
    and outside the chest wall, called lung. The same test as rule 2 of medseg's
    postprocessing (:data:`medseg.inference.postprocess.SKIN_DEPTH_MM`), here for masks of
    any origin.
``slice_jump``
    an axial slice whose lung area differs from both neighbours by more than
    :data:`JUMP_FRACTION` while they agree: a slice the mask got wrong.

Notes that do not change the verdict (the mask may be right, the numbers are partial):
the lungs cut by the scan range at the superior or inferior end, or by the side of the
field of view.

Everything runs on a working grid subsampled to about :data:`WORK_MM` per voxel
(nearest, no interpolation), in the canonical (S, P, L) frame; positions are reported as
the axial slice as the report's montage numbers it (1 = most inferior) and its world z.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from medseg.errors import GeometryError
from medseg.inference.postprocess import (
    LABEL_LEFT,
    LABEL_RIGHT,
    MIN_PIECE_ML,
    bounding_box,
    midline_x,
)
from medseg.inference.postprocess import SKIN_DEPTH_MM as POSTPROCESS_SKIN_DEPTH_MM
from medseg.inference.threshold import BODY_MIN_HU, outside_air
from medseg.volume import CTVolume, Geometry, to_canonical

__all__ = ["OK", "REVIEW", "QCResult", "quality_check"]

OK = "ok"
REVIEW = "review"

#: Working grid step (mm): each axis is subsampled by the integer step nearest to this
#: size (a 0.7 mm axis by 4, a 0.98 mm axis by 3, a 2 mm axis by 2, a 2.5 mm axis by 1).
WORK_MM = 3.0
#: Right / left lung volume ratio outside this range is a reason to look. Healthy adults
#: are about 1.1 (right 53-55 % of the total); collapse, resection or effusion move it, and
#: so does a lung half left out.
VOLUME_RATIO_RANGE = (0.5, 2.0)
#: Fraction of a lung label lying more than :data:`SIDE_MARGIN_MM` across the midline.
WRONG_SIDE_MAX = 0.25
#: A lung may cross the midline a little in front of the mediastinum (retrosternal).
SIDE_MARGIN_MM = 10.0
#: Surface (cm^2) shared by the right and left labels.
CONTACT_MAX_CM2 = 40.0
#: Aerated: below this HU (the threshold baseline's lung bound).
AERATED_HU = -320.0
#: Median HU of lung parenchyma (healthy about -850, severe emphysema about -930; partial
#: volume at 3 mm raises it); pure gas (airway, stomach, bowel) lies below the lower bound.
PARENCHYMA_MEDIAN_HU = (-925.0, -600.0)
#: Smallest aerated, lung-looking component outside the mask that counts (mL).
MISSED_MIN_ML = 30.0
#: An aerated component outside the mask whose median cross-section per slice is below this
#: (cm^2) is an airway (trachea about 2-3 cm^2, more with partial volume), not missed lung.
AIRWAY_MAX_CM2 = 6.0
#: Fraction of the shell just outside the mask (inside the body) that is aerated tissue.
EDGE_AERATED_MAX = 0.25
#: Gas: below this HU.
GAS_HU = -950.0
#: Walls of a gas pocket that are soft tissue: median HU of its shell above this.
WALL_MIN_HU = -300.0
#: Smallest gas pocket with soft-tissue walls inside the mask that counts (mL).
GAS_MIN_ML = 2.0
#: Dense: above fat and partial-volume lung; tumour, consolidation, fluid, vessels.
DENSE_HU = -500.0
#: In-slice closing (a square of this half-width, mm) of each lung that finds dense tissue
#: it encloses.
ENCLOSED_RADIUS_MM = 12.0
#: Smallest enclosed dense component left out of the mask that counts (mL).
DENSE_MIN_ML = 15.0
#: The chest-wall bite check (``chest_wall_bite``): the radius of the ball that closes a
#: lung's outline, the largest in-plane distance from the air around the body, the
#: smallest piece, and the subsampling of the working grid. Chosen on the cases of
#: ``benchmarks/qc_eval.py`` (docs/concepts/quality-control.md): no clean mask has a 5 mL
#: piece; the 50 mm masses cut out against the pleura that are found 12-13 mL.
BITE_RADIUS_MM = 30.0
BITE_NEAR_SKIN_MM = 60.0
BITE_MIN_ML = 5.0
BITE_STEP = 2
#: A piece of the mask is "at the skin" when at least half of its voxels lie within this
#: in-plane distance (mm) of outside air; the postprocessing's value (real lungs lie a
#: median 32 mm or more from it, the air under the abdominal example's mattress cover 6 mm).
SKIN_DEPTH_MM = POSTPROCESS_SKIN_DEPTH_MM
#: Smallest piece at the skin that counts (mL): the postprocessing's size floor.
SKIN_MIN_ML = MIN_PIECE_ML
#: A slice's lung area (one label) differing from the mean of its two neighbours by more
#: than this fraction of it, while the neighbours agree within half of it.
JUMP_FRACTION = 0.4
#: Slices with less lung than this (cm^2, mean of the neighbours) are not tested for jumps.
JUMP_MIN_CM2 = 10.0
#: Lung area (cm^2) in the first or last slice (or on a side edge) that means "cut".
CUT_MIN_CM2 = 2.0

SIDES = {LABEL_RIGHT: "right", LABEL_LEFT: "left"}
#: Face neighbours within an axial slice of the canonical (S, P, L) grid.
_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


@dataclass
class QCResult:
    """The verdict, the reasons for it, notes that do not change it, and every signal."""

    verdict: str
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    signals: dict[str, Any] = field(default_factory=dict)
    #: The axial slice (montage numbering, 1 = most inferior) to look at first, if any.
    slice: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reasons": list(self.reasons),
                "notes": list(self.notes), "slice": self.slice, "signals": self.signals}


@dataclass
class _Grid:
    """The working grid in canonical (S, P, L) order."""

    hu: npt.NDArray[Any]
    lab: npt.NDArray[np.uint8]
    spacing: tuple[float, float, float]  # (S, P, L) mm
    small: CTVolume                      # the subsampled volume in its own array order
    small_lab: npt.NDArray[np.uint8]     # the labels on it, in the same order
    z_world: npt.NDArray[np.float64]     # world z (mm) of each canonical slice
    n_slices: int                        # slices of the full-resolution volume along S
    slice_step: int                      # subsampling step along S

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def where(self, k: int) -> str:
        """A canonical working slice as the montage numbers it, with its world z."""
        n = self.slice_number(k)
        return f"axial {n}/{self.n_slices} (z = {self.z_world[k]:.0f} mm)"

    def slice_number(self, k: int) -> int:
        return min(self.n_slices, k * self.slice_step + 1)


def _working_grid(image: CTVolume, labels: npt.NDArray[Any]) -> _Grid:
    spacing_zyx = np.asarray(image.spacing[::-1], float)
    steps = [max(1, round(WORK_MM / s)) for s in spacing_zyx]
    sl = tuple(slice(None, None, st) for st in steps)
    geo = image.geometry
    small_geo = Geometry(geo.origin, tuple(np.asarray(geo.spacing) * steps[::-1]),
                         geo.direction)
    small = CTVolume(np.asarray(image.array[sl]), small_geo)
    hu, sp = to_canonical(small)
    small_lab = np.asarray(labels[sl], np.uint8)
    lab, _ = to_canonical(small, small_lab)
    # world z of each canonical slice: the centre voxel of the slice, through the geometry
    ax = image.axial_axis()
    n_small = small.shape[ax]
    idx = np.zeros((n_small, 3))
    for a in range(3):  # array axis a is index axis 2 - a
        idx[:, 2 - a] = small.shape[a] // 2
    idx[:, 2 - ax] = np.arange(n_small)
    z = small_geo.index_to_world(idx)[:, 2]
    z = np.sort(z)  # canonical axis 0 runs towards superior
    return _Grid(hu=hu, lab=lab, spacing=sp, small=small, small_lab=small_lab, z_world=z,
                 n_slices=image.shape[ax], slice_step=steps[ax])


def _components(mask: npt.NDArray[np.bool_]) -> tuple[npt.NDArray[np.int32], int]:
    lab, n = ndimage.label(mask)
    return lab, int(n)


def _centre_slice(mask: npt.NDArray[np.bool_]) -> int:
    return round(float(np.nonzero(mask)[0].mean()))


def _pieces(comp: npt.NDArray[np.int32], ids: npt.NDArray[np.intp]
            ) -> dict[int, tuple[tuple[slice, ...], npt.NDArray[np.bool_]]]:
    """Each component's bounding box and its mask inside the box (scipy's median over
    labels sorts the whole array: boxes are far cheaper)."""
    boxes = ndimage.find_objects(comp)
    out = {}
    for c in ids:
        box = boxes[int(c) - 1]
        if box is not None:
            out[int(c)] = (box, comp[box] == c)
    return out


def _box_centre_slice(box: tuple[slice, ...], piece: npt.NDArray[np.bool_]) -> int:
    return box[0].start + _centre_slice(piece)


def _big_pieces(g: _Grid, mask: npt.NDArray[np.bool_], min_ml: float,
                voxel_ml: float | None = None
                ) -> tuple[npt.NDArray[np.int32],
                           list[tuple[int, float, tuple[slice, ...], npt.NDArray[np.bool_]]]]:
    """The 3D components of ``mask``, and those of at least ``min_ml`` as (label, mL, box,
    the piece in its box); ``voxel_ml`` for a mask on a subsampled working grid."""
    comp, n = _components(mask)
    if not n:
        return comp, []
    sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:] * (voxel_ml or g.voxel_ml)
    big = np.flatnonzero(sizes >= min_ml) + 1
    return comp, [(c, float(sizes[c - 1]), box, piece) for c, (box, piece) in
                  _pieces(comp, big).items()]


@dataclass
class _Tally:
    """The total of the pieces a signal counts, and the largest one's slice."""

    total: float = 0.0
    worst: tuple[float, int] | None = None

    def add(self, ml: float, box: tuple[slice, ...], piece: npt.NDArray[np.bool_]) -> None:
        self.total += ml
        if self.worst is None or ml > self.worst[0]:
            self.worst = (ml, _box_centre_slice(box, piece))


def quality_check(image: CTVolume, labels: CTVolume | npt.NDArray[Any]) -> QCResult:
    """QC of ``labels`` (0 background, 1 right lung, 2 left lung; any other value counts as
    lung of no side) on ``image``'s grid. See the module docstring for the signals."""
    if isinstance(labels, CTVolume):
        if not image.same_grid(labels):
            raise GeometryError("the labels are not on the image's grid: "
                                + image.grid_difference(labels))
        lab_arr = np.asarray(labels.array)
    else:
        lab_arr = np.asarray(labels)
        if lab_arr.shape != image.shape:
            raise GeometryError(f"labels {lab_arr.shape} and image {image.shape} differ in "
                                "shape")
    reasons: list[str] = []
    notes: list[str] = []
    signals: dict[str, Any] = {}
    first_slice: list[int] = []

    def flag(reason: str, k: int | None = None) -> None:
        reasons.append(reason)
        if k is not None:
            first_slice.append(g.slice_number(k))

    vml = image.voxel_volume_ml()
    vols = {s: float(np.count_nonzero(lab_arr == s)) * vml for s in SIDES}
    signals["volume_ml"] = {SIDES[s]: round(v, 1) for s, v in vols.items()}
    g = _working_grid(image, lab_arr)
    mask = g.lab > 0
    if not mask.any():
        return QCResult(REVIEW, ["the mask is empty: no lung labelled"], [], signals, None)

    # -- missing lung, volume ratio ----------------------------------------------------
    cut_ends, cut_side = _cuts(g, mask, signals, notes)
    lung_cut_side = cut_side  # the lungs themselves run into the image's side
    if vols[LABEL_RIGHT] + vols[LABEL_LEFT] == 0:  # one label for both lungs (a 0/1 mask)
        notes.append("the mask does not tell right from left: the side checks were skipped")
        return _finish(g, mask, signals, reasons, notes, flag, first_slice, cut_side)
    _sides(g, signals, flag)
    # the body touches a side of the field of view (one hemithorax reconstructed)
    cut_side = cut_side or signals.get("midline", {}).get("from") == "isocentre"
    for s, other in ((LABEL_RIGHT, LABEL_LEFT), (LABEL_LEFT, LABEL_RIGHT)):
        if vols[s] == 0:
            text = (f"no {SIDES[s]} lung in the mask ({SIDES[other]} lung "
                    f"{vols[other]:.0f} mL)")
            if cut_side:  # a field of view holding one side: the mask may be right
                notes.append(text + ": the field of view is cut at the side")
            else:
                flag(text + ": a lung left out, or a pneumonectomy?")
    ratio = vols[LABEL_RIGHT] / vols[LABEL_LEFT] if vols[LABEL_LEFT] > 0 else None
    signals["right_left_ratio"] = None if ratio is None else round(ratio, 3)
    lo, hi = VOLUME_RATIO_RANGE
    if ratio is not None and vols[LABEL_RIGHT] > 0 and not cut_ends and not cut_side \
            and not lo <= ratio <= hi:
        flag(f"right/left volume ratio {ratio:.2f} is outside {lo}-{hi} (right "
             f"{vols[LABEL_RIGHT]:.0f} mL, left {vols[LABEL_LEFT]:.0f} mL): part of a lung "
             "left out or labelled as the other side?")

    _contact(g, signals, flag)
    return _finish(g, mask, signals, reasons, notes, flag, first_slice, lung_cut_side)


def _finish(g: _Grid, mask: npt.NDArray[np.bool_], signals: dict[str, Any],
            reasons: list[str], notes: list[str], flag: Any, first_slice: list[int],
            cut_side: bool = False) -> QCResult:
    """The checks that need no sides, and the verdict."""
    body_air = outside_air(g.hu < BODY_MIN_HU)
    _aerated(g, mask, body_air, signals, flag)
    _gas(g, mask, signals, flag)
    _dense(g, body_air, signals, flag)
    _bite(g, body_air, signals, flag, cut_side)
    _at_skin(g, mask, signals, flag)
    _jumps(g, signals, flag)
    verdict = REVIEW if reasons else OK
    return QCResult(verdict, reasons, notes, signals,
                    first_slice[0] if first_slice else None)


def _sides(g: _Grid, signals: dict[str, Any], flag: Any) -> None:
    small = g.small
    from_small = g.small_lab
    box = bounding_box(from_small > 0)
    if box is None:
        return
    ax = small.axial_axis()
    in_plane = [a for a in range(3) if a != ax]
    lat_row = np.abs(small.direction[0, ::-1])  # |world x| of each array axis (z, y, x)
    lat = max(in_plane, key=lambda a: lat_row[a])
    apx = in_plane[0] if in_plane[1] == lat else in_plane[1]
    mid, how = midline_x(small.array, small.geometry, ax, box[ax], box[apx])
    signals["midline"] = {"x_mm": round(mid, 1), "from": how}
    centroids: dict[int, float] = {}
    wrong: dict[str, float] = {}
    for s in SIDES:
        k, j, i = np.nonzero(from_small == s)
        if k.size == 0:
            continue
        x = small.geometry.index_to_world(np.c_[i, j, k])[:, 0]
        centroids[s] = float(x.mean())
        across = x > mid + SIDE_MARGIN_MM if s == LABEL_RIGHT else x < mid - SIDE_MARGIN_MM
        wrong[SIDES[s]] = round(float(np.count_nonzero(across)) / x.size, 3)
    signals["wrong_side_fraction"] = wrong
    trusted = how != "isocentre"
    for name, frac in wrong.items():
        if trusted and frac > WRONG_SIDE_MAX:
            flag(f"{100 * frac:.0f} % of the {name} lung label lies on the patient's "
                 f"{'left' if name == 'right' else 'right'} side of the midline (found by "
                 f"the {how}): sides swapped, or one lung labelled as two?")
    if len(centroids) == 2 and centroids[LABEL_RIGHT] > centroids[LABEL_LEFT]:
        flag("the right lung label lies to the patient's left of the left lung label: "
             "sides swapped")


def _contact(g: _Grid, signals: dict[str, Any], flag: Any) -> None:
    r, left = g.lab == LABEL_RIGHT, g.lab == LABEL_LEFT
    sp = g.spacing
    area = 0.0
    for a in range(3):
        n = len(r.shape)
        lo = tuple(slice(None, -1) if b == a else slice(None) for b in range(n))
        hi = tuple(slice(1, None) if b == a else slice(None) for b in range(n))
        faces = np.count_nonzero(r[lo] & left[hi]) + np.count_nonzero(left[lo] & r[hi])
        face_area = float(np.prod([sp[b] for b in range(3) if b != a]))
        area += faces * face_area
    cm2 = area / 100.0
    signals["lung_contact_cm2"] = round(float(cm2), 1)
    if cm2 > CONTACT_MAX_CM2:
        touching = r & ndimage.binary_dilation(left)
        flag(f"the right and left labels share {cm2:.0f} cm^2 of surface (lungs meet only "
             f"at thin junction lines): one lung split into two labels? Around "
             f"{g.where(_centre_slice(touching))}", _centre_slice(touching))


def _aerated(g: _Grid, mask: npt.NDArray[np.bool_], body_air: npt.NDArray[np.bool_],
             signals: dict[str, Any], flag: Any) -> None:
    inside = ~body_air
    aerated = (g.hu < AERATED_HU) & inside
    near = ndimage.maximum_filter(mask.view(np.uint8), 3).astype(bool)
    lo, hi = PARENCHYMA_MEDIAN_HU
    cm2 = g.spacing[1] * g.spacing[2] / 100.0
    tally = _Tally()
    for _c, ml, box, piece in _big_pieces(g, aerated & ~near, MISSED_MIN_ML)[1]:
        m = float(np.median(g.hu[box][piece]))
        per_slice = np.count_nonzero(piece, axis=(1, 2))
        tubular = float(np.median(per_slice[per_slice > 0])) * cm2 < AIRWAY_MAX_CM2
        if lo <= m <= hi and not tubular:
            tally.add(ml, box, piece)
    missed, worst = tally.total, tally.worst
    signals["aerated_missed_ml"] = round(missed, 1)
    if worst is not None:
        flag(f"{missed:.0f} mL of aerated tissue that looks like lung lies outside the mask "
             f"(the largest piece {worst[0]:.0f} mL around {g.where(worst[1])}): a lung or "
             "part of one left out, or the mask shifted", worst[1])
    shell = near & ~mask & inside
    n_shell = int(np.count_nonzero(shell))
    frac = float(np.count_nonzero(shell & aerated & (g.hu >= GAS_HU))) / max(1, n_shell)
    signals["edge_aerated_fraction"] = round(frac, 3)
    if frac > EDGE_AERATED_MAX:
        per_slice = np.count_nonzero(shell & aerated, axis=(1, 2))
        k = int(np.argmax(per_slice))
        flag(f"{100 * frac:.0f} % of the voxels just outside the mask are aerated lung-like "
             f"tissue (usually < {100 * EDGE_AERATED_MAX:.0f} %): the mask's border does "
             f"not follow the lung's (shifted or shrunken?), worst at {g.where(k)}", k)


def _gas(g: _Grid, mask: npt.NDArray[np.bool_], signals: dict[str, Any], flag: Any) -> None:
    gas = mask & (g.hu < GAS_HU)
    tally = _Tally()
    comp, pieces = _big_pieces(g, gas, GAS_MIN_ML)
    for c, ml, box, piece in pieces:
        grown = tuple(slice(max(0, b.start - 1), b.stop + 1) for b in box)
        sub = comp[grown] == c
        shell = ndimage.binary_dilation(sub, np.ones((3, 3, 3), bool)) & ~gas[grown]
        if shell.any() and float(np.median(g.hu[grown][shell])) > WALL_MIN_HU:
            tally.add(ml, box, piece)
    total, worst = tally.total, tally.worst
    signals["gas_in_mask_ml"] = round(total, 1)
    if worst is not None:
        flag(f"{total:.0f} mL labelled lung is gas with soft-tissue walls (stomach, bowel, "
             f"airway, or a cavity in a lesion?), the largest pocket {worst[0]:.0f} mL "
             f"around {g.where(worst[1])}", worst[1])


def _lung_above_and_below(lung: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Voxels with ``lung`` both above and below them in their (canonical, S first)
    column: not the liver or spleen dome that a lung base rings."""
    below = np.logical_or.accumulate(lung, axis=0)
    above = np.logical_or.accumulate(lung[::-1], axis=0)[::-1]
    return np.asarray(below & above)


def _dense(g: _Grid, body_air: npt.NDArray[np.bool_], signals: dict[str, Any],
           flag: Any) -> None:
    sp = g.spacing
    ry = max(1, round(ENCLOSED_RADIUS_MM / sp[1]))
    rx = max(1, round(ENCLOSED_RADIUS_MM / sp[2]))
    size = (1, 2 * ry + 1, 2 * rx + 1)  # a square in the slice: separable, so fast
    dense = (g.hu > DENSE_HU) & ~body_air
    mask = g.lab > 0
    left_out = np.zeros(mask.shape, bool)
    for s in (*SIDES, 3):  # 3: lung of no side (a 0/1 mask read through --labels)
        lung = g.lab == s
        box = bounding_box(lung, margin=max(ry, rx) + 1)
        if box is None:
            continue
        padded = np.pad(lung[box].view(np.uint8), ((0, 0), (ry, ry), (rx, rx)))
        closed = ndimage.minimum_filter(ndimage.maximum_filter(padded, size), size)
        enclosed = closed[:, ry:-ry, rx:-rx].astype(bool)
        # and every hole of the lung within its slice, however large
        enclosed |= ndimage.binary_fill_holes(lung[box], _IN_PLANE)
        # and lung above and below it in its column: not the liver or spleen dome that a
        # lung base rings within a slice
        enclosed &= _lung_above_and_below(lung[box])
        left_out[box] |= enclosed & ~mask[box] & dense[box]
    tally = _Tally()
    for _c, ml, box, piece in _big_pieces(g, left_out, DENSE_MIN_ML)[1]:
        tally.add(ml, box, piece)
    total, worst = tally.total, tally.worst
    signals["dense_left_out_ml"] = round(total, 1)
    if worst is not None:
        flag(f"{total:.0f} mL of dense tissue enclosed by the lung is left out of the mask "
             f"(a tumour or consolidation dropped?), the largest piece {worst[0]:.0f} mL "
             f"around {g.where(worst[1])}", worst[1])


def _closing(mask: npt.NDArray[np.bool_], spacing: tuple[float, ...], radius: float,
             pad: list[int]) -> npt.NDArray[np.bool_]:
    """``mask`` closed with a ball of ``radius`` mm (through two distance transforms),
    computed on the mask padded by ``pad`` voxels per axis (room for the dilation)."""
    padded = np.pad(mask, [(p, p) for p in pad])
    grown = ndimage.distance_transform_edt(~padded, sampling=spacing) <= radius
    closed = ndimage.distance_transform_edt(grown, sampling=spacing) > radius
    return np.asarray(closed[tuple(slice(p, closed.shape[a] - p)
                                   for a, p in enumerate(pad))])


def _bite(g: _Grid, body_air: npt.NDArray[np.bool_], signals: dict[str, Any], flag: Any,
          cut_side: bool) -> None:
    st = (slice(None, None, BITE_STEP),) * 3
    lab, hu, air = g.lab[st], g.hu[st], body_air[st]
    # not when the lungs run into the image's side (no chest wall to measure from), nor
    # for a mask without sides: the closing of both lungs together fills the heart
    if cut_side or not np.isin(lab, tuple(SIDES)).any() or not air.any():
        signals["chest_wall_bite_ml"] = None
        return
    sp = tuple(float(v) * BITE_STEP for v in g.spacing)
    mask = lab > 0
    near = ndimage.distance_transform_edt(~air, sampling=(1e6, sp[1], sp[2])) \
        <= BITE_NEAR_SKIN_MM
    candidate = (hu > DENSE_HU) & ~air & ~mask & near
    found = np.zeros(mask.shape, bool)
    grow = [int(np.ceil(BITE_RADIUS_MM / v)) + 1 for v in sp]
    for s in SIDES:
        lung = lab == s
        box = bounding_box(lung)
        if box is None:
            continue
        box = tuple(slice(max(0, b.start - n), min(lab.shape[a], b.stop + n))
                    for a, (b, n) in enumerate(zip(box, grow, strict=True)))
        sub = lung[box]
        found[box] |= (_closing(sub, sp, BITE_RADIUS_MM, grow) & _lung_above_and_below(sub)
                       & candidate[box])
    tally = _Tally()
    for _c, ml, box, piece in _big_pieces(g, found, BITE_MIN_ML,
                                          float(np.prod(sp)) / 1000.0)[1]:
        tally.add(ml, box, piece)
    total, worst = tally.total, tally.worst
    signals["chest_wall_bite_ml"] = round(total, 1)
    if worst is not None:
        k = worst[1] * BITE_STEP  # the working grid's slice
        flag(f"{total:.0f} mL of dense tissue fills a bite in the lung's outline against the "
             f"chest wall and is left out of the mask (a pleural-based tumour or "
             f"consolidation dropped? pleural fluid or thickening shows the same way), the "
             f"largest piece {worst[0]:.0f} mL around {g.where(k)}", k)


def _at_skin(g: _Grid, mask: npt.NDArray[np.bool_], signals: dict[str, Any],
             flag: Any) -> None:
    outside = outside_air((g.hu < BODY_MIN_HU) & ~mask)
    tally = _Tally()
    if outside.any():
        # each piece's box grown by the depth in plane: farther air cannot be within it
        grow = [0, *(int(np.ceil(SKIN_DEPTH_MM / g.spacing[a])) for a in (1, 2))]
        comp, pieces = _big_pieces(g, mask, SKIN_MIN_ML)
        for c, ml, box, piece in pieces:
            grown = tuple(slice(max(0, b.start - n), b.stop + n)
                          for b, n in zip(box, grow, strict=True))
            air = outside[grown]
            if not air.any():
                continue
            dist = ndimage.distance_transform_edt(~air, sampling=(1e6, *g.spacing[1:]))
            mine = comp[grown] == c
            if float(np.mean(dist[mine] <= SKIN_DEPTH_MM)) >= 0.5:
                tally.add(ml, box, piece)
    total, worst = tally.total, tally.worst
    signals["at_skin_ml"] = round(total, 1)
    if worst is not None:
        flag(f"{total:.0f} mL labelled lung lies against the skin, outside the chest wall "
             f"(most of it within {SKIN_DEPTH_MM:.0f} mm of the air around the body: air "
             f"under a mattress cover or a blanket?), the largest piece {worst[0]:.0f} mL "
             f"around {g.where(worst[1])}", worst[1])


def _jumps(g: _Grid, signals: dict[str, Any], flag: Any) -> None:
    cm2 = g.spacing[1] * g.spacing[2] / 100.0
    jumps: list[int] = []
    for s in (*SIDES, None):
        sel = g.lab > 0 if s is None else g.lab == s
        area = np.count_nonzero(sel, axis=(1, 2)) * cm2
        a, m, b = area[:-2], area[1:-1], area[2:]
        mean = (a + b) / 2.0
        bad = (mean > JUMP_MIN_CM2) & (np.abs(m - mean) > JUMP_FRACTION * mean) & \
            (np.abs(a - b) < 0.5 * JUMP_FRACTION * mean)
        jumps.extend(int(k) + 1 for k in np.flatnonzero(bad))
    jumps = sorted(set(jumps))
    signals["slice_jumps"] = [g.slice_number(k) for k in jumps]
    if jumps:
        flag(f"the mask's area jumps at {len(jumps)} slice(s), first at {g.where(jumps[0])}: "
             "a slice the mask got wrong", jumps[0])


def _cuts(g: _Grid, mask: npt.NDArray[np.bool_], signals: dict[str, Any],
          notes: list[str]) -> tuple[bool, bool]:
    """Notes where the scan range or the field of view cuts the lungs; returns (cut at an
    end, cut at a side)."""
    sp = g.spacing
    axial_cm2 = sp[1] * sp[2] / 100.0
    cut = {"inferior": float(np.count_nonzero(mask[0])) * axial_cm2,
           "superior": float(np.count_nonzero(mask[-1])) * axial_cm2}
    side = 0.0
    for a, face in ((1, sp[0] * sp[2]), (2, sp[0] * sp[1])):
        side += (np.count_nonzero(np.take(mask, 0, axis=a))
                 + np.count_nonzero(np.take(mask, -1, axis=a))) * face / 100.0
    signals["cut_cm2"] = {k: round(v, 1) for k, v in cut.items()} | {"side": round(float(side), 1)}
    for end, v in cut.items():
        if v > CUT_MIN_CM2:
            notes.append(f"the lungs are cut by the scan range at the {end} end ({v:.0f} cm^2 "
                         "of lung in the last slice): volumes and densities are partial")
    if side > CUT_MIN_CM2:
        notes.append(f"the lungs touch the side of the field of view ({side:.0f} cm^2): "
                     "volumes and densities are partial")
    return any(v > CUT_MIN_CM2 for v in cut.values()), side > CUT_MIN_CM2
