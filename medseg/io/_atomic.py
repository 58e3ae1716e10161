"""Atomic writes: every output goes to a temporary name in the target folder and is renamed
into place only when complete, so an interrupted or failed write never leaves a partial file
under the final name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from medseg.errors import OutputError

__all__ = ["atomic_output", "split_suffix"]

#: The process's umask, read once (reading it means setting it; doing that at import time,
#: before any worker threads exist, keeps it race-free).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def split_suffix(path: Path) -> tuple[str, str]:
    """``("lungs", ".nii.gz")`` for ``lungs.nii.gz``; double suffixes kept together."""
    name = path.name
    for double in (".nii.gz", ".tar.gz"):
        if name.lower().endswith(double):
            return name[: -len(double)], name[-len(double) :]
    return path.stem, path.suffix


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` (same suffix, so writers that look at the
    extension behave); rename it onto ``target`` when the block ends without error, remove
    it otherwise."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder: {exc.strerror}", path=target) from exc
    stem, suffix = split_suffix(target)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{stem}.", suffix=f".partial{suffix}", dir=target.parent
    )
    # mkstemp makes the file private (0600); outputs get the permissions any new file of
    # this user gets (0644 with the usual umask), so a group can read a shared results folder.
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write: {exc.strerror or exc}", path=target) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
