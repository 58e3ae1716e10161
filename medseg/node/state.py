"""The node's memory: ``OUT_DIR/node.sqlite``, beside the batch's ``batch.sqlite``.

``batch.sqlite`` (the batch runner's state) knows the *studies* the node segmented; this
database knows the *series* the node received and the *sends* of results it owes:

``series``: one row per SeriesInstanceUID received, with what the selection rules look at
(the :class:`~medseg.pacs.records.SeriesRecord` of its first instance), how many instances
it has, when the first and last arrived, how the transfer ended and what became of it::

    transfer:  open ──A-RELEASE──> released
                 └──A-ABORT, connection lost, node stopped──> aborted

    status:    receiving ──quiet time, released──> processing ──> done
                   │                                      ├────> failed
                   │                                      └────> not_segmented
                   └──aborted──> incomplete ──sent again──> receiving
                                      └──expired──> discarded

``sends``: one row per study whose DICOM SEG and SR the node must send (C-STORE) to the
configured destination: ``pending`` until the destination accepted both, then ``sent``.
A refused or failed send stays ``pending`` with its error and the time of the next try
(backing off), so a result is never lost silently, also across restarts.

Written by the receiving threads (one row update per instance) and the node's main loop,
through one connection guarded by a lock; WAL mode, so ``sqlite3 node.sqlite`` can read it
while the node runs. Timestamps are seconds since the epoch (``time.time()``) in the
columns the node computes with, ISO 8601 UTC where a person reads them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.batch.state import open_database, utc_now

__all__ = ["STATE_NAME", "NodeState", "SendRow", "SeriesRow"]

STATE_NAME = "node.sqlite"
SCHEMA_VERSION = 1
STATUSES = ("receiving", "incomplete", "processing", "done", "failed", "not_segmented",
            "discarded")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS series (
    series_uid  TEXT PRIMARY KEY,
    study_uid   TEXT NOT NULL,
    folder      TEXT NOT NULL,
    record      TEXT NOT NULL,
    calling_ae  TEXT,
    instances   INTEGER NOT NULL DEFAULT 0,
    first_at    REAL NOT NULL,
    last_at     REAL NOT NULL,
    transfer    TEXT NOT NULL CHECK (transfer IN ('open', 'released', 'aborted')),
    status      TEXT NOT NULL CHECK (status IN ('receiving', 'incomplete', 'processing',
                                                'done', 'failed', 'not_segmented',
                                                'discarded')),
    reason      TEXT,
    digest      TEXT,
    study_id    TEXT,
    retry_at    REAL,
    updated     TEXT
);
CREATE INDEX IF NOT EXISTS series_study ON series (study_uid);
CREATE TABLE IF NOT EXISTS sends (
    study_id    TEXT PRIMARY KEY,
    study_uid   TEXT NOT NULL,
    source      TEXT NOT NULL,
    files       TEXT NOT NULL,
    destination TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('pending', 'sent')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    next_try    REAL NOT NULL,
    sent_at     TEXT
);
"""


@dataclass(frozen=True)
class SeriesRow:
    """A ``series`` row; ``record`` is the SeriesRecord as a dict."""

    series_uid: str
    study_uid: str
    folder: str
    record: dict[str, Any]
    calling_ae: str | None
    instances: int
    first_at: float
    last_at: float
    transfer: str
    status: str
    reason: str | None
    digest: str | None
    study_id: str | None
    retry_at: float | None
    updated: str | None


@dataclass(frozen=True)
class SendRow:
    """A ``sends`` row; ``files`` are absolute paths."""

    study_id: str
    study_uid: str
    source: str
    files: list[str]
    destination: str
    status: str
    attempts: int
    last_error: str | None
    next_try: float
    sent_at: str | None


