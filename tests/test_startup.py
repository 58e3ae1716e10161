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
