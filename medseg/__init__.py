"""medseg: lung segmentation and reporting for chest CT.

The public API is listed in ``__all__``; modules whose names start with ``_`` are private.
"""

from typing import TYPE_CHECKING

from medseg._lazy import lazy_getattr
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


# load, save and scan_dicom import the readers on first use: ``import medseg`` (and
# ``medseg --help``) stays light
__getattr__ = lazy_getattr(__name__, {n: "medseg.io" for n in ("load", "save", "scan_dicom")})

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
