"""The command line, in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import medseg
from medseg.cli import main
from medseg.volume import CTVolume, Geometry
from tests.conftest import need


def _nifti(tmp_path: Path) -> Path:
    vol = CTVolume(np.arange(60, dtype=np.int16).reshape(3, 4, 5),
                   Geometry(origin=(1, 2, 3), spacing=(0.5, 0.6, 2.0)))
    return medseg.save(vol, tmp_path / "in.nii.gz")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"medseg {medseg.__version__}"


def _subcommands() -> list[str]:
    import argparse

    from medseg.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_every_subcommand_is_tested_for_help() -> None:
    assert set(_subcommands()) >= {"info", "convert", "segment", "evaluate", "train",
                                   "validate-model", "run", "synth", "qc", "batch", "pacs",
                                   "listen"}


@pytest.mark.parametrize("cmd", [[], *([c] for c in _subcommands())])
def test_help_explains(cmd: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Every command's --help says what it does and shows its options (not a bare usage)."""
    with pytest.raises(SystemExit) as exc:
        main([*cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: medseg" in out and len(out.splitlines()) > 5
    assert "-h, --help" in out
    if cmd:  # a description beyond the one-line usage
        assert len(out.split("options:")[0].split()) > 25, out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_info_nifti(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _nifti(tmp_path)
    assert main(["info", str(path)]) == 0
    assert "NIFTI volume 5x4x3" in capsys.readouterr().out
    assert main(["info", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["shape_zyx"] == [3, 4, 5] and data["orientation"] == "LPS"


def test_convert_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _nifti(tmp_path)
    out = tmp_path / "out" / "ct.nrrd"
    assert main(["convert", str(src), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    a, b = medseg.load(src), medseg.load(out)
    np.testing.assert_array_equal(a.array, b.array)
    assert a.geometry.is_close(b.geometry)


def test_errors_are_one_line_and_exit_1(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "o.nii.gz")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("medseg: error: ") and "missing: no such file" in err
    assert len(err.strip().splitlines()) == 1
    src = _nifti(tmp_path)
    assert main(["convert", str(src), str(tmp_path / "o.png")]) == 1
    assert "unknown output format" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["info", str(empty)]) == 1
    assert "the folder is empty" in capsys.readouterr().err


@pytest.mark.shared_data
def test_info_and_convert_dicom(shared_data: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    folder = need(shared_data, "dcm-qa-ct/In/GE")
    assert main(["info", str(folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (series,) = data["series"]
    assert data["chosen_series"] == series["series_instance_uid"]
    assert series["gantry_tilt_deg"] == pytest.approx(18.5, abs=0.01)
    assert series["slice_spacing_mm"]["min"] < series["slice_spacing_mm"]["max"]
    assert main(["info", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "correction: gantry tilt 18.50 deg" in text and "would use:" in text
    out = tmp_path / "ge.nii.gz"
    assert main(["convert", str(folder), str(out)]) == 0
    assert "correction: variable slice spacing" in capsys.readouterr().out
    assert medseg.load(out).shape == medseg.load(folder).shape


@pytest.mark.shared_data
def test_info_says_what_segment_would_refuse(shared_data: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    mr = need(shared_data, "dicom2nifti/tests/data/ge/anatomical/001")
    assert main(["info", str(mr), "--json"]) == 0  # loadable (convert works on MR) ...
    check = json.loads(capsys.readouterr().out)["segment"]
    assert check["accepted"] is False and "needs CT" in check["reason"]
    assert main(["info", str(mr)]) == 0
    assert "segment would refuse it: modality is MR" in capsys.readouterr().out
    assert main(["segment", str(mr), "-o", str(tmp_path / "o")]) == 1  # ... and segment refuses
    assert "needs CT" in capsys.readouterr().err
    ct = need(shared_data, "cip-ct64/ct-64Dicom")
    assert main(["info", str(ct), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["segment"]["accepted"] is True


@pytest.mark.shared_data
def test_refused_series_reason(shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = need(shared_data, "dicom2nifti/tests/data/failing/sliceincrement/001")
    assert main(["convert", str(folder), "/nonexistent/never.nii.gz"]) == 1
    err = capsys.readouterr().err
    assert f"medseg: error: {folder}" in err and "slice(s) missing" in err


@pytest.mark.parametrize("argv", [["segment", "x.nii.gz", "-o", "o", "--threads", "0"],
                                  ["segment", "x.nii.gz", "-o", "o", "--batch-size", "-2"],
                                  ["synth", "-o", "o", "--count", "0"]])
def test_counts_below_one_refused_where_they_enter(argv: list[str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "must be at least 1, got" in capsys.readouterr().err


def test_config_records_raise_medseg_errors() -> None:
    from medseg.errors import ConfigError
    from medseg.train import TrainConfig, TrainingConfig

    with pytest.raises(ConfigError, match=r"training\.epochs must be at least 1, got 0"):
        TrainConfig(training=TrainingConfig(epochs=0))
