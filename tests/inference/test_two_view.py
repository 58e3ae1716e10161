"""A two-view model (medseg.inference.views): the coronal network sees at inference exactly
what training validated it on, the card loads both networks and refuses a wrong pair, the
fused labels keep the input's grid for any axis order, and the views fuse as documented."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.errors import ConfigError
from medseg.inference.unet import InferenceSettings, random_model, unet_labels
from medseg.inference.views import (
    _resample_axis0,
    fuse,
    lung_extent,
    run_slices,
    view_probabilities,
)
from medseg.models import ModelSpec, load_model
from medseg.train.data import Sample
from medseg.train.loop import predict_sample
from tests.helpers import labels_on_grid, reindex
from tests.inference.test_geometry import CASES, _body


def test_slices_resampled_as_training_resamples_them() -> None:
    x = np.random.default_rng(0).random((7, 5, 4)).astype(np.float32)
    for n_out in (7, 12, 18, 3):
        ref = ndimage.zoom(x, (n_out / 7, 1, 1), order=1)
        got = _resample_axis0(torch.from_numpy(x), n_out).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_coronal_probabilities_are_those_training_validated() -> None:
    spec = ModelSpec(name="c", view="coronal")
    net = random_model(spec).network
    stack = np.random.default_rng(2).random((9, 20, 14)).astype(np.float32)
    ref = predict_sample(net, Sample("s", stack, np.zeros(stack.shape, np.uint8),
                                     slice_mm=2.0), spec, 16, softmax=True)[1:]
    got = view_probabilities(net, torch.from_numpy(stack), 2.0, 2.0, 1, 16, (0, 14),
                             batch=4)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)
    part = view_probabilities(net, torch.from_numpy(stack), 2.0, 2.0, 1, 16, (3, 8))
    np.testing.assert_allclose(part[..., 3:8].numpy(), ref[..., 3:8], atol=1e-5)
    assert not part[..., :3].any() and not part[..., 8:].any()
    # every third slice run (and the range's last), the ones between interpolated
    assert run_slices(2, 9, 3) == [2, 5, 8] and run_slices(2, 10, 3) == [2, 5, 8, 9]
    half = view_probabilities(net, torch.from_numpy(stack), 2.0, 2.0, 1, 16, (2, 9),
                              stride=3).numpy()
    for j in (2, 5, 8):
        np.testing.assert_allclose(half[..., j], ref[..., j], atol=1e-5)
    np.testing.assert_allclose(half[..., 3], (2 * ref[..., 2] + ref[..., 5]) / 3, atol=1e-5)
    np.testing.assert_allclose(half[..., 7], (ref[..., 5] + 2 * ref[..., 8]) / 3, atol=1e-5)


def test_fusions_and_lung_extent() -> None:
    a = torch.tensor([[0.8, 0.0], [0.1, 0.2]])[:, None]   # (2 lungs, 1, 2 voxels)
    b = torch.tensor([[0.2, 0.1], [0.0, 0.6]])[:, None]
    np.testing.assert_allclose(fuse(a, b, "mean").numpy(), ((a + b) / 2).numpy())
    np.testing.assert_allclose(fuse(a, b, "mean", 0.7).numpy(), (0.7 * a + 0.3 * b).numpy(),
                               atol=1e-6)
    u = fuse(a, b, "union")
    np.testing.assert_allclose(u.sum(0).numpy(), [[0.9, 0.7]], atol=1e-6)
    np.testing.assert_allclose((u[0] / u.sum(0)).numpy(), [[1.0 / 1.1, 0.1 / 0.9]],
                               atol=1e-6)
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse(a, b, "max")
    p = torch.zeros((4, 5, 10))
    p[1, 2, 4:6] = 0.9
    assert lung_extent(p, axis=2, margin=2) == (2, 8)
    assert lung_extent(p, axis=2, margin=9) == (0, 10)
    assert lung_extent(torch.zeros((4, 5, 10)), axis=2, margin=2) == (0, 0)
    big = torch.zeros((30, 40, 100))
    big[:, :, 40:60] = 0.9          # 24,000 lung voxels over columns 40..59
    big[0, 0, 3] = 0.9              # a stray speck: left out of the extent
    assert lung_extent(big, axis=2, margin=5) == (35, 65)
    assert lung_extent(big, axis=2, margin=5, tail=0.0) == (0, 65)


def _save(model_spec: ModelSpec, folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    from medseg.models import build_network, sha256_of

    pt = folder / f"{model_spec.name}.pt"
    torch.save(build_network(model_spec).state_dict(), pt)
    card = folder / f"{model_spec.name}.json"
    card.write_text(json.dumps({"name": model_spec.name, "weights_file": pt.name,
                                "sha256": sha256_of(pt),
                                "architecture": model_spec.to_dict()}))
    return card


@pytest.fixture(scope="module")
def two_view(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("two-view")
    _save(ModelSpec(name="ax"), folder, 1)
    _save(ModelSpec(name="cor", view="coronal"), folder, 2)
    card = folder / "both.json"
    card.write_text(json.dumps({"name": "both", "views": {"axial": "ax.json",
                                                          "coronal": "cor.json"},
                                "fusion": "mean"}))
    return card


def test_two_view_card_loads_both_and_refuses_a_wrong_pair(two_view: Path) -> None:
    m = load_model(two_view)
    assert m.spec.name == "both" and m.spec.view == "axial" and m.fusion == "mean"
    assert m.second is not None and m.second.spec.view == "coronal"
    assert m.sha256 not in (m.second.sha256, load_model(two_view.parent / "ax.json").sha256)
    bad = two_view.parent / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "views": {"axial": "cor.json",
                                                        "coronal": "ax.json"}}))
    with pytest.raises(ConfigError, match="not a one-view axial model"):
        load_model(bad)
    bad.write_text(json.dumps({"name": "bad", "views": {"axial": "ax.json",
                                                        "coronal": "cor.json"},
                               "fusion": "vote"}))
    with pytest.raises(ConfigError, match="fusion"):
        load_model(bad)
    bad.write_text(json.dumps({"name": "bad", "views": {"axial": "ax.json",
                                                        "coronal": "cor.json"},
                               "axial_weight": 1.5}))
    with pytest.raises(ConfigError, match="axial_weight"):
        load_model(bad)
    with pytest.raises(ConfigError, match="coronal"):
        unet_labels(_body(), load_model(two_view.parent / "cor.json"), InferenceSettings())


@pytest.mark.parametrize("case", ["flip_x", "transpose_xy", "coronal", "sagittal"])
def test_two_view_labels_keep_the_grid_for_any_axis_order(two_view: Path, case: str) -> None:
    model = load_model(two_view)
    base = _body(spacing=(0.7, 0.7, 2.5))
    settings = InferenceSettings()
    seen: list[tuple[int, int]] = []
    ref = unet_labels(base, model, settings, progress=lambda d, t: seen.append((d, t)))
    done = [d for d, _ in seen]
    assert done == sorted(done) and seen[-1] == (base.shape[0],) * 2
    assert {t for _, t in seen} == {base.shape[0]}
    assert ref.shape == base.shape and settings.second_view_slices
    assert "second_view_s" in settings.timings
    axial_only = unet_labels(base, load_model(two_view.parent / "ax.json"),
                             InferenceSettings())
    assert not np.array_equal(ref, axial_only), "the coronal network changed nothing"
    other = reindex(base, *CASES[case])
    lab = unet_labels(other, model, InferenceSettings())
    back = labels_on_grid(other.with_array(lab), base)
    # the coronal slices are resampled from the series' own slices: the same world
    # positions for every axis order, up to float rounding at probability ties
    assert (back == ref).mean() > 0.999


def test_shipped_two_view_model_segments_the_sample_on_its_grid() -> None:
    """lung2d-v19 (lung2d-v8 + the coronal lung2d-c1, docs/model-card.md): both shipped
    weights pass their checksums, the mask keeps the input's grid in world space for a
    coronal storage order, and it is as accurate on the sample phantom as the default."""
    import medseg
    from medseg.segment import segment
    from tests.conftest import REPO_ROOT
    from tests.helpers import dice

    model = load_model("lung2d-v19")
    assert model.second is not None and model.second.spec.name == "lung2d-c1"
    assert (model.fusion, model.axial_weight, model.coronal_stride) == ("mean", 0.7, 2)
    sample = REPO_ROOT / "sample_data" / "phantom_000"
    image, ref = medseg.load(sample / "image.nii.gz"), medseg.load(sample / "labels.nii.gz")
    mask = segment(image, model=model).labels
    assert mask.geometry == image.geometry and mask.shape == image.shape
    for label in (1, 2):
        assert dice(mask.array == label, ref.array == label) >= 0.95
    other = reindex(image, (0, 2, 1), (False, True, False))
    back = labels_on_grid(other.with_array(segment(other, model=model).labels.array), image)
    assert (back == mask.array).mean() > 0.999
