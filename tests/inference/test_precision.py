"""The network's precision: ``auto`` runs bf16 autocast on a CPU with bf16 in hardware for a
model whose card validates it, fp32 elsewhere; ``MEDSEG_PRECISION`` (or the settings) force
fp32 or bf16; the fp32 network is never changed by a bf16 run. On the CPU the network runs
on channels-last activations, with the same labels as the default layout."""

from __future__ import annotations

import numpy as np
import pytest

import medseg.inference.device as device_mod
from medseg.errors import ConfigError
from medseg.inference.device import CARD_BF16_KEY, PRECISION_ENV, resolve_precision
from medseg.inference.unet import InferenceSettings, random_model, unet_labels
from medseg.models import DEFAULT_MODEL, load_model
from medseg.synth import make_phantom


def test_resolve_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    monkeypatch.setattr(device_mod, "_cpu_bf16", True)
    validated = {CARD_BF16_KEY: "measured"}
    # auto: bf16 only on a bf16 CPU, for a validated model, on the CPU
    assert resolve_precision(card=validated) == resolve_precision("auto", card=validated) \
        == "bf16"
    assert resolve_precision() == resolve_precision(None, card={}) == "fp32"
    assert resolve_precision(card=validated, device="cuda") == "fp32"
    monkeypatch.setattr(device_mod, "_cpu_bf16", False)
    assert resolve_precision(card=validated) == "fp32"
    # forced either way, whatever the CPU and the card
    assert resolve_precision(" BF16") == "bf16"
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    assert resolve_precision() == "bf16"
    assert resolve_precision("fp32", card=validated) == "fp32"  # the caller's choice wins
    monkeypatch.setattr(device_mod, "_cpu_bf16", True)
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    assert resolve_precision(card=validated) == "fp32"
    monkeypatch.setenv(PRECISION_ENV, "half")
    with pytest.raises(ConfigError, match=r"\$MEDSEG_PRECISION 'half'"):
        resolve_precision()
    with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
        resolve_precision("fp16")


def test_cpu_has_bf16_reads_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_open = builtins.open
    for flags, expected in (("fpu sse2 avx2 avx512f", False),
                            ("fpu avx2 avx512f avx512_bf16", True),
                            ("fpu avx2 amx_tile amx_bf16", True)):
        text = f"processor\t: 0\nflags\t\t: {flags}\n"

        def fake(path: object, *a: object, text: str = text, **k: object) -> object:
            if str(path) == "/proc/cpuinfo":
                import io
                return io.StringIO(text)
            return real_open(path, *a, **k)  # type: ignore[call-overload]

        monkeypatch.setattr(builtins, "open", fake)
        monkeypatch.setattr(device_mod, "_cpu_bf16", None)
        assert device_mod.cpu_has_bf16() is expected, flags
    monkeypatch.setattr(builtins, "open", real_open)


def test_shipped_model_is_validated_for_bf16() -> None:
    """The default model's card carries what was measured before auto may run it in bf16;
    a model without it (lung2d-v2: bf16 moved its hard cases) stays fp32."""
    assert "robustness suite" in str(load_model(DEFAULT_MODEL).spec.card.get(CARD_BF16_KEY))
    assert CARD_BF16_KEY not in load_model("lung2d-v2").spec.card


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
