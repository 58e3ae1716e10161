"""Lung measurements on volumes with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import InputError
from medseg.quantify import _kernel_is_sharp, acquisition_warnings, quantify
from medseg.volume import CTVolume, Geometry, VolumeMetadata


def _case(meta: VolumeMetadata | None = None) -> tuple[CTVolume, CTVolume]:
    """Right lung: 1000 voxels, 10% at -1000 HU, the rest -850; left: 500 voxels at -700.
    Voxel 2 x 2 x 2.5 mm = 0.01 mL."""
    hu = np.full((10, 30, 40), 40, np.int16)
    lab = np.zeros(hu.shape, np.uint8)
    lab[1:9, 5:25, 2:9] = 1          # 8*20*7 = 1120 -> trim to 1000 below
    lab[1:9, 5:25, 2:9].flat[1000:] = 0
    r = lab == 1
    vals = np.full(int(r.sum()), -850, np.int16)
    vals[:100] = -1000
    hu[r] = vals
    lab[2:7, 5:25, 30:35] = 2        # 5*20*5 = 500
    hu[lab == 2] = -700
    geo = Geometry(origin=(0, 0, 0), spacing=(2.0, 2.0, 2.5))
    meta = meta or VolumeMetadata(convolution_kernel="B30f", slice_thickness_mm=1.0,
                                  source_format="dicom")
    return CTVolume(hu, geo, meta), CTVolume(lab, geo)


def test_known_answers() -> None:
    image, labels = _case()
    q = quantify(image, labels)
    m = q["measurements"]
    assert m["right"]["n_voxels"] == 1000 and m["left"]["n_voxels"] == 500
    assert m["right"]["volume_ml"] == pytest.approx(10.0)
    assert m["left"]["volume_ml"] == pytest.approx(5.0)
    assert m["lung"]["volume_ml"] == pytest.approx(15.0)
    assert m["right"]["mld_hu"] == pytest.approx(0.1 * -1000 + 0.9 * -850)
    assert m["right"]["laa950_pct"] == pytest.approx(10.0)
    assert m["left"]["laa950_pct"] == 0.0
    assert m["lung"]["laa950_pct"] == pytest.approx(100 * 100 / 1500, abs=1e-3)
    assert m["right"]["pd15_hu"] == pytest.approx(-850)  # 10% at -1000 < 15th percentile
    assert m["left"]["pd15_hu"] == pytest.approx(-700)
    assert sum(q["histogram"]["counts"]["lung"]) == 1500
    assert q["warnings"] == []


def test_empty_mask_has_no_density_and_no_error() -> None:
    image, labels = _case()
    q = quantify(image, labels.with_array(np.zeros(labels.shape, np.uint8)))
    assert q["measurements"]["lung"]["volume_ml"] == 0.0
    assert q["measurements"]["lung"]["mld_hu"] is None


def test_lung_touching_the_field_of_view_is_warned() -> None:
    image, labels = _case()
    lab = labels.array.copy()
    lab[0, 10, 5] = 1
    q = quantify(image, labels.with_array(lab))
    assert any("first slice" in w for w in q["warnings"])


def test_grid_mismatch_refused() -> None:
    image, labels = _case()
    other = CTVolume(labels.array, Geometry(origin=(1, 0, 0), spacing=(2.0, 2.0, 2.5)))
    with pytest.raises(InputError, match="grid"):
        quantify(image, other)


@pytest.mark.parametrize("meta,expected", [
    (VolumeMetadata(convolution_kernel="B70f", slice_thickness_mm=1.0, source_format="dicom"),
     "sharp reconstruction kernel"),
    (VolumeMetadata(convolution_kernel="STANDARD", slice_thickness_mm=5.0,
                    source_format="dicom"), "slice thickness 5.00 mm"),
    (VolumeMetadata(convolution_kernel="B30f", slice_thickness_mm=1.0, contrast_agent="Iomeron",
                    source_format="dicom"), "contrast agent"),
    (VolumeMetadata(source_format="nifti"), "kernel not recorded"),
])
def test_acquisition_warnings(meta: VolumeMetadata, expected: str) -> None:
    image, _ = _case(meta)
    assert any(expected in w for w in acquisition_warnings(image))


@pytest.mark.parametrize("kernel,sharp", [
    ("B30f", False), ("B60f", True), ("Br64", True), ("Br40", False), ("I70f\\3", True),
    ("STANDARD", False), ("SOFT", False), ("LUNG", True), ("BONEPLUS", True), ("B", False),
    ("C", False), ("L", True), ("YA", True), ("FC13", False), ("FC52", True), ("Qr60", True),
])
def test_kernel_table(kernel: str, sharp: bool) -> None:
    assert _kernel_is_sharp(kernel) is sharp
