"""Reports: per-study JSON (versioned schema), self-contained HTML and a CSV row; the cohort
validation report (HTML + CSV). HTML is rendered by Jinja2 with autoescaping, every image is
embedded as a data URI, and no patient name or ID appears unless ``show_phi`` is set."""

from __future__ import annotations

from medseg.report._csv import csv_text
from medseg.report.cohort import write_cohort_report
from medseg.report.study import (
    SCHEMA_VERSION,
    input_checksums,
    study_report,
    write_study_report,
)

__all__ = [
    "SCHEMA_VERSION",
    "csv_text",
    "input_checksums",
    "study_report",
    "write_cohort_report",
    "write_study_report",
]
