"""The receiving side of the DICOM node: a pynetdicom Storage SCP that spools instances.

* **Who may store.** Associations must be addressed to the node's AE title and come from a
  calling AE title in the allow list (pynetdicom rejects the others at association, with the
  standard A-ASSOCIATE-RJ reasons); optionally only from listed IP addresses (the TCP
  connection is closed before any DICOM is exchanged). Optional TLS: the server socket is
  wrapped with an ``ssl.SSLContext`` made from a certificate and key (and a CA bundle to
  require client certificates).
* **What is accepted.** C-ECHO, and C-STORE of CT Image Storage, Enhanced CT, Legacy
  Converted Enhanced CT (what medseg segments) and MR Image Storage, Enhanced MR (received
  so that a routed MR series is recorded as not segmented, with the reason) in the transfer
  syntaxes medseg's loader decodes (uncompressed, deflated, JPEG, JPEG-LS, JPEG 2000, RLE).
  Other SOP classes (the node's own SEG and SR coming back, dose reports, secondary
  captures) are refused politely: their presentation contexts are rejected at association,
  so the sender knows before it sends; a data set whose SOP class or UIDs do not match its
  request gets a failure status (0xA900), never a crash.
* **Spool.** Each instance is written as received (the encoded bytes, no re-encoding) to
  ``OUT_DIR/.spool/<study>/<series>/<instance>.dcm`` through a temporary file and a rename,
  so a file in the spool is always whole. Folder and file names come from the UIDs, and
  only when they are valid UIDs (digits and dots, at most 64 characters); anything else is
  replaced by a hash, never used as a path: header text never names a file.
* **Transfers.** Each association remembers the series it carried; a release marks them
  released (the sender said it is done; recorded when the A-RELEASE-RQ arrives, before it
  is answered), an abort or a connection lost without a release
  marks them incomplete (:class:`~medseg.node.state.NodeState`). Logs name AE titles, UIDs
  and counts, never patient data.
"""

from __future__ import annotations

import hashlib
import re
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError, OutputError
from medseg.io.atomic import atomic_output
from medseg.node.state import NodeState

__all__ = ["ACCEPTED_SOP_CLASSES", "SEGMENTED_SOP_CLASSES", "SPOOL_NAME", "StorageSCP",
           "remove_partials", "safe_uid", "spool_count", "tls_server_context"]

SPOOL_NAME = ".spool"

#: SOP classes medseg segments (CT) and receives only to record them as not segmented (MR).
SEGMENTED_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.2",       # CT Image Storage
                         "1.2.840.10008.5.1.4.1.1.2.1",     # Enhanced CT Image Storage
                         "1.2.840.10008.5.1.4.1.1.2.2")     # Legacy Converted Enhanced CT
ACCEPTED_SOP_CLASSES = (*SEGMENTED_SOP_CLASSES,
                        "1.2.840.10008.5.1.4.1.1.4",        # MR Image Storage
                        "1.2.840.10008.5.1.4.1.1.4.1")      # Enhanced MR Image Storage
#: Transfer syntaxes the loader decodes (pydicom, pylibjpeg: libjpeg, openjpeg, rle).
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",      # Explicit VR Little Endian
    "1.2.840.10008.1.2",        # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",   # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",      # Explicit VR Big Endian (retired, still sent by old devices)
    "1.2.840.10008.1.2.4.70",   # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57",   # JPEG Lossless
    "1.2.840.10008.1.2.4.50",   # JPEG Baseline
    "1.2.840.10008.1.2.4.51",   # JPEG Extended
    "1.2.840.10008.1.2.4.80",   # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",   # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",   # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",   # JPEG 2000
    "1.2.840.10008.1.2.5",      # RLE Lossless
)
VERIFICATION = "1.2.840.10008.1.1"
#: Seconds a connecting sender has to complete the TLS handshake.
TLS_HANDSHAKE_S = 30.0

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def safe_uid(uid: object) -> str:
    """A file-name-safe form of a UID: the UID itself when it is a valid UID (digits and
    dots, at most 64 characters), else ``x`` and 40 hex digits of its SHA-256."""
    text = str(uid if uid is not None else "").strip().rstrip("\0").strip()
    if 0 < len(text) <= 64 and _UID.fullmatch(text):
        return text
    return "x" + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:40]


