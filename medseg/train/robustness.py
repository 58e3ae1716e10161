"""Robustness suite: a lung model scored on real CT that training never sees.

``medseg validate-model --suite robustness`` runs :func:`run_robustness`. Every case is
deterministic (fixed seeds, fixed lesion kinds/anchors/sizes) and is scored against a
reference written down here (and in ``docs/concepts/robustness.md``):

1. ``lidc``: LIDC-IDRI-0001 as loaded (validation study, never trained on); reference =
   :func:`medseg.train.realct.derive_lung_labels` with ``lung2d-v1`` (its ignore voxels are
   left out of every score). NB: that reference is partly v1's own output, so v1 scores high
   on it by construction; for another model it is a fair check of agreement.
2. ``lidc+lesions``: copies of it with lesions inserted (:func:`insert_lesion`, canonical
   frame, native grid); per kind the % of lesion voxels inside the predicted lung, and the
   Dice of each copy vs the (unchanged) lung reference: a lesion is lung. Each lesion's own
   % is reported too (no target), and the notes say how much of what it missed has no
   lung under it (:func:`missed_without_lung_below`).
3. ``lidc+effusion``: posterior effusions right and left; % of fluid labelled lung and Dice
   vs the reference with the fluid taken out.
4. ``lidc nodules``: the four readers' nodule contours of ``069.xml`` (union of the
   ``inclusion TRUE`` ROIs, placed through each slice's DICOM header): % inside the lung.
5. ``totalseg abdomen``: lung bases and gut gas (:func:`totalseg_reference`).
6. crops of LIDC (right / left hemithorax, apex, base): Dice vs the cropped reference and %
   of the present lung labelled as the other side.
7. consistency: noise, in-plane rotation, thick slices, reversed storage vs the clean mask.
8. cip-ct64 held-out half (:func:`medseg.train.validate.validate_on_cip`).
9. bad input (MR, non-HU, all air) must be refused with a medseg error.
"""

from __future__ import annotations

import json
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.inference import DEFAULT_MODEL, LABEL_MODEL
from medseg.train.lesions import from_canonical, insert_effusion, insert_lesion, to_canonical
from medseg.train.realct import IGNORE
from medseg.volume import CTVolume, Geometry

__all__ = ["EFFUSION_IN_LUNG_MAX_PCT", "LESION_INSIDE_MIN_PCT", "NoduleRoi", "PathologyCopy",
           "RobustnessRow", "crop_volume", "effusion_copies",
           "hemithorax_crop", "lateral_crop", "lesion_copies", "missed_without_lung_below",
           "nodule_mask", "parse_lidc_xml", "rows_markdown", "run_robustness", "slab_crop",
           "totalseg_reference"]

#: Lesions inserted in each LIDC copy: (kind, anchor, side, diameter mm); fixed.
LESION_COPIES: tuple[tuple[tuple[str, str, int, float], ...], ...] = (
    (("consolidation", "pleura", 1, 50.0), ("mass", "mediastinum", 2, 40.0),
     ("ground_glass", "inside", 1, 35.0)),
    (("consolidation", "mediastinum", 2, 40.0), ("mass", "pleura", 1, 10.0),
     ("mass", "spine", 1, 30.0), ("cavity", "pleura", 2, 40.0)),
    (("mass", "hilum", 1, 70.0), ("mass", "pleura", 2, 25.0),
     ("collapse", "base", 2, 70.0), ("consolidation", "pleura", 2, 30.0)),
)
#: Effusion copies: ((side, depth mm), ...) per copy.
EFFUSION_COPIES: tuple[tuple[tuple[int, float], ...], ...] = (((1, 15.0), (2, 35.0)),
                                                               ((1, 35.0), (2, 15.0)))
SEED = 12
#: Targets shared with ``benchmarks/qc_eval.py`` (which copies miss them): consolidation and
#: masses at least this % inside the lung, an effusion at most this % labelled lung.
LESION_INSIDE_MIN_PCT = 95.0
EFFUSION_IN_LUNG_MAX_PCT = 5.0
SIDE = {1: "right", 2: "left"}


@dataclass
class RobustnessRow:
    case: str
    measure: str
    value: float | str | None
    target: str
    passed: bool | None

    def value_text(self) -> str:
        if isinstance(self.value, float):
            return f"{self.value:.4g}"
        return "" if self.value is None else str(self.value)


