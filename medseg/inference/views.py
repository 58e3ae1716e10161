"""A second network that sees coronal slices, fused with the axial one (a two-view model).

Both networks see the same prepared stack: the study oriented, resampled in plane to the
model's pixel spacing and scaled, one axial slice per series slice ``(K, I, J)``
(:func:`medseg.inference.unet.unet_labels` builds it slab by slab). The coronal network sees
it as :mod:`medseg.train.views` turned it in training: the slice axis resampled (linearly)
to the pixel spacing and the stack turned to ``(J, I, K')``; its probabilities are turned
back and resampled linearly to the ``K`` series slices, then fused with the axial ones on the
prepared grid, before the inversion to the study's own grid.

A coronal slice shows a lung's whole height: a consolidation on the diaphragm's dome or on
the aortic arch with lung over it, an effusion in the posterior recess below the lung, which
three neighbouring axial slices cannot show (docs/model-card.md, "A second view").
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["FUSIONS", "fuse", "lung_extent", "run_slices", "view_probabilities"]

#: How the two views' lung probabilities are combined: ``mean`` of the two softmax outputs
#: (weighted: the axial view's weight ``axial_weight``, the coronal one's the rest);
#: ``union``: the larger lung probability of the two, split into right and left as the
#: mean splits it.
FUSIONS = ("mean", "union")
#: Coronal slices run only over the axial network's lung (probability > 0.5) along the
#: anterior-posterior axis, plus this margin (mm) each side; outside it the axial
#: probabilities stand alone. A coronal slice with no lung near it adds time, not lung.
CORONAL_MARGIN_MM = 30.0
#: Fraction of the axial lung's voxels left out at each end of that extent (stray specks).
LUNG_TAIL = 0.001


def _resample_axis0(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """``x`` (N, ...) resampled linearly along its first axis to ``n_out`` samples, the
    first and last samples kept where they are (scipy's ``zoom`` mapping: out ``o`` reads
    in ``o * (N - 1) / (n_out - 1)``)."""
    n = int(x.shape[0])
    if n_out == n:
        return x
    if n == 1 or n_out == 1:
        return x[:1].expand(n_out, *x.shape[1:]).clone()
    pos = torch.arange(n_out, dtype=torch.float64) * ((n - 1) / (n_out - 1))
    lo = pos.floor().long().clamp(max=n - 2)
    w = (pos - lo).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return x[lo] * (1 - w) + x[lo + 1] * w


def lung_extent(p_lung: torch.Tensor, axis: int, margin: int, tail: float = LUNG_TAIL
                ) -> tuple[int, int]:
    """The range ``[a, b)`` of indices along ``axis`` of ``p_lung`` that holds all but a
    ``tail`` fraction at each end of its voxels > 0.5, widened by ``margin`` each side;
    (0, 0) when there are none. The tails leave out the raw network's stray specks (on
    chest-ct-philips-141 they stretch the anterior-posterior extent from 230 to 410
    pixels)."""
    other = tuple(d for d in range(p_lung.dim()) if d != axis)
    counts = (p_lung > 0.5).sum(dim=other) if other else (p_lung > 0.5).long()
    total = int(counts.sum())
    if total == 0:
        return 0, 0
    cum = torch.cumsum(counts, 0).double() / total
    first = int(torch.searchsorted(cum, torch.tensor([tail], dtype=torch.float64)))
    last = int(torch.searchsorted(cum, torch.tensor([1.0 - tail], dtype=torch.float64)))
    n = int(p_lung.shape[axis])
    return max(0, first - margin), min(n, last + 1 + margin)


def run_slices(a: int, b: int, stride: int) -> list[int]:
    """The coronal slices of ``[a, b)`` the network runs on: every ``stride``-th and the
    range's last (the ones between are interpolated)."""
    run = list(range(a, b, max(1, stride)))
    if run and run[-1] != b - 1:
        run.append(b - 1)
    return run


def view_probabilities(network: Callable[[torch.Tensor], torch.Tensor],
                       stack: torch.Tensor, slice_mm: float, pixel_mm: float, context: int,
                       divisor: int, j_range: tuple[int, int], batch: int = 16,
                       device: str = "cpu", stride: int = 1,
                       progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Lung probabilities (2, K, I, J) of a coronal ``network`` on a prepared axial
    ``stack`` (K, I, J) whose slices are ``slice_mm`` apart; computed on the coronal slices
    of ``j_range`` only (zero elsewhere). Whole slices, zero-padded (air) to a multiple of
    ``divisor``, neighbours ``context`` coronal slices each side (edges repeat), as the
    network was trained and validated (:func:`medseg.train.loop.predict_sample`). With
    ``stride`` > 1 the network runs on every ``stride``-th slice of the range and its last
    one; the slices between are interpolated linearly (``progress`` gets the slices run)."""
    k, i_n, j_n = (int(s) for s in stack.shape)
    k2 = max(1, round(k * slice_mm / pixel_mm)) if slice_mm > 0 else k
    turned = _resample_axis0(stack, k2).permute(2, 1, 0)  # (J, I, K')
    ph, pw = (-i_n) % divisor, (-k2) % divisor
    out = torch.zeros((2, j_n, i_n, k2), dtype=torch.float32)
    a, b = j_range
    offsets = torch.arange(-context, context + 1)
    run = run_slices(a, b, stride)
    with torch.inference_mode():
        for n0 in range(0, len(run), batch):
            js = torch.tensor(run[n0:n0 + batch], dtype=torch.long)
            idx = (js[:, None] + offsets[None]).clamp(0, j_n - 1)  # (n, C)
            x = F.pad(turned[idx], (0, pw, 0, ph)).to(device)
            y = network(x)
            p = torch.softmax(y.float(), 1)[:, 1:, :i_n, :k2].cpu()  # (n, 2, I, K')
            out[:, js] = p.permute(1, 0, 2, 3)
            if progress is not None:
                progress(len(js))
    for j0, j1 in itertools.pairwise(run):
        for j in range(j0 + 1, j1):
            w = (j - j0) / (j1 - j0)
            out[:, j] = out[:, j0] * (1 - w) + out[:, j1] * w
    # (2, J, I, K') -> (K', 2, I, J) -> K series slices -> (2, K, I, J)
    back = _resample_axis0(out.permute(3, 0, 2, 1), k)
    return back.permute(1, 0, 2, 3).contiguous()


def fuse(axial: torch.Tensor, other: torch.Tensor, rule: str, axial_weight: float = 0.5
         ) -> torch.Tensor:
    """Lung probabilities (2, ...) of the two views, fused by ``rule`` (:data:`FUSIONS`)."""
    mean = axial * axial_weight + other * (1.0 - axial_weight)
    if rule == "mean":
        return mean
    if rule == "union":
        lung = torch.maximum(axial.sum(0), other.sum(0))
        share = mean[0] / mean.sum(0).clamp_min(1e-6)
        return torch.stack([lung * share, lung * (1 - share)])
    raise ValueError(f"unknown fusion {rule!r}; known: {', '.join(FUSIONS)}")
