"""A DICOMweb server as the SOURCE (and, with ``--push``, the sink) of ``medseg batch``.

``medseg batch dicomweb+https://pacs/dicom-web -o OUT_DIR [--push]`` runs the ordinary
batch machinery (:mod:`medseg.batch.runner`: state database, retries, atomic promotion of
``OUT_DIR/<study_id>/``); only two steps differ from a folder of studies:

* **discovery** (coordinator): QIDO-RS finds the studies matching the filters; each becomes
  a :class:`~medseg.batch.sources.StudySpec` whose ``source`` is the study's URL
  ``dicomweb+<root>/studies/<StudyInstanceUID>`` (recorded in the state database, so a
  resumed run knows it) and whose id is the sanitised StudyInstanceUID: unique, stable
  across runs, and not a patient identifier (PatientID and names never name a folder).
* **one study** (worker, :func:`run_pacs_study`): choose the series by the selection rules
  (QIDO-RS attributes only), pull it with WADO-RS into ``OUT_DIR/.pacs-cache/<staging
  name>/`` (atomically), segment it into the study's staging folder exactly as a folder
  study, then, with ``push``, store ``lungs.seg.dcm`` and ``lungs.sr.dcm`` in **one**
  STOW-RS request and check the answer. The cache is removed whatever happens. Any
  failure (no eligible series, a pull cut off, a series that does not load, a refused
  store) fails the study with its reason; the runner removes its staging folder, so
  nothing is left half-written locally, and goes on with the next study.

The SEG and SR are stored only after both were written and the segmentation succeeded;
they travel in one request so that a server that accepts the request stores both. A
server that stores one and refuses the other is reported (the study fails, naming the
refused instance); DICOMweb has no transaction to undo the stored one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from medseg.batch.sources import StudySpec, find_reference, sanitize_id, unique_ids
from medseg.conventions import SEG_FILENAME, SR_FILENAME
from medseg.errors import ConfigError, MedsegError, NotFoundError, OutputError
from medseg.pacs.client import PacsClient, PacsConfig, make_config
from medseg.pacs.options import DICOMWEB_PREFIX, PACS_CACHE_NAME, PacsBatchOptions
from medseg.pacs.select import choose_series

__all__ = ["PACS_CACHE_NAME", "PUSH_NAMES", "PacsJob", "discover_pacs_studies", "make_job",
           "run_pacs_study", "study_filters", "study_uid_of"]

#: The files ``--push`` stores: what ``medseg segment`` writes for a DICOM input.
PUSH_NAMES = (SEG_FILENAME, SR_FILENAME)


@dataclass(frozen=True)
class PacsJob:
    """What workers need to reach the server: the connection (its credentials resolved once
    by the coordinator; their repr is hidden) and the batch's PACS options. Pickled to
    Dask workers with each task, never written to disk."""

    config: PacsConfig
    options: PacsBatchOptions

    # -- medseg.batch.sources.RemoteSource --
    #: Where workers pull a study's series, inside OUT_DIR (removed by the runner).
    cache_name: ClassVar[str] = PACS_CACHE_NAME

    @property
    def pushes(self) -> bool:
        """Whether the SEG and SR go back to the server (part of each study's parameters)."""
        return self.options.push

    def discover(self, reference_dir: str | Path | None) -> list[StudySpec]:
        return discover_pacs_studies(self, reference_dir=reference_dir)

    def run_study(self, source: str, staging: Path, segment: Callable[[Path], Any]
                  ) -> tuple[Any, dict[str, Any]]:
        return run_pacs_study(self, source, staging, segment)


def make_job(source: str, options: PacsBatchOptions | None) -> PacsJob:
    """Validate the connection settings of a ``dicomweb+URL`` batch source."""
    opts = options or PacsBatchOptions()
    config = make_config(source, auth_file=opts.auth_file, ca_bundle=opts.ca_bundle,
                         insecure=opts.insecure, timeout=opts.timeout, retries=opts.retries)
    return PacsJob(config=config, options=opts)


def study_filters(options: PacsBatchOptions) -> dict[str, str]:
    """QIDO-RS study filters from the batch options."""
    filters = {"ModalitiesInStudy": options.modality, "StudyDate": options.date,
               "PatientID": options.patient, "StudyDescription": options.description}
    return {k: v for k, v in filters.items() if v}


def study_uid_of(source: str) -> str:
    """The StudyInstanceUID of a study source ``dicomweb+<root>/studies/<uid>``."""
    _root, sep, uid = source.rpartition("/studies/")
    if not sep or not uid or "/" in uid:
        raise ConfigError(f"not a DICOMweb study reference: {source!r}")
    return uid


def discover_pacs_studies(job: PacsJob, *, reference_dir: str | Path | None = None
                          ) -> list[StudySpec]:
    """The studies on the server matching the job's filters, in StudyInstanceUID order
    (deterministic), with ids from their UIDs; references as for folder sources, by id."""
    client = PacsClient(job.config)
    filters = study_filters(job.options)
    records = client.search_studies(filters)
    if not records:
        what = ", ".join(f"{k}={v}" for k, v in filters.items()) or "no filter"
        raise NotFoundError(f"no study on the server matches ({what})", path=job.config.url)
    uids = sorted({r.study_uid for r in records if r.study_uid})
    ref_dir = Path(reference_dir) if reference_dir is not None else None
    if ref_dir is not None and not ref_dir.is_dir():
        raise NotFoundError("the reference folder does not exist", path=ref_dir)
    ids = unique_ids([sanitize_id(uid) for uid in uids])
    root = f"{DICOMWEB_PREFIX}{job.config.url}"
    return [StudySpec(study_id=sid, source=f"{root}/studies/{uid}", name=uid,
                      reference=find_reference(ref_dir, sid) if ref_dir else None)
            for sid, uid in zip(ids, uids, strict=True)]


def run_pacs_study(job: PacsJob, source: str, staging: Path,
                   segment: Callable[[Path], Any]) -> tuple[Any, dict[str, Any]]:
    """Choose, pull, segment (``segment(folder)`` writes into ``staging``) and, with
    ``push``, store back one study (see the module docstring). Returns what ``segment``
    returned and a small ``{"pacs": ...}`` record for the state database."""
    uid = study_uid_of(source)
    client = PacsClient(job.config)
    series = [client.complete_series(r) for r in client.search_series(uid)]
    choice = choose_series(series, job.options.rules(), study=uid)
    cache = Path(staging).parent.parent / PACS_CACHE_NAME / Path(staging).name
    try:
        n = client.pull(uid, cache, series=[choice.series])
        try:
            result = segment(cache)
        except MedsegError as exc:
            # the local copy is deleted when the error is reported: name the server's study
            exc.relocate_within(cache, source, "pulled file", choice.series.series_uid)
            raise
        pushed: list[str] = []
        if job.options.push:
            files = [Path(staging) / name for name in PUSH_NAMES]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise OutputError(f"nothing to push: segment wrote no {', '.join(missing)} "
                                  "(DICOM SEG/SR)", path=staging)
            pushed = client.store(files).stored
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    record = {"study_instance_uid": uid, "series_instance_uid": choice.series.series_uid,
              "instances": n, "series_choice": choice.reason, "pushed": pushed}
    return result, {"pacs": record}
