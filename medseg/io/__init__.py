"""Reading and writing volumes: DICOM folders/files/DICOMDIR, NIfTI, NRRD, MHA.

:func:`load` picks the reader from the path; :func:`save` picks the writer from the suffix.
Every writer is atomic (temporary name in the target folder, renamed when complete).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from medseg._lazy import lazy_getattr
from medseg.errors import ConfigError, NotFoundError
from medseg.io.atomic import atomic_output

if TYPE_CHECKING:
    from medseg.io.dicom import DicomScan, scan_dicom, verify_chosen
    from medseg.io.itkformats import from_sitk, to_sitk
    from medseg.volume import CTVolume

#: Names imported on first use (pydicom, SimpleITK and nibabel load only when a command reads
#: or writes a volume, not for ``medseg --help`` or a batch coordinator).
_LAZY = {"DicomScan": "medseg.io.dicom", "scan_dicom": "medseg.io.dicom",
         "verify_chosen": "medseg.io.dicom", "from_sitk": "medseg.io.itkformats",
         "to_sitk": "medseg.io.itkformats"}


__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = [
    "DicomScan",
    "atomic_output",
    "detect_format",
    "from_sitk",
    "load",
    "save",
    "scan_dicom",
    "to_sitk",
    "verify_chosen",
]

_ITK_SUFFIXES = {".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "mha", ".mhd": "mha"}


def detect_format(path: str | Path) -> str:
    """``"dicom"``, ``"nifti"``, ``"nrrd"`` or ``"mha"`` for an existing path."""
    p = Path(path)
    if not p.exists():
        raise NotFoundError("no such file or folder", path=p)
    if p.is_dir():
        return "dicom"
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if p.suffix.lower() in _ITK_SUFFIXES:
        return _ITK_SUFFIXES[p.suffix.lower()]
    return "dicom"  # a single (multi-frame) DICOM file, a DICOMDIR, or a file without suffix


def load(path: str | Path, *, series: str | None = None) -> CTVolume:
    """Load a volume from a DICOM folder/file/DICOMDIR, NIfTI, NRRD or MHA.

    ``series`` (a SeriesInstanceUID) picks one DICOM series; it is an error for other formats.

    Every format ends here: scanner padding outside the reconstruction circle (values at or
    below -1500 HU connected to the slice border) becomes -1024 HU, air, and is recorded in
    ``metadata.corrections`` (:mod:`medseg.io.padding`; DICOM also honours PixelPaddingValue).

    Headers are checked before they are trusted (:mod:`medseg.io.limits`: spacing, extent,
    voxel count against the file size and a memory budget; for DICOM also every slice's pixel
    storage and rescale, and each CT slice's values): a failed check raises a
    :class:`~medseg.errors.InputError` subclass naming the file (and slice).
    """
    from medseg.io.padding import correct_padding

    fmt = detect_format(path)
    if series is not None and fmt != "dicom":
        raise ConfigError(f"--series applies to DICOM input, not {fmt.upper()}", path=path)
    if fmt == "dicom":
        from medseg.io.dicom import load_dicom

        volume = load_dicom(path, series_uid=series)
    elif fmt == "nifti":
        from medseg.io.nifti import read_nifti

        volume = read_nifti(path)
    else:
        from medseg.io.itkformats import read_itk

        volume = read_itk(path, fmt)
    return correct_padding(volume)


def save(volume: CTVolume, path: str | Path) -> Path:
    """Write ``volume`` to ``.nii.gz``/``.nii``, ``.nrrd`` or ``.mha`` (atomic)."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        from medseg.io.nifti import write_nifti

        return write_nifti(volume, p)
    if p.suffix.lower() in (".nrrd", ".mha"):
        from medseg.io.itkformats import write_itk

        return write_itk(volume, p)
    raise ConfigError(
        f"unknown output format {p.suffix or '(no suffix)'!r}: use .nii.gz, .nii, .nrrd or .mha",
        path=p,
    )
