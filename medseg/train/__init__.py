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

import csv
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from monai.data import MetaTensor

from medseg._version import __version__
from medseg.config import from_mapping, read_yaml
from medseg.errors import ConfigError
from medseg.models import ModelSpec, build_network, sha256_of
from medseg.train.realct import IGNORE
from medseg.volume import CTVolume

__all__ = ["TrainConfig", "load_train_config", "prepare_slices", "train"]


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
    pseudo_label_model: str = "lung2d-v1"
    #: Copies of each real training study with pathology inserted (medseg.train.lesions),
    #: and lesions per copy; an effusion is added to a copy with this probability.
    lesion_variants: int = 0
    lesions_per_variant: int = 3
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


@dataclass
class TrainConfig:
    job: str = "train"
    name: str = "lung2d-v1"
    output_dir: str = "out/train_lung2d"
    seed: int = 0
    threads: int | None = None
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
        for k in ("epochs", "steps_per_epoch", "batch_size", "patience"):
            value = getattr(self.training, k)
            if value < 1:
                raise ConfigError(f"training.{k} must be at least 1, got {value}")

    def spec(self) -> ModelSpec:
        m = self.model
        return ModelSpec(name=self.name, channels=tuple(m.channels), strides=tuple(m.strides),
                         num_res_units=m.num_res_units, context_slices=m.context_slices,
                         context_step_mm=m.context_step_mm,
                         pixel_spacing_mm=m.pixel_spacing_mm, roi_size=m.roi_size)


def load_train_config(path: str | Path, **overrides: Any) -> TrainConfig:
    data = read_yaml(path)
    cfg = from_mapping(TrainConfig, data, path=Path(path))
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    return cfg


# -- data -----------------------------------------------------------------------------------
def prepare_slices(image: CTVolume, labels: CTVolume | None, spec: ModelSpec
                   ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8] | None]:
    """The model's view of a volume, exactly as inference builds it: oriented, resampled in
    plane, HU scaled. Returns image (K, I', J') float32 and labels (K, I', J') uint8."""
    from monai.transforms import Spacingd

    from medseg.preprocess import (
        orientation_transform,
        slab_as_2d,
        slab_transform,
        to_metatensor,
    )

    d: dict[Any, Any] = {"image": to_metatensor(image)}
    keys = ["image"]
    if labels is not None:
        d["label"] = to_metatensor(labels, labels.array.astype(np.float32))
        keys.append("label")
    d = dict(orientation_transform(keys)(d))
    n = int(d["image"].shape[-1])
    img = cast(MetaTensor, slab_transform("image", spec.pixel_spacing_mm)(
        {"image": slab_as_2d(d["image"], 0, n)})["image"])
    out_img = np.ascontiguousarray(img.as_tensor().numpy(), dtype=np.float32)
    if labels is None:
        return out_img, None
    lab = Spacingd(keys="label", pixdim=(spec.pixel_spacing_mm, spec.pixel_spacing_mm),
                   mode="nearest", dtype=np.float32)(
        {"label": slab_as_2d(d["label"], 0, n)})["label"]
    out_lab = cast(MetaTensor, lab).as_tensor().numpy()
    return out_img, np.rint(out_lab).astype(np.uint8)


@dataclass
class Sample:
    name: str
    image: npt.NDArray[np.float32]  # (K, I, J)
    label: npt.NDArray[np.uint8]     # 0, 1, 2 and IGNORE (255): no loss there
    weight: float = 1.0
    #: Slices worth drawing more often (inserted lesions); drawn in half of this sample's
    #: draws when given.
    focus: npt.NDArray[np.int64] | None = None
    #: Voxel masks of inserted lesions (lung) and effusions (not lung), for validation.
    lesion: npt.NDArray[np.bool_] | None = None
    effusion: npt.NDArray[np.bool_] | None = None
    #: Spacing between the slices (mm), where known (lesions are inserted in mm).
    slice_mm: float = 0.0


