"""medseg: lung segmentation and reporting for chest CT.

The public API is listed in ``__all__``; modules whose names start with ``_`` are private.
"""

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
from medseg.io import load, save, scan_dicom
from medseg.volume import CTVolume, Geometry, VolumeMetadata

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
