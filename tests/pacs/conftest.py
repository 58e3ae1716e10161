"""A real Orthanc with its DICOMweb plugin for the PACS tests (Debian packages ``orthanc``
and ``orthanc-dicomweb``, see ``.ci/system-packages.txt``).

Each server is started by this fixture, never the system service: its own JSON config,
storage and index folders under pytest's temporary directory, HTTP on a free loopback port,
the DICOM port disabled, HTTP basic authentication with one registered test user whose
password is random per session (so a 401 can be tested, and any leak of it into output
can be searched for). It is stopped by its process id at teardown. Session scope: the HTTP
server starts once. Without Orthanc
the tests are skipped with the reason (and fail under CI=true, where it must be present).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from medseg.pacs.client import PacsClient, make_config
from tests.conftest import need_tool

ORTHANC = Path(os.environ.get("MEDSEG_TEST_ORTHANC", "/usr/sbin/Orthanc"))
DICOMWEB_PLUGIN = Path(os.environ.get("MEDSEG_TEST_ORTHANC_DICOMWEB",
                                      "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))
USER = "medseg-test"
#: Seconds to wait for a starting Orthanc to answer.
START_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port nothing listens on at the moment (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    """A running test Orthanc: ``url`` is its DICOMweb root."""

    url: str
    http_root: str
    password: str
    pid: int
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that give medseg the test user's credentials."""
        return {"MEDSEG_DICOMWEB_USER": USER, "MEDSEG_DICOMWEB_PASSWORD": self.password}

    def client(self) -> PacsClient:
        return PacsClient(make_config(self.url, env=self.env, retries=0, timeout=60))

    def upload(self, *paths: Path) -> list[str]:
        """STOW-RS the DICOM files/folders; the SOP instance UIDs stored."""
        return self.client().store(paths).stored


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must have Orthanc: {reason}")
    pytest.skip(reason)


def _start(root: Path, extra: dict[str, object] | None = None) -> Iterator[Orthanc]:
    """Start an Orthanc in ``root``; ``extra`` is merged into its JSON configuration (e.g.
    ``DicomServerEnabled``, ``DicomPort``, ``DicomModalities`` for a DICOM-enabled one)."""
    if not ORTHANC.is_file() or not DICOMWEB_PLUGIN.exists():
        _skip_or_fail(f"Orthanc or its DICOMweb plugin is not installed ({ORTHANC}, "
                      f"{DICOMWEB_PLUGIN}); apt-get install orthanc orthanc-dicomweb")
    port = free_port()
    password = secrets.token_urlsafe(18)
    (root / "db").mkdir(parents=True)
    config = {
        "Name": "medseg-test",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "DicomServerEnabled": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: password},
        "OrthancExplorerEnabled": False,
        "HttpCompressionEnabled": False,
        "ConcurrentJobs": 1,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False,
                     "Host": f"127.0.0.1:{port}", "Ssl": False},
    }
    config.update(extra or {})
    cfg = root / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    os.chmod(cfg, 0o600)
    log = root / "orthanc.log"
    http_root = f"http://127.0.0.1:{port}"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(ORTHANC), str(cfg)], stdout=fh, stderr=subprocess.STDOUT,
                                cwd=root, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Orthanc exited with status {proc.returncode} at start:\n"
                            f"{log.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(requests.RequestException):
                r = requests.get(f"{http_root}/system", auth=(USER, password), timeout=2)
                if r.status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"Orthanc did not answer within {START_TIMEOUT:g} s:\n"
                            f"{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        yield Orthanc(url=f"{http_root}/dicom-web", http_root=http_root, password=password,
                      pid=proc.pid, log=log)
    finally:
        # our own process, by its pid: never the system service
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A running Orthanc (HTTP, basic auth) for the whole session."""
    yield from _start(tmp_path_factory.mktemp("orthanc"))


@dataclass
class TlsServer:
    """An HTTPS server with a self-signed certificate for 127.0.0.1 that answers every
    GET with an empty DICOM JSON list (a DICOMweb root with no study)."""

    url: str
    cert: Path


@pytest.fixture(scope="session")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """TLS verification is tested against this small server rather than Orthanc: Debian's
    Orthanc 1.10.1 crashes on the first HTTPS connection (SslEnabled) on this system."""
    import ssl
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    openssl = need_tool("openssl")  # a test certificate (.ci/system-packages.txt)
    root = tmp_path_factory.mktemp("tls")
    key, cert = root / "key.pem", root / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True,
                   capture_output=True)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"[]"
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield TlsServer(url=f"https://127.0.0.1:{server.server_address[1]}/dicom-web",
                        cert=cert)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def rewrite_series(src: Path, dest: Path, *, patient_id: str, study_date: str,
                   modality: str | None = None, drop: Callable[[int], bool] | None = None
                   ) -> Path:
    """Copy the DICOM series ``src`` to ``dest`` as a new study (new Study/Series/SOP
    UIDs, the given PatientID and StudyDate), optionally dropping the instances whose
    position in name order ``drop`` accepts."""
    dest.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for n, f in enumerate(sorted(p for p in src.iterdir() if p.is_file())):
        if drop is not None and drop(n):
            continue
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.StudyDate = patient_id, study_date
        if modality is not None:
            ds.Modality = modality
        ds.save_as(dest / f"{n:04d}.dcm", enforce_file_format=True)
    return dest


@dataclass(frozen=True)
class Studies:
    """The UIDs of the two real chest CTs uploaded to the session's Orthanc."""

    cip: str
    cip_series: str
    philips: str
    philips_series: str


def _uids(folder: Path) -> tuple[str, str]:
    f = sorted(p for p in folder.iterdir() if p.suffix == ".dcm")[0]
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


@pytest.fixture(scope="session")
def studies(orthanc: Orthanc, shared_data: Path) -> Studies:
    """cip-ct64 (79 slices, PatientID 123456, 2006) and chest-ct-philips-141 (141 slices,
    no PatientID, 2007) on the Orthanc, uploaded once."""
    from tests.conftest import need

    cip = need(shared_data, "cip-ct64/ct-64Dicom")
    philips = need(shared_data, "chest-ct-philips-141")
    orthanc.upload(cip, philips)
    cip_uids, philips_uids = _uids(cip), _uids(philips)
    return Studies(cip=cip_uids[0], cip_series=cip_uids[1], philips=philips_uids[0],
                   philips_series=philips_uids[1])
