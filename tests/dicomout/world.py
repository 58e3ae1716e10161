"""Reading a DICOM SEG back frame by frame in world space, independently of medseg's writer:
each frame's pixels are placed from the frame's own PlanePositionSequence and the shared
orientation and pixel spacing, then compared with a label volume at the same world points."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from scipy import ndimage

from medseg.volume import CTVolume


@dataclass
class Agreement:
    labelled: int  # pixels labelled in the SEG or in the volume at that point
    agree: int
    disagree_at_boundary: int
    disagree_inside: int  # disagreements more than one voxel from a label boundary

    @property
    def fraction(self) -> float:
        return 1.0 if self.labelled == 0 else self.agree / self.labelled


def seg_frames(path: Path) -> list[tuple[np.ndarray, np.ndarray, tuple[float, float], int, str,
                                          np.ndarray]]:
    """(position, orientation, (dr, dc), segment number, source SOPInstanceUID, pixels) per
    frame, as the SEG file states them."""
    ds = pydicom.dcmread(path)
    pix = ds.pixel_array
    if pix.ndim == 2:
        pix = pix[None]
    shared = ds.SharedFunctionalGroupsSequence[0]
    out = []
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        iop_seq = item.get("PlaneOrientationSequence") or shared.PlaneOrientationSequence
        pm_seq = item.get("PixelMeasuresSequence") or shared.PixelMeasuresSequence
        iop = np.array(iop_seq[0].ImageOrientationPatient, float)
        dr, dc = (float(v) for v in pm_seq[0].PixelSpacing)
        pos = np.array(item.PlanePositionSequence[0].ImagePositionPatient, float)
        segno = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        src = str(item.DerivationImageSequence[0].SourceImageSequence[0]
                  .ReferencedSOPInstanceUID)
        out.append((pos, iop, (dr, dc), segno, src, pix[f]))
    return out


def _boundary(lab: np.ndarray, s: int) -> np.ndarray:
    """Voxels with label ``s`` and another label both within one voxel (26-neighbourhood),
    computed in the label's bounding box."""
    inside = lab == s
    out = np.zeros(lab.shape, bool)
    if not inside.any():
        return out
    box = tuple(slice(max(int(a.min()) - 2, 0), int(a.max()) + 3) for a in np.nonzero(inside))
    cube = np.ones((3, 3, 3), bool)
    sub = inside[box]
    out[box] = ndimage.binary_dilation(sub, cube) & ndimage.binary_dilation(~sub, cube)
    return out


def plane_lookup(volume: CTVolume, pos: np.ndarray, iop: np.ndarray,
                 spacing_rc: tuple[float, float], rows: int, cols: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`lookup` of every pixel of a plane, row-major (the plane is affine, so its
    pixels' voxel indices are too: computed from three points)."""
    g = volume.geometry
    corner = g.world_to_index(pos)[0]
    du = g.world_to_index(pos + spacing_rc[1] * iop[:3])[0] - corner
    dv = g.world_to_index(pos + spacing_rc[0] * iop[3:])[0] - corner
    c = np.arange(cols)[None, :]
    r = np.arange(rows)[:, None]
    ok = np.ones((rows, cols), bool)
    kji = np.empty((rows * cols, 3), np.int32)
    for axis, n in enumerate(volume.shape[::-1]):
        idx = np.rint(corner[axis] + c * du[axis] + r * dv[axis]).astype(np.int32)
        ok &= (idx >= 0) & (idx < n)
        kji[:, 2 - axis] = np.clip(idx, 0, n - 1).reshape(-1)
    return kji, ok.reshape(-1)


def compare_with_volume(path: Path, volume: CTVolume) -> Agreement:
    """Every pixel of every SEG frame against the label ``volume`` has at its world point."""
    lab = volume.array
    near: dict[int, np.ndarray] = {}
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    total = agree = at_boundary = inside_err = 0
    for pos, iop, sp, segno, src, pix in seg_frames(path):
        rows, cols = pix.shape
        if src not in cache:  # both segments of a source plane share its pixels' places
            cache[src] = plane_lookup(volume, pos, iop, sp, rows, cols)
        kji, ok = cache[src]
        expected = np.zeros(rows * cols, bool)
        expected[ok] = lab[kji[ok, 0], kji[ok, 1], kji[ok, 2]] == segno
        got = pix.reshape(-1).astype(bool)
        total += int((expected | got).sum())
        agree += int((expected & got).sum())
        wrong = expected ^ got
        if not wrong.any():
            continue
        if segno not in near:
            near[segno] = _boundary(lab, segno)
        boundary = np.zeros_like(wrong)
        boundary[ok] = near[segno][kji[ok, 0], kji[ok, 1], kji[ok, 2]]
        at_boundary += int((wrong & boundary).sum())
        inside_err += int((wrong & ~boundary).sum())
    return Agreement(total, agree, at_boundary, inside_err)


def planes_with_labels(source_files: list[str], volume: CTVolume) -> set[tuple[str, int]]:
    """(SOPInstanceUID, segment) of each single-frame source image whose plane meets label
    1 or 2 of ``volume`` (read from the source headers directly)."""
    out = set()
    for f in dict.fromkeys(source_files):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        kji, ok = plane_lookup(volume, np.array(ds.ImagePositionPatient, float),
                               np.array(ds.ImageOrientationPatient, float), (dr, dc),
                               int(ds.Rows), int(ds.Columns))
        vals = volume.array[kji[ok, 0], kji[ok, 1], kji[ok, 2]]
        out |= {(str(ds.SOPInstanceUID), int(s)) for s in np.unique(vals) if s in (1, 2)}
    return out
