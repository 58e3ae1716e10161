"""medseg segment: bad input is refused or warned about, never a crash or a silent empty
mask; outputs are deterministic and never half-written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import medseg
from medseg.cli import main
from medseg.errors import InputError, ModalityError
from medseg.inference.unet import random_model
from medseg.segment import segment, segment_study
from medseg.volume import CTVolume, Geometry, VolumeMetadata
from tests.conftest import need


def _chest(shape=(24, 64, 64), spacing=(5.0, 5.0, 8.0)) -> CTVolume:
    """A crude chest: body, two air-filled lungs, noise (threshold method finds them)."""
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    arr = np.full(shape, -1000.0)
    arr[(x / 0.9) ** 2 + (y / 0.7) ** 2 < 1] = 40
    for cx in (-0.4, 0.4):
        arr[((x - cx) / 0.3) ** 2 + (y / 0.45) ** 2 + (z / 0.9) ** 2 < 1] = -850
    arr += rng.normal(0, 10, shape)
    return CTVolume(arr.astype(np.int16), Geometry(origin=(-160, -160, -90), spacing=spacing),
                    VolumeMetadata(modality="CT"))


def test_threshold_finds_both_lungs_right_is_patient_right() -> None:
    res = segment(_chest(), method="threshold")
    v = res.volumes_ml()
    assert v["right"] > 1000 and v["left"] > 1000 and not res.warnings
    lab = res.labels
    k, j, i = np.nonzero(lab.array == 1)
    x_right = lab.geometry.index_to_world(np.c_[i, j, k])[:, 0].mean()
    k, j, i = np.nonzero(lab.array == 2)
    x_left = lab.geometry.index_to_world(np.c_[i, j, k])[:, 0].mean()
    assert x_right < x_left  # LPS: +x is patient left


def test_threshold_airway_open_above_the_body() -> None:
    """The scan extends above the body and a trachea joins both lungs to that air: in 3D all
    that air would be 'outside'; slice by slice the lungs are still found."""
    vol = _chest()
    arr = vol.array.copy()
    z, y, x = np.meshgrid(*[np.arange(n) for n in arr.shape], indexing="ij")
    arr[(z >= 10) & ((x - 32) ** 2 + (y - 30) ** 2 <= 4)] = -1000   # trachea up to the top
    arr[(z == 10) & (np.abs(y - 30) <= 1) & (x > 18) & (x < 46)] = -1000  # bronchi to lungs
    arr[-3:] = -1000  # air above the body
    res = segment(vol.with_array(arr), method="threshold")
    v = res.volumes_ml()
    assert v["right"] > 1000 and v["left"] > 1000


def test_not_hu_refused() -> None:
    vol = _chest()
    raw = vol.with_array((vol.array.astype(np.int32) + 1024).astype(np.int16))  # rescale lost
    with pytest.raises(InputError, match="does not look like CT in Hounsfield units"):
        segment(raw, method="threshold")
    norm = vol.with_array(((vol.array + 1024) / 4000.0).astype(np.float32))
    with pytest.raises(InputError, match="Hounsfield"):
        segment(norm, method="threshold")


def test_all_air_refused() -> None:
    vol = _chest()
    with pytest.raises(InputError, match="every voxel is air"):
        segment(vol.with_array(np.full(vol.shape, -1000, np.int16)), method="threshold")


def test_non_ct_refused() -> None:
    vol = _chest()
    vol.metadata.modality = "MR"
    with pytest.raises(ModalityError, match="modality is MR"):
        segment(vol, method="threshold")


def test_three_slices_warned() -> None:
    vol = _chest(shape=(3, 64, 64))
    res = segment(vol, method="unet", model=random_model())
    assert res.labels.shape == vol.shape
    assert any("only 3 slices" in w for w in res.warnings)


def test_empty_result_is_a_warning_not_silent(tmp_path: Path) -> None:
    vol = _chest()
    _, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in vol.shape], indexing="ij")
    body_only = vol.with_array(np.where((x / 0.9) ** 2 + (y / 0.7) ** 2 < 1, 40, -1000)
                               .astype(np.int16))  # a body with no air inside: no lungs
    res = segment(body_only, method="threshold")
    assert any("no lung found" in w for w in res.warnings)


def test_bad_input_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vol = _chest()
    src = medseg.save(vol.with_array(np.full(vol.shape, -1000, np.int16)), tmp_path / "air.nii.gz")
    out = tmp_path / "out"
    assert main(["segment", str(src), "-o", str(out), "--method", "threshold"]) == 1
    assert "every voxel is air" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_outputs_and_determinism(tmp_path: Path) -> None:
    src = medseg.save(_chest(), tmp_path / "ct.nii.gz")
    model = random_model()
    a = segment_study(src, tmp_path / "a", model=model)
    b = segment_study(src, tmp_path / "b", model=model)
    assert (tmp_path / "a" / "lungs.nii.gz").read_bytes() == \
        (tmp_path / "b" / "lungs.nii.gz").read_bytes()
    summary = json.loads((tmp_path / "a" / "segment.json").read_text())
    assert summary["medseg_version"] == medseg.__version__
    assert summary["model"]["sha256"] == "random"
    assert summary["input"]["shape_zyx"] == [24, 64, 64]
    assert set(summary["volumes_ml"]) == {"right", "left", "total"}
    for key in ("enclosed_tissue_ml", "image_edge_lung_ml"):
        added = summary["postprocess"][key]
        assert set(added) == {"right", "left"} and min(added.values()) >= 0
    assert summary["timings_s"]["total"] > 0
    assert a.summary["volumes_ml"] == b.summary["volumes_ml"]


@pytest.mark.shared_data
@pytest.mark.parametrize("method", ["threshold", "unet"])
def test_head_ct_warned(shared_data: Path, method: str) -> None:
    """A head phantom (BodyPartExamined BRAIN, air inserts): both warnings, also when the
    header says nothing (as from NIfTI)."""
    vol = medseg.load(need(shared_data, "dcm-qa-ct/In/Philips"))
    res = segment(vol, method=method)
    assert any("BodyPartExamined is 'BRAIN'" in w for w in res.warnings), res.warnings
    vol.metadata.body_part = None
    res = segment(vol, method=method)
    assert any("that is air, not lung" in w for w in res.warnings), res.warnings
