"""Fixtures of the DICOM node tests: a node running in a thread of the test process (fast,
the model loaded once per session), a C-STORE sender and a receiving Storage SCP (the
destination of the results), both pynetdicom, and phantom series to send."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts

from medseg.node.service import Node, NodeConfig
from tests.pacs.conftest import free_port

#: Short enough for tests, long enough that one C-STORE after another never looks quiet.
QUIET = 0.6


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    """Poll ``check`` until it returns something true; fail naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def series_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".dcm")


def copy_series(src: Path, dest: Path, *, modality: str | None = None,
                sop_class: str | None = None, image_type: Sequence[str] | None = None,
                keep: int | None = None) -> Path:
    """``src`` as a new study and series (new UIDs), optionally another modality/SOP
    class/ImageType, or only the first ``keep`` instances."""
    dest.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for n, f in enumerate(series_files(src)[:keep]):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if modality is not None:
            ds.Modality = modality
        if sop_class is not None:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        if image_type is not None:
            ds.ImageType = list(image_type)
        ds.save_as(dest / f"{n:04d}.dcm", enforce_file_format=True)
    return dest


def uids(folder: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(series_files(folder)[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def send_series(port: int, folder: Path | Sequence[Path], *, calling: str = "SENDER",
                called: str = "MEDSEG", abort_after: int | None = None) -> list[int]:
    """C-STORE every file of ``folder`` (or the given files) in one association, released
    at the end (or aborted after ``abort_after`` instances); the statuses."""
    files = series_files(folder) if isinstance(folder, Path) else list(folder)
    ae = AE(ae_title=calling)
    classes = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files}
    for c in sorted(classes):
        ae.add_requested_context(c)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, f"association {calling} -> {called} not established"
    statuses = []
    for n, f in enumerate(files):
        if abort_after is not None and n == abort_after:
            assoc.abort()
            return statuses
        status = assoc.send_c_store(f)
        statuses.append(int(status.Status) if "Status" in status else -1)
    assoc.release()
    return statuses


@dataclass
class Receiver:
    """A Storage SCP that keeps what it receives (the node's destination)."""

    port: int
    ae_title: str = "DEST"
    received: list[pydicom.Dataset] = field(default_factory=list)
    server: Any = None

    def start(self) -> Receiver:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = StoragePresentationContexts

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received.append(ds)
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def modalities(self) -> list[str]:
        return sorted(str(ds.Modality) for ds in self.received)


@dataclass
class RunningNode:
    node: Node
    stop: threading.Event
    thread: threading.Thread
    logs: list[str]
    error: list[Exception]

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def out(self) -> Path:
        return self.node.out

    def series(self) -> dict[str, Any]:
        assert self.node.state is not None
        return {r.series_uid: r for r in self.node.state.all_series()}

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=120)
        assert not self.thread.is_alive(), "the node did not stop"
        if self.error:
            raise self.error[0]


@pytest.fixture
def start_node() -> Iterator[Callable[..., RunningNode]]:
    """``start_node(out_dir, port=0, **NodeConfig keys)``: a node on ``port`` (0: a free
    one), serving in a thread of this process (stopped at teardown)."""
    running: list[RunningNode] = []

    def start(out: Path, *, port: int = 0, **kwargs: Any) -> RunningNode:
        kwargs.setdefault("allow", ["SENDER"])
        kwargs.setdefault("quiet_time", QUIET)
        kwargs.setdefault("threads", 1)
        logs: list[str] = []
        node = Node(NodeConfig(out_dir=str(out), port=port, host="127.0.0.1", **kwargs),
                    log=logs.append)
        node.start()
        stop = threading.Event()
        error: list[Exception] = []

        def serve() -> None:
            try:
                node.serve_forever(stop)
            except Exception as exc:  # noqa: BLE001 - reported by close()
                error.append(exc)
            finally:
                node.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        r = RunningNode(node=node, stop=stop, thread=thread, logs=logs, error=error)
        running.append(r)
        return r

    yield start
    for r in running:
        if r.thread.is_alive():
            r.stop.set()
            r.thread.join(timeout=120)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(port=free_port()).start()
    yield r
    r.stop()


@pytest.fixture
def phantom_series(phantom_pool: Callable[[int], Path], tmp_path: Path
                   ) -> Callable[..., Path]:
    """``phantom_series(seed, **copy_series options)``: a phantom's DICOM series as a new
    study (fresh UIDs) in the test's folder."""
    count = [0]

    def make(seed: int, **kwargs: Any) -> Path:
        count[0] += 1
        return copy_series(phantom_pool(seed) / "dicom", tmp_path / "send" /
                           f"s{count[0]}-seed{seed}", **kwargs)

    return make


def clear(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
