"""Atomic writes, of one file and of a set of files.

One file: :func:`atomic_output` writes to a temporary name in the target folder and renames it
into place only when complete, so an interrupted or failed write never leaves a partial file
under the final name.

A set of files: :func:`output_unit` makes the outputs of one study (``medseg segment``'s
``lungs.nii.gz``, ``segment.json``, reports, DICOM SEG and SR) one unit in a folder that may
also hold the user's own files::

    OUT_DIR/
    ├── .medseg.lock                  flock'ed while a run writes here; removed at its end
    ├── .medseg-staging-<random>/     this run's outputs while they are being written
    ├── .medseg-commit-<random>/      the same folder renamed once complete: the commit
    │   └── .manifest.json            which names it holds and which old names go
    ├── lungs.nii.gz, segment.json …  the current outputs (the "set")
    └── anything else                 the user's: never read, moved or deleted

1. **Lock.** An exclusive ``flock`` on ``OUT_DIR/.medseg.lock``, taken before anything else
   and held until the end. A second run into the same folder does not wait: it fails at once
   with an :class:`~medseg.errors.OutputError` naming the folder (two runs into one folder are
   almost always a mistake, and waiting would silently replace the first run's result with
   the second's). The kernel drops the lock when its process dies, so a killed run never
   blocks the next. The lock file is removed at the end while still held; a run that opened
   it just before checks after locking that the path still names the file it locked, and
   otherwise locks the new one. ``flock`` needs a local file system or NFSv4 (and does not
   exist on Windows, where there is no lock).
2. **Recover** what a killed run left (under the lock, so it cannot be a live run's): a
   commit folder is *rolled forward* (step 5), staging folders and the hidden
   ``.<name>.*.partial<suffix>`` files of :func:`atomic_output` for the unit's names are
   deleted.
3. **Stage.** The caller writes every output into a fresh ``.medseg-staging-<random>/``
   inside ``OUT_DIR`` (so on the same file system: renames, never copies). ``OUT_DIR``'s
   outputs are not touched. Any exception, ``KeyboardInterrupt`` included, deletes the
   staging folder (and ``OUT_DIR`` itself if this run created it and it is empty): the folder
   is as it was.
4. **Commit.** Every staged file and a manifest (the staged names, the unit's other names to
   delete, the record's name) are fsynced, then the staging folder is renamed to
   ``.medseg-commit-<random>``: one ``rename(2)``, atomic. Before it, the previous set is the
   state of the folder; from it on, the new set is.
5. **Swap (roll forward)**, in this order: delete the old record (``segment.json``); delete
   the unit's names the new set does not have (e.g. ``lungs.seg.dcm`` after a NIfTI run,
   ``report.*`` after ``--no-report``); rename each new file over the old one; rename the new
   record last; remove the empty commit folder. Each step can be done again after a crash
   (a file already moved is no longer in the commit folder; a delete of a missing file is
   nothing), so the next run finishes an interrupted swap exactly.

What a crash leaves, at any instant: before the commit rename, the complete previous set
(plus a staging folder the next run deletes); after the swap, the complete new set. During
the swap itself (a few renames and unlinks, well under a millisecond) the folder holds **no
record**: ``segment.json`` is present only when every file it lists belongs to it, so no
reader takes a half-swapped folder for a result, and the next run into the folder completes
the swap first thing, even if it then fails on its own input. Why not a single atomic
exchange of the whole folder (``renameat2(RENAME_EXCHANGE)``)? It would also move the user's
own files, sub-folders and open handles (a shell whose working directory is ``OUT_DIR``), and
change the folder's identity (permissions, ACLs, mount points); the commit folder keeps every
rename within ``OUT_DIR``.

Ctrl-C: while steps 4-5 run in the main thread, SIGINT is held back. One that arrived
before the commit rename aborts as in step 3; one after it lets the swap finish and is then
raised as ``KeyboardInterrupt`` whose message says the new outputs are complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Collection, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from medseg.errors import OutputError

__all__ = ["COMMITTED_MESSAGE", "LOCK_NAME", "atomic_output", "is_partial_of", "is_unit_leftover",
           "output_unit", "recover_outputs", "split_suffix", "write_text"]

#: The process's umask, read once (reading it means setting it; doing that at import time,
#: before any worker threads exist, keeps it race-free).
_UMASK = os.umask(0o022)
os.umask(_UMASK)

#: What :func:`output_unit` keeps in the output folder besides the outputs (module docstring).
LOCK_NAME = ".medseg.lock"
STAGING_PREFIX = ".medseg-staging-"
COMMIT_PREFIX = ".medseg-commit-"
MANIFEST_NAME = ".manifest.json"
#: The message of a ``KeyboardInterrupt`` that arrived after the commit: the swap finished.
COMMITTED_MESSAGE = "the new outputs were complete and are in place"
#: Tries at locking when the lock file is removed and re-created under us (each try loses
#: only to another run finishing at that very moment).
_LOCK_TRIES = 20


def split_suffix(path: Path) -> tuple[str, str]:
    """``("lungs", ".nii.gz")`` for ``lungs.nii.gz``; double suffixes kept together."""
    name = path.name
    for double in (".nii.gz", ".tar.gz"):
        if name.lower().endswith(double):
            return name[: -len(double)], name[-len(double) :]
    return path.stem, path.suffix


def is_partial_of(name: str, target: str) -> bool:
    """Whether ``name`` is a temporary file :func:`atomic_output` made for ``target``
    (``.lungs.seg.k3j_x9a2.partial.dcm`` for ``lungs.seg.dcm``)."""
    stem, suffix = split_suffix(Path(target))
    return re.fullmatch(re.escape(f".{stem}.") + r"[A-Za-z0-9_]+"
                        + re.escape(f".partial{suffix}"), name) is not None


def is_unit_leftover(name: str) -> bool:
    """Whether ``name`` is the lock, a staging or a commit folder of :func:`output_unit`."""
    return name == LOCK_NAME or name.startswith((STAGING_PREFIX, COMMIT_PREFIX))


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
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{stem}.", suffix=f".partial{suffix}", dir=target.parent
        )
    except OSError as exc:
        raise OutputError(f"cannot write: {exc.strerror or exc}", path=target) from exc
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


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# -- a set of files as one unit ---------------------------------------------------------------


def _fsync(path: Path, *, folder: bool = False) -> None:
    """Flush ``path`` (a file, or a folder's entries) to the disk."""
    if folder and os.name == "nt":  # folders cannot be opened there
        return
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise  # some file systems cannot fsync a folder (EINVAL): the renames still hold
    finally:
        os.close(fd)


def _make_folder(out: Path) -> list[Path]:
    """Create ``out`` (and missing parents); return the folders created, outermost first."""
    missing = [p for p in (out, *out.parents) if not p.exists()][::-1]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise OutputError("exists and is not a folder", path=out) from exc
    except OSError as exc:
        raise OutputError(f"cannot create the output folder: {exc.strerror}", path=out) from exc
    if not out.is_dir():
        raise OutputError("exists and is not a folder", path=out)
    return missing


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold ``out/.medseg.lock`` exclusively (step 1 of the module docstring)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one run per folder is then the user's care
        yield
        return
    path = out / LOCK_NAME
    for _ in range(_LOCK_TRIES):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise OutputError(f"cannot create the lock file {LOCK_NAME}: {exc.strerror}",
                              path=out) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"another medseg run is writing into this folder (it holds "
                              f"{LOCK_NAME}): wait for it to finish or use another output "
                              "folder", path=out) from None
        except OSError as exc:  # ENOLCK: a file system without locks
            os.close(fd)
            raise OutputError(f"cannot lock the folder: {exc.strerror}", path=out) from exc
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the run before us removed the file we opened: lock the new one
    else:
        raise OutputError(f"cannot lock the folder: {LOCK_NAME} keeps being replaced", path=out)
    try:
        yield
    finally:
        try:
            with contextlib.suppress(OSError):
                path.unlink()  # while still held: a run that opened it retries (see above)
        finally:
            os.close(fd)


