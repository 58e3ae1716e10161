"""Training the 3D refinement stage (:mod:`medseg.inference.refine`): ``medseg train FILE.yaml``
with ``job: train_refine``.

The data are the slice model's own outputs: each training study (the real CT with derived
labels and phantoms, each in copies with pathology inserted, labels known by construction:
:func:`medseg.train.data.lesion_variant`) is prepared as inference prepares it, the slice
model (``base_model``) gives its lung probability, and both are resampled to the coarse
grid (``model.grid_mm``) with the label fractions. The network learns the correction of the
probability's logit that makes it match the labels, with inserted lesions (lung) and
effusions (not lung) weighed more, and half the crops centred on a lesion. Validation: the
held-out study (``data.real_val``) in copies with pathology, scored before and after the
refinement (lung Dice, % of lesion voxels inside, % of effusion voxels inside) at the end;
the scores go into the card.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from medseg.config import from_mapping, read_yaml
from medseg.errors import ConfigError
from medseg.inference import LABEL_MODEL
from medseg.inference.refine import (
    build_refiner_network,
    coarse_size,
    logit,
    pad_to_depth,
    refine_probabilities,
    refiner_input,
)

__all__ = ["RefineTrainConfig", "load_refine_config", "train_refiner"]

#: The training job's name in its YAML (``job:``).
JOB = "train_refine"


@dataclass
class RefineDataConfig:
    shared_data: str | None = "../shared/data"
    real_train: list[str] = field(default_factory=lambda: ["philips-141", "lungfcp-01-0001",
                                                           "rider-pilot-0117"])
    real_val: list[str] = field(default_factory=lambda: ["lidc-idri-0001"])
    pseudo_label_model: str = LABEL_MODEL
    #: Copies of each real training study with pathology inserted
    #: (``lesion_rounds x lesion_variants``).
    lesion_variants: int = 10
    lesion_rounds: int = 4
    lesions_per_variant: int = 5
    effusion_probability: float = 0.6
    #: Phantoms (:mod:`medseg.synth`), each clean and in ``phantom_lesion_variants`` copies
    #: with pathology.
    phantoms: int = 24
    phantom_lesion_variants: int = 1
    phantom_shape: list[int] = field(default_factory=lambda: [96, 192, 192])
    phantom_abdomen_fraction: float = 0.35
    phantom_effusion_fraction: float = 0.25
    #: Copies of each validation study with pathology (scored at the end).
    val_variants: int = 3


@dataclass
class RefineModelConfig:
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    num_res_units: int = 1
    grid_mm: float = 4.0


@dataclass
class RefineTrainingConfig:
    minutes: float = 14.0
    crop: list[int] = field(default_factory=lambda: [40, 64, 64])
    batch_size: int = 2
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    lesion_weight: float = 4.0
    effusion_weight: float = 4.0
    #: Share of crops centred (+- a quarter crop) on an inserted lesion.
    focus: float = 0.0
    #: Share of draws from the real studies' copies (the rest: phantoms).
    real_share: float = 0.75
    #: Weight of the correction's mean square in the loss (keeps it near 0 where the slice
    #: model is right).
    correction_l2: float = 1e-3


@dataclass
class RefineTrainConfig:
    job: str = JOB
    name: str = "lung3d-r1"
    output_dir: str = "out/train_lung3d"
    seed: int = 0
    threads: int | None = None
    #: The slice model whose probabilities are refined.
    base_model: str = "lung2d-v8"
    data: RefineDataConfig = field(default_factory=RefineDataConfig)
    model: RefineModelConfig = field(default_factory=RefineModelConfig)
    training: RefineTrainingConfig = field(default_factory=RefineTrainingConfig)

    def __post_init__(self) -> None:
        if self.job != JOB:
            raise ConfigError(f"job must be {JOB!r}, got {self.job!r}")
        if len(self.model.channels) < 2:
            raise ConfigError("model.channels needs at least two entries")
        if len(self.training.crop) != 3 or any(c % 2 ** (len(self.model.channels) - 1)
                                               for c in self.training.crop):
            raise ConfigError("training.crop needs three sizes, each divisible by "
                              f"{2 ** (len(self.model.channels) - 1)}")
        if not self.model.grid_mm > 0:
            raise ConfigError(f"model.grid_mm must be above 0, got {self.model.grid_mm}")
        for k in ("minutes", "lesion_weight", "effusion_weight", "learning_rate"):
            if not getattr(self.training, k) > 0:
                raise ConfigError(f"training.{k} must be above 0")
        for k in ("focus", "real_share"):
            if not 0.0 <= getattr(self.training, k) <= 1.0:
                raise ConfigError(f"training.{k} must be between 0 and 1")


def load_refine_config(path: str | Path, **overrides: Any) -> RefineTrainConfig:
    cfg = from_mapping(RefineTrainConfig, read_yaml(path), path=Path(path))
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    return cfg


#: Label values of the prepared training stacks (medseg.train.data).
def _fractions(label: npt.NDArray[np.uint8]) -> torch.Tensor:
    """(4, K, I, J) float: lung (lesions included), inserted lesion, inserted effusion,
    ignored."""
    from medseg.train.data import EFFUSION_MARK, LESION_OFFSET
    from medseg.train.realct import IGNORE

    lab = torch.from_numpy(label.astype(np.int64))
    lesion = (lab > LESION_OFFSET) & (lab < EFFUSION_MARK)
    lung = (lab == 1) | (lab == 2) | lesion
    return torch.stack([lung, lesion, lab == EFFUSION_MARK, lab == IGNORE]).float()


@dataclass
class _Volume:
    name: str
    # padded to the network's depth once (pad_to_depth): crops are cut from these
    x: torch.Tensor  # (2, K, I, J) coarse CT and lung probability
    t: torch.Tensor  # (4, K, I, J) coarse label fractions
    real: bool


def _coarse(sample: Any, probs: npt.NDArray[np.float32], pixel_mm: float, grid_mm: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.from_numpy(sample.image)
    p_lung = torch.from_numpy(probs[1] + probs[2])
    size = coarse_size(tuple(image.shape), sample.slice_mm, pixel_mm, grid_mm)
    x = refiner_input(image, p_lung, size)
    t = F.interpolate(_fractions(sample.label)[None], size=size, mode="trilinear",
                      align_corners=False)[0]
    return x, t


def _samples(cfg: RefineTrainConfig, spec: Any, root: Path, cache: Path,
             log: Callable[[str], None]) -> tuple[list[Any], list[Any]]:
    """Prepared training and validation samples (medseg.train.data.Sample)."""
    from medseg.train.config import DataConfig
    from medseg.train.data import _phantom_samples, _real_samples, lesion_variant

    d = cfg.data
    # each real study with derived labels and its copies with pathology, lesions marked as
    # for training (medseg.train.data)
    dc = DataConfig(pseudo_label_model=d.pseudo_label_model,
                    lesions_per_variant=d.lesions_per_variant,
                    effusion_probability=d.effusion_probability)
    train = _real_samples(d.real_train, root, cache, spec, dc, cfg.seed,
                          d.lesion_rounds * d.lesion_variants, None, log)
    seeds = [cfg.seed + 500_000 + i for i in range(d.phantoms)]
    phantoms = _phantom_samples(seeds, d.phantom_shape, spec, d.phantom_abdomen_fraction,
                                d.phantom_effusion_fraction)
    rng = np.random.default_rng([cfg.seed, 3000])
    train += phantoms + [lesion_variant(p, p.slice_mm, spec, rng, d.lesions_per_variant,
                                        d.effusion_probability, f"{p.name}-lesions{v}",
                                        mark_lesions=True)
                         for p in phantoms for v in range(d.phantom_lesion_variants)]
    val = _real_samples(d.real_val, root, cache, spec, dc, cfg.seed + 1, d.val_variants,
                        None, log)
    return train, val


def _crop(v: _Volume, crop: list[int], rng: np.random.Generator, focus: float
          ) -> tuple[torch.Tensor, torch.Tensor]:
    x, t = v.x, v.t
    at = None
    if focus and rng.random() < focus and bool((t[1] > 0.2).any()):
        idx = torch.nonzero(t[1] > 0.2)
        at = idx[int(rng.integers(len(idx)))].tolist()
    box = []
    for ax, c in enumerate(crop):
        n = int(x.shape[1 + ax])
        if n <= c:
            box.append(slice(0, n))
            continue
        a = int(rng.integers(0, n - c + 1))
        if at is not None:
            a = int(np.clip(at[ax] - c // 2 + rng.integers(-(c // 4), c // 4 + 1), 0, n - c))
        box.append(slice(a, a + c))
    xc, tc = x[(slice(None), *box)], t[(slice(None), *box)]
    pad = [0, crop[2] - xc.shape[3], 0, crop[1] - xc.shape[2], 0, crop[0] - xc.shape[1]]
    xc, tc = F.pad(xc, pad), F.pad(tc, pad)
    if rng.random() < 0.5:  # the patient's left-right mirror: lungs are lungs either side
        xc, tc = xc.flip(2), tc.flip(2)
    return xc, tc


def _loss(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
          tc: RefineTrainingConfig) -> torch.Tensor:
    d = net(x)[:, 0]
    z = logit(x[:, 1]) + d
    valid = 1 - t[:, 3]
    target = (t[:, 0] / valid.clamp(min=1e-3)).clamp(0, 1)
    w = valid * (1 + tc.lesion_weight * t[:, 1] + tc.effusion_weight * t[:, 2])
    bce = F.binary_cross_entropy_with_logits(z, target, reduction="none")
    return (bce * w).sum() / w.sum().clamp(min=1) + tc.correction_l2 * (d ** 2).mean()


def score_refinement(refiner: Any, sample: Any, probs: npt.NDArray[np.float32],
                     pixel_mm: float) -> dict[str, dict[str, float]]:
    """Lung Dice (ignored voxels left out), % of inserted-lesion voxels and of
    inserted-effusion voxels labelled lung, before (``base``) and after (``refined``) the
    refinement, on the prepared grid, without postprocessing."""
    p = torch.from_numpy(probs[1:])
    refined = refine_probabilities(refiner, p, torch.from_numpy(sample.image),
                                   sample.slice_mm, pixel_mm)
    from medseg.evaluate.metrics import dice

    f = _fractions(sample.label).bool()
    lung, lesion, effusion, valid = f[0], f[1], f[2], ~f[3]
    out = {}
    for name, pr in (("base", p), ("refined", refined)):
        bg = 1 - pr[0] - pr[1]
        m = (pr[0] > bg) | (pr[1] > bg)
        r = {"dice": round(dice((m & valid).numpy(), (lung & valid).numpy()), 4)}
        if lesion.any():
            r["lesion_inside_pct"] = round(100 * float(m[lesion].float().mean()), 1)
        if effusion.any():
            r["effusion_inside_pct"] = round(100 * float(m[effusion].float().mean()), 1)
        out[name] = r
    return out


def train_refiner(cfg: RefineTrainConfig, *, log: Callable[[str], None] = print,
                  shared_data: str | Path | None = None) -> dict[str, Any]:
    """Train as configured; returns the card written beside the weights (and a card
    ``<name>-on-<base>.json`` that pairs them, usable as ``--model``)."""
    import os

    from medseg.inference.refine import Refiner
    from medseg.io.atomic import write_text
    from medseg.models import REFINER_KIND, load_model, sha256_of
    from medseg.train.loop import predict_sample

    t_start = time.monotonic()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(shared_data or os.environ.get("MEDSEG_SHARED_DATA") or (cfg.data.shared_data
                                                                         or ""))
    base = load_model(cfg.base_model)
    if base.second is not None or base.refiner is not None:
        raise ConfigError(f"base_model {cfg.base_model}: a one-view slice model is needed")
    spec, px = base.spec, base.spec.pixel_spacing_mm
    divisor = 2 ** len(spec.strides)
    train, val = _samples(cfg, spec, root, out_dir / "real-ct-cache", log)
    log(f"{len(train)} training volumes, {len(val)} validation volumes; running "
        f"{cfg.base_model} on them")
    vols = []
    for s in train:
        probs = predict_sample(base.network, s, spec, divisor, softmax=True)
        x, t = _coarse(s, probs, px, cfg.model.grid_mm)
        vols.append(_Volume(s.name, pad_to_depth(x), pad_to_depth(t),
                            s.name.startswith("real-")))
    real = [v for v in vols if v.real]
    phantoms = [v for v in vols if not v.real]
    if not vols:
        raise ConfigError("no training data: data.real_train and data.phantoms are empty")
    t_data = time.monotonic() - t_start
    log(f"data ready in {t_data / 60:.1f} min: {len(real)} real, {len(phantoms)} phantom volumes")
    net = build_refiner_network(tuple(cfg.model.channels), cfg.model.num_res_units)
    tc = cfg.training
    opt = torch.optim.AdamW(net.parameters(), tc.learning_rate, weight_decay=tc.weight_decay)
    t0, step, losses = time.monotonic(), 0, []
    while time.monotonic() - t0 < tc.minutes * 60:
        xs, ts = [], []
        for _ in range(tc.batch_size):
            pool = real if real and (rng.random() < tc.real_share or not phantoms) \
                else phantoms
            xc, tcrop = _crop(pool[int(rng.integers(len(pool)))], tc.crop, rng, tc.focus)
            xs.append(xc)
            ts.append(tcrop)
        net.train()
        loss = _loss(net, torch.stack(xs), torch.stack(ts), tc)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % 500 == 0:
            log(f"step {step} ({(time.monotonic() - t0) / 60:.1f} min): loss "
                f"{np.mean(losses[-500:]):.4f}")
    net.eval()
    weights = out_dir / f"{cfg.name}.pt"
    torch.save(net.state_dict(), weights)
    refiner = Refiner(cfg.name, net, cfg.model.grid_mm, "", str(weights))
    validation = {}
    for s in val:
        probs = predict_sample(base.network, s, spec, divisor, softmax=True)
        validation[s.name] = score_refinement(refiner, s, probs, px)
        log(f"{s.name}: {json.dumps(validation[s.name])}")
    card = {
        "name": cfg.name, "kind": REFINER_KIND, "weights_file": weights.name,
        "sha256": sha256_of(weights),
        "architecture": {"channels": list(cfg.model.channels),
                         "num_res_units": cfg.model.num_res_units,
                         "grid_mm": cfg.model.grid_mm},
        "n_parameters": sum(p.numel() for p in net.parameters()),
        "base_model": cfg.base_model,
        "training": {"steps": step, "final_loss": round(float(np.mean(losses[-500:])), 5),
                     "data": [f"{len(real)} real CT volumes: {', '.join(cfg.data.real_train)} "
                              f"(derived labels) in {cfg.data.lesion_rounds} x "
                              f"{cfg.data.lesion_variants} copies each with inserted pathology",
                              f"{len(phantoms)} phantom volumes",
                              f"validation only (never trained on): "
                              f"{', '.join(cfg.data.real_val)}"],
                     "config": asdict(cfg), "minutes": round((time.monotonic() - t_start)
                                                               / 60, 1),
                     "data_minutes": round(t_data / 60, 1), "torch": torch.__version__},
        "validation": validation,
    }
    write_text(out_dir / f"{cfg.name}.json", json.dumps(card, indent=2) + "\n")
    pair = {"name": f"{cfg.base_model}+{cfg.name}", "base": cfg.base_model,
            "refine": f"{cfg.name}.json"}
    write_text(out_dir / f"{cfg.name}-on-{cfg.base_model}.json",
               json.dumps(pair, indent=2) + "\n")
    return card
