"""``medseg batch`` and ``medseg run <job: batch pipeline>``: argument parsing, progress
and the printed summary. The work is :func:`medseg.batch.runner.run_batch`. This module is
part of the command line, above both ``medseg.batch`` and ``medseg.pacs``: it turns a
``dicomweb+URL`` SOURCE and its options into the remote source the runner is given
(:func:`medseg.pacs.batch.make_job`), so that batch never imports pacs.

Output streams: the progress bar and notes go to stderr (the bar only on a terminal and
without ``-q``); the cohort summary goes to stdout (not with ``-q``); the table of failed
studies always goes to stderr, since those are errors. Exit status 1 when any study of the
batch is failed (this run's failures and those out of attempts from earlier runs), else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from medseg.batch.runner import BatchConfig, BatchResult, Progress, run_batch
from medseg.batch.state import ERROR_KINDS, StudyRow
from medseg.conventions import METHODS, Method
from medseg.errors import ConfigError
from medseg.inference import DEFAULT_MODEL
from medseg.inference.device import DEVICE_HELP, device_argument
from medseg.pacs.cli import add_batch_arguments, batch_options
from medseg.pacs.options import PacsBatchOptions, is_dicomweb_source

__all__ = ["config_from_yaml", "positive_int", "register", "run_config"]

EXIT_OK = 0
EXIT_FAILED = 1


class _BatchProgress:
    """One line on stderr, redrawn in place: done/failed/total and an ETA from this run's
    pace. Silent with ``-q`` or when stderr is not a terminal (logs, CI, cron)."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.start = time.monotonic()
        self._drawn = False

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        finished = p.done + p.failed
        elapsed = time.monotonic() - self.start
        this_run = finished - p.started
        eta = f"{elapsed / this_run * (p.total - finished):.0f} s" if this_run > 0 else "?"
        width = 30
        bar = "#" * int(width * finished / max(p.total, 1))
        print(f"\rbatch [{bar:<{width}}] {p.done}/{p.total} done, {p.failed} failed, "
              f"{elapsed:.0f} s, ETA {eta}  ", end="", file=self.stream, flush=True)
        self._drawn = finished < p.total
        if not self._drawn:
            print(file=self.stream)

    def note(self, message: str) -> None:
        if self._drawn:
            print("\r\033[K", end="", file=self.stream)
        print(f"medseg: note: {message}", file=self.stream, flush=True)

    def finish(self) -> None:
        if self._drawn:
            print(file=self.stream)
            self._drawn = False


def _studies(count: int) -> str:
    return f"{count} study" if count == 1 else f"{count} studies"


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _kinds(failed: list[StudyRow]) -> str:
    """`` (1 input, 2 machine)``: the failures by kind (``error_kind``), or nothing."""
    counts = Counter(r.error_kind or "unknown" for r in failed)
    order = [*ERROR_KINDS, "unknown"]
    return f" ({', '.join(f'{counts[k]} {k}' for k in order if counts[k])})" if counts else ""


def _print_summary(result: BatchResult) -> None:
    done, failed = result.done, result.failed
    print(f"batch: {_studies(len(result.rows))} in {result.out_dir}: {len(done)} done "
          f"({len(set(result.processed) & {r.study_id for r in done})} this run, "
          f"{len(result.skipped)} already done), {len(failed)} failed{_kinds(failed)}; "
          f"{result.seconds:.1f} s")
    totals = [float(r.result["volumes_ml"]["total"]) for r in done
              if r.result.get("volumes_ml")]
    if totals:
        print(f"  lung volume, both lungs (mL): median {statistics.median(totals):.0f}, "
              f"range {min(totals):.0f}-{max(totals):.0f} ({_studies(len(totals))})")
    times = [r.seconds for r in done if r.seconds is not None and r.study_id in
             result.processed]
    if times:
        print(f"  seconds per study this run: median {statistics.median(times):.1f}, "
              f"max {max(times):.1f}")
    review = [r for r in done if r.result.get("qc_verdict") == "review"]
    if review:
        width = max(len(r.study_id) for r in review)
        print(f"  review first: {_studies(len(review))} whose mask the quality check doubts "
              "(summary.csv lists them first, with the reasons):")
        for r in review[:20]:
            first = (r.result.get("qc_reasons") or [""])[0]
            print(f"    {r.study_id:<{width}}  {first[:100]}")
        if len(review) > 20:
            print(f"    ... and {len(review) - 20} more")
    n_warn = sum(1 for r in done if r.result.get("warnings"))
    if n_warn:
        print(f"  {_studies(n_warn)} with warnings (see the 'warnings' column of "
              "summary.csv)")
    if result.validation is not None:
        acc = result.validation.accumulator
        dice = acc.summary().get("lung", {}).get("dice")
        if dice is not None:
            print(f"  Dice vs reference, both lungs: mean {_fmt(dice.mean)}, median "
                  f"{_fmt(dice.median)}, {dice.n_failed} failed of {dice.n} "
                  "(failures scored as empty predictions)")
    print("wrote " + ", ".join(str(p) for k, p in result.outputs.items()
                               if k in ("summary", "validation_html")))


