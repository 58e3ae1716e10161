"""Plain option records of the PACS support, importable without the HTTP stack.

:class:`PacsBatchOptions` is a field of :class:`medseg.batch.runner.BatchConfig` (and so a
``pacs:`` mapping in a ``job: batch`` pipeline file); :class:`SelectionRules` says which
series of a study medseg segments. Both are frozen dataclasses of plain values, so that
the config loader can type-check them and a batch can pickle them to its workers.
"""

from __future__ import annotations

from dataclasses import dataclass

from medseg.errors import ConfigError

__all__ = ["DICOMWEB_PREFIX", "PACS_CACHE_NAME", "PacsBatchOptions", "SelectionRules",
           "is_dicomweb_source"]

#: A batch SOURCE that starts with this is a DICOMweb root, e.g.
#: ``dicomweb+https://pacs.example.org/dicom-web``: the prefix keeps a URL from ever being
#: mistaken for a folder name (and the reverse).
DICOMWEB_PREFIX = "dicomweb+"

#: Where a batch worker pulls a study's series, inside OUT_DIR (hidden: never a study).
PACS_CACHE_NAME = ".pacs-cache"

#: Default ImageType values a series must start with: an original acquisition, not a
#: derived reformat, MIP or secondary capture (DICOM PS3.3 C.7.6.1.1.2).
ORIGINAL_PRIMARY = ("ORIGINAL", "PRIMARY")


def is_dicomweb_source(source: str) -> bool:
    """Whether a batch SOURCE names a DICOMweb root (``dicomweb+http(s)://...``)."""
    return str(source).lower().startswith(DICOMWEB_PREFIX)


@dataclass(frozen=True)
class SelectionRules:
    """Which series of a study to segment, applied in this order (see
    :func:`medseg.pacs.select.choose_series`):

    ``modality``: the series' Modality (``CT``); ``axial``: the slice normal from
    ImageOrientationPatient within ``max_tilt_deg`` of the patient's head-feet axis (the
    default 30 degrees keeps gantry-tilted axial scans, which the loader corrects, and
    drops coronal/sagittal reformats and localizers); ``image_type``: the first ImageType
    values (ORIGINAL, PRIMARY; empty accepts any); ``min_instances``: fewer instances is a
    localizer or a single image, not a volume (a multi-frame series counts as eligible
    with one instance). Among the eligible series the thinnest SliceThickness wins, then
    the most instances, then the lowest SeriesNumber, then the UID (deterministic).
    """

    modality: str = "CT"
    axial: bool = True
    max_tilt_deg: float = 30.0
    image_type: tuple[str, ...] = ORIGINAL_PRIMARY
    min_instances: int = 3

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_tilt_deg < 90.0:
            raise ConfigError(f"max_tilt_deg must be in [0, 90), got {self.max_tilt_deg}")
        if self.min_instances < 1:
            raise ConfigError(f"min_instances must be at least 1, got {self.min_instances}")


@dataclass(frozen=True)
class PacsBatchOptions:
    """The PACS part of a batch whose SOURCE is ``dicomweb+URL``.

    ``modality``, ``date`` (``YYYYMMDD`` or a range ``YYYYMMDD-YYYYMMDD``), ``patient``
    (PatientID) and ``description`` (StudyDescription, ``*`` wildcards) filter the QIDO-RS
    study search; none given: every study of the server. ``push``: store the SEG and SR of
    each study back (STOW-RS). ``auth_file``, ``ca_bundle``, ``insecure``, ``timeout`` (s)
    and ``retries`` are as for ``medseg pacs``; the credentials themselves come from the
    environment or ``auth_file`` and are never part of a config. ``image_type`` and
    ``allow_oblique`` adjust the series :class:`SelectionRules`.
    """

    modality: str | None = None
    date: str | None = None
    patient: str | None = None
    description: str | None = None
    push: bool = False
    auth_file: str | None = None
    ca_bundle: str | None = None
    insecure: bool = False
    timeout: float = 30.0
    retries: int = 2
    image_type: tuple[str, ...] = ORIGINAL_PRIMARY
    allow_oblique: bool = False

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ConfigError(f"timeout must be positive, got {self.timeout}")
        if self.retries < 0:
            raise ConfigError(f"retries must be 0 or more, got {self.retries}")
        if self.insecure and self.ca_bundle:
            raise ConfigError("give ca_bundle or insecure, not both")

    def rules(self) -> SelectionRules:
        return SelectionRules(axial=not self.allow_oblique, image_type=tuple(self.image_type))