class NodeState:
    """The node database of one output folder (thread-safe: one connection, one lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        #: Held while an instance is written to the spool and recorded, and while a series'
        #: spool is moved away: a series is never settled while an instance of it lands.
        self.lock = threading.RLock()
        self.conn = open_database(self.path, _SCHEMA, SCHEMA_VERSION, "node database",
                                  pragmas=("synchronous=NORMAL",), check_same_thread=False)

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    def __enter__(self) -> NodeState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    # -- series ------------------------------------------------------------------------

    def received(self, *, series_uid: str, study_uid: str, folder: str,
                 record: dict[str, Any], calling_ae: str, now: float) -> None:
        """One instance of ``series_uid`` was spooled: the series is receiving, its
        transfer open. A series done, failed or not segmented before starts over (its
        instances are sent again); the count is the spool folder's, see :meth:`set_count`."""
        with self._tx() as c:
            row = c.execute("SELECT status FROM series WHERE series_uid = ?",
                            (series_uid,)).fetchone()
            if row is None:
                c.execute(
                    "INSERT INTO series (series_uid, study_uid, folder, record, calling_ae, "
                    "instances, first_at, last_at, transfer, status, updated) "
                    "VALUES (?, ?, ?, ?, ?, 1, ?, ?, 'open', 'receiving', ?)",
                    (series_uid, study_uid, folder, json.dumps(record, sort_keys=True),
                     calling_ae, now, now, utc_now()))
                return
            restart = row["status"] not in ("receiving", "incomplete")
            c.execute(
                "UPDATE series SET last_at = ?, transfer = 'open', status = 'receiving', "
                "calling_ae = ?, reason = NULL, retry_at = NULL, updated = ?, "
                "instances = CASE WHEN ? THEN 1 ELSE instances + 1 END, "
                "first_at = CASE WHEN ? THEN ? ELSE first_at END, "
                "record = CASE WHEN ? THEN ? ELSE record END "
                "WHERE series_uid = ?",
                (now, calling_ae, utc_now(), restart, restart, now, restart,
                 json.dumps(record, sort_keys=True), series_uid))

    def transfer_ended(self, series_uids: Iterator[str] | list[str], *, released: bool,
                       reason: str | None = None) -> None:
        """An association that carried these series ended: released (the sender said it
        was done) or aborted (then the series are incomplete, with ``reason``)."""
        with self._tx() as c:
            for uid in series_uids:
                if released:
                    c.execute("UPDATE series SET transfer = 'released', updated = ? "
                              "WHERE series_uid = ? AND transfer = 'open'",
                              (utc_now(), uid))
                else:
                    c.execute("UPDATE series SET transfer = 'aborted', status = 'incomplete', "
                              "reason = ?, updated = ? WHERE series_uid = ? AND "
                              "status = 'receiving'", (reason, utc_now(), uid))

    def recover(self) -> list[str]:
        """At start: series whose transfer was open when the node stopped are incomplete
        (the sender must send them again); series that were being processed are ready
        again (the batch state decides whether they need work). Returns the incomplete."""
        with self._tx() as c:
            ids = [r[0] for r in c.execute(
                "SELECT series_uid FROM series WHERE transfer = 'open' AND "
                "status = 'receiving' ORDER BY series_uid")]
            c.execute("UPDATE series SET transfer = 'aborted', status = 'incomplete', "
                      "reason = 'the node stopped while this series was being received', "
                      "updated = ? WHERE transfer = 'open' AND status = 'receiving'",
                      (utc_now(),))
            c.execute("UPDATE series SET status = 'receiving', updated = ? "
                      "WHERE status = 'processing'", (utc_now(),))
        return ids

    def set_count(self, series_uid: str, instances: int) -> None:
        with self._tx() as c:
            c.execute("UPDATE series SET instances = ? WHERE series_uid = ?",
                      (instances, series_uid))

    def series(self, series_uid: str) -> SeriesRow | None:
        with self.lock:
            row = self.conn.execute("SELECT * FROM series WHERE series_uid = ?",
                                    (series_uid,)).fetchone()
        return None if row is None else _series_row(row)

    def all_series(self, study_uid: str | None = None) -> list[SeriesRow]:
        with self.lock:
            if study_uid is None:
                rows = self.conn.execute("SELECT * FROM series ORDER BY study_uid, "
                                         "series_uid").fetchall()
            else:
                rows = self.conn.execute("SELECT * FROM series WHERE study_uid = ? "
                                         "ORDER BY series_uid", (study_uid,)).fetchall()
        return [_series_row(r) for r in rows]

    def ready_studies(self, now: float, quiet_time: float) -> list[str]:
        """Studies with a series to look at: some series receiving, and every receiving
        series of the study released by its sender at least ``quiet_time`` seconds ago
        (and past its retry time); none open or incomplete. Oldest first."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT study_uid, MIN(first_at) AS first FROM series GROUP BY study_uid "
                "HAVING SUM(status = 'receiving') > 0 "
                "AND SUM(status = 'incomplete') = 0 "
                "AND SUM(status = 'receiving' AND (transfer != 'released' OR last_at > ? "
                "         OR COALESCE(retry_at, 0) > ?)) = 0 "
                "ORDER BY first, study_uid", (now - quiet_time, now)).fetchall()
        return [r["study_uid"] for r in rows]

    def expired(self, now: float, timeout: float) -> list[SeriesRow]:
        """Incomplete series that received nothing for ``timeout`` seconds."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT * FROM series WHERE status = 'incomplete' AND last_at < ? "
                "ORDER BY series_uid", (now - timeout,)).fetchall()
        return [_series_row(r) for r in rows]

    def set_status(self, series_uid: str, status: str, reason: str | None = None, *,
                   digest: str | None = None, study_id: str | None = None,
                   retry_at: float | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown series status {status!r}")
        with self._tx() as c:
            c.execute("UPDATE series SET status = ?, reason = ?, "
                      "digest = COALESCE(?, digest), study_id = COALESCE(?, study_id), "
                      "retry_at = ?, updated = ? WHERE series_uid = ?",
                      (status, reason, digest, study_id, retry_at, utc_now(), series_uid))

    # -- sends -------------------------------------------------------------------------

    def queue_send(self, study_id: str, study_uid: str, source: str, files: list[str],
                   destination: str, now: float) -> None:
        """Owe the destination the results of ``source`` (the batch source: the series and
        its digest), replacing an older send of the study."""
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO sends (study_id, study_uid, source, files, "
                      "destination, status, attempts, last_error, next_try, sent_at) "
                      "VALUES (?, ?, ?, ?, ?, 'pending', 0, NULL, ?, NULL)",
                      (study_id, study_uid, source, json.dumps(files), destination, now))

    def send_of(self, study_id: str) -> SendRow | None:
        with self.lock:
            row = self.conn.execute("SELECT * FROM sends WHERE study_id = ?",
                                    (study_id,)).fetchone()
        return None if row is None else _send_row(row)

    def due_sends(self, now: float) -> list[SendRow]:
        with self.lock:
            rows = self.conn.execute("SELECT * FROM sends WHERE status = 'pending' AND "
                                     "next_try <= ? ORDER BY next_try, study_id",
                                     (now,)).fetchall()
        return [_send_row(r) for r in rows]

    def sends(self) -> list[SendRow]:
        with self.lock:
            rows = self.conn.execute("SELECT * FROM sends ORDER BY study_id").fetchall()
        return [_send_row(r) for r in rows]

    def send_done(self, study_id: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE sends SET status = 'sent', attempts = attempts + 1, "
                      "last_error = NULL, sent_at = ? WHERE study_id = ?",
                      (utc_now(), study_id))

    def send_failed(self, study_id: str, error: str, next_try: float) -> None:
        """Record a failed send and when to try again."""
        with self._tx() as c:
            c.execute("UPDATE sends SET attempts = attempts + 1, last_error = ?, "
                      "next_try = ? WHERE study_id = ?", (error, next_try, study_id))


def _series_row(r: sqlite3.Row) -> SeriesRow:
    data = dict(zip(r.keys(), tuple(r), strict=True))
    data["record"] = json.loads(data["record"])
    return SeriesRow(**data)


def _send_row(r: sqlite3.Row) -> SendRow:
    data = dict(zip(r.keys(), tuple(r), strict=True))
    data["files"] = json.loads(data["files"])
    return SendRow(**data)
