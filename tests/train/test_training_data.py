"""Training data like the clinic: inserted pathology with labels known by construction,
the masked loss, cut fields of view, and labels derived for real CT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medseg.models import ModelSpec
from medseg.synth import make_phantom
from medseg.train import MaskedDiceCE, Sample, load_train_config
from medseg.train.data import (
    BOTTOM_LESION_OFFSET,
    DOME_MARK,
    EFFUSION_MARK,
    LESION_OFFSET,
    lesion_variant,
)
from medseg.train.lesions import (
    LUNG_KINDS,
    from_canonical,
    insert_effusion,
    insert_lesion,
    to_canonical,
)
from medseg.train.realct import IGNORE, derive_lung_labels
from medseg.train.sampling import SliceSampler
from medseg.volume import CTVolume, Geometry

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chest() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    image, labels = make_phantom(seed=4, shape=(40, 96, 96), spacing=(3.5, 3.5, 6.0))
    hu, sp = to_canonical(image, image.array.astype(np.float32))
    lab, _ = to_canonical(labels)
    return hu, lab, sp


@pytest.mark.parametrize("kind", LUNG_KINDS)
def test_lesion_replaces_lung_only_and_labels_stay(chest, kind: str) -> None:
    hu0, lab0, sp = chest
    hu, lab = hu0.copy(), lab0.copy()
    les = insert_lesion(hu, lab, sp, np.random.default_rng(1), kind, diameter_mm=40.0)
    assert les is not None and les.voxels > 5
    assert np.array_equal(lab, lab0)                       # a lesion is lung
    assert np.all(lab0[les.mask] == les.side)              # only lung voxels replaced
    changed = np.abs(hu - hu0) > 1
    # the change stays on the lesion and its one-voxel partial-volume rim
    from scipy import ndimage
    assert not (changed & ~ndimage.binary_dilation(les.mask)).any()
    if kind in ("consolidation", "mass", "collapse"):
        assert np.median(hu[les.mask]) > -200              # dense, soft tissue
    if kind == "ground_glass":
        assert np.median(hu[les.mask]) > np.median(hu0[les.mask]) + 150


def test_effusion_is_posterior_fluid_taken_out_of_the_lung(chest) -> None:
    hu0, lab0, sp = chest
    hu, lab = hu0.copy(), lab0.copy()
    eff = insert_effusion(hu, lab, sp, np.random.default_rng(2), side=1, depth_mm=25.0)
    assert eff is not None and eff.voxels > 50
    assert np.all(lab[eff.mask] == 0) and np.all(lab0[eff.mask] == 1)
    assert -10 < float(np.median(hu[eff.mask])) < 40
    ys_eff = np.argwhere(eff.mask)[:, 1].mean()
    ys_lung = np.argwhere(lab0 == 1)[:, 1].mean()
    assert ys_eff > ys_lung                                # dependent: posterior (+y in LPS)
    zs_eff = np.argwhere(eff.mask)[:, 0].mean()
    assert zs_eff < np.argwhere(lab0 == 1)[:, 0].mean()   # at the base


def test_canonical_frame_round_trip_for_any_storage_order() -> None:
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    flip = np.diag([-1.0, 1.0, -1.0])
    perm = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    for direction in (np.eye(3), flip, perm):
        vol = CTVolume(arr, Geometry((0, 0, 0), (1.0, 2.0, 3.0), direction))
        can, sp = to_canonical(vol)
        assert np.array_equal(from_canonical(vol, can), arr)
        # canonical index (z, y, x) of a voxel = its world position over the spacing
        k, j, i = 3, 1, 4
        world = vol.geometry.index_to_world(np.array([[i, j, k]], float))[0]
        idx = np.argwhere(can == arr[k, j, i])[0]
        lo = vol.geometry.index_to_world(np.array(
            [[0, 0, 0], [5, 4, 3]], float)).min(axis=0)  # world minimum corner
        expect = np.rint((world - lo)[::-1] / np.asarray(sp)).astype(int)
        assert np.array_equal(idx, expect)


def test_masked_loss_ignores_ignore_voxels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 1, 8, 8))
    loss = MaskedDiceCE()
    base = loss(logits, target)
    t2 = target.clone()
    t2[:, :, :4] = IGNORE
    changed_logits = logits.clone()
    changed_logits[:, :, :4] = torch.randn(2, 3, 4, 8) * 10  # anything where ignored
    a, b = loss(logits, t2), loss(changed_logits, t2)
    assert torch.isclose(a, b)
    assert not torch.isclose(a, base)
    perfect = torch.nn.functional.one_hot(target[:, 0], 3).permute(0, 3, 1, 2).float() * 50
    assert float(loss(perfect, target)) < 0.01


def test_lesion_pixels_weigh_more_and_count_as_lung() -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 6, 6)
    plain = torch.ones(1, 1, 6, 6, dtype=torch.long)
    marked = plain.clone()
    marked[..., :2, :2] = 1 + LESION_OFFSET
    # weight 1: a marked lesion pixel is just lung
    assert torch.isclose(MaskedDiceCE()(logits, marked), MaskedDiceCE()(logits, plain))
    worse = logits.clone()
    worse[0, 0, :2, :2] += 5.0  # the lesion called background
    gain_plain = MaskedDiceCE(lesion_weight=4)(worse, plain) - MaskedDiceCE(
        lesion_weight=4)(logits, plain)
    gain_marked = MaskedDiceCE(lesion_weight=4)(worse, marked) - MaskedDiceCE(
        lesion_weight=4)(logits, marked)
    assert gain_marked > gain_plain > 0


def test_effusion_pixels_are_background_and_weigh_effusion_weight() -> None:
    torch.manual_seed(2)
    logits = torch.randn(1, 3, 6, 6)
    plain = torch.zeros(1, 1, 6, 6, dtype=torch.long)
    plain[..., 3:, :] = 1
    marked = plain.clone()
    marked[..., :2, :2] = EFFUSION_MARK
    # weight 1 (the default): a marked effusion pixel is just background
    assert torch.isclose(MaskedDiceCE()(logits, marked), MaskedDiceCE()(logits, plain))
    worse = logits.clone()
    worse[0, 1, :2, :2] += 5.0  # the fluid called right lung

    def gain(t: torch.Tensor, **w: float) -> torch.Tensor:
        return MaskedDiceCE(**w)(worse, t) - MaskedDiceCE(**w)(logits, t)
    assert gain(marked, effusion_weight=4) > gain(plain, effusion_weight=4) > 0
    # the lesion weight does not touch effusion pixels, nor the effusion weight lesions
    assert torch.isclose(gain(marked, lesion_weight=4), gain(plain, lesion_weight=4))


def test_dome_pixels_are_background_and_weigh_dome_weight() -> None:
    torch.manual_seed(3)
    logits = torch.randn(1, 3, 6, 6)
    plain = torch.zeros(1, 1, 6, 6, dtype=torch.long)
    plain[..., 3:, :] = 2
    marked = plain.clone()
    marked[..., :2, :] = DOME_MARK
    assert torch.isclose(MaskedDiceCE()(logits, marked), MaskedDiceCE()(logits, plain))
    worse = logits.clone()
    worse[0, 2, :2, :] += 5.0  # the liver under the dome called left lung

    def gain(t: torch.Tensor, **w: float) -> torch.Tensor:
        return MaskedDiceCE(**w)(worse, t) - MaskedDiceCE(**w)(logits, t)
    assert gain(marked, dome_weight=4) > gain(plain, dome_weight=4) > 0
    assert torch.isclose(gain(marked, effusion_weight=4), gain(plain, effusion_weight=4))


def test_sampler_marks_the_abdomen_just_below_each_columns_lung_floor() -> None:
    """Stacks run inferior -> superior. Lung fills slices 6-9 of the left half and 8-9 of
    a lesion-marked square (still lung); the right half never holds lung. With 5 mm slices
    and dome_mm 10, background two slices below a column's floor is marked, nothing else:
    not lung, not ignored voxels, not columns without lung, not deeper slices."""
    lab = np.zeros((10, 8, 8), np.uint8)
    lab[6:, :, :4] = 1
    lab[8:, :2, 4:6] = 1 + LESION_OFFSET
    lab[4, 0, 0] = IGNORE
    s = SliceSampler([Sample("x", np.zeros(lab.shape, np.float32), lab, slice_mm=5.0)],
                     context=1, crop=8, seed=0)
    assert np.array_equal(s._mark_dome(0, 5, lab[5]), lab[5])   # off by default
    s.dome_mm = 10.0
    for k in range(10):
        got = s._mark_dome(0, k, lab[k])
        want = lab[k].copy()
        if k in (4, 5):
            want[:, :4][want[:, :4] == 0] = DOME_MARK
        if k in (6, 7):
            want[:2, 4:6] = DOME_MARK
        assert np.array_equal(got, want), k
    assert s._mark_dome(0, 4, lab[4])[0, 0] == IGNORE
    # the marks survive the crop and augmentation path into a batch
    s.aug = lambda d: d
    _, y = s.batch(32)
    assert (y == DOME_MARK).any()
    # dome_lesions: the lesion square's columns hold no other lung, so nothing is marked
    # there; a lesion at the bottom of the left half's lung (under its other lung) is
    assert not np.isin(s._mark_dome(0, 8, lab[8]), (1 + BOTTOM_LESION_OFFSET,)).any()
    lab2 = lab.copy()
    lab2[5, 2:4, 0:2] = 1 + LESION_OFFSET   # one slice under the lung of slices 6-9
    lab2[7, 4:6, 0:2] = 1 + LESION_OFFSET   # inside the lung: lung above and below
    s2 = SliceSampler([Sample("x", np.zeros(lab.shape, np.float32), lab2, slice_mm=5.0)],
                      context=1, crop=8, seed=0)
    s2.dome_mm, s2.dome_lesions = 10.0, True
    got = s2._mark_dome(0, 5, lab2[5])
    assert np.all(got[2:4, 0:2] == 1 + BOTTOM_LESION_OFFSET)
    assert np.all(got[:2, 0:2] == DOME_MARK)    # the rest under the floor: abdomen
    assert np.all(s2._mark_dome(0, 7, lab2[7])[4:6, 0:2] == 1 + LESION_OFFSET)


def test_lesion_pixels_at_a_lungs_floor_weigh_both_weights() -> None:
    torch.manual_seed(4)
    logits = torch.randn(1, 3, 6, 6)
    lesion = torch.ones(1, 1, 6, 6, dtype=torch.long)
    lesion[..., :2, :] = 1 + LESION_OFFSET
    bottom = lesion.clone()
    bottom[..., :2, :] = 1 + BOTTOM_LESION_OFFSET
    # no weights: a bottom lesion pixel is just lung, as a lesion pixel is
    assert torch.isclose(MaskedDiceCE()(logits, bottom), MaskedDiceCE()(logits, lesion))
    worse = logits.clone()
    worse[0, 0, :2, :] += 5.0  # the lesion called background

    def gain(t: torch.Tensor) -> torch.Tensor:
        loss = MaskedDiceCE(lesion_weight=4, dome_weight=4)
        return loss(worse, t) - loss(logits, t)
    assert gain(bottom) > gain(lesion) > 0


def test_sampler_cuts_the_field_of_view_to_air_with_labels() -> None:
    img = np.full((5, 64, 64), 0.5, np.float32)
    lab = np.ones((5, 64, 64), np.uint8)
    s = SliceSampler([Sample("x", img, lab)], context=1, crop=48, seed=0)
    s.aug = lambda d: d  # no intensity/affine augmentation: only the cut is seen
    s.fov_crop_probability = 1.0
    x, y = s.batch(16)
    for b in range(16):
        outside = x[b, 1] == 0
        assert outside.any()                                # something was cut
        assert torch.equal(outside, y[b, 0] == 0)            # labels cut with the image


def test_elastic_warp_moves_image_and_labels_together() -> None:
    """training.elastic_probability: a crop is warped smoothly; image and labels move
    together (labels by nearest neighbour: no new label values); no warp is the identity."""
    img = np.zeros((5, 96, 96), np.float32)
    lab = np.zeros((5, 96, 96), np.uint8)
    img[:, 30:70, 20:60] = 0.8
    lab[:, 30:70, 20:60] = 1
    lab[:, 40:50, 30:40] = 1 + LESION_OFFSET
    s = SliceSampler([Sample("x", img, lab)], context=1, crop=96, seed=0)
    s.aug = lambda d: d
    x0, y0 = s.batch(8)
    s.elastic_px = 0.0
    s.elastic_probability = 1.0
    x1, y1 = s._warp(x0, y0)
    assert torch.allclose(x1, x0, atol=1e-5) and torch.equal(y1, y0)
    s.elastic_px = 4.0
    x2, y2 = s._warp(x0, y0)
    assert not torch.equal(y2, y0)                                    # it moved
    assert set(torch.unique(y2).tolist()) <= {0, 1, 1 + LESION_OFFSET}
    # the bright square and its label move together: few pixels disagree (edges only)
    bright = x2[:, 1:2] > 0.4
    assert float((bright != (y2 > 0)).float().mean()) < 0.01
    s.elastic_probability = 0.0
    x3, y3 = s._warp(x0, y0)
    assert x3 is x0 and y3 is y0


def test_lesion_variant_keeps_lesions_lung_and_ignore_elsewhere() -> None:
    spec = ModelSpec(name="t", pixel_spacing_mm=4.0, roi_size=64)
    image, labels = make_phantom(seed=5, shape=(30, 80, 80), spacing=(4.0, 4.0, 6.0))
    from medseg.train import prepare_slices
    img, lab = prepare_slices(image, labels, spec)
    assert lab is not None
    lab = lab.copy()
    lab[:, :3] = IGNORE
    base = Sample("real-x", img, lab)
    v = lesion_variant(base, 6.0, spec, np.random.default_rng(0), 3, 1.0, "real-x-lesions0")
    assert v.lesion is not None and v.lesion.any()
    assert np.all(np.isin(v.label[v.lesion], (1, 2)))
    marked = lesion_variant(base, 6.0, spec, np.random.default_rng(0), 3, 1.0, "m",
                            mark_lesions=True)
    assert np.array_equal(marked.label[v.lesion], v.label[v.lesion] + LESION_OFFSET)
    assert v.effusion is not None and np.all(v.label[v.effusion] == 0)
    assert v.focus is not None and v.focus.size
    untouched = ~(v.lesion | v.effusion)
    assert np.array_equal(v.label[untouched], lab[untouched])


def test_lesion_copies_are_drawn_again_in_place() -> None:
    """data.lesion_refresh_epochs: each real study's lesion copy is replaced by a copy of
    its base study with new lesions (same name and weight); phantoms and bases untouched;
    the sampler then draws from the new copies."""
    from medseg.errors import ConfigError
    from medseg.train.config import DataConfig, TrainConfig, TrainingConfig
    from medseg.train.loop import _refresh_lesions

    spec = ModelSpec(name="t", pixel_spacing_mm=4.0, roi_size=64)
    image, labels = make_phantom(seed=5, shape=(30, 80, 80), spacing=(4.0, 4.0, 6.0))
    from medseg.train import prepare_slices
    img, lab = prepare_slices(image, labels, spec)
    assert lab is not None
    base = Sample("real-x", img, lab, slice_mm=6.0)
    old = lesion_variant(base, 6.0, spec, np.random.default_rng(0), 3, 0.0, "real-x-lesions0",
                         mark_lesions=True)
    old.weight = 0.7
    phantom = Sample("phantom-1", img, lab)
    samples = [phantom, base, old]
    sampler = SliceSampler(samples, context=1, crop=48, seed=0)
    cfg = load_train_config(REPO / "pipelines" / "experiments" / "train_lung2d_v5_fresh.yaml")
    assert cfg.data.lesion_refresh_epochs == 2
    cfg.data.effusion_probability = 0.0
    with pytest.raises(ConfigError, match="lesion_refresh_epochs"):
        TrainConfig(data=DataConfig(lesion_refresh_epochs=-1))
    with pytest.raises(ConfigError, match="elastic_probability"):
        TrainConfig(training=TrainingConfig(elastic_probability=1.5))
    with pytest.raises(ConfigError, match="effusion_weight"):
        TrainConfig(training=TrainingConfig(effusion_weight=0.0))
    with pytest.raises(ConfigError, match="dome_weight"):
        TrainConfig(training=TrainingConfig(dome_weight=-1.0))
    assert TrainConfig().training.dome_lesions is False
    with pytest.raises(ConfigError, match="dome_mm"):
        TrainConfig(training=TrainingConfig(dome_mm=0.0))
    assert _refresh_lesions(samples, spec, cfg.data, [1, 2]) == 1
    new = samples[2]
    assert samples[0] is phantom and samples[1] is base and new is not old
    assert (new.name, new.weight) == ("real-x-lesions0", 0.7)
    assert new.lesion is not None and new.lesion.any() and old.lesion is not None
    assert not np.array_equal(new.lesion, old.lesion)          # other lesions
    assert np.all(new.label[new.lesion] >= LESION_OFFSET)       # marked for the loss
    untouched = ~new.lesion
    assert np.array_equal(new.label[untouched], lab[untouched])  # drawn from the base
    sampler.refresh()
    assert sampler.samples[2] is new
    assert np.array_equal(sampler.lung_slices[2],
                          np.flatnonzero((new.label.reshape(new.label.shape[0], -1) > 0)
                                         .any(axis=1)))


def test_derived_labels_never_teach_a_dense_lesion_as_background() -> None:
    """A mass against the pleura that the pseudo-labelling model may leave out is either
    lung or ignored in the derived labels, never background; the rest is the model's."""
    image, truth = make_phantom(seed=6, shape=(40, 128, 128), spacing=(2.8, 2.8, 5.0),
                                pathology=False)
    hu, sp = to_canonical(image, image.array.astype(np.float32))
    lab, _ = to_canonical(truth)
    les = insert_lesion(hu, lab, sp, np.random.default_rng(3), "mass", anchor="pleura",
                        diameter_mm=45.0)
    assert les is not None
    vol = image.with_array(np.rint(from_canonical(image, hu)).astype(np.int16))
    mass = from_canonical(image, les.mask)
    derived, stats = derive_lung_labels(vol, "lung2d-v1")
    assert set(np.unique(derived)) <= {0, 1, 2, IGNORE}
    assert not (derived[mass] == 0).any()
    sure = derived != IGNORE
    agree = (derived[sure] > 0) == (truth.array[sure] > 0)
    assert agree.mean() > 0.99
    assert stats["ignored_fraction_of_lung"] < 0.3


