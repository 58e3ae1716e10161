"""The training loop: loss, validation scores, early stopping, the curves, and the weights
and model card written atomically, the card last (:func:`train`)."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from medseg._version import __version__
from medseg.errors import ConfigError
from medseg.io.atomic import atomic_output, write_text
from medseg.models import ModelSpec, build_network, sha256_of
from medseg.train.config import DataConfig, TrainConfig
from medseg.train.data import (
    BOTTOM_LESION_OFFSET,
    DOME_MARK,
    EFFUSION_MARK,
    LESION_OFFSET,
    Sample,
    _cip_samples,
    _phantom_samples,
    _real_samples,
    lesion_variant,
)
from medseg.train.realct import IGNORE
from medseg.train.sampling import SliceSampler, _context

__all__ = ["MaskedDiceCE", "dice_per_lung", "lesion_scores", "predict_prepared", "train"]


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


# -- evaluation on prepared volumes -----------------------------------------------------------
def predict_prepared(net: torch.nn.Module, image: npt.NDArray[np.float32], context: int,
                     divisor: int, batch: int = 16, step: int = 1, softmax: bool = False
                     ) -> npt.NDArray[Any]:
    """Argmax labels (K, I, J) uint8 for a prepared (K, I, J) stack (whole slices, padded to
    ``divisor``); with ``softmax`` the network's probabilities instead, (C, K, I, J)
    float32."""
    k, h, w = image.shape
    ph, pw = (-h) % divisor, (-w) % divisor
    padded = np.pad(image, ((0, 0), (0, ph), (0, pw)))
    out: npt.NDArray[Any] | None = None if softmax else np.zeros((k, h, w), np.uint8)
    first = next(net.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    net.eval()
    with torch.inference_mode():
        for k0 in range(0, k, batch):
            ks = range(k0, min(k, k0 + batch))
            x = torch.from_numpy(np.stack([_context(padded, kk, context, step)
                                           for kk in ks])).to(device)
            y = net(x)
            if not softmax:
                assert out is not None
                out[k0:k0 + len(ks)] = y.argmax(1)[:, :h, :w].cpu().numpy().astype(np.uint8)
                continue
            p = torch.softmax(y, 1)[:, :, :h, :w].permute(1, 0, 2, 3).cpu().numpy()
            if out is None:
                out = np.zeros((p.shape[0], k, h, w), np.float32)
            out[:, k0:k0 + len(ks)] = p
    assert out is not None
    return out


def predict_sample(net: torch.nn.Module, s: Sample, spec: ModelSpec, divisor: int,
                   softmax: bool = False) -> npt.NDArray[Any]:
    """Argmax labels for a prepared (axial) sample, on its grid, whatever plane the network
    sees (``spec.view``: a coronal or sagittal network runs on the turned stack, its labels
    turned back; :mod:`medseg.train.views`); with ``softmax`` the probabilities
    (:func:`predict_prepared`)."""
    if spec.view == "axial":
        return predict_prepared(net, s.image, spec.context_slices, divisor,
                                step=spec.context_step(s.slice_mm), softmax=softmax)
    from medseg.train.views import from_view, to_view

    img = to_view(s.image, spec.view, s.slice_mm, spec.pixel_spacing_mm, 1).astype(np.float32)
    pred = predict_prepared(net, img, spec.context_slices, divisor,
                            step=spec.context_step(spec.pixel_spacing_mm), softmax=softmax)
    if softmax:
        return np.stack([from_view(c, spec.view, s.image.shape[0]) for c in pred])
    return from_view(pred, spec.view, s.image.shape[0])


def dice_per_lung(pred: npt.NDArray[Any], ref: npt.NDArray[Any]) -> dict[str, float]:
    """Dice per lung; reference voxels labelled IGNORE (255) are left out."""
    from medseg.evaluate.metrics import dice

    valid = ref != IGNORE
    return {name: dice((pred == lab) & valid, ref == lab)
            for name, lab in (("right", 1), ("left", 2))}


class MaskedDiceCE(torch.nn.Module):
    """Dice + cross-entropy (as MONAI's DiceCELoss with softmax, one-hot targets, background
    included) that leaves out voxels labelled ``ignore``: derived labels of real CT are
    uncertain there. Dice is computed over the whole batch per class. Inserted-lesion
    pixels (lung + :data:`LESION_OFFSET`) weigh ``lesion_weight`` in the cross-entropy,
    inserted-effusion pixels (:data:`EFFUSION_MARK`, background) ``effusion_weight``, the
    abdomen under a lung's floor (:data:`DOME_MARK`, background) ``dome_weight``, lesion
    pixels at a lung's floor (lung + :data:`BOTTOM_LESION_OFFSET`) both."""

    def __init__(self, ignore: int = IGNORE, smooth: float = 1e-5,
                 lesion_weight: float = 1.0, effusion_weight: float = 1.0,
                 dome_weight: float = 1.0) -> None:
        super().__init__()
        self.ignore = ignore
        self.smooth = smooth
        self.lesion_weight = lesion_weight
        self.effusion_weight = effusion_weight
        self.dome_weight = dome_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y = target[:, 0]
        valid = (y != self.ignore)
        effusion = valid & (y == EFFUSION_MARK)
        dome = valid & (y == DOME_MARK)
        bottom = valid & (y > BOTTOM_LESION_OFFSET) & (y < EFFUSION_MARK)
        lesion = valid & (y > LESION_OFFSET) & (y < BOTTOM_LESION_OFFSET)
        y = torch.where(lesion, y - LESION_OFFSET,
                        torch.where(bottom, y - BOTTOM_LESION_OFFSET,
                                    torch.where(effusion | dome, 0, y)))
        if valid.any():
            ce_map = torch.nn.functional.cross_entropy(logits, torch.where(valid, y, 0),
                                                       reduction="none")
            weight = valid.to(ce_map.dtype) * (1.0 + (self.lesion_weight - 1.0) * lesion
                                               + (self.effusion_weight - 1.0) * effusion
                                               + (self.dome_weight - 1.0) * dome
                                               + (self.lesion_weight * self.dome_weight - 1.0)
                                               * bottom)
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


