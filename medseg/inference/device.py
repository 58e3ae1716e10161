"""Which torch device runs the network: ``--device auto|cpu|cuda|cuda:N``.

``cpu`` is the default everywhere (CI and the numbers in docs/benchmarks.md are CPU).
``auto`` takes the first CUDA GPU torch sees, else the CPU. ``cuda`` on a machine where
torch sees no GPU (a CPU build of torch, no driver) is an error that says so, never a
silent fall-back: a user who asked for the GPU must know it is not used.

On a GPU only the network's windows run there: MONAI's sliding window stitches the
probabilities on the CPU (``SliceInferer(sw_device=cuda, device=cpu)``), so the GPU holds
one batch of windows and the network, whatever the volume's size. Batch workers on a
machine with several GPUs each pin one (:func:`worker_device`).

Precision (:func:`resolve_precision`): ``auto`` by default. On the CPU the network runs on
channels-last activations (oneDNN's faster layout: 1.2x for the whole network stage on
chest-ct-philips-141, the same masks voxel for voxel on the seven shared studies;
docs/benchmarks.md, 2026-12-07). ``auto`` runs it under bfloat16 autocast (``bf16``) where
the CPU computes bf16 in hardware (the ``avx512_bf16`` or ``amx_bf16`` flag:
:func:`cpu_has_bf16`) *and* the model's card says bf16 was validated for it
(``"cpu_bf16"``, :data:`CARD_BF16_KEY`), and in fp32 everywhere else (GPUs included).
Validated per model because bf16 moves the decisions a network is least sure of, and by
how much depends on the network: lung2d-v2's inserted masses went from 93.6 to 86.6 %
inside the mask and 16 mL of an abdominal scan's gut gas became lung, while lung2d-v8's
robustness suite moved by at most 0.0003 Dice on every row (docs/benchmarks.md). ``fp32``
or ``bf16`` (``MEDSEG_PRECISION`` or the settings) force one; ``segment.json`` records
which ran.
"""

from __future__ import annotations

import os
import re

from medseg.errors import ConfigError

__all__ = ["CARD_BF16_KEY", "DEVICES", "DEVICE_HELP", "PRECISIONS", "PRECISION_ENV",
           "cpu_has_bf16", "device_argument", "resolve_device", "resolve_precision",
           "worker_device"]

#: What ``--device`` accepts (and ``cuda:N``).
DEVICES = ("auto", "cpu", "cuda")
_CUDA_N = re.compile(r"cuda:(\d+)")
#: The ``--device`` option's help, the same for every command.
DEVICE_HELP = ("where the network runs: cpu (default), cuda or cuda:N (an NVIDIA GPU; an "
               "error if torch sees none), auto (a GPU if there is one, else the CPU)")


#: What ``MEDSEG_PRECISION`` (and ``precision`` of the settings) accepts.
PRECISIONS = ("auto", "fp32", "bf16")
#: The environment variable that chooses the network's precision (default auto).
PRECISION_ENV = "MEDSEG_PRECISION"
#: The model card's key that says bf16 on the CPU was validated for the model (what was
#: measured, as text); ``auto`` runs bf16 only for such a model.
CARD_BF16_KEY = "cpu_bf16"
#: /proc/cpuinfo flags of bf16 computed in hardware.
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_cpu_bf16: bool | None = None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (a flag of :data:`_BF16_FLAGS` in
    /proc/cpuinfo; False where that cannot be read): elsewhere torch emulates bf16,
    slower than fp32."""
    global _cpu_bf16
    if _cpu_bf16 is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                flags = next((line.split(":", 1)[1].split() for line in f
                              if line.startswith("flags")), [])
        except OSError:
            flags = []
        _cpu_bf16 = any(flag in flags for flag in _BF16_FLAGS)
    return _cpu_bf16


def resolve_precision(name: str | None = None, *, device: str = "cpu",
                      card: dict[str, object] | None = None) -> str:
    """``"fp32"`` or ``"bf16"`` for a network on ``device`` whose model card is ``card``:
    ``name``, else ``$MEDSEG_PRECISION``, else ``auto`` (bf16 on a CPU with bf16 in
    hardware for a model whose card validates it, else fp32);
    :class:`~medseg.errors.ConfigError` for anything else."""
    source = "precision"
    if not name and os.environ.get(PRECISION_ENV):
        name, source = os.environ[PRECISION_ENV], f"${PRECISION_ENV}"
    text = (name or "auto").strip().lower()
    if text not in PRECISIONS:
        raise ConfigError(f"unknown {source} {text!r}: use {', '.join(PRECISIONS)}")
    if text != "auto":
        return text
    on_cpu = device == "cpu" or device.startswith("cpu:")
    return "bf16" if on_cpu and bool((card or {}).get(CARD_BF16_KEY)) and cpu_has_bf16() \
        else "fp32"


def device_argument(text: str) -> str:
    """argparse type of ``--device``: the name, checked for its form (whether the GPU is
    there is checked when the command runs)."""
    import argparse

    value = text.strip().lower()
    if value not in DEVICES and _CUDA_N.fullmatch(value) is None:
        raise argparse.ArgumentTypeError(f"{text!r}: use auto, cpu, cuda or cuda:N")
    return value


def resolve_device(name: str | None) -> str:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"``: what torch will use for ``name``;
    :class:`~medseg.errors.ConfigError` for an unknown name or a GPU that is not there."""
    text = (name or "cpu").strip().lower()
    if text == "cpu":
        return "cpu"
    if text not in ("auto", "cuda") and _CUDA_N.fullmatch(text) is None:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    import torch

    available = torch.cuda.is_available()
    if text == "auto":
        return "cuda" if available else "cpu"
    if not available:
        raise ConfigError(f"device {text}: torch {torch.__version__} sees no CUDA GPU (a "
                          "CPU build of torch, or no NVIDIA driver); use --device cpu, or "
                          "auto to take a GPU only when there is one")
    m = _CUDA_N.fullmatch(text)
    if m is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise ConfigError(f"device {text}: torch sees {torch.cuda.device_count()} GPU(s), "
                          f"numbered from 0")
    return text


def worker_device(name: str | None, worker_index: int | None) -> str:
    """The device of one batch worker: ``cuda`` becomes ``cuda:<index mod GPUs>`` when
    the machine has several GPUs, so that N workers spread over them; anything else as
    :func:`resolve_device` gives it."""
    device = resolve_device(name)
    if device != "cuda" or worker_index is None:
        return device
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{worker_index % count}" if count > 1 else device
