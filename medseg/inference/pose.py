"""The patient's in-plane tilt on the table, and slices turned upright for the network.

A patient who lies rotated about the body's long axis (a pillow under one side, a scoliosis,
a trauma position) shows the chest turned in every axial slice. The slice network was
trained on studies lying nearly straight (rotation augmented up to 15 deg) and still loses
lung at a rotated patient's bases and takes mediastinal vessels: lung2d-v8 on
LIDC-IDRI-0001 turned 12 deg scored Dice 0.970 / 0.986 (right / left) against the clean
mask turned alike, while the same study turned there and back (interpolated twice, no net
rotation) scored 0.997 / 0.999 (docs/model-card.md, "A rotated patient").

So inference measures the tilt and, when it is large enough to matter, gives the network
slices turned upright and turns its probabilities back onto the study's own grid
(:func:`medseg.inference.unet.unet_labels`); the output grid never changes.

The tilt is measured on a grid of 3 mm in plane and about 6 mm between slices (the outline
on every second of those), over the slices where the body is at least half its largest
area, two ways:

* the major axis of the body's outline (the second moments of its cross-section: HU above
  -400, opened twice to cut the table away, the largest piece, holes filled), when the
  outline lies whole in the image (it touches the image's border in at most a quarter of
  those slices) and is not nearly round;
* the angle that makes the bones mirror-symmetric: the fraction of the slices with bone
  (above 350 HU) at each point, tried every 3 deg from -30 to 30, then every degree about
  the best, each time with the best mirror axis from a correlation of the image with its
  mirror (FFT), refined by a parabola. Spine, ribs, sternum, scapulae and arms are
  symmetric in a patient lying straight; contrast-filled vessels and the heart are not,
  which is why the bones alone must agree between the chest's upper and lower half.

The outline decides when the bones confirm it (within 4 deg) or cannot measure; the bones
alone decide when the outline is cut or disagrees with them (an outline cut straight by a
field of view that the image's border does not show). There is no estimate for one
hemithorax (the bones are not on both sides of a mirror axis), too little bone, or halves
that disagree; then the slices run as stored. Measured on the shared studies
(docs/model-card.md, "A rotated patient"): their own tilts -1.6 to +3.9 deg, each of them
turned 12 deg either way found 11.8-12.2 deg from its own tilt; 0.03-0.07 s per study
(2-core Intel Xeon, family 6 model 167).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage

__all__ = ["MAX_TILT_DEG", "MIN_TILT_DEG", "Pose", "body_tilt", "turn_slices"]

#: Tilts below this (deg) are left as they are: a patient is never exactly straight (the
#: shared studies lie 0.1-3.9 deg tilted); below 5 deg the upright slices gained LIDC's
#: right lung 0.001-0.003 Dice, not worth the turn's 0.1-0.2 s on every such study; from 6
#: deg the gain is 0.006-0.009 (docs/model-card.md, "A rotated patient").
MIN_TILT_DEG = 5.0
#: Beyond this (deg) the estimate is not trusted (a patient on the side, a decubitus
#: study): the slices run as stored.
MAX_TILT_DEG = 30.0
#: Bone: voxels above this HU; body: above BODY_HU.
BONE_HU = 350.0
BODY_HU = -400.0
#: The bones must reach at least this fraction as far on one side of the mirror axis as on
#: the other.
MIN_BALANCE = 0.7
#: The body's cross-section must be this much wider than deep (square root of the second
#: moments' ratio) for its major axis to mean anything.
MIN_ASPECT = 1.15
#: Slices whose body touches the image's border on more than this fraction of the border
#: count as cut; with more than MAX_CUT_SLICES of them the bones decide.
BORDER_FRACTION = 0.02
MAX_CUT_SLICES = 0.25
#: Two estimates agree within this (deg): the outline and the bones; the bones above and
#: below the chest's middle.
AGREE_DEG = 4.0
#: Grid of the estimate (mm) in plane and between slices.
GRID_MM = 3.0
SLICE_STEP_MM = 6.0
#: The outline is measured on every OUTLINE_EVERY-th of those slices (its cost is per slice;
#: the bones' mean image costs the same for any number of slices).
OUTLINE_EVERY = 2


@dataclass(frozen=True)
class Pose:
    """The patient's tilt in the (I, J) plane of an array indexed (I, J, K)."""

    #: Angle (deg) from the I axis towards the J axis of the chest's left-right axis; None
    #: when it could not be measured (``reason`` says why).
    tilt_deg: float | None
    #: How far the bones reach on the shorter side of the mirror axis, relative to the other.
    balance: float = 0.0
    #: How far (mm) the body reaches from the image's centre along I or J once its slices
    #: are turned by :attr:`turn_deg` (the turned slices must hold it).
    reach_mm: float = 0.0
    reason: str = ""

    @property
    def turn_deg(self) -> float:
        """The rotation the network's slices get: the tilt when it is between
        :data:`MIN_TILT_DEG` and :data:`MAX_TILT_DEG`, else 0."""
        if self.tilt_deg is None or not MIN_TILT_DEG <= abs(self.tilt_deg) <= MAX_TILT_DEG:
            return 0.0
        return self.tilt_deg


