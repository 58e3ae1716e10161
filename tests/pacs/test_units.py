"""The PACS support without a server: credentials, URLs, options and the series rules."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from medseg.cli import main
from medseg.errors import ConfigError, NotFoundError, SeriesSelectionError
from medseg.pacs import PacsBatchOptions, SelectionRules, SeriesRecord, choose_series
from medseg.pacs.batch import study_filters, study_uid_of
from medseg.pacs.client import Credentials, PacsClient, load_credentials, make_config
from medseg.pacs.select import tilt_deg

SECRET = "s3cr3t-Pa55"


def test_credentials_from_environment_are_hidden() -> None:
    creds = load_credentials(env={"MEDSEG_DICOMWEB_USER": "alice",
                                  "MEDSEG_DICOMWEB_PASSWORD": SECRET})
    assert creds.kind == "basic"
    config = make_config("http://pacs.example.org/dicom-web",
                         env={"MEDSEG_DICOMWEB_TOKEN": SECRET})
    client = PacsClient(config)
    for text in (repr(creds), str(creds), repr(config), str(config), repr(client),
                 repr(config.credentials.auth())):
        assert SECRET not in text
        assert "alice" not in text
    assert config.credentials.kind == "bearer"
    assert repr(config.credentials) == "Credentials(bearer from environment)"


def test_one_of_user_and_password_is_an_error() -> None:
    with pytest.raises(ConfigError, match="MEDSEG_DICOMWEB_PASSWORD"):
        load_credentials(env={"MEDSEG_DICOMWEB_USER": "alice"})
    assert load_credentials(env={}).kind == "none"


@pytest.mark.parametrize("content, kind", [
    (json.dumps({"username": "alice", "password": SECRET}), "basic"),
    (json.dumps({"token": SECRET}), "bearer"),
    (f"machine other.org login bob password x\nmachine pacs.example.org login alice "
     f"password {SECRET}\n", "basic"),
    (f"default login alice password {SECRET}\n", "basic"),
])
def test_auth_file(tmp_path: Path, content: str, kind: str) -> None:
    f = tmp_path / "auth"
    f.write_text(content)
    f.chmod(0o600)
    creds = load_credentials(f, host="pacs.example.org")
    assert creds.kind == kind
    assert SECRET in creds.secrets()
    assert creds.origin == f"auth file {f}"
    assert SECRET not in repr(creds)


def test_auth_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "auth.json"
    f.write_text(json.dumps({"token": SECRET}))
    f.chmod(0o644)
    with pytest.raises(ConfigError, match=r"other users \(mode 0644\).*chmod 600"):
        load_credentials(f)
    with pytest.raises(NotFoundError, match="no such auth file"):
        load_credentials(tmp_path / "missing")


@pytest.mark.parametrize("content, match", [
    ('{"user": "alice"}', "expected"),
    ('{"token": "x", "extra": 1}', "unknown key"),
    ("{not json", "not valid JSON"),
    ("machine elsewhere login a password b", "no 'machine pacs.example.org'"),
    (f"login alice password {SECRET}", "before any 'machine'"),
])
def test_bad_auth_files(tmp_path: Path, content: str, match: str) -> None:
    f = tmp_path / "auth"
    f.write_text(content)
    f.chmod(0o600)
    with pytest.raises(ConfigError, match=match) as info:
        load_credentials(f, host="pacs.example.org")
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("url, match", [
    (f"http://alice:{SECRET}@pacs.example.org/dicom-web", "holds credentials"),
    ("ftp://pacs.example.org/dicom-web", "not a DICOMweb root URL"),
    ("pacs.example.org/dicom-web", "not a DICOMweb root URL"),
    ("http://pacs.example.org/dicom-web?x=1", "no query string"),
    ("http://pacs.example.org:port/dicom-web", "not a valid URL"),
])
def test_bad_urls(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        make_config(url, env={})
    assert SECRET not in str(info.value)


def test_url_cleaning_and_tls_options(tmp_path: Path) -> None:
    cfg = make_config("dicomweb+https://pacs.example.org/dicom-web/", env={})
    assert cfg.url == "https://pacs.example.org/dicom-web"
    assert cfg.verify is True
    assert make_config(cfg.url, insecure=True, env={}).verify is False
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    assert make_config(cfg.url, ca_bundle=bundle, env={}).verify == str(bundle)
    with pytest.raises(ConfigError, match="not both"):
        make_config(cfg.url, ca_bundle=bundle, insecure=True, env={})
    with pytest.raises(NotFoundError, match="CA bundle"):
        make_config(cfg.url, ca_bundle=tmp_path / "none.pem", env={})


def test_study_sources_and_filters() -> None:
    uid = "1.2.840.113619.2.55.3"
    assert study_uid_of(f"dicomweb+http://h:8042/dicom-web/studies/{uid}") == uid
    with pytest.raises(ConfigError, match="not a DICOMweb study"):
        study_uid_of("dicomweb+http://h:8042/dicom-web")
    opts = PacsBatchOptions(modality="CT", date="20240101-", patient="P1")
    assert study_filters(opts) == {"ModalitiesInStudy": "CT", "StudyDate": "20240101-",
                                   "PatientID": "P1"}
    with pytest.raises(ConfigError, match="not both"):
        PacsBatchOptions(ca_bundle="x.pem", insecure=True)


AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def _series(uid: str, **kw: object) -> SeriesRecord:
    base = SeriesRecord(study_uid="1.2", series_uid=uid, modality="CT", number=1,
                        description=None, n_instances=100,
                        image_type=("ORIGINAL", "PRIMARY", "AXIAL"), orientation=AXIAL,
                        slice_thickness=1.0)
    return replace(base, **kw)  # type: ignore[arg-type]


def test_tilt() -> None:
    assert tilt_deg(AXIAL) == pytest.approx(0.0)
    assert tilt_deg(CORONAL) == pytest.approx(90.0)
    assert tilt_deg((1, 0, 0, 0, 0.9659258, -0.2588190)) == pytest.approx(15.0, abs=1e-4)
    assert tilt_deg((1, 0, 0, 1, 0, 0)) is None


def test_series_rules_prefer_thin_then_many() -> None:
    series = [
        _series("thick", slice_thickness=5.0, n_instances=60, number=2),
        _series("thin-short", slice_thickness=1.0, n_instances=200, number=3),
        _series("thin-long", slice_thickness=1.0, n_instances=300, number=4),
        _series("localizer", n_instances=2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                orientation=CORONAL),
        _series("coronal", orientation=CORONAL, slice_thickness=0.5),
        _series("mip", image_type=("DERIVED", "SECONDARY", "MIP"), slice_thickness=0.5),
        _series("dose", modality="SR", image_type=None, orientation=None),
        _series("tilted", orientation=(1, 0, 0, 0, 0.9659258, -0.2588190), slice_thickness=2),
    ]
    choice = choose_series(series)
    assert choice.series.series_uid == "thin-long"
    why = {r.series_uid: reason for r, reason in choice.rejected}
    assert "localizer" in why["localizer"]
    assert "not axial" in why["coronal"]
    assert "DERIVED" in why["mip"]
    assert "modality SR" in why["dose"]
    assert "eligible" in why["tilted"]
    assert "thinnest" not in choice.reason and "1 mm" in choice.reason
    oblique = choose_series(series, SelectionRules(axial=False, image_type=()))
    assert oblique.series.series_uid in ("coronal", "mip")


def test_no_eligible_series_says_why_for_each() -> None:
    series = [_series("mr", modality="MR"), _series("cor", orientation=CORONAL),
              _series("noimgtype", image_type=None)]
    with pytest.raises(SeriesSelectionError) as info:
        choose_series(series, study="9.9")
    msg = str(info.value)
    assert "study 9.9 has no eligible CT series" in msg
    assert "series mr (#1, MR): modality MR, not CT" in msg
    assert "series cor" in msg and "not axial" in msg
    assert "no ImageType" in msg
    with pytest.raises(SeriesSelectionError, match="has no series"):
        choose_series([])


def test_cli_arguments_are_validated(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["pacs", "query", "http://h/dicom-web", "--date", "2024-01-01"])
    assert info.value.code == 2
    assert "YYYYMMDD" in capsys.readouterr().err
    assert main(["pacs", "query", f"http://u:{SECRET}@h/dicom-web"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("medseg: error: ") and "holds credentials" in err
    assert SECRET not in err


def test_pacs_options_need_a_dicomweb_source(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["batch", str(tmp_path), "-o", str(tmp_path / "out"), "--push"]) == 1
    assert "need a DICOMweb SOURCE" in capsys.readouterr().err


def test_help_explains_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["pacs", "--help"], ["pacs", "pull", "--help"], ["batch", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    out = capsys.readouterr().out
    assert "medseg pacs pull  http://localhost:8042/dicom-web" in out
    assert "MEDSEG_DICOMWEB_TOKEN" in out
    assert "dicomweb+" in out


def test_credentials_object_defaults() -> None:
    assert Credentials().auth() is None
    assert Credentials().secrets() == []


def test_batch_pipeline_file_with_pacs(tmp_path: Path) -> None:
    from medseg.batch_cli import config_from_yaml

    f = tmp_path / "batch.yaml"
    f.write_text("job: batch\nsource: dicomweb+http://localhost:8042/dicom-web\n"
                 "out_dir: out\nmethod: threshold\n"
                 "pacs:\n  push: true\n  modality: CT\n  image_type: [ORIGINAL]\n")
    cfg = config_from_yaml(f)
    assert cfg.pacs == PacsBatchOptions(push=True, modality="CT", image_type=("ORIGINAL",))
    f.write_text("job: batch\nsource: dicomweb+http://h/dicom-web\nout_dir: o\n"
                 "pacs:\n  pussh: true\n")
    with pytest.raises(ConfigError, match=r"unknown key 'pacs\.pussh' \(did you mean 'push'\?\)"):
        config_from_yaml(f)
    f.write_text("job: batch\nsource: folder\nout_dir: o\npacs:\n  push: true\n")
    with pytest.raises(ConfigError, match="need a DICOMweb source"):
        config_from_yaml(f)
