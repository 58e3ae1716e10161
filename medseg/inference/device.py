"""Which torch device runs the network: ``--device auto|cpu|cuda|cuda:N``.

``cpu`` is the default everywhere (CI and the numbers in docs/benchmarks.md are CPU).
``auto`` takes the first CUDA GPU torch sees, else the CPU. ``cuda`` on a machine where
torch sees no GPU (a CPU build of torch, no driver) is an error that says so, never a
silent fall-back: a user who asked for the GPU must know it is not used.

On a GPU only the network's windows run there: MONAI's sliding window stitches the
probabilities on the CPU (``SliceInferer(sw_device=cuda, device=cpu)``), so the GPU holds
one batch of windows and the network, whatever the volume's size. Batch workers on a
machine with several GPUs each pin one (:func:`worker_device`).

Precision (:func:`resolve_precision`): on a CPU that computes bfloat16 in hardware (x86
AVX512_BF16 or AMX-BF16) the network runs under bf16 autocast with channels-last
activations, 1.7-2.5x faster there (docs/benchmarks.md); everywhere else in fp32. The
masks differ from fp32 in a few hundred to a few thousand voxels of a study's border
(Dice >= 0.999 to the fp32 mask on the real studies, robustness suite unchanged within
its rounding: docs/benchmarks.md). ``MEDSEG_PRECISION=fp32`` forces fp32 (masks identical
on every CPU), ``bf16`` forces bf16.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

from medseg.errors import ConfigError

__all__ = ["DEVICES", "DEVICE_HELP", "PRECISIONS", "PRECISION_ENV", "cpu_has_native_bf16",
           "device_argument", "resolve_device", "resolve_precision", "worker_device"]

#: What ``--device`` accepts (and ``cuda:N``).
DEVICES = ("auto", "cpu", "cuda")
_CUDA_N = re.compile(r"cuda:(\d+)")
#: The ``--device`` option's help, the same for every command.
DEVICE_HELP = ("where the network runs: cpu (default), cuda or cuda:N (an NVIDIA GPU; an "
               "error if torch sees none), auto (a GPU if there is one, else the CPU)")


#: What ``MEDSEG_PRECISION`` accepts; ``auto`` (default) is bf16 on a CPU with native bf16.
PRECISIONS = ("auto", "fp32", "bf16")
#: The environment variable that overrides the network's precision.
PRECISION_ENV = "MEDSEG_PRECISION"
_NATIVE_BF16 = re.compile(r"\b(avx512_bf16|amx_bf16)\b")


@lru_cache(maxsize=1)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True where the CPU has bfloat16 arithmetic in hardware (the ``avx512_bf16`` or
    ``amx_bf16`` flag in Linux's ``/proc/cpuinfo``); False where it cannot be told. Where
    bf16 would only be emulated (AVX2, AVX-512 without BF16) fp32 is kept."""
    try:
        return _NATIVE_BF16.search(Path(cpuinfo).read_text(errors="replace")) is not None
    except OSError:
        return False


def resolve_precision(device: str, name: str | None = None) -> str:
    """``"fp32"`` or ``"bf16"``: the network's precision on ``device`` (a resolved device,
    :func:`resolve_device`). ``name`` (else ``$MEDSEG_PRECISION``, else ``auto``): ``auto``
    takes bf16 on a CPU with native bf16 and fp32 everywhere else (GPUs included); ``fp32``
    or ``bf16`` force it. :class:`~medseg.errors.ConfigError` for anything else."""
    text = (name or "auto").strip().lower()
    source = "precision"
    if text == "auto" and os.environ.get(PRECISION_ENV):
        text, source = os.environ[PRECISION_ENV].strip().lower(), f"${PRECISION_ENV}"
    if text not in PRECISIONS:
        raise ConfigError(f"unknown {source} {text!r}: use {', '.join(PRECISIONS)}")
    if text == "auto":
        return "bf16" if device == "cpu" and cpu_has_native_bf16() else "fp32"
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
