"""A study's outputs are one unit (medseg.io.atomic.output_unit, used by segment_study):
a reused output folder loses the earlier run's other outputs and keeps the user's files,
a failure or a full disk leaves the folder as it was, a crash at any step of the swap is
finished by the next run, and two runs into one folder are refused. In-process here; the
signals (SIGINT, SIGKILL) on a real `medseg segment` are in test_output_kills.py."""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import medseg.segment
from medseg.batch import runner
from medseg.cli import main
from medseg.errors import NotFoundError, OutputError
from medseg.io.atomic import (
    COMMIT_PREFIX,
    LOCK_NAME,
    STAGING_PREFIX,
    is_partial_of,
    output_unit,
    recover_outputs,
)
from medseg.io.dicom_seg import SEG_FILENAME
from medseg.io.dicom_sr import SR_FILENAME
from medseg.segment import OUTPUT_NAMES, REPORT_FILENAMES, SUMMARY_FILENAME, segment_study
from medseg.synth import write_phantom_study
from medseg.validation import MASK_NAME
from tests.conftest import need, small_tmpfs

DICOM_NAMES = {SEG_FILENAME, SR_FILENAME}
USER_FILE = "my notes.txt"


def listing(folder: Path) -> dict[str, bytes]:
    """Every entry of ``folder`` (hidden ones too) with the bytes of the files."""
    return {p.name: p.read_bytes() if p.is_file() else b"<dir>" for p in folder.iterdir()}


def visible(folder: Path) -> dict[str, bytes]:
    return {k: v for k, v in listing(folder).items() if not k.startswith(".")}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Path]]:
    root = tmp_path_factory.mktemp("unit-phantoms")
    return {seed: write_phantom_study(root / f"seed{seed}", seed=seed, shape=(24, 64, 64))
            for seed in (1, 2)}


# -- the mechanism, on plain files ----------------------------------------------------------

def _fill(folder: Path, names: list[str], tag: str) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(f"{tag}-{n}".encode())
    return {n: f"{tag}-{n}".encode() for n in names}


ALL = list(OUTPUT_NAMES)
NIFTI_ONLY = [MASK_NAME, SUMMARY_FILENAME]


@pytest.mark.parametrize(("old", "new"), [(ALL, NIFTI_ONLY), (NIFTI_ONLY, ALL)])
def test_unit_swaps_the_whole_set_and_keeps_other_files(tmp_path: Path, old: list[str],
                                                        new: list[str]) -> None:
    out = tmp_path / "out"
    _fill(out, old, "old")
    (out / USER_FILE).write_bytes(b"mine")
    (out / "sub").mkdir()
    with output_unit(out, names=OUTPUT_NAMES, record=SUMMARY_FILENAME) as staging:
        assert staging.parent == out and staging.name.startswith(STAGING_PREFIX)
        assert (out / LOCK_NAME).exists()
        expected = _fill(staging, new, "new")
        assert visible(out) == {**_fill(tmp_path / "x", old, "old"), USER_FILE: b"mine",
                                "sub": b"<dir>"}  # nothing moves before the commit
    assert listing(out) == {**expected, USER_FILE: b"mine", "sub": b"<dir>"}


def test_a_new_folder_is_made_and_removed_again_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    with pytest.raises(ZeroDivisionError), output_unit(out, names=OUTPUT_NAMES,
                                                       record=SUMMARY_FILENAME) as staging:
        _fill(staging, NIFTI_ONLY, "new")
        raise ZeroDivisionError
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("error", [ZeroDivisionError, KeyboardInterrupt])
def test_failure_or_ctrl_c_before_the_commit_leaves_the_folder_as_it_was(
        tmp_path: Path, error: type[BaseException]) -> None:
    out = tmp_path / "out"
    _fill(out, ALL, "old")
    (out / USER_FILE).write_bytes(b"mine")
    before = listing(out)
    with pytest.raises(error), output_unit(out, names=OUTPUT_NAMES,
                                           record=SUMMARY_FILENAME) as staging:
        _fill(staging, NIFTI_ONLY, "new")
        raise error
    assert listing(out) == before  # no lock, no staging folder, same bytes


def test_a_missing_record_commits_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = _fill(out, ALL, "old")
    with pytest.raises(OutputError, match=f"{SUMMARY_FILENAME} was not written"), \
            output_unit(out, names=OUTPUT_NAMES, record=SUMMARY_FILENAME) as staging:
        _fill(staging, [MASK_NAME], "new")
    assert listing(out) == before


