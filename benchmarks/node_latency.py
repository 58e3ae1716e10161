"""DICOM node latency: Orthanc sends a CT series to ``medseg listen`` by C-STORE; how long
until the DICOM SEG is stored back in Orthanc.

    python benchmarks/node_latency.py [--input DICOM_FOLDER] [--repeat N]
                                      [--quiet-time S] [--threads N] [--method unet|threshold]

Default input: ../shared/data/chest-ct-philips-141 (141 x 512 x 512). Starts a private
Orthanc (the tests' starter, ``tests/pacs/conftest.py``: its own config and storage in a
temporary folder, HTTP and DICOM on free loopback ports) that knows the node as DICOM
modality ``medseg``, and ``python -m medseg.cli listen --send-to ORTHANC@...`` as a child
process (the model is loaded once, at its start, before any timing). Then, ``--repeat``
times: a copy of the input with new Study/Series/SOP instance UIDs (the node skips a series
it receives again unchanged) is uploaded to Orthanc (not timed), and Orthanc's REST
``POST /modalities/medseg/store`` (synchronous) sends it to the node. Measured:

* **store**: Orthanc's store call, i.e. the C-STORE of every instance and the release;
* **result**: from the store call's return (the last instance received, the association
  released) to the SEG being in Orthanc (polled every 50 ms over REST). It includes the
  node's ``--quiet-time`` (default 1 s here; 10 s is the command's default), the
  segmentation of the study (the node's own "done in" log line), writing the outputs and
  the C-STORE of the SEG and SR back.

Prints the CPU model (lscpu), each value and the medians, and the node's log lines.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))

ORTHANC_AET = "ORTHANC"
NODE_AET = "MEDSEG"


def lscpu_model() -> str:
    """``Model name`` of ``lscpu`` (else /proc/cpuinfo)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name"):
                return line.split(":", 1)[1].strip()
    from benchmarks.segment_before_after import cpu_name

    return cpu_name()