def _refresh_lesions(samples: list[Sample], spec: ModelSpec, d: DataConfig, seed: list[int]
                     ) -> int:
    """Replace, in place, every real study's lesion copy (``real-NAME-lesionsV``) by a new
    copy of its base study (``real-NAME``) with fresh lesions; returns how many."""
    bases = {s.name: s for s in samples if s.name.startswith("real-") and s.lesion is None}
    rng = np.random.default_rng(seed)
    n = 0
    for i, s in enumerate(samples):
        base_name, sep, _ = s.name.rpartition("-lesions")
        if not sep or base_name not in bases:
            continue
        base = bases[base_name]
        new = lesion_variant(base, base.slice_mm, spec, rng, d.lesions_per_variant,
                             d.effusion_probability, s.name, mark_lesions=True)
        new.weight = s.weight
        samples[i] = new
        n += 1
    return n


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
                         f"({d.lesion_variants} copies each with inserted pathology"
                         + (f", drawn again every {d.lesion_refresh_epochs} epochs"
                            if d.lesion_refresh_epochs and d.lesion_variants else "")
                         + f"), {d.real_weight:.0%} of draws")
        # validation: two copies of each held-out study with pathology inserted
        held = _real_samples(d.real_val, root, cache, spec, d, cfg.seed + 1, 2, out_dir, log,
                             training=False)
        val_samples += [s for s in held if s.lesion is not None]
        data_note.append(f"validation only (never trained on): {', '.join(d.real_val)}")
    t = cfg.training
    sampler = SliceSampler(train_samples, spec.context_slices, t.crop_size, cfg.seed, spec)
    sampler.fov_crop_probability = t.fov_crop_probability
    sampler.elastic_probability = t.elastic_probability
    sampler.elastic_px = t.elastic_mm / spec.pixel_spacing_mm
    if t.dome_weight != 1.0:
        sampler.dome_mm = t.dome_mm
        sampler.dome_lesions = t.dome_lesions
    net = build_network(spec)
    if t.init_weights:
        from medseg.models import load_model

        net.load_state_dict(_widened(load_model(t.init_weights).network.state_dict(),
                                     net.state_dict()))
        data_note.append(f"initialised from {t.init_weights}")
    from medseg.inference.device import resolve_device

    device = torch.device(resolve_device(cfg.device))
    net.to(device)
    if device.type != "cpu":
        log(f"training on {device} ({torch.cuda.get_device_name(device)})")
    opt = torch.optim.AdamW(net.parameters(), lr=t.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
    loss_fn = MaskedDiceCE(lesion_weight=t.lesion_weight, effusion_weight=t.effusion_weight,
                           dome_weight=t.dome_weight)
    divisor = 2 ** len(spec.strides)
    rows: list[dict[str, Any]] = []
    best, best_epoch, best_state = -1.0, 0, None
    csv_path = out_dir / "log.csv"
    stopped = "epochs done"
    for epoch in range(1, t.epochs + 1):
        if d.lesion_refresh_epochs and epoch > 1 and (epoch - 1) % d.lesion_refresh_epochs == 0:
            tr = time.monotonic()
            n_new = _refresh_lesions(train_samples, spec, d, [cfg.seed, 3000, epoch])
            if n_new:
                sampler.refresh()
                log(f"epoch {epoch}: {n_new} lesion copies drawn again "
                    f"({time.monotonic() - tr:.1f} s)")
        net.train()
        losses = []
        te = time.monotonic()
        for _ in range(t.steps_per_epoch):
            x, y = sampler.batch(t.batch_size)
            x, y = x.to(device), y.to(device)
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
            pred = predict_sample(net, s, spec, divisor)
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
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
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
    with atomic_output(weights) as tmp:  # the weights, then the card that checks them
        torch.save(best_state, tmp)
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
            "device": str(device),
        },
    }
    write_text(out_dir / f"{cfg.name}.json", json.dumps(card, indent=2) + "\n")
    log(f"best epoch {best_epoch} (validation score {best:.4f}); wrote {weights}")
    return card
