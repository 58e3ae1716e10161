"""Lung cut by the image's edge: aerated lung that the network calls outside air.

A reconstruction whose display field of view is smaller than the chest (a tight field of
view, a large patient) cuts the lungs at the edge of the image matrix: the lung's aerated
tissue runs to the last column. A network that sees air connected to the image's border
calls it outside air, as it nearly always is; lung2d-v2 leaves out a band of lung along the
cut (RIDER-0117: 38 mL of the right lung lateral to the liver, where the matrix cuts
the lung, with network probabilities under 0.01). :func:`add_lung_at_image_edge` puts
such lung back.

What it looks for: unlabelled tissue that is aerated but clearly denser than the study's
outside air (the in-plane mean over about 3.5 mm at least :data:`ABOVE_AIR_HU` above it,
below :data:`AERATED_MAX_HU`), connected within its slice to the image's border through
aerated tissue, opened in plane (so the one- or two-voxel partial-volume rim where skin
meets air does not join it), in 3D pieces that touch a lung, reach the image's border
along at least :data:`EDGE_RUN_MM`, hold at least :data:`MIN_PIECE_ML` and have the median
HU of lung parenchyma (at most :data:`PIECE_MEDIAN_MAX_HU`). A lung cut by the round
reconstruction circle inside the matrix (padding outside it) is not handled: there the
lung meets padding, which the loader sets to air. See ``docs/concepts/segmentation.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from medseg.inference.threshold import outside_air
from medseg.volume import canonical_view

if TYPE_CHECKING:
    from medseg.volume import Geometry

__all__ = ["ABOVE_AIR_HU", "AERATED_MAX_HU", "EDGE_RUN_MM", "MIN_PIECE_ML",
           "PIECE_MEDIAN_MAX_HU", "add_lung_at_image_edge"]

#: Aerated: below this HU (fat is about -100, lung -850, air -1000).
AERATED_MAX_HU = -500.0
#: Lung, not outside air: the in-plane mean HU at least this far above the study's outside
#: air (the lowest decile of the aerated pixels on the image's border: -1024 for a padded
#: GE study, about -1000 elsewhere). Parenchyma is 100-250 HU above air (emphysema less);
#: the mean over about 3.5 mm of air scatters by a few HU.
ABOVE_AIR_HU = 100.0
#: In-plane averaging window (mm) for that test.
MEAN_MM = 3.5
#: A piece must reach the image's border along at least this length (mm) in some slice;
#: the gate: without such a run of lung-like pixels on the border nothing else runs.
EDGE_RUN_MM = 7.0
#: Pieces smaller than this (mL) are left alone.
MIN_PIECE_ML = 1.0
#: Median HU of a piece that is lung (parenchyma about -850; partial volume with the chest
#: wall raises it); a piece above it is mostly soft tissue and partial volume.
PIECE_MEDIAN_MAX_HU = -650.0
#: In-plane opening steps that cut the thin partial-volume rim at the skin.
OPEN_STEPS = 2
#: Width (mm) of the strip along a border that fired in which the pieces are searched (the
#: network misses the lung near the cut, not deep inside).
STRIP_MM = 60.0
#: The gate counts a run on the border only in a slice whose lung labels come within this
#: distance (mm) of that border: a foam mattress or a blanket at the border is not lung.
NEAR_MM = 40.0

_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def _longest_run(ok: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
    """Longest run of True along axis 1, per row of a 2D array."""
    n = ok.shape[1]
    idx = np.arange(n)[None, :]
    # index of the last False at or before each position (-1 if none)
    last_false = np.maximum.accumulate(np.where(ok, -1, idx), axis=1)
    return np.asarray((idx - last_false).max(axis=1, initial=0), np.int64)


def _border_lines(h: npt.NDArray[Any]) -> list[tuple[npt.NDArray[Any], int, int, int]]:
    """The four border lines of each slice of a canonical (S, P, L) array, as (S, n)
    arrays, each with the in-plane axis it runs along (1 = P, 2 = L), the axis it cuts
    and the end of that axis it lies at (0 or -1)."""
    return [(h[:, 0, :], 2, 1, 0), (h[:, -1, :], 2, 1, -1), (h[:, :, 0], 1, 2, 0),
            (h[:, :, -1], 1, 2, -1)]


def _lung_distance(present: npt.NDArray[np.bool_], end: int) -> npt.NDArray[np.int64]:
    """Per slice, how many voxels separate the lung from one end (0 or -1) of an in-plane
    axis, from ``present`` (S, n): whether the slice holds lung at each position along that
    axis; the axis' length where the slice holds no lung."""
    n = present.shape[1]
    if end == -1:
        present = present[:, ::-1]
    first = np.argmax(present, axis=1)
    return np.where(present.any(axis=1), first, n).astype(np.int64)


