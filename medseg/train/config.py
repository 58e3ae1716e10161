"""The training configuration (``pipelines/train_*.yaml``): what data, which network, how
long; read and validated by :func:`load_train_config`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.config import from_mapping, read_yaml
from medseg.errors import ConfigError
from medseg.inference import LABEL_MODEL
from medseg.models import ModelSpec

__all__ = ["DataConfig", "ModelConfig", "TrainConfig", "TrainingConfig", "load_train_config"]


@dataclass
class DataConfig:
    phantoms: int = 48
    phantom_val: int = 4
    phantom_shape: list[int] = field(default_factory=lambda: [96, 192, 192])
    shared_data: str | None = "../shared/data"
    cip_val_fraction: float = 0.5
    cip_weight: float = 0.25
    #: Fractions of the training phantoms drawn with an upper abdomen (stomach and bowel
    #: gas under the diaphragm, only the lung bases in view) and with a pleural effusion.
    phantom_abdomen_fraction: float = 0.0
    phantom_effusion_fraction: float = 0.0
    #: Copies of each training phantom with pathology inserted (as for the real studies,
    #: ``lesions_per_variant`` each): lesions in many more lung shapes than the few real
    #: studies give, so the network learns "dense tissue in the lung's outline is lung"
    #: rather than one patient's outline.
    phantom_lesion_variants: int = 0
    #: Real, unlabelled CT (names in medseg.train.realct.REAL_SOURCES) with derived labels:
    #: trained on, and kept for validation only (never trained on).
    real_train: list[str] = field(default_factory=list)
    real_val: list[str] = field(default_factory=list)
    #: The model whose masks (with the threshold baseline's) give the real CT's labels.
    pseudo_label_model: str = LABEL_MODEL
    #: Copies of each real training study with pathology inserted (medseg.train.lesions),
    #: and lesions per copy; an effusion is added to a copy with this probability.
    lesion_variants: int = 0
    lesions_per_variant: int = 3
    #: Every this many epochs the real studies' lesion copies are drawn again with fresh
    #: lesions (0: never): the network then sees hundreds of lesions per patient instead of
    #: the same ``lesion_variants x lesions_per_variant``, and cannot learn them by place.
    lesion_refresh_epochs: int = 0
    effusion_probability: float = 0.35
    #: Share of training draws that come from the real studies (with their variants).
    real_weight: float = 0.4


@dataclass
class ModelConfig:
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    num_res_units: int = 1
    context_slices: int = 1
    #: mm between context slices (0: adjacent slices); see ModelSpec.context_step_mm.
    context_step_mm: float = 0.0
    pixel_spacing_mm: float = 2.0
    roi_size: int = 256
    #: The plane the network is trained on: axial (default), coronal or sagittal (an
    #: experiment: :mod:`medseg.train.views`).
    view: str = "axial"


@dataclass
class TrainingConfig:
    epochs: int = 40
    steps_per_epoch: int = 60
    batch_size: int = 16
    crop_size: int = 192
    learning_rate: float = 2e-3
    patience: int = 8
    #: Start from these shipped weights (a model name) instead of random ones.
    init_weights: str | None = None
    #: Probability that a training crop's field of view is cut (one side of the body, a
    #: rectangle or the scanner's circle; outside is air as in a padded reconstruction).
    fov_crop_probability: float = 0.0
    #: Weight of inserted-lesion pixels in the cross-entropy (1 = like any pixel): a lesion
    #: is a small part of a crop, and the costly error is leaving it out of the lung.
    lesion_weight: float = 1.0
    #: Weight of inserted-effusion pixels (not lung) in the cross-entropy: with lesions
    #: weighed more and effusions not, calling fluid next to the lung "lung" costs the
    #: network less than leaving a lesion out, and it learns to (lung2d-v7).
    effusion_weight: float = 1.0
    #: Weight of background pixels up to ``dome_mm`` below the lowest lung voxel of their
    #: column (the liver, spleen and stomach under the diaphragm's dome): with lesions
    #: weighed more, a network that sees +-30 mm of context learns to call the dome's top
    #: "consolidation" (lung2d-v10 labelled 77 mL of liver on LIDC-IDRI-0001).
    dome_weight: float = 1.0
    dome_mm: float = 40.0
    #: Inserted-lesion pixels that lie under their column's lung floor, were they not lung
    #: (within ``dome_mm``: a mass or consolidation at a lung's bottom, which looks like
    #: the abdomen under the dome), weigh ``lesion_weight * dome_weight``: the dome weight
    #: alone taught lung2d-v13 to drop them (masses 97 -> 90 % inside).
    dome_lesions: bool = False
    #: Share of training crops smoothly warped (elastic deformation, batched) and the
    #: standard deviation of the warp's displacements in mm.
    elastic_probability: float = 0.0
    elastic_mm: float = 8.0


@dataclass
class TrainConfig:
    job: str = "train"
    name: str = "lung2d-v1"
    output_dir: str = "out/train_lung2d"
    seed: int = 0
    threads: int | None = None
    #: where the network trains: cpu (default), auto, cuda or cuda:N
    device: str = "cpu"
    max_minutes: float = 45.0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        if self.job != "train":
            raise ConfigError(f"job must be 'train', got {self.job!r}")
        if len(self.model.channels) != len(self.model.strides) + 1:
            raise ConfigError("model.channels needs one more entry than model.strides")
        if self.training.crop_size % (2 ** len(self.model.strides)):
            raise ConfigError("training.crop_size must be divisible by 2**len(strides)")
        if not 0.0 < self.data.cip_val_fraction < 1.0:
            raise ConfigError("data.cip_val_fraction must be between 0 and 1")
        if not 0.0 <= self.training.elastic_probability <= 1.0:
            raise ConfigError("training.elastic_probability must be between 0 and 1, got "
                              f"{self.training.elastic_probability}")
        from medseg.train.views import VIEWS

        if self.model.view not in VIEWS:
            raise ConfigError(f"model.view must be one of {', '.join(VIEWS)}, got "
                              f"{self.model.view!r}")
        if self.model.view != "axial" and self.training.dome_weight != 1.0:
            raise ConfigError("training.dome_weight needs model.view: axial (the dome is "
                              "marked below each axial column's lung floor)")
        if not self.training.dome_mm > 0:
            raise ConfigError(f"training.dome_mm must be above 0, got {self.training.dome_mm}")
        for k in ("lesion_weight", "effusion_weight", "dome_weight"):
            if not getattr(self.training, k) > 0:
                raise ConfigError(f"training.{k} must be above 0, got "
                                  f"{getattr(self.training, k)}")
        if self.data.lesion_refresh_epochs < 0:
            raise ConfigError("data.lesion_refresh_epochs must be 0 (never) or more, got "
                              f"{self.data.lesion_refresh_epochs}")
        for k in ("epochs", "steps_per_epoch", "batch_size", "patience"):
            value = getattr(self.training, k)
            if value < 1:
                raise ConfigError(f"training.{k} must be at least 1, got {value}")

    def spec(self) -> ModelSpec:
        m = self.model
        return ModelSpec(name=self.name, channels=tuple(m.channels), strides=tuple(m.strides),
                         num_res_units=m.num_res_units, context_slices=m.context_slices,
                         context_step_mm=m.context_step_mm,
                         pixel_spacing_mm=m.pixel_spacing_mm, roi_size=m.roi_size,
                         view=m.view)


def load_train_config(path: str | Path, **overrides: Any) -> TrainConfig:
    data = read_yaml(path)
    cfg = from_mapping(TrainConfig, data, path=Path(path))
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    return cfg
