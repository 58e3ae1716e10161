"""Drawing training crops: context slices, augmentation (MONAI), cut fields of view, the
share of each source (:class:`SliceSampler`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from medseg.models import ModelSpec
from medseg.train.data import BOTTOM_LESION_OFFSET, DOME_MARK, LESION_OFFSET, Sample

__all__ = ["SliceSampler"]

#: Training labels of inserted-lesion pixels (lung + :data:`LESION_OFFSET`).
_LESION_LABELS = (1 + LESION_OFFSET, 2 + LESION_OFFSET)


def _context(stack: npt.NDArray[np.float32], k: int, c: int, step: int = 1
             ) -> npt.NDArray[np.float32]:
    """Slice ``k`` with ``c`` neighbours each side, ``step`` slices apart (edges repeat)."""
    idx = np.clip(k + step * np.arange(-c, c + 1), 0, stack.shape[0] - 1)
    return stack[idx]


def _floor(lung: npt.NDArray[np.bool_]) -> npt.NDArray[np.int32]:
    """The first slice holding lung in each column of a (K, I, J) stack, -1 where none."""
    return np.where(lung.any(axis=0), lung.argmax(axis=0), -1).astype(np.int32)


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
        #: The prepared (axial) samples, replaced in place when lesions are drawn again;
        #: :attr:`samples` is them as the network's view (:mod:`medseg.train.views`) sees
        #: them, made again by :meth:`refresh` for the samples that changed.
        self.source = samples
        self.view = spec.view if spec is not None else "axial"
        self.pixel_mm = spec.pixel_spacing_mm if spec is not None else 0.0
        self._views: dict[int, tuple[Sample, Sample]] = {}
        self.samples = self._in_view()
        self.context = context
        self.steps = [spec.context_step(s.slice_mm) if spec is not None else 1
                      for s in self.samples]
        self.crop = crop
        self.rng = np.random.default_rng(seed)
        w = np.array([s.weight for s in self.samples], float)
        self.p = w / w.sum()
        self.lung_slices: list[npt.NDArray[np.intp]] = []
        #: Per sample, the lowest slice holding lung in each (I, J) column (-1 where none
        #: does), with inserted lesions and without them; see :meth:`_mark_dome`.
        self.lung_floor: list[npt.NDArray[np.int32]] = []
        self.plain_floor: list[npt.NDArray[np.int32]] = []
        self.refresh()
        #: Background pixels up to this many mm below their column's lung floor are labelled
        #: :data:`DOME_MARK` (0: never); with ``dome_lesions`` inserted-lesion pixels that
        #: lie as far under the floor of their column's other lung are labelled lung +
        #: :data:`BOTTOM_LESION_OFFSET`.
        self.dome_mm = 0.0
        self.dome_lesions = False
        self.aug = _augment()
        self.aug.set_random_state(seed=seed)
        self.fov_crop_probability = 0.0
        #: Share of crops smoothly warped (:meth:`_warp`) and the warp's size in pixels.
        self.elastic_probability = 0.0
        self.elastic_px = 4.0
        self.torch_gen = torch.Generator().manual_seed(seed)

    def _in_view(self) -> list[Sample]:
        """:attr:`source` in the network's view; a sample already turned is reused, and only
        the current samples are kept (replaced lesion copies are freed)."""
        if self.view == "axial":
            return self.source
        from medseg.train.views import view_sample

        out, kept = [], {}
        for s in self.source:
            hit = self._views.get(id(s))
            if hit is None or hit[0] is not s:
                hit = (s, view_sample(s, self.view, self.pixel_mm))
            kept[id(s)] = hit
            out.append(hit[1])
        self._views = kept
        return out

    def refresh(self) -> None:
        """Recompute what is drawn from each sample (after samples were replaced in place:
        same names and weights, new content)."""
        self.samples = self._in_view()
        self.lung_slices, self.lung_floor, self.plain_floor = [], [], []
        for s in self.samples:
            plain = np.isin(s.label, (1, 2))
            lung = plain | np.isin(s.label, _LESION_LABELS)
            self.lung_slices.append(np.flatnonzero(lung.reshape(lung.shape[0], -1).any(axis=1)))
            # oriented stacks run inferior -> superior: the floor is the first lung slice
            self.lung_floor.append(_floor(lung))
            self.plain_floor.append(_floor(plain))

    def _mark_dome(self, i: int, k: int, lab: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """Slice ``k``'s labels with the background pixels that lie at most ``dome_mm`` below
        the lowest lung voxel of their column labelled :data:`DOME_MARK`: the liver, spleen
        and stomach under the diaphragm's dome, which a network with context above and
        below easily takes for consolidation at the lung base."""
        s = self.samples[i]
        if self.dome_mm <= 0 or not s.slice_mm > 0:
            return lab
        depth = self.lung_floor[i] - k  # slices below the floor (> 0 below it)
        under = (depth > 0) & (depth * s.slice_mm <= self.dome_mm) & (lab == 0)
        bottom = np.zeros_like(under)
        if self.dome_lesions:
            depth = self.plain_floor[i] - k
            bottom = (depth > 0) & (depth * s.slice_mm <= self.dome_mm) & \
                np.isin(lab, _LESION_LABELS)
        if not under.any() and not bottom.any():
            return lab
        out = lab.copy()
        out[under] = DOME_MARK
        out[bottom] += BOTTOM_LESION_OFFSET - LESION_OFFSET
        return out

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
                                  self._mark_dome(i, k, s.label[k]))
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
        xb, yb = torch.stack(xs), torch.stack(ys)
        if self.elastic_probability > 0:
            xb, yb = self._warp(xb, yb)
        return xb, yb

    def _warp(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A smooth random deformation of some crops (image bilinear, labels nearest), one
        batched resampling: random displacements on a coarse 6 x 6 grid (standard deviation
        ``elastic_px``), upsampled bicubically. Every patient's outline (mediastinum, chest
        wall, diaphragm) then comes in many shapes, so what the network learns about a lesion
        against it cannot be learned from a few patients' outlines."""
        n, _, h, w = x.shape
        chosen = torch.rand(n, generator=self.torch_gen) < self.elastic_probability
        if not chosen.any():
            return x, y
        k = int(chosen.sum())
        coarse = torch.randn(k, 2, 6, 6, generator=self.torch_gen) * self.elastic_px
        disp = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic",
                                               align_corners=True)
        # pixels -> grid_sample's [-1, 1] units (align_corners=True: 2 / (size - 1))
        disp = torch.stack([disp[:, 1] * 2 / (w - 1), disp[:, 0] * 2 / (h - 1)], dim=-1)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w),
                                indexing="ij")
        grid = torch.stack([xx, yy], dim=-1)[None] + disp
        x, y = x.clone(), y.clone()
        x[chosen] = torch.nn.functional.grid_sample(x[chosen], grid, mode="bilinear",
                                                    padding_mode="zeros", align_corners=True)
        y[chosen] = torch.nn.functional.grid_sample(y[chosen].float(), grid, mode="nearest",
                                                    padding_mode="zeros",
                                                    align_corners=True).long()
        return x, y

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
