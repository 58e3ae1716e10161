"""Running a batch: plan from the state database, execute, promote outputs atomically.

Design
------
* **One coordinator, many workers.** The process that runs ``medseg batch`` (the
  coordinator) discovers the studies, owns the state database and the output folder's
  layout; workers only run :func:`run_study`, which segments one study into a staging
  folder and returns a small dict (status, checksums, volumes, error). Arrays never travel
  between processes.
* **Executors.** ``workers == 1`` runs studies in this process, one after the other (no
  Dask start-up cost, the simplest thing to debug). ``workers > 1`` starts a
  ``distributed.LocalCluster`` of that many single-threaded worker *processes* (the GIL and
  torch's process-wide thread pool make threads the wrong unit). ``scheduler`` connects to
  an existing Dask cluster (SLURM, Kubernetes ...); its workers must see the sources and
  the output folder under the same absolute paths (a shared file system).
* **Bounded memory.** At most ``2 x (worker threads)`` studies are submitted at a time
  (at least 2); the next is submitted when one finishes. A 10 000-study cohort never sits
  in the scheduler's memory at once, and every worker still has a study queued behind the
  one it runs.
* **The model is loaded once per worker process**: :func:`worker_model` keeps loaded models
  in a module-level cache keyed by name (Dask runs tasks in long-lived worker processes, so
  the module, and its cache, survive between tasks). ``model_loads`` in each task's result,
  also recorded in the database, says how many loads that process has done.
* **Torch threads**: in-process, torch's default (all cores) unless ``threads`` is given;
  with a local cluster of N workers, ``cpu_count // N`` per worker (1 when N >= cores, so
  workers never oversubscribe the machine); on an external cluster, 1 per task unless
  ``threads`` is given: start workers with one thread each and as many processes as cores.
* **Atomic per-study output.** A study is segmented into ``OUT_DIR/.staging/<id>-<random>/``
  and renamed to ``OUT_DIR/<id>`` by the coordinator only when every file is written and
  checksummed. A folder ``OUT_DIR/<id>`` therefore always holds a complete result. A
  failure removes the staging folder (and any older ``OUT_DIR/<id>``: a failed study has no
  output folder); a killed run leaves only staging folders, which the next run deletes.
  Renames, not copies: the staging folder is inside ``OUT_DIR``, on the same file system.
* **Failures stay per study.** Every exception of a study (medseg errors and unexpected
  ones alike) is caught in :func:`run_study` and recorded; infrastructure failures (a worker
  process killed, e.g. out of memory) are caught by the coordinator. Each failure has a
  kind (:func:`failure_kind`, recorded as ``error_kind``):

  - ``input``: the study is bad (an :class:`~medseg.errors.InputError`: a corrupt file, the
    wrong modality; a SEG that cannot be built from it). The same input fails the same way
    every time: not retried within the run, only by a later run (after a fix, possibly), up
    to ``max_attempts`` attempts in total.
  - ``machine``: the machine failed, not the study (an ``OSError`` from the system such as
    ENOSPC, EACCES or EIO, also wrapped in an ``OutputError``; ``MemoryError``; a worker
    process that died; a PACS that does not answer or refuses the credentials). It spends no
    attempt: it is retried at once within the run (at most ``max_attempts`` tries per run,
    so a full disk cannot loop), and every later run tries it again, e.g. after space was
    freed.
  - ``unexpected``: anything else (a bug); may be transient, so retried at once within the
    run while attempts remain; spends attempts.
* **One run per output folder**: an exclusive ``flock`` on ``OUT_DIR/batch.lock`` (released
  by the kernel when the process dies, so a killed run never blocks the next).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import secrets
import shutil
import socket
import threading
import time
import traceback
from asyncio import CancelledError
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.batch.sources import StudySpec, discover_studies
from medseg.batch.state import (
    StateDB,
    StudyRow,
    checksum_folder,
    hold_lock,
    utc_now,
    verify_outputs,
)
from medseg.conventions import METHODS, OUTPUT_NAMES
from medseg.errors import (
    ConfigError,
    InputError,
    MedsegError,
    OutputError,
    PacsAuthError,
    PacsConnectionError,
    PacsNotFoundError,
)

__all__ = [
    "STAGING_NAME",
    "STATE_NAME",
    "BatchConfig",
    "BatchResult",
    "Progress",
    "StudyTask",
    "failure_kind",
    "model_loads",
    "model_name",
    "run_batch",
    "run_study",
    "worker_model",
]

STATE_NAME = "batch.sqlite"
STAGING_NAME = ".staging"
LOCK_NAME = "batch.lock"
#: Kinds of failure (see the module docstring and :data:`medseg.batch.state.ERROR_KINDS`).
INPUT, MACHINE, UNEXPECTED = "input", "machine", "unexpected"


@dataclass(frozen=True)
class BatchConfig:
    """What ``medseg batch`` and a ``job: batch`` pipeline file describe.

    ``source``: a folder of studies or a manifest ``.csv`` (see :mod:`medseg.batch.sources`);
    ``out_dir``: where ``<study_id>/``, ``summary.csv``, ``batch.sqlite`` and
    ``validation/`` go; ``workers``: 1 runs in-process, N > 1 starts a local Dask cluster;
    ``scheduler``: address of an existing Dask scheduler (then ``workers`` must stay 1);
    ``reference_dir``: reference labels ``<id>.nii.gz`` for validation; ``method``, ``model``
    as for ``medseg segment``; ``max_attempts``: tries per study over all runs;
    ``threads``: torch threads per study (default: see the module docstring);
    ``show_phi``: patient name/ID/date in the reports; ``remote``: for a ``source`` that is
    not a folder or a manifest (a URL), the :class:`~medseg.batch.sources.RemoteSource`
    that finds, fetches and (optionally) stores back its studies, e.g. a DICOMweb server
    (:func:`medseg.pacs.batch.make_job`; ``medseg batch dicomweb+URL`` makes it). batch
    never imports the packages that provide remote sources: they use batch's public API.
    ``device``: where the network runs (``cpu``, ``auto``, ``cuda``, ``cuda:N``; with
    several GPUs, local Dask worker N takes GPU N modulo their count); not part of a
    study's parameters (a study done on the CPU is not redone on a GPU).
    """

    source: str
    out_dir: str
    workers: int = 1
    scheduler: str | None = None
    reference_dir: str | None = None
    method: str = "unet"
    model: str | None = None
    max_attempts: int = 2
    threads: int | None = None
    show_phi: bool = False
    reference_labels: str = "auto"
    remote: Any = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        # ValueError: from_mapping turns it into a ConfigError naming the pipeline file.
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if self.scheduler and self.workers != 1:
            raise ValueError("give workers or scheduler, not both: with a scheduler the "
                             "cluster's workers run the studies")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got "
                             f"{self.method!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.method == "threshold" and self.model is not None:
            raise ValueError("model applies to method unet, not threshold")
        from medseg.evaluate.labels import LabelConvention

        LabelConvention.parse(self.reference_labels)  # ConfigError naming the bad part
        from medseg.inference.device import device_argument

        try:
            device_argument(self.device)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"device {exc}") from exc
        if self.remote is None and "://" in str(self.source):
            raise ValueError(f"source {self.source!r} is a URL: it needs a remote source "
                             "(for a DICOMweb server, run it as 'medseg batch dicomweb+URL' "
                             "or pass remote=medseg.pacs.batch.make_job(source, options))")


@dataclass(frozen=True)
class StudyTask:
    """Everything a worker needs for one study (pickled to the worker: small, paths only)."""

    study_id: str
    source: str
    reference: str | None
    staging: str
    method: str
    model: str | None
    threads: int | None
    show_phi: bool
    remote: Any = None  # the batch's RemoteSource (picklable), for a remote source
    reference_labels: str = "auto"
    device: str = "cpu"


# -- worker side ----------------------------------------------------------------------------

_MODELS: dict[str, Any] = {}
_MODEL_LOADS = 0
_MODEL_LOCK = threading.Lock()


def worker_model(name: str) -> Any:
    """The loaded model ``name`` of this process, loaded on first use and kept: one load per
    worker process, however many studies it runs."""
    global _MODEL_LOADS
    with _MODEL_LOCK:
        model = _MODELS.get(name)
        if model is None:
            from medseg import _alloc
            from medseg.models import load_model

            _alloc.tune()  # a worker process runs many studies: reuse freed memory
            model = load_model(name)
            _alloc.freeze_heap()  # the libraries and the model: no collection walks them
            _MODELS[name] = model
            _MODEL_LOADS += 1
    return model


def model_loads() -> int:
    """How many models this process has loaded (tests check it stays at one)."""
    return _MODEL_LOADS


def _worker_device(device: str) -> str:
    """The device of this worker process: with several GPUs, a Dask worker named N (a
    local cluster's) pins GPU N modulo their count."""
    if device == "cpu":
        return device
    from medseg.inference.device import worker_device

    index = None
    with contextlib.suppress(ImportError, ValueError):
        from distributed import get_worker

        name = get_worker().name
        index = int(name) if str(name).isdigit() else None
    return worker_device(device, index)


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _study_result(staging: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """The small per-study result recorded in the database: volumes, warnings, Dice, the QC
    verdict and its reasons."""
    dice = None
    report = staging / "report.json"
    if report.is_file():
        metrics = json.loads(report.read_text(encoding="utf-8")).get("metrics")
        if metrics:
            dice = {label: m.get("dice") for label, m in metrics.items()}
    qc = summary.get("qc") or {}
    return {"volumes_ml": summary["volumes_ml"], "warnings": list(summary["warnings"]),
            "dice": dice, "qc_verdict": qc.get("verdict"),
            "qc_reasons": list(qc.get("reasons") or [])}


def _caused_by_the_system(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, is an error of the operating
    system (an ``OSError`` with an errno: no space, no permission, I/O error ...) or memory.
    An ``OSError`` without an errno (e.g. ``gzip.BadGzipFile``) is about the data."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno is not None):
            return True
        e = e.__cause__
    return False


def failure_kind(exc: BaseException) -> str:
    """``"input"``, ``"machine"`` or ``"unexpected"``: whose fault a study's failure is
    (see the module docstring)."""
    if isinstance(exc, (InputError, ConfigError, PacsNotFoundError)):
        return INPUT
    if isinstance(exc, (PacsConnectionError, PacsAuthError)) or _caused_by_the_system(exc):
        return MACHINE
    if isinstance(exc, OutputError):  # not the system's: the SEG/SR cannot be made of it
        return INPUT
    return UNEXPECTED


def run_study(task: StudyTask) -> dict[str, Any]:
    """Segment one study into ``task.staging`` (runs on a worker). Never raises for a
    problem of the study: returns ``{"status": "done", "outputs": {name: {sha256, size}},
    "result": ...}`` or ``{"status": "failed", "error_type", "error_message", "error_kind",
    "traceback", "retryable"}``, with ``started_at``, ``seconds``, ``worker`` and
    ``model_loads``."""
    from medseg.segment import segment_study

    started_at, t0 = utc_now(), time.perf_counter()
    staging = Path(task.staging)
    out: dict[str, Any] = {"study_id": task.study_id, "started_at": started_at,
                           "worker": _worker_name()}
    try:
        model = worker_model(task.model) if task.method == "unet" and task.model else None
        segment = functools.partial(segment_study, out_dir=staging, method=task.method,
                                    model=model, threads=task.threads,
                                    device=_worker_device(task.device),
                                    reference=task.reference, study_id=task.study_id,
                                    reference_labels=task.reference_labels,
                                    show_phi=task.show_phi)
        extra: dict[str, Any] = {}
        if task.remote is None:
            res = segment(task.source)
        else:  # fetch the study first (and store the SEG and SR back after, if asked)
            res, extra = task.remote.run_study(task.source, staging, segment)
        out.update(status="done", outputs=checksum_folder(staging),
                   result={**_study_result(staging, res.summary), **extra})
    except Exception as exc:  # noqa: BLE001 - one study's failure must never stop the others
        shutil.rmtree(staging, ignore_errors=True)
        expected = isinstance(exc, MedsegError)
        message = str(exc)
        if not expected or task.source not in message:
            message = f"{task.source}: {message}"
        kind = failure_kind(exc)
        out.update(status="failed", error_type=type(exc).__name__, error_message=message,
                   error_kind=kind, traceback=None if expected else traceback.format_exc(),
                   retryable=kind != INPUT)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["model_loads"] = _MODEL_LOADS
    return out


def _worker_versions() -> dict[str, str]:
    """Run on every worker of an external cluster before any study: medseg must be there."""
    from medseg._version import __version__

    return {"medseg": __version__, "worker": _worker_name()}


# -- executors -------------------------------------------------------------------------------


class _InProcess:
    """Runs tasks here, one at a time, when the coordinator asks for the next result."""

    def __init__(self) -> None:
        self._queue: deque[StudyTask] = deque()

    def capacity(self) -> int:
        return 1

    def submit(self, task: StudyTask) -> None:
        self._queue.append(task)

    def next_result(self) -> tuple[StudyTask, dict[str, Any]]:
        task = self._queue.popleft()
        return task, run_study(task)

    def cancel(self) -> list[StudyTask]:
        pending = list(self._queue)
        self._queue.clear()
        return pending

    def close(self) -> None:
        return None


class _Dask:
    """Submits tasks to a Dask cluster (a local one it owns, or an existing scheduler)."""

    def __init__(self, client: Any, cluster: Any = None) -> None:
        from distributed import as_completed

        self.client = client
        self.cluster = cluster
        self._completed = as_completed()
        self._tasks: dict[str, StudyTask] = {}
        self._futures: dict[str, Any] = {}

    def capacity(self) -> int:
        return max(2, 2 * sum(self.client.nthreads().values()))

    def submit(self, task: StudyTask) -> None:
        key = f"medseg-batch-{task.study_id}-{secrets.token_hex(4)}"
        fut = self.client.submit(run_study, task, key=key, pure=False, retries=0)
        self._tasks[key] = task
        self._futures[key] = fut
        self._completed.add(fut)

    def next_result(self) -> tuple[StudyTask, dict[str, Any]]:
        fut = next(self._completed)
        task = self._tasks.pop(fut.key)
        self._futures.pop(fut.key, None)
        try:
            result = dict(fut.result())
        except (Exception, CancelledError) as exc:  # noqa: BLE001 - a lost task is a failure
            result = _lost_task(task, exc)
        finally:
            fut.release()
        return task, result

    def cancel(self) -> list[StudyTask]:
        futures = list(self._futures.values())
        if futures:
            self.client.cancel(futures)
        tasks = list(self._tasks.values())
        self._tasks.clear()
        self._futures.clear()
        return tasks

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close()


def _lost_task(task: StudyTask, exc: BaseException) -> dict[str, Any]:
    """The result of a task that did not come back (its worker died, it was cancelled, it
    could not be unpickled): a failure of the machine, retryable."""
    name = type(exc).__name__
    if name == "KilledWorker":
        reason = ("the worker process died while running this study (out of memory?); "
                  f"Dask says: {exc}")
    else:
        reason = f"the task did not complete: {name}: {exc}"
    return {"study_id": task.study_id, "status": "failed", "error_type": name,
            "error_message": f"{task.source}: {reason}",
            "error_kind": MACHINE,
            "traceback": "".join(traceback.format_exception(exc)), "retryable": True,
            "started_at": None, "seconds": None, "worker": None, "model_loads": None}


def _local_cluster(workers: int) -> _Dask:
    import logging

    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR)
    try:
        client = Client(cluster)
    except BaseException:
        cluster.close()
        raise
    return _Dask(client, cluster)


def _remote_cluster(address: str) -> _Dask:
    from distributed import Client

    try:
        client = Client(address, timeout="30s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise ConfigError(f"cannot connect to the Dask scheduler at {address}: {exc}") \
            from exc
    try:
        versions = client.run(_worker_versions)
    except Exception as exc:  # any failure here means the workers are unusable
        client.close()
        raise ConfigError(f"the workers of {address} cannot run medseg (is it installed in "
                          f"their environment?): {type(exc).__name__}: {exc}") from exc
    from medseg._version import __version__

    wrong = sorted({v["medseg"] for v in versions.values()} - {__version__})
    if wrong:
        client.close()
        raise ConfigError(f"workers of {address} run medseg {', '.join(wrong)}, this is "
                          f"{__version__}: install the same version everywhere")
    return _Dask(client)


# -- the coordinator ---------------------------------------------------------------------


@dataclass
class Progress:
    """Counts over the batch's studies, passed to the progress callback after each change.
    ``started`` is how many were already finished (done or failed for good) when this run
    began processing, so a rate and an ETA can be taken over this run's work only."""

    total: int
    done: int
    failed: int
    started: int


@dataclass
class BatchResult:
    """What a run did. ``rows`` are the batch's studies in discovery order, as recorded."""

    out_dir: Path
    studies: list[StudySpec]
    rows: list[StudyRow]
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    exhausted: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)
    validation: Any = None
    seconds: float = 0.0

    @property
    def done(self) -> list[StudyRow]:
        return [r for r in self.rows if r.status == "done"]

    @property
    def failed(self) -> list[StudyRow]:
        return [r for r in self.rows if r.status != "done"]


def _exclusive(out: Path) -> contextlib.AbstractContextManager[None]:
    """Hold ``OUT_DIR/batch.lock``: two runs into one folder would delete each other's
    staging folders."""
    return hold_lock(out / LOCK_NAME, "another 'medseg batch' is writing into this folder; "
                     "wait for it or use another output folder")


#: What a study folder may hold: the outputs of ``segment_study`` and its temporary files.
_OUTPUT_NAMES = frozenset(OUTPUT_NAMES)


def _is_study_output(path: Path) -> bool:
    """Whether ``path`` holds nothing but study outputs (or is empty): their files, partial
    files, and the lock, staging and commit folders of an interrupted ``medseg segment``."""
    from medseg.io.atomic import is_unit_leftover

    return all((p.is_file() and (p.name in _OUTPUT_NAMES or ".partial" in p.name))
               or is_unit_leftover(p.name) for p in path.iterdir())


def _remove(path: Path, trash: Path) -> None:
    """Delete a study folder: first renamed into the staging area (atomic), then deleted,
    so a run killed during a slow delete leaves only a staging leftover. A folder that
    holds anything but study outputs is never deleted: with ``-o`` pointing at a folder
    with other content, a study id could name the user's own data."""
    if path.is_dir() and not path.is_symlink():
        if not _is_study_output(path):
            raise OutputError("exists and holds files that are not medseg outputs: not "
                              "replacing it; use an empty or dedicated output folder",
                              path=path)
        trash.mkdir(parents=True, exist_ok=True)
        old = trash / f"{path.name}-old-{secrets.token_hex(4)}"
        os.replace(path, old)
        shutil.rmtree(old, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _promote(staging: Path, final: Path, trash: Path) -> None:
    """Rename a complete staging folder to the study's folder, replacing an older one."""
    if final.exists() or final.is_symlink():
        _remove(final, trash)
    os.replace(staging, final)


def model_name(model: str | None) -> str:
    """The name workers load ``model`` by: the default model when ``None``, a card or
    weights file on disk as an absolute path (workers have another current directory)."""
    from medseg.inference import DEFAULT_MODEL

    name = model or DEFAULT_MODEL
    return os.path.abspath(name) if Path(name).suffix in (".json", ".pt") else name


def _resolve_model(config: BatchConfig) -> tuple[str | None, str]:
    """The model name to send to workers (an absolute path for a card on disk) and the
    parameters fingerprint: a done study is reused only if it was made with the same
    method, model (its name and weights' SHA-256, however it was named on the command line)
    and PHI setting. The model is loaded here once, so an unknown model fails before any
    study is submitted (and, in-process, this is the only load)."""
    name: str | None = None
    model: dict[str, str] | None = None
    if config.method == "unet":
        name = model_name(config.model)
        loaded = worker_model(name)
        model = {"name": loaded.spec.name, "sha256": loaded.sha256}
    fingerprint: dict[str, Any] = {"method": config.method, "model": model,
                                   "show_phi": config.show_phi}
    if config.reference_labels != "auto":  # the reports' metrics read references otherwise
        fingerprint["reference_labels"] = config.reference_labels
    if config.remote is not None and config.remote.pushes:  # stored back: a new result
        fingerprint["push"] = True
    params = json.dumps(fingerprint, sort_keys=True)
    return name, params


def _default_threads(config: BatchConfig, n_workers: int) -> int | None:
    """Torch threads per study (see the module docstring); ``None``: torch's default."""
    if config.threads is not None:
        return config.threads
    if config.scheduler:
        return 1
    if n_workers > 1:
        return max(1, (os.cpu_count() or 1) // n_workers)
    return None


def _plan(db: StateDB, studies: list[StudySpec], params: str, out: Path, max_attempts: int,
          log: Callable[[str], None]) -> tuple[list[StudySpec], list[str], list[str]]:
    """Register the studies; return (to run, already done and verified, out of attempts).
    A study that is not done never keeps an ``OUT_DIR/<id>`` folder."""
    todo: list[StudySpec] = []
    skipped: list[str] = []
    exhausted: list[str] = []
    trash = out / STAGING_NAME
    for s in studies:
        if db.sync(s.study_id, s.source, s.reference, params) == "changed":
            log(f"{s.study_id}: its source, reference or parameters changed since the last "
                "run: segmenting it again")
        row = db.get(s.study_id)
        assert row is not None
        if row.status == "done":
            problem = verify_outputs(out / s.study_id, row.outputs)
            if problem is None:
                skipped.append(s.study_id)
                continue
            log(f"{s.study_id}: {problem}: segmenting it again")
            db.reset(s.study_id, problem)
            row = db.get(s.study_id)
            assert row is not None
        _remove(out / s.study_id, trash)
        if row.status == "failed" and row.attempts >= max_attempts:
            exhausted.append(s.study_id)
        else:
            todo.append(s)
    return todo, skipped, exhausted


def _record(db: StateDB, task: StudyTask, res: dict[str, Any], out: Path) -> dict[str, Any]:
    """Promote a finished study's staging folder and record the outcome; returns ``res``
    (turned into a failure if the promotion itself failed)."""
    staging = Path(task.staging)
    if res.get("status") == "done":
        # Checked here, by the process that records the checksums: on a cluster whose
        # workers do not share OUT_DIR with this machine, the staging folder here is empty.
        problem = verify_outputs(staging, res.get("outputs") or {})
        try:
            if problem is not None:
                raise OutputError(
                    f"the worker's outputs are not visible here ({problem}): do the workers "
                    "see the output folder under the same path (a shared file system)?",
                    path=staging)
            _promote(staging, out / task.study_id, out / STAGING_NAME)
        except OutputError as exc:  # the shared file system or the folder: not the study
            res = dict(res, status="failed", error_type="OutputError", retryable=True,
                       error_kind=MACHINE, traceback=None, error_message=str(exc))
        except OSError as exc:
            res = dict(res, status="failed", error_type="OutputError", retryable=True,
                       error_kind=MACHINE, traceback=None, error_message=str(OutputError(
                           f"cannot move the finished study into place: {exc.strerror}",
                           path=out / task.study_id)))
        else:
            db.mark_done(task.study_id, res["outputs"], started_at=res.get("started_at"),
                         seconds=res.get("seconds"), worker=res.get("worker"),
                         model_loads=res.get("model_loads"), result=res.get("result") or {})
            return res
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OutputError):  # not ours to delete: the failure is recorded
        _remove(out / task.study_id, out / STAGING_NAME)
    kind = res.get("error_kind") or UNEXPECTED
    db.mark_failed(task.study_id, str(res.get("error_type") or "Error"),
                   str(res.get("error_message") or ""), error_kind=kind,
                   spend_attempt=kind != MACHINE, traceback=res.get("traceback"),
                   started_at=res.get("started_at"), seconds=res.get("seconds"),
                   worker=res.get("worker"), model_loads=res.get("model_loads"))
    return res


@dataclass
class _Run:
    """What one run of :func:`run_batch` works with: the state, the settings every task gets,
    where outputs go, and the status, progress and log it keeps up to date."""

    db: StateDB
    config: BatchConfig
    model: str | None
    threads: int | None
    out: Path
    status: dict[str, str]
    report: Callable[[], None]
    log: Callable[[str], None]


def _execute(run: _Run, executor: Any, todo: list[StudySpec]) -> list[str]:
    """Run ``todo`` with at most ``executor.capacity()`` studies in flight; returns the ids
    processed. On Ctrl-C (or an error of the whole batch) the in-flight studies are
    cancelled, their staging folders removed and their attempts given back."""
    db, config, out, status, log = run.db, run.config, run.out, run.status, run.log
    queue = deque(todo)
    in_flight: dict[str, StudyTask] = {}
    processed: list[str] = []
    machine_tries: dict[str, int] = {}  # this run's machine failures per study (no attempts)
    staging_root = out / STAGING_NAME
    try:
        while queue or in_flight:
            while queue and len(in_flight) < executor.capacity():
                s = queue.popleft()
                db.mark_running(s.study_id)
                staging = staging_root / f"{s.study_id}-{secrets.token_hex(4)}"
                try:
                    staging.mkdir(parents=True)
                except OSError as exc:
                    db.release(s.study_id)
                    raise OutputError(f"cannot create a staging folder: {exc.strerror}",
                                      path=staging) from exc
                task = StudyTask(study_id=s.study_id, source=s.source, reference=s.reference,
                                 staging=str(staging), method=config.method, model=run.model,
                                 threads=run.threads, show_phi=config.show_phi,
                                 remote=config.remote,
                                 reference_labels=config.reference_labels,
                                 device=config.device)
                in_flight[s.study_id] = task
                executor.submit(task)
            task, res = executor.next_result()
            in_flight.pop(task.study_id, None)
            res = _record(db, task, res, out)
            processed.append(task.study_id)
            status[task.study_id] = str(res["status"])
            row = db.get(task.study_id)
            again = None
            if res["status"] == "failed" and res.get("error_kind") == MACHINE:
                tries = machine_tries[task.study_id] = machine_tries.get(task.study_id, 0) + 1
                if tries < config.max_attempts:
                    again = (f"a failure of the machine, not the study: trying again (try "
                             f"{tries + 1} of {config.max_attempts} in this run)")
            elif (res["status"] == "failed" and res.get("retryable") and row is not None
                    and row.attempts < config.max_attempts):
                again = f"trying again (attempt {row.attempts + 1} of {config.max_attempts})"
            if again is not None:
                log(f"{task.study_id}: {res['error_type']}: {again}")
                status[task.study_id] = "retrying"
                queue.append(next(s for s in todo if s.study_id == task.study_id))
            run.report()
    except BaseException:  # Ctrl-C, or a problem of the whole batch: stop cleanly
        executor.cancel()
        for task in in_flight.values():
            db.release(task.study_id)
            shutil.rmtree(task.staging, ignore_errors=True)
        raise
    return processed


def run_batch(config: BatchConfig, *, progress: Callable[[Progress], None] | None = None,
              log: Callable[[str], None] | None = None) -> BatchResult:
    """Run (or resume) the batch ``config`` describes; see the module docstring. Raises a
    :class:`~medseg.errors.MedsegError` only for problems of the whole batch (no studies,
    an unknown model, an unreachable scheduler, an unwritable output folder); a study's
    failure is recorded, and reported in the result."""
    from medseg.batch.summary import write_summary, write_validation

    t0 = time.monotonic()
    say = log or (lambda _msg: None)
    out = Path(os.path.abspath(config.out_dir))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder: {exc.strerror}", path=out) \
            from exc
    with _exclusive(out):
        remote = config.remote
        if remote is not None:
            studies = remote.discover(config.reference_dir)
        else:
            studies = discover_studies(config.source, reference_dir=config.reference_dir,
                                       exclude=out)
        if not config.scheduler:  # this machine's workers: a GPU that is not here fails now
            from medseg.inference.device import resolve_device

            resolve_device(config.device)
        model, params = _resolve_model(config)
        with StateDB(out / STATE_NAME) as db:
            interrupted = db.recover_interrupted()
            if interrupted:
                say(f"{len(interrupted)} studies were being processed when the last run "
                    f"stopped: {', '.join(interrupted)}")
            staging_root = out / STAGING_NAME
            leftovers = sorted(staging_root.iterdir()) if staging_root.is_dir() else []
            if leftovers:
                say(f"removing {len(leftovers)} incomplete staging folder(s) of an earlier "
                    "run")
            shutil.rmtree(staging_root, ignore_errors=True)
            if remote is not None:
                shutil.rmtree(out / remote.cache_name, ignore_errors=True)
            todo, skipped, exhausted = _plan(db, studies, params, out, config.max_attempts,
                                             say)
            # "pending" for what this run will do, the recorded status for the rest
            status = {r.study_id: r.status for r in db.rows(s.study_id for s in studies)}
            status.update({s.study_id: "pending" for s in todo})
            started = len(studies) - len(todo)

            def report() -> None:
                if progress is not None:
                    counts = list(status.values())
                    progress(Progress(total=len(studies), done=counts.count("done"),
                                      failed=counts.count("failed"), started=started))

            report()
            processed: list[str] = []
            if todo:
                n_workers = min(config.workers, len(todo))
                threads = _default_threads(config, n_workers)
                if config.scheduler:
                    executor: Any = _remote_cluster(config.scheduler)
                elif n_workers > 1:
                    executor = _local_cluster(n_workers)
                else:
                    executor = _InProcess()
                try:
                    run = _Run(db=db, config=config, model=model, threads=threads, out=out,
                               status=status, report=report, log=say)
                    processed = _execute(run, executor, todo)
                finally:
                    executor.close()
            rows = db.rows(s.study_id for s in studies)
        result = BatchResult(out_dir=out, studies=studies, rows=rows,
                             processed=list(dict.fromkeys(processed)), skipped=skipped,
                             exhausted=exhausted, interrupted=interrupted)
        result.outputs["summary"] = write_summary(out, rows)
        validation = write_validation(out, rows, say,
                                      reference_labels=config.reference_labels)
        if validation is not None:
            result.validation = validation
            result.outputs.update({f"validation_{k}": v for k, v in
                                   validation.outputs.items()})
        shutil.rmtree(out / STAGING_NAME, ignore_errors=True)
        if remote is not None:
            shutil.rmtree(out / remote.cache_name, ignore_errors=True)
        result.seconds = time.monotonic() - t0
    return result
