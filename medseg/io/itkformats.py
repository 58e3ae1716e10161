"""NRRD and MetaImage (MHA/MHD) through SimpleITK. ITK already works in LPS, like medseg."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.errors import GeometryError, NotAVolumeError, PixelDataError, UnreadableFileError
from medseg.io._atomic import atomic_output
from medseg.volume import CTVolume, Geometry, VolumeMetadata

__all__ = ["from_sitk", "read_itk", "to_sitk", "write_itk"]


def from_sitk(image: sitk.Image, *, path: str | Path | None = None) -> CTVolume:
    """Convert a 3D scalar SimpleITK image (LPS) to a :class:`CTVolume`."""
    if image.GetDimension() != 3:
        raise NotAVolumeError(f"image has {image.GetDimension()} dimensions; medseg reads 3D",
                              path=path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise PixelDataError(
            f"image has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "medseg reads scalar volumes", path=path)
    try:
        geometry = Geometry(
            origin=image.GetOrigin(),
            spacing=image.GetSpacing(),
            direction=np.asarray(image.GetDirection(), float).reshape(3, 3),
        )
    except GeometryError as exc:
        raise GeometryError(exc.reason, path=path) from exc
    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise PixelDataError(f"{n_bad} voxel(s) are NaN or infinite", path=path)
    return CTVolume(array, geometry, VolumeMetadata())


def to_sitk(volume: CTVolume) -> sitk.Image:
    """Convert to a SimpleITK image with the same geometry (LPS)."""
    arr = volume.array
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    image = sitk.GetImageFromArray(arr)
    image.SetOrigin(volume.geometry.origin)
    image.SetSpacing(volume.geometry.spacing)
    image.SetDirection(tuple(float(v) for v in volume.geometry.direction.reshape(-1)))
    return image


def read_itk(path: str | Path, fmt: str) -> CTVolume:
    path = Path(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise UnreadableFileError(
            f"cannot read {fmt.upper()}: {first[-1] if first else exc}", path=path
        ) from exc
    volume = from_sitk(image, path=path)
    volume.metadata = VolumeMetadata(source_format=fmt, source_path=str(path))
    return volume


def write_itk(volume: CTVolume, path: str | Path) -> Path:
    """Write NRRD/MHA/MHD (compressed), atomically."""
    path = Path(path)
    image = to_sitk(volume)
    with atomic_output(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return path
