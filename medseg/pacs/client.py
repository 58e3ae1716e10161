"""A DICOMweb client for medseg: QIDO-RS search, WADO-RS retrieve, STOW-RS store.

A thin layer over :class:`dicomweb_client.DICOMwebClient` (the HTTP and multipart work is
theirs) that adds what medseg needs around it:

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
import stat
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

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
    PacsStoreError,
    UnreadableFileError,
)
from medseg.pacs.options import DICOMWEB_PREFIX

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

ENV_USER = "MEDSEG_DICOMWEB_USER"
ENV_PASSWORD = "MEDSEG_DICOMWEB_PASSWORD"
ENV_TOKEN = "MEDSEG_DICOMWEB_TOKEN"

#: STOW-RS requests are cut into parts of at most this many bytes of DICOM: one request per
#: 141-slice CT would be 75 MB, which some proxies refuse; 64 MB keeps a typical CT in one
#: or two requests.
STORE_CHUNK_BYTES = 64 * 1024 * 1024

#: DICOM PS3.18 / PS3.7 failure reasons a STOW-RS answer gives (FailureReason, 0008,1197).
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match the SOP class, or the study in the URL",
    0xC000: "cannot understand",
    0xC122: "referenced transfer syntax not supported",
}

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


@dataclass(frozen=True)
class Credentials:
    """HTTP credentials: ``basic`` (user + password), ``bearer`` (token) or ``none``.
    ``origin`` says where they came from (``environment``, ``auth file <path>``), for
    messages. The secrets are excluded from ``repr`` and ``str``."""

    kind: str = "none"
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    origin: str = ""

    def __repr__(self) -> str:
        where = f" from {self.origin}" if self.origin else ""
        return f"Credentials({self.kind}{where})"

    __str__ = __repr__

    def auth(self) -> requests.auth.AuthBase | None:
        """The ``requests`` authentication handler (``None`` without credentials)."""
        if self.kind == "basic":
            return _BasicAuth(self.username or "", self.password or "")
        if self.kind == "bearer":
            return _BearerAuth(self.token or "")
        return None

    def secrets(self) -> list[str]:
        """The secret strings (tests assert they appear in no output)."""
        return [s for s in (self.password, self.token) if s]


class _BasicAuth(requests.auth.HTTPBasicAuth):
    """HTTP basic authentication whose repr hides the user and password."""

    def __repr__(self) -> str:
        return "<basic auth>"


class _BearerAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <token>``; the repr hides the token."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:
        return "<bearer auth>"


def _check_private(path: Path) -> None:
    """An auth file must be readable by its owner only (like ~/.netrc and ssh keys):
    credentials readable by other users of the machine are as good as public."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise NotFoundError("no such auth file", path=path) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read the auth file: {exc.strerror}", path=path) from exc
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"the auth file can be read by other users (mode "
                          f"{stat.S_IMODE(mode):04o}); run 'chmod 600 {path}'", path=path)


def _parse_netrc(text: str, host: str | None, path: Path) -> dict[str, str]:
    """``machine HOST login USER password PASS`` (or ``default``), as in ``~/.netrc``; a
    ``token TOKEN`` pair is accepted too. The entry for ``host`` wins over ``default``."""
    words = text.split()
    entries: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    i = 0
    while i < len(words):
        w = words[i]
        if w == "machine" and i + 1 < len(words):
            current = entries.setdefault(words[i + 1], {})
            i += 2
        elif w == "default":
            current = entries.setdefault("", {})
            i += 1
        elif w in ("login", "password", "token", "account") and i + 1 < len(words):
            if current is None:
                raise ConfigError(f"'{w}' before any 'machine' line (netrc format)", path=path)
            current[w] = words[i + 1]
            i += 2
        else:
            raise ConfigError(f"unexpected word number {i + 1} (netrc format: machine HOST "
                              "login USER password PASSWORD)", path=path)
    entry = entries.get(host or "") or entries.get("")
    if entry is None:
        raise ConfigError(f"no 'machine {host}' (nor 'default') entry", path=path)
    return entry


def _from_auth_file(path: Path, host: str | None) -> Credentials:
    _check_private(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the auth file: {exc}", path=path) from exc
    origin = f"auth file {path}"
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            # the message of a JSON error quotes no content, only the position
            raise ConfigError(f"not valid JSON (line {exc.lineno}, column {exc.colno})",
                              path=path) from exc
        if not isinstance(data, dict) or not (set(data) & {"token", "username", "password"}):
            raise ConfigError('expected {"username": ..., "password": ...} or '
                              '{"token": ...}', path=path)
        unknown = sorted(set(data) - {"token", "username", "password"})
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(map(repr, unknown))}; expected "
                              "username + password, or token", path=path)
        entry = {"login": data.get("username"), "password": data.get("password"),
                 "token": data.get("token")}
        if not all(isinstance(v, str) or v is None for v in entry.values()):
            raise ConfigError("username, password and token must be strings", path=path)
    else:
        entry = dict(_parse_netrc(text, host, path))
    if entry.get("token"):
        return Credentials("bearer", token=entry["token"], origin=origin)
    if entry.get("login") and entry.get("password") is not None:
        return Credentials("basic", username=entry["login"], password=entry["password"],
                           origin=origin)
    raise ConfigError("holds no token and no username + password", path=path)


