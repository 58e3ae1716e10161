"""Which torch device runs the network: ``--device auto|cpu|cuda|cuda:N``.

``cpu`` is the default everywhere (CI and the numbers in docs/benchmarks.md are CPU).
``auto`` takes the first CUDA GPU torch sees, else the CPU. ``cuda`` on a machine where
torch sees no GPU (a CPU build of torch, no driver) is an error that says so, never a
silent fall-back: a user who asked for the GPU must know it is not used.

On a GPU only the network's windows run there: MONAI's sliding window stitches the
probabilities on the CPU (``SliceInferer(sw_device=cuda, device=cpu)``), so the GPU holds
one batch of windows and the network, whatever the volume's size. Batch workers on a
machine with several GPUs each pin one (:func:`worker_device`).

Precision (:func:`resolve_precision`): fp32 by default, on every device. On the CPU the
network runs on channels-last activations (oneDNN's faster layout: 1.2x for the whole network
stage on chest-ct-philips-141, the same masks voxel for voxel on the seven shared studies;
docs/benchmarks.md, 2026-12-07). ``bf16``
(``MEDSEG_PRECISION=bf16``) runs the network under bfloat16 autocast with channels-last
activations, faster on a CPU with bf16 in hardware (AVX512_BF16, AMX), but it is not
the default because it moves the decisions the network is least sure of: on the robustness
suite (lung2d-v2) inserted masses 93.6 -> 86.6 % inside the mask and 16 mL of an abdominal
scan's gut gas labelled lung (docs/benchmarks.md, 2026-12-07).
"""

from __future__ import annotations

import os
import re

from medseg.errors import ConfigError

__all__ = ["DEVICES", "DEVICE_HELP", "PRECISIONS", "PRECISION_ENV", "device_argument",
           "resolve_device", "resolve_precision", "worker_device"]

#: What ``--device`` accepts (and ``cuda:N``).
DEVICES = ("auto", "cpu", "cuda")
_CUDA_N = re.compile(r"cuda:(\d+)")
#: The ``--device`` option's help, the same for every command.
DEVICE_HELP = ("where the network runs: cpu (default), cuda or cuda:N (an NVIDIA GPU; an "
               "error if torch sees none), auto (a GPU if there is one, else the CPU)")


#: What ``MEDSEG_PRECISION`` (and ``precision`` of the settings) accepts.
PRECISIONS = ("fp32", "bf16")
#: The environment variable that chooses the network's precision (default fp32).
PRECISION_ENV = "MEDSEG_PRECISION"


def resolve_precision(name: str | None = None) -> str:
    """``"fp32"`` or ``"bf16"``: ``name``, else ``$MEDSEG_PRECISION``, else fp32;
    :class:`~medseg.errors.ConfigError` for anything else."""
    source = "precision"
    if not name and os.environ.get(PRECISION_ENV):
        name, source = os.environ[PRECISION_ENV], f"${PRECISION_ENV}"
    text = (name or "fp32").strip().lower()
    if text not in PRECISIONS:
        raise ConfigError(f"unknown {source} {text!r}: use {' or '.join(PRECISIONS)}")
    return text


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