def _safe_names(names: Any, commit: Path) -> list[str]:
    if not isinstance(names, list) or not all(
            isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")
            for n in names):
        raise ValueError(f"bad names in {commit / MANIFEST_NAME}: {names!r}")
    return names


def _roll_forward(out: Path, commit: Path) -> None:
    """Finish the swap of a committed unit (step 5 of the module docstring); idempotent."""
    with contextlib.suppress(OSError):
        if not any(commit.iterdir()):  # the swap finished; only the empty folder was left
            commit.rmdir()
            return
    try:
        manifest = json.loads((commit / MANIFEST_NAME).read_text(encoding="utf-8"))
        files = _safe_names(manifest["files"], commit)
        remove = _safe_names(manifest["remove"], commit)
        (record,) = _safe_names([manifest["record"]], commit)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputError(f"the outputs of an interrupted run in {commit.name} cannot be "
                          f"finished: its manifest is unreadable ({exc}); move that folder "
                          "away and run again", path=out) from exc
    try:
        _fsync(out, folder=True)  # the commit rename is on the disk before any delete
        if (commit / record).exists():  # the swap has not finished: the old record goes first
            (out / record).unlink(missing_ok=True)
        for name in remove:
            (out / name).unlink(missing_ok=True)
        for name in files:
            if name != record and (commit / name).exists():
                os.replace(commit / name, out / name)
        if (commit / record).exists():
            os.replace(commit / record, out / record)
        _fsync(out, folder=True)
        (commit / MANIFEST_NAME).unlink(missing_ok=True)
        commit.rmdir()
    except OSError as exc:
        raise OutputError(f"the new outputs are complete (in {commit.name}) but could not all "
                          f"be moved into place: {exc.strerror or exc}; the next medseg run "
                          "into this folder finishes the move", path=out) from exc


