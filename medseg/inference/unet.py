"""Slice-wise U-Net inference over a whole volume, back onto the input's exact grid.

Memory stays bounded: the oriented volume is processed in slabs of axial slices; each slab
is resampled in plane to the model spacing (MONAI ``Spacingd``), run through MONAI's
``SliceInferer`` (a sliding window over each slice, Gaussian blending), and its softmax
probabilities are brought back by ``Invertd`` onto the slab's own grid, where the argmax is
taken. Only uint8 labels of the whole volume are ever held.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch

from medseg._monai import Invertd, MetaTensor, SliceInferer
from medseg.errors import ConfigError
from medseg.inference import DEFAULT_BATCH_SIZE, SLAB_SLICES
from medseg.models import LoadedModel, ModelSpec
from medseg.preprocess import (
    orientation_transform,
    slab_as_2d,
    slab_transform,
    smooth_in_plane,
    study_antialias,
    to_metatensor,
)
from medseg.volume import CTVolume, Geometry

__all__ = ["CONTEXT_TARGET_MM", "InferenceSettings", "slices_interpolated", "thick_slice_factor",
           "unet_labels"]

#: Sliding-window overlap between neighbouring windows within a slice (fraction of the
#: window); 0.25 with Gaussian blending removes seams at window borders. A slice smaller
#: than the window is padded with 0 = -1024 HU (air), as in training: padding by
#: replicating the edge (MONAI's "replicate") smears the body outward where a small field
#: of view cuts it, and cost the held-out cip-ct64 Dice 0.92/0.88 instead of 0.985/0.986.
WINDOW_OVERLAP = 0.25


@dataclass
class InferenceSettings:
    batch_size: int = DEFAULT_BATCH_SIZE
    threads: int | None = None
    slab_slices: int = SLAB_SLICES
    overlap: float = WINDOW_OVERLAP
    #: MONAI's blending of overlapping windows: "gaussian" (default) or "constant".
    blend_mode: str = "gaussian"
    #: torch device of the network: "cpu" (default), "cuda" or "cuda:N" (resolved, see
    #: :mod:`medseg.inference.device`); stitching stays on the CPU.
    device: str = "cpu"
    #: "auto", "fp32", "bf16", or None: ``$MEDSEG_PRECISION``, else auto (bf16 on a CPU
    #: with bf16 in hardware for a model validated for it, else fp32;
    #: :func:`medseg.inference.device.resolve_precision`); :func:`unet_labels` writes back
    #: the one it used.
    precision: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: Filled by :func:`unet_labels`: the input's pixel noise (HU) and the in-plane
    #: anti-aliasing sigma (pixels) it chose (:func:`medseg.preprocess.antialias_sigma`).
    input_noise_hu: float | None = None
    antialias_sigma_px: tuple[float, float] = (0.0, 0.0)
    #: Filled by :func:`unet_labels` for a two-view model: the coronal slices its second
    #: network ran on (:func:`medseg.inference.unet._second_view`).
    second_view_slices: int | None = None
    #: Turn a tilted patient's slices upright for the network (:mod:`medseg.inference.pose`);
    #: False runs the slices as stored.
    upright: bool = True
    #: Filled by :func:`unet_labels`: the patient's measured tilt (deg; None where it could
    #: not be measured) and the turn the network's slices got (0: as stored).
    tilt_deg: float | None = None
    turn_deg: float = 0.0


def _argmax3(p_right: torch.Tensor, p_left: torch.Tensor) -> torch.Tensor:
    """argmax over (background, right, left) from the two lung probabilities, first index
    winning ties as torch.argmax does."""
    p_bg = 1.0 - p_right - p_left
    lab = (p_right > p_bg).to(torch.uint8)
    best = torch.maximum(p_bg, p_right)
    lab[p_left > best] = 2
    return lab


def _on_device(model: LoadedModel, device: str) -> torch.nn.Module:
    """The model's network on ``device`` (moved there in place: a process uses one
    device, so the move happens once)."""
    first = next(model.network.parameters(), None)
    if first is not None and first.device != torch.device(device):
        model.network.to(torch.device(device))
    return model.network


class _ChannelsLast(torch.nn.Module):
    """The network on channels-last activations, under bf16 autocast when ``bf16``;
    fp32 logits out."""

    def __init__(self, network: torch.nn.Module, device_type: str, bf16: bool) -> None:
        super().__init__()
        self.network = network
        self.device_type = device_type
        self.bf16 = bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        if not self.bf16:
            return cast(torch.Tensor, self.network(x)).contiguous()
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.network(x)
        return cast(torch.Tensor, out).float().contiguous()


def _single_window(x: torch.Tensor, network: torch.nn.Module, roi: int, batch: int
                   ) -> torch.Tensor | None:
    """Logits (1, K, I, J, n) of ``x`` (1, C, I, J, n) where every slice fits in one
    ``roi`` x ``roi`` window (a 2 mm grid up to 512 mm across: nearly every chest CT): the
    network on the slices padded to the window as MONAI's sliding window pads them
    (constant 0, split evenly, the odd pixel after), ``batch`` at a time, cropped back.
    MONAI's ``SliceInferer`` computes the same from one window per slice, then weighs it by
    its importance map and divides by the same map (logits within 2e-6 of these); its
    bookkeeping costs about a quarter of the network stage on the CPU (docs/benchmarks.md).
    None where a slice needs more than one window."""
    _, _, i, j, n = x.shape
    if i > roi or j > roi:
        return None
    di, dj = roi - i, roi - j
    b = torch.nn.functional.pad(x[0].permute(3, 0, 1, 2),
                                (dj // 2, dj - dj // 2, di // 2, di - di // 2))
    out = torch.cat([network(b[s:s + batch]) for s in range(0, n, batch)])
    return out[:, :, di // 2:di // 2 + i, dj // 2:dj // 2 + j].permute(1, 2, 3, 0)[None]


def _with_precision(model: LoadedModel, network: torch.nn.Module, device: str,
                    precision: str) -> torch.nn.Module:
    """``network`` as it runs on ``device`` at ``precision``: a channels-last copy on the
    CPU (fp32: oneDNN's convolutions run 1.4-1.6x faster on channels-last activations,
    logits within 3e-5 of the default layout's: docs/benchmarks.md), under autocast for
    bf16 on any device; fp32 on a GPU runs ``network`` itself. The copy is made once per
    model, device and precision; ``network`` is left as it is."""
    if precision != "bf16" and torch.device(device).type != "cpu":
        return network
    import copy

    key = (device, precision)
    if key not in model.run_networks:
        net = copy.deepcopy(network).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        model.run_networks[key] = _ChannelsLast(net, torch.device(device).type,
                                                precision == "bf16").eval()
    return model.run_networks[key]


def _upright(x: torch.Tensor, turn: float, roi: int, reach_px: float
             ) -> tuple[torch.Tensor, tuple[int, int, int, int] | None]:
    """Prepared slices ``x`` (n, I', J') padded (0 = air) to a square frame of at least
    ``roi`` and turned by ``turn`` deg (:func:`medseg.inference.pose.turn_slices`), and
    where the slices lie in that frame (I' offset, I', J' offset, J') for
    :func:`_turned_back`. ``x`` unchanged and None when the turned body, reaching
    ``reach_px`` from the centre along either axis, would leave the frame."""
    from medseg.inference.pose import turn_slices

    _, i, j = x.shape
    side = max(roi, i, j)
    if reach_px > side / 2:
        return x, None
    di, dj = side - i, side - j
    sq = torch.nn.functional.pad(x, (dj // 2, dj - dj // 2, di // 2, di - di // 2))
    return turn_slices(sq[:, None], turn)[:, 0], (di // 2, i, dj // 2, j)


def _turned_back(probs: torch.Tensor, turn: float, frame: tuple[int, int, int, int] | None
                 ) -> torch.Tensor:
    """Probabilities (2, S, S, n) of turned slices back on the prepared slices' grid
    (2, I', J', n)."""
    from medseg.inference.pose import turn_slices

    assert frame is not None
    i0, i, j0, j = frame
    back = turn_slices(probs.permute(3, 0, 1, 2), -turn)  # (n, 2, S, S)
    return back.permute(1, 2, 3, 0)[:, i0:i0 + i, j0:j0 + j].contiguous()


def _grid_of(img: MetaTensor) -> MetaTensor:
    """What :data:`Invertd` needs of a preprocessed slab (its meta data and the transforms
    applied to it), without its voxels."""
    grid = MetaTensor(torch.zeros(1), applied_operations=img.applied_operations)
    grid.meta = img.meta
    return grid


def _invert_argmax(invert: Invertd, probs: torch.Tensor, img: MetaTensor) -> torch.Tensor:
    """Labels (I, J, n) on the oriented study's grid from lung probabilities
    (2, n, I', J') on the model's grid of the slab ``img`` was preprocessed into."""
    n = int(probs.shape[1])
    pred = MetaTensor(probs.reshape(2 * n, *probs.shape[2:]),
                      applied_operations=img.applied_operations)
    pred.meta = img.meta
    inv = cast(MetaTensor, invert({"pred": pred, "image": img})["pred"]).as_tensor()
    inv = inv.reshape(2, n, *inv.shape[1:])  # (2, n, I, J)
    return _argmax3(inv[0], inv[1]).permute(1, 2, 0)


def _second_view(model: LoadedModel, second: LoadedModel, p_axial: torch.Tensor,
                 stack: torch.Tensor, slice_mm: float, settings: InferenceSettings,
                 progress: Callable[[float], None] | None) -> tuple[torch.Tensor, int]:
    """The axial lung probabilities (2, K, I', J') fused with the coronal network's on the
    prepared ``stack`` (:mod:`medseg.inference.views`), and how many coronal slices ran;
    ``progress`` gets the fraction of them done.
    Coronal slices run over the axial lung's anterior-posterior extent plus
    :data:`~medseg.inference.views.CORONAL_MARGIN_MM`; elsewhere the axial view stands."""
    from medseg.inference.views import (
        CORONAL_MARGIN_MM,
        fuse,
        lung_extent,
        run_slices,
        view_probabilities,
    )

    spec = second.spec
    assert settings.precision is not None
    net = _with_precision(second, _on_device(second, settings.device), settings.device,
                          settings.precision)
    margin = round(CORONAL_MARGIN_MM / spec.pixel_spacing_mm)
    a, b = lung_extent(p_axial.sum(0), axis=2, margin=margin)
    n_j = int(stack.shape[2])
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0] * model.coronal_stride / max(1, b - a))

    other = view_probabilities(net, stack, slice_mm, spec.pixel_spacing_mm,
                               spec.context_slices, 2 ** len(spec.strides), (a, b),
                               batch=settings.batch_size, device=settings.device,
                               stride=model.coronal_stride, progress=tick)
    fused = fuse(p_axial, other, model.fusion, model.axial_weight)
    if a > 0 or b < n_j:  # the axial view alone outside the coronal slices run
        keep = torch.ones(n_j, dtype=torch.bool)
        keep[a:b] = False
        fused[..., keep] = p_axial[..., keep]
    return fused, len(run_slices(a, b, model.coronal_stride))


