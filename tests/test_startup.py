"""Commands that do not run the network start without torch and MONAI (issue 14: importing
them takes 4-9 s of a fresh process on a 2-core VM). Checked in a child process, since this
test process has imported them already."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import json, sys
from medseg.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "monai")
                                                  if m in sys.modules)}))
"""


def _run(args: list[str]) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True,
                         text=True, cwd=ROOT, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_info_does_not_import_torch() -> None:
    res = _run(["info", "sample_data/phantom_000/dicom"])
    assert res == {"code": 0, "heavy": []}


@pytest.mark.parametrize("report", [True, False])
def test_threshold_segmentation_does_not_import_torch(tmp_path: Path, report: bool) -> None:
    args = ["segment", "sample_data/phantom_000/dicom", "-o", str(tmp_path / "out"),
            "--method", "threshold", "-q"]
    res = _run(args if report else [*args, "--no-report"])
    assert res == {"code": 0, "heavy": []}
    assert (tmp_path / "out" / "lungs.nii.gz").is_file()
    if report:  # the report still names torch's version (read from its metadata)
        provenance = json.loads((tmp_path / "out" / "report.json").read_text())["provenance"]
        assert provenance["torch"]


_MONAI_PROBE = """
import json, sys
import medseg._monai
skipped = sorted(m for m in medseg._monai.UNUSED_BY_MEDSEG if m in sys.modules)
markers = sorted(m for m, v in sys.modules.items() if v is None and m in
                 medseg._monai.UNUSED_BY_MEDSEG)
import matplotlib, matplotlib.pyplot, scipy.signal
print(json.dumps({"skipped_loaded": skipped, "markers_left": markers,
                  "hilbert": callable(scipy.signal.hilbert),
                  "pyplot": callable(matplotlib.pyplot.figure)}))
"""


def test_monai_is_imported_without_pyplot_and_scipy_signal_which_stay_importable() -> None:
    """medseg._monai imports MONAI without matplotlib (package and pyplot) and scipy.signal
    (0.7 s of the segment command); the 'not importable' markers are gone afterwards, so
    medseg and the user's code import them as usual."""
    out = subprocess.run([sys.executable, "-c", _MONAI_PROBE], capture_output=True,
                         text=True, cwd=ROOT, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"skipped_loaded": [], "markers_left": [], "hilbert": True, "pyplot": True}


def test_medseg_imports_monai_only_through_its_shim() -> None:
    """Every medseg module imports MONAI's names from medseg._monai (or after it), so that
    the first import of MONAI in a process is the trimmed one."""
    import re

    offenders = []
    for path in sorted((ROOT / "medseg").rglob("*.py")):
        if path.name == "_monai.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"(from monai[\w.]* import|import monai)", line):  # module level
                offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert offenders == []


_FREEZE_PROBE = """
import gc, json, sys
from medseg.cli import main
own = sys.argv[1] == "own"
args = sys.argv[2:]
if own:
    sys.argv = ["medseg", *args]
code = main() if own else main(args)
print(json.dumps({"code": code, "frozen": gc.get_freeze_count()}))
"""


@pytest.mark.parametrize("method", ["threshold", "unet"])
@pytest.mark.parametrize("own", [True, False])
def test_command_freezes_the_heap_before_exit(tmp_path: Path, own: bool, method: str) -> None:
    """As the process's own command (argv None) the command freezes what is alive after the
    model load and before the interpreter's exit, which would otherwise walk every object
    torch and MONAI made (0.9 s of 6.6 s on chest-ct-philips-141, medseg._alloc); a caller's
    main(argv) keeps its heap, with or without the network."""
    args = ["segment", "sample_data/phantom_000/dicom", "-o", str(tmp_path / "out"),
            "--method", method, "-q", "--no-report"]
    out = subprocess.run([sys.executable, "-c", _FREEZE_PROBE, "own" if own else "lib", *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["code"] == 0
    assert (res["frozen"] > 0) is own