def _phantom_samples(seeds: list[int], shape: list[int], spec: ModelSpec,
                     abdomen_fraction: float = 0.0, effusion_fraction: float = 0.0
                     ) -> list[Sample]:
    from medseg.synth import make_phantom

    rng = np.random.default_rng(seeds[0] if seeds else 0)
    # a separate stream for the new options, so phantoms drawn without them are unchanged
    opt_rng = np.random.default_rng([seeds[0] if seeds else 0, 7])
    out = []
    for s in seeds:
        extra: dict[str, Any] = {}
        if abdomen_fraction and opt_rng.random() < abdomen_fraction:
            extra.update(abdomen=True, coverage="abdomen")
        if effusion_fraction and opt_rng.random() < effusion_fraction:
            extra["effusion"] = True
        # vary the field of view and resolution like real scanners; the slice count follows
        # a 180-320 mm coverage, capped at shape[0] (then only part of the chest is seen)
        inplane = float(rng.uniform(0.6, 1.0)) * 512 / max(shape[1], shape[2])
        sz = float(rng.choice([1.0, 1.25, 2.0, 2.5, 3.0, 5.0]))
        nz = int(min(shape[0], max(16, round(float(rng.uniform(180, 320)) / sz))))
        image, labels = make_phantom(seed=s, shape=(nz, shape[1], shape[2]),
                                     spacing=(inplane, inplane, sz), **extra)
        img, lab = prepare_slices(image, labels, spec)
        assert lab is not None
        out.append(Sample(f"phantom_{s}", img, lab, slice_mm=sz))
    return out


def cip_reference(root: Path) -> tuple[CTVolume, CTVolume] | None:
    """cip-ct64's CT and its lung labels (1 right, 2 left) from CIP's label map: regions
    12-14 (right lung thirds) -> 1, regions 9-11 (left lung thirds) -> 2. None if absent."""
    from medseg.io import load

    ct_dir, lm_path = root / "cip-ct64" / "ct-64Dicom", root / "cip-ct64" / "lm-64.nrrd"
    if not ct_dir.is_dir() or not lm_path.exists():
        return None
    image = load(ct_dir)
    region = load(lm_path).array % 256
    lab = np.zeros(region.shape, np.uint8)
    lab[(region >= 12) & (region <= 14)] = 1
    lab[(region >= 9) & (region <= 11)] = 2
    return image, image.with_array(lab)


def validation_cut(lung_slices: npt.ArrayLike, val_fraction: float) -> int:
    """Index (in inferior -> superior slice order) where cip-ct64's validation part ends:
    the inferior ``val_fraction`` of the lung-bearing slices, and everything below them."""
    ks = np.flatnonzero(lung_slices)
    return int(ks[0] + round(val_fraction * (ks[-1] - ks[0] + 1)))


def _cip_samples(root: Path, spec: ModelSpec, val_fraction: float
                 ) -> tuple[Sample, Sample] | None:
    """cip-ct64 split along z (:func:`validation_cut`): inferior part validation, the rest
    training."""
    ref = cip_reference(root)
    if ref is None:
        return None
    img, lab_r = prepare_slices(ref[0], ref[1], spec)
    assert lab_r is not None
    # oriented k runs inferior -> superior: validation = slices below the cut
    cut = validation_cut(lab_r.reshape(lab_r.shape[0], -1).any(axis=1), val_fraction)
    sz = _slice_spacing(ref[0])
    return (Sample("cip-ct64-train", img[cut:], lab_r[cut:], slice_mm=sz),
            Sample("cip-ct64-val", img[:cut], lab_r[:cut], slice_mm=sz))


def _slice_spacing(volume: CTVolume) -> float:
    """Spacing (mm) between axial slices: the index axis closest to world z."""
    return float(volume.spacing[int(np.argmax(np.abs(volume.direction[2, :])))])