def recover_outputs(out_dir: str | os.PathLike[str], names: Collection[str]) -> list[str]:
    """Finish or remove what an interrupted :func:`output_unit` left in ``out_dir`` (step 2
    of the module docstring); call it under the lock. Returns what was done, in words."""
    out = Path(out_dir)
    done: list[str] = []
    try:
        entries = sorted(os.scandir(out), key=lambda e: e.name)
    except FileNotFoundError:
        return done
    except OSError as exc:
        raise OutputError(f"cannot list the output folder: {exc.strerror}", path=out) from exc
    # At most one commit folder can exist (every run finishes it before committing its own).
    for e in entries:
        if e.name.startswith(COMMIT_PREFIX) and e.is_dir(follow_symlinks=False):
            _roll_forward(out, Path(e.path))
            done.append(f"finished moving the complete outputs of an interrupted run ({e.name})")
    for e in entries:
        try:
            if e.name.startswith(STAGING_PREFIX) and e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
                done.append(f"removed the incomplete outputs of an interrupted run ({e.name})")
            elif any(is_partial_of(e.name, n) for n in names) and e.is_file(
                    follow_symlinks=False):
                os.unlink(e.path)
                done.append(f"removed the partial file {e.name}")
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot remove what an interrupted run left: "
                              f"{exc.strerror or exc}", path=e.path) from exc
    return done


class _HeldInterrupts:
    """Hold SIGINT back in the main thread (elsewhere Python delivers none): ``pending`` says
    whether one came."""

    def __init__(self) -> None:
        self.pending = False
        self._old: Any = None
        self._active = False

    def __enter__(self) -> _HeldInterrupts:
        if threading.current_thread() is threading.main_thread():
            try:
                self._old = signal.signal(signal.SIGINT, self._hold)
                self._active = True
            except ValueError:  # not the main interpreter
                pass
        return self

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._active:
            signal.signal(signal.SIGINT, self._old)
        if self.pending and exc_type is None and self._old is not signal.SIG_IGN:
            raise KeyboardInterrupt(COMMITTED_MESSAGE)


def _commit(out: Path, staging: Path, names: Collection[str], record: str,
            interrupts: _HeldInterrupts) -> Path:
    """Step 4: check and flush the staged set, rename the staging folder to a commit
    folder; returns it. Raises (nothing committed) before the rename."""
    staged = sorted(os.listdir(staging))
    unknown = [n for n in staged if n not in names]
    if unknown:
        raise OutputError(f"not output names of this unit: {', '.join(unknown)}", path=staging)
    if record not in staged:
        raise OutputError(f"{record} was not written: nothing committed", path=staging)
    for name in names:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            raise OutputError("is a folder; medseg writes a file of this name here: move it "
                              "away", path=p)
    for name in staged:
        _fsync(staging / name)
    manifest = {"files": staged, "remove": [n for n in names if n not in staged],
                "record": record}
    with open(staging / MANIFEST_NAME, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(manifest, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync(staging, folder=True)
    if interrupts.pending:  # Ctrl-C came while flushing: stop before the commit
        raise KeyboardInterrupt
    commit = out / (COMMIT_PREFIX + staging.name[len(STAGING_PREFIX):])
    os.rename(staging, commit)  # the commit point
    return commit


@contextlib.contextmanager
def output_unit(out_dir: str | os.PathLike[str], *, names: Collection[str], record: str
                ) -> Iterator[Path]:
    """Lock ``out_dir``, recover what an interrupted run left, and yield an empty staging
    folder inside it; the caller writes the study's outputs there under their final names
    (each one of ``names``, ``record`` among them). When the block ends without error the
    set replaces ``out_dir``'s previous one as a unit: names in ``names`` that this set lacks
    are deleted, every other file is left alone. Any error (or Ctrl-C) before the commit
    leaves ``out_dir`` as it was. See the module docstring for the design."""
    out = Path(out_dir)
    names = tuple(names)
    if record not in names:
        raise ValueError(f"the record {record!r} must be one of the names")
    created = _make_folder(out)
    committed = False
    try:
        with _locked(out):
            recover_outputs(out, names)
            try:
                staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
            except OSError as exc:
                raise OutputError(f"cannot create a staging folder: {exc.strerror}",
                                  path=out) from exc
            try:
                try:
                    yield staging
                except OutputError as exc:  # name the output, not its staging copy
                    if exc.path is not None and Path(exc.path).parent == staging:
                        exc.relocate(out / Path(exc.path).name)
                    raise
                with _HeldInterrupts() as interrupts:
                    try:
                        commit = _commit(out, staging, names, record, interrupts)
                    except OSError as exc:
                        raise OutputError(f"cannot commit the outputs: {exc.strerror or exc}",
                                          path=out) from exc
                    committed = True
                    _roll_forward(out, commit)
            finally:
                if not committed:
                    shutil.rmtree(staging, ignore_errors=True)
    finally:
        if not committed:
            for folder in reversed(created):  # the output folder, if this run made it
                with contextlib.suppress(OSError):
                    folder.rmdir()
