"""SHA-256 of files, streamed (one helper for the model loader, the reports and the batch
state). Imports only the standard library."""

from __future__ import annotations

import hashlib
import os

__all__ = ["sha256_file"]

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