def test_v2_pipeline_config_is_valid() -> None:
    cfg = load_train_config(REPO / "pipelines" / "train_lung2d_v2.yaml")
    assert cfg.data.real_val and not set(cfg.data.real_val) & set(cfg.data.real_train)
    assert cfg.training.init_weights == "lung2d-v1"
    yaml.safe_load((REPO / "pipelines" / "train_lung2d_v2.yaml").read_text())


def test_shipped_v8_pipeline_config_is_the_shipped_models_recipe() -> None:
    """pipelines/train_lung2d_v8.yaml is what trained the shipped weights (their card holds
    the config it ran with)."""
    import json

    from medseg.inference import DEFAULT_MODEL
    from medseg.models import _weights_dir

    cfg = load_train_config(REPO / "pipelines" / "train_lung2d_v8.yaml")
    assert cfg.name == DEFAULT_MODEL == "lung2d-v8"
    assert cfg.data.real_val and not set(cfg.data.real_val) & set(cfg.data.real_train)
    assert (cfg.training.init_weights, cfg.training.effusion_weight) == ("lung2d-v2", 4.0)
    card = json.loads((_weights_dir() / "lung2d-v8.json").read_text())
    ran = card["training"]["config"]
    assert ran["training"]["effusion_weight"] == cfg.training.effusion_weight
    assert ran["data"]["lesion_refresh_epochs"] == cfg.data.lesion_refresh_epochs == 2
    assert ran["data"]["effusion_probability"] == cfg.data.effusion_probability == 0.6


