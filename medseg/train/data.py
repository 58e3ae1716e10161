"""Training data: phantoms, cip-ct64, real CT with derived labels and inserted lesions, each
prepared exactly as inference prepares a volume (:func:`prepare_slices`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from medseg._monai import MetaTensor
from medseg.models import ModelSpec
from medseg.train.config import DataConfig
from medseg.train.realct import IGNORE
from medseg.volume import CTVolume

__all__ = ["BOTTOM_LESION_OFFSET", "DOME_MARK", "EFFUSION_MARK", "LESION_OFFSET", "Sample",
           "cip_reference", "lesion_variant", "prepare_slices", "validation_cut"]


# -- data -----------------------------------------------------------------------------------
def prepare_slices(image: CTVolume, labels: CTVolume | None, spec: ModelSpec
                   ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8] | None]:
    """The model's view of a volume, exactly as inference builds it: oriented, resampled in
    plane, HU scaled. Returns image (K, I', J') float32 and labels (K, I', J') uint8."""
    from medseg._monai import Spacingd
    from medseg.preprocess import (
        orientation_transform,
        slab_as_2d,
        slab_transform,
        smooth_in_plane,
        study_antialias,
        to_metatensor,
    )

    d: dict[Any, Any] = {"image": to_metatensor(image)}
    keys = ["image"]
    if labels is not None:
        d["label"] = to_metatensor(labels, labels.array.astype(np.float32))
        keys.append("label")
    d = dict(orientation_transform(keys)(d))
    n = int(d["image"].shape[-1])
    _, sigma = study_antialias(image, d["image"], spec.pixel_spacing_mm)
    img = cast(MetaTensor, slab_transform("image", spec.pixel_spacing_mm)(
        {"image": smooth_in_plane(slab_as_2d(d["image"], 0, n), sigma)})["image"])
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
#: Training labels of inserted-lesion pixels at the floor of their lung column (the lung,
#: without the lesion, ends above them: a lesion at a lung's bottom, which looks like the
#: abdomen under the dome): lung plus this offset, marked by the sampler with
#: ``training.dome_lesions`` and weighed ``lesion_weight * dome_weight``.
BOTTOM_LESION_OFFSET = 110
#: Training label of inserted-effusion pixels (background, not lung; the loss maps them to
#: 0 and weighs them with ``training.effusion_weight``, see :class:`MaskedDiceCE`).
EFFUSION_MARK = 200
#: Training label of background pixels just below a lung's floor (the abdomen under the
#: diaphragm's dome; see :class:`~medseg.train.sampling.SliceSampler`), weighed with
#: ``training.dome_weight``.
DOME_MARK = 201


def lesion_variant(base: Sample, slice_mm: float, spec: ModelSpec, rng: np.random.Generator,
                   n_lesions: int, effusion_probability: float, name: str,
                   mark_lesions: bool = False) -> Sample:
    """A copy of a prepared real study with pathology inserted (labels known by
    construction: lesions stay lung, an effusion leaves it; :mod:`.lesions`). With
    ``mark_lesions`` (training) lesion pixels are labelled lung + :data:`LESION_OFFSET`
    and effusion pixels :data:`EFFUSION_MARK`, so that the loss can weigh both."""
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
    lab[effusion] = EFFUSION_MARK if mark_lesions else 0
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