def test_a_folder_under_an_output_name_is_refused_before_the_commit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = _fill(out, NIFTI_ONLY, "old")
    (out / SEG_FILENAME).mkdir()
    with pytest.raises(OutputError, match=f"{SEG_FILENAME}: is a folder"), \
            output_unit(out, names=OUTPUT_NAMES, record=SUMMARY_FILENAME) as staging:
        _fill(staging, NIFTI_ONLY, "new")
    assert listing(out) == {**before, SEG_FILENAME: b"<dir>"}


def test_a_second_run_into_the_folder_fails_fast(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with output_unit(out, names=OUTPUT_NAMES, record=SUMMARY_FILENAME) as staging:
        with pytest.raises(OutputError, match="another medseg run is writing into this "
                           "folder") as info, \
                output_unit(out, names=OUTPUT_NAMES, record=SUMMARY_FILENAME):
            pass
        assert info.value.path == str(out)
        _fill(staging, NIFTI_ONLY, "first")
    assert visible(out) == _fill(tmp_path / "x", NIFTI_ONLY, "first")
    assert not (out / LOCK_NAME).exists()


def test_leftovers_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = _fill(out, ALL, "old")
    leftovers = [f"{STAGING_PREFIX}abc123/lungs.nii.gz", ".lungs.seg.k3j_x9a2.partial.dcm",
                 ".segment.0a1b2c3d.partial.json", ".lungs.k3j_x9a2.partial.nii.gz"]
    for rel in leftovers:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"partial")
    (out / LOCK_NAME).write_bytes(b"")  # a killed run's lock file (the kernel freed the lock)
    mine = {".my.abc.partial.txt": b"a user's file", "notes.partial.dcm": b"also theirs"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    done = recover_outputs(out, OUTPUT_NAMES)
    assert len(done) == 4 and any("incomplete outputs" in d for d in done)
    assert listing(out) == {**old, **mine, LOCK_NAME: b""}  # the lock is the run's to remove
    with output_unit(out, names=OUTPUT_NAMES, record=SUMMARY_FILENAME) as staging:
        new = _fill(staging, NIFTI_ONLY, "new")
    assert listing(out) == {**new, **mine}


def test_is_partial_of() -> None:
    assert is_partial_of(".lungs.seg.k3j_x9a2.partial.dcm", SEG_FILENAME)
    assert is_partial_of(".lungs.abcdefgh.partial.nii.gz", MASK_NAME)
    assert not is_partial_of(".lungs.seg.k3j_x9a2.partial.dcm", SR_FILENAME)
    assert not is_partial_of(".lungs.seg..partial.dcm", SEG_FILENAME)
    assert not is_partial_of("lungs.seg.k3j_x9a2.partial.dcm", SEG_FILENAME)


class _Crash(BaseException):
    """A SIGKILL stand-in: not an Exception, so no handler on the way cleans up after it."""


def _count_swap_steps(tmp_path: Path, old: list[str], new: list[str],
                      monkeypatch: pytest.MonkeyPatch, crash_at: int | None) -> int:
    """Run a unit from ``old`` to ``new``, raising _Crash before the ``crash_at``-th file
    operation after the commit rename (``None``: no crash); returns how many there were."""
    out = tmp_path / "out"
    _fill(out, old, "old")
    (out / USER_FILE).write_bytes(b"mine")
    state = {"committed": False, "n": 0, "crashed": False}
    real = {name: getattr(os, name) for name in ("replace", "unlink", "rmdir", "rename")}

    def wrap(name: str) -> Callable[..., Any]:
        def op(src: Any, *args: Any, **kwargs: Any) -> Any:
            if name == "rename" and args and Path(args[0]).name.startswith(COMMIT_PREFIX):
                result = real[name](src, *args, **kwargs)
                state["committed"] = True
                return result
            if state["committed"] and not state["crashed"]:
                if state["n"] == crash_at:
                    state["crashed"] = True
                    raise _Crash
                state["n"] += 1
            return real[name](src, *args, **kwargs)
        return op

    for name in real:
        monkeypatch.setattr(os, name, wrap(name))
    try:
        with output_unit(out, names=OUTPUT_NAMES, record=SUMMARY_FILENAME) as staging:
            _fill(staging, new, "new")
    except _Crash:
        pass
    finally:
        monkeypatch.undo()
    return int(state["n"])


@pytest.mark.parametrize(("old", "new"), [(ALL, NIFTI_ONLY), (NIFTI_ONLY, ALL)])
def test_a_crash_at_any_step_of_the_swap_is_finished_by_the_next_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old: list[str],
        new: list[str]) -> None:
    steps = _count_swap_steps(tmp_path / "count", old, new, monkeypatch, None)
    assert steps >= len(new) + 1
    old_set = {**_fill(tmp_path / "o", old, "old"), USER_FILE: b"mine"}
    new_set = {**_fill(tmp_path / "n", new, "new"), USER_FILE: b"mine"}
    for k in range(steps):
        case = tmp_path / f"crash{k}"
        _count_swap_steps(case, old, new, monkeypatch, k)
        out = case / "out"
        now = visible(out)
        # the previous set, the new set, or (mid-swap) no record: the record is there
        # only with its own complete set; nothing foreign appears
        assert now in (old_set, new_set) or SUMMARY_FILENAME not in now, k
        assert set(now) <= set(old_set) | set(new_set), k
        assert all(now[n] in (old_set.get(n), new_set.get(n)) for n in now), k
        # the next run finishes the swap before it does anything, even if it then fails
        with pytest.raises(NotFoundError):
            segment_study(case / "no such input", out, method="threshold")
        assert listing(out) == new_set, k