def _to_hu(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    from medseg.preprocess import HU_MAX, HU_MIN

    return np.asarray(x * np.float32(HU_MAX - HU_MIN) + np.float32(HU_MIN), np.float32)


def _from_hu(hu: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    from medseg.preprocess import HU_MAX, HU_MIN

    return np.clip((hu - np.float32(HU_MIN)) / np.float32(HU_MAX - HU_MIN), 0, 1
                   ).astype(np.float32)


#: Training labels of inserted-lesion pixels: their lung label plus this offset (the loss
#: maps them back and weights them; see :class:`MaskedDiceCE`).
LESION_OFFSET = 100


def lesion_variant(base: Sample, slice_mm: float, spec: ModelSpec, rng: np.random.Generator,
                   n_lesions: int, effusion_probability: float, name: str,
                   mark_lesions: bool = False) -> Sample:
    """A copy of a prepared real study with pathology inserted (labels known by
    construction: lesions stay lung, an effusion leaves it; :mod:`.lesions`). With
    ``mark_lesions`` lesion pixels are labelled lung + :data:`LESION_OFFSET` (training)."""
    from medseg.train.lesions import insert_random_pathology

    # prepared stacks are (S, L, P); the lesion code works in (S, P, L)
    hu = np.ascontiguousarray(_to_hu(base.image).transpose(0, 2, 1))
    lab = np.ascontiguousarray(base.label.transpose(0, 2, 1))
    lung_lab = np.where(lab == IGNORE, 0, lab).astype(np.uint8)
    spacing = (slice_mm, spec.pixel_spacing_mm, spec.pixel_spacing_mm)
    found = insert_random_pathology(hu, lung_lab, spacing, rng, n_lesions=n_lesions,
                                    effusion_probability=effusion_probability)
    lesion = np.zeros(hu.shape, bool)
    effusion = np.zeros(hu.shape, bool)
    for f in found:
        if f.kind == "effusion":
            effusion |= f.mask
        else:
            lesion |= f.mask
    # lesion voxels are lung by construction: never ignored; effusion voxels are not lung
    lab = np.where(lesion, lung_lab + (LESION_OFFSET if mark_lesions else 0), lab)
    lab[effusion] = 0
    focus = np.flatnonzero((lesion | effusion).any(axis=(1, 2)))
    return Sample(name, np.ascontiguousarray(_from_hu(hu).transpose(0, 2, 1)),
                  np.ascontiguousarray(lab.transpose(0, 2, 1)), base.weight, focus,
                  np.ascontiguousarray(lesion.transpose(0, 2, 1)),
                  np.ascontiguousarray(effusion.transpose(0, 2, 1)), slice_mm)


def _real_samples(names: list[str], root: Path, cache: Path, spec: ModelSpec, d: DataConfig,
                  seed: int, variants: int, out_dir: Path | None,
                  log: Callable[[str], None], training: bool = True) -> list[Sample]:
    """Prepared real studies with derived labels, and their lesion variants."""
    from medseg.train.realct import derive_lung_labels, load_real_ct

    out: list[Sample] = []
    for n, name in enumerate(names):
        vol = load_real_ct(root, name, cache)
        lab, stats = derive_lung_labels(vol, d.pseudo_label_model)
        log(f"{name}: derived labels {stats}")
        if out_dir is not None:
            _label_overlay(vol, lab, out_dir / f"labels-{name}.png")
        img, plab = prepare_slices(vol, vol.with_array(lab), spec)
        assert plab is not None
        base = Sample(f"real-{name}", img, plab, slice_mm=_slice_spacing(vol))
        out.append(base)
        rng = np.random.default_rng([seed, 1000 + n])
        for v in range(variants):
            out.append(lesion_variant(base, base.slice_mm, spec, rng,
                                      d.lesions_per_variant, d.effusion_probability,
                                      f"real-{name}-lesions{v}", mark_lesions=training))
    return out


def _label_overlay(vol: CTVolume, lab: npt.NDArray[np.uint8], path: Path) -> None:
    """Coronal montage of derived labels (ignored voxels shown as background) to inspect."""
    from medseg.visualize import overlay_montage

    shown = np.where(lab == IGNORE, 0, lab).astype(np.uint8)
    path.write_bytes(overlay_montage(vol, vol.with_array(shown), view="coronal"))


def _widened(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
    """``source`` weights for a network with more context slices (``target``'s shapes): a
    tensor wider in the input channels keeps its weights on the central channels and starts
    at zero on the new outer ones, so the widened network computes what the source did."""
    out = {}
    for k, t in target.items():
        w = source[k]
        if w.shape != t.shape:
            if w.dim() < 2 or w.shape[0] != t.shape[0] or w.shape[2:] != t.shape[2:] \
                    or (t.shape[1] - w.shape[1]) % 2:
                raise ConfigError(f"init_weights: {k} has shape {tuple(w.shape)}, the "
                                  f"network needs {tuple(t.shape)}")
            off = (t.shape[1] - w.shape[1]) // 2
            wide = torch.zeros_like(t)
            wide[:, off:off + w.shape[1]] = w
            w = wide
        out[k] = w
    return out


def _context(stack: npt.NDArray[np.float32], k: int, c: int, step: int = 1
             ) -> npt.NDArray[np.float32]:
    """Slice ``k`` with ``c`` neighbours each side, ``step`` slices apart (edges repeat)."""
    idx = np.clip(k + step * np.arange(-c, c + 1), 0, stack.shape[0] - 1)
    return stack[idx]


def _augment() -> Any:
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    # No left-right flips: they would swap the anatomy of the right and left lung.
    return Compose([
        RandAffined(keys=["image", "label"], prob=0.8, rotate_range=(np.pi / 12,),
                    scale_range=(0.2, 0.2), translate_range=(20, 20),
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandGaussianSmoothd(keys="image", prob=0.25, sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2)),
        RandGaussianNoised(keys="image", prob=0.4, std=0.03),
        RandScaleIntensityd(keys="image", prob=0.3, factors=0.1),
        RandShiftIntensityd(keys="image", prob=0.3, offsets=0.05),
        RandAdjustContrastd(keys="image", prob=0.2, gamma=(0.8, 1.25)),
    ])


class SliceSampler:
    """Random 2.5D training crops from prepared volumes, weighted per source."""

    def __init__(self, samples: list[Sample], context: int, crop: int, seed: int,
                 spec: ModelSpec | None = None) -> None:
        self.samples = samples
        self.context = context
        self.steps = [spec.context_step(s.slice_mm) if spec is not None else 1
                      for s in samples]
        self.crop = crop
        self.rng = np.random.default_rng(seed)
        w = np.array([s.weight for s in samples], float)
        self.p = w / w.sum()
        self.lung_slices = [np.flatnonzero(
            np.isin(s.label.reshape(s.label.shape[0], -1),
                    (1, 2, 1 + LESION_OFFSET, 2 + LESION_OFFSET)).any(axis=1))
            for s in samples]
        self.aug = _augment()
        self.aug.set_random_state(seed=seed)
        self.fov_crop_probability = 0.0

    def _crop(self, img: npt.NDArray[np.float32], lab: npt.NDArray[np.uint8]
              ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
        c = self.crop
        _, h, w = img.shape
        ph, pw = max(0, c - h), max(0, c - w)
        if ph or pw:
            pad = ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
            img, lab = np.pad(img, pad), np.pad(lab, pad[1:])
            _, h, w = img.shape
        y0 = int(self.rng.integers(0, h - c + 1))
        x0 = int(self.rng.integers(0, w - c + 1))
        return img[:, y0:y0 + c, x0:x0 + c], lab[y0:y0 + c, x0:x0 + c]

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for _ in range(n):
            i = int(self.rng.choice(len(self.samples), p=self.p))
            s = self.samples[i]
            lung = self.lung_slices[i]
            if s.focus is not None and s.focus.size and self.rng.random() < 0.5:
                k = int(self.rng.choice(s.focus))
            elif lung.size and self.rng.random() < 0.85:
                k = int(self.rng.choice(lung))
            else:
                k = int(self.rng.integers(0, s.image.shape[0]))
            img, lab = self._crop(_context(s.image, k, self.context, self.steps[i]),
                                  s.label[k])
            d = self.aug({"image": torch.from_numpy(np.ascontiguousarray(img)),
                          "label": torch.from_numpy(lab[None].astype(np.float32))})
            x = torch.as_tensor(d["image"]).float()
            y = torch.as_tensor(d["label"]).round().long()
            if self.rng.random() < self.fov_crop_probability:
                keep = torch.from_numpy(self._fov(x.shape[-2:]))
                x = x * keep
                y = y * keep
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), torch.stack(ys)

    def _fov(self, shape: Any) -> npt.NDArray[np.bool_]:
        """A cut field of view: one side of the body (a hemithorax), a rectangle, or a
        circle; what lies outside is air in a padded reconstruction (0 after scaling)."""
        h, w = int(shape[0]), int(shape[1])
        yy, xx = np.mgrid[0:h, 0:w]
        kind = self.rng.random()
        if kind < 0.45:  # one hemithorax: a cut across the left-right axis (axis 0 here)
            cut = int(self.rng.uniform(0.35, 0.65) * h)
            return np.asarray(yy < cut if self.rng.random() < 0.5 else yy >= cut)
        if kind < 0.75:
            y0, x0 = (int(self.rng.uniform(0, 0.3) * n) for n in (h, w))
            y1, x1 = (int(self.rng.uniform(0.7, 1.0) * n) for n in (h, w))
            return np.asarray((yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1))
        r = self.rng.uniform(0.3, 0.5) * min(h, w)
        cy, cx = (self.rng.uniform(0.4, 0.6) * n for n in (h, w))
        return np.asarray((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)


# -- evaluation on prepared volumes -----------------------------------------------------------
def predict_prepared(net: torch.nn.Module, image: npt.NDArray[np.float32], context: int,
                     divisor: int, batch: int = 16, step: int = 1) -> npt.NDArray[np.uint8]:
    """Argmax labels for a prepared (K, I, J) stack (whole slices, padded to ``divisor``)."""
    k, h, w = image.shape
    ph, pw = (-h) % divisor, (-w) % divisor
    padded = np.pad(image, ((0, 0), (0, ph), (0, pw)))
    out = np.zeros((k, h, w), np.uint8)
    net.eval()
    with torch.inference_mode():
        for k0 in range(0, k, batch):
            ks = range(k0, min(k, k0 + batch))
            x = torch.from_numpy(np.stack([_context(padded, kk, context, step)
                                           for kk in ks]))
            out[k0:k0 + len(ks)] = net(x).argmax(1)[:, :h, :w].numpy().astype(np.uint8)
    return out


def dice_per_lung(pred: npt.NDArray[Any], ref: npt.NDArray[Any]) -> dict[str, float]:
    """Dice per lung; reference voxels labelled IGNORE (255) are left out."""
    out = {}
    valid = ref != IGNORE
    for name, lab in (("right", 1), ("left", 2)):
        p, r = (pred == lab) & valid, ref == lab
        denom = int(p.sum() + r.sum())
        out[name] = 1.0 if denom == 0 else 2.0 * int((p & r).sum()) / denom
    return out


class MaskedDiceCE(torch.nn.Module):
    """Dice + cross-entropy (as MONAI's DiceCELoss with softmax, one-hot targets, background
    included) that leaves out voxels labelled ``ignore``: derived labels of real CT are
    uncertain there. Dice is computed over the whole batch per class."""

    def __init__(self, ignore: int = IGNORE, smooth: float = 1e-5,
                 lesion_weight: float = 1.0) -> None:
        super().__init__()
        self.ignore = ignore
        self.smooth = smooth
        self.lesion_weight = lesion_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y = target[:, 0]
        valid = (y != self.ignore)
        lesion = valid & (y >= LESION_OFFSET)
        y = torch.where(lesion, y - LESION_OFFSET, y)
        if valid.any():
            ce_map = torch.nn.functional.cross_entropy(logits, torch.where(valid, y, 0),
                                                       reduction="none")
            weight = valid.to(ce_map.dtype) * (1.0 + (self.lesion_weight - 1.0) * lesion)
            ce = (ce_map * weight).sum() / weight.sum()
        else:
            ce = logits.sum() * 0
        prob = torch.softmax(logits, dim=1) * valid[:, None]
        onehot = torch.nn.functional.one_hot(torch.where(valid, y, 0), logits.shape[1])
        onehot = onehot.permute(0, 3, 1, 2).to(prob.dtype) * valid[:, None]
        dims = (0, 2, 3)
        inter = (prob * onehot).sum(dims)
        denom = prob.sum(dims) + onehot.sum(dims)
        dice = 1.0 - (2 * inter + self.smooth) / (denom + self.smooth)
        return ce + dice.mean()


def lesion_scores(pred: npt.NDArray[Any], s: Sample) -> dict[str, float]:
    """Share of inserted lesion voxels inside the lung mask, of effusion voxels inside it."""
    out = {}
    if s.lesion is not None and s.lesion.any():
        out["lesion_inside"] = float((pred[s.lesion] > 0).mean())
    if s.effusion is not None and s.effusion.any():
        out["effusion_inside"] = float((pred[s.effusion] > 0).mean())
    return out


# -- the loop -------------------------------------------------------------------------------
def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(ep, [r["train_loss"] for r in rows], label="train loss (Dice+CE)")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    for key in ("val_dice_right", "val_dice_left", "val_dice_cip_right", "val_dice_cip_left"):
        if any(key in r for r in rows):
            ax[1].plot(ep, [r.get(key, np.nan) for r in rows], label=key)
    ax[1].set_xlabel("epoch")
    ax[1].set_ylim(0, 1)
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def train(cfg: TrainConfig, *, log: Callable[[str], None] = print,
          shared_data: str | Path | None = None) -> dict[str, Any]:
    """Run training as configured; returns the model card written beside the weights."""
    from monai.utils import set_determinism

    t_start = time.monotonic()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_determinism(seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    spec = cfg.spec()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    d = cfg.data
    seeds = [cfg.seed + i for i in range(d.phantoms)]
    val_seeds = [cfg.seed + 100_000 + i for i in range(d.phantom_val)]
    log(f"preparing {len(seeds)} training and {len(val_seeds)} validation phantoms")
    train_samples = _phantom_samples(seeds, d.phantom_shape, spec, d.phantom_abdomen_fraction,
                                     d.phantom_effusion_fraction)
    val_samples = _phantom_samples(val_seeds, d.phantom_shape, spec, d.phantom_abdomen_fraction,
                                   d.phantom_effusion_fraction)
    data_note = [f"{len(seeds)} phantoms (medseg.synth, seeds {seeds[0]}..{seeds[-1]}; "
                 f"upper abdomen in {d.phantom_abdomen_fraction:.0%}, effusion in "
                 f"{d.phantom_effusion_fraction:.0%} of draws)"]
    if d.phantom_lesion_variants:
        prng = np.random.default_rng([cfg.seed, 2000])
        train_samples += [lesion_variant(p, p.slice_mm, spec, prng, d.lesions_per_variant,
                                         d.effusion_probability, f"{p.name}-lesions{v}",
                                         mark_lesions=True)
                          for p in list(train_samples) for v in range(d.phantom_lesion_variants)]
        data_note.append(f"{d.phantom_lesion_variants} copies of each phantom with inserted "
                         f"pathology ({d.lesions_per_variant} lesions each)")
        log(f"phantoms: {len(train_samples)} training samples with lesion copies")
    root = Path(shared_data or os.environ.get("MEDSEG_SHARED_DATA") or (d.shared_data or ""))
    cip = _cip_samples(root, spec, d.cip_val_fraction) if d.shared_data or shared_data else None
    if cip is not None:
        cip_train, cip_val = cip
        n_ph = len(train_samples)
        cip_train.weight = d.cip_weight * n_ph / (1 - d.cip_weight) if d.cip_weight < 1 else 1.0
        train_samples.append(cip_train)
        val_samples.append(cip_val)
        data_note.append(f"cip-ct64 superior {1 - d.cip_val_fraction:.0%} of lung slices "
                         f"({cip_train.image.shape[0]} slices; the rest is validation)")
        log(f"cip-ct64: {cip_train.image.shape[0]} training / {cip_val.image.shape[0]} "
            "validation slices")
    else:
        log("cip-ct64 not found: training on phantoms only")
    if (d.real_train or d.real_val) and (d.shared_data or shared_data):
        cache = out_dir / "real-ct-cache"
        real = _real_samples(d.real_train, root, cache, spec, d, cfg.seed, d.lesion_variants,
                             out_dir, log)
        n_before = sum(s.weight for s in train_samples)
        share = d.real_weight / (1 - d.real_weight) if d.real_weight < 1 else 1.0
        for s in real:
            s.weight = share * n_before / max(1, len(real))
        train_samples += real
        data_note.append(f"real CT with derived labels: {', '.join(d.real_train)} "
                         f"({d.lesion_variants} copies each with inserted pathology), "
                         f"{d.real_weight:.0%} of draws")
        # validation: two copies of each held-out study with pathology inserted
        held = _real_samples(d.real_val, root, cache, spec, d, cfg.seed + 1, 2, out_dir, log,
                             training=False)
        val_samples += [s for s in held if s.lesion is not None]
        data_note.append(f"validation only (never trained on): {', '.join(d.real_val)}")
    t = cfg.training
    sampler = SliceSampler(train_samples, spec.context_slices, t.crop_size, cfg.seed, spec)
    sampler.fov_crop_probability = t.fov_crop_probability
    net = build_network(spec)
    if t.init_weights:
        from medseg.models import load_model

        net.load_state_dict(_widened(load_model(t.init_weights).network.state_dict(),
                                     net.state_dict()))
        data_note.append(f"initialised from {t.init_weights}")
    opt = torch.optim.AdamW(net.parameters(), lr=t.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
    loss_fn = MaskedDiceCE(lesion_weight=t.lesion_weight)
    divisor = 2 ** len(spec.strides)
    rows: list[dict[str, Any]] = []
    best, best_epoch, best_state = -1.0, 0, None
    csv_path = out_dir / "log.csv"
    stopped = "epochs done"
    for epoch in range(1, t.epochs + 1):
        net.train()
        losses = []
        te = time.monotonic()
        for _ in range(t.steps_per_epoch):
            x, y = sampler.batch(t.batch_size)
            opt.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.item()))
        sched.step()
        row: dict[str, Any] = {"epoch": epoch, "train_loss": round(float(np.mean(losses)), 5),
                               "lr": round(float(sched.get_last_lr()[0]), 7)}
        dices: list[float] = []
        ph_scores = []
        for s in val_samples:
            pred = predict_prepared(net, s.image, spec.context_slices, divisor,
                                    step=spec.context_step(s.slice_mm))
            dd = dice_per_lung(pred, s.label)
            if s.name.startswith("cip"):
                row["val_dice_cip_right"] = round(dd["right"], 4)
                row["val_dice_cip_left"] = round(dd["left"], 4)
            elif s.name.startswith("real"):
                short = s.name.removeprefix("real-")
                ls = lesion_scores(pred, s)
                row[f"val_dice_{short}"] = round((dd["right"] + dd["left"]) / 2, 4)
                for k, v in ls.items():
                    row[f"val_{k}_{short}"] = round(v, 4)
                # lesions inside and effusion outside count as much as the Dice
                dices += [ls.get("lesion_inside", 1.0), 1.0 - ls.get("effusion_inside", 0.0)]
            else:
                ph_scores.append(dd)
            dices += [dd["right"], dd["left"]]
        if ph_scores:
            row["val_dice_right"] = round(float(np.mean([p["right"] for p in ph_scores])), 4)
            row["val_dice_left"] = round(float(np.mean([p["left"] for p in ph_scores])), 4)
        score = float(np.mean(dices))
        row["val_score"] = round(score, 4)
        row["seconds"] = round(time.monotonic() - te, 1)
        rows.append(row)
        with open(csv_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r},
                                                          key=lambda k: list(row).index(k)
                                                          if k in row else 99))
            writer.writeheader()
            writer.writerows(rows)
        log(" ".join(f"{k}={v}" for k, v in row.items()))
        if score > best:
            best, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if epoch - best_epoch >= t.patience:
            stopped = f"early stop: no better validation score for {t.patience} epochs"
            break
        if (time.monotonic() - t_start) / 60 > cfg.max_minutes:
            stopped = f"time budget of {cfg.max_minutes} min reached"
            break
    if best_state is None:
        raise ConfigError("training produced no model (no epoch completed)")
    _plot(rows, out_dir / "curves.png")
    weights = out_dir / f"{cfg.name}.pt"
    torch.save(best_state, weights)
    best_row = rows[best_epoch - 1]
    card = {
        "name": cfg.name,
        "medseg_version": __version__,
        "weights_file": weights.name,
        "sha256": sha256_of(weights),
        "architecture": spec.to_dict(),
        "n_parameters": int(sum(p.numel() for p in net.parameters())),
        "training": {
            "data": data_note,
            "config": asdict(cfg),
            "epochs_run": len(rows),
            "best_epoch": best_epoch,
            "best_validation": best_row,
            "stopped": stopped,
            "minutes": round((time.monotonic() - t_start) / 60, 1),
            "torch": torch.__version__,
        },
    }
    (out_dir / f"{cfg.name}.json").write_text(json.dumps(card, indent=2) + "\n")
    log(f"best epoch {best_epoch} (validation score {best:.4f}); wrote {weights}")
    return card
