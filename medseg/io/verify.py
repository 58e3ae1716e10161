"""The definitional check of a loaded DICOM volume.

Independent of the loader's sorting, grid building and resampling: for every pixel of every
source frame, take its world position from that frame's own ImagePositionPatient,
ImageOrientationPatient and PixelSpacing, sample the volume there (trilinear) and compare
with the stored value after pydicom's modality LUT (rescale). It needs no peer converter, and
it catches a peer's error too.

For a volume on the acquired grid the positions fall on voxel centres (``max_offset_vox``
~ 0) and the values are equal. For a resampled volume (gantry tilt, variable spacing) they
differ by interpolation only: compare ``median_abs_diff`` with the image contrast.

The expected value of a CT pixel that is scanner padding (the PixelPaddingValue range of its
own header, or out-of-field: at or below -1500 HU and connected to the slice border) is air,
-1024 HU, as the loaders define it (:mod:`medseg.io.padding`), applied here to each stored
frame on its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.pixels import apply_modality_lut
from scipy.ndimage import map_coordinates

from medseg.io.padding import (
    AIR_HU,
    applies_to_modality,
    padding_stored_range,
    replace_out_of_field,
)
from medseg.volume import CTVolume

__all__ = ["PixelCheck", "check_against_dicom"]


@dataclass(frozen=True)
class PixelCheck:
    n_frames: int
    n_pixels: int
    #: Pixels whose world position lies inside the volume's grid.
    n_inside: int
    #: Largest distance (in voxels) from a pixel position to the nearest voxel centre.
    max_offset_vox: float
    max_abs_diff: float
    median_abs_diff: float
    p99_abs_diff: float
    #: Fraction of inside pixels whose sampled value equals the stored one (within 1e-3).
    frac_equal: float
    #: Fraction of inside pixels equal (within 1e-3) to the voxel nearest to them: 1.0 for a
    #: volume on the acquired grid.
    frac_equal_nearest: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _frame_geometry(ds: pydicom.Dataset) -> Iterable[tuple[int | None, Any, Any, Any, Any]]:
    """(frame index, IPP, IOP, PixelSpacing, dataset-with-rescale) for each frame."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0] \
            if "SharedFunctionalGroupsSequence" in ds else pydicom.Dataset()
        for i, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
            def get(seq: str, kw: str, fg: Any = fg) -> Any:
                for grp in (fg, shared):
                    if seq in grp and kw in grp[seq][0]:
                        return grp[seq][0][kw].value
                return None
            rescale = pydicom.Dataset()
            slope = get("PixelValueTransformationSequence", "RescaleSlope")
            if slope is not None:
                rescale.RescaleSlope = slope
                rescale.RescaleIntercept = get("PixelValueTransformationSequence",
                                               "RescaleIntercept")
            yield (i, get("PlanePositionSequence", "ImagePositionPatient"),
                   get("PlaneOrientationSequence", "ImageOrientationPatient"),
                   get("PixelMeasuresSequence", "PixelSpacing"), rescale)
    else:
        yield None, ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing, ds


def _padding_as_air(hu: npt.NDArray[np.float64], raw: npt.NDArray[Any],
                    ds: pydicom.Dataset) -> npt.NDArray[np.float64]:
    """The frame's expected values: padding (tag range on the stored values, below air) and
    out-of-field pixels set to air, for CT."""
    if not applies_to_modality(str(ds.get("Modality", "")) or None):
        return hu
    bits = int(ds.get("BitsAllocated", 16))
    rng = padding_stored_range(
        ds.get("PixelPaddingValue"), ds.get("PixelPaddingRangeLimit"),
        pixel_representation=int(ds.get("PixelRepresentation", 0)), bits_allocated=bits,
        bits_stored=int(ds.get("BitsStored", bits)))
    if rng is not None:
        stored = np.asarray(raw).astype(np.int64)
        hu[(stored >= rng[0]) & (stored <= rng[1]) & (hu < AIR_HU)] = AIR_HU
    replace_out_of_field(hu[None], axis=0)
    return hu


def check_against_dicom(volume: CTVolume, files: Iterable[str | Path] | None = None, *,
                        stride: int = 1) -> PixelCheck:
    """Compare ``volume`` with the stored pixels of ``files`` (default: the volume's own
    ``metadata.source_files``) at each pixel's world position. ``stride`` subsamples rows
    and columns for speed."""
    paths = sorted({str(p) for p in (files if files is not None
                                     else volume.metadata.source_files)})
    arr = np.asarray(volume.array, np.float32)
    shape_kji = np.array(volume.shape, float)
    diffs: list[npt.NDArray[np.float64]] = []
    near_diffs: list[npt.NDArray[np.float64]] = []
    offsets: list[float] = []
    n_frames = n_pixels = 0
    for path in paths:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
            pixels = np.asarray(ds.pixel_array)
        for frame, ipp, iop, ps, rescale_ds in _frame_geometry(ds):
            img = pixels[frame] if frame is not None and pixels.ndim == 3 else pixels
            raw = img
            img = apply_modality_lut(img, rescale_ds) if "RescaleSlope" in rescale_ds \
                else img.astype(float)
            img = _padding_as_air(np.array(img, float), raw, ds)
            rows = np.arange(0, img.shape[0], stride)
            cols = np.arange(0, img.shape[1], stride)
            r, c = np.meshgrid(rows, cols, indexing="ij")
            row_dir = np.asarray(iop[:3], float)
            col_dir = np.asarray(iop[3:], float)
            world = (np.asarray(ipp, float)[None, :]
                     + (c.reshape(-1, 1) * float(ps[1])) * row_dir[None, :]
                     + (r.reshape(-1, 1) * float(ps[0])) * col_dir[None, :])
            ijk = volume.geometry.world_to_index(world)
            kji = ijk[:, ::-1]
            inside = np.all((kji > -1e-3) & (kji < shape_kji - 1 + 1e-3), axis=1)
            n_frames += 1
            n_pixels += len(kji)
            if not inside.any():
                continue
            sel = kji[inside]
            offsets.append(float(np.abs(sel - np.round(sel)).max()))
            sampled = map_coordinates(arr, sel.T, order=1, mode="nearest")
            stored = np.asarray(img, float)[r, c].reshape(-1)[inside]
            diffs.append(np.abs(sampled - stored))
            nearest = map_coordinates(arr, np.round(sel).T, order=0, mode="nearest")
            near_diffs.append(np.abs(nearest - stored))
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    return PixelCheck(
        n_frames=n_frames,
        n_pixels=n_pixels,
        n_inside=int(d.size),
        max_offset_vox=max(offsets) if offsets else float("nan"),
        max_abs_diff=float(d.max()) if d.size else float("nan"),
        median_abs_diff=float(np.median(d)) if d.size else float("nan"),
        p99_abs_diff=float(np.percentile(d, 99)) if d.size else float("nan"),
        frac_equal=float(np.mean(d <= 1e-3)) if d.size else float("nan"),
        frac_equal_nearest=float(np.mean(np.concatenate(near_diffs) <= 1e-3))
        if near_diffs else float("nan"),
    )