def _mirror_score(img: npt.NDArray[np.float64]) -> tuple[float, float]:
    """How mirror-symmetric ``img`` (rows, columns) is about its best vertical axis
    (correlation with its mirror, relative to its energy), and that axis's column."""
    from scipy import fft

    w = img.shape[1]
    n = fft.next_fast_len(2 * w, real=True)
    f = fft.rfft(img, n=n, axis=1)
    corr = fft.irfft((f * f).sum(axis=0), n=n)  # sum over rows of sum_x img(x) img(s - x)
    best = int(np.argmax(corr[:2 * w]))
    return float(corr[best] / max(float((img ** 2).sum()), 1e-9)), best / 2


def _largest_filled(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_] | None:
    """The largest piece of the slice ``mask`` opened twice (the table cut away), holes
    filled; None when nothing is left."""
    opened = ndimage.binary_opening(mask, iterations=2)
    lab, n = ndimage.label(opened)
    if n == 0:
        return None
    sizes = np.bincount(lab.ravel())[1:]
    return np.asarray(ndimage.binary_fill_holes(lab == int(np.argmax(sizes)) + 1))


def _outline_tilt(body: npt.NDArray[np.bool_], grid: tuple[float, float]
                  ) -> tuple[float | None, float]:
    """The major axis (deg from I towards J) of the body's cross-section, from its second
    moments summed over the slices of ``body`` (I, J, K); None when it is nearly round.
    Also the fraction of those slices whose outline touches the image's border."""
    acc = np.zeros(body.shape[:2])
    cut = 0
    for k in range(body.shape[2]):
        piece = _largest_filled(body[..., k])
        if piece is None:
            continue
        border = np.concatenate([piece[0], piece[-1], piece[:, 0], piece[:, -1]])
        cut += int(border.mean() > BORDER_FRACTION)
        acc += piece
    if acc.sum() == 0:
        return None, 1.0
    cut_fraction = cut / body.shape[2]
    ii, jj = np.indices(acc.shape)
    x, y = ii * grid[0], jj * grid[1]
    w = acc / acc.sum()
    mx, my = float((w * x).sum()), float((w * y).sum())
    cxx, cyy = float((w * (x - mx) ** 2).sum()), float((w * (y - my) ** 2).sum())
    cxy = float((w * (x - mx) * (y - my)).sum())
    low, high = np.linalg.eigvalsh(np.array([[cxx, cxy], [cxy, cyy]]))
    if low <= 0 or math.sqrt(high / low) < MIN_ASPECT:
        return None, cut_fraction
    return 0.5 * math.degrees(math.atan2(2 * cxy, cxx - cyy)), cut_fraction