def tls_server_context(cert: str | Path, key: str | Path,
                       ca: str | Path | None = None) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or newer) from PEM files; with ``ca`` the
    sender must present a certificate that CA signed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
        if ca is not None:
            ctx.load_verify_locations(str(ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate, key or CA: {exc}",
                          path=cert) from exc
    return ctx


class _Transfers:
    """Which series each open association carried (by the association's id)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.series: dict[int, set[str]] = {}
        self.counts: dict[int, int] = {}
        self.ended: set[int] = set()
        self.open_per_series: dict[str, int] = {}

    def add(self, assoc: object, series_uid: str) -> None:
        with self.lock:
            key = id(assoc)
            carried = self.series.setdefault(key, set())
            if series_uid not in carried:
                carried.add(series_uid)
                self.open_per_series[series_uid] = self.open_per_series.get(series_uid, 0) + 1
            self.counts[key] = self.counts.get(key, 0) + 1

    def end(self, assoc: object) -> tuple[list[str], list[str], int]:
        """Forget an association: (series it carried, of those the ones no other open
        association carries, instances it stored). Empty when it was already ended."""
        with self.lock:
            key = id(assoc)
            if key in self.ended:
                return [], [], 0
            self.ended.add(key)
            carried = sorted(self.series.pop(key, set()))
            n = self.counts.pop(key, 0)
            last = []
            for uid in carried:
                left = self.open_per_series.get(uid, 1) - 1
                if left <= 0:
                    self.open_per_series.pop(uid, None)
                    last.append(uid)
                else:
                    self.open_per_series[uid] = left
            return carried, last, n

    def forget(self, assoc: object) -> None:
        with self.lock:
            self.ended.discard(id(assoc))


class StorageSCP:
    """The node's Storage SCP: :meth:`start` listens, :meth:`stop` stops. Received
    instances go to ``spool`` and are recorded in ``state``; ``log`` gets one line per
    association and per refused instance."""

    def __init__(self, *, state: NodeState, spool: Path, ae_title: str, host: str, port: int,
                 allow: Sequence[str] = (), allow_addresses: Sequence[str] = (),
                 ssl_context: ssl.SSLContext | None = None,
                 log: Callable[[str], None] = lambda _m: None) -> None:
        if not ae_title or len(ae_title) > 16:
            raise ConfigError(f"the AE title must have 1-16 characters, got {ae_title!r}")
        self.state = state
        self.spool = spool
        self.ae_title = ae_title
        self.host, self.port = host, port
        self.allow = [a.strip() for a in allow]
        self.allow_addresses = {a.strip() for a in allow_addresses}
        self.ssl_context = ssl_context
        self.log = log
        self._transfers = _Transfers()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- handlers ----------------------------------------------------------------------

    def _on_store(self, event: Any) -> int:
        assoc = event.assoc
        calling = str(assoc.requestor.ae_title).strip()
        req = event.request
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        try:
            ds = event.dataset
            study_uid = str(ds.get("StudyInstanceUID", "") or "")
            series_uid = str(ds.get("SeriesInstanceUID", "") or "")
            sop_class = str(ds.get("SOPClassUID", "") or "")
        except Exception as exc:  # noqa: BLE001 - a data set pydicom cannot parse
            self.log(f"{calling}: instance {sop_uid}: refused (0xC000): cannot decode the "
                     f"data set ({type(exc).__name__})")
            return 0xC000
        if not study_uid or not series_uid:
            self.log(f"{calling}: instance {sop_uid}: refused (0xA900): no "
                     "StudyInstanceUID or SeriesInstanceUID")
            return 0xA900
        if sop_class != str(req.AffectedSOPClassUID) or \
                str(ds.get("SOPInstanceUID", "")) != sop_uid:
            self.log(f"{calling}: instance {sop_uid}: refused (0xA900): its SOP class or "
                     "instance UID differs from the C-STORE request's")
            return 0xA900
        from medseg.pacs.records import SeriesRecord

        try:
            record = SeriesRecord.from_instance(ds).to_dict()
        except Exception as exc:  # noqa: BLE001 - a malformed attribute
            self.log(f"{calling}: instance {sop_uid}: refused (0xC000): unreadable header "
                     f"attribute ({type(exc).__name__})")
            return 0xC000
        folder = Path(safe_uid(study_uid)) / safe_uid(series_uid)
        target = self.spool / folder / f"{safe_uid(sop_uid)}.dcm"
        data = event.encoded_dataset()
        with self.state.lock:  # the series cannot be settled between the write and the record
            try:
                with atomic_output(target) as tmp:
                    tmp.write_bytes(data)
            except OutputError as exc:
                self.log(f"{calling}: instance {sop_uid}: refused (0xA700, out of resources): "
                         f"{exc.reason}")
                return 0xA700
            self._transfers.add(assoc, series_uid)
            self.state.received(series_uid=series_uid, study_uid=study_uid,
                                folder=str(folder), record=record, calling_ae=calling,
                                now=time.time())
        return 0x0000

    def _on_pdu(self, event: Any) -> None:
        """An A-RELEASE-RQ from the sender: its transfer is recorded released *before*
        pynetdicom answers it, so a node that dies right after the answer (the sender then
        believes its series delivered) still knows the series is complete."""
        from pynetdicom.pdu import A_RELEASE_RQ

        if isinstance(event.pdu, A_RELEASE_RQ):
            self._on_released(event)

    def _on_released(self, event: Any) -> None:
        carried, last, n = self._transfers.end(event.assoc)
        if carried:
            self.state.transfer_ended(last, released=True)
            self.log(f"{event.assoc.requestor.ae_title.strip()}: association released: "
                     f"{n} instance(s) of {len(carried)} series ({', '.join(carried)})")

    def _on_aborted(self, event: Any, why: str) -> None:
        carried, _last, n = self._transfers.end(event.assoc)
        if carried:
            reason = (f"the sender's association ended without a release ({why}) after "
                      f"{n} instance(s): waiting for the series to be sent again")
            self.state.transfer_ended(carried, released=False, reason=reason)
            self.log(f"{event.assoc.requestor.ae_title.strip()}: association {why} after {n} "
                     f"instance(s): series {', '.join(carried)} incomplete (not processed "
                     "until sent again)")

    def _on_close(self, event: Any) -> None:
        self._on_aborted(event, "connection lost")
        self._transfers.forget(event.assoc)

    def _on_rejected(self, event: Any) -> None:
        req = event.assoc.requestor
        self.log(f"association from {req.ae_title.strip() or '?'} at {req.address} "
                 f"rejected (calling AE title not allowed, or not addressed to "
                 f"{self.ae_title})")

    # -- server ------------------------------------------------------------------------

    def _make_ae(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.allow)
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 120
        ae.maximum_associations = 16
        for sop in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(VERIFICATION)
        return ae

    def start(self) -> None:
        """Listen (in background threads); a port in use is a ConfigError."""
        from pynetdicom import evt
        from pynetdicom.transport import ThreadedAssociationServer

        allowed = self.allow_addresses
        tls = self.ssl_context
        log = self.log

        class Server(ThreadedAssociationServer):
            """pynetdicom's server, with the address check, and the TLS handshake made in
            the connection's own thread: pynetdicom makes it in the accepting thread, where
            one silent client would block every other sender."""

            def verify_request(self, request: Any, client_address: Any) -> bool:
                return not allowed or str(client_address[0]) in allowed

            def get_request(self) -> Any:
                assert self.socket is not None
                return self.socket.accept()

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                if tls is not None:
                    try:
                        request.settimeout(TLS_HANDSHAKE_S)
                        request = tls.wrap_socket(request, server_side=True)
                        request.settimeout(None)
                    except (OSError, ssl.SSLError) as exc:
                        log(f"TLS handshake with {client_address[0]} failed: {exc}")
                        request.close()
                        return
                super().process_request_thread(request, client_address)

        handlers = [(evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_PDU_RECV, self._on_pdu),
                    (evt.EVT_RELEASED, self._on_released),  # if the PDU was not seen
                    (evt.EVT_ABORTED, lambda e: self._on_aborted(e, "aborted")),
                    (evt.EVT_CONN_CLOSE, self._on_close),
                    (evt.EVT_REJECTED, self._on_rejected)]
        ae = self._make_ae()
        try:
            server = ae.make_server((self.host, self.port), ae_title=self.ae_title,
                                    ssl_context=self.ssl_context, evt_handlers=handlers,
                                    server_class=Server)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.host}:{self.port}: "
                              f"{exc.strerror or exc}") from exc
        ae._servers.append(server)  # as AE.start_server does: shutdown() removes it
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, daemon=True,
                                        name=f"medseg-listen:{self.port}")
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # stops accepting, closes the socket
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


def spool_count(folder: Path) -> int:
    """Whole instances in a spool folder (temporary files of a write in progress excluded)."""
    try:
        return sum(1 for p in folder.iterdir() if p.suffix == ".dcm" and
                   not p.name.startswith("."))
    except FileNotFoundError:
        return 0


def remove_partials(spool: Path) -> int:
    """Delete temporary files a stopped node left in the spool; returns how many."""
    n = 0
    if spool.is_dir():
        for p in spool.rglob(".*.partial.dcm"):
            p.unlink(missing_ok=True)
            n += 1
    return n

