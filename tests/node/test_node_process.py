"""``medseg listen`` as a process: SIGKILL mid-study and restart, two senders at once with
the node's peak memory, ``medseg run`` of a ``job: listen`` file; DICOM over TLS."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pynetdicom import AE

from medseg.batch import sanitize_id
from tests.conftest import need_tool
from tests.node.conftest import RunningNode, send_series, uids, wait_for
from tests.pacs.conftest import free_port

IDENTICAL = ("lungs.nii.gz", "report.csv")


def _rows(out: Path) -> dict[str, dict[str, object]]:
    db = out / "batch.sqlite"
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            conn.row_factory = sqlite3.Row
            return {r["study_id"]: dict(r) for r in conn.execute("SELECT * FROM studies")}
    except sqlite3.OperationalError:  # the node is creating it
        return {}


def _echo(port: int) -> bool:
    ae = AE(ae_title="SENDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.connection_timeout = 2
    with contextlib.suppress(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDSEG")
        if assoc.is_established:
            ok = int(assoc.send_c_echo().Status) == 0
            assoc.release()
            return ok
    return False


@contextlib.contextmanager
def _listen(args: list[str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A ``medseg`` process (``listen`` or ``run``) serving on ``port``; SIGTERM at the end
    unless the test killed it."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "medseg.cli", *args], stdout=fh,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(f"the node answering C-ECHO on port {port} (log: {log})",
                 lambda: proc.poll() is not None or _echo(port), timeout=120)
        assert proc.poll() is None, log.read_text()
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _listen_args(out: Path, port: int) -> list[str]:
    # --threads 1: the same torch arithmetic in every run, whatever the machine's load
    return ["listen", "-o", str(out), "--port", str(port), "--host", "127.0.0.1",
            "--allow", "SENDER", "--quiet-time", "0.5", "--threads", "1"]


def _same_outputs(a: Path, b: Path, study_id: str) -> None:
    for name in IDENTICAL:
        assert (a / study_id / name).read_bytes() == (b / study_id / name).read_bytes(), \
            f"{study_id}/{name} differs"
    ra, rb = (json.loads((d / study_id / "report.json").read_text()) for d in (a, b))
    for r in (ra, rb):  # the spool path differs between output folders, nothing else
        r["inputs"]["image"].pop("path")
    assert ra == rb


@pytest.mark.slow
def test_sigkilled_node_resumes_each_study_once_with_identical_outputs(
        tmp_path: Path, phantom_series: Callable[..., Path]) -> None:
    series = [phantom_series(seed) for seed in (1, 2, 3)]
    ids = [sanitize_id(uids(s)[0]) for s in series]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    port = free_port()
    with _listen(_listen_args(killed, port), port, tmp_path / "killed.log") as proc:
        for s in series:
            assert set(send_series(port, s)) == {0}
        wait_for("a study being segmented",
                 lambda: any(r["status"] == "running" for r in _rows(killed).values()))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    before = _rows(killed)
    assert len([r for r in before.values() if r["status"] == "done"]) < len(ids)
    port = free_port()
    with _listen(_listen_args(killed, port), port, tmp_path / "killed.log"):
        wait_for("every study done after the restart",
                 lambda: all(_rows(killed).get(i, {}).get("status") == "done" for i in ids)
                 and _series_statuses(killed) == ["done"] * len(ids), timeout=180)
    after = _rows(killed)
    for sid in ids:
        if before.get(sid, {}).get("status") == "done":  # finished before: not redone
            assert after[sid]["finished_at"] == before[sid]["finished_at"]
    assert not list((killed / ".spool").rglob("*.dcm"))
    assert not (killed / ".staging").exists() or not list((killed / ".staging").iterdir())
    port = free_port()
    with _listen(_listen_args(clean, port), port, tmp_path / "clean.log"):
        for s in series:
            send_series(port, s)
        wait_for("every study done in the uninterrupted run",
                 lambda: all(_rows(clean).get(i, {}).get("status") == "done" for i in ids)
                 and _series_statuses(clean) == ["done"] * len(ids), timeout=180)
    for sid in ids:
        _same_outputs(killed, clean, sid)


def _series_statuses(out: Path) -> list[str]:
    """The node's series statuses (it settles a series just after the batch records it)."""
    try:
        with sqlite3.connect(out / "node.sqlite", timeout=5) as conn:
            return [r[0] for r in conn.execute("SELECT status FROM series")]
    except sqlite3.OperationalError:
        return []


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_two_senders_ten_studies_each_processed_once(
        tmp_path: Path, phantom_series: Callable[..., Path]) -> None:
    """Two senders at once, five studies each, to a node started by ``medseg run`` from a
    ``job: listen`` file: all ten segmented once; the node's peak memory stays bounded."""
    series = [phantom_series(seed) for seed in range(1, 6) for _copy in range(2)]
    ids = {sanitize_id(uids(s)[0]) for s in series}
    out, port = tmp_path / "out", free_port()
    config = tmp_path / "node.yaml"
    config.write_text(f"job: listen\nout_dir: {out}\nport: {port}\nhost: 127.0.0.1\n"
                      "allow: [SENDER, SENDER2]\nquiet_time: 0.5\nthreads: 1\n")
    errors: list[Exception] = []
    sent_at: dict[str, float] = {}

    def sender(calling: str, mine: list[Path]) -> None:
        try:
            for s in mine:
                assert set(send_series(port, s, calling=calling)) == {0}
            sent_at[calling] = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with _listen(["run", str(config)], port, tmp_path / "node.log") as proc:
        t0 = time.monotonic()
        threads = [threading.Thread(target=sender, args=(ae, series[i::2]))
                   for i, ae in enumerate(("SENDER", "SENDER2"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        wait_for("all ten studies done",
                 lambda: {k for k, r in _rows(out).items() if r["status"] == "done"} == ids
                 and _series_statuses(out) == ["done"] * 10, timeout=300)
        done_s = time.monotonic() - t0
        peak = _peak_rss_mib(proc.pid)
    rows = _rows(out)
    assert len(rows) == 10 and all(r["attempts"] == 1 for r in rows.values())
    # neither sender waited for the other's studies to be segmented
    assert max(sent_at.values()) - t0 < done_s
    print(f"\nnode peak memory (VmHWM): {peak:.0f} MiB; 10 studies in {done_s:.1f} s")
    assert peak < 3 * 1024


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    openssl = need_tool("openssl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_tls_listener_accepts_tls_and_refuses_plain(
        tmp_path: Path, start_node: Callable[..., RunningNode],
        tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    node = start_node(tmp_path / "out", tls_cert=str(cert), tls_key=str(key))
    assert any("(TLS)" in m for m in node.logs)
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as silent:
        # a client that connects and says nothing does not block other senders
        ctx = ssl.create_default_context(cafile=str(cert))
        ae = AE(ae_title="SENDER")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="MEDSEG",
                             tls_args=(ctx, "127.0.0.1"))
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
        del silent
    # plain DICOM (an A-ASSOCIATE-RQ's first bytes) to the TLS port: connection closed
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as plain:
        plain.sendall(bytes([0x01, 0x00, 0x00, 0x00, 0x00, 0xCD]) + bytes(200))
        try:
            answer = plain.recv(1024)
        except ConnectionResetError:
            answer = b""
        assert answer == b""  # closed (or reset), never an association
    wait_for("the failed handshake logged",
             lambda: any("TLS handshake" in m and "failed" in m for m in node.logs))
    node.close()


_SENDER = """
import sys, time
from pathlib import Path
from pynetdicom import AE
ae = AE(ae_title="SENDER")
ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="MEDSEG")
assert assoc.is_established
for f in sorted(Path(sys.argv[2]).glob("*.dcm")):
    assoc.send_c_store(f)
    time.sleep(0.2)
assoc.release()
"""


def test_sender_killed_mid_series_leaves_it_incomplete(
        tmp_path: Path, start_node: Callable[..., RunningNode],
        phantom_series: Callable[..., Path]) -> None:
    """A sender process killed (SIGKILL: no release, no A-ABORT, the TCP connection just
    drops) after a few instances: the series is never processed as complete."""
    node = start_node(tmp_path / "out")
    src = phantom_series(1)
    study_uid, series_uid = uids(src)
    proc = subprocess.Popen([sys.executable, "-c", _SENDER, str(node.port), str(src)])
    try:
        wait_for("a few instances received",
                 lambda: len(list((node.out / ".spool").rglob("*.dcm"))) >= 4, timeout=60)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    wait_for("the series marked incomplete",
             lambda: node.series()[series_uid].status == "incomplete", timeout=30)
    time.sleep(2.0)  # well past the quiet time
    row = node.series()[series_uid]
    assert row.status == "incomplete" and "connection lost" in (row.reason or "")
    assert not _rows(node.out)
    assert not (node.out / sanitize_id(study_uid)).exists()
    node.close()