def _bone_tilt(hu: npt.NDArray[Any], grid: tuple[float, float]
               ) -> tuple[float | None, float, str]:
    """The angle (deg from I towards J) that makes the mean bone image of ``hu``'s slices
    (I, J, K) mirror-symmetric, how balanced the bones are about that mirror axis, and why
    there is no estimate."""
    bone = (hu > BONE_HU).mean(axis=2).T  # rows J, columns I
    img = ndimage.zoom(bone, (grid[1] / GRID_MM, grid[0] / GRID_MM), order=1)
    if img.sum() * GRID_MM ** 2 < 500.0:  # under 5 cm2 of bone in the mean slice
        return None, 0.0, "too little bone"
    rows, cols = np.nonzero(img > 0.02)
    img = img[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    img = np.pad(img, ((img.shape[0] // 4,) * 2, (img.shape[1] // 4,) * 2))
    scores: dict[float, float] = {}

    def score(a: float) -> float:
        if a not in scores:
            scores[a] = _mirror_score(ndimage.rotate(img, a, reshape=False, order=1))[0]
        return scores[a]

    # every 3 deg, then every degree about the best, then a parabola through the best three
    coarse = max(np.arange(-MAX_TILT_DEG, MAX_TILT_DEG + 0.5, 3.0), key=score)
    best = max(np.arange(coarse - 2, coarse + 2.5, 1.0), key=score)
    if abs(best) >= MAX_TILT_DEG:
        return None, 0.0, f"no mirror axis within {MAX_TILT_DEG:g} deg"
    lo, mid, hi = score(best - 1), score(best), score(best + 1)
    tilt = float(best + 0.5 * (lo - hi) / (lo - 2 * mid + hi))
    turned = ndimage.rotate(img, tilt, reshape=False, order=1)
    _, axis = _mirror_score(turned)
    cols = np.cumsum(turned.sum(axis=0), dtype=np.float64)
    cols = cols / cols[-1]
    left = axis - float(np.searchsorted(cols, 0.02))
    right = float(np.searchsorted(cols, 0.98)) - axis
    balance = min(left, right) / max(left, right, 1e-9)
    if balance < MIN_BALANCE:
        return None, balance, "the bones are not on both sides of a mirror axis"
    return tilt, balance, ""


def body_tilt(hu: npt.NDArray[np.floating] | torch.Tensor,
              spacing: tuple[float, float, float]) -> Pose:
    """The patient's tilt in ``hu`` indexed (I, J, K) with ``spacing`` (mm) along those
    axes (K the slice axis)."""
    si, sj, sk = (float(s) for s in spacing)
    fi, fj = max(1, round(GRID_MM / si)), max(1, round(GRID_MM / sj))
    fk = max(1, round(SLICE_STEP_MM / sk))
    arr = hu[::fi, ::fj, ::fk]
    sub = np.asarray(arr.numpy() if isinstance(arr, torch.Tensor) else arr)
    body = sub > BODY_HU
    area = body.sum(axis=(0, 1))
    if area.max() == 0:
        return Pose(None, reason="no body")
    chest = np.flatnonzero(area >= 0.5 * area.max())
    grid = (si * fi, sj * fj)
    centre_i, centre_j = (hu.shape[0] - 1) * si / 2, (hu.shape[1] - 1) * sj / 2
    ii, jj = np.nonzero(body[..., chest].any(axis=2))
    body_xy = np.stack([ii * grid[0] - centre_i, jj * grid[1] - centre_j])

    def pose(tilt: float | None, balance: float, reason: str = "") -> Pose:
        found = Pose(None if tilt is None else round(tilt, 2), round(balance, 3), 0.0, reason)
        t = math.radians(found.turn_deg)  # a point p of the slice lands at R(-turn) p
        c, s = math.cos(t), math.sin(t)
        turned = np.array([[c, s], [-s, c]]) @ body_xy
        return replace(found, reach_mm=round(float(np.abs(turned).max()) + max(grid), 1))

    outline, cut = _outline_tilt(body[..., chest[::OUTLINE_EVERY]], grid)
    if cut > MAX_CUT_SLICES:
        outline = None
    bone, balance, why = _bone_tilt(sub[..., chest], grid)
    if outline is not None and (bone is None or abs(bone - outline) <= AGREE_DEG):
        # the outline's moments are the more precise measure; the bones confirm them where
        # they can (an outline cut straight by a field of view that the image's border
        # does not show, e.g. a turned copy, is not the body's)
        return pose(outline, balance)
    if bone is None:
        return pose(None, balance, why if cut > MAX_CUT_SLICES else "the body is nearly round")
    # the bones alone: above and below the middle of the chest separately, they must agree
    half = len(chest) // 2
    halves = [_bone_tilt(sub[..., part], grid)[0] for part in (chest[:half], chest[half:])]
    if None in halves or abs(halves[0] - halves[1]) > AGREE_DEG:  # type: ignore[operator]
        return pose(None, balance, "the bones above and below the chest's middle disagree")
    return pose(bone, balance)


def turn_slices(x: torch.Tensor, angle_deg: float) -> torch.Tensor:
    """``x`` (N, C, S, S), square slices indexed (I, J), turned about their centre so that
    a direction at ``angle_deg`` from I towards J comes to lie along I (bilinear; 0 =
    -1024 HU on the model's scale, or probability 0, where nothing maps).
    ``turn_slices(turn_slices(x, a), -a)`` is ``x`` up to interpolation."""
    n, _, s_i, s_j = x.shape
    if s_i != s_j:
        raise ValueError(f"turn_slices needs square slices, got {s_i} x {s_j}")
    t = math.radians(angle_deg)
    c, s = math.cos(t), math.sin(t)
    # the source of output pixel (I, J) is R (I, J), R the rotation by +angle from I towards
    # J: I_in = c I - s J, J_in = s I + c J; affine_grid's coordinates are (x, y) = (J, I)
    theta = torch.tensor([[c, s, 0.0], [-s, c, 0.0]], dtype=x.dtype, device=x.device)
    grid = torch.nn.functional.affine_grid(theta.expand(n, 2, 3), list(x.shape),
                                           align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                                           align_corners=False)