# -- segment_study and `medseg segment` ------------------------------------------------------

def test_output_names_agree_with_the_writers_and_the_batch(phantoms: dict[int, dict[str, Path]],
                                                         tmp_path: Path) -> None:
    res = segment_study(phantoms[1]["image"], tmp_path, method="threshold")
    assert res.summary["outputs"]["report"] == sorted(REPORT_FILENAMES)
    assert set(visible(tmp_path)) == {MASK_NAME, SUMMARY_FILENAME, *REPORT_FILENAMES}
    assert frozenset(OUTPUT_NAMES) == runner._OUTPUT_NAMES


@pytest.mark.shared_data
def test_a_reused_folder_holds_only_the_new_study(shared_data: Path, tmp_path: Path,
                                                  phantoms: dict[int, dict[str, Path]]) -> None:
    """A real DICOM study (cip-ct64: SEG, SR, report), then another patient's NIfTI into the
    same folder, then --no-report, then DICOM again and --no-dicom-seg."""
    cip = need(shared_data, "cip-ct64/ct-64Dicom")
    out = tmp_path / "out"
    out.mkdir()
    (out / USER_FILE).write_bytes(b"mine")
    (out / "keep.dcm").write_bytes(b"a user's DICOM")
    assert main(["segment", str(cip), "-o", str(out), "--method", "threshold", "-q"]) == 0
    assert set(visible(out)) == {*OUTPUT_NAMES, USER_FILE, "keep.dcm"}
    cip_report = (out / "report.json").read_bytes()

    other = phantoms[2]["image"]
    assert main(["segment", str(other), "-o", str(out), "--method", "threshold", "-q"]) == 0
    assert set(visible(out)) == {MASK_NAME, SUMMARY_FILENAME, *REPORT_FILENAMES, USER_FILE,
                                 "keep.dcm"}  # the other patient's SEG and SR are gone
    summary = json.loads((out / SUMMARY_FILENAME).read_text())
    assert summary["input"]["path"] == str(other) and "dicom_seg" not in summary["outputs"]
    assert (out / "report.json").read_bytes() != cip_report
    assert json.loads((out / "report.json").read_text())["study_id"] == "image"

    assert main(["segment", str(other), "-o", str(out), "--method", "threshold", "-q",
                 "--no-report"]) == 0
    assert set(visible(out)) == {MASK_NAME, SUMMARY_FILENAME, USER_FILE, "keep.dcm"}

    assert main(["segment", str(cip), "-o", str(out), "--method", "threshold", "-q"]) == 0
    assert main(["segment", str(cip), "-o", str(out), "--method", "threshold", "-q",
                 "--no-dicom-seg", "--no-report"]) == 0
    assert listing(out).keys() == {MASK_NAME, SUMMARY_FILENAME, USER_FILE, "keep.dcm"}
    assert (out / USER_FILE).read_bytes() == b"mine"
    assert (out / "keep.dcm").read_bytes() == b"a user's DICOM"