@pytest.mark.parametrize(("step_mm", "slice_mm", "step"),
                         [(0.0, 2.5, 1), (5.0, 2.5, 2), (5.0, 1.0, 5), (5.0, 5.0, 1),
                          (5.0, 7.0, 1), (5.0, 0.0, 1)])
def test_context_step_follows_millimetres(step_mm: float, slice_mm: float, step: int) -> None:
    assert ModelSpec(name="x", context_step_mm=step_mm).context_step(slice_mm) == step


def test_widened_network_computes_what_the_source_did() -> None:
    from medseg.models import build_network
    from medseg.train.loop import _widened

    torch.manual_seed(0)
    narrow = build_network(ModelSpec(name="a", context_slices=1)).eval()
    wide = build_network(ModelSpec(name="b", context_slices=2))
    wide.load_state_dict(_widened(narrow.state_dict(), wide.state_dict()))
    wide.eval()
    x = torch.rand(2, 5, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(narrow(x[:, 1:4]), wide(x), atol=1e-5)


class _FirstChannelIsRight(torch.nn.Module):
    """Right lung wherever the first context channel (the lowest neighbour) is bright."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x[:, :1] > 0.5).float()
        return torch.cat([1 - bright, bright, torch.zeros_like(bright)], dim=1) * 10


@pytest.mark.parametrize(("step_mm", "offset"), [(0.0, 1), (5.0, 2), (10.0, 4)])
def test_inference_takes_context_slices_the_stated_mm_apart(step_mm: float, offset: int
                                                            ) -> None:
    from medseg.inference.unet import InferenceSettings, unet_labels
    from medseg.models import LoadedModel

    arr = np.full((24, 32, 32), -1000, np.int16)
    arr[10] = 500
    vol = CTVolume(arr, Geometry(origin=(0.0, 0.0, 0.0), spacing=(0.7, 0.7, 2.5)))
    spec = ModelSpec(name="t", context_step_mm=step_mm, roi_size=32)
    labels = unet_labels(vol, LoadedModel(spec, _FirstChannelIsRight(), "", ""),
                         InferenceSettings(slab_slices=7))
    hit = sorted({int(k) for k in np.flatnonzero(labels.reshape(24, -1).any(axis=1))})
    assert hit in ([10 + offset], [10 - offset])
