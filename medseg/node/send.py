"""The sending side of the DICOM node: C-STORE of a study's DICOM SEG and SR to the
configured destination (a PACS, Orthanc, a viewer's DICOM node).

One association per study carries both files; each must be stored with a success or
warning status (0x0000, 0xB000, 0xB006, 0xB007), otherwise the send failed and the error
names the destination, the file and the status. A failed send is the node's to retry
(:mod:`medseg.node.service`); nothing here retries."""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import ConfigError, MedsegError

__all__ = ["Destination", "SendError", "send_files"]

#: C-STORE statuses that mean "stored" (success, and the warnings "coercion of data
#: elements", "elements discarded", "data set does not match SOP class").
STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})

_DEST = re.compile(r"(?P<ae>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>\d{1,5})")


class SendError(MedsegError):
    """The results could not be stored at the destination (refused, or not reachable)."""


@dataclass(frozen=True)
class Destination:
    """Where results go: ``AE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        m = _DEST.fullmatch(text.strip())
        if m is None or not 0 < int(m["port"]) < 65536 or not m["ae"].strip():
            raise ConfigError(f"a destination is AE_TITLE@HOST:PORT (e.g. ORTHANC@pacs:4242), "
                              f"got {text!r}")
        return cls(ae_title=m["ae"].strip(), host=m["host"].strip("[]"), port=int(m["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def send_files(dest: Destination, files: Sequence[str | Path], *, calling_ae: str,
               ssl_context: ssl.SSLContext | None = None, timeout: float = 60.0) -> None:
    """Store ``files`` at ``dest`` in one association; :class:`SendError` if it cannot be
    opened or any file is not stored."""
    import pydicom
    from pynetdicom import AE

    metas = []
    for f in files:
        try:
            meta = pydicom.dcmread(f, stop_before_pixels=True,
                                   specific_tags=["SOPClassUID", "SOPInstanceUID"])
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise SendError(f"cannot read the file to send: {exc}", path=f) from exc
        metas.append((Path(f), str(meta.file_meta.MediaStorageSOPClassUID),
                      str(meta.file_meta.TransferSyntaxUID)))
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 15.0)
    for sop_class, syntax in sorted({(c, t) for _, c, t in metas}):
        ae.add_requested_context(sop_class, [syntax])
    try:  # first a plain TCP connection: a clear reason when nothing answers
        socket.create_connection((dest.host, dest.port), timeout=min(timeout, 15.0)).close()
    except OSError as exc:
        raise SendError(f"{dest} is not reachable: {exc.strerror or exc}") from exc
    tls = (ssl_context, dest.host) if ssl_context is not None else None
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)
    if not assoc.is_established:
        if assoc.is_rejected:
            raise SendError(f"{dest} rejected the association (is the calling AE title "
                            f"{calling_ae} configured there, and the called AE title right?)")
        raise SendError(f"{dest} did not accept the association: not reachable (nothing "
                        "listens there, a firewall) or it aborted at once")
    try:
        for path, _cls, _ts in metas:
            try:
                status = assoc.send_c_store(path)
            except (OSError, ValueError, RuntimeError) as exc:
                raise SendError(f"C-STORE to {dest} failed: {exc}", path=path) from exc
            code = int(status.Status) if status is not None and "Status" in status else None
            if code is None:
                raise SendError(f"C-STORE to {dest}: no answer (connection lost or timed "
                                "out)", path=path)
            if code not in STORED:
                raise SendError(f"C-STORE to {dest} refused with status 0x{code:04X}",
                                path=path)
    finally:
        if assoc.is_established:
            assoc.release()
