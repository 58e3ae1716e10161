"""Training a 2.5D network on another plane than the axial one (an experiment).

Prepared stacks (:func:`medseg.train.data.prepare_slices`) are axial: ``(K, I, J)`` with the
slices at their own spacing and the plane resampled to the model's pixel spacing. A coronal
view resamples the slice axis to the same pixel spacing and turns the stack so that its
slices run along ``J`` (anterior-posterior): ``(J, I, K')``. Each coronal slice then shows
a lung's whole height: a lesion resting on the diaphragm's dome as a bump on its curve, an
effusion as fluid in the posterior recess below the lung, a mass on the aortic arch with
lung over it, which three axial slices cannot show (docs/model-card.md, the experiments of
2026-12-07). Lesions are still inserted in the axial stacks (:mod:`.lesions`); the view is
taken afterwards (:func:`view_sample`).

``medseg segment`` runs axial models only: a coronal model is trained and validated here
(validation on the axial grid through :func:`to_view` / :func:`from_view`). A sagittal view
turns the stack so that its slices run right to left: ``(I, J, K')``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from medseg.train.data import Sample

__all__ = ["VIEWS", "from_view", "to_view", "view_sample"]

VIEWS = ("axial", "coronal", "sagittal")
#: How a resampled axial ``(K', I, J)`` stack is turned for each view: slices along J
#: (anterior-posterior) for coronal, along I (right-left) for sagittal.
_TURN = {"coronal": (2, 1, 0), "sagittal": (1, 2, 0)}
G = TypeVar("G", bound=np.generic)


def to_view(stack: npt.NDArray[G], view: str, slice_mm: float, pixel_mm: float,
            order: int) -> npt.NDArray[G]:
    """An axial ``(K, I, J)`` stack as the ``view``'s stack (coronal ``(J, I, K')``,
    sagittal ``(I, J, K')``), its slice axis resampled from ``slice_mm`` to ``pixel_mm``
    (``order`` 1: linear, for images; 0: nearest, for labels and masks; unknown spacing, 0:
    kept)."""
    f = slice_mm / pixel_mm if slice_mm > 0 else 1.0
    out: npt.NDArray[G] = ndimage.zoom(stack, (f, 1, 1), order=order) \
        if abs(f - 1.0) > 1e-3 else stack
    return np.ascontiguousarray(out.transpose(_TURN[view]))


def from_view(stack: npt.NDArray[G], view: str, n_slices: int) -> npt.NDArray[G]:
    """A ``view``'s stack (e.g. predicted labels) back on the axial grid of ``n_slices``
    slices, ``(K, I, J)``, each axial slice taking the nearest resampled one (the inverse of
    :func:`to_view`'s mapping)."""
    axial = stack.transpose(np.argsort(_TURN[view]))
    k2 = axial.shape[0]
    idx = np.rint(np.arange(n_slices) * (k2 - 1) / max(1, n_slices - 1)).astype(np.intp)
    return np.ascontiguousarray(axial[idx])


def view_sample(s: Sample, view: str, pixel_mm: float) -> Sample:
    """``s`` (an axial prepared sample) as the network of ``view`` sees it: image, labels,
    lesion and effusion masks turned, the lesion slices to draw more often recomputed, the
    slice spacing now ``pixel_mm``."""
    if view == "axial":
        return s
    if view not in _TURN:
        raise ValueError(f"unknown view {view!r}")
    lesion = None if s.lesion is None else to_view(s.lesion, view, s.slice_mm, pixel_mm, 0)
    effusion = None if s.effusion is None else \
        to_view(s.effusion, view, s.slice_mm, pixel_mm, 0)
    present = [m for m in (lesion, effusion) if m is not None]
    focus = np.flatnonzero(np.logical_or.reduce(present).any(axis=(1, 2))) if present \
        else None
    return replace(s, image=to_view(s.image, view, s.slice_mm, pixel_mm, 1).astype(np.float32),
                   label=to_view(s.label, view, s.slice_mm, pixel_mm, 0), focus=focus,
                   lesion=lesion, effusion=effusion, slice_mm=pixel_mm)