def _print_failures(result: BatchResult, config: BatchConfig, stream: TextIO) -> None:
    failed = result.failed
    if not failed:
        return
    width = max(len("study"), *(len(r.study_id) for r in failed))
    print(f"medseg: error: {len(failed)} of {_studies(len(result.rows))} failed"
          f"{_kinds(failed)}:", file=stream)
    print(f"  {'study':<{width}}  attempts  {'kind':<11}  error", file=stream)
    for r in failed:
        reason = f"{r.error_type or r.status}: {r.error_message or 'not processed'}"
        print(f"  {r.study_id:<{width}}  {r.attempts:>3}/{config.max_attempts:<4}  "
              f"{r.error_kind or '-':<11}  {reason}", file=stream)
    if any(r.error_kind == "machine" for r in failed):
        print("  (machine: the disk, memory, permissions or network failed, not the study. "
              "No attempt was used: free space or memory, fix the permission, and run the "
              "same command again to retry them.)", file=stream)
    if any(r.study_id in result.exhausted for r in failed):
        print("  (out of attempts: not tried again. Fix the input and run with a higher "
              "--max-attempts to retry them.)", file=stream)
    print(f"  details, tracebacks of unexpected errors: {result.out_dir / 'batch.sqlite'}",
          file=stream)


def run(config: BatchConfig, *, quiet: bool = False) -> int:
    """Run the batch, print progress, summary and failures; the exit status."""
    bar = _BatchProgress(not quiet)

    def log(message: str) -> None:
        if not quiet:
            bar.note(message)

    try:
        result = run_batch(config, progress=bar, log=log)
    finally:
        bar.finish()
    if not quiet:
        _print_summary(result)
    _print_failures(result, config, sys.stderr)
    return EXIT_FAILED if result.failed else EXIT_OK


