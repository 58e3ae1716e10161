"""DICOMweb: find studies (QIDO-RS), download them (WADO-RS), store results (STOW-RS).

The PACS is a source and a sink of the flow, nothing more: a study is pulled into a local
folder and read by the ordinary DICOM loader; the SEG and SR that ``medseg segment``
writes are pushed back as files.

* :mod:`medseg.pacs.client`: :class:`PacsClient` over ``dicomweb-client``, credentials,
  TLS, errors;
* :mod:`medseg.pacs.select`: which series of a study to segment;
* :mod:`medseg.pacs.batch`: a DICOMweb root as the source of ``medseg batch`` (through
  batch's public API: :class:`~medseg.batch.sources.StudySpec`, ``unique_ids``, ...);
* :mod:`medseg.pacs.cli`: ``medseg pacs query|pull|push``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medseg._lazy import lazy_getattr
from medseg.pacs.options import DICOMWEB_PREFIX, PacsBatchOptions, SelectionRules

if TYPE_CHECKING:
    from medseg.pacs.client import (
        Credentials,
        PacsClient,
        PacsConfig,
        SeriesRecord,
        StoreResult,
        StudyRecord,
        load_credentials,
        make_config,
    )
    from medseg.pacs.select import Choice, choose_series

#: Imported on first use: the HTTP stack (requests, dicomweb-client) loads only when a
#: command talks to a server, not for ``medseg --help``.
_LAZY = {**{n: "medseg.pacs.client" for n in (
    "Credentials", "PacsClient", "PacsConfig", "SeriesRecord", "StoreResult", "StudyRecord",
    "load_credentials", "make_config")}, "Choice": "medseg.pacs.select",
    "choose_series": "medseg.pacs.select"}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [
    "DICOMWEB_PREFIX",
    "Choice",
    "Credentials",
    "PacsBatchOptions",
    "PacsClient",
    "PacsConfig",
    "SelectionRules",
    "SeriesRecord",
    "StoreResult",
    "StudyRecord",
    "choose_series",
    "load_credentials",
    "make_config",
]
