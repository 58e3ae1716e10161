"""Connection settings of a DICOMweb server: the URL, TLS, timeouts and the credentials
(from the environment or a mode-600 auth file; never printed: their repr is hidden)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import requests

from medseg.errors import (
    ConfigError,
    NotFoundError,
)
from medseg.pacs.options import DICOMWEB_PREFIX

__all__ = ["ENV_PASSWORD", "ENV_TOKEN", "ENV_USER", "Credentials", "PacsConfig", "load_credentials",
           "make_config"]


ENV_USER = "MEDSEG_DICOMWEB_USER"


ENV_PASSWORD = "MEDSEG_DICOMWEB_PASSWORD"


ENV_TOKEN = "MEDSEG_DICOMWEB_TOKEN"


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