def test_a_failing_run_leaves_the_previous_set(phantoms: dict[int, dict[str, Path]],
                                               tmp_path: Path) -> None:
    segment_study(phantoms[1]["dicom"], tmp_path, method="threshold")
    (tmp_path / USER_FILE).write_bytes(b"mine")
    before = listing(tmp_path)
    with pytest.raises(NotFoundError):
        segment_study(tmp_path / "missing.nii.gz", tmp_path, method="threshold")
    assert listing(tmp_path) == before


def test_a_failing_run_into_a_new_folder_leaves_no_folder(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        segment_study(tmp_path / "missing.nii.gz", tmp_path / "out", method="threshold")
    assert not (tmp_path / "out").exists()


def test_two_runs_into_one_folder(phantoms: dict[int, dict[str, Path]], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """While run A writes, run B (another patient) is refused at once, naming the folder;
    A's set is then complete and alone."""
    out = tmp_path / "out"
    real_save = medseg.segment.save
    started, release = threading.Event(), threading.Event()

    def slow_save(*args: Any, **kwargs: Any) -> Path:
        started.set()
        assert release.wait(60)
        return Path(real_save(*args, **kwargs))

    monkeypatch.setattr(medseg.segment, "save", slow_save)
    errors: list[BaseException] = []

    def run_a() -> None:
        try:
            segment_study(phantoms[1]["dicom"], out, method="threshold")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    a = threading.Thread(target=run_a)
    a.start()
    try:
        assert started.wait(60)
        monkeypatch.setattr(medseg.segment, "save", real_save)
        assert main(["segment", str(phantoms[2]["image"]), "-o", str(out), "--method",
                     "threshold", "-q"]) == 1
        err = capsys.readouterr().err
        assert f"{out}: another medseg run is writing into this folder" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        release.set()
        a.join(120)
    assert not errors
    summary = json.loads((out / SUMMARY_FILENAME).read_text())
    assert summary["input"]["path"] == str(phantoms[1]["dicom"])
    assert set(listing(out)) == set(OUTPUT_NAMES)


# -- a full disk -----------------------------------------------------------------------------

def _no_space(name: str) -> Callable[..., Any]:
    real = Path.write_bytes

    def write_bytes(self: Path, data: Any) -> int:
        if is_partial_of(self.name, name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    return write_bytes


@pytest.mark.parametrize("name", [SEG_FILENAME, SR_FILENAME])
def test_no_space_while_writing_leaves_the_previous_set(
        phantoms: dict[int, dict[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        name: str) -> None:
    """ENOSPC simulated in the writer (runs without root; the real tmpfs is below)."""
    out = tmp_path / "out"
    segment_study(phantoms[1]["image"], out, method="threshold")
    before = listing(out)
    monkeypatch.setattr(Path, "write_bytes", _no_space(name))
    with pytest.raises(OutputError, match="No space left on device") as info:
        segment_study(phantoms[2]["dicom"], out, method="threshold")
    assert info.value.path == str(out / name)  # the output named, not its staging copy
    assert listing(out) == before
    monkeypatch.undo()
    segment_study(phantoms[2]["dicom"], out, method="threshold")
    assert set(listing(out)) == set(OUTPUT_NAMES)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs, unmounted afterwards."""
    with small_tmpfs(tmp_path / "tiny", "1m", "the simulated ENOSPC tests cover the logic") as mnt:
        yield mnt


@pytest.mark.shared_data
def test_a_full_disk_leaves_the_previous_set_and_a_rerun_completes(
        shared_data: Path, tiny_disk: Path, phantoms: dict[int, dict[str, Path]]) -> None:
    """cip-ct64's outputs (about 700 kB: SEG, report with images) do not fit beside a 600 kB
    file on a 1 MB disk; after that file is deleted they do."""
    cip = need(shared_data, "cip-ct64/ct-64Dicom")
    out = tiny_disk / "out"
    segment_study(phantoms[1]["image"], out, method="threshold", report=False)
    (out / USER_FILE).write_bytes(b"mine")
    before = listing(out)
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * 600_000)
    assert main(["segment", str(cip), "-o", str(out), "--method", "threshold", "-q"]) == 1
    assert listing(out) == before  # nothing partial, no staging folder, no lock
    filler.unlink()  # space freed
    assert main(["segment", str(cip), "-o", str(out), "--method", "threshold", "-q"]) == 0
    assert set(listing(out)) == {*OUTPUT_NAMES, USER_FILE}
