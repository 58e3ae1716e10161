"""Which studies a batch holds: a folder of studies, or a manifest CSV.

Folder rule (``medseg batch FOLDER``), applied to the entries directly inside FOLDER, in
name order; names starting with ``.`` and the batch's own output folder are skipped:

* a **sub-folder** is one study, read as DICOM by the loader's discovery (it walks the
  sub-folder's whole tree and picks the series ``medseg info`` would pick). Files that are
  not DICOM are skipped by that discovery, so a study folder holding ``dicom/`` beside
  ``image.nii.gz`` and ``labels.nii.gz`` (the layout of ``sample_data/`` and of
  ``medseg synth``) is segmented from its DICOM series;
* a **volume file** (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) is one
  study;
* a **multi-frame DICOM file** (an enhanced CT, NumberOfFrames > 1) is one study;
  single-frame DICOM files directly in FOLDER are refused: they are the slices of a series,
  which belongs in a sub-folder of its own (otherwise every slice would become a "study");
* anything else (a README, the ``.raw`` beside an ``.mhd``, a CSV) is ignored.

Manifest rule (``medseg batch cohort.csv``): a CSV with a header row and the columns
``study_id,path`` and optionally ``reference``; any other column is an error (a typo such
as ``refrence`` must not silently drop the references). Relative paths are relative to
**the manifest's folder**, not to the current directory, so a manifest travels with its
data and gives the same studies from wherever it is run.

Study ids name the output folders ``OUT_DIR/<study_id>``. They come from what the user
chose (the folder or file name, or the manifest's ``study_id``), never from DICOM tags
such as PatientID or PatientName, and are sanitised for file names: characters outside
``[A-Za-z0-9._-]`` become ``_``, a leading ``.`` becomes ``_`` (no hidden folders, no
``..``), and names the batch uses itself (``validation``, ``summary.csv``, ...) get a
trailing ``_``. Ids that still collide (also when they differ only in case, which matters
on macOS and Windows) get ``-2``, ``-3``, ... in discovery order, which is deterministic.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from medseg.conventions import LABEL_SUFFIXES, VOLUME_SUFFIXES
from medseg.errors import ConfigError, InputError, NotFoundError

__all__ = [
    "MANIFEST_COLUMNS",
    "RESERVED_NAMES",
    "VOLUME_SUFFIXES",
    "RemoteSource",
    "StudySpec",
    "discover_studies",
    "find_reference",
    "read_manifest",
    "sanitize_id",
    "unique_ids",
]

#: Suffixes a reference label file may have in ``--reference-dir``.
REFERENCE_SUFFIXES = LABEL_SUFFIXES
#: Columns of a manifest: the first two are required.
MANIFEST_COLUMNS = ("study_id", "path", "reference")
#: Names inside OUT_DIR that belong to the batch itself; a study id never takes them.
RESERVED_NAMES = frozenset({"validation", "summary.csv", "batch.sqlite", "batch.sqlite-wal",
                            "batch.sqlite-shm", "batch.sqlite-journal", "batch.lock"})

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class StudySpec:
    """One study of a batch. ``source`` and ``reference`` are absolute paths (workers on other
    machines have another current directory); ``name`` is what the user called it before
    sanitising (shown in messages)."""

    study_id: str
    source: str
    reference: str | None = None
    name: str = ""



class RemoteSource(Protocol):
    """A source of studies that are not local files (a DICOMweb server): given to
    :class:`~medseg.batch.runner.BatchConfig` as ``remote``. batch calls it and never imports
    the package that provides it; the provider implements it on batch's public API
    (:class:`StudySpec`, :func:`unique_ids`, :func:`find_reference`, :func:`sanitize_id`).
    It is pickled to the workers with each task."""

    #: A folder inside OUT_DIR the source may use while it fetches (removed by the runner).
    cache_name: str

    @property
    def pushes(self) -> bool:
        """Whether results are stored back (a different result: part of the parameters)."""
        ...

    def discover(self, reference_dir: str | None) -> list[StudySpec]:
        """The studies, with unique ids and their references (if ``reference_dir``)."""
        ...

    def run_study(self, source: str, staging: Path, segment: Callable[[Path], Any]
                  ) -> tuple[Any, dict[str, Any]]:
        """Fetch one study, ``segment(folder)`` it into ``staging``, store back if asked;
        returns what ``segment`` returned and a small record for the state database."""
        ...

def sanitize_id(name: str) -> str:
    """A file-name-safe study id from a user-chosen name (see the module docstring)."""
    sid = _UNSAFE.sub("_", name.strip())
    if sid.startswith("."):
        sid = "_" + sid[1:]
    if not sid:
        sid = "study"
    if sid.lower() in RESERVED_NAMES:
        sid += "_"
    return sid


def unique_ids(ids: list[str]) -> list[str]:
    """Make ids unique case-insensitively, suffixing ``-2``, ``-3``, ... in order."""
    seen: set[str] = set()
    out = []
    for sid in ids:
        candidate, n = sid, 1
        while candidate.lower() in seen:
            n += 1
            candidate = f"{sid}-{n}"
        seen.add(candidate.lower())
        out.append(candidate)
    return out


def _volume_stem(name: str) -> str | None:
    """``"ct"`` for ``ct.nii.gz`` (a volume file name), ``None`` for other names."""
    low = name.lower()
    for suffix in VOLUME_SUFFIXES:
        if low.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _dicom_frames(path: Path) -> int | None:
    """NumberOfFrames of a DICOM file (1 when absent), ``None`` when it is not DICOM."""
    from medseg.io.dicom import looks_like_dicom

    if not looks_like_dicom(path):
        return None
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                             specific_tags=["NumberOfFrames"])
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def find_reference(reference_dir: Path, *names: str) -> str | None:
    """``reference_dir/<name><suffix>`` for the first name and suffix that exists."""
    for name in names:
        for suffix in REFERENCE_SUFFIXES:
            p = reference_dir / f"{name}{suffix}"
            if p.is_file():
                return os.path.abspath(p)
    return None


def _folder_studies(root: Path, exclude: Path | None) -> list[tuple[str, str]]:
    """``(name, absolute path)`` of the studies in ``root`` by the folder rule."""
    found: list[tuple[str, str]] = []
    slices: list[str] = []
    excluded = os.path.abspath(exclude) if exclude is not None else None
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        path = os.path.abspath(entry)
        if excluded is not None and path == excluded:
            continue
        if entry.is_dir():
            found.append((entry.name, path))
        elif entry.is_file():
            stem = _volume_stem(entry.name)
            if stem is not None:
                found.append((stem, path))
                continue
            frames = _dicom_frames(entry)
            if frames is None:
                continue
            if frames > 1:
                found.append((entry.stem if entry.suffix.lower() == ".dcm" else entry.name,
                              path))
            else:
                slices.append(entry.name)
    if slices:
        raise InputError(
            f"{len(slices)} single-frame DICOM file(s) directly in the folder (e.g. "
            f"{slices[0]}): these are slices of a series, not studies. Put each study in a "
            "sub-folder of its own, or run 'medseg segment' on this folder if it is one "
            "study", path=root)
    return found


def read_manifest(path: str | Path) -> list[tuple[str, str, str | None, int]]:
    """``(study_id, absolute path, absolute reference or None, line number)`` per row of a
    manifest CSV; relative paths are taken from the manifest's folder. Errors name the
    manifest and the line."""
    p = Path(path)
    base = p.parent
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise NotFoundError("no such manifest", path=p) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the manifest: {exc}", path=p) from exc
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        raise ConfigError("the manifest is empty; expected a header row "
                          "'study_id,path[,reference]'", path=p)
    header = [h.strip() for h in header]
    unknown = [h for h in header if h not in MANIFEST_COLUMNS]
    if unknown:
        raise ConfigError(f"line 1: unknown column(s) {', '.join(map(repr, unknown))}; a "
                          f"manifest has the columns {', '.join(MANIFEST_COLUMNS)} "
                          "(reference optional)", path=p)
    for col in MANIFEST_COLUMNS[:2]:
        if col not in header:
            raise ConfigError(f"line 1: the column {col!r} is missing; expected a header "
                              "row 'study_id,path[,reference]'", path=p)
    if len(set(header)) != len(header):
        raise ConfigError("line 1: a column is named twice", path=p)
    rows: list[tuple[str, str, str | None, int]] = []
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(reader, start=2):
        if not any(c.strip() for c in raw):
            continue
        if len(raw) != len(header):
            raise ConfigError(f"line {lineno}: {len(raw)} value(s) for {len(header)} "
                              "column(s)", path=p)
        row = {h: v.strip() for h, v in zip(header, raw, strict=True)}
        sid, src, ref = row["study_id"], row["path"], row.get("reference") or None
        if not sid or not src:
            raise ConfigError(f"line {lineno}: study_id and path must not be empty", path=p)
        if sid in first_line:
            raise ConfigError(f"line {lineno}: study_id {sid!r} is already used on line "
                              f"{first_line[sid]}", path=p)
        first_line[sid] = lineno
        rows.append((sid, os.path.abspath(base / src),
                     os.path.abspath(base / ref) if ref else None, lineno))
    if not rows:
        raise ConfigError("the manifest lists no study", path=p)
    return rows


def discover_studies(source: str | Path, *, reference_dir: str | Path | None = None,
                     exclude: str | Path | None = None) -> list[StudySpec]:
    """The studies of ``source`` (a folder or a manifest ``.csv``), in a deterministic order,
    with unique sanitised ids. A reference comes from the manifest's ``reference`` column,
    else from ``reference_dir/<name or id>.nii.gz`` (or ``.nii``, ``.nrrd``, ``.mha``).
    ``exclude`` (the output folder, when it lies inside ``source``) is never a study."""
    src = Path(source)
    if not src.exists():
        raise NotFoundError("no such folder or manifest", path=src)
    ref_dir = Path(reference_dir) if reference_dir is not None else None
    if ref_dir is not None and not ref_dir.is_dir():
        raise NotFoundError("the reference folder does not exist", path=ref_dir)
    entries: list[tuple[str, str, str | None]]
    if src.is_dir():
        entries = [(name, path, None)
                   for name, path in _folder_studies(src, Path(exclude) if exclude else None)]
        if not entries:
            raise NotFoundError("no study found: expected one sub-folder (DICOM) or volume "
                                "file (.nii.gz, .nrrd, .mha ...) per study", path=src)
    elif src.suffix.lower() == ".csv":
        entries = [(sid, path, ref) for sid, path, ref, _ in read_manifest(src)]
    else:
        raise ConfigError("SOURCE must be a folder of studies or a manifest .csv "
                          "(for one study use 'medseg segment')", path=src)
    ids = unique_ids([sanitize_id(name) for name, _, _ in entries])
    studies = []
    for sid, (name, path, ref) in zip(ids, entries, strict=True):
        if ref is None and ref_dir is not None:
            ref = find_reference(ref_dir, name, sid)
        studies.append(StudySpec(study_id=sid, source=path, reference=ref, name=name))
    return studies