@dataclass(frozen=True)
class BatchJob(BatchConfig):
    """A ``job: batch`` pipeline file: the :class:`BatchConfig` keys, and ``pacs`` (the
    filters, ``push`` and connection settings of a ``dicomweb+URL`` source, see
    :class:`~medseg.pacs.options.PacsBatchOptions`) in place of ``remote``."""

    pacs: PacsBatchOptions | None = None

    def __post_init__(self) -> None:
        if self.pacs is not None and not is_dicomweb_source(self.source):
            raise ValueError("PACS options (push, filters, credentials) need a DICOMweb "
                             f"source dicomweb+http(s)://..., got {self.source!r}")
        if is_dicomweb_source(self.source):
            return  # remote is made from pacs by with_remote()
        super().__post_init__()

    def with_remote(self) -> BatchConfig:
        """The config the runner takes: for a DICOMweb source, its remote source (the
        connection settings and credentials validated here, before anything runs)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(BatchConfig)}
        if is_dicomweb_source(self.source):
            from medseg.pacs.batch import make_job

            fields["remote"] = make_job(self.source, self.pacs)
        try:
            return BatchConfig(**fields)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc


def _config(**kwargs: Any) -> BatchConfig:
    try:
        return BatchJob(**kwargs).with_remote()
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _cmd_batch(args: argparse.Namespace) -> int:
    config = _config(source=str(args.source), out_dir=str(args.out_dir), workers=args.workers,
                     scheduler=args.scheduler,
                     reference_dir=str(args.reference_dir) if args.reference_dir else None,
                     method=args.method, model=args.model, max_attempts=args.max_attempts,
                     threads=args.threads, show_phi=args.show_phi,
                     reference_labels=str(args.reference_labels), device=args.device,
                     pacs=batch_options(args))
    return run(config, quiet=args.quiet)


def config_from_yaml(path: str | Path) -> BatchJob:
    """The :class:`BatchJob` of a ``job: batch`` pipeline file: unknown keys, wrong types
    and invalid values are :class:`~medseg.errors.ConfigError` naming the file and the key.
    Paths in it are relative to the current directory (as in the training config). Run it
    with ``run(job.with_remote())``."""
    return _load_job(path)[0]


def _load_job(path: str | Path) -> tuple[BatchJob, BatchConfig]:
    """The job of a pipeline file and the config the runner takes (its remote source made,
    so the connection settings are checked once, naming the file)."""
    from medseg.config import from_mapping, read_yaml

    p = Path(path)
    data = read_yaml(p)
    if data.get("job") != "batch":
        raise ConfigError(f"expected 'job: batch', got job {data.get('job')!r}", path=p)
    data = {k: v for k, v in data.items() if k != "job"}
    if "remote" in data:
        raise ConfigError("unknown key 'remote' (a DICOMweb source takes 'pacs')", path=p)
    job = from_mapping(BatchJob, data, path=p)
    try:
        return job, job.with_remote()
    except ConfigError as exc:
        raise ConfigError(exc.reason, path=p) from exc


def run_config(config: Path, *, quiet: bool = False) -> int:
    """``medseg run pipelines/batch_lung.yaml``."""
    return run(_load_job(config)[1], quiet=quiet)


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (the bad value in the message)."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(sub: Any) -> None:
    """Add the ``batch`` subcommand to the ``medseg`` parser."""
    p = sub.add_parser(
        "batch", help="segment a cohort: many studies, resumable, in parallel",
        description="Segment every study of SOURCE (a folder: each sub-folder is one DICOM "
        "study, each .nii.gz/.nrrd/.mha file one study; or a manifest CSV with the columns "
        "study_id,path[,reference], paths relative to the manifest's folder). Writes what "
        "'medseg segment' writes into OUT_DIR/<study_id>/ (atomically: a staging folder is "
        "renamed when complete), OUT_DIR/summary.csv, OUT_DIR/validation/ when references "
        "are given, and the state in OUT_DIR/batch.sqlite. Run it again to resume: finished "
        "studies whose outputs verify are skipped, failed ones are retried up to "
        "--max-attempts. One study's failure never stops the others; the exit status is 1 "
        "if any study failed. SOURCE may also be a DICOMweb server, dicomweb+URL (see "
        "'DICOMweb source' below and docs/how-to/pacs.md).",
        epilog="See docs/how-to/cluster.md for SLURM and Kubernetes.")
    p.add_argument("source", help="folder of studies, a manifest .csv, or a DICOMweb root "
                   "dicomweb+http(s)://HOST/ROOT")
    p.add_argument("-o", "--out-dir", type=Path, required=True, help="output folder")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="parallel worker processes on this machine (default 1: in this "
                   "process; N > 1 starts a local Dask cluster)")
    p.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="run on an existing Dask cluster, e.g. tcp://10.0.0.5:8786 (workers "
                   "must see SOURCE and OUT_DIR under the same paths)")
    p.add_argument("--reference-dir", type=Path, default=None, metavar="DIR",
                   help="reference labels DIR/<study>.nii.gz (1 right, 2 left lung): reports "
                   "hold Dice etc. and OUT_DIR/validation/ the cohort validation")
    p.add_argument("--method", choices=METHODS, default=Method.UNET.value,
                   help="unet (default): the trained 2D U-Net; threshold: the HU baseline")
    p.add_argument("--model", default=None,
                   help="shipped model name or path to a model card .json (default "
                   f"{DEFAULT_MODEL}); loaded once per worker")
    p.add_argument("--max-attempts", type=positive_int, default=2,
                   help="tries per study over all runs (default 2)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads per study (default: all cores in-process, cores / "
                   "workers with --workers, 1 with --scheduler)")
    p.add_argument("--device", type=device_argument, default="cpu", help=DEVICE_HELP)
    p.add_argument("--reference-labels", default="auto", metavar="SPEC",
                   help="label convention of the references in --reference-dir (default "
                   "auto: right=1,left=2, or lung=1 for a 0/1 mask); the grammar of 'medseg "
                   "evaluate --ref-labels', e.g. lung=255 or cip")
    p.add_argument("--show-phi", action="store_true",
                   help="show patient name, ID and study date in the reports (hidden by "
                   "default; never used in file names)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress, notes or summary (failures are still listed)")
    add_batch_arguments(p)
    p.set_defaults(func=_cmd_batch)
