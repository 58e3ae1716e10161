"""``medseg listen``: receive CT by C-STORE, segment it on the batch runner, send the DICOM
SEG and SR back.

The node is another source and sink of :mod:`medseg.batch` (ARCHITECTURE.md): the Storage
SCP (:mod:`medseg.node.scp`) spools instances and records series in ``OUT_DIR/node.sqlite``;
the main loop, every half second:

1. **discards** series left incomplete (their sender's association aborted) for longer
   than ``incomplete_timeout``;
2. finds **ready studies**: every series being received was released by its sender at
   least ``quiet_time`` seconds ago, none is still open or incomplete;
3. **selects** the series to segment by the rules of the DICOMweb batch
   (:func:`medseg.pacs.select.choose_series`: CT, axial, original, no localizer; the
   thinnest slices, then the most instances), among the study's new series and those it
   segmented before. Series not chosen, or a study with no eligible series (an MR, a
   localizer alone), are recorded as ``not_segmented`` with the reason, and their spool is
   removed;
4. hands the chosen series to :func:`medseg.batch.run_batch` as a remote source
   (:class:`NodeSource`): the batch's state database, warm model (loaded once, in this
   process), retries, failure kinds and atomic ``OUT_DIR/<study>/`` folders all apply. A
   study's source names its series and a digest of its instances (SOP instance UIDs and
   the SHA-256 of each file), so a series sent again unchanged is not segmented twice
   (``run_batch`` verifies and skips it) and a changed one is;
5. queues the SEG and SR of each newly segmented study for the destination and sends what
   is due (:mod:`medseg.node.send`): a refused or failed send is retried with a back-off
   of 30 s doubling up to an hour, recorded in ``node.sqlite`` with its error, and logged
   every time; it is never dropped, also across restarts;
6. removes the spool of every series that is finished with (done, failed for the input's
   fault, not segmented, discarded): the disk holds only what is still to be processed.

Restart safety: a node killed at any moment restarts from its two databases. Series whose
association was open are incomplete (the sender must send them again); series that were
being processed are ready again and the batch state decides (a study killed mid-way is
``Interrupted`` and segmented again; one that finished is skipped); sends still pending are
sent. The SEG and SR sent are the files in ``OUT_DIR/<study>/``, so a send repeated after
a restart stores the same SOP instances again, not new ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from medseg.batch import BatchConfig, StateDB, StudySpec, run_batch, sanitize_id
from medseg.batch.runner import STATE_NAME as BATCH_STATE_NAME
from medseg.batch.runner import model_name, worker_model
from medseg.batch.state import hold_lock
from medseg.batch.summary import write_summary
from medseg.checksums import sha256_file
from medseg.conventions import METHODS, SEG_FILENAME, SR_FILENAME
from medseg.errors import MedsegError, OutputError, SeriesSelectionError
from medseg.node.scp import SPOOL_NAME, StorageSCP, remove_partials, spool_count
from medseg.node.send import Destination, send_files
from medseg.node.state import STATE_NAME, NodeState, SeriesRow

__all__ = ["SOURCE_PREFIX", "Node", "NodeConfig", "NodeSource", "run_node"]

#: Sources of node studies in ``batch.sqlite``: ``dicom-node:<study>/<series>#<digest>``.
SOURCE_PREFIX = "dicom-node:"
LOCK_NAME = "node.lock"
#: Inside the spool: series folders being deleted.
TRASH_NAME = ".trash"
#: Seconds between two looks at the spool.
POLL_S = 0.5
#: Seconds before a pass that failed unexpectedly is tried again.
RETRY_PASS_S = 10.0
#: First retry of a failed send or of a study the machine failed, doubling up to the cap.
RETRY_FIRST_S = 30.0
RETRY_MAX_S = 3600.0


@dataclass(frozen=True)
class NodeConfig:
    """What ``medseg listen`` and a ``job: listen`` pipeline file describe.

    ``out_dir``: results as for ``medseg batch`` (``<study>/``, ``summary.csv``,
    ``batch.sqlite``) plus ``node.sqlite`` and the spool ``.spool/``; ``port``/``host``:
    where to listen; ``ae_title``: the node's AE title (associations must be addressed to
    it); ``allow``: calling AE titles that may store (required unless ``allow_any``);
    ``allow_addresses``: if given, only these source IP addresses may connect;
    ``send_to``: ``AE@HOST:PORT`` that receives the SEG and SR; ``quiet_time``: seconds
    without a new instance after the sender's release before a series counts as complete;
    ``incomplete_timeout``: seconds after which an aborted, never re-sent series is
    discarded; ``tls_cert``/``tls_key`` (and ``tls_ca`` to require client certificates):
    DICOM over TLS for the listener (and the sender, which then verifies the destination
    against ``tls_ca`` or the system's CAs); ``device``, ``method``, ``model``,
    ``threads``, ``max_attempts``, ``show_phi`` as for ``medseg batch``."""

    out_dir: str
    port: int = 11112
    host: str = "0.0.0.0"
    ae_title: str = "MEDSEG"
    allow: list[str] = field(default_factory=list)
    allow_any: bool = False
    allow_addresses: list[str] = field(default_factory=list)
    send_to: str | None = None
    quiet_time: float = 10.0
    incomplete_timeout: float = 3600.0
    method: str = "unet"
    model: str | None = None
    threads: int | None = None
    max_attempts: int = 2
    show_phi: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be 0-65535, got {self.port}")
        if not self.allow and not self.allow_any:
            raise ValueError("no calling AE title may store: give the senders' AE titles "
                             "(--allow ORTHANC ...), or --allow-any to accept every sender")
        if self.allow and self.allow_any:
            raise ValueError("give allow (AE titles) or allow_any, not both")
        if self.quiet_time < 0 or self.incomplete_timeout <= 0:
            raise ValueError("quiet_time must be >= 0 and incomplete_timeout > 0 seconds")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got "
                             f"{self.method!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls_ca needs tls_cert and tls_key")
        if self.send_to is not None:
            Destination.parse(self.send_to)


@dataclass(frozen=True)
class NodeSource:
    """The :class:`~medseg.batch.sources.RemoteSource` of one pass of the node: the ready
    studies' chosen series, already in the spool."""

    spool: str
    specs: tuple[StudySpec, ...]
    folders: dict[str, str]
    cache_name: ClassVar[str] = ".node-cache"

    @property
    def pushes(self) -> bool:
        return False  # the node sends after the study is recorded, see the module docstring

    def discover(self, reference_dir: str | None) -> list[StudySpec]:
        return list(self.specs)

    def run_study(self, source: str, staging: Path, segment: Callable[[Path], Any]
                  ) -> tuple[Any, dict[str, Any]]:
        folder = Path(self.spool) / self.folders[source]
        try:
            result = segment(folder)
        except MedsegError as exc:
            exc.relocate_within(folder, source, "instance")  # the spool is deleted later
            raise
        return result, {"node": {"series_instance_uid": source.split("/")[-1].split("#")[0],
                                 "instances": spool_count(folder)}}


def series_digest(folder: Path) -> str:
    """SHA-256 over the spool folder's instances (file name = SOP instance UID, and the
    SHA-256 of each file), in name order: equal for the same instances sent again."""
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.dcm")):
        if not p.name.startswith("."):
            h.update(f"{p.name}:{sha256_file(p)}\n".encode())
    return h.hexdigest()


def _backoff(attempts: int) -> float:
    return min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** max(0, attempts - 1))


