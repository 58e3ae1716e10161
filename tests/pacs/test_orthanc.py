"""``medseg pacs`` and ``medseg batch dicomweb+URL`` against a real Orthanc: query, pull,
segment, push, and the SEG read back from the server; bad input of every kind gives one
clear line, leaves nothing half-written, and never shows the credentials."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from medseg.cli import main
from medseg.errors import PacsError
from medseg.io import load
from medseg.volume import CTVolume
from tests.batch.conftest import assert_nothing_partial, db_rows, study_dirs
from tests.conftest import need
from tests.pacs.conftest import (
    USER,
    Orthanc,
    Studies,
    TlsServer,
    free_port,
    rewrite_series,
)

pytestmark = pytest.mark.shared_data


@pytest.fixture
def creds(orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch) -> Orthanc:
    """The test user's credentials in the environment, as a user would set them."""
    for k, v in orthanc.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MEDSEG_DICOMWEB_TOKEN", raising=False)
    return orthanc


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_no_secret(orthanc: Orthanc, *texts: str) -> None:
    basic = base64.b64encode(f"{USER}:{orthanc.password}".encode()).decode()
    for text in texts:
        assert orthanc.password not in text
        assert basic not in text


def labels_on_planes(labels: CTVolume, sources: list[pydicom.Dataset]) -> np.ndarray:
    """The label of the nearest voxel at every pixel centre of each source image (world
    positions from the image's own position, orientation and pixel spacing)."""
    out = []
    for ds in sources:
        ipp = np.array(ds.ImagePositionPatient, float)
        iop = np.array(ds.ImageOrientationPatient, float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        rr, cc = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        world = (ipp + cc.reshape(-1, 1) * dc * iop[:3] + rr.reshape(-1, 1) * dr * iop[3:])
        idx = np.rint(labels.geometry.world_to_index(world)).astype(int)
        out.append(labels.array[idx[:, 2], idx[:, 1], idx[:, 0]].reshape(ds.Rows, ds.Columns))
    return np.stack(out)


def check_seg(seg_file: Path, mask_file: Path, source_dir: Path, series_uid: str) -> None:
    """The SEG decodes to the mask of ``lungs.nii.gz`` on every source image and
    references the source series."""
    seg = hd.seg.segread(seg_file)
    refs = seg.ReferencedSeriesSequence
    assert [r.SeriesInstanceUID for r in refs] == [series_uid]
    sources = [pydicom.dcmread(f) for f in sorted(source_dir.glob("*.dcm"))]
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    assert {str(i.ReferencedSOPInstanceUID) for i in refs[0].ReferencedInstanceSequence} \
        <= set(uids)
    decoded = seg.get_pixels_by_source_instance(uids, combine_segments=True,
                                                assert_missing_frames_are_empty=True,
                                                dtype=np.uint8)
    expected = labels_on_planes(load(mask_file), sources)
    assert expected.any()
    np.testing.assert_array_equal(decoded, expected)


# -- query, pull, segment, push ------------------------------------------------------------


def test_query_by_patient_modality_and_date(studies: Studies, creds: Orthanc,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    url = creds.url
    rc, out, _ = run(["pacs", "query", url, "--patient", "123456", "--json"], capsys)
    assert rc == 0
    found = json.loads(out)
    assert [s["study_instance_uid"] for s in found] == [studies.cip]
    assert found[0]["instances"] == 79 and found[0]["modalities"] == ["CT"]
    assert "patient_id" not in found[0]  # no PHI unless asked
    rc, out, _ = run(["pacs", "query", url, "--modality", "CT", "--json"], capsys)
    uids = {s["study_instance_uid"] for s in json.loads(out)}
    assert {studies.cip, studies.philips} <= uids
    rc, out, _ = run(["pacs", "query", url, "--date", "20070101-20071231"], capsys)
    assert rc == 0 and studies.philips in out and studies.cip not in out
    rc, out, _ = run(["pacs", "query", url, "--patient", "123456", "--show-phi"], capsys)
    assert "PatientID" in out and "123456" in out
    rc, out, _ = run(["pacs", "query", url, "--study", studies.philips, "--series"], capsys)
    assert rc == 0
    assert f"would segment: {studies.philips_series}" in out and "2 mm slices" in out


def test_pull_segment_push_and_read_the_seg_back(
        studies: Studies, creds: Orthanc, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """End to end with the shipped model: the SEG on the server is the mask of
    lungs.nii.gz, on the pulled series."""
    url, ct, seg = creds.url, tmp_path / "ct", tmp_path / "seg"
    rc, out, err = run(["pacs", "pull", url, studies.cip, "--select", "-o", str(ct)], capsys)
    assert rc == 0, err
    assert f"pulled 79 instance(s) of series {studies.cip_series}" in out
    assert len(list(ct.iterdir())) == 79
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # no temporary folder left
    rc, _, err = run(["segment", str(ct), "-o", str(seg), "-q"], capsys)
    assert rc == 0, err
    seg_file, sr_file = seg / "lungs.seg.dcm", seg / "lungs.sr.dcm"
    rc, out, err = run(["pacs", "push", url, str(seg_file), str(sr_file)], capsys)
    assert rc == 0, err
    assert "stored 2 of 2 instance(s)" in out
    # read both back from the server, by their UIDs
    for f, modality in ((seg_file, "SEG"), (sr_file, "SR")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert ds.Modality == modality and ds.StudyInstanceUID == studies.cip
        back = tmp_path / f"back-{modality}"
        rc, out, err = run(["pacs", "pull", url, studies.cip, "--series",
                            str(ds.SeriesInstanceUID), "-o", str(back)], capsys)
        assert rc == 0, err
        files = list(back.iterdir())
        assert [pydicom.dcmread(p).SOPInstanceUID for p in files] == [ds.SOPInstanceUID]
        if modality == "SEG":
            check_seg(files[0], seg / "lungs.nii.gz", ct, studies.cip_series)
    assert_no_secret(creds, out, err)


def _study_id(uid: str) -> str:
    return uid  # UIDs are made of digits and dots: the sanitised id is the UID itself


def test_batch_from_pacs_with_push(studies: Studies, creds: Orthanc, shared_data: Path,
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "out"
    argv = ["batch", f"dicomweb+{creds.url}", "-o", str(out_dir), "--push", "--method",
            "threshold", "--pacs-date", "20060101-20071231", "--pacs-modality", "CT"]
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    ids = {_study_id(studies.cip), _study_id(studies.philips)}
    assert study_dirs(out_dir) == ids
    assert not (out_dir / ".pacs-cache").exists()
    rows = db_rows(out_dir)
    client = creds.client()
    for sid, series in ((studies.cip, studies.cip_series),
                        (studies.philips, studies.philips_series)):
        row = rows[_study_id(sid)]
        assert row["status"] == "done"
        assert row["source"] == f"dicomweb+{creds.url}/studies/{sid}"
        pacs = json.loads(row["result"])["pacs"]
        assert pacs["series_instance_uid"] == series
        assert len(pacs["pushed"]) == 2
        local = {str(pydicom.dcmread(out_dir / sid / n, stop_before_pixels=True)
                     .SOPInstanceUID) for n in ("lungs.seg.dcm", "lungs.sr.dcm")}
        assert set(pacs["pushed"]) == local
        on_server = {r.series_uid for r in client.search_series(sid)}
        for n in ("lungs.seg.dcm", "lungs.sr.dcm"):
            ds = pydicom.dcmread(out_dir / sid / n, stop_before_pixels=True)
            assert ds.SeriesInstanceUID in on_server
    check_seg(out_dir / studies.philips / "lungs.seg.dcm",
              out_dir / studies.philips / "lungs.nii.gz",
              need(shared_data, "chest-ct-philips-141"), studies.philips_series)
    assert_no_secret(creds, out, err, (out_dir / "summary.csv").read_text())
    # a second run finds both done: nothing pulled or pushed again
    rc, out, err = run(argv, capsys)
    assert rc == 0 and "2 already done" in out


def test_batch_goes_on_past_bad_studies(orthanc: Orthanc, creds: Orthanc, studies: Studies,
                                        shared_data: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """An MR study (no CT series) and a CT whose series misses slices fail with their
    reason; the good study is segmented and pushed; exit status 1."""
    cip = need(shared_data, "cip-ct64/ct-64Dicom")
    mr = need(shared_data, "dicom2nifti/tests/data/ge/anatomical/001")
    bad = tmp_path / "bad"
    rewrite_series(mr, bad / "mr", patient_id="MEDSEG-BAD", study_date="19990101")
    rewrite_series(cip, bad / "gap", patient_id="MEDSEG-BAD", study_date="19990101",
                   drop=lambda n: n in (40, 41, 42))
    rewrite_series(cip, bad / "good", patient_id="MEDSEG-BAD", study_date="19990101")
    orthanc.upload(bad)
    uid = {name: str(pydicom.dcmread(next((bad / name).iterdir())).StudyInstanceUID)
           for name in ("mr", "gap", "good")}
    out_dir = tmp_path / "out"
    rc, out, err = run(["batch", f"dicomweb+{creds.url}", "-o", str(out_dir), "--push",
                        "--method", "threshold", "--pacs-patient", "MEDSEG-BAD",
                        "--max-attempts", "1"], capsys)
    assert rc == 1
    rows = db_rows(out_dir)
    assert rows[uid["good"]]["status"] == "done"
    mr_row, gap_row = rows[uid["mr"]], rows[uid["gap"]]
    assert mr_row["status"] == gap_row["status"] == "failed"
    assert mr_row["error_type"] == "SeriesSelectionError"
    assert "no eligible CT series" in mr_row["error_message"]
    assert "modality MR, not CT" in mr_row["error_message"]
    assert gap_row["error_type"] == "MissingSlicesError"
    # the error names the study on the server, not the deleted local copy
    assert ".pacs-cache" not in gap_row["error_message"]
    assert f"dicomweb+{creds.url}/studies/{uid['gap']}" in gap_row["error_message"]
    assert "medseg: error: 2 of 3 studies failed" in err
    assert uid["mr"] in err and uid["gap"] in err
    assert_nothing_partial(out_dir, {uid["mr"], uid["gap"]})
    assert study_dirs(out_dir) == {uid["good"]}
    assert not (out_dir / ".pacs-cache").exists()
    # nothing was stored for the failed studies, the SEG and SR for the good one
    client = creds.client()
    assert {r.modality for r in client.search_series(uid["gap"])} == {"CT"}
    assert {r.modality for r in client.search_series(uid["good"])} == {"CT", "SEG", "SR"}
    assert_no_secret(creds, out, err)


# -- bad input -------------------------------------------------------------------------------


def test_server_down(creds: Orthanc, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    rc, out, err = run(["pacs", "query", url, "--retries", "0"], capsys)
    assert rc == 1 and out == ""
    assert err.startswith(f"medseg: error: {url}: QIDO-RS studies: cannot connect")
    assert "Connection refused" in err and len(err.strip().splitlines()) == 1
    rc, out, err = run(["pacs", "pull", url, "1.2.3", "-o", str(tmp_path / "ct"),
                        "--retries", "0"], capsys)
    assert rc == 1 and "cannot connect" in err
    assert not list(tmp_path.iterdir())
    out_dir = tmp_path / "out"
    rc, out, err = run(["batch", f"dicomweb+{url}", "-o", str(out_dir), "--pacs-retries",
                        "0", "-q"], capsys)
    assert rc == 1 and "cannot connect" in err
    assert not study_dirs(out_dir)
    assert_no_secret(creds, out, err)


def test_wrong_url_and_unknown_study(creds: Orthanc, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    wrong = creds.url.replace("/dicom-web", "/nope")
    rc, _, err = run(["pacs", "query", wrong], capsys)
    assert rc == 1 and "HTTP 404 Not Found" in err and "DICOMweb root" in err
    rc, _, err = run(["pacs", "query", creds.http_root], capsys)  # Orthanc's REST root
    assert rc == 1 and "DICOMweb root" in err
    dest = tmp_path / "ct"
    rc, _, err = run(["pacs", "pull", creds.url, "1.2.3.4.5", "-o", str(dest)], capsys)
    assert rc == 1 and "study 1.2.3.4.5 is not on the server" in err
    assert not list(tmp_path.iterdir())
    assert_no_secret(creds, err)


def test_wrong_credentials(orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str],
                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-" + orthanc.password
    monkeypatch.setenv("MEDSEG_DICOMWEB_USER", USER)
    monkeypatch.setenv("MEDSEG_DICOMWEB_PASSWORD", wrong)
    rc, out, err = run(["pacs", "query", orthanc.url], capsys)
    assert rc == 1
    assert "HTTP 401 Unauthorized" in err and "credentials from environment were refused" in err
    rc, out2, err2 = run(["batch", f"dicomweb+{orthanc.url}", "-o", str(tmp_path / "o")],
                         capsys)
    assert rc == 1 and "HTTP 401" in err2
    monkeypatch.delenv("MEDSEG_DICOMWEB_USER")
    monkeypatch.delenv("MEDSEG_DICOMWEB_PASSWORD")
    rc, _, err3 = run(["pacs", "query", orthanc.url], capsys)
    assert rc == 1 and "none were given" in err3
    # a token file: refused too, and the token never shown
    token = tmp_path / "token.json"
    token.write_text('{"token": "tok-' + orthanc.password + '"}')
    token.chmod(0o600)
    rc, _, err4 = run(["pacs", "query", orthanc.url, "--auth-file", str(token)], capsys)
    assert rc == 1 and "bearer credentials from auth file" in err4
    for text in (out, err, out2, err2, err3, err4, caplog.text):
        assert wrong not in text and orthanc.password not in text
        assert base64.b64encode(f"{USER}:{wrong}".encode()).decode() not in text


def test_credentials_never_logged_on_success(studies: Studies, creds: Orthanc,
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    rc, out, err = run(["pacs", "query", creds.url, "--study", studies.cip, "--series"],
                       capsys)
    assert rc == 0
    rc, out2, err2 = run(["pacs", "pull", creds.url, studies.cip, "-o",
                          str(tmp_path / "ct")], capsys)
    assert rc == 0
    assert "GET" in caplog.text  # the HTTP layer did log, at debug level
    assert_no_secret(creds, out, err, out2, err2, caplog.text)


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A DICOMweb URL whose server accepts connections and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                held.append(conn)
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/dicom-web"
    stop.set()
    t.join(timeout=2)
    for c in held:
        c.close()
    sock.close()


def test_timeout(silent_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(["pacs", "query", silent_server, "--timeout", "0.5", "--retries", "0"],
                     capsys)
    assert rc == 1
    assert "no answer within 0.5 s (timeout)" in err


def test_pull_is_atomic(studies: Studies, creds: Orthanc, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    client = creds.client()
    (rec,) = client.search_series(studies.cip, {"Modality": "CT"})
    dest = tmp_path / "ct"
    # the server sends fewer instances than QIDO-RS announced: an interrupted transfer
    with pytest.raises(PacsError, match="received 79 of the 80 instances"):
        client.pull(studies.cip, dest, series=[replace(rec, n_instances=80)])
    assert not list(tmp_path.iterdir())
    # a folder that holds something is never overwritten
    dest.mkdir()
    (dest / "mine.txt").write_text("x")
    rc, _, err = run(["pacs", "pull", creds.url, studies.cip, "-o", str(dest)], capsys)
    assert rc == 1 and "exists and is not an empty folder" in err
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


def test_push_reports_refused_instances(creds: Orthanc, shared_data: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Orthanc refuses an instance without a StudyInstanceUID (a 400 whose body lists
    what was stored and what failed); push names the file and the reason, counts what was
    stored, and exits 1."""
    good = rewrite_series(need(shared_data, "cip-ct64/ct-64Dicom"), tmp_path / "good",
                          patient_id="MEDSEG-PUSH", study_date="19980101",
                          drop=lambda n: n > 0)
    ds = pydicom.dcmread(next(good.iterdir()))
    del ds.StudyInstanceUID
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    bad = tmp_path / "odd.dcm"
    ds.save_as(bad, enforce_file_format=True)
    rc, out, err = run(["pacs", "push", creds.url, str(good), str(bad)], capsys)
    assert rc == 1
    assert "stored 1 of 2 instance(s)" in out
    assert "STOW-RS: 1 of 2 instance(s) not stored" in err and str(bad) in err
    rc, _, err = run(["pacs", "push", creds.url, str(tmp_path / "none")], capsys)
    assert rc == 1 and "no such file or folder" in err


# -- TLS -------------------------------------------------------------------------------------


def test_tls_verified_by_default(tls_server: TlsServer,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    url = tls_server.url
    rc, _, err = run(["pacs", "query", url, "--retries", "0"], capsys)
    assert rc == 1 and "TLS failure" in err and "--ca-bundle" in err
    assert "CERTIFICATE_VERIFY_FAILED" in err
    rc, out, err = run(["pacs", "query", url, "--ca-bundle", str(tls_server.cert)], capsys)
    assert rc == 0 and "0 studies" in out and err == ""
    rc, out, err = run(["pacs", "query", url, "--insecure"], capsys)
    assert rc == 0 and "0 studies" in out
    assert err.startswith("medseg: warning:") and "not verified" in err
