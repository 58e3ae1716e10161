"""SIGINT and SIGKILL on a real `medseg segment` at the moment each output file is being
written, at the commit and during the swap; two runs started at once into one folder.

The subprocess is held at a chosen point by a ``sitecustomize`` module this test puts on the
subprocess's PYTHONPATH: it wraps ``os.replace``/``os.rename``/``os.unlink`` and, at the
point named in ``_TEST_HOLD_AT``, writes ``reached`` into ``_TEST_HOLD_DIR`` and waits for
``go`` there. The product has no test hooks; only this harness reads those variables.

After each interruption the output folder must hold the complete previous set or the
complete new set (during the swap: no record, see medseg.io.atomic), and the next run,
even one that fails on its own input, leaves nothing else behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medseg.errors import NotFoundError
from medseg.io.atomic import COMMITTED_MESSAGE
from medseg.io.dicom_seg import SEG_FILENAME
from medseg.io.dicom_sr import SR_FILENAME
from medseg.segment import OUTPUT_NAMES, REPORT_FILENAMES, SUMMARY_FILENAME, segment_study
from medseg.synth import write_phantom_study
from medseg.validation import MASK_NAME

pytestmark = pytest.mark.slow

USER_FILE = "my notes.txt"
NIFTI_SET = {MASK_NAME, SUMMARY_FILENAME, *REPORT_FILENAMES}  # a NIfTI input with a report
DICOM_SET = set(OUTPUT_NAMES)
BARE_SET = {MASK_NAME, SUMMARY_FILENAME}  # NIfTI, --no-report
#: Outputs whose bytes depend only on the input (the SEG/SR carry new UIDs, segment.json
#: timings).
STABLE = (MASK_NAME, "report.json", "report.csv")

SITECUSTOMIZE = '''
import os, signal, time

signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever the parent ignored
_AT = os.environ.get("_TEST_HOLD_AT", "")
_DIR = os.environ.get("_TEST_HOLD_DIR", "")
if _AT and _DIR:
    _KIND, _, _NAME = _AT.partition(":")
    _real = {"replace": os.replace, "rename": os.rename, "unlink": os.unlink}

    def _hold():
        open(os.path.join(_DIR, "reached"), "w").close()
        end = time.monotonic() + 120
        while not os.path.exists(os.path.join(_DIR, "go")) and time.monotonic() < end:
            time.sleep(0.01)

    def _parent(p):
        return os.path.basename(os.path.dirname(os.fspath(p)))

    def _base(p):
        return os.path.basename(os.fspath(p))

    def _wants(op, src, dst):
        if _KIND == "write":  # an output renamed into place in the staging folder
            return op == "replace" and _base(dst) == _NAME and \\
                _parent(dst).startswith(".medseg-staging-")
        if _KIND == "commit":
            return op == "rename" and _base(dst).startswith(".medseg-commit-")
        if _KIND == "swap":  # a new output moved from the commit folder
            return op == "replace" and _base(src) == _NAME and \\
                _parent(src).startswith(".medseg-commit-")
        if _KIND == "unlink":  # an old output deleted from the output folder
            return op == "unlink" and _base(src) == _NAME and \\
                not _parent(src).startswith(".")
        return False

    def _wrap(op):
        def f(src, dst=None, *args, **kwargs):
            if _wants(op, src, dst):
                _hold()
            if op == "unlink":
                return _real[op](src, *args, **kwargs)
            return _real[op](src, dst, *args, **kwargs)
        return f

    for _op in _real:
        setattr(os, _op, _wrap(_op))
'''


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kill-phantoms")
    one = write_phantom_study(root / "one", seed=1, shape=(24, 64, 64))
    two = write_phantom_study(root / "two", seed=2, shape=(24, 64, 64))
    return {"old_nifti": one["image"], "old_dicom": one["dicom"], "new_dicom": two["dicom"],
            "new_nifti": two["image"]}


@pytest.fixture(scope="module")
def references(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, dict[str, bytes]]:
    """The stable outputs of each input run alone (threshold, with a report)."""
    refs = {}
    for key, path in inputs.items():
        out = tmp_path_factory.mktemp(f"ref-{key}")
        segment_study(path, out, method="threshold")
        refs[key] = {n: (out / n).read_bytes() for n in STABLE}
    return refs


@pytest.fixture
def harness(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (tmp_path / "ctl").mkdir()
    return tmp_path


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() if p.is_file() else b"<dir>" for p in folder.iterdir()}


def visible(folder: Path | dict[str, bytes]) -> dict[str, bytes]:
    """The entries of a folder (or of a :func:`listing`) that are not hidden."""
    entries = folder if isinstance(folder, dict) else listing(folder)
    return {k: v for k, v in entries.items() if not k.startswith(".")}


def start(harness: Path, input_path: Path, out: Path, *extra: str, hold: str | None = None
          ) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(harness / "site"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if hold:
        env.update(_TEST_HOLD_AT=hold, _TEST_HOLD_DIR=str(harness / "ctl"))
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from medseg.cli import main; sys.exit(main())",
         "segment", str(input_path), "-o", str(out), "--method", "threshold", "-q", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_reached(proc: subprocess.Popen[str], harness: Path) -> None:
    end = time.monotonic() + 180
    while not (harness / "ctl" / "reached").exists():
        if proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before the hold point: "
                        f"{proc.communicate()[1]}")
        assert time.monotonic() < end, "the hold point was never reached"
        time.sleep(0.02)


def assert_set_of(out: Path, input_path: Path, names: set[str], ref: dict[str, bytes]) -> None:
    """``out`` holds exactly the complete outputs of ``input_path`` (and the user's file)."""
    now = listing(out)
    assert set(now) == names | {USER_FILE}, sorted(now)
    assert now[USER_FILE] == b"mine"
    assert json.loads(now[SUMMARY_FILENAME])["input"]["path"] == str(input_path)
    for name in STABLE:
        if name in names:
            assert now[name] == ref[name], name


def previous(out: Path, input_path: Path) -> dict[str, bytes]:
    segment_study(input_path, out, method="threshold")
    (out / USER_FILE).write_bytes(b"mine")
    return listing(out)


def rerun_that_fails(out: Path) -> None:
    """A run into ``out`` that fails on its input: it still recovers the folder first."""
    with pytest.raises(NotFoundError):
        segment_study(out.parent / "no-such-input", out, method="threshold")


WRITES = sorted(DICOM_SET)


@pytest.mark.parametrize("name", WRITES)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_while_an_output_is_written(harness: Path, inputs: dict[str, Path],
                                                references: dict[str, dict[str, bytes]],
                                                name: str, sig: int) -> None:
    out = harness / "out"
    before = previous(out, inputs["old_nifti"])
    proc = start(harness, inputs["new_dicom"], out, hold=f"write:{name}")
    wait_reached(proc, harness)
    assert any(p.name.startswith(".medseg-staging-") for p in out.iterdir())
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert err.strip().splitlines() == [
            f"medseg: interrupted: {out}: nothing written, the output folder is as it was"]
        assert listing(out) == before  # exactly: no staging folder, no lock, no partial file
        return
    assert proc.returncode == -signal.SIGKILL
    assert visible(out) == visible(before)  # leftovers are hidden, the set untouched
    rerun_that_fails(out)
    assert listing(out) == before  # the next run removed the leftovers
    segment_study(inputs["new_dicom"], out, method="threshold")
    assert_set_of(out, inputs["new_dicom"], DICOM_SET, references["new_dicom"])


def test_sigint_at_the_commit_rename_lets_the_swap_finish(
        harness: Path, inputs: dict[str, Path], references: dict[str, dict[str, bytes]]) -> None:
    """Ctrl-C held at the commit rename itself: the rename is under way, so the swap
    finishes and the message says the new outputs are complete."""
    out = harness / "out"
    previous(out, inputs["old_nifti"])
    proc = start(harness, inputs["new_dicom"], out, hold="commit")
    wait_reached(proc, harness)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    (harness / "ctl" / "go").touch()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines() == [f"medseg: interrupted: {out}: {COMMITTED_MESSAGE}"]
    assert_set_of(out, inputs["new_dicom"], DICOM_SET, references["new_dicom"])


def test_sigkill_at_the_commit_rename(harness: Path, inputs: dict[str, Path],
                                      references: dict[str, dict[str, bytes]]) -> None:
    out = harness / "out"
    before = previous(out, inputs["old_nifti"])
    proc = start(harness, inputs["new_dicom"], out, hold="commit")
    wait_reached(proc, harness)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert visible(out) == visible(before)
    rerun_that_fails(out)
    assert listing(out) == before


SWAPS = [  # (previous input, new input, new run's options, new set, hold point)
    ("old_nifti", "new_dicom", (), DICOM_SET, f"unlink:{SUMMARY_FILENAME}"),
    ("old_nifti", "new_dicom", (), DICOM_SET, f"swap:{MASK_NAME}"),
    ("old_nifti", "new_dicom", (), DICOM_SET, f"swap:{SEG_FILENAME}"),
    ("old_nifti", "new_dicom", (), DICOM_SET, f"swap:{SUMMARY_FILENAME}"),
    ("old_dicom", "new_nifti", ("--no-report",), BARE_SET, f"unlink:{SR_FILENAME}"),
    ("old_dicom", "new_nifti", ("--no-report",), BARE_SET, "unlink:report.html"),
    ("old_dicom", "new_nifti", ("--no-report",), BARE_SET, f"swap:{SUMMARY_FILENAME}"),
]


@pytest.mark.parametrize(("old", "new", "new_args", "new_set", "hold"), SWAPS,
                         ids=[f"{s[0]}-{s[1]}-{s[4]}" for s in SWAPS])
def test_sigkill_during_the_swap_is_finished_by_the_next_run(
        harness: Path, inputs: dict[str, Path], references: dict[str, dict[str, bytes]],
        old: str, new: str, new_args: tuple[str, ...], new_set: set[str], hold: str) -> None:
    out = harness / "out"
    before = previous(out, inputs[old])
    proc = start(harness, inputs[new], out, *new_args, hold=hold)
    wait_reached(proc, harness)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    now = visible(out)
    old_set = visible(before)
    # the previous set, or (mid-swap) no record: never a record beside another run's files
    assert now == old_set or SUMMARY_FILENAME not in now
    assert any(p.name.startswith(".medseg-commit-") for p in out.iterdir())
    rerun_that_fails(out)  # finishes the swap first thing
    assert_set_of(out, inputs[new], new_set, references[new])


def test_sigint_during_the_swap_finishes_it(harness: Path, inputs: dict[str, Path],
                                            references: dict[str, dict[str, bytes]]) -> None:
    out = harness / "out"
    previous(out, inputs["old_dicom"])
    proc = start(harness, inputs["new_nifti"], out, "--no-report",
                 hold=f"swap:{MASK_NAME}")
    wait_reached(proc, harness)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None  # held back until the swap is done
    (harness / "ctl" / "go").touch()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines() == [f"medseg: interrupted: {out}: {COMMITTED_MESSAGE}"]
    assert_set_of(out, inputs["new_nifti"], BARE_SET, references["new_nifti"])


def test_two_runs_started_at_once(harness: Path, inputs: dict[str, Path],
                                  references: dict[str, dict[str, bytes]]) -> None:
    """Patient A (DICOM) and patient B (NIfTI) into one folder at the same time: one is
    refused (or, if they did not overlap, both succeed one after the other); the folder
    holds one patient's complete set, never a mix."""
    out = harness / "out"
    out.mkdir()
    (out / USER_FILE).write_bytes(b"mine")
    runs = {"new_dicom": start(harness, inputs["new_dicom"], out),
            "old_nifti": start(harness, inputs["old_nifti"], out)}
    results = {k: (p.communicate(timeout=180)[1], p.returncode)[::-1]
               for k, p in runs.items()}
    codes = sorted(rc for rc, _ in results.values())
    assert codes in ([0, 1], [0, 0]), results
    for rc, err in results.values():
        if rc == 1:
            assert err.strip().splitlines() == [
                f"medseg: error: {out}: another medseg run is writing into this folder (it "
                "holds .medseg.lock): wait for it to finish or use another output folder"]
    winner = json.loads((out / SUMMARY_FILENAME).read_text())["input"]["path"]
    key = next(k for k in runs if str(inputs[k]) == winner)
    assert_set_of(out, inputs[key], DICOM_SET if key == "new_dicom" else NIFTI_SET,
                  references[key])
