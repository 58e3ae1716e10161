"""A DICOMweb client for medseg: QIDO-RS search, WADO-RS retrieve, STOW-RS store.

A thin layer over :class:`dicomweb_client.DICOMwebClient` (the HTTP and multipart work is
theirs) that adds what medseg needs around it. The connection settings and credentials are
in :mod:`medseg.pacs.credentials`, the records the answers become in
:mod:`medseg.pacs.records` (both re-exported here).

* **Credentials stay secret.** They come from the environment (``MEDSEG_DICOMWEB_TOKEN``
  for a bearer token, or ``MEDSEG_DICOMWEB_USER`` + ``MEDSEG_DICOMWEB_PASSWORD``) or from
  an auth file (JSON or netrc style) that only its owner may read, never from the command
  line (shell history, ``ps``) nor from the URL. :class:`Credentials` prints as
  ``Credentials(basic from environment)``; no message, log line or config repr holds a
  user name, password or token.
* **TLS is verified** by default; ``ca_bundle`` adds a private CA, ``insecure`` turns the
  check off (the command line warns about it every time).
* **Every failure is a medseg error** naming the URL and the reason in words
  (:class:`~medseg.errors.PacsError` and subclasses): connection refused, timeout, TLS,
  401/403, 404 or an answer that is not DICOMweb, STOW-RS refusals.
* **Retrieval is atomic**: instances go to a temporary folder beside the target, one
  file per instance, checked against the instance count QIDO-RS reports, and the folder
  is renamed into place only when complete.
* **Storage is checked**: the STOW-RS answer lists stored and failed instances; anything
  failed or missing from the answer raises :class:`~medseg.errors.PacsStoreError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pydicom
import requests
from pydicom.dataset import Dataset

from medseg.errors import (
    ConfigError,
    NotFoundError,
    OutputError,
    PacsAuthError,
    PacsConnectionError,
    PacsError,
    PacsNotFoundError,
    UnreadableFileError,
)
from medseg.pacs.credentials import (
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_USER,
    Credentials,
    PacsConfig,
    load_credentials,
    make_config,
)
from medseg.pacs.records import (  # noqa: F401  (re-exported)
    FAILURE_REASONS,
    SeriesRecord,
    StoreResult,
    StudyRecord,
    _reason_text,
)

__all__ = [
    "ENV_PASSWORD",
    "ENV_TOKEN",
    "ENV_USER",
    "Credentials",
    "PacsClient",
    "PacsConfig",
    "SeriesRecord",
    "StoreResult",
    "StudyRecord",
    "load_credentials",
    "make_config",
]


#: STOW-RS requests are cut into parts of at most this many bytes of DICOM: one request per
#: 141-slice CT would be 75 MB, which some proxies refuse; 64 MB keeps a typical CT in one
#: or two requests.
STORE_CHUNK_BYTES = 64 * 1024 * 1024


#: Results per QIDO-RS request; more are fetched page by page.
QIDO_PAGE = 500

_QIDO_STUDY_FIELDS = ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyDescription",
                      "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                      "NumberOfStudyRelatedInstances", "PatientID", "PatientName",
                      "AccessionNumber")
_QIDO_SERIES_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
                       "SeriesDescription", "NumberOfSeriesRelatedInstances", "ImageType",
                       "ImageOrientationPatient", "SliceThickness", "PixelSpacing",
                       "StudyDate", "PatientID")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


# -- credentials and connection settings ---------------------------------------------------


# -- records ---------------------------------------------------------------------------------


# -- the client --------------------------------------------------------------------------


class PacsClient:
    """A connection to one DICOMweb server (see the module docstring). ``session`` may be
    given to inject a transport (tests); its auth and TLS settings are then overwritten
    from ``config``."""

    def __init__(self, config: PacsConfig, *, session: requests.Session | None = None) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.config = config
        self.url = config.url
        sess = session if session is not None else requests.Session()
        sess.auth = config.credentials.auth()
        sess.verify = config.verify
        sess.trust_env = False  # no ~/.netrc credentials sent to a server nobody named
        try:
            self._client = DICOMwebClient(url=config.url, session=sess,
                                          timeout=config.timeout)
        except ValueError as exc:
            raise ConfigError(f"not a DICOMweb root URL: {exc}") from exc
        # retrying's multiplier is in ms: waits of 0.5 s, 1 s, 2 s ... between tries
        self._client.set_http_retry_params(retry=config.retries > 0,
                                           max_attempts=config.retries + 1,
                                           wait_exponential_multiplier=250)

    def __repr__(self) -> str:
        return f"PacsClient({self.url!r}, {self.config.credentials!r})"

    # -- error translation --

    @contextlib.contextmanager
    def _translate(self, what: str, *, series: str | None = None) -> Iterator[None]:
        """Turn the HTTP stack's exceptions into medseg errors naming the URL and, in
        words, what went wrong. Messages are built here, never copied from the request
        (whose headers hold the credentials)."""
        url = self.url
        with warnings.catch_warnings():
            if self.config.verify is False:  # the user was warned once, by the CLI
                from urllib3.exceptions import InsecureRequestWarning

                warnings.simplefilter("ignore", InsecureRequestWarning)
            try:
                yield
            except PacsError:
                raise
            except requests.exceptions.SSLError as exc:
                raise PacsConnectionError(
                    f"{what}: TLS failure ({_short(exc)}); give the server's CA with "
                    "--ca-bundle (or, for a test server only, --insecure)", url=url,
                    series=series) from exc
            except requests.exceptions.Timeout as exc:
                raise PacsConnectionError(
                    f"{what}: no answer within {self.config.timeout:g} s (timeout); is the "
                    "server overloaded, or the URL behind a firewall?", url=url,
                    series=series) from exc
            except requests.exceptions.ConnectionError as exc:
                raise PacsConnectionError(
                    f"{what}: cannot connect ({_short(exc)}); is the server running and "
                    "the host and port right?", url=url, series=series) from exc
            except requests.exceptions.HTTPError as exc:
                raise self._http_error(what, exc.response, series) from exc
            except requests.exceptions.RequestException as exc:
                raise PacsConnectionError(f"{what}: {type(exc).__name__}: {_short(exc)}",
                                          url=url, series=series) from exc
            except (json.JSONDecodeError, ValueError, TypeError, KeyError) as exc:
                raise PacsNotFoundError(
                    f"{what}: the answer is not DICOMweb ({type(exc).__name__}: "
                    f"{_short(exc)}); is {url} the DICOMweb root (e.g. "
                    "http://host:8042/dicom-web for Orthanc)?", url=url,
                    series=series) from exc

    def _http_error(self, what: str, response: requests.Response | None,
                    series: str | None) -> PacsError:
        code = response.status_code if response is not None else 0
        reason = (response.reason if response is not None else "") or ""
        status = f"HTTP {code} {reason}".strip()
        creds = self.config.credentials
        if code == 401:
            given = ("none were given: set MEDSEG_DICOMWEB_USER/_PASSWORD, "
                     "MEDSEG_DICOMWEB_TOKEN or --auth-file") if creds.kind == "none" \
                else f"the {creds.kind} credentials from {creds.origin} were refused"
            return PacsAuthError(f"{what}: {status}: the server needs credentials; {given}",
                                 url=self.url, series=series)
        if code == 403:
            return PacsAuthError(f"{what}: {status}: the credentials are valid but not "
                                 "allowed to do this", url=self.url, series=series)
        if code == 404:
            return PacsNotFoundError(
                f"{what}: {status}: no such resource; is {self.url} the DICOMweb root "
                "(e.g. http://host:8042/dicom-web for Orthanc), and the UID right?",
                url=self.url, series=series)
        if code in (400, 405, 406):
            return PacsNotFoundError(
                f"{what}: {status}: the server did not accept a DICOMweb request; is "
                f"{self.url} the DICOMweb root (e.g. http://host:8042/dicom-web for "
                "Orthanc)?", url=self.url, series=series)
        if code in (408, 429, 502, 503, 504):
            return PacsConnectionError(f"{what}: {status}: the server is busy or "
                                       "unavailable; try again later", url=self.url,
                                       series=series)
        return PacsError(f"{what}: {status}", url=self.url, series=series)

    def _datasets(self, items: Any, what: str) -> list[Dataset]:
        """DICOM JSON results as datasets; anything else means the URL is no DICOMweb root
        (Orthanc's own REST API answers ``/studies`` with a list of strings)."""
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise PacsNotFoundError(
                f"{what}: the answer is not DICOM JSON; is {self.url} the DICOMweb root "
                "(e.g. http://host:8042/dicom-web for Orthanc)?", url=self.url)
        out = []
        with warnings.catch_warnings():
            # odd values in other people's headers (an AS of '0Y') are not ours to report
            warnings.simplefilter("ignore")
            for item in items:
                # pixel data and other bulk values are references to more downloads
                small = {k: v for k, v in item.items()
                         if not (isinstance(v, dict) and ("BulkDataURI" in v or
                                                          "InlineBinary" in v))}
                out.append(Dataset.from_json(small))
        return out

    def _search(self, level: str, search: Any, filters: Mapping[str, str] | None,
                fields: Sequence[str], limit: int | None, **kwargs: Any) -> list[Dataset]:
        """Page through a QIDO-RS search (``limit``/``offset``). Pages are cut at
        :data:`QIDO_PAGE`; paging stops at a short page, or at a page that brings nothing
        new (servers that ignore ``offset`` would otherwise repeat it forever)."""
        out: list[Dataset] = []
        seen: set[str] = set()
        key = "SeriesInstanceUID" if level == "series" else "StudyInstanceUID"
        offset = 0
        while True:
            page = QIDO_PAGE if limit is None else min(QIDO_PAGE, limit - len(out))
            items = self._datasets(search(fields=list(fields), search_filters=dict(
                filters or {}), limit=page, offset=offset or None, **kwargs), level)
            new = [d for d in items if str(d.get(key, "")) not in seen]
            seen.update(str(d.get(key, "")) for d in new)
            out.extend(new)
            offset += len(items)
            if len(items) < page or not new or (limit is not None and len(out) >= limit):
                return out

    # -- QIDO-RS --

    def check(self) -> None:
        """One small query, to fail early (and clearly) on a wrong URL or credentials."""
        with self._translate("QIDO-RS studies"):
            self._datasets(self._client.search_for_studies(limit=1), "QIDO-RS studies")

    def search_studies(self, filters: Mapping[str, str] | None = None, *,
                       limit: int | None = None) -> list[StudyRecord]:
        """Studies matching ``filters`` (DICOM keywords to values, e.g. ``PatientID``,
        ``StudyDate`` ``20240101-20241231``, ``ModalitiesInStudy``, ``StudyDescription``
        with ``*`` wildcards); every page when ``limit`` is ``None``."""
        with self._translate("QIDO-RS studies"):
            found = self._search("studies", self._client.search_for_studies, filters,
                                 _QIDO_STUDY_FIELDS, limit)
        return [StudyRecord.from_dataset(d) for d in found]

    def search_series(self, study_uid: str | None = None,
                      filters: Mapping[str, str] | None = None, *,
                      limit: int | None = None) -> list[SeriesRecord]:
        """Series of ``study_uid`` (or of all studies) matching ``filters``."""
        with self._translate("QIDO-RS series"):
            found = self._search("series", self._client.search_for_series, filters,
                                 _QIDO_SERIES_FIELDS, limit, study_instance_uid=study_uid)
        return [SeriesRecord.from_dataset(d) for d in found]

    def complete_series(self, rec: SeriesRecord) -> SeriesRecord:
        """``rec`` with ImageType, orientation and slice thickness from one instance's
        metadata (WADO-RS) where QIDO-RS did not return them; enhanced multi-frame
        instances keep their orientation in the shared functional groups."""
        if not rec.needs_metadata():
            return rec
        what = "instance metadata"
        with self._translate(what, series=rec.series_uid):
            found = self._datasets(self._client.search_for_instances(
                study_instance_uid=rec.study_uid, series_instance_uid=rec.series_uid,
                limit=1), what)
            if not found:
                return rec
            sop = str(found[0].get("SOPInstanceUID", ""))
            meta = self._datasets([self._client.retrieve_instance_metadata(
                rec.study_uid, rec.series_uid, sop)], what)[0]
        full = SeriesRecord.from_instance(meta)
        return SeriesRecord(
            study_uid=rec.study_uid, series_uid=rec.series_uid,
            modality=rec.modality or full.modality, number=rec.number,
            description=rec.description, n_instances=rec.n_instances,
            image_type=rec.image_type or full.image_type,
            orientation=rec.orientation or full.orientation,
            slice_thickness=rec.slice_thickness if rec.slice_thickness is not None
            else full.slice_thickness, pixel_spacing=rec.pixel_spacing or full.pixel_spacing,
            n_frames=full.n_frames)

    # -- WADO-RS --

    def _download(self, study_uid: str, series: Sequence[SeriesRecord], folder: Path) -> int:
        """Write every instance of ``series`` into ``folder``, one file per instance named
        after its SOPInstanceUID; checks each series' count against QIDO-RS."""
        total = 0
        seen: set[str] = set()
        for rec in series:
            n = 0
            what = f"WADO-RS series of study {study_uid}"
            with self._translate(what, series=rec.series_uid):
                # "*": the transfer syntax the server holds, no lossy re-encoding on the way
                for ds in self._client.iter_series(
                        study_uid, rec.series_uid, media_types=(("application/dicom", "*"),)):
                    sop = str(ds.get("SOPInstanceUID", "")) or f"instance{n:05d}"
                    name = _UNSAFE_NAME.sub("_", sop)
                    if name in seen:
                        raise PacsError(f"{what}: the server sent instance {sop} twice",
                                        url=self.url, series=rec.series_uid)
                    seen.add(name)
                    try:
                        pydicom.dcmwrite(folder / f"{name}.dcm", ds, enforce_file_format=True)
                    except OSError as exc:
                        raise OutputError(f"cannot write instance {sop}: {exc.strerror}",
                                          path=folder) from exc
                    n += 1
            if n == 0:
                raise PacsNotFoundError(f"{what}: the server sent no instance",
                                        url=self.url, series=rec.series_uid)
            if rec.n_instances is not None and n != rec.n_instances:
                raise PacsError(f"{what}: received {n} of the {rec.n_instances} instances "
                                "QIDO-RS lists (an interrupted transfer?)", url=self.url,
                                series=rec.series_uid)
            total += n
        return total

    def pull(self, study_uid: str, dest: str | Path, *,
             series: Sequence[SeriesRecord] | None = None) -> int:
        """Download ``series`` of ``study_uid`` (default: every series of the study) into
        the folder ``dest``, which must not exist or be empty; returns the number of
        instances. Atomic: written into a temporary folder beside ``dest`` and renamed
        onto it when complete; on any failure nothing is left behind."""
        dest = Path(dest)
        if series is None:
            series = self.search_series(study_uid)
            if not series:
                raise PacsNotFoundError(f"study {study_uid} is not on the server (QIDO-RS "
                                        "found no series)", url=self.url)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise OutputError("exists and is not an empty folder; choose a new folder",
                              path=dest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial",
                                        dir=dest.parent))
        except OSError as exc:
            raise OutputError(f"cannot create the folder: {exc.strerror}", path=dest) from exc
        try:
            n = self._download(study_uid, series, tmp)
            if dest.exists():
                dest.rmdir()
            os.replace(tmp, dest)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OutputError(f"cannot move the download into place: {exc.strerror}",
                              path=dest) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return n

    # -- STOW-RS --

    def store(self, paths: Iterable[str | Path], *, check: bool = True) -> StoreResult:
        """Store the DICOM files ``paths`` (folders are searched recursively) with STOW-RS.
        Raises :class:`~medseg.errors.PacsStoreError` when the server refused any instance
        or left one out of its answer; ``check=False`` returns the result instead."""
        files = collect_dicom_files(paths)
        result = StoreResult()
        chunk: list[tuple[Path, Dataset]] = []
        size = 0
        for path in files:
            try:
                ds = pydicom.dcmread(path)
            except Exception as exc:
                raise UnreadableFileError(f"not readable as DICOM ({type(exc).__name__}: "
                                          f"{exc})", path=path) from exc
            if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
                raise UnreadableFileError("no SOPInstanceUID/SOPClassUID: not a storable "
                                          "DICOM instance", path=path)
            result.files[str(ds.SOPInstanceUID)] = str(path)
            chunk.append((path, ds))
            size += path.stat().st_size
            if size >= STORE_CHUNK_BYTES:
                self._store_chunk(chunk, result)
                chunk, size = [], 0
        if chunk:
            self._store_chunk(chunk, result)
        if check:
            result.raise_for_failures(self.url)
        return result

    def _store_chunk(self, chunk: list[tuple[Path, Dataset]], result: StoreResult) -> None:
        sent = [str(ds.SOPInstanceUID) for _, ds in chunk]
        answer: Dataset | None = None
        with self._translate("STOW-RS"):
            try:
                answer = self._client.store_instances([ds for _, ds in chunk])
            except requests.exceptions.HTTPError as exc:
                # a partial or total failure (400, 409) comes with the same answer body
                answer = _store_answer(exc.response)
                if answer is None:
                    raise
        refs = {str(i.get("ReferencedSOPInstanceUID", "")): i
                for i in answer.get("ReferencedSOPSequence", []) or []}
        fails = {str(i.get("ReferencedSOPInstanceUID", "")): i
                 for i in answer.get("FailedSOPSequence", []) or []}
        for uid in sent:
            if uid in fails:
                result.failed[uid] = _reason_text(fails[uid].get("FailureReason"))
            elif uid in refs:
                result.stored.append(uid)
                if "WarningReason" in refs[uid]:
                    result.warnings[uid] = _reason_text(refs[uid].get("WarningReason"))
            else:
                result.failed[uid] = "missing from the server's STOW-RS answer"


