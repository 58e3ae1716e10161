"""Training of the lung U-Net (``medseg train pipelines/train_lung2d.yaml``).

Data: generated phantoms with exact labels (varied anatomy, pathology, noise, kernels and
fields of view) and, when ``../shared/data`` is present, the training part of cip-ct64 (the
one labelled real chest CT; its inferior lung slices are held out for validation). Every
volume goes through the same orientation / resampling / HU scaling as inference
(:mod:`medseg.preprocess`). Loss: Dice + cross-entropy (class imbalance); validation Dice per
lung every epoch; early stopping; fixed seeds; CSV log and a loss/Dice plot; the best
weights are saved with a model card holding their SHA-256.
"""

from __future__ import annotations

from medseg.train.config import (
    DataConfig,
    ModelConfig,
    TrainConfig,
    TrainingConfig,
    load_train_config,
)
from medseg.train.data import Sample, prepare_slices
from medseg.train.loop import MaskedDiceCE, dice_per_lung, train

__all__ = ["DataConfig", "MaskedDiceCE", "ModelConfig", "Sample", "TrainConfig",
           "TrainingConfig", "dice_per_lung", "load_train_config", "prepare_slices", "train"]
