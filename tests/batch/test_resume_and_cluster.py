"""A run killed with SIGKILL resumes to byte-identical outputs; a real Dask scheduler with
two worker processes on loopback runs a batch (U-Net, model loaded once per worker)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from medseg.batch import StateDB
from medseg.batch.state import verify_outputs
from medseg.cli import main
from tests.batch.conftest import assert_nothing_partial, db_rows, study_dirs

#: Outputs compared byte for byte; segment.json is compared without its timings.
IDENTICAL = ("lungs.nii.gz", "report.json", "report.html", "report.csv")


def _done_count(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        try:
            return int(conn.execute(
                "SELECT COUNT(*) FROM studies WHERE status = 'done'").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:  # created but no schema yet
        return 0


def _batch_cmd(src: Path, out: Path) -> list[str]:
    # --threads 1: the same torch arithmetic in every run, whatever the machine's load
    return [sys.executable, "-m", "medseg.cli", "batch", str(src), "-o", str(out),
            "--threads", "1", "-q"]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_identical_outputs(tmp_path: Path,
                                                    make_phantom: Callable[..., Path]) -> None:
    src = tmp_path / "cohort"
    n = 5
    for seed in range(1, n + 1):
        make_phantom(src / f"p{seed}", seed)
    killed, clean = tmp_path / "killed", tmp_path / "clean"

    proc = subprocess.Popen(_batch_cmd(src, killed), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    try:
        while _done_count(killed / "batch.sqlite") < 1:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no study finished in 180 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    before = db_rows(killed)
    done_before = {k for k, r in before.items() if r["status"] == "done"}
    assert 1 <= len(done_before) < n, "the run was not interrupted in the middle"
    # only finished studies have an output folder (one may have been renamed into place
    # just before the kill, its database update not yet made: it is still "running")
    running = {k for k, r in before.items() if r["status"] == "running"}
    assert study_dirs(killed) <= done_before | running
    with StateDB(killed / "batch.sqlite") as db:
        for sid in done_before:
            row = db.get(sid)
            assert row is not None and verify_outputs(killed / sid, row.outputs) is None

    resumed = subprocess.run(_batch_cmd(src, killed), capture_output=True, text=True,
                             timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    after = db_rows(killed)
    assert all(r["status"] == "done" for r in after.values()) and len(after) == n
    for sid in done_before:  # finished studies were not redone
        assert after[sid]["finished_at"] == before[sid]["finished_at"]
    assert_nothing_partial(killed, set())

    fresh = subprocess.run(_batch_cmd(src, clean), capture_output=True, text=True,
                           timeout=300, check=False)
    assert fresh.returncode == 0, fresh.stderr
    assert study_dirs(clean) == study_dirs(killed) == {f"p{s}" for s in range(1, n + 1)}
    for sid in study_dirs(clean):
        for name in IDENTICAL:
            assert (killed / sid / name).read_bytes() == (clean / sid / name).read_bytes(), \
                f"{sid}/{name} differs"
        a, b = (json.loads((d / sid / "segment.json").read_text()) for d in (killed, clean))
        a.pop("timings_s")
        b.pop("timings_s")
        assert a == b


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process this test started, and its children (its own process group)."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the nanny's worker child, if left
    proc.wait(timeout=15)


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[str]:
    """A ``dask scheduler`` and two ``dask worker`` processes (one thread each) on loopback,
    started from another folder than the test's (paths must be absolute); all stopped by
    their process ids at the end."""
    from distributed import Client

    dask_cli = str(Path(sys.executable).with_name("dask"))
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    work = tmp_path / "dask"
    work.mkdir()
    logs = [open(work / f"{name}.log", "wb") for name in ("scheduler", "w1", "w2")]  # noqa: SIM115
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen(
            [dask_cli, "scheduler", "--host", "127.0.0.1", "--port", str(port),
             "--no-dashboard"], cwd=work, stdout=logs[0], stderr=subprocess.STDOUT,
            start_new_session=True))
        for i in (1, 2):
            procs.append(subprocess.Popen(
                [dask_cli, "worker", address, "--nworkers", "1", "--nthreads", "1",
                 "--no-dashboard", "--name", f"w{i}", "--local-directory", str(work)],
                cwd=work, stdout=logs[i], stderr=subprocess.STDOUT, start_new_session=True))
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for log in logs:
            log.close()


@pytest.mark.slow
def test_batch_on_an_external_dask_cluster(dask_cluster: str, tmp_path: Path,
                                           make_phantom: Callable[..., Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "cohort", tmp_path / "out"
    for seed in (1, 2, 3, 4):
        make_phantom(src / f"p{seed}", seed)
    assert main(["batch", str(src), "-o", str(out), "--scheduler", dask_cluster]) == 0
    assert "4 done" in capsys.readouterr().out
    rows = db_rows(out)
    assert all(r["status"] == "done" for r in rows.values()) and len(rows) == 4
    workers = {r["worker"] for r in rows.values()}
    assert 1 <= len(workers) <= 2 and not any(w.endswith(f":{os.getpid()}") for w in workers)
    assert all(r["model_loads"] == 1 for r in rows.values())  # once per worker process
    assert study_dirs(out) == {"p1", "p2", "p3", "p4"}
    assert_nothing_partial(out, set())