def _store_answer(response: requests.Response | None) -> Dataset | None:
    """The DICOM JSON body of a failed STOW-RS request, if it has one."""
    if response is None or response.status_code not in (400, 409) or not response.content:
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return None


def _short(exc: BaseException) -> str:
    """A one-line reason from a ``requests``/``urllib3`` exception: the operating system's
    words (``Connection refused``, ``Name or service not known``) when there are some, else
    the innermost cause, rather than the chain of wrappers that repeat the request URL."""
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
    if m:
        return m.group(1).strip()
    inner: BaseException = exc
    for _ in range(10):
        nxt = inner.__cause__ or inner.__context__
        if nxt is None:
            break
        inner = nxt
    text = str(inner).strip() or type(inner).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def collect_dicom_files(paths: Iterable[str | Path]) -> list[Path]:
    """The DICOM files among ``paths``; folders are searched recursively (non-DICOM files
    and hidden or partial files in them skipped). A named file that is not DICOM, or a
    path that does not exist, is an error."""
    from medseg.io.dicom import looks_like_dicom

    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts)
                           and looks_like_dicom(f))
            if not found:
                raise NotFoundError("no DICOM file in this folder", path=p)
            files.extend(found)
        elif p.is_file():
            if not looks_like_dicom(p):
                raise UnreadableFileError("not a DICOM file", path=p)
            files.append(p)
        else:
            raise NotFoundError("no such file or folder", path=p)
    return list(dict.fromkeys(files))
