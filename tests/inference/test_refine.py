"""The 3D refinement stage (medseg.inference.refine): a card pairs it with a slice model and
refuses wrong pairs; a zero correction leaves the labels as they were; a correction is
applied where it lies in the world, for any axis order; training (job: train_refine)
writes cards that segment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import medseg.inference.refine as refine
from medseg.errors import ConfigError, UnreadableFileError
from medseg.inference.unet import InferenceSettings, unet_labels
from medseg.models import DEFAULT_MODEL, REFINER_KIND, load_model, sha256_of
from medseg.synth import make_phantom
from tests.helpers import labels_on_grid, reindex
from tests.inference.test_geometry import CASES


def _refiner_card(folder: Path, name: str, zero: bool, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = refine.build_refiner_network((4, 8, 16, 32))
    if zero:
        for p in net.parameters():
            torch.nn.init.zeros_(p)
    pt = folder / f"{name}.pt"
    torch.save(net.state_dict(), pt)
    card = folder / f"{name}.json"
    card.write_text(json.dumps({"name": name, "kind": REFINER_KIND, "weights_file": pt.name,
                                "sha256": sha256_of(pt),
                                "architecture": {"channels": [4, 8, 16, 32],
                                                 "num_res_units": 1, "grid_mm": 4.0}}))
    return card


@pytest.fixture(scope="module")
def cards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("refine")
    _refiner_card(folder, "zero", zero=True)
    _refiner_card(folder, "rand", zero=False)
    for name in ("zero", "rand"):
        (folder / f"v8+{name}.json").write_text(json.dumps(
            {"name": f"v8+{name}", "base": DEFAULT_MODEL, "refine": f"{name}.json"}))
    return folder


def test_refined_card_loads_and_refuses_wrong_pairs(cards: Path) -> None:
    m = load_model(cards / "v8+rand.json")
    base = load_model(DEFAULT_MODEL)
    assert m.refiner is not None and m.refiner.grid_mm == 4.0 and m.spec.name == "v8+rand"
    assert m.sha256 not in (base.sha256, m.refiner.sha256) and len(m.sha256) == 64
    assert load_model(DEFAULT_MODEL).refiner is None
    with pytest.raises(ConfigError, match="refinement stage, not a segmentation model"):
        load_model(cards / "rand.json")
    bad = cards / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "base": DEFAULT_MODEL, "refine": DEFAULT_MODEL}))
    with pytest.raises(ConfigError, match="not a 3D refinement stage"):
        load_model(bad)
    bad.write_text(json.dumps({"name": "bad", "refine": "rand.json"}))
    with pytest.raises(ConfigError, match="names its slice model"):
        load_model(bad)
    bad.write_text(json.dumps({"name": "bad", "base": "v8+rand.json", "refine": "rand.json"}))
    with pytest.raises(ConfigError, match="already refined"):
        load_model(bad)
    tampered = json.loads((cards / "rand.json").read_text())
    tampered["sha256"] = "0" * 64
    (cards / "tampered.json").write_text(json.dumps(tampered))
    bad.write_text(json.dumps({"name": "bad", "base": DEFAULT_MODEL,
                               "refine": "tampered.json"}))
    with pytest.raises(UnreadableFileError, match="checksum mismatch"):
        load_model(bad)


def test_coarse_grid_and_a_zero_correction(cards: Path) -> None:
    assert refine.coarse_size((100, 180, 200), 2.5, 2.0, 4.0) == (62, 90, 100)
    assert refine.coarse_size((3, 10, 10), 1.0, 2.0, 4.0) == (8, 8, 8)  # never below 8
    probs = torch.rand(2, 20, 30, 40) / 2
    m = load_model(cards / "v8+zero.json")
    assert m.refiner is not None
    out = refine.refine_probabilities(m.refiner, probs, torch.rand(20, 30, 40), 2.5, 2.0)
    assert out.shape == probs.shape
    torch.testing.assert_close(out, probs, atol=2e-4, rtol=0)
    vol, _ = make_phantom(seed=6, shape=(24, 96, 96))
    settings = InferenceSettings()
    lab = unet_labels(vol, m, settings)
    assert "refine_s" in settings.timings
    base = unet_labels(vol, load_model(DEFAULT_MODEL), InferenceSettings())
    assert (base > 0).sum() > 1000
    assert (lab == base).mean() > 0.9999


@pytest.mark.parametrize("case", ["flip_z", "coronal", "sagittal"])
def test_a_correction_lands_where_it_lies_in_the_world(
        cards: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A correction of +30 (certain lung) over the superior half of the coarse grid: the
    superior slices of the output are all lung, the inferior ones the base model's, for
    any storage order of the same voxels."""
    def superior_half(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        d = torch.zeros(x.shape[-3:])
        d[x.shape[-3] // 2:] = 30.0  # the oriented grid's third axis points superior
        return d

    monkeypatch.setattr(refine, "correction", superior_half)
    model = load_model(cards / "v8+rand.json")
    vol, _ = make_phantom(seed=7, shape=(32, 80, 80))
    base = unet_labels(vol, load_model(DEFAULT_MODEL), InferenceSettings())
    other = reindex(vol, *CASES[case])
    lab = labels_on_grid(other.with_array(unet_labels(other, model, InferenceSettings())),
                         vol)
    # phantom slices are stored inferior to superior (z up the index)
    z = vol.geometry.index_to_world(np.c_[np.zeros(vol.shape[0]), np.zeros(vol.shape[0]),
                                          np.arange(vol.shape[0])])[:, 2]
    up = z > np.quantile(z, 0.6)
    down = z < np.quantile(z, 0.4)
    assert (lab[up] > 0).all()
    assert (lab[down] == base[down]).mean() > 0.999


def test_train_refine_writes_cards_that_segment(tmp_path: Path) -> None:
    """A tiny run on phantoms only (no shared data): the refinement card, the pair card
    (usable as --model) and a mask on the input's grid."""
    from medseg.segment import segment
    from medseg.train.refine import (
        RefineTrainConfig,
        RefineTrainingConfig,
        load_refine_config,
        train_refiner,
    )

    yaml = tmp_path / "r.yaml"
    yaml.write_text(f"""job: train_refine
name: tiny-r
output_dir: {tmp_path / 'out'}
seed: 3
base_model: {DEFAULT_MODEL}
data: {{real_train: [], real_val: [], phantoms: 2, phantom_lesion_variants: 1,
        phantom_shape: [24, 64, 64]}}
model: {{channels: [4, 8], grid_mm: 4.0}}
training: {{minutes: 0.02, crop: [8, 16, 16], lesion_weight: 8, focus: 0.5}}
""")
    cfg = load_refine_config(yaml)
    assert isinstance(cfg, RefineTrainConfig) and cfg.training.lesion_weight == 8
    logs: list[str] = []
    card = train_refiner(cfg, log=logs.append)
    assert card["kind"] == REFINER_KIND and card["training"]["steps"] >= 1
    pair = tmp_path / "out" / f"tiny-r-on-{DEFAULT_MODEL}.json"
    model = load_model(pair)
    assert model.refiner is not None and model.refiner.name == "tiny-r"
    vol, _ = make_phantom(seed=8, shape=(20, 64, 64))
    seg = segment(vol, model=model, qc=False)
    assert seg.labels.geometry == vol.geometry and seg.labels.shape == vol.shape
    with pytest.raises(ConfigError, match="crop"):
        RefineTrainConfig(training=RefineTrainingConfig(crop=[10, 16, 16]))
    # the command refuses a GPU it would not use, before any work
    from medseg.cli import main

    assert main(["train", str(yaml), "--device", "cuda", "-q"]) != 0
