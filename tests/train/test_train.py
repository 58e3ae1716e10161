"""Training smoke test (seconds, tiny phantoms) and config validation."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from medseg.errors import ConfigError, UnreadableFileError
from medseg.inference.unet import InferenceSettings, unet_labels
from medseg.models import load_model
from medseg.synth import make_phantom
from medseg.train import load_train_config, train

TINY = {
    "job": "train", "name": "tiny", "seed": 3, "threads": 2, "max_minutes": 3,
    "data": {"phantoms": 2, "phantom_val": 1, "phantom_shape": [20, 64, 64],
             "shared_data": None},
    "model": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 0,
              "pixel_spacing_mm": 4.0, "roi_size": 64},
    "training": {"epochs": 4, "steps_per_epoch": 6, "batch_size": 4, "crop_size": 48,
                 "learning_rate": 0.01, "patience": 10},
}


def _write(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_smoke_training_loss_goes_down_and_checkpoint_loads(tmp_path: Path) -> None:
    cfg = load_train_config(_write(tmp_path, {**TINY, "output_dir": str(tmp_path / "out")}))
    card = train(cfg, log=lambda _m: None)
    out = tmp_path / "out"
    with open(out / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    losses = [float(r["train_loss"]) for r in rows]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert (out / "curves.png").stat().st_size > 1000
    model = load_model(out / "tiny.json")
    assert model.sha256 == card["sha256"]
    image, _ = make_phantom(seed=9, shape=(6, 48, 48), spacing=(5.0, 5.0, 5.0))
    labels = unet_labels(image, model, InferenceSettings())
    assert labels.shape == image.shape and set(np.unique(labels)) <= {0, 1, 2}


def test_tampered_weights_refused(tmp_path: Path) -> None:
    cfg = load_train_config(_write(tmp_path, {**TINY, "output_dir": str(tmp_path / "out"),
                                              "training": {**TINY["training"], "epochs": 1}}))
    train(cfg, log=lambda _m: None)
    weights = tmp_path / "out" / "tiny.pt"
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(UnreadableFileError, match="checksum mismatch") as exc:
        load_model(tmp_path / "out" / "tiny.json")
    assert exc.value.path is not None and str(exc.value.path).endswith("tiny.pt")


@pytest.mark.parametrize("change, match", [
    ({"epoch": 3}, r"unknown key 'training.epoch' \(did you mean 'epochs'\?\)"),
    ({"epochs": "many"}, "training.epochs must be an integer"),
    ({"crop_size": 50}, "divisible"),
    ({"patience": 0}, "at least 1"),
])
def test_config_errors_name_the_key(tmp_path: Path, change: dict, match: str) -> None:
    cfg = {**TINY, "training": {**TINY["training"], **change}}
    with pytest.raises(ConfigError, match=match) as info:
        load_train_config(_write(tmp_path, cfg))
    assert "cfg.yaml" in str(info.value)


def test_yaml_is_never_evaluated(tmp_path: Path) -> None:
    p = tmp_path / "cfg.yaml"
    p.write_text("job: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="cannot read YAML"):
        load_train_config(p)


def test_shipped_pipeline_config_is_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    cfg = load_train_config(root / "pipelines" / "train_lung2d.yaml")
    assert cfg.name == "lung2d-v1" and cfg.max_minutes <= 60
