"""A network trained on coronal slices (medseg.train.views): the stacks turned and back, the
sampler's views after lesions are drawn again, the config checks, a tiny training run, and
segmentation refusing such a model."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from medseg.errors import ConfigError
from medseg.inference.unet import InferenceSettings, random_model, unet_labels
from medseg.models import ModelSpec, load_model
from medseg.synth import make_phantom
from medseg.train import load_train_config, train
from medseg.train.data import Sample
from medseg.train.loop import predict_prepared, predict_sample
from medseg.train.sampling import SliceSampler
from medseg.train.views import from_view, to_view, view_sample
from tests.train.test_train import TINY


def test_a_voxel_lands_where_the_view_puts_it_and_comes_back() -> None:
    stack = np.zeros((5, 7, 9), np.uint8)        # (K, I, J): 5 slices 4 mm apart
    stack[3, 2, 6] = 1
    cor = to_view(stack, "coronal", slice_mm=4.0, pixel_mm=2.0, order=0)
    assert cor.shape == (9, 7, 10)               # (J, I, K'): K resampled to 2 mm
    j, i, k = np.argwhere(cor == 1)[0]
    assert (j, i) == (6, 2) and k in (6, 7)      # 3 * 4 mm = 12 mm ~ pixel 6-7 of 2 mm
    sag = to_view(stack, "sagittal", slice_mm=4.0, pixel_mm=2.0, order=0)
    assert sag.shape == (7, 9, 10)               # (I, J, K')
    i, j, k = np.argwhere(sag == 1)[0]
    assert (i, j) == (2, 6) and k in (6, 7)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (5, 7, 9)).astype(np.uint8)
    for view in ("coronal", "sagittal"):         # nearest both ways: exactly the labels
        back = from_view(to_view(labels, view, 4.0, 2.0, 0), view, 5)
        assert np.array_equal(back, labels), view
    same = to_view(labels, "coronal", 2.0, 2.0, 0)   # at the pixel spacing: turned only
    assert np.array_equal(same, labels.transpose(2, 1, 0))


def _sample(name: str, seed: int, lesion: bool = False) -> Sample:
    rng = np.random.default_rng(seed)
    image = rng.random((6, 16, 12)).astype(np.float32)
    label = np.zeros((6, 16, 12), np.uint8)
    label[1:5, 3:12, 2:6] = 1
    label[1:5, 3:12, 7:11] = 2
    mask = np.zeros(label.shape, bool)
    if lesion:
        mask[2:4, 5:8, 8:10] = True
    return Sample(name, image, label, 1.0, lesion=mask if lesion else None,
                  effusion=np.zeros_like(mask) if lesion else None, slice_mm=4.0)


def test_view_sample_turns_every_array_and_the_lesion_slices() -> None:
    s = _sample("a", 1, lesion=True)
    v = view_sample(s, "coronal", 2.0)
    assert v.image.shape == v.label.shape == v.lesion.shape == (12, 16, 12)
    assert v.slice_mm == 2.0 and v.weight == s.weight and v.name == s.name
    assert list(v.focus) == [8, 9]               # the lesion's J columns
    assert view_sample(s, "axial", 2.0) is s
    with pytest.raises(ValueError, match="unknown view"):
        view_sample(s, "oblique", 2.0)


def test_the_sampler_turns_replaced_samples_again_and_frees_the_old_ones() -> None:
    spec = ModelSpec(name="c", view="coronal", pixel_spacing_mm=2.0)
    source = [_sample("a", 1), _sample("a-lesions0", 2, lesion=True)]
    sampler = SliceSampler(source, 1, 8, seed=0, spec=spec)
    first = sampler.samples[1]
    assert first.image.shape == (12, 16, 12)
    x, y = sampler.batch(4)
    assert tuple(x.shape) == (4, 3, 8, 8) and tuple(y.shape) == (4, 1, 8, 8)
    kept = sampler.samples[0]
    source[1] = _sample("a-lesions0", 3, lesion=True)   # drawn again, in place
    sampler.refresh()
    assert sampler.samples[0] is kept and sampler.samples[1] is not first
    assert len(sampler._views) == 2
    assert np.array_equal(sampler.samples[1].image,
                          view_sample(source[1], "coronal", 2.0).image)


def test_view_config_is_checked(tmp_path: Path) -> None:
    def write(model: dict, training: dict) -> Path:
        p = tmp_path / "cfg.yaml"
        p.write_text(yaml.safe_dump({**TINY, "model": {**TINY["model"], **model},
                                     "training": {**TINY["training"], **training}}))
        return p

    with pytest.raises(ConfigError, match=r"model\.view must be one of axial, coronal, sag"):
        load_train_config(write({"view": "oblique"}, {}))
    with pytest.raises(ConfigError, match=r"dome_weight needs model\.view: axial"):
        load_train_config(write({"view": "coronal"}, {"dome_weight": 4.0}))
    assert load_train_config(write({"view": "coronal"}, {})).spec().view == "coronal"


def test_a_coronal_model_trains_and_segment_refuses_it(tmp_path: Path) -> None:
    cfg = load_train_config(_write(tmp_path, {**TINY, "output_dir": str(tmp_path / "out"),
                                              "model": {**TINY["model"], "view": "coronal"}}))
    card = train(cfg, log=lambda _m: None)
    assert card["architecture"]["view"] == "coronal"
    with open(tmp_path / "out" / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and all(0.0 <= float(r["val_dice_right"]) <= 1.0 for r in rows)
    model = load_model(tmp_path / "out" / "tiny.json")
    assert model.spec.view == "coronal"
    image, _ = make_phantom(seed=9, shape=(6, 48, 48), spacing=(5.0, 5.0, 5.0))
    with pytest.raises(ConfigError, match="sees coronal slices"):
        unet_labels(image, model, InferenceSettings())
    with pytest.raises(ConfigError, match="alone or with a coronal one"):
        unet_labels(image, random_model(ModelSpec(name="r", view="coronal")),
                    InferenceSettings())
    # an axial model's architecture is written as before (no "view" key)
    assert "view" not in ModelSpec(name="a").to_dict()


def _write(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
def test_predicted_probabilities_agree_with_the_labels_in_every_view(view: str) -> None:
    spec = ModelSpec(name="r", channels=(4, 8), strides=(2,), num_res_units=0, view=view,
                     pixel_spacing_mm=2.0)
    net = random_model(spec).network
    s = _sample("a", 4)
    labels = predict_sample(net, s, spec, 2)
    probs = predict_sample(net, s, spec, 2, softmax=True)
    assert labels.shape == s.image.shape and labels.dtype == np.uint8
    assert probs.shape == (3, *s.image.shape) and probs.dtype == np.float32
    assert np.allclose(probs.sum(0), 1.0, atol=1e-5)
    # on a stack that needs no turning the argmax of the probabilities is the labels
    flat = predict_prepared(net, s.image, 1, 2, softmax=True)
    assert np.array_equal(flat.argmax(0), predict_prepared(net, s.image, 1, 2))