def load_credentials(auth_file: str | Path | None = None, *, host: str | None = None,
                     env: Mapping[str, str] | None = None) -> Credentials:
    """Credentials from ``auth_file`` (JSON ``{"username", "password"}`` or ``{"token"}``,
    or netrc ``machine HOST login USER password PASS``; readable by its owner only), else
    from the environment (``MEDSEG_DICOMWEB_TOKEN``, or ``MEDSEG_DICOMWEB_USER`` and
    ``MEDSEG_DICOMWEB_PASSWORD``), else none."""
    if auth_file is not None:
        return _from_auth_file(Path(auth_file), host)
    env = os.environ if env is None else env
    if env.get(ENV_TOKEN):
        return Credentials("bearer", token=env[ENV_TOKEN], origin="environment")
    user, password = env.get(ENV_USER), env.get(ENV_PASSWORD)
    if user and password is not None:
        return Credentials("basic", username=user, password=password, origin="environment")
    if user or password:
        raise ConfigError(f"set both {ENV_USER} and {ENV_PASSWORD} (only one is set)")
    return Credentials()


@dataclass(frozen=True)
class PacsConfig:
    """Where and how to reach a DICOMweb server. ``url`` is the DICOMweb root (e.g.
    ``http://localhost:8042/dicom-web``) without credentials; ``verify``: ``True`` (the
    system's CAs), a CA bundle path, or ``False`` (``--insecure``); ``timeout`` in seconds
    (connect and each read); ``retries``: extra tries on a connection error, 408, 429, 503,
    504 (with back-off). Safe to print: the credentials' repr hides them."""

    url: str
    credentials: Credentials = field(default_factory=Credentials)
    verify: bool | str = True
    timeout: float = 30.0
    retries: int = 2


def _clean_url(url: str) -> str:
    """The DICOMweb root: ``dicomweb+`` prefix and trailing slashes removed; refused when
    it is not http(s), carries credentials (they would end up in shell history and logs) or
    a query string."""
    raw = url.strip()
    if raw.lower().startswith(DICOMWEB_PREFIX):
        raw = raw[len(DICOMWEB_PREFIX):]
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"not a valid URL: {exc}") from exc
    if parts.username is not None or parts.password is not None:
        host = parts.hostname or "?"
        raise ConfigError(f"the URL for {host} holds credentials: remove them from the URL "
                          f"and use {ENV_USER}/{ENV_PASSWORD}, {ENV_TOKEN} or --auth-file")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{raw!r} is not a DICOMweb root URL; expected e.g. "
                          "http://localhost:8042/dicom-web or https://pacs.example.org/dicomweb")
    if parts.query or parts.fragment:
        raise ConfigError(f"{raw}: a DICOMweb root URL has no query string or fragment")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def make_config(url: str, *, auth_file: str | Path | None = None,
                ca_bundle: str | Path | None = None, insecure: bool = False,
                timeout: float = 30.0, retries: int = 2,
                env: Mapping[str, str] | None = None) -> PacsConfig:
    """Validate the connection settings where they enter (the URL, the CA bundle, the
    credentials' source) and return a :class:`PacsConfig`."""
    clean = _clean_url(url)
    if insecure and ca_bundle is not None:
        raise ConfigError("give --ca-bundle or --insecure, not both")
    if timeout <= 0:
        raise ConfigError(f"the timeout must be positive, got {timeout}")
    if retries < 0:
        raise ConfigError(f"retries must be 0 or more, got {retries}")
    verify: bool | str = True
    if ca_bundle is not None:
        if not Path(ca_bundle).is_file():
            raise NotFoundError("no such CA bundle file", path=ca_bundle)
        verify = os.path.abspath(ca_bundle)
    elif insecure:
        verify = False
    creds = load_credentials(auth_file, host=urlsplit(clean).hostname, env=env)
    return PacsConfig(url=clean, credentials=creds, verify=verify, timeout=timeout,
                      retries=retries)


# -- records ---------------------------------------------------------------------------------


def _first(ds: Dataset, keyword: str) -> Any:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        return value[0] if len(value) else None
    return value


