"""The shipped default model (DEFAULT_MODEL) on real content: accuracy on phantoms, the same mask in
world space whatever the storage orientation (also oblique), determinism, and the
chest-ct-philips-141 checks of the model card (volume, both lungs, the lesion inside)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

import medseg
from medseg.io.itkformats import from_sitk, to_sitk
from medseg.models import DEFAULT_MODEL, load_model
from medseg.segment import segment, segment_study
from medseg.volume import CTVolume
from tests.conftest import REPO_ROOT, need
from tests.helpers import dice, labels_on_grid, reindex

SAMPLE = REPO_ROOT / "sample_data" / "phantom_000"


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def phantom() -> tuple[CTVolume, CTVolume]:
    return medseg.load(SAMPLE / "image.nii.gz"), medseg.load(SAMPLE / "labels.nii.gz")


@pytest.fixture(scope="module")
def phantom_mask(phantom, model) -> CTVolume:
    return segment(phantom[0], model=model).labels


def test_shipped_model_is_accurate_on_the_sample_phantom(phantom, phantom_mask) -> None:
    ref = phantom[1].array
    for label in (1, 2):
        assert dice(phantom_mask.array == label, ref == label) >= 0.95


@pytest.mark.parametrize("case", [
    ((0, 1, 2), (True, True, False)),    # RAS storage
    ((0, 1, 2), (False, False, True)),   # slices stored superior -> inferior
    ((0, 2, 1), (False, True, False)),   # stored as coronal slices
    ((1, 0, 2), (True, False, False)),   # rows and columns swapped, flipped
])
def test_same_mask_in_world_space_for_any_storage_order(
        tmp_path: Path, phantom, phantom_mask, model, case) -> None:
    other = reindex(phantom[0], *case)
    src = medseg.save(other, tmp_path / "other.nii.gz")
    segment_study(src, tmp_path / "out", model=model)
    mask = medseg.load(tmp_path / "out" / "lungs.nii.gz")
    assert mask.shape == other.shape
    assert mask.geometry.is_close(medseg.load(src).geometry, atol_mm=1e-4)
    back = labels_on_grid(mask, phantom[0])
    for label in (1, 2):
        assert dice(back == label, phantom_mask.array == label) >= 0.99


def _oblique(vol: CTVolume, *, labels: bool, degrees: tuple[float, float]) -> CTVolume:
    """``vol`` resampled onto a grid rotated about z then x (linear for CT, nearest for
    labels): a series acquired obliquely."""
    img = to_sitk(vol)
    rot = sitk.Euler3DTransform()
    rot.SetRotation(np.deg2rad(degrees[1]), 0.0, np.deg2rad(degrees[0]))
    centre = vol.geometry.index_to_world(np.array(vol.shape[::-1]) / 2 - 0.5)[0]
    rot.SetCenter(centre.tolist())
    direction = np.asarray(rot.GetMatrix()).reshape(3, 3) @ vol.direction
    origin = rot.TransformPoint(vol.origin)
    ref = sitk.Image(img.GetSize(), img.GetPixelID())
    ref.SetSpacing(img.GetSpacing())
    ref.SetDirection(direction.ravel().tolist())
    ref.SetOrigin(origin)
    interp = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    out = sitk.Resample(img, ref, sitk.Transform(), interp, 0 if labels else -1000.0)
    return from_sitk(out)


def test_oblique_series_mask_is_on_its_grid_and_right_in_world(tmp_path: Path, phantom,
                                                              model) -> None:
    image = _oblique(phantom[0], labels=False, degrees=(20.0, 12.0))
    ref = _oblique(phantom[1], labels=True, degrees=(20.0, 12.0))
    src = medseg.save(image, tmp_path / "oblique.nii.gz")
    segment_study(src, tmp_path / "out", model=model)
    mask = medseg.load(tmp_path / "out" / "lungs.nii.gz")
    assert mask.same_grid(image, atol_mm=1e-4)
    assert not np.allclose(np.abs(mask.direction), np.eye(3), atol=0.1)  # really oblique
    for label in (1, 2):
        assert dice(mask.array == label, ref.array == label) >= 0.95


def test_two_runs_identical_bytes(tmp_path: Path, model) -> None:
    src = SAMPLE / "dicom"
    segment_study(src, tmp_path / "a", model=model)
    segment_study(src, tmp_path / "b", model=model)
    assert (tmp_path / "a" / "lungs.nii.gz").read_bytes() == \
        (tmp_path / "b" / "lungs.nii.gz").read_bytes()


# ---- chest-ct-philips-141: unlabelled real CT with a lesion in the right lung -------------

#: The lesion (about 2 cm, right lung, lateral to the hilum), found by eye in the lung
#: window: centre voxel (k, j, i) = (78, 258, 170), slices 73-83. Its voxels are those above
#: -300 HU within 14 mm of the centre (the nodule, not the vessels leading to the hilum).
LESION_CENTRE = (78, 258, 170)
LESION_RADIUS_MM = 14.0


def _lesion(image: CTVolume) -> np.ndarray:
    sx, sy, sz = image.spacing
    k, j, i = np.ogrid[:image.shape[0], :image.shape[1], :image.shape[2]]
    kc, jc, ic = LESION_CENTRE
    near = ((k - kc) * sz) ** 2 + ((j - jc) * sy) ** 2 + ((i - ic) * sx) ** 2 \
        <= LESION_RADIUS_MM ** 2
    return np.asarray(near & (image.array > -300))


@pytest.fixture(scope="module")
def philips(shared_data: Path, model) -> tuple[CTVolume, CTVolume, CTVolume]:
    image = medseg.load(need(shared_data, "chest-ct-philips-141"))
    unet = segment(image, model=model)
    thr = segment(image, method="threshold")
    assert not unet.warnings, unet.warnings
    return image, unet.labels, thr.labels


def test_philips_volume_plausible_both_lungs(philips) -> None:
    _, unet, _ = philips
    counts = np.bincount(unet.array.ravel(), minlength=3)
    litres = counts * unet.voxel_volume_ml() / 1000
    assert 3.0 <= litres[1] + litres[2] <= 8.0
    assert litres[1] > 1.0 and litres[2] > 1.0
    assert litres[1] > litres[2]  # the right lung is the larger


def test_philips_lesion_inside_right_lung(philips) -> None:
    image, unet, thr = philips
    lesion = _lesion(image)
    assert 1000 < lesion.sum() < 10000  # a nodule of about 2 cm at 0.98 x 0.98 x 2 mm
    assert (unet.array[lesion] == 1).mean() >= 0.99
    # the threshold baseline loses a third of it: where the nodule meets the vessels going to
    # the hilum it is not enclosed by aerated lung in its slice, so hole filling misses it
    assert (thr.array[lesion] == 1).mean() < 0.8


def _largest_piece(mask: np.ndarray) -> tuple[np.ndarray, tuple[slice, ...]]:
    cc, _ = ndi.label(mask)
    sizes = np.bincount(cc[mask])
    sizes[0] = 0
    piece = cc == int(np.argmax(sizes))
    return piece, ndi.find_objects(piece.astype(np.uint8))[0]


def test_philips_unet_vs_threshold(philips) -> None:
    """They agree on the lungs and differ where the threshold is wrong: it keeps the trachea
    and main bronchi (air in the mediastinum, up above the lungs), and it leaves out dense
    tissue inside the pleura that aerated lung does not enclose in its slice (hilar vessels,
    the lesion)."""
    image, unet, thr = philips
    u, t = unet.array > 0, thr.array > 0
    assert dice(u, t) >= 0.96
    for label in (1, 2):
        assert dice(unet.array == label, thr.array == label) >= 0.95
    top = int(np.flatnonzero(u.any(axis=(1, 2)))[-1])
    airway, box = _largest_piece(t & ~u)
    assert np.median(image.array[airway]) < -900          # air, not lung parenchyma
    assert box[0].stop > top + 1                            # it goes on above the lungs
    assert airway.sum() * image.voxel_volume_ml() > 20.0   # the trachea's tens of mL
    dense, _ = _largest_piece(u & ~t)
    assert np.median(image.array[dense]) > -200             # soft tissue inside the pleura


def test_model_card_claim_on_cip_heldout(shared_data: Path, capsys) -> None:
    """The model card's validation: Dice >= 0.95 per lung on the slices training held out."""
    import json

    from medseg.cli import main

    need(shared_data, "cip-ct64")
    assert main(["validate-model", "--shared-data", str(shared_data), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["validation_slices"] == [0, 40]
    for label in ("right", "left"):
        assert res["metrics"][label]["dice"] >= 0.95
        assert res["metrics"][label]["hd95"] <= 10.0


def test_philips_quality_verdict_ok_and_damage_found(philips) -> None:
    """The QC verdict on a real chest CT: the shipped model's mask is ok (no false alarm),
    and the same mask with a lung removed, the sides swapped or shifted 10 mm is review."""
    from medseg.qc import OK, REVIEW, quality_check

    image, unet, _ = philips
    lab = np.asarray(unet.array)
    clean = quality_check(image, lab)
    assert clean.verdict == OK, clean.reasons
    no_left = quality_check(image, np.where(lab == 2, 0, lab))
    assert no_left.verdict == REVIEW
    assert no_left.signals["aerated_missed_ml"] > 1000  # the left lung, found unlabelled
    swapped = lab.copy()
    swapped[lab == 1], swapped[lab == 2] = 2, 1
    assert any("swapped" in r for r in quality_check(image, swapped).reasons)
    step = round(10.0 / image.spacing[0])
    shifted = np.roll(lab, step, axis=2)
    shifted[:, :, :step] = 0
    assert quality_check(image, shifted).verdict == REVIEW
    # a field of view holding the right hemithorax: the lung runs into the image's side
    # at the mediastinum, where the heart would look like a bite in its outline (8.8 mL
    # even with the border's 30 mm left out): the chest-wall check is not run
    from medseg.train.robustness import hemithorax_crop

    crop, box = hemithorax_crop(image, 1)
    hemi = quality_check(crop, lab[box])
    assert hemi.verdict == OK, hemi.reasons
    assert hemi.signals["chest_wall_bite_ml"] is None
