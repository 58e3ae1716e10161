"""The batch's memory: ``OUT_DIR/batch.sqlite``.

One row per study (``studies``) and one row per output file with its SHA-256 and size
(``outputs``). SQLite from the standard library, WAL mode (a reader, e.g. a person running
``sqlite3 batch.sqlite 'select ...'`` or a test polling progress, never blocks the run), one
commit per change, so a run killed at any moment leaves a consistent database. Only the
coordinating process writes: workers return small dicts and never touch the database (which
may sit on a network file system where SQLite locking is unreliable).

Status of a study::

    pending ──submit──> running ──> done      outputs recorded with checksums
                           │
                           └──────> failed    error type, message and kind (+ traceback
                                              when the error was not a medseg error)

``attempts`` counts the tries a study can be blamed for, across runs. ``error_kind`` says
whose fault a failure was: ``input`` (the study: a damaged or unsuitable input; the same
input fails the same way again), ``machine`` (the disk, memory, permissions, the network or
a worker process that died: not the study's fault), ``unexpected`` (an error medseg did not
foresee: a bug) or ``interrupted`` (below). A ``machine`` failure gives its attempt back
(:meth:`StateDB.mark_failed` with ``spend_attempt=False``), so after the space is freed or
the permission fixed, the next run tries the study again however often the machine failed.
A study left ``running`` by a run that was killed is turned into ``failed`` with the error
type ``Interrupted`` (kind ``interrupted``) when the next run opens the database; the
attempt it used counts, so a study that kills the whole run (e.g. a crash in native code
when running in-process) cannot make every later run crash in turn: it runs out of attempts
like any other failure. A run stopped with Ctrl-C gives its attempts back
(:meth:`StateDB.release`), as that is not the study's fault.

Schema versions: 1 had no ``error_kind``; a version-1 database is upgraded in place (the
column added, empty for earlier failures) when a run opens it.

Timestamps are UTC, ISO 8601 with seconds.
"""

from __future__ import annotations

import datetime as _dt
import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.checksums import sha256_file
from medseg.errors import OutputError

__all__ = ["ERROR_KINDS", "SCHEMA_VERSION", "StateDB", "StudyRow", "checksum_folder",
           "hold_lock", "open_database", "utc_now", "verify_outputs"]

SCHEMA_VERSION = 2
STATUSES = ("pending", "running", "done", "failed")
#: Values of ``studies.error_kind`` (module docstring).
ERROR_KINDS = ("input", "machine", "unexpected", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS studies (
    study_id      TEXT PRIMARY KEY,
    source        TEXT NOT NULL,
    reference     TEXT,
    params        TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    error_type    TEXT,
    error_message TEXT,
    error_kind    TEXT,
    traceback     TEXT,
    started_at    TEXT,
    finished_at   TEXT,
    seconds       REAL,
    worker        TEXT,
    model_loads   INTEGER,
    result        TEXT
);
CREATE TABLE IF NOT EXISTS outputs (
    study_id TEXT NOT NULL REFERENCES studies (study_id) ON DELETE CASCADE,
    name     TEXT NOT NULL,
    sha256   TEXT NOT NULL,
    size     INTEGER NOT NULL,
    PRIMARY KEY (study_id, name)
);
"""


@contextmanager
def hold_lock(path: Path, busy: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the block;
    :class:`~medseg.errors.OutputError` with ``busy`` when another process holds it. The
    kernel releases it when the process dies, so a killed run never blocks the next."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one run per folder is then the user's care
        yield
        return
    try:
        fh = open(path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
    except OSError as exc:
        raise OutputError(f"cannot create the lock file: {exc.strerror}", path=path) from exc
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise OutputError(busy, path=path.parent) from exc
        yield
    finally:
        fh.close()


def open_database(path: Path, schema: str, version: int, what: str, *,
                  pragmas: tuple[str, ...] = (), check_same_thread: bool = True,
                  upgrades: dict[int, tuple[str, ...]] | None = None) -> sqlite3.Connection:
    """A state database in autocommit mode, WAL, rows as ``sqlite3.Row``: ``schema`` created
    if missing, its ``meta.schema_version`` checked; a database of an older version listed in
    ``upgrades`` gets those statements and the current version. Errors are
    :class:`~medseg.errors.OutputError` naming ``what`` and the file."""
    try:
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None,
                               check_same_thread=check_same_thread)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        for pragma in pragmas:
            conn.execute(f"PRAGMA {pragma}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in schema.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                               ).fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(version),))
            elif int(row[0]) != version:
                steps = (upgrades or {}).get(int(row[0]))
                if steps is None:
                    raise OutputError(f"{what} schema {row[0]}, this medseg writes {version}: "
                                      "use another output folder", path=path)
                for stmt in steps:
                    conn.execute(stmt)
                conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                             (str(version),))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise OutputError(f"cannot open the {what}: {exc}", path=path) from exc
    return conn


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()



def checksum_folder(folder: str | Path) -> dict[str, dict[str, Any]]:
    """``{file name: {"sha256", "size"}}`` for the plain files directly in ``folder``
    (the outputs of one study; it has no sub-folders)."""
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(Path(folder).iterdir()):
        if p.is_file():
            out[p.name] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


def verify_outputs(folder: Path, outputs: dict[str, dict[str, Any]]) -> str | None:
    """``None`` when every recorded output is in ``folder`` with its recorded size and
    SHA-256; otherwise the first problem, in words."""
    if not outputs:
        return "no outputs recorded"
    if not folder.is_dir():
        return f"{folder} is missing"
    for name, rec in sorted(outputs.items()):
        p = folder / name
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != rec["size"]:
            return f"{p} changed size ({p.stat().st_size} bytes, recorded {rec['size']})"
        if sha256_file(p) != rec["sha256"]:
            return f"{p} changed (SHA-256 differs from the recorded one)"
    return None


@dataclass
class StudyRow:
    """A study's row, with its outputs."""

    study_id: str
    source: str
    reference: str | None
    params: str
    status: str
    attempts: int
    error_type: str | None = None
    error_message: str | None = None
    error_kind: str | None = None
    traceback: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    seconds: float | None = None
    worker: str | None = None
    model_loads: int | None = None
    result: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)