def add_lung_at_image_edge(labels: npt.NDArray[np.uint8], hu: npt.NDArray[Any],
                           geometry: Geometry) -> dict[int, int]:
    """Add to the lung labels (1 right, 2 left; ``labels`` changed in place, on ``hu``'s
    grid) the aerated lung the network left out where the image's border cuts a lung (see
    the module's docstring); its holes in each axial slice (vessels) are filled. A piece
    goes to the lung it touches most. Done in the patient's frame, so the answer does not
    depend on how the study is stored. Returns the voxels added per label."""
    view, sp = canonical_view(geometry)  # views: writes reach the arrays

    h, lab = view(hu), view(labels)
    if h.shape[1] < 3 or h.shape[2] < 3 or not (lab > 0).any():
        return {}
    lines = _border_lines(h)
    ring = np.concatenate([line for line, *_ in lines], axis=1)
    aerated = ring[ring < AERATED_MAX_HU]
    if aerated.size == 0:
        return {}
    lo = float(np.percentile(aerated, 10)) + ABOVE_AIR_HU
    # the gate: a run of lung-like pixels along a border near a lung, in some slice
    lung = lab > 0
    # per slice, where along P and along L the slice holds lung
    present = {1: np.asarray(lung.any(axis=2), bool), 2: np.asarray(lung.any(axis=1), bool)}
    fired: list[tuple[int, int]] = []
    for line, axis, cut, end in lines:
        near = _lung_distance(present[cut], end) * sp[cut] <= NEAR_MM
        if not near.any():
            continue
        k = max(3, 2 * round(MEAN_MM / sp[axis] / 2) + 1)
        mean = ndimage.uniform_filter1d(line[near].astype(np.float32), k, axis=1,
                                        mode="nearest")
        ok = (mean > lo) & (mean < AERATED_MAX_HU)
        if (_longest_run(ok) * sp[axis] >= EDGE_RUN_MM).any():
            fired.append((cut, end))
    if not fired:
        return {}
    # the search: every slice, in strips of STRIP_MM along the borders that fired
    box = [slice(None), slice(None), slice(None)]
    for a in (1, 2):
        ends = {end for cut, end in fired if cut == a}
        width = max(1, round(STRIP_MM / sp[a]))
        if ends == {0}:
            box[a] = slice(0, width)
        elif ends == {-1}:
            box[a] = slice(max(0, h.shape[a] - width), h.shape[a])
    b = tuple(box)
    rim = np.zeros(h[b].shape[1:], bool)
    for cut, end in fired:
        if cut == 1:
            rim[end, :] = True
        else:
            rim[:, end] = True
    return _add_pieces(lab[b], h[b], sp, lo, rim)


def _add_pieces(lab: npt.NDArray[np.uint8], h: npt.NDArray[Any],
                sp: tuple[float, float, float], lo: float,
                rim: npt.NDArray[np.bool_]) -> dict[int, int]:
    """The search itself, in the strips the gate chose (``lab`` is a view); ``rim`` marks
    the pixels of a slice that lie on the image's border."""
    ky = max(3, 2 * round(MEAN_MM / sp[1] / 2) + 1)
    kx = max(3, 2 * round(MEAN_MM / sp[2] / 2) + 1)
    hf = np.asarray(h, np.float32)
    mean = ndimage.uniform_filter(hf, size=(1, ky, kx), mode="nearest")
    cand = outside_air(hf < AERATED_MAX_HU) & (mean > lo) & (mean < AERATED_MAX_HU) & (lab == 0)
    cand = ndimage.binary_opening(cand, _IN_PLANE, iterations=OPEN_STEPS)
    comp, n = ndimage.label(cand)
    if n == 0:
        return {}
    contact = {s: np.bincount(comp[ndimage.binary_dilation(lab == s) & cand], minlength=n + 1)
               for s in (1, 2)}
    on_border = np.bincount(comp[:, rim].ravel(), minlength=n + 1)
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    voxel_ml = float(np.prod(sp)) / 1000.0
    min_border = EDGE_RUN_MM / min(sp[1], sp[2])
    objects = ndimage.find_objects(comp)
    added: dict[int, int] = {}
    for c in range(1, n + 1):
        touch = contact[1][c] + contact[2][c]
        if not touch or on_border[c] < min_border or sizes[c] * voxel_ml < MIN_PIECE_ML:
            continue
        box = objects[c - 1]
        piece = comp[box] == c
        if float(np.median(hf[box][piece])) > PIECE_MEDIAN_MAX_HU:
            continue
        side = 1 if contact[1][c] >= contact[2][c] else 2
        sub = lab[box]  # a view
        before = int(np.count_nonzero(sub == side))
        sub[piece] = side
        # vessels inside the added lung: holes within each axial slice
        for z in range(sub.shape[0]):
            filled = ndimage.binary_fill_holes(sub[z] == side)
            sub[z][filled & (sub[z] == 0)] = side
        added[side] = added.get(side, 0) + int(np.count_nonzero(sub == side)) - before
    return added
