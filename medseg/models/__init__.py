"""The lung network, and the registry of weights shipped inside the package.

Weights are state dicts saved by ``medseg train`` and loaded with ``weights_only=True``
after their SHA-256 is checked against the value recorded in the model's card
(``weights/<name>.json``). Nothing is ever downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medseg._monai import UNet
from medseg.checksums import sha256_file as sha256_of
from medseg.errors import ConfigError, UnreadableFileError
from medseg.inference import DEFAULT_MODEL

if TYPE_CHECKING:
    from medseg.inference.refine import Refiner

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelSpec",
    "available_models",
    "build_network",
    "load_model",
    "load_refiner",
    "sha256_of",
]

#: Output channels: background, right lung (label 1), left lung (label 2), as lungmask.
N_CLASSES = 3
#: The ``"kind"`` of a 3D refinement stage's card (:mod:`medseg.inference.refine`).
REFINER_KIND = "refine3d"


@dataclass(frozen=True)
class ModelSpec:
    """What a set of weights needs to run: architecture and input conventions."""

    name: str
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 1
    #: Neighbouring slices on each side given as extra input channels (2.5D): 1 -> 3 channels.
    context_slices: int = 1
    #: Distance (mm) between the context slices; 0 = the adjacent slices, whatever their
    #: spacing. With a distance, the neighbours are the slices nearest to it (at least the
    #: adjacent ones): the same anatomy in view on 1 mm and 5 mm series.
    context_step_mm: float = 0.0
    pixel_spacing_mm: float = 2.0
    #: Side of the square sliding window (pixels at ``pixel_spacing_mm``).
    roi_size: int = 256
    #: The plane the network sees: ``axial`` (every shipped model), ``coronal`` or
    #: ``sagittal`` (training experiments, :mod:`medseg.train.views`; ``medseg segment``
    #: refuses them).
    view: str = "axial"
    card: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def in_channels(self) -> int:
        return 2 * self.context_slices + 1

    def context_step(self, slice_mm: float) -> int:
        """Slices between context slices on a series with ``slice_mm`` spacing."""
        if self.context_step_mm <= 0 or not slice_mm > 0:
            return 1
        return max(1, round(self.context_step_mm / slice_mm))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "channels": list(self.channels), "strides": list(self.strides),
            "num_res_units": self.num_res_units, "context_slices": self.context_slices,
            "context_step_mm": self.context_step_mm,
            "pixel_spacing_mm": self.pixel_spacing_mm, "roi_size": self.roi_size,
        } | ({} if self.view == "axial" else {"view": self.view})

    @classmethod
    def from_dict(cls, d: dict[str, Any], card: dict[str, Any] | None = None) -> ModelSpec:
        return cls(name=str(d["name"]), channels=tuple(d["channels"]),
                   strides=tuple(d["strides"]), num_res_units=int(d["num_res_units"]),
                   context_slices=int(d["context_slices"]),
                   context_step_mm=float(d.get("context_step_mm", 0.0)),
                   pixel_spacing_mm=float(d["pixel_spacing_mm"]), roi_size=int(d["roi_size"]),
                   view=str(d.get("view", "axial")), card=card or {})


@dataclass
class LoadedModel:
    spec: ModelSpec
    network: torch.nn.Module
    sha256: str
    path: str
    #: The network as it runs per (device, precision), made on first use
    #: (:func:`medseg.inference.unet.unet_labels`): a channels-last copy on the CPU, under
    #: autocast for bf16.
    run_networks: dict[tuple[str, str], torch.nn.Module] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    #: A two-view model's coronal network (:mod:`medseg.inference.views`), fused with this
    #: axial one by ``fusion``; None for a one-view model.
    second: LoadedModel | None = None
    fusion: str = "mean"
    #: The axial view's weight in the fusion's mean (the coronal one's: 1 - it).
    axial_weight: float = 0.5
    #: The coronal network runs on every ``coronal_stride``-th coronal slice, the others
    #: interpolated (:func:`medseg.inference.views.view_probabilities`).
    coronal_stride: int = 1
    #: A 3D refinement of the slice networks' lung probability
    #: (:mod:`medseg.inference.refine`), None without one.
    refiner: Refiner | None = None


def build_network(spec: ModelSpec) -> UNet:
    """MONAI 2D U-Net: residual units, batch norm (fast on CPU), PReLU."""
    return UNet(spatial_dims=2, in_channels=spec.in_channels, out_channels=N_CLASSES,
                channels=spec.channels, strides=spec.strides, num_res_units=spec.num_res_units,
                norm="BATCH")



def _weights_dir() -> Path:
    return Path(str(resources.files("medseg.models") / "weights"))


def available_models() -> list[str]:
    return sorted(p.stem for p in _weights_dir().glob("*.json"))


def _card_path(name_or_path: str | Path, beside: Path | None = None) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".json", ".pt"):
        if beside is not None and not p.is_absolute() and (beside / p).exists():
            p = beside / p
        return p.with_suffix(".json")
    card_path = _weights_dir() / f"{name_or_path}.json"
    if not card_path.exists():
        raise ConfigError(f"unknown model {name_or_path!r}; shipped: "
                          f"{', '.join(available_models()) or 'none'}")
    return card_path


def load_model(name_or_path: str | Path = DEFAULT_MODEL) -> LoadedModel:
    """Load shipped weights by name (e.g. ``lung2d-v2``) or a ``.json`` card / ``.pt`` file path.

    The card (JSON beside the weights) holds the architecture and the weights' SHA-256;
    a mismatch is an error, not a warning. A two-view card names its two models instead
    (``"views": {"axial": A, "coronal": C}``, each a shipped name or a card path relative
    to it) and how they are fused (``"fusion"``, :data:`medseg.inference.views.FUSIONS`,
    the axial view's weight ``"axial_weight"``, default 0.5, and ``"coronal_stride"``,
    default 1);
    its SHA-256 is that of the two weights' digests.
    """
    card_path = _card_path(name_or_path)
    card = _read_card(card_path)
    if card.get("kind") == REFINER_KIND:
        raise ConfigError(f"model card {card_path}: {card.get('name')} is a 3D refinement "
                          "stage, not a segmentation model: use a card that names it beside "
                          'its slice model ({"base": ..., "refine": ...})')
    if "refine" in card:
        return _load_refined(card, card_path)
    if "views" in card:
        return _load_two_views(card, card_path)
    weights, digest = _checked_weights(card, card_path)
    spec = ModelSpec.from_dict(card["architecture"], card)
    net = build_network(spec)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    net.eval()
    return LoadedModel(spec=spec, network=net, sha256=digest, path=str(weights))


def _read_card(card_path: Path) -> dict[str, Any]:
    try:
        card: dict[str, Any] = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise UnreadableFileError(f"cannot read model card: {exc}", path=card_path) from exc
    return card


def _checked_weights(card: dict[str, Any], card_path: Path) -> tuple[Path, str]:
    """The card's weights file and its SHA-256, checked against the card's."""
    weights = card_path.with_name(card["weights_file"])
    if not weights.exists():
        raise UnreadableFileError("model weights file is missing", path=weights)
    digest = sha256_of(weights)
    if digest != card["sha256"]:
        raise UnreadableFileError(
            f"checksum mismatch: expected {card['sha256']}, file has {digest}", path=weights)
    return weights, digest


def load_refiner(name_or_path: str | Path, beside: Path | None = None) -> Refiner:
    """A 3D refinement network by shipped name or card path (a card with ``"kind":
    "refine3d"``, :mod:`medseg.inference.refine`)."""
    from medseg.inference.refine import Refiner, build_refiner_network

    card_path = _card_path(name_or_path, beside)
    card = _read_card(card_path)
    if card.get("kind") != REFINER_KIND:
        raise ConfigError(f"model card {card_path}: not a 3D refinement stage (its \"kind\" "
                          f"is {card.get('kind')!r}, not {REFINER_KIND!r})")
    weights, digest = _checked_weights(card, card_path)
    arch = card["architecture"]
    net = build_refiner_network(tuple(arch["channels"]), int(arch.get("num_res_units", 1)))
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    net.eval()
    return Refiner(name=str(card["name"]), network=net, grid_mm=float(arch["grid_mm"]),
                   sha256=digest, path=str(weights))


def _load_refined(card: dict[str, Any], card_path: Path) -> LoadedModel:
    """A slice model (one or two views) with a 3D refinement stage: ``{"base": M,
    "refine": R}``; its SHA-256 is that of the two digests."""
    import hashlib
    from dataclasses import replace

    base_name = card.get("base")
    if not isinstance(base_name, str) or not isinstance(card.get("refine"), str):
        raise ConfigError(f"model card {card_path}: a refined model names its slice model "
                          '("base") and its refinement stage ("refine")')
    base = load_model(_card_path(base_name, card_path.parent))
    if base.refiner is not None:
        raise ConfigError(f"model card {card_path}: {base_name} is already refined")
    refiner = load_refiner(card["refine"], card_path.parent)
    digest = hashlib.sha256(f"{base.sha256}+{refiner.sha256}".encode()).hexdigest()
    spec = replace(base.spec, name=str(card["name"]), card=card)
    return replace(base, spec=spec, sha256=digest, path=str(card_path), refiner=refiner)


def _load_two_views(card: dict[str, Any], card_path: Path) -> LoadedModel:
    import hashlib
    from dataclasses import replace

    from medseg.inference.views import FUSIONS

    views = card["views"]
    fusion = str(card.get("fusion", "mean"))
    weight = card.get("axial_weight", 0.5)
    stride = card.get("coronal_stride", 1)
    if set(views) != {"axial", "coronal"} or fusion not in FUSIONS \
            or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0 \
            or not isinstance(stride, int) or stride < 1:
        raise ConfigError(f"model card {card_path}: a two-view model has views axial and "
                          f"coronal (has {', '.join(views)}), a fusion among "
                          f"{', '.join(FUSIONS)} (has {fusion!r}), an axial_weight in "
                          f"[0, 1] (has {weight!r}) and a coronal_stride >= 1 (has "
                          f"{stride!r})")
    axial = load_model(_card_path(views["axial"], card_path.parent))
    coronal = load_model(_card_path(views["coronal"], card_path.parent))
    for m, view in ((axial, "axial"), (coronal, "coronal")):
        if m.spec.view != view or m.second is not None:
            raise ConfigError(f"model card {card_path}: {views[view]} is not a one-view "
                              f"{view} model")
    if coronal.spec.pixel_spacing_mm != axial.spec.pixel_spacing_mm:
        raise ConfigError(f"model card {card_path}: the two views' pixel spacings differ")
    digest = hashlib.sha256(f"{axial.sha256}+{coronal.sha256}".encode()).hexdigest()
    spec = replace(axial.spec, name=str(card["name"]), card=card)
    return LoadedModel(spec=spec, network=axial.network, sha256=digest, path=str(card_path),
                       second=coronal, fusion=fusion, axial_weight=float(weight),
                       coronal_stride=stride)