class Rest:
    """Orthanc's REST API with the test user's credentials."""

    def __init__(self, orthanc: Any) -> None:
        import requests

        from tests.pacs.conftest import USER

        self.session = requests.Session()
        self.session.auth = (USER, orthanc.password)
        self.root = orthanc.http_root

    def __call__(self, method: str, path: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", 60)
        r = self.session.request(method, f"{self.root}{path}", **kwargs)
        if r.status_code != 200:
            raise SystemExit(f"Orthanc: {method} {path}: {r.status_code} {r.text[:500]}")
        return r.json() if "json" in r.headers.get("Content-Type", "") else r.content

    def lookup(self, uid: str, kind: str) -> str:
        found = [m["ID"] for m in self("POST", "/tools/lookup", data=uid)
                 if m["Type"] == kind]
        if len(found) != 1:
            raise SystemExit(f"Orthanc: {kind} {uid}: {found}")
        return str(found[0])

    def modalities(self, study_id: str) -> set[str]:
        return {s["MainDicomTags"].get("Modality", "")
                for s in self("GET", f"/studies/{study_id}/series")}


def start_node(out: Path, log: Path, port: int, dicom_port: int, args: argparse.Namespace
               ) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "medseg.cli", "listen", "-o", str(out), "--port", str(port),
           "--host", "127.0.0.1", "--ae-title", NODE_AET, "--allow", ORTHANC_AET,
           "--send-to", f"{ORTHANC_AET}@127.0.0.1:{dicom_port}",
           "--quiet-time", f"{args.quiet_time:g}", "--method", args.method]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 300
    while "listening as" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_node(proc)
            raise SystemExit(f"medseg listen did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    return proc


def stop_node(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # our own child, by its pid
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def one_round(rest: Rest, orthanc: Any, src: Path, dest: Path, timeout: float
              ) -> tuple[float, float]:
    """Upload a new copy of ``src``, have Orthanc send it to the node: (store, result)."""
    from tests.node.conftest import copy_series, uids

    copy_series(src, dest)  # new Study, Series and SOP instance UIDs
    orthanc.upload(dest)
    study_uid, series_uid = uids(dest)
    series, study = rest.lookup(series_uid, "Series"), rest.lookup(study_uid, "Study")
    t0 = time.monotonic()
    rest("POST", "/modalities/medseg/store", timeout=600,
         json={"Resources": [series], "Synchronous": True})
    sent = time.monotonic()
    while "SEG" not in rest.modalities(study):
        if time.monotonic() - sent > timeout:
            raise SystemExit(f"no SEG in Orthanc {timeout:g} s after the store call")
        time.sleep(0.05)
    done = time.monotonic()
    while "SR" not in rest.modalities(study):  # sent in the same association
        if time.monotonic() - sent > timeout:
            raise SystemExit(f"no SR in Orthanc {timeout:g} s after the store call")
        time.sleep(0.05)
    return sent - t0, done - sent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", type=Path, default=SHARED / "chest-ct-philips-141",
                    help="a folder with one DICOM CT series (default: the Philips chest CT)")
    ap.add_argument("--repeat", type=int, default=3, help="studies sent (default 3)")
    ap.add_argument("--quiet-time", type=float, default=1.0,
                    help="the node's --quiet-time in seconds (default 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="the node's torch threads (default: its own default, all cores)")
    ap.add_argument("--method", choices=["unet", "threshold"], default="unet")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds to wait for the SEG of one study (default 600)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if not args.input.is_dir():
        ap.error(f"no input folder {args.input}")

    from tests.pacs.conftest import _start, free_port

    load = os.getloadavg()[0]
    stores: list[float] = []
    results: list[float] = []
    with tempfile.TemporaryDirectory(prefix="medseg-node-bench-") as tmp:
        root = Path(tmp)
        dicom_port, node_port = free_port(), free_port()
        extra = {"DicomServerEnabled": True, "DicomAet": ORTHANC_AET, "DicomPort": dicom_port,
                 "DicomModalities": {"medseg": [NODE_AET, "127.0.0.1", node_port]},
                 "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
                 "DicomCheckModalityHost": False}
        starter = _start(root / "orthanc", extra)
        orthanc = next(starter)
        node_log = root / "node.log"
        node = None
        try:
            rest = Rest(orthanc)
            node = start_node(root / "out", node_log, node_port, dicom_port, args)
            rest("POST", "/modalities/medseg/echo", json={})
            for i in range(args.repeat):
                store, result = one_round(rest, orthanc, args.input, root / f"copy{i}",
                                          args.timeout)
                stores.append(store)
                results.append(result)
                print(f"round {i + 1}/{args.repeat}: store {store:.2f} s, SEG in Orthanc "
                      f"{result:.2f} s after", file=sys.stderr, flush=True)
            time.sleep(1.0)  # the node logs the send after Orthanc stored the SR
        finally:
            if node is not None:
                stop_node(node)
            starter.close()  # stops our Orthanc by its pid
        node_lines = node_log.read_text(errors="replace").splitlines()

    import medseg

    n_files = len([p for p in args.input.iterdir() if p.suffix == ".dcm"])
    print(f"# medseg DICOM node latency, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"command: python benchmarks/node_latency.py --repeat {args.repeat} --quiet-time "
          f"{args.quiet_time:g} --method {args.method}"
          + (f" --threads {args.threads}" if args.threads else ""))
    print(f"CPU: {lscpu_model()} ({os.cpu_count()} cores); load average {load:.2f} at start")
    print(f"software: medseg {medseg.__version__}, Python {platform.python_version()}, "
          f"Orthanc {_orthanc_version()}")
    print(f"input: {args.input} ({n_files} instances), a new copy (new UIDs) per round")
    print()
    print("| round | Orthanc store call (s) | store return -> SEG in Orthanc (s) |")
    print("|------:|-----------------------:|-----------------------------------:|")
    for i, (s, r) in enumerate(zip(stores, results, strict=True), 1):
        print(f"| {i:5d} | {s:22.2f} | {r:34.2f} |")
    print(f"| median | {statistics.median(stores):21.2f} | "
          f"{statistics.median(results):34.2f} |")
    print()
    print("node log:")
    for line in node_lines:
        print(f"  {line}")
    return 0


def _orthanc_version() -> str:
    from tests.pacs.conftest import ORTHANC

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([str(ORTHANC), "--version"], capture_output=True, text=True,
                             check=False, timeout=10).stdout
        return out.split()[1] if len(out.split()) > 1 else out.strip()
    return "?"


if __name__ == "__main__":
    raise SystemExit(main())
