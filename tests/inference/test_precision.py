"""The network's precision: fp32 unless ``MEDSEG_PRECISION=bf16`` (or the settings) ask
for bf16 autocast; the fp32 network is never changed by a bf16 run."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import ConfigError
from medseg.inference.device import PRECISION_ENV, resolve_precision
from medseg.inference.unet import InferenceSettings, random_model, unet_labels
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
