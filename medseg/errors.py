"""The medseg exception tree.

Every error medseg raises on purpose derives from :class:`MedsegError` and carries the
context a person needs to act on it: the file or folder, the series, and the reason.
The command line prints ``medseg: error: <message>`` for these and exits non-zero,
without a traceback.

::

    MedsegError
    ├── InputError                  the input cannot be used as given
    │   ├── NotFoundError           path does not exist / nothing readable in it
    │   ├── UnreadableFileError     a file is corrupt, truncated, or of an unknown format
    │   ├── NoSeriesError           a folder holds no usable image series
    │   ├── SeriesSelectionError    --series names no series, or the choice is ambiguous
    │   ├── GeometryError           the world geometry cannot be established exactly
    │   │   ├── InconsistentOrientationError
    │   │   ├── MissingSlicesError
    │   │   └── NotAVolumeError     a 2D image, a single slice, a 4D series ...
    │   ├── PixelDataError          pixel data missing, undecodable, NaN, wrong size
    │   └── ModalityError           e.g. segmentation asked of an MR series
    ├── OutputError                 an output cannot be written
    ├── ConfigError                 a pipeline/config file or an argument is invalid
    └── PacsError                   a DICOMweb server cannot be used (names the URL, never
        │                           the credentials)
        ├── PacsConnectionError     nothing answers, connection refused, timeout, TLS failure
        ├── PacsAuthError           401/403: missing or wrong credentials, no permission
        ├── PacsNotFoundError       404 or a non-DICOMweb answer: wrong URL, unknown study
        └── PacsStoreError          STOW-RS refused some or all instances
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "ConfigError",
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
]


class MedsegError(Exception):
    """Base of every error medseg raises on purpose.

    Parameters
    ----------
    reason:
        What is wrong, in words a user understands.
    path:
        The file or folder concerned, if any.
    series:
        The SeriesInstanceUID (or another series label) concerned, if any.
    """

    def __init__(
        self, reason: str, *, path: str | Path | None = None, series: str | None = None
    ) -> None:
        self.reason = reason
        self.path = str(path) if path is not None else None
        self.series = series
        super().__init__(self._format())

    def relocate(self, path: str | Path | None, series: str | None = None) -> None:
        """Point the error at another location (e.g. the server a deleted local copy came
        from); the message follows. ``series`` fills in the series if none was named."""
        self.path = str(path) if path is not None else None
        self.series = self.series or series
        self.args = (self._format(),)

    def relocate_within(self, folder: str | Path, source: str, what: str,
                        series: str | None = None) -> None:
        """If the error names ``folder`` or a file in it (a local copy that will be deleted),
        point it at ``source`` instead: the folder itself becomes ``source``, a file
        ``source (<what> <name>)``. Errors about other paths are left as they are."""
        if self.path is None:
            return
        try:
            rel = Path(self.path).resolve().relative_to(Path(folder).resolve())
        except ValueError:
            return
        self.relocate(source if rel == Path(".") else f"{source} ({what} {rel})", series)

    def _format(self) -> str:
        parts = []
        if self.path:
            parts.append(self.path)
        if self.series:
            parts.append(f"series {self.series}")
        prefix = ": ".join(parts)
        return f"{prefix}: {self.reason}" if prefix else self.reason


class InputError(MedsegError):
    """The input cannot be used as given."""


class NotFoundError(InputError):
    """The path does not exist, or holds nothing medseg can read."""


class UnreadableFileError(InputError):
    """A file is corrupt, truncated, or in a format medseg does not read."""


class NoSeriesError(InputError):
    """A folder holds no usable image series."""


class SeriesSelectionError(InputError):
    """The requested series does not exist, or no series qualifies."""


class GeometryError(InputError):
    """The world geometry of the input cannot be established exactly."""


class InconsistentOrientationError(GeometryError):
    """Slices of one series have different orientations or in-plane grids."""


class MissingSlicesError(GeometryError):
    """Slices are missing from a series (a gap that is a multiple of the spacing)."""


class NotAVolumeError(GeometryError):
    """The input is not a 3D volume (a 2D image, a single slice, a 4D series...)."""


class PixelDataError(InputError):
    """Pixel data is missing, cannot be decoded, or holds invalid values."""


class ModalityError(InputError):
    """The modality does not suit the operation (segmentation needs CT)."""


class OutputError(MedsegError):
    """An output cannot be written."""


class ConfigError(MedsegError):
    """A configuration file or an argument is invalid."""


class PacsError(MedsegError):
    """A DICOMweb server cannot be used as asked.

    ``url`` is the server's URL (or the request's) without credentials; messages never hold
    a user name, password or token. Connection problems and server errors may be transient
    (a batch retries them); the subclasses say which problem it is.
    """

    def __init__(self, reason: str, *, url: str | None = None, series: str | None = None
                 ) -> None:
        self.url = url
        super().__init__(reason, path=url, series=series)


class PacsConnectionError(PacsError):
    """Nothing answers at the URL: connection refused, unknown host, timeout, TLS failure."""


class PacsAuthError(PacsError):
    """The server refused the credentials (401) or the permission (403)."""


class PacsNotFoundError(PacsError):
    """404, or an answer that is not DICOMweb: a wrong root URL, or an unknown study/series."""


class PacsStoreError(PacsError):
    """STOW-RS refused some or all of the instances sent (the failed SOP instances named)."""