#: Thick slices get context slices at most about this far apart (mm), interpolated between
#: the study's own: a network that sees the adjacent slices was trained on studies of 0.8-4
#: mm (most 1-2.5 mm), and on 5 mm slices (LIDC-IDRI-0001 averaged in pairs, the robustness
#: suite) its context 5 mm away cost Dice: 0.977 against the clean mask, 0.982 with context
#: 2.5 mm away (slices interpolated between each pair), 0.980 with 1.7 mm; at 3 mm (the
#: abdominal CT) one interpolated slice did not help (docs/model-card.md, "Thick slices").
CONTEXT_TARGET_MM = 2.5


def thick_slice_factor(slice_mm: float, spec: ModelSpec) -> int:
    """How many slices per original slice the network's stack gets (1: the study's own
    slices): ``round(slice_mm / CONTEXT_TARGET_MM)`` for a model whose context is the
    adjacent slices, 1 for one whose context is a distance in mm."""
    if spec.context_slices < 1 or spec.context_step_mm > 0 or not slice_mm > 0:
        return 1
    return max(1, round(slice_mm / CONTEXT_TARGET_MM))


def slices_interpolated(volume: CTVolume, axis: int, factor: int) -> CTVolume:
    """``volume`` with ``factor - 1`` slices interpolated linearly between each pair along
    array ``axis`` (its first slice, direction and in-plane grid unchanged): slice ``k`` of
    the original is slice ``k * factor`` of the result."""
    arr = np.moveaxis(volume.array, axis, 0)
    n = arr.shape[0]
    pos = np.arange((n - 1) * factor + 1) / factor
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    w = (pos - lo).astype(np.float32)[:, None, None]
    up = (1 - w) * arr[lo].astype(np.float32) + w * arr[hi].astype(np.float32)
    spacing = list(volume.spacing)
    spacing[2 - axis] /= factor
    geometry = Geometry(volume.origin, (spacing[0], spacing[1], spacing[2]), volume.direction)
    return CTVolume(np.ascontiguousarray(np.moveaxis(up, 0, axis)), geometry,
                    volume.metadata.copy())