def _int(ds: Dataset, keyword: str) -> int | None:
    v = _first(ds, keyword)
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _float(ds: Dataset, keyword: str) -> float | None:
    v = _first(ds, keyword)
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _strings(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    if isinstance(value, (pydicom.multival.MultiValue, list, tuple)):
        return tuple(str(v) for v in value)
    return (str(value),)


@dataclass(frozen=True)
class StudyRecord:
    """One QIDO-RS study result. Patient identifiers are kept apart: ``to_dict`` holds
    them only with ``show_phi``."""

    study_uid: str
    date: str | None
    time: str | None
    description: str | None
    modalities: tuple[str, ...]
    n_series: int | None
    n_instances: int | None
    patient_id: str | None = field(default=None, repr=False)
    patient_name: str | None = field(default=None, repr=False)
    accession: str | None = field(default=None, repr=False)

    @classmethod
    def from_dataset(cls, ds: Dataset) -> StudyRecord:
        name = _first(ds, "PatientName")
        return cls(study_uid=str(ds.get("StudyInstanceUID", "")),
                   date=_first(ds, "StudyDate"), time=_first(ds, "StudyTime"),
                   description=_first(ds, "StudyDescription"),
                   modalities=_strings(ds, "ModalitiesInStudy"),
                   n_series=_int(ds, "NumberOfStudyRelatedSeries"),
                   n_instances=_int(ds, "NumberOfStudyRelatedInstances"),
                   patient_id=_first(ds, "PatientID"),
                   patient_name=str(name) if name is not None else None,
                   accession=_first(ds, "AccessionNumber"))

    def to_dict(self, show_phi: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "study_instance_uid": self.study_uid, "study_date": self.date,
            "study_time": self.time, "study_description": self.description,
            "modalities": list(self.modalities), "series": self.n_series,
            "instances": self.n_instances}
        if show_phi:
            out.update(patient_id=self.patient_id, patient_name=self.patient_name,
                       accession_number=self.accession)
        return out


@dataclass(frozen=True)
class SeriesRecord:
    """One QIDO-RS series result, with what the series selection rules look at."""

    study_uid: str
    series_uid: str
    modality: str | None
    number: int | None
    description: str | None
    n_instances: int | None
    image_type: tuple[str, ...] | None
    orientation: tuple[float, ...] | None
    slice_thickness: float | None
    pixel_spacing: tuple[float, ...] | None = None
    n_frames: int | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> SeriesRecord:
        def floats(keyword: str) -> tuple[float, ...] | None:
            try:
                vals = tuple(float(v) for v in _strings(ds, keyword))
            except ValueError:
                return None
            return vals or None

        image_type = _strings(ds, "ImageType")
        return cls(study_uid=str(ds.get("StudyInstanceUID", "")),
                   series_uid=str(ds.get("SeriesInstanceUID", "")),
                   modality=_first(ds, "Modality"), number=_int(ds, "SeriesNumber"),
                   description=_first(ds, "SeriesDescription"),
                   n_instances=_int(ds, "NumberOfSeriesRelatedInstances"),
                   image_type=tuple(v.upper() for v in image_type) if image_type else None,
                   orientation=floats("ImageOrientationPatient"),
                   slice_thickness=_float(ds, "SliceThickness"),
                   pixel_spacing=floats("PixelSpacing"),
                   n_frames=_int(ds, "NumberOfFrames"))

    def needs_metadata(self) -> bool:
        """QIDO-RS servers need not return instance-level attributes for a series; then
        one instance's metadata is fetched."""
        return self.image_type is None or self.orientation is None or \
            self.slice_thickness is None

    def to_dict(self) -> dict[str, Any]:
        return {"study_instance_uid": self.study_uid, "series_instance_uid": self.series_uid,
                "modality": self.modality, "series_number": self.number,
                "series_description": self.description, "instances": self.n_instances,
                "image_type": list(self.image_type) if self.image_type else None,
                "orientation": list(self.orientation) if self.orientation else None,
                "slice_thickness_mm": self.slice_thickness}


@dataclass
class StoreResult:
    """What a STOW-RS store did: SOP instance UIDs stored, failed (with the reason), and
    warnings the server gave for stored instances."""

    stored: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def raise_for_failures(self, url: str) -> None:
        """:class:`~medseg.errors.PacsStoreError` naming the first failed files and why."""
        if not self.failed:
            return
        items = [f"{self.files.get(uid, uid)}: {why}" for uid, why in
                 list(self.failed.items())[:5]]
        more = f" (and {len(self.failed) - 5} more)" if len(self.failed) > 5 else ""
        raise PacsStoreError(f"STOW-RS: {len(self.failed)} of {len(self.files)} instance(s) "
                             f"not stored: {'; '.join(items)}{more}", url=url)


# -- the client --------------------------------------------------------------------------


def _reason_text(code: Any) -> str:
    try:
        n = int(code)
    except (TypeError, ValueError):
        return str(code)
    word = FAILURE_REASONS.get(n) or ("refused" if 0xA000 <= n < 0xD000 else "failed")
    return f"{word} (0x{n:04X})"


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
        shared = meta.get("SharedFunctionalGroupsSequence")
        if shared:
            group = shared[0]
            for seq, keyword in (("PlaneOrientationSequence", "ImageOrientationPatient"),
                                 ("PixelMeasuresSequence", "SliceThickness")):
                inner = group.get(seq)
                if inner and keyword not in meta and keyword in inner[0]:
                    setattr(meta, keyword, inner[0].get(keyword))
        full = SeriesRecord.from_dataset(meta)
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