class Node:
    """A running DICOM node (see the module docstring): :meth:`start`, then :meth:`step`
    in a loop (or :meth:`serve_forever`), then :meth:`close`."""

    def __init__(self, config: NodeConfig, *, log: Callable[[str], None] | None = None
                 ) -> None:
        self.config = config
        self.log = log or (lambda _m: None)
        self.out = Path(os.path.abspath(config.out_dir))
        self.spool = self.out / SPOOL_NAME
        self.destination = Destination.parse(config.send_to) if config.send_to else None
        self._stack = contextlib.ExitStack()
        self.state: NodeState | None = None
        self.scp: StorageSCP | None = None
        self._send_ssl: Any = None
        self._machine_tries: dict[str, int] = {}

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        try:
            self.spool.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output folder: {exc.strerror}",
                              path=self.out) from exc
        try:
            self._stack.enter_context(hold_lock(self.out / LOCK_NAME, "another 'medseg "
                                                "listen' uses this output folder"))
            self.state = self._stack.enter_context(NodeState(self.out / STATE_NAME))
            incomplete = self.state.recover()
            if incomplete:
                self.log(f"{len(incomplete)} series were being received when the node "
                         f"stopped: incomplete until sent again ({', '.join(incomplete)})")
            if remove_partials(self.spool):
                self.log("removed partly written instances of the last run from the spool")
            shutil.rmtree(self.spool / TRASH_NAME, ignore_errors=True)
            from medseg.inference.device import resolve_device

            resolve_device(cfg.device)  # a GPU that is not there fails at start
            if cfg.method == "unet":  # load once, now: an unknown model fails at start
                worker_model(model_name(cfg.model))
            ssl_context = None
            if cfg.tls_cert and cfg.tls_key:
                from medseg.node.scp import tls_server_context

                ssl_context = tls_server_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
                import ssl

                self._send_ssl = ssl.create_default_context(cafile=cfg.tls_ca)
                self._send_ssl.load_cert_chain(cfg.tls_cert, cfg.tls_key)
            self.scp = StorageSCP(state=self.state, spool=self.spool, ae_title=cfg.ae_title,
                                  host=cfg.host, port=cfg.port, allow=cfg.allow,
                                  allow_addresses=cfg.allow_addresses,
                                  ssl_context=ssl_context, log=self.log)
            self.scp.start()
            self._stack.callback(self.scp.stop)
        except BaseException:
            self._stack.close()
            raise
        who = "any calling AE title" if cfg.allow_any else ", ".join(cfg.allow)
        self.log(f"listening as {cfg.ae_title} on {cfg.host}:{self.scp.port}"
                 f"{' (TLS)' if ssl_context else ''}, accepting {who}; results in {self.out}"
                 + (f", sent to {self.destination}" if self.destination else ""))

    @property
    def port(self) -> int:
        assert self.scp is not None
        return self.scp.port

    def close(self) -> None:
        self._stack.close()

    def serve_forever(self, stop: threading.Event) -> None:
        """Run :meth:`step` every :data:`POLL_S` seconds until ``stop`` is set. A pass that
        fails unexpectedly (a bug, a disk that fails under the databases) is logged and
        tried again after :data:`RETRY_PASS_S`: the node keeps receiving meanwhile, and
        nothing it recorded is lost."""
        while not stop.is_set():
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - a service does not die of one pass
                self.log(f"error: a pass of the main loop failed ({type(exc).__name__}: "
                         f"{exc}); trying again in {RETRY_PASS_S:g} s")
                stop.wait(RETRY_PASS_S)
            stop.wait(POLL_S)

    # -- one pass ----------------------------------------------------------------------

    def step(self, now: float | None = None) -> None:
        """One pass of the main loop (module docstring, steps 1-6)."""
        now = time.time() if now is None else now
        self._discard_expired(now)
        specs, folders, chosen = self._select(now)
        if specs:
            self._segment(specs, folders, chosen)
        self._send_due(time.time())

    def _discard_expired(self, now: float) -> None:
        state = self.state
        assert state is not None
        for row in state.expired(now, self.config.incomplete_timeout):
            if self._settle(row, "discarded",
                            f"incomplete for {self.config.incomplete_timeout:g} s and not "
                            f"sent again ({row.reason or 'aborted'}): discarded"):
                self.log(f"series {row.series_uid}: discarded, incomplete and not sent again")

    def _drop_spool(self, row: SeriesRow) -> None:
        """Move the series' spool folder away (atomic, under the state's lock), then
        delete it."""
        folder = self.spool / row.folder
        trash = self.spool / TRASH_NAME / f"{row.series_uid}-{time.monotonic_ns()}"
        with contextlib.suppress(FileNotFoundError):
            trash.parent.mkdir(exist_ok=True)
            os.replace(folder, trash)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # the study's folder, once empty
        shutil.rmtree(trash, ignore_errors=True)

    def _select(self, now: float) -> tuple[list[StudySpec], dict[str, str],
                                           dict[str, SeriesRow]]:
        """The studies to segment now: (specs, spool folder per source, chosen series per
        study id); studies with nothing to segment are settled here."""
        from medseg.pacs.records import SeriesRecord
        from medseg.pacs.select import choose_series

        state = self.state
        assert state is not None
        specs: list[StudySpec] = []
        folders: dict[str, str] = {}
        chosen: dict[str, SeriesRow] = {}
        for study_uid in state.ready_studies(now, self.config.quiet_time):
            rows = state.all_series(study_uid)
            new = [r for r in rows if r.status == "receiving"]
            for r in new:
                state.set_count(r.series_uid, spool_count(self.spool / r.folder))
            rows = state.all_series(study_uid)
            new = [r for r in rows if r.status == "receiving"]
            old = [r for r in rows if r.status == "done"]
            candidates = {r.series_uid: r for r in old}
            candidates.update({r.series_uid: r for r in new})
            records = [SeriesRecord.from_dict({**r.record, "instances": r.instances})
                       for r in candidates.values()]
            try:
                choice = choose_series(records, study=study_uid)
            except SeriesSelectionError as exc:
                from medseg.pacs.options import SelectionRules
                from medseg.pacs.select import rejection_reason

                rules = SelectionRules()
                for r, rec in zip(candidates.values(), records, strict=True):
                    if r.status == "receiving":
                        why = rejection_reason(rec, rules) or exc.reason
                        self._settle(r, "not_segmented", f"not segmented: {why}")
                self.log(f"study {study_uid}: nothing to segment ({exc.reason})")
                continue
            best = candidates[choice.series.series_uid]
            reasons = dict((rec.series_uid, why) for rec, why in choice.rejected)
            for r in new:
                if r.series_uid != best.series_uid:
                    self._settle(r, "not_segmented",
                                 f"not segmented: {reasons.get(r.series_uid, 'not chosen')}; "
                                 f"series {best.series_uid} was chosen")
            if best.status == "done":
                continue  # a better series of the study was segmented before, unchanged
            folder = self.spool / best.folder
            digest = series_digest(folder)
            study_id = sanitize_id(study_uid)
            source = f"{SOURCE_PREFIX}{study_uid}/{best.series_uid}#{digest[:16]}"
            with state.lock:
                if state.series(best.series_uid) != best:
                    continue  # an instance arrived meanwhile: next pass
                state.set_status(best.series_uid, "processing", choice.reason, digest=digest,
                                 study_id=study_id)
                processing = state.series(best.series_uid)
            assert processing is not None
            specs.append(StudySpec(study_id=study_id, source=source, name=study_uid))
            folders[source] = best.folder
            chosen[study_id] = processing
            self.log(f"study {study_uid}: segmenting series {best.series_uid} "
                     f"({best.instances} instances; {choice.reason})")
        return specs, folders, chosen

    def _settle(self, row: SeriesRow, status: str, reason: str) -> bool:
        """Give a series its final status and remove its spool, unless an instance of it
        arrived since ``row`` was read: then it is left receiving, to be looked at again
        once quiet (False)."""
        state = self.state
        assert state is not None
        with state.lock:
            now = state.series(row.series_uid)
            if now is None or now.last_at != row.last_at or now.status != row.status:
                self.log(f"series {row.series_uid}: more instances arrived meanwhile: "
                         "looking at it again once quiet")
                return False
            self._drop_spool(row)
            state.set_status(row.series_uid, status, reason)
        return True

    def _segment(self, specs: list[StudySpec], folders: dict[str, str],
                 chosen: dict[str, SeriesRow]) -> None:
        cfg = self.config
        state = self.state
        assert state is not None
        source = NodeSource(spool=str(self.spool), specs=tuple(specs), folders=folders)
        batch = BatchConfig(source=f"{SOURCE_PREFIX}//{cfg.ae_title}", out_dir=str(self.out),
                            method=cfg.method, model=cfg.model,
                            max_attempts=cfg.max_attempts, threads=cfg.threads,
                            show_phi=cfg.show_phi, remote=source, device=cfg.device)
        try:
            result = run_batch(batch, log=lambda m: self.log(f"batch: {m}"))
        except MedsegError as exc:  # the whole pass failed (e.g. a batch run holds OUT_DIR)
            self.log(f"error: segmenting {len(specs)} study(ies) failed: {exc}; trying again "
                     f"in {RETRY_FIRST_S:g} s")
            for row in chosen.values():
                state.set_status(row.series_uid, "receiving", str(exc),
                                 retry_at=time.time() + RETRY_FIRST_S)
            return
        processed = set(result.processed)
        now = time.time()
        for row_b in result.rows:
            series = chosen[row_b.study_id]
            if row_b.status == "done":
                self._machine_tries.pop(row_b.study_id, None)
                if row_b.study_id in processed:
                    qc = row_b.result.get("qc_verdict") or "-"
                    self.log(f"study {series.study_uid}: done in {row_b.seconds or 0:.1f} s "
                             f"(quality check: {qc})")
                    reason = "segmented"
                else:
                    self.log(f"study {series.study_uid}: series {series.series_uid} unchanged "
                             "since it was segmented: not segmented again")
                    reason = "segmented before; received again unchanged"
                sent = state.send_of(row_b.study_id)
                # also when skipped: a node killed after the study was recorded done and
                # before its send was queued owes the send
                if self.destination is not None and (sent is None or
                                                     sent.source != row_b.source):
                    files = [str(self.out / row_b.study_id / n)
                             for n in (SEG_FILENAME, SR_FILENAME)]
                    state.queue_send(row_b.study_id, series.study_uid, row_b.source, files,
                                     str(self.destination), now)
                self._settle(series, "done", reason)
            elif row_b.error_kind == "machine" and row_b.attempts < cfg.max_attempts:
                tries = self._machine_tries[row_b.study_id] = \
                    self._machine_tries.get(row_b.study_id, 0) + 1
                wait = _backoff(tries)
                state.set_status(series.series_uid, "receiving",
                                 f"{row_b.error_type}: {row_b.error_message}",
                                 retry_at=now + wait)
                self.log(f"error: study {series.study_uid}: {row_b.error_message} (the "
                         f"machine's fault, not the study's): trying again in {wait:g} s")
            else:
                self._settle(series, "failed", f"{row_b.error_type}: {row_b.error_message}")
                self.log(f"error: study {series.study_uid}: failed: {row_b.error_message}")
        with StateDB(self.out / BATCH_STATE_NAME) as db:  # the summary lists every study
            write_summary(self.out, db.rows())

    def _send_due(self, now: float) -> None:
        if self.destination is None:
            return
        state = self.state
        assert state is not None
        for send in state.due_sends(now):
            dest = Destination.parse(send.destination)
            t0 = time.monotonic()
            try:
                send_files(dest, send.files, calling_ae=self.config.ae_title,
                           ssl_context=self._send_ssl)
            except MedsegError as exc:
                attempts = send.attempts + 1
                wait = _backoff(attempts)
                state.send_failed(send.study_id, str(exc), time.time() + wait)
                self.log(f"error: sending the results of study {send.study_uid} to {dest} "
                         f"failed (try {attempts}): {exc}; trying again in {wait:g} s")
                continue
            state.send_done(send.study_id)
            self.log(f"study {send.study_uid}: SEG and SR stored at {dest} "
                     f"({time.monotonic() - t0:.1f} s)")


def run_node(config: NodeConfig, *, log: Callable[[str], None] | None = None,
             stop: threading.Event | None = None) -> None:
    """Run a node until ``stop`` is set (or Ctrl-C / SIGTERM in the command)."""
    node = Node(config, log=log)
    node.start()
    try:
        node.serve_forever(stop or threading.Event())
    finally:
        node.close()

