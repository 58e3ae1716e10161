"""The network's precision: bf16 autocast on a CPU with native bf16, fp32 elsewhere;
``MEDSEG_PRECISION`` forces either; the fp32 network is never changed by a bf16 run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg.errors import ConfigError
from medseg.inference import device as device_mod
from medseg.inference.device import PRECISION_ENV, cpu_has_native_bf16, resolve_precision
from medseg.inference.unet import InferenceSettings, random_model, unet_labels
from medseg.synth import make_phantom


def _native(monkeypatch: pytest.MonkeyPatch, value: bool) -> None:
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: value)


def test_cpu_flags_decide_native_bf16(tmp_path: Path) -> None:
    zen3 = tmp_path / "zen3"
    zen3.write_text("flags\t\t: fpu sse2 avx avx2 fma\n")
    zen5 = tmp_path / "zen5"
    zen5.write_text("flags\t\t: avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n")
    xeon = tmp_path / "xeon"
    xeon.write_text("flags\t\t: avx512f avx512bw amx_bf16 amx_tile amx_int8\n")
    skx = tmp_path / "skylake"  # AVX-512 without BF16: emulated, so fp32
    skx.write_text("flags\t\t: avx512f avx512bw avx512vl avx512_vnni\n")
    assert not cpu_has_native_bf16(str(zen3))
    assert cpu_has_native_bf16(str(zen5))
    assert cpu_has_native_bf16(str(xeon))
    assert not cpu_has_native_bf16(str(skx))
    assert not cpu_has_native_bf16(str(tmp_path / "no-such-file"))


def test_resolve_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    _native(monkeypatch, True)
    assert resolve_precision("cpu") == resolve_precision("cpu", "auto") == "bf16"
    assert resolve_precision("cuda") == "fp32"  # GPUs stay fp32 unless asked
    assert resolve_precision("cpu", "FP32") == "fp32"
    _native(monkeypatch, False)
    assert resolve_precision("cpu") == "fp32"
    assert resolve_precision("cpu", "bf16") == "bf16"
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    assert resolve_precision("cpu") == "bf16"
    assert resolve_precision("cpu", "fp32") == "fp32"  # the caller's choice wins
    monkeypatch.setenv(PRECISION_ENV, "half")
    with pytest.raises(ConfigError, match=r"\$MEDSEG_PRECISION 'half'"):
        resolve_precision("cpu")
    with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
        resolve_precision("cpu", "fp16")


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
