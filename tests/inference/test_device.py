"""``--device``: cpu by default, auto takes a GPU only when torch sees one, cuda where there
is none is a clear error before any work (this machine and CI have no GPU; the CUDA path
itself is checked on a lent GPU machine, docs/benchmarks.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.batch import BatchConfig, run_batch
from medseg.cli import main
from medseg.errors import ConfigError
from medseg.inference.device import device_argument, resolve_device, worker_device

NO_GPU = not torch.cuda.is_available()


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device(None) == resolve_device("cpu") == "cpu"
    _gpus(monkeypatch, 0)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    _gpus(monkeypatch, 2)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("CUDA:1") == "cuda:1"
    with pytest.raises(ConfigError, match="2 GPU"):
        resolve_device("cuda:2")


def test_batch_workers_spread_over_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 2)
    assert [worker_device("cuda", i) for i in range(4)] == ["cuda:0", "cuda:1"] * 2
    assert worker_device("cuda:1", 0) == "cuda:1"  # an explicit GPU is kept
    assert worker_device("cpu", 3) == "cpu"
    _gpus(monkeypatch, 1)
    assert worker_device("cuda", 3) == "cuda"


def test_device_argument_checks_the_form() -> None:
    assert device_argument(" Cuda:0 ") == "cuda:0"
    with pytest.raises(argparse.ArgumentTypeError, match="auto, cpu, cuda"):
        device_argument("gpu0")


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_cuda_without_a_gpu_fails_before_any_work(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from medseg.synth import write_phantom_study

    study = write_phantom_study(tmp_path / "p", seed=1, shape=(24, 64, 64),
                                spacing=(5.5, 5.5, 11.0))
    out = tmp_path / "out"
    assert main(["segment", str(study["image"]), "-o", str(out), "--device", "cuda"]) == 1
    assert "sees no CUDA GPU" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        run_batch(BatchConfig(source=str(tmp_path / "p"), out_dir=str(tmp_path / "b"),
                              device="cuda"))
    assert not (tmp_path / "b" / "batch.sqlite").exists()


def test_cpu_and_auto_give_the_same_mask_and_record_the_device(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg.io import load
    from medseg.segment import segment
    from medseg.synth import write_phantom_study

    _gpus(monkeypatch, 0)
    study = write_phantom_study(tmp_path / "p", seed=2, shape=(24, 64, 64),
                                spacing=(5.5, 5.5, 11.0))
    vol = load(study["image"])
    a = segment(vol, threads=1)
    b = segment(vol, threads=1, device="auto")
    assert np.array_equal(a.labels.array, b.labels.array)
    assert a.model is not None and a.model["device"] == "cpu"
