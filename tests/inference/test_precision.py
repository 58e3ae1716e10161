"""The network's precision: fp32 unless ``MEDSEG_PRECISION=bf16`` (or the settings) ask
for bf16 autocast; the fp32 network is never changed by a bf16 run. On the CPU the network
runs on channels-last activations, with the same labels as the default layout."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import ConfigError
from medseg.inference.device import PRECISION_ENV, resolve_precision
from medseg.inference.unet import InferenceSettings, random_model, unet_labels
from medseg.models import DEFAULT_MODEL, load_model
from medseg.synth import make_phantom


def test_resolve_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert resolve_precision() == resolve_precision(None) == "fp32"  # the default
    assert resolve_precision(" BF16") == "bf16"
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    assert resolve_precision() == "bf16"
    assert resolve_precision("fp32") == "fp32"  # the caller's choice wins
    monkeypatch.setenv(PRECISION_ENV, "half")
    with pytest.raises(ConfigError, match=r"\$MEDSEG_PRECISION 'half'"):
        resolve_precision()
    with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
        resolve_precision("fp16")


def test_segment_records_the_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg.segment import segment

    vol, _ = make_phantom(seed=4, shape=(12, 96, 96))
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert segment(vol, model=random_model(), qc=False).model["precision"] == "fp32"
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    assert segment(vol, model=random_model(), qc=False).model["precision"] == "bf16"


def test_bf16_labels_agree_and_leave_fp32_alone() -> None:
    vol, _ = make_phantom(seed=3, shape=(12, 96, 96))
    model = random_model()
    before = {k: v.clone() for k, v in model.network.state_dict().items()}
    runs = {}
    for precision in ("fp32", "bf16", "fp32"):
        settings = InferenceSettings(precision=precision, slab_slices=8)
        runs.setdefault(precision, []).append(unet_labels(vol, model, settings))
        assert settings.precision == precision
        assert runs[precision][-1].shape == vol.shape
    # the fp32 network and its results are the same after a bf16 run in the same process
    np.testing.assert_array_equal(runs["fp32"][0], runs["fp32"][1])
    for k, v in model.network.state_dict().items():
        assert v.equal(before[k]), k
    # an untrained network's near-ties flip under bf16 rounding, but only a few
    agree = float((runs["bf16"][0] == runs["fp32"][0]).mean())
    assert agree > 0.95, agree


def test_channels_last_cpu_labels_equal_the_default_layout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped model on a phantom: the channels-last copy gives the same labels as the
    network in its default layout, which it leaves as it is (docs/benchmarks.md: the same
    masks on the seven shared studies for lung2d-v8 and -v19)."""
    import torch

    import medseg.inference.unet as unet

    vol, _ = make_phantom(seed=5, shape=(24, 128, 128))
    model = load_model(DEFAULT_MODEL)
    fast = unet_labels(vol, model, InferenceSettings(precision="fp32"))
    run = model.run_networks[("cpu", "fp32")]
    first = next(run.parameters())
    assert first.is_contiguous(memory_format=torch.channels_last) and first.dim() == 4
    assert all(p.is_contiguous() for p in model.network.parameters())  # left as it was
    monkeypatch.setattr(unet, "_with_precision", lambda m, net, device, precision: net)
    plain = unet_labels(vol, model, InferenceSettings(precision="fp32"))
    assert (plain > 0).sum() > 1000
    np.testing.assert_array_equal(fast, plain)
