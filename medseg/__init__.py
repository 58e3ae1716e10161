"""medseg: lung segmentation and reporting for chest CT.

The public API is listed in ``__all__``; modules whose names start with ``_`` are private.
"""

from typing import TYPE_CHECKING, Any

from medseg._version import __version__
from medseg.errors import (
    ConfigError,
    GeometryError,
    InconsistentOrientationError,
    InputError,
    MedsegError,
    MissingSlicesError,
    ModalityError,
    NoSeriesError,
    NotAVolumeError,
    NotFoundError,
    OutputError,
    PacsAuthError,
    PacsConnectionError,
    PacsError,
    PacsNotFoundError,
    PacsStoreError,
    PixelDataError,
    SeriesSelectionError,
    UnreadableFileError,
)
from medseg.volume import CTVolume, Geometry, VolumeMetadata

if TYPE_CHECKING:
    from medseg.io import load, save, scan_dicom


def __getattr__(name: str) -> Any:
    """``load``, ``save`` and ``scan_dicom`` import the readers on first use, so that
    ``import medseg`` (and ``medseg --help``) stays light."""
    if name in ("load", "save", "scan_dicom"):
        import medseg.io

        value = getattr(medseg.io, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CTVolume",
    "ConfigError",
    "Geometry",
    "GeometryError",
    "InconsistentOrientationError",
    "InputError",
    "MedsegError",
    "MissingSlicesError",
    "ModalityError",
    "NoSeriesError",
    "NotAVolumeError",
    "NotFoundError",
    "OutputError",
    "PacsAuthError",
    "PacsConnectionError",
    "PacsError",
    "PacsNotFoundError",
    "PacsStoreError",
    "PixelDataError",
    "SeriesSelectionError",
    "UnreadableFileError",
    "VolumeMetadata",
    "__version__",
    "load",
    "save",
    "scan_dicom",
]
