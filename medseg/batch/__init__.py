"""Batch segmentation of CT cohorts: many studies, resumable, in parallel.

``medseg batch SOURCE -o OUT_DIR`` (or a ``job: batch`` pipeline file) segments every study
of a folder or manifest into ``OUT_DIR/<study_id>/``, records the state of each study in
``OUT_DIR/batch.sqlite`` so that a second run resumes, and writes a cohort summary.

* :mod:`medseg.batch.sources`: which studies (folder rule, manifest, study ids);
* :mod:`medseg.batch.state`: the SQLite state and output checksums;
* :mod:`medseg.batch.runner`: executors (in-process, local or external Dask cluster),
  staging and atomic promotion, retries;
* :mod:`medseg.batch.summary`: ``summary.csv`` and the cohort validation report;
* the command line is :mod:`medseg.batch_cli` (above batch and pacs: it makes the remote
  source of a ``dicomweb+URL`` SOURCE, :class:`~medseg.batch.sources.RemoteSource`).
"""

from __future__ import annotations

from medseg.batch.runner import BatchConfig, BatchResult, Progress, run_batch, run_study
from medseg.batch.sources import StudySpec, discover_studies, read_manifest, sanitize_id
from medseg.batch.state import StateDB, StudyRow

__all__ = [
    "BatchConfig",
    "BatchResult",
    "Progress",
    "StateDB",
    "StudyRow",
    "StudySpec",
    "discover_studies",
    "read_manifest",
    "run_batch",
    "run_study",
    "sanitize_id",
]
