"""Which studies a batch holds: the folder rule, manifests, ids, references."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from medseg.batch.sources import discover_studies, read_manifest, sanitize_id
from medseg.errors import ConfigError, InputError, NotFoundError
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize(("name", "expected"), [
    ("CT 001 (Smith)", "CT_001__Smith_"),
    ("study.v2-final", "study.v2-final"),
    ("..", "_."),
    (".hidden", "_hidden"),
    ("a/b\\c", "a_b_c"),
    ("Müller", "M_ller"),
    ("", "study"),
    ("validation", "validation_"),
    ("Summary.csv", "Summary.csv_"),
])
def test_sanitize_id(name: str, expected: str) -> None:
    assert sanitize_id(name) == expected


def test_folder_rule(tmp_path: Path, make_phantom: Callable[..., Path]) -> None:
    src = tmp_path / "cohort"
    make_phantom(src / "b DICOM", 1)
    make_phantom(src / "a_study", 2, "study")  # dicom/ + image.nii.gz + labels.nii.gz
    make_phantom(src / "c.nii.gz", 3, "image")
    (src / "README.txt").write_text("not a study")
    (src / "scan.raw").write_bytes(b"\0" * 10)
    make_phantom(src / ".hidden", 4)
    out = src / "out"
    out.mkdir()
    studies = discover_studies(src, exclude=out)
    assert [(s.study_id, Path(s.source).name) for s in studies] == [
        ("a_study", "a_study"), ("b_DICOM", "b DICOM"), ("c", "c.nii.gz")]
    assert all(Path(s.source).is_absolute() for s in studies)


def test_ids_stay_unique_also_across_case(tmp_path: Path,
                                          make_phantom: Callable[..., Path]) -> None:
    src = tmp_path / "cohort"
    for name in ("a b", "a_b", "A_B"):
        make_phantom(src / name, 1)
    assert [s.study_id for s in discover_studies(src)] == ["A_B", "a_b-2", "a_b-3"]


def test_slices_directly_in_source_are_refused(tmp_path: Path,
                                               make_phantom: Callable[..., Path]) -> None:
    series = make_phantom(tmp_path / "series", 1)
    with pytest.raises(InputError, match=r"single-frame DICOM file.*sub-folder") as exc:
        discover_studies(series)
    assert str(series) in str(exc.value)


def test_empty_or_missing_source(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no study found"):
        discover_studies(tmp_path)
    with pytest.raises(NotFoundError, match="no such folder"):
        discover_studies(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ConfigError, match="folder of studies or a manifest"):
        discover_studies(tmp_path / "x.txt")


def test_manifest_paths_are_relative_to_the_manifest(tmp_path: Path,
                                                     make_phantom: Callable[..., Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    make_phantom(data / "p1", 1, "study")
    manifest = data / "lists" / "cohort.csv"
    manifest.parent.mkdir()
    manifest.write_text("\ufeffstudy_id,path,reference\n"
                        "first one,../p1/dicom,../p1/labels.nii.gz\n"
                        "\n"
                        f"second,{data / 'p1' / 'image.nii.gz'},\n")
    monkeypatch.chdir(tmp_path)  # not the manifest's folder: paths must not depend on it
    studies = discover_studies(manifest)
    assert [s.study_id for s in studies] == ["first_one", "second"]
    assert studies[0].source == str(data / "p1" / "dicom")
    assert studies[0].reference == str(data / "p1" / "labels.nii.gz")
    assert studies[1].reference is None


@pytest.mark.parametrize(("text", "message"), [
    ("study_id,path,refrence\na,b,c\n", "unknown column.*'refrence'"),
    ("study_id,reference\na,b\n", "column 'path' is missing"),
    ("study_id,path\na,x\na,y\n", "line 3: study_id 'a' is already used on line 2"),
    ("study_id,path\na\n", "line 2: 1 value"),
    ("study_id,path\n,x\n", "line 2: study_id and path must not be empty"),
    ("study_id,path\n", "lists no study"),
    ("", "empty"),
])
def test_manifest_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(ConfigError, match=message) as exc:
        read_manifest(manifest)
    assert str(manifest) in str(exc.value)


def test_reference_dir_matches_name_or_id(tmp_path: Path,
                                          make_phantom: Callable[..., Path]) -> None:
    src = tmp_path / "cohort"
    make_phantom(src / "case 1", 1)
    make_phantom(src / "case2", 2)
    make_phantom(src / "case3", 3)
    refs = tmp_path / "refs"
    make_phantom(refs / "case 1.nii.gz", 1, "image")  # by the folder's name
    make_phantom(refs / "case2.nii.gz", 2, "image")  # by the id
    studies = discover_studies(src, reference_dir=refs)
    assert [Path(s.reference).name if s.reference else None for s in studies] == [
        "case 1.nii.gz", "case2.nii.gz", None]
    with pytest.raises(NotFoundError, match="reference folder"):
        discover_studies(src, reference_dir=tmp_path / "nope")


def test_shipped_sample_manifest_resolves() -> None:
    studies = discover_studies(REPO_ROOT / "pipelines" / "sample_manifest.csv")
    assert [s.study_id for s in studies] == ["phantom_000"]
    assert Path(studies[0].source).is_dir()
    assert studies[0].reference is not None and Path(studies[0].reference).is_file()
