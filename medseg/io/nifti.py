"""NIfTI-1 reading and writing (nibabel), with explicit RAS <-> LPS conversion."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from medseg.errors import GeometryError, NotAVolumeError, PixelDataError, UnreadableFileError
from medseg.io.atomic import atomic_output
from medseg.io.limits import check_volume_geometry, check_volume_size
from medseg.volume import CTVolume, Geometry, VolumeMetadata

__all__ = ["read_nifti", "write_nifti"]

#: NIfTI xform code 1: "scanner-based anatomical coordinates" (the DICOM patient frame).
NIFTI_XFORM_SCANNER = 1


def read_nifti(path: str | Path) -> CTVolume:
    """Read a ``.nii``/``.nii.gz`` file.

    The sform is used when its code is set, else the qform; a file with neither has no
    world geometry and is refused (medseg never guesses geometry). Scaling
    (``scl_slope``/``scl_inter``) is applied. A 4D file with one volume is accepted;
    2D and true 4D files are refused.

    Before any voxel is read, the header's shape is checked against the file's size (for
    ``.nii.gz``: what deflate can hold at most) and the memory budget, and the spacing and
    extent against :mod:`medseg.io.limits`.
    """
    path = Path(path)
    try:
        img: Any = nib.load(str(path))
        hdr = img.header
        sform, s_code = img.get_sform(coded=True)
        qform, q_code = img.get_qform(coded=True)
        shape = tuple(int(n) for n in hdr.get_data_shape())
        itemsize = int(hdr.get_data_dtype().itemsize)
        offset = int(hdr.get_data_offset())
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError,
            ValueError) as exc:
        raise UnreadableFileError(f"cannot read NIfTI: {exc}", path=path) from exc
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise NotAVolumeError(
            f"NIfTI image has {len(shape)} dimensions {shape}; medseg reads 3D volumes",
            path=path,
        )
    size = path.stat().st_size
    compressed = path.name.lower().endswith(".gz")
    check_volume_size(shape, path=path, itemsize=itemsize,
                      data_bytes=size if compressed else max(0, size - offset),
                      compression="deflate" if compressed else None)
    if s_code and s_code > 0 and sform is not None:
        affine = sform
    elif q_code and q_code > 0 and qform is not None:
        affine = qform
    else:
        raise GeometryError(
            "neither sform nor qform is set (codes are 0): the world geometry is unknown",
            path=path,
        )
    try:
        geometry = Geometry.from_affine(affine, ras=True)
    except GeometryError as exc:
        raise GeometryError(exc.reason, path=path) from exc
    check_volume_geometry(geometry.spacing, shape, path=path)
    try:
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise UnreadableFileError(f"cannot read NIfTI: {exc}", path=path) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise PixelDataError(f"{n_bad} voxel(s) are NaN or infinite", path=path)
    if data.dtype.kind not in "biuf":
        raise PixelDataError(f"unsupported voxel type {data.dtype}", path=path)
    array = np.ascontiguousarray(data.transpose(2, 1, 0))
    descrip = hdr.get("descrip")
    meta = VolumeMetadata(
        source_format="nifti",
        source_path=str(path),
        series_description=(bytes(descrip).decode("latin-1").strip("\x00 ") or None)
        if descrip is not None
        else None,
    )
    return CTVolume(array, geometry, meta)


def nifti_dtype(array: npt.NDArray[Any]) -> np.dtype[Any]:
    """The dtype stored on disk: bool -> uint8, float64 -> float32, wide ints narrowed when
    the values fit, everything else unchanged."""
    kind, size = array.dtype.kind, array.dtype.itemsize
    if kind == "b":
        return np.dtype(np.uint8)
    if kind == "f":
        return np.dtype(np.float32)
    if kind in "iu" and size > 2 and array.size:
        lo, hi = int(array.min()), int(array.max())
        for candidate in (np.uint8, np.int16, np.int32):
            info = np.iinfo(candidate)
            if info.min <= lo and hi <= info.max:
                return np.dtype(candidate)
    return array.dtype


def write_nifti(volume: CTVolume, path: str | Path) -> Path:
    """Write ``volume`` as NIfTI-1 (gzip when the name ends in ``.gz``), sform and qform
    both set to the volume's affine in RAS with code 1 (scanner). Atomic."""
    path = Path(path)
    dtype = nifti_dtype(volume.array)
    data = np.asarray(volume.array, dtype=dtype).transpose(2, 1, 0)
    affine = volume.geometry.affine_ras
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=NIFTI_XFORM_SCANNER)
    img.set_qform(affine, code=NIFTI_XFORM_SCANNER)
    img.header.set_data_dtype(dtype)
    descrip = (volume.metadata.series_description or "medseg")[:79]
    img.header["descrip"] = descrip.encode("ascii", "replace")
    with atomic_output(path) as tmp:
        nib.save(img, str(tmp))
    return path
