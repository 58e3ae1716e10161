"""References in another label convention (a 0/255 mask from another tool): ``medseg
segment --reference-labels`` and ``medseg batch --reference-labels`` read them; without the
convention they are refused with the values found, never scored wrongly."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import medseg
from medseg.batch import run_batch
from medseg.cli import main
from medseg.errors import ConfigError, InputError
from medseg.segment import segment_study
from tests.batch.conftest import threshold_config


def _mask_255(study: Path, dest: Path) -> Path:
    labels = medseg.load(study / "labels.nii.gz")
    return medseg.save(labels.with_array(np.where(labels.array > 0, 255, 0).astype(np.uint8)),
                       dest)


def test_segment_reads_a_255_reference_through_its_convention(
        phantom_pool: Callable[[int], Path], tmp_path: Path) -> None:
    study = phantom_pool(1)
    ref = _mask_255(study, tmp_path / "ref.nii.gz")
    with pytest.raises(InputError, match="255"):
        segment_study(study / "image.nii.gz", tmp_path / "a", method="threshold",
                      reference=ref)
    assert not (tmp_path / "a" / "segment.json").exists()
    res = segment_study(study / "image.nii.gz", tmp_path / "b", method="threshold",
                        reference=ref, reference_labels="lung=255")
    metrics = json.loads((tmp_path / "b" / "report.json").read_text())["metrics"]
    assert set(metrics) == {"lung"} and metrics["lung"]["dice"] > 0.8
    assert res.summary["outputs"]["report"]
    with pytest.raises(ConfigError):
        segment_study(study / "image.nii.gz", tmp_path / "c", reference=ref,
                      reference_labels="lung=oops")


def test_segment_cli_option(phantom_pool: Callable[[int], Path], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    study = phantom_pool(1)
    ref = _mask_255(study, tmp_path / "ref.nii.gz")
    assert main(["segment", str(study / "image.nii.gz"), "-o", str(tmp_path / "o"),
                 "--method", "threshold", "--reference", str(ref), "--reference-labels",
                 "lung=255", "-q"]) == 0
    assert main(["segment", str(study / "image.nii.gz"), "-o", str(tmp_path / "p"),
                 "--method", "threshold", "--reference-labels", "lung=255", "-q"]) == 1
    assert "--reference-labels applies to --reference" in capsys.readouterr().err


def test_batch_reads_255_references(make_phantom: Callable[..., Path],
                                    phantom_pool: Callable[[int], Path],
                                    tmp_path: Path) -> None:
    src, refs = tmp_path / "cohort", tmp_path / "refs"
    refs.mkdir()
    for seed in (1, 2):
        make_phantom(src / f"p{seed}", seed)
        _mask_255(phantom_pool(seed), refs / f"p{seed}.nii.gz")
    out = tmp_path / "out"
    result = run_batch(threshold_config(src, out, reference_dir=str(refs),
                                        reference_labels="lung=255"))
    assert not result.failed
    with open(out / "summary.csv", newline="") as fh:
        rows = {r["study_id"]: r for r in csv.DictReader(fh)}
    assert all(float(rows[s]["lung_dice"]) > 0.8 for s in ("p1", "p2"))
    # the default convention refuses the 255 values: each study fails, naming them
    out2 = tmp_path / "out2"
    failed = run_batch(threshold_config(src, out2, reference_dir=str(refs))).failed
    assert {r.study_id for r in failed} == {"p1", "p2"}
    assert all("255" in (r.error_message or "") for r in failed)
    with pytest.raises(ConfigError):
        threshold_config(src, out2, reference_labels="lung=oops")
