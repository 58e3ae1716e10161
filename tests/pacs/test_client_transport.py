"""PacsClient's answers to what a real server does that Orthanc will not do on demand (403,
500, 503, a server that ignores QIDO paging, a STOW-RS answer that leaves an instance
out), through its documented test seam: ``PacsClient(config, session=...)`` with a
``requests.Session`` whose ``request`` returns crafted responses. No network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import medseg.pacs.client as client_mod
from medseg.errors import PacsAuthError, PacsConnectionError, PacsError, PacsStoreError
from medseg.pacs.client import PacsClient, make_config

ROOT = "http://pacs.test/dicom-web"


class FakeServer(requests.Session):
    """Answers each request with ``handler(method, url, params, body) -> (status, json)``
    and records what was asked."""

    def __init__(self, handler: Any) -> None:
        super().__init__()
        self.handler = handler
        self.calls: list[tuple[str, str, dict[str, list[str]]]] = []

    def request(self, method: str | bytes, url: str | bytes, *args: Any,  # type: ignore[override]
                **kwargs: Any) -> requests.Response:
        method, url = str(method), str(url)
        params = kwargs.get("params") or {}
        query = parse_qs(urlsplit(url).query)
        query.update({k: [str(v)] if not isinstance(v, list) else [str(x) for x in v]
                      for k, v in dict(params).items()})
        self.calls.append((method, url, query))
        status, payload = self.handler(method, url, query, kwargs.get("data"))
        resp = requests.Response()
        resp.status_code = status
        resp.reason = {200: "OK", 403: "Forbidden", 500: "Internal Server Error",
                       503: "Service Unavailable", 409: "Conflict"}.get(status, "")
        resp.url = url
        resp._content = json.dumps(payload).encode() if payload is not None else b""
        resp.headers["Content-Type"] = "application/dicom+json"
        resp.request = requests.Request(method, url).prepare()
        return resp


def _client(handler: Any) -> tuple[PacsClient, FakeServer]:
    server = FakeServer(handler)
    config = make_config(ROOT, retries=0, env={})
    return PacsClient(config, session=server), server


def _study(i: int) -> dict[str, Any]:
    ds = Dataset()
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.1.{i}"
    ds.StudyDescription = f"study {i}"
    return ds.to_json_dict()


@pytest.mark.parametrize(("status", "error", "words"), [
    (403, PacsAuthError, "not allowed"),
    (503, PacsConnectionError, "busy or unavailable"),
    (500, PacsError, "HTTP 500"),
])
def test_http_errors_become_medseg_errors(status: int, error: type, words: str) -> None:
    pacs, _ = _client(lambda *a: (status, None))
    with pytest.raises(error, match=words) as exc:
        pacs.search_studies()
    assert ROOT in str(exc.value)  # the message names the server
    assert "Authorization" not in str(exc.value)


def test_paging_follows_offsets_to_a_short_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_mod, "QIDO_PAGE", 3)
    studies = [_study(i) for i in range(7)]

    def handler(method: str, url: str, query: dict[str, list[str]], body: Any
                ) -> tuple[int, Any]:
        offset = int(query.get("offset", ["0"])[0])
        limit = int(query["limit"][0])
        return 200, studies[offset:offset + limit]

    pacs, server = _client(handler)
    found = pacs.search_studies()
    assert [s.study_uid for s in found] == [s["0020000D"]["Value"][0] for s in studies]
    assert len(server.calls) == 3  # 3 + 3 + 1: the short page ends it


def test_paging_stops_when_the_server_ignores_offset(monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    monkeypatch.setattr(client_mod, "QIDO_PAGE", 3)
    same = [_study(i) for i in range(3)]
    pacs, server = _client(lambda *a: (200, same))
    found = pacs.search_studies()
    assert len(found) == 3
    assert len(server.calls) == 2  # the second page brought nothing new: no endless loop


def _instance(tmp_path: Path, name: str) -> tuple[Path, str]:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SEG"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


def _stow_answer(stored: list[str], failed: dict[str, int]) -> dict[str, Any]:
    ans = Dataset()
    ans.ReferencedSOPSequence = []
    for uid in stored:
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
        item.ReferencedSOPInstanceUID = uid
        ans.ReferencedSOPSequence.append(item)
    if failed:
        ans.FailedSOPSequence = []
        for uid, reason in failed.items():
            item = Dataset()
            item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
            item.ReferencedSOPInstanceUID = uid
            item.FailureReason = reason
            ans.FailedSOPSequence.append(item)
    return ans.to_json_dict()


def test_stow_instance_missing_from_the_answer_is_a_failure(tmp_path: Path) -> None:
    (a, uid_a), (b, uid_b) = _instance(tmp_path, "a.dcm"), _instance(tmp_path, "b.dcm")
    pacs, server = _client(lambda *args: (200, _stow_answer([uid_a], {})))
    with pytest.raises(PacsStoreError, match="missing from the server's STOW-RS answer") \
            as exc:
        pacs.store([a, b])
    assert "b.dcm" in str(exc.value) and "1 of 2" in str(exc.value)
    result = pacs.store([a, b], check=False)
    assert result.stored == [uid_a] and set(result.failed) == {uid_b}
    assert all(m == "POST" for m, *_ in server.calls)


def test_stow_refusal_409_reports_each_reason(tmp_path: Path) -> None:
    (a, uid_a), (b, uid_b) = _instance(tmp_path, "a.dcm"), _instance(tmp_path, "b.dcm")
    pacs, _ = _client(lambda *args: (409, _stow_answer([uid_a], {uid_b: 0xA700})))
    result = pacs.store([a, b], check=False)
    assert result.stored == [uid_a]
    assert "0xA700" in result.failed[uid_b]