def _row(case: str, measure: str, value: float | None, op: str | None = None,
         threshold: float | None = None) -> RobustnessRow:
    """A numeric row; ``op`` is ``">="``, ``"<="`` or ``"=="`` (None: reported only)."""
    if op is None or threshold is None or value is None or not np.isfinite(value):
        return RobustnessRow(case, measure, None if value is None else round(float(value), 4),
                             "" if op is None else f"{op} {threshold:g}",
                             None if op is None else False)
    v = float(value)
    ok = {">=": v >= threshold, "<=": v <= threshold, "==": v == threshold}[op]
    return RobustnessRow(case, measure, round(v, 4), f"{op} {threshold:g}", bool(ok))


def rows_markdown(rows: list[RobustnessRow]) -> str:
    out = ["| case | measure | value | target | result |", "|---|---|---|---|---|"]
    for r in rows:
        res = "" if r.passed is None else ("pass" if r.passed else "FAIL")
        val = r.value_text().replace("|", "/").replace("\n", " ")
        out.append(f"| {r.case} | {r.measure} | {val} | {r.target} | {res} |")
    return "\n".join(out) + "\n"


# -- metrics ----------------------------------------------------------------------------------
def _dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_],
          valid: npt.NDArray[np.bool_] | None = None) -> float:
    if valid is not None:
        a, b = a & valid, b & valid
    s = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if s == 0 else 2.0 * int(np.count_nonzero(a & b)) / s


def _side_dice(pred: npt.NDArray[Any], ref: npt.NDArray[Any]) -> dict[int, float]:
    valid = ref != IGNORE
    return {s: _dice(pred == s, ref == s, valid) for s in (1, 2)}


def missed_without_lung_below(missed: npt.NDArray[np.bool_], lung: npt.NDArray[np.bool_]
                              ) -> float:
    """% of the ``missed`` voxels that have no ``lung`` voxel below them in their (y, x)
    column (arrays in the canonical frame: axis 0 runs inferior -> superior). A lesion the
    model leaves out because it sits on something that is not lung (the diaphragm's dome,
    the aortic arch) has none; one cut off at the chest wall or the mediastinum has lung
    under it."""
    n = int(np.count_nonzero(missed))
    if n == 0:
        return float("nan")
    below = np.zeros_like(lung)
    below[1:] = np.logical_or.accumulate(lung, axis=0)[:-1]
    return 100.0 * int(np.count_nonzero(missed & ~below)) / n


def _pct_inside(mask: npt.NDArray[np.bool_], pred: npt.NDArray[Any]) -> float:
    n = int(np.count_nonzero(mask))
    return float("nan") if n == 0 else 100.0 * int(np.count_nonzero(pred[mask] > 0)) / n


# -- LIDC reader XML ------------------------------------------------------------------------
@dataclass
class NoduleRoi:
    reader: int
    nodule_id: str
    sop_uid: str
    inclusion: bool
    points: list[tuple[int, int]]  # (x = column, y = row) pixel coordinates


def parse_lidc_xml(path: str | Path) -> list[NoduleRoi]:
    """Every ``unblindedReadNodule/roi`` of a LIDC reader XML (any namespace)."""
    root = ET.parse(path).getroot()

    def local(tag: str) -> str:
        return tag.rsplit("}", 1)[-1]

    def child(el: ET.Element, name: str) -> ET.Element | None:
        return next((c for c in el if local(c.tag) == name), None)

    def text(el: ET.Element, name: str) -> str:
        c = child(el, name)
        return (c.text or "").strip() if c is not None else ""

    out: list[NoduleRoi] = []
    sessions = [el for el in root.iter() if local(el.tag) == "readingSession"]
    for reader, session in enumerate(sessions):
        for nod in (c for c in session if local(c.tag) == "unblindedReadNodule"):
            nid = text(nod, "noduleID")
            for roi in (c for c in nod if local(c.tag) == "roi"):
                pts = [(int(float(text(e, "xCoord"))), int(float(text(e, "yCoord"))))
                       for e in roi if local(e.tag) == "edgeMap"]
                out.append(NoduleRoi(reader, nid, text(roi, "imageSOP_UID"),
                                     text(roi, "inclusion").upper() == "TRUE", pts))
    return out


def _fill_polygon(points: list[tuple[int, int]], rows: int, cols: int
                  ) -> npt.NDArray[np.bool_]:
    from PIL import Image, ImageDraw

    img = Image.new("1", (cols, rows), 0)
    draw = ImageDraw.Draw(img)
    if len(points) >= 3:
        draw.polygon(points, fill=1, outline=1)
    else:
        for p in points:
            draw.point(p, fill=1)
    return np.asarray(img, bool)