def unet_labels(volume: CTVolume, model: LoadedModel, settings: InferenceSettings,
                progress: Callable[[int, int], None] | None = None,
                noise_hu: float | None = None) -> npt.NDArray[np.uint8]:
    """Raw (not postprocessed) labels (z, y, x) on ``volume``'s grid. ``noise_hu``: the
    study's pixel noise when ``volume`` is not the study itself (slices interpolated for
    context, :func:`thick_slice_factor`), for the anti-aliasing decision."""
    if model.spec.view != "axial":
        raise ConfigError(f"model {model.spec.name} sees {model.spec.view} slices: medseg "
                          "segments with an axial-view model, alone or with a coronal one "
                          "(a two-view model card, medseg.inference.views)")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    spec = model.spec
    ctx = spec.context_slices
    t0 = time.perf_counter()
    orient = orientation_transform()
    oriented = cast(MetaTensor, orient({"image": to_metatensor(volume)})["image"])
    n_slices = int(oriented.shape[-1])
    # slice spacing of the oriented volume (its third axis) sets the context step
    slice_mm = float(np.linalg.norm(np.asarray(oriented.affine)[:3, 2]))
    step = spec.context_step(slice_mm)
    # a noisy study is smoothed in plane before the downsampling (anti-aliasing)
    noise, sigma = study_antialias(volume, oriented, spec.pixel_spacing_mm, noise_hu=noise_hu)
    settings.input_noise_hu = round(noise, 1)
    settings.antialias_sigma_px = (round(sigma[0], 3), round(sigma[1], 3))
    reach = ctx * step
    # Held as (K, J, I) in memory and used through an (I, J, K) view: when the orientation
    # is the identity (an axial LPS study, the common case) the output's (z, y, x) array
    # below is then this memory as it is, not a transposing copy of every voxel (0.3-0.4 s
    # for 141 x 512 x 512).
    i_n, j_n = int(oriented.shape[1]), int(oriented.shape[2])
    labels_oriented = torch.zeros((n_slices, j_n, i_n), dtype=torch.uint8).permute(2, 1, 0)
    pre = slab_transform(pixel_spacing_mm=spec.pixel_spacing_mm)
    invert = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)
    from medseg.inference.device import resolve_precision

    settings.precision = resolve_precision(settings.precision, device=settings.device,
                                           card=model.spec.card)
    network = _with_precision(model, _on_device(model, settings.device), settings.device,
                              settings.precision)
    on_gpu: dict[str, Any] = {}
    if settings.device != "cpu":  # windows on the GPU, stitching and outputs on the CPU
        on_gpu = {"sw_device": torch.device(settings.device), "device": torch.device("cpu")}
    inferer = SliceInferer(roi_size=(spec.roi_size, spec.roi_size),
                           sw_batch_size=settings.batch_size, spatial_dim=2,
                           overlap=settings.overlap, mode=settings.blend_mode,
                           padding_mode="constant", cval=0.0, progress=False, **on_gpu)
    turn, reach_px = 0.0, 0.0
    frame: tuple[int, int, int, int] | None = None
    settings.tilt_deg, settings.turn_deg = None, 0.0
    if settings.upright:
        from medseg.inference.pose import body_tilt

        spacing = np.linalg.norm(np.asarray(oriented.affine)[:3, :3], axis=0)
        pose = body_tilt(oriented.as_tensor()[0], (float(spacing[0]), float(spacing[1]),
                                                   float(spacing[2])))
        settings.tilt_deg, turn = pose.tilt_deg, pose.turn_deg
        reach_px = pose.reach_mm / spec.pixel_spacing_mm
    settings.timings["orient_s"] = time.perf_counter() - t0
    second, refiner = model.second, model.refiner
    # a two-view or refined model keeps the axial probabilities and the prepared stack on
    # the model's grid (2 mm in plane: 3 x 600 x 256 x 256 float32 = 0.5 GB at most) until
    # the coronal network and the refinement have run (peak RSS on a 512 x 512 x 600 study
    # 1.92 GiB with two views, one view 1.51: docs/benchmarks.md); a one-view model turns
    # each slab into labels at once
    keep = second is not None or refiner is not None
    held: list[tuple[int, int, MetaTensor]] = []
    p_axial = stack = None
    # progress in slices' worth of the work: a two-view model's axial pass is about 45 %
    # of it, the coronal one as much, the inversion the rest; a refined one-view model's
    # axial pass 80 %, the refinement and the inversion the rest
    share = 1.0 if not keep else 0.45 if second is not None else 0.8

    def report(frac: float) -> None:
        if progress is not None:
            progress(min(n_slices, round(frac * n_slices)), n_slices)

    t_pre = t_net = t_inv = 0.0
    done = 0
    for k0 in range(0, n_slices, settings.slab_slices):
        k1 = min(n_slices, k0 + settings.slab_slices)
        lo, hi = max(0, k0 - reach), min(n_slices, k1 + reach)
        ta = time.perf_counter()
        slab = smooth_in_plane(slab_as_2d(oriented, lo, hi), sigma)
        img = cast(MetaTensor, pre({"image": slab})["image"])
        x = img.as_tensor()  # (hi - lo, I', J')
        if keep:
            if stack is None:
                stack = torch.zeros((n_slices, *x.shape[1:]), dtype=torch.float32)
                p_axial = torch.zeros((2, *stack.shape), dtype=torch.float32)
            stack[k0:k1] = x[k0 - lo:k1 - lo]
        if turn:
            x, frame = _upright(x, turn, spec.roi_size, reach_px)
            if frame is None:  # the turned body would leave the frame: as stored
                turn = 0.0
        # replicate edge slices so every core slice has its neighbours
        pad_lo, pad_hi = reach - (k0 - lo), reach - (hi - k1)
        if pad_lo or pad_hi:
            x = torch.cat([x[:1]] * pad_lo + [x] + [x[-1:]] * pad_hi, dim=0)
        n_core = k1 - k0
        # (1, C, I', J', n_core): each core slice with its neighbours as channels
        x = torch.stack([x[s * step:s * step + n_core] for s in range(2 * ctx + 1)], dim=0)
        x = x.permute(0, 2, 3, 1)[None]
        tb = time.perf_counter()
        with torch.inference_mode():
            one = _single_window(x, network, spec.roi_size, settings.batch_size) \
                if settings.device == "cpu" else None
            logits = one if one is not None else cast(torch.Tensor, inferer(x, network))
        # Lung channels only: bilinear inversion is linear, so the background probability
        # on the source grid is exactly 1 - p_right - p_left; a third of the work saved.
        probs = torch.softmax(logits[0], dim=0)[1:]  # (2, I', J', n_core)
        if turn:
            probs = _turned_back(probs, turn, frame)
        tc = time.perf_counter()
        if not keep:
            labels_oriented[..., k0:k1] = _invert_argmax(invert, probs.permute(0, 3, 1, 2),
                                                         img)
        else:
            assert p_axial is not None
            p_axial[:, k0:k1] = probs.permute(0, 3, 1, 2)
            held.append((k0, k1, _grid_of(img)))
        td = time.perf_counter()
        t_pre += tb - ta
        t_net += tc - tb
        t_inv += td - tc
        done += n_core
        report(share * done / n_slices)
    if keep:
        assert p_axial is not None and stack is not None
        fused = p_axial
        if second is not None:
            tv = time.perf_counter()
            fused, n_run = _second_view(model, second, p_axial, stack, slice_mm, settings,
                                        lambda f: report(0.45 + 0.45 * f))
            settings.timings["second_view_s"] = time.perf_counter() - tv
            settings.second_view_slices = n_run
        if refiner is not None:
            from medseg.inference.refine import refine_probabilities

            tv = time.perf_counter()
            fused = refine_probabilities(refiner, fused, stack, slice_mm,
                                         spec.pixel_spacing_mm)
            settings.timings["refine_s"] = time.perf_counter() - tv
            report(0.9)
        del p_axial, stack
        td = time.perf_counter()
        for k0, k1, grid in held:
            labels_oriented[..., k0:k1] = _invert_argmax(invert, fused[:, k0:k1], grid)
            report(0.9 + 0.1 * k1 / n_slices)
        t_inv += time.perf_counter() - td
    settings.turn_deg = turn
    t1 = time.perf_counter()
    lab = MetaTensor(labels_oriented[None], applied_operations=oriented.applied_operations)
    lab.meta = oriented.meta
    back = cast(MetaTensor, orient.inverse({"image": lab})["image"])
    out = np.ascontiguousarray(back.as_tensor()[0].numpy().transpose(2, 1, 0))
    settings.timings.update(preprocess_s=t_pre, network_s=t_net, invert_s=t_inv,
                            reorient_back_s=time.perf_counter() - t1)
    if out.shape != volume.shape:
        raise RuntimeError(f"internal error: labels {out.shape} != volume {volume.shape}")
    return out.astype(np.uint8, copy=False)


def random_model(spec: Any = None) -> LoadedModel:
    """An untrained network (tests, benchmarks of speed): seeded, so deterministic."""
    from medseg.models import ModelSpec, build_network

    torch.manual_seed(0)
    spec = spec or ModelSpec(name="random")
    net = build_network(spec).eval()
    return LoadedModel(spec=spec, network=net, sha256="random", path="")