class StateDB:
    """The state database of one output folder; use as a context manager or call
    :meth:`close`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # version 2 added error_kind
        self.conn = open_database(
            self.path, _SCHEMA, SCHEMA_VERSION, "state database", pragmas=("foreign_keys=ON",),
            upgrades={1: ("ALTER TABLE studies ADD COLUMN error_kind TEXT",)})

    def __enter__(self) -> StateDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def _tx(self) -> Iterator[None]:
        """One transaction (the connection is in autocommit mode otherwise)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- reading -----------------------------------------------------------------------

    def get(self, study_id: str) -> StudyRow | None:
        row = self.conn.execute("SELECT * FROM studies WHERE study_id = ?",
                                (study_id,)).fetchone()
        return None if row is None else self._row(row)

    def rows(self, study_ids: Iterable[str] | None = None) -> list[StudyRow]:
        """Rows of ``study_ids`` in that order (all rows by id when ``None``)."""
        if study_ids is None:
            return [self._row(r) for r in
                    self.conn.execute("SELECT * FROM studies ORDER BY study_id")]
        out = []
        for sid in study_ids:
            row = self.get(sid)
            if row is not None:
                out.append(row)
        return out

    def _row(self, r: sqlite3.Row) -> StudyRow:
        outputs = {o["name"]: {"sha256": o["sha256"], "size": o["size"]} for o in
                   self.conn.execute("SELECT name, sha256, size FROM outputs "
                                     "WHERE study_id = ? ORDER BY name", (r["study_id"],))}
        keys = r.keys()
        data = {k: r[k] for k in keys if k != "result"}
        return StudyRow(**data, result=json.loads(r["result"]) if r["result"] else {},
                        outputs=outputs)

    # -- writing -----------------------------------------------------------------------

    def recover_interrupted(self) -> list[str]:
        """Studies left ``running`` by a run that stopped without finishing them become
        ``failed`` (error type ``Interrupted``); their attempt counts. Returns their ids."""
        with self._tx():
            ids = [r[0] for r in self.conn.execute(
                "SELECT study_id FROM studies WHERE status = 'running' ORDER BY study_id")]
            self.conn.execute(
                "UPDATE studies SET status = 'failed', error_type = 'Interrupted', "
                "error_message = 'the run stopped (killed?) while this study was being "
                "processed', error_kind = 'interrupted', traceback = NULL, "
                "finished_at = NULL WHERE status = 'running'")
        return ids

    def sync(self, study_id: str, source: str, reference: str | None, params: str) -> str:
        """Register a study. Returns ``"new"``, ``"same"``, or ``"changed"`` when its source,
        reference or parameters differ from the recorded ones: it is then reset to
        ``pending`` with no attempts and no outputs (a new study under an old name)."""
        with self._tx():
            row = self.conn.execute(
                "SELECT source, reference, params FROM studies WHERE study_id = ?",
                (study_id,)).fetchone()
            if row is None:
                self.conn.execute(
                    "INSERT INTO studies (study_id, source, reference, params, status) "
                    "VALUES (?, ?, ?, ?, 'pending')", (study_id, source, reference, params))
                return "new"
            if (row["source"], row["reference"], row["params"]) == (source, reference,
                                                                    params):
                return "same"
            self.conn.execute("DELETE FROM outputs WHERE study_id = ?", (study_id,))
            self.conn.execute(
                "UPDATE studies SET source = ?, reference = ?, params = ?, "
                "status = 'pending', attempts = 0, error_type = NULL, error_message = NULL, "
                "error_kind = NULL, traceback = NULL, started_at = NULL, finished_at = NULL, "
                "seconds = NULL, worker = NULL, model_loads = NULL, result = NULL "
                "WHERE study_id = ?",
                (source, reference, params, study_id))
            return "changed"

    def reset(self, study_id: str, reason: str) -> None:
        """A done study whose outputs no longer verify: back to ``pending`` with a fresh
        attempt budget (it succeeded before); ``reason`` is kept as its last error."""
        with self._tx():
            self.conn.execute("DELETE FROM outputs WHERE study_id = ?", (study_id,))
            self.conn.execute(
                "UPDATE studies SET status = 'pending', attempts = 0, "
                "error_type = 'OutputsChanged', error_message = ?, error_kind = NULL, "
                "traceback = NULL "
                "WHERE study_id = ?", (reason, study_id))

    def mark_running(self, study_id: str) -> int:
        """Start an attempt; returns the attempt's number (1 for the first)."""
        with self._tx():
            self.conn.execute(
                "UPDATE studies SET status = 'running', attempts = attempts + 1, "
                "started_at = ?, finished_at = NULL WHERE study_id = ?",
                (utc_now(), study_id))
            row = self.conn.execute("SELECT attempts FROM studies WHERE study_id = ?",
                                    (study_id,)).fetchone()
        return int(row[0])

    def mark_done(self, study_id: str, outputs: dict[str, dict[str, Any]], *,
                  started_at: str | None, seconds: float | None, worker: str | None,
                  model_loads: int | None, result: dict[str, Any]) -> None:
        with self._tx():
            self.conn.execute("DELETE FROM outputs WHERE study_id = ?", (study_id,))
            self.conn.executemany(
                "INSERT INTO outputs (study_id, name, sha256, size) VALUES (?, ?, ?, ?)",
                [(study_id, name, rec["sha256"], int(rec["size"]))
                 for name, rec in sorted(outputs.items())])
            self.conn.execute(
                "UPDATE studies SET status = 'done', error_type = NULL, error_message = NULL, "
                "error_kind = NULL, traceback = NULL, started_at = COALESCE(?, started_at), "
                "finished_at = ?, seconds = ?, worker = ?, model_loads = ?, result = ? "
                "WHERE study_id = ?",
                (started_at, utc_now(), seconds, worker, model_loads,
                 json.dumps(result, sort_keys=True), study_id))

    def mark_failed(self, study_id: str, error_type: str, error_message: str, *,
                    error_kind: str | None = None, spend_attempt: bool = True,
                    traceback: str | None = None, started_at: str | None = None,
                    seconds: float | None = None, worker: str | None = None,
                    model_loads: int | None = None) -> None:
        """Record a failed attempt; ``error_kind`` is one of :data:`ERROR_KINDS`. With
        ``spend_attempt=False`` (a failure of the machine, not of the study) the attempt
        :meth:`mark_running` counted is given back."""
        if error_kind is not None and error_kind not in ERROR_KINDS:
            raise ValueError(f"error_kind must be one of {', '.join(ERROR_KINDS)}, got "
                             f"{error_kind!r}")
        with self._tx():
            self.conn.execute("DELETE FROM outputs WHERE study_id = ?", (study_id,))
            self.conn.execute(
                "UPDATE studies SET status = 'failed', error_type = ?, error_message = ?, "
                "error_kind = ?, attempts = MAX(attempts - ?, 0), traceback = ?, "
                "started_at = COALESCE(?, started_at), finished_at = ?, "
                "seconds = ?, worker = ?, model_loads = ?, result = NULL "
                "WHERE study_id = ?",
                (error_type, error_message, error_kind, 0 if spend_attempt else 1, traceback,
                 started_at, utc_now(), seconds, worker, model_loads, study_id))

    def release(self, study_id: str) -> None:
        """Undo :meth:`mark_running` for a study the user interrupted (Ctrl-C): back to
        ``pending``, its attempt given back."""
        with self._tx():
            self.conn.execute(
                "UPDATE studies SET status = 'pending', attempts = MAX(attempts - 1, 0) "
                "WHERE study_id = ? AND status = 'running'", (study_id,))