def _slice_headers(dicom_dir: str | Path) -> dict[str, dict[str, Any]]:
    """SOP Instance UID -> position, orientation, pixel spacing, size (pydicom headers)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    out: dict[str, dict[str, Any]] = {}
    for f in sorted(Path(dicom_dir).rglob("*")):
        if not f.is_file() or f.suffix.lower() in (".xml", ".vvi", ".txt"):
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, AttributeError):  # not DICOM
            continue
        if "ImagePositionPatient" not in ds:
            continue
        out[str(ds.SOPInstanceUID)] = {
            "ipp": np.asarray(ds.ImagePositionPatient, float),
            "iop": np.asarray(ds.ImageOrientationPatient, float),
            "spacing": np.asarray(ds.PixelSpacing, float),  # (row spacing, column spacing)
            "rows": int(ds.Rows), "cols": int(ds.Columns)}
    return out


def nodule_mask(volume: CTVolume, rois: list[NoduleRoi],
                headers: dict[str, dict[str, Any]]) -> tuple[npt.NDArray[np.bool_], int]:
    """Union of the ``inclusion`` ROIs (minus each reader's exclusion ROI on the same slice)
    on ``volume``'s grid. Pixels go through their DICOM slice's header to world LPS and
    from there to the volume's index, so any storage order the loader chose is honoured.
    Returns the mask and the number of ROIs whose SOP UID no slice has."""
    mask = np.zeros(volume.shape, bool)
    missing = 0
    groups: dict[tuple[int, str, str], list[NoduleRoi]] = {}
    for r in rois:
        groups.setdefault((r.reader, r.nodule_id, r.sop_uid), []).append(r)
    for (_, _, uid), group in groups.items():
        h = headers.get(uid)
        if h is None:
            missing += len(group)
            continue
        inc = np.zeros((h["rows"], h["cols"]), bool)
        exc = np.zeros_like(inc)
        for r in group:
            filled = _fill_polygon(r.points, h["rows"], h["cols"])
            if r.inclusion:
                inc |= filled
            else:
                exc |= filled & ~_outline_of(filled)
        px = np.argwhere(inc & ~exc)  # (row, col)
        if px.size == 0:
            continue
        row_dir, col_dir = h["iop"][:3], h["iop"][3:]
        # DICOM: x along a row (column index) uses PixelSpacing[1], y down the rows [0]
        world = (h["ipp"][None] + px[:, 1:2] * h["spacing"][1] * row_dir[None]
                 + px[:, 0:1] * h["spacing"][0] * col_dir[None])
        ijk = np.rint(volume.geometry.world_to_index(world)).astype(int)
        ok = np.all((ijk >= 0) & (ijk < np.asarray(volume.shape[::-1])), axis=1)
        ijk = ijk[ok]
        mask[ijk[:, 2], ijk[:, 1], ijk[:, 0]] = True
    return mask, missing


def _outline_of(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    return mask & ~ndimage.binary_erosion(mask)


# -- crops ------------------------------------------------------------------------------------
def crop_volume(volume: CTVolume, box: tuple[slice, slice, slice]) -> CTVolume:
    """The sub-array ``volume.array[box]`` (array order z, y, x; steps of 1) as a volume
    whose voxels keep their world positions: the origin moves to the first kept voxel."""
    starts = [s.indices(n)[0] for s, n in zip(box, volume.shape, strict=True)]
    k0, j0, i0 = starts
    origin = volume.geometry.index_to_world([i0, j0, k0])[0]
    geom = Geometry(tuple(origin), volume.spacing, volume.direction)
    meta = volume.metadata.copy()
    ks = range(*box[0].indices(volume.shape[0]))
    if meta.sop_instance_uids:
        meta.sop_instance_uids = tuple(meta.sop_instance_uids[k] for k in ks)
    if meta.source_files:
        meta.source_files = tuple(meta.source_files[k] for k in ks)
    return CTVolume(np.ascontiguousarray(volume.array[box]), geom, meta)


def _world_x_axis(volume: CTVolume) -> tuple[int, float]:
    """Array axis (0..2 of z, y, x) closest to world x, and the sign of its direction."""
    d = volume.direction
    index_axis = int(np.argmax(np.abs(d[0, :])))
    return 2 - index_axis, float(np.sign(d[0, index_axis]))


def body_mask(volume: CTVolume, hu: float = -400.0) -> npt.NDArray[np.bool_]:
    """Voxels above ``hu`` in the largest 3D component, slice-wise holes filled."""
    dense = volume.array > hu
    cc, n = ndimage.label(dense)
    if n == 0:
        return dense
    sizes = np.bincount(cc.ravel())
    sizes[0] = 0
    body = cc == int(np.argmax(sizes))
    ax = volume.axial_axis()
    for k in range(body.shape[ax]):
        idx = [slice(None)] * 3
        idx[ax] = slice(k, k + 1)
        body[tuple(idx)] = ndimage.binary_fill_holes(body[tuple(idx)].squeeze(ax)
                                                     ).reshape(body[tuple(idx)].shape)
    return body


def hemithorax_crop(volume: CTVolume, side: int) -> tuple[CTVolume, tuple[slice, ...]]:
    """The voxels on the patient's right (``side`` 1) or left (2) of the body midline (the
    body's mean world x), as a cropped volume, and the box used."""
    body = body_mask(volume)
    ax, sign = _world_x_axis(volume)
    idx = np.argwhere(body)[:, ax]
    mid_index = float(idx.mean())  # world x is linear in this index (axis-aligned grid)
    n = volume.shape[ax]
    cut = int(np.floor(mid_index)) + 1
    # voxels with larger index lie towards +x (patient left) when sign > 0
    low_is_right = sign > 0
    want_low = (side == 1) == low_is_right
    sl = slice(0, cut) if want_low else slice(cut, n)
    box: list[slice] = [slice(None)] * 3
    box[ax] = sl
    b = (box[0], box[1], box[2])
    return crop_volume(volume, b), b


def lateral_crop(volume: CTVolume, lung: npt.NDArray[np.bool_], depth_mm: float = 20.0
                 ) -> tuple[CTVolume, tuple[slice, ...]]:
    """The image matrix cut ``depth_mm`` inside the lateral edge of ``lung`` (one lung's
    mask on ``volume``'s grid), as a reconstruction with a tight field of view cuts a
    large patient: that lung then runs into the image's border. The cropped volume and the
    box used."""
    ax, _ = _world_x_axis(volume)
    idx = np.argwhere(lung)[:, ax]
    body_idx = np.argwhere(body_mask(volume))[:, ax]
    step = round(depth_mm / volume.spacing[2 - ax])
    n = volume.shape[ax]
    # the lung's lateral edge: the end of its index range farther from the body's centre
    if abs(idx.min() - body_idx.mean()) > abs(idx.max() - body_idx.mean()):
        sl = slice(min(n - 1, int(idx.min()) + step), n)
    else:
        sl = slice(0, max(1, int(idx.max()) + 1 - step))
    box: list[slice] = [slice(None)] * 3
    box[ax] = sl
    b = (box[0], box[1], box[2])
    return crop_volume(volume, b), b


def slab_crop(volume: CTVolume, part: str, fraction: float = 0.4
              ) -> tuple[CTVolume, tuple[slice, ...]]:
    """The superior (``part="apex"``) or inferior (``"base"``) ``fraction`` of the slices."""
    ax = volume.axial_axis()
    n = volume.shape[ax]
    m = max(1, round(fraction * n))
    d = volume.direction
    superior_high = float(d[2, 2 - ax]) > 0  # larger index is superior
    top = (part == "apex") == superior_high
    sl = slice(n - m, n) if top else slice(0, m)
    box: list[slice] = [slice(None)] * 3
    box[ax] = sl
    b = (box[0], box[1], box[2])
    return crop_volume(volume, b), b


# -- abdominal CT reference --------------------------------------------------------------------
def totalseg_reference(volume: CTVolume, air_hu: float = -400.0, top_slices: int = 3,
                       min_ml: float = 0.5) -> npt.NDArray[np.uint8]:
    """Reference for an abdominal CT holding only the lung bases: 1 right lung base, 2 left,
    3 gut gas, 0 the rest (on ``volume``'s grid).

    In the canonical frame (S, P, L): per axial slice, air (< ``air_hu``) connected in-slice
    to the slice border is outside; the rest of the air is inside the body. Its 3D components
    (26-connected) that reach the ``top_slices`` superior-most slices and whose centroid is
    posterior to the body's centre are the lung bases (posterior costophrenic recesses either
    side of the spine); side by the centroid's x against the body's centre. Every other inside
    component of at least ``min_ml`` is gas (stomach, colon, small bowel)."""
    hu, sp = to_canonical(volume)
    air = hu < air_hu
    outside = np.zeros_like(air)
    for z in range(air.shape[0]):
        cc, _ = ndimage.label(air[z])
        border = np.unique(np.r_[cc[0], cc[-1], cc[:, 0], cc[:, -1]])
        border = border[border > 0]
        outside[z] = np.isin(cc, border)
    inside = air & ~outside
    body = ~outside & ~air | inside
    _, ys, xs = np.nonzero(body)
    yc, xc = float(ys.mean()), float(xs.mean())
    cc, n = ndimage.label(inside, np.ones((3, 3, 3), bool))
    out = np.zeros(hu.shape, np.uint8)
    if n == 0:
        return np.asarray(from_canonical(volume, out))
    vox_ml = float(np.prod(sp)) / 1000.0
    objs = ndimage.find_objects(cc)
    top = hu.shape[0] - top_slices
    sizes = np.bincount(cc.ravel(), minlength=n + 1)
    coms = ndimage.center_of_mass(inside, cc, range(1, n + 1))
    for lab in range(1, n + 1):
        obj = objs[lab - 1]
        if obj is None or sizes[lab] * vox_ml < min_ml:
            continue
        _, cy, cx = coms[lab - 1]
        piece = cc[obj] == lab
        if obj[0].stop > top and cy > yc:
            out[obj][piece] = 1 if cx < xc else 2  # canonical x grows to the patient's left
        else:
            out[obj][piece] = 3
    return np.asarray(from_canonical(volume, out))


# -- the suite ---------------------------------------------------------------------------------
def _consistency_volumes(vol: CTVolume, rng: np.random.Generator
                         ) -> dict[str, CTVolume]:
    arr = vol.array.astype(np.float32)
    ax = vol.axial_axis()
    out: dict[str, CTVolume] = {}
    noisy = arr + rng.normal(0, 80, arr.shape).astype(np.float32)
    out["noise 80 HU"] = vol.with_array(noisy)
    plane = tuple(a for a in range(3) if a != ax)
    rot = ndimage.rotate(arr, 12.0, axes=plane, reshape=False, order=1, cval=-1024.0)
    out["rotation 12 deg"] = vol.with_array(rot.astype(np.float32))
    n = vol.shape[ax] // 2 * 2
    a = np.moveaxis(arr, ax, 0)[:n]
    thick = np.moveaxis(0.5 * (a[0::2] + a[1::2]), 0, ax)
    ijk_half = [0.0, 0.0, 0.0]
    ijk_half[2 - ax] = 0.5
    spacing = list(vol.spacing)
    spacing[2 - ax] *= 2
    out["5 mm slices"] = CTVolume(np.ascontiguousarray(thick, np.float32),
                                  Geometry(tuple(vol.geometry.index_to_world(ijk_half)[0]),
                                           (spacing[0], spacing[1], spacing[2]), vol.direction),
                                  vol.metadata.copy())
    last = [0, 0, 0]
    last[2 - ax] = vol.shape[ax] - 1
    d = vol.direction.copy()
    d[:, 2 - ax] *= -1
    rev_meta = vol.metadata.copy()
    rev_meta.sop_instance_uids = rev_meta.sop_instance_uids[::-1]
    rev_meta.source_files = rev_meta.source_files[::-1]
    out["reversed storage"] = CTVolume(np.ascontiguousarray(np.flip(arr, ax)),
                                       Geometry(tuple(vol.geometry.index_to_world(last)[0]),
                                                vol.spacing, d), rev_meta)
    return out


def _write_overlays(out_dir: Path | None, name: str, image: CTVolume,
                    labels: npt.NDArray[Any]) -> None:
    if out_dir is None:
        return
    from medseg.visualize import overlay_montage

    lab = image.with_array(np.where(labels == IGNORE, 0, labels).astype(np.uint8))
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    for view in ("coronal", "axial"):
        (out_dir / f"{slug}-{view}.png").write_bytes(
            overlay_montage(image, lab, view=view, n=6))


@dataclass
class PathologyCopy:
    """One of the suite's copies of a study with pathology inserted."""

    index: int
    volume: CTVolume
    #: The lung reference of the copy (the study's, without the fluid of an effusion).
    reference: npt.NDArray[Any]
    #: Per inserted lesion or effusion: kind, name, its mask on the study's grid and in
    #: the canonical frame.
    inserted: list[tuple[str, str, npt.NDArray[np.bool_], npt.NDArray[np.bool_]]]
    #: What found no place.
    skipped: list[str]


def lesion_copies(volume: CTVolume, ref: npt.NDArray[Any]) -> Iterator[PathologyCopy]:
    """The suite's lesion copies of ``volume`` (lung reference ``ref``, unchanged: a lesion
    is lung): :data:`LESION_COPIES`, seeded, inserted in the canonical frame."""
    hu_c, sp = to_canonical(volume, volume.array.astype(np.float32))
    lab_c, _ = to_canonical(volume, ref)
    for c, lesions in enumerate(LESION_COPIES):
        rng = np.random.default_rng([SEED, 2, c])
        hu = hu_c.copy()
        inserted, skipped = [], []
        for kind, anchor, side, diam in lesions:
            les = insert_lesion(hu, lab_c, sp, rng, kind, anchor=anchor, side=side,
                                diameter_mm=diam)
            if les is None:
                skipped.append(f"{kind} at {anchor}")
                continue
            inserted.append((kind, f"{kind} ({anchor}, {SIDE[side]}, {diam:g} mm)",
                             from_canonical(volume, les.mask), les.mask))
        yield PathologyCopy(c, volume.with_array(from_canonical(volume, hu)), ref, inserted,
                            skipped)


def effusion_copies(volume: CTVolume, ref: npt.NDArray[Any]) -> Iterator[PathologyCopy]:
    """The suite's effusion copies of ``volume``: :data:`EFFUSION_COPIES`, seeded; each
    copy's reference has the fluid taken out of the lung."""
    hu_c, sp = to_canonical(volume, volume.array.astype(np.float32))
    lab_c, _ = to_canonical(volume, ref)
    for c, effs in enumerate(EFFUSION_COPIES):
        rng = np.random.default_rng([SEED, 3, c])
        hu, lab = hu_c.copy(), lab_c.copy()
        inserted, skipped = [], []
        for side, depth in effs:
            e = insert_effusion(hu, lab, sp, rng, side=side, depth_mm=depth)
            if e is None:
                skipped.append(f"effusion {SIDE[side]} {depth:g} mm")
                continue
            inserted.append(("effusion", f"{SIDE[side]} {depth:g} mm",
                             from_canonical(volume, e.mask), e.mask))
        yield PathologyCopy(c, volume.with_array(from_canonical(volume, hu)),
                            from_canonical(volume, lab), inserted, skipped)


def run_robustness(shared_data: str | Path, *, model: Any = None,
                   cache_dir: str | Path | None = None, out_dir: str | Path | None = None,
                   log: Callable[[str], None] | None = None, device: str = "cpu"
                   ) -> dict[str, Any]:
    """Run every case (the network on ``device``); returns ``{"model", "rows", "notes",
    "timings_s"}`` (rows as dicts) and, with ``out_dir``, writes robustness.json,
    robustness.md and overlay PNGs there."""
    import tempfile

    from medseg.io import load
    from medseg.models import load_model
    from medseg.segment import segment
    from medseg.train.realct import derive_lung_labels, load_real_ct, real_ct_path
    from medseg.train.validate import validate_on_cip

    say = log or (lambda _m: None)
    root = Path(shared_data)
    cache = Path(cache_dir) if cache_dir is not None else \
        Path(tempfile.gettempdir()) / "medseg-real-ct-cache"
    odir = Path(out_dir) if out_dir is not None else None
    if odir is not None:
        odir.mkdir(parents=True, exist_ok=True)
    loaded = load_model(model or DEFAULT_MODEL) if not hasattr(model, "spec") else model
    rows: list[RobustnessRow] = []
    notes: dict[str, str] = {}
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    def seg(vol: CTVolume) -> npt.NDArray[Any]:
        return np.asarray(segment(vol, model=loaded, device=device).labels.array)

    def timed(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        say(f"{name}: {timings[name]} s")

    # 1. LIDC as loaded ------------------------------------------------------------------
    t0 = time.perf_counter()
    lidc = load_real_ct(root, "lidc-idri-0001", cache)
    ref, stats = derive_lung_labels(lidc, LABEL_MODEL)
    notes["lidc reference"] = (f"derive_lung_labels({LABEL_MODEL}): {stats}; "
                               f"{int((ref == IGNORE).sum())} ignore voxels left out")
    clean = seg(lidc)
    for s, dv in _side_dice(clean, ref).items():
        rows.append(_row("lidc", f"Dice {SIDE[s]} vs reference", dv, ">=", 0.98))
    _write_overlays(odir, "lidc", lidc, clean)
    timed("lidc", t0)

    # 2. lesions ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    per_kind: dict[str, list[int]] = {}
    for cp in lesion_copies(lidc, ref):
        c, vol, lesions = cp.index, cp.volume, LESION_COPIES[cp.index]
        for what in cp.skipped:
            notes[f"lesion copy {c + 1}"] = f"no place for {what}"
        pred = seg(vol)
        for kind, _name, m, _m_c in cp.inserted:
            acc = per_kind.setdefault(kind, [0, 0])
            acc[0] += int(np.count_nonzero(pred[m] > 0))
            acc[1] += int(np.count_nonzero(m))
        kinds = "+".join(sorted({k for k, *_ in lesions}))
        d = _side_dice(pred, ref)
        rows.append(_row(f"lidc+lesions {c + 1}", f"Dice min(R,L) vs lung+lesion ref ({kinds})",
                         min(d.values()), ">=", 0.97))
        # each lesion on its own (reported only), and where its missed voxels lie
        pred_c, _ = to_canonical(lidc, pred > 0)
        under = []
        for _kind, name, _m, m in cp.inserted:
            rows.append(_row(f"lidc+lesions {c + 1}",
                             f"% {name} in lung ({int(m.sum())} vox)", _pct_inside(m, pred_c)))
            missed = m & ~pred_c
            if missed.any():
                lost = 100.0 * int(np.count_nonzero(missed)) / int(np.count_nonzero(m))
                under.append(f"{name}: {lost:.0f} % missed, "
                             f"{missed_without_lung_below(missed, pred_c):.0f} % of those "
                             "with no lung under them in their column")
        if under:
            notes[f"lesion copy {c + 1} misses"] = "; ".join(under)
        _write_overlays(odir, f"lidc-lesions-{c + 1}", vol, pred)
    for kind in ("consolidation", "mass", "cavity", "collapse", "ground_glass"):
        if kind not in per_kind:
            continue
        inside, total = per_kind[kind]
        pct = 100.0 * inside / max(1, total)
        target: tuple[str | None, float | None] = (">=", LESION_INSIDE_MIN_PCT) \
            if kind in ("consolidation", "mass") else (None, None)
        rows.append(_row("lidc+lesions", f"% {kind} voxels in lung ({total} vox)", pct,
                         *target))
    timed("lesions", t0)

    # 3. effusion --------------------------------------------------------------------------
    t0 = time.perf_counter()
    for cp in effusion_copies(lidc, ref):
        c, vol, ref_e = cp.index, cp.volume, cp.reference
        masks = [(name, m) for _kind, name, m, _m_c in cp.inserted]
        pred = seg(vol)
        for name, m in masks:
            rows.append(_row(f"lidc+effusion {c + 1}", f"% effusion {name} labelled lung",
                             _pct_inside(m, pred), "<=", EFFUSION_IN_LUNG_MAX_PCT))
        d = _side_dice(pred, ref_e)
        rows.append(_row(f"lidc+effusion {c + 1}", "Dice min(R,L) vs ref without fluid",
                         min(d.values()), ">=", 0.97))
        _write_overlays(odir, f"lidc-effusion-{c + 1}", vol, pred)
    timed("effusion", t0)

    # 4. LIDC nodules ----------------------------------------------------------------------
    t0 = time.perf_counter()
    folder = real_ct_path(root, "lidc-idri-0001", cache)
    xmls = sorted(folder.rglob("*.xml"))
    if xmls:
        rois = parse_lidc_xml(xmls[0])
        headers = _slice_headers(xmls[0].parent)
        nod, missing = nodule_mask(lidc, [r for r in rois if r.sop_uid], headers)
        n_inc = sum(r.inclusion for r in rois)
        notes["lidc nodules"] = (f"{xmls[0].name}: {len(rois)} ROIs ({n_inc} inclusion), "
                                 f"{missing} without a matching slice, {int(nod.sum())} "
                                 "voxels (union of readers)")
        rows.append(_row("lidc nodules", f"% nodule voxels in lung ({int(nod.sum())} vox)",
                         _pct_inside(nod, clean), ">=", 95.0))
    else:
        notes["lidc nodules"] = "no reader XML found"
    timed("nodules", t0)

    # 5. abdominal CT ----------------------------------------------------------------------
    t0 = time.perf_counter()
    ts_path = root / "totalseg-example" / "example_ct.nii.gz"
    ts = load(ts_path)
    ts_ref = totalseg_reference(ts)
    pred = seg(ts)
    vml = ts.voxel_volume_ml()
    gas = ts_ref == 3
    rows.append(_row("totalseg abdomen", "mL lung label on gut gas",
                     float(np.count_nonzero(pred[gas] > 0) * vml), "<=", 5.0))
    # anything else: air against the back under the mattress cover (60 mL of "right lung"
    # before rule 2's skin test), the reference's -400 HU rim at the bases (about 10 mL)
    rows.append(_row("totalseg abdomen", "mL lung label outside the reference bases",
                     float(np.count_nonzero((pred > 0) & ~np.isin(ts_ref, (1, 2))) * vml),
                     "<=", 20.0))
    for s in (1, 2):
        r = ts_ref == s
        recall = float(np.count_nonzero(pred[r] == s)) / max(1, int(r.sum()))
        rows.append(_row("totalseg abdomen", f"{SIDE[s]} base recall "
                         f"({r.sum() * vml:.0f} mL ref)", recall, ">=", 0.5))
        rows.append(_row("totalseg abdomen", f"{SIDE[s]} base Dice", _dice(pred == s, r)))
    notes["totalseg reference"] = (
        f"lung bases {int((ts_ref == 1).sum() * vml)} mL right, "
        f"{int((ts_ref == 2).sum() * vml)} mL left; gas {int(gas.sum() * vml)} mL")
    _write_overlays(odir, "totalseg", ts, pred)
    _write_overlays(odir, "totalseg-reference", ts, np.where(ts_ref == 3, 0, ts_ref))
    timed("totalseg", t0)

    # 6. crops -------------------------------------------------------------------------------
    t0 = time.perf_counter()
    crops = [("right hemithorax", *hemithorax_crop(lidc, 1)),
             ("left hemithorax", *hemithorax_crop(lidc, 2)),
             ("apex 40 %", *slab_crop(lidc, "apex")), ("base 40 %", *slab_crop(lidc, "base")),
             ("matrix cuts the right lung 20 mm", *lateral_crop(lidc, ref == 1)),
             ("matrix cuts the left lung 20 mm", *lateral_crop(lidc, ref == 2))]
    for name, vol, box in crops:
        r = ref[box]
        pred = seg(vol)
        d = _side_dice(pred, r)
        valid = r != IGNORE
        for s in (1, 2):
            if np.count_nonzero(r == s) > 1000:
                rows.append(_row(f"crop {name}", f"Dice {SIDE[s]} vs cropped ref", d[s],
                                 ">=", 0.95))
        lung = (r == 1) | (r == 2)
        wrong = int(np.count_nonzero(lung & valid & (pred > 0) & (pred != r)))
        rows.append(_row(f"crop {name}", "% lung labelled the wrong side",
                         100.0 * wrong / max(1, int(lung.sum())), "<=", 2.0))
        _write_overlays(odir, f"crop-{name}", vol, pred)
    timed("crops", t0)

    # 7. consistency -------------------------------------------------------------------------
    t0 = time.perf_counter()
    targets = {"noise 80 HU": 0.99, "rotation 12 deg": 0.98, "5 mm slices": 0.98}
    ax = lidc.axial_axis()
    plane = tuple(a for a in range(3) if a != ax)
    for name, vol in _consistency_volumes(lidc, np.random.default_rng([SEED, 7])).items():
        pred = seg(vol)
        if name == "rotation 12 deg":
            base = ndimage.rotate(clean, 12.0, axes=plane, reshape=False, order=0, cval=0)
        elif name == "5 mm slices":
            pred = np.repeat(pred, 2, axis=ax)
            base = np.take(clean, np.arange(pred.shape[ax]), axis=ax)
        elif name == "reversed storage":
            pred = np.flip(pred, ax)
            rows.append(_row("consistency", f"{name}: voxels differing from clean",
                             float(np.count_nonzero(pred != clean)), "==", 0.0))
            continue
        else:
            base = clean
        d = {s: _dice(pred == s, base == s) for s in (1, 2)}
        rows.append(_row("consistency", f"{name}: Dice min(R,L) vs clean mask",
                         min(d.values()), ">=", targets[name]))
    timed("consistency", t0)

    # 8. cip-ct64 -------------------------------------------------------------------------
    t0 = time.perf_counter()
    cip = validate_on_cip(root, model=loaded, device=device)
    for side_name in ("right", "left"):
        rows.append(_row("cip-ct64 held-out", f"Dice {side_name}",
                         cip["metrics"][side_name]["dice"],
                         ">=", 0.98))
    timed("cip", t0)

    # 9. bad input ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    cip_img = load(root / "cip-ct64" / "ct-64Dicom")
    bad: list[tuple[str, Callable[[], CTVolume]]] = [
        ("MR series (dicom2nifti anatomical/001)",
         lambda: load(root / "dicom2nifti" / "tests" / "data" / "anatomical" / "001")),
        ("non-HU 0..4095 (cip-ct64 + 1024)",
         lambda: cip_img.with_array(np.clip(cip_img.array.astype(np.int32) + 1024, 0, 4095)
                                    .astype(np.uint16))),
        ("all air (-1000 HU)",
         lambda: cip_img.with_array(np.full(cip_img.shape, -1000, np.int16))),
    ]
    for bad_name, make in bad:
        try:
            segment(make(), model=loaded, device=device)
        except MedsegError as exc:
            rows.append(RobustnessRow("bad input", f"{bad_name} refused",
                                      f"{type(exc).__name__}: {exc}", "refused", True))
        else:
            rows.append(RobustnessRow("bad input", f"{bad_name} refused", "accepted", "refused",
                                      False))
    timed("bad input", t0)
    timings["total"] = round(time.perf_counter() - t_all, 1)

    model_name = loaded.spec.name
    result = {"model": model_name, "rows": [asdict(r) for r in rows], "notes": notes,
              "timings_s": timings,
              "passed": sum(r.passed is True for r in rows),
              "failed": sum(r.passed is False for r in rows)}
    if odir is not None:
        (odir / "robustness.json").write_text(json.dumps(result, indent=2) + "\n")
        (odir / "robustness.md").write_text(
            f"# Robustness of {model_name}\n\n" + rows_markdown(rows) + "\n"
            + "".join(f"- {k}: {v}\n" for k, v in notes.items()))
    return result
