"""One window per slice: where every prepared slice fits in the network's window (nearly
every chest CT), the network runs on the padded slices directly instead of through MONAI's
sliding window, with the same labels (docs/benchmarks.md: the same masks voxel for voxel on
the seven shared studies, fp32 and bf16, lung2d-v8 and -v19)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medseg.inference.unet as unet
from medseg._monai import SliceInferer
from medseg.inference.unet import InferenceSettings, random_model, unet_labels
from medseg.models import DEFAULT_MODEL, load_model
from medseg.synth import make_phantom


def test_single_window_logits_match_the_sliding_window() -> None:
    net = random_model().network.eval()
    inferer = SliceInferer(roi_size=(128, 128), sw_batch_size=2, spatial_dim=2, overlap=0.25,
                           mode="gaussian", padding_mode="constant", cval=0.0,
                           progress=False)
    for shape in ((100, 91), (128, 128), (64, 127)):  # odd and even padding, none
        x = torch.randn(1, 3, *shape, 5)
        with torch.inference_mode():
            slow = inferer(x, net)
            assert isinstance(slow, torch.Tensor)
            fast = unet._single_window(x, net, 128, 2)
        assert fast is not None and fast.shape == slow.shape
        assert torch.allclose(fast, slow, atol=1e-5), float((fast - slow).abs().max())
    # a slice wider than the window is left to the sliding window
    assert unet._single_window(torch.randn(1, 3, 129, 90, 2), net, 128, 2) is None


def test_shipped_model_labels_equal_the_sliding_windows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    vol, _ = make_phantom(seed=6, shape=(20, 128, 128))
    model = load_model(DEFAULT_MODEL)
    used: list[bool] = []
    real = unet._single_window

    def spy(*args: object) -> torch.Tensor | None:
        out = real(*args)  # type: ignore[arg-type]
        used.append(out is not None)
        return out

    monkeypatch.setattr(unet, "_single_window", spy)
    fast = unet_labels(vol, model, InferenceSettings(precision="fp32"))
    assert used and all(used)  # every slab ran as one window per slice
    monkeypatch.setattr(unet, "_single_window", lambda *a: None)
    slow = unet_labels(vol, model, InferenceSettings(precision="fp32"))
    assert (fast > 0).sum() > 1000
    np.testing.assert_array_equal(fast, slow)
