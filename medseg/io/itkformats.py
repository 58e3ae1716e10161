"""NRRD and MetaImage (MHA/MHD) through SimpleITK. ITK already works in LPS, like medseg."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.errors import GeometryError, NotAVolumeError, PixelDataError, UnreadableFileError
from medseg.io.atomic import atomic_output
from medseg.io.limits import check_volume_geometry, check_volume_size
from medseg.volume import CTVolume, Geometry, VolumeMetadata

__all__ = ["from_sitk", "read_itk", "to_sitk", "write_itk"]

#: Bytes of one voxel component per SimpleITK pixel type (scalar and vector types alike).
_COMPONENT_BYTES = {
    sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2,
    sitk.sitkUInt32: 4, sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8,
    sitk.sitkFloat32: 4, sitk.sitkFloat64: 8,
    sitk.sitkVectorUInt8: 1, sitk.sitkVectorInt8: 1, sitk.sitkVectorUInt16: 2,
    sitk.sitkVectorInt16: 2, sitk.sitkVectorUInt32: 4, sitk.sitkVectorInt32: 4,
    sitk.sitkVectorUInt64: 8, sitk.sitkVectorInt64: 8, sitk.sitkVectorFloat32: 4,
    sitk.sitkVectorFloat64: 8,
}
#: The text header of a NRRD/MHA file is read up to this many bytes (headers are < 4 KiB).
_MAX_HEADER_BYTES = 1 << 16


def _voxel_data_bytes(path: Path) -> tuple[int | None, str | None]:
    """(bytes of voxel data the file(s) hold, compression) from a NRRD or MetaImage text
    header: compression None for raw data, ``"deflate"`` for gzip/zlib; bytes None where they
    cannot be told (ascii/bzip2 encodings, lists of data files, an unparsable header)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_MAX_HEADER_BYTES)
        size = path.stat().st_size
    except OSError:
        return None, None
    if head.startswith(b"NRRD"):
        end = head.find(b"\n\n")
        end = end + 2 if end >= 0 else -1
        if end < 0:
            crlf = head.find(b"\r\n\r\n")
            end = crlf + 4 if crlf >= 0 else -1
        fields: dict[str, str] = {}
        for line in head[:end if end >= 0 else None].decode("latin-1").splitlines():
            if ":" in line and not line.startswith("#") and ":=" not in line:
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip()
        encoding = fields.get("encoding", "raw").lower()
        compression = {"raw": None, "gzip": "deflate", "gz": "deflate"}.get(encoding, "other")
        if compression == "other":
            return None, None
        datafile = fields.get("data file") or fields.get("datafile")
        if datafile:
            if " " in datafile or datafile.upper().startswith("LIST"):
                return None, None  # a list or a pattern of files
            try:
                return (path.parent / datafile).stat().st_size, compression
            except OSError:
                return None, None  # SimpleITK names the missing file
        return (size - end, compression) if end >= 0 else (None, None)
    # MetaImage: "Key = Value" lines, ElementDataFile last
    pos = 0
    compressed = False
    for raw_line in head.split(b"\n"):
        pos += len(raw_line) + 1
        line = raw_line.decode("latin-1").strip()
        key, _, value = line.partition("=")
        key, value = key.strip().lower(), value.strip()
        if key == "compresseddata":
            compressed = value.lower() == "true"
        if key == "elementdatafile":
            compression = "deflate" if compressed else None
            if value.upper() == "LOCAL":
                return (size - pos if pos <= len(head) else None), compression
            if value.upper() == "LIST" or "%" in value or " " in value:
                return None, None
            try:
                return (path.parent / value).stat().st_size, compression
            except OSError:
                return None, None
    return None, None


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


def _unreadable(fmt: str, path: Path, exc: Exception) -> UnreadableFileError:
    first = str(exc).strip().splitlines()
    return UnreadableFileError(f"cannot read {fmt.upper()}: {first[-1] if first else exc}",
                               path=path)


def read_itk(path: str | Path, fmt: str) -> CTVolume:
    """Read a NRRD or MetaImage file. The header is read first: its voxel grid is checked
    against the size of the data it points to and the memory budget, and its spacing and
    extent against :mod:`medseg.io.limits`, before any voxel is read."""
    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(fmt, path, exc) from exc
    size = reader.GetSize()
    if reader.GetDimension() != 3:
        raise NotAVolumeError(f"image has {reader.GetDimension()} dimensions "
                              f"{tuple(size)}; medseg reads 3D", path=path)
    component = _COMPONENT_BYTES.get(reader.GetPixelID())
    itemsize = None if component is None else component * reader.GetNumberOfComponents()
    data_bytes, compression = _voxel_data_bytes(path)
    check_volume_size(size, path=path, itemsize=itemsize,
                      data_bytes=data_bytes if itemsize is not None else None,
                      compression=compression)
    check_volume_geometry(reader.GetSpacing(), size, path=path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise _unreadable(fmt, path, exc) from exc
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
