"""Label conventions: the spec grammar, value checks with clear errors, and scores that match
a hand-made conversion for binary, 255 and CIP references built at test time."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from medseg.errors import ConfigError, InputError
from medseg.evaluate import (
    LabelConvention,
    label_metrics,
    resolve_labels,
    score_label_maps,
)
from medseg.evaluate.labels import CIP_REGIONS, as_label_array
from medseg.evaluate.metrics import distinct_values

SPACING = (2.5, 0.8, 0.9)  # (sz, sy, sx): array axis order

# -- the grammar --------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "canonical"), [
    ("right=1,left=2", "right=1,left=2"),
    ("left=2,right=1", "right=1,left=2"),
    ("medseg", "right=1,left=2"),
    ("LungMask", "right=1,left=2"),
    (" Lung = 1 - 255 ", "lung=1-255"),
    ("lung=255", "lung=255"),
    ("lung=1+255", "lung=1+255"),
    ("right=12-14+2+4-6,left=9-11+3+7-8", "right=2+4-6+12-14,left=3+7-8+9-11"),
    ("right=1,left=2,background=3-20", "right=1,left=2,background=3-20"),
    ("cip", "cip"),
    ("auto", "auto"),
])
def test_parse_canonical_round_trip(spec: str, canonical: str) -> None:
    conv = LabelConvention.parse(spec)
    assert str(conv) == canonical
    assert LabelConvention.parse(str(conv)) == conv


@pytest.mark.parametrize(("spec", "match"), [
    ("rigth=1,left=2", "did you mean 'right'"),
    ("cpi", "did you mean 'cip'"),
    ("lungmsk", "did you mean 'lungmask'"),
    ("", "empty label convention"),
    ("lung=0", "from 1 to"),
    ("lung=5-3", "low to high"),
    ("lung=a", "not a whole number"),
    ("lung=1-", "not a whole number"),
    ("lung", "unknown label convention"),
    ("right=1", "go together"),
    ("lung=1,right=2,left=3", "either 'lung'"),
    ("right=1,left=1", "value 1 is given twice"),
    ("lung=1-10,background=5", "value 5 is given twice"),
    ("lung=1,lung=2", "given twice"),
    ("background=3", "names no lung"),
    ("right:1,left=2", "not NAME=VALUES"),
    ("right:1", "unknown label convention"),
])
def test_parse_errors_say_why(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LabelConvention.parse(spec)


# -- reference maps built at test time ----------------------------------------------------


def _lungs(shape: tuple[int, int, int] = (18, 40, 48), shift: int = 0) -> npt.NDArray[np.uint8]:
    """Two ellipsoids: 1 right lung (low x index), 2 left lung; ``shift`` moves them in x."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    x = x - shift * 2.0 / shape[2]
    right = ((x + 0.45) / 0.3) ** 2 + (y / 0.55) ** 2 + (z / 0.9) ** 2 < 1
    left = ((x - 0.45) / 0.3) ** 2 + (y / 0.55) ** 2 + (z / 0.9) ** 2 < 1
    return (right * 1 + left * 2).astype(np.uint8)


def _cip_map(lab: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint16]:
    """``lab`` as a CIP label map: right lung in regions 12-14 and left in 9-11 by thirds
    along z, one slab typed airway (type 2: value + 512), a vessel (type 3) voxel row, and
    a heart (region 16) and an airway outside the lungs (512) that are background."""
    out = np.zeros(lab.shape, np.uint16)
    third = np.minimum(np.arange(lab.shape[0]) * 3 // lab.shape[0], 2)[:, None, None]
    out[lab == 1] = (12 + np.broadcast_to(third, lab.shape))[lab == 1]
    out[lab == 2] = (9 + np.broadcast_to(third, lab.shape))[lab == 2]
    airway = np.zeros(lab.shape, bool)
    airway[8] = lab[8] > 0
    out[airway] += 512
    vessel = np.zeros(lab.shape, bool)
    vessel[10, 20] = lab[10, 20] > 0
    out[vessel] += 768
    out[0, :3, :3] = 16  # WholeHeart: not lung
    out[0, -3:, -3:] = 512  # trachea: airway of no lung region
    return out


@pytest.fixture(scope="module")
def pair() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    return _lungs(shift=1), _lungs()


def test_binary_reference_scores_lung_with_a_note(pair: Any) -> None:
    pred, ref = pair
    score = score_label_maps(pred, (ref > 0).astype(np.uint8), SPACING)
    assert list(score.metrics) == ["lung"]
    expect = label_metrics(pred, ref, SPACING)["lung"]
    assert score.metrics["lung"] == pytest.approx(expect, rel=1e-12)
    assert score.metrics["lung"]["dice"] > 0.85
    assert score.ref_labels == "lung=1" and score.pred_labels == "right=1,left=2"
    text = " ".join(score.notes)
    assert "only the values 0 and 1" in text and "right=1,left=2" in text
    assert "scored 'lung' (both lungs together) only" in text


def test_binary_bool_reference(pair: Any) -> None:
    pred, ref = pair
    score = score_label_maps(pred, ref > 0, SPACING)
    assert list(score.metrics) == ["lung"] and score.metrics["lung"]["dice"] > 0.85


def test_255_reference_is_refused_by_default_and_scored_with_the_flag(pair: Any) -> None:
    pred, ref = pair
    ref255 = np.where(ref > 0, 255, 0).astype(np.uint8)
    with pytest.raises(InputError, match=r"values 0, 255 fit no convention") as err:
        score_label_maps(pred, ref255, SPACING, ref_path="/data/ref255.nii.gz")
    assert "/data/ref255.nii.gz" in str(err.value)
    assert "ref_labels='lung=255'" in str(err.value)
    expect = label_metrics(pred, ref, SPACING)["lung"]
    for spec in ("lung=255", "lung=1-255"):
        score = score_label_maps(pred, ref255, SPACING, ref_labels=spec)
        assert list(score.metrics) == ["lung"]
        assert score.metrics["lung"] == pytest.approx(expect, rel=1e-12)


def test_cip_reference_scores_right_and_left(pair: Any) -> None:
    pred, ref = pair
    cip = _cip_map(ref)
    assert {int(v) for v in np.unique(cip)} >= {0, 9, 12, 14, 16, 512, 512 + 10, 768 + 13}
    with pytest.raises(InputError, match="--ref-labels cip") as err:
        score_label_maps(pred, cip, SPACING, flags=("--pred-labels", "--ref-labels"))
    assert "Chest Imaging Platform" in str(err.value)
    score = score_label_maps(pred, cip, SPACING, ref_labels="cip")
    assert score.ref_labels == "cip" and not score.notes
    expect = label_metrics(pred, ref, SPACING)
    assert list(score.metrics) == ["right", "left", "lung"]
    for name in expect:
        assert score.metrics[name] == pytest.approx(expect[name], rel=1e-12)
    # the same map read region by region, as an explicit spec
    spec = "right=12-14+524-526+780-782,left=9-11+521-523+777-779,background=16+512"
    explicit = score_label_maps(pred, cip, SPACING, ref_labels=spec)
    assert explicit.metrics == score.metrics


def test_cip_conversion_by_region() -> None:
    values = np.array([0, 1, 2, 3, 4, 8, 9, 14, 15, 16, 256 + 12, 512, 512 + 9, 65535])
    res = resolve_labels(values, "cip")
    expect = [0, 3, 1, 2, 1, 2, 2, 1, 0, 0, 1, 0, 2, 0]
    assert res.array.tolist() == expect
    assert not res.sided  # WholeLung (region 1) has no side
    assert any("WholeLung" in n for n in res.notes)
    assert all((v in (2, 4, 5, 6, 12, 13, 14)) == (c == 1) for v, c in CIP_REGIONS.items()
               if c != 3)
    with pytest.raises(InputError, match="65536"):
        resolve_labels(np.array([0, 65536]), "cip")


def test_wrong_values_for_an_explicit_convention(pair: Any) -> None:
    pred, ref = pair
    with pytest.raises(InputError, match=r"value\(s\) 2 that the convention lung=1 does not"):
        score_label_maps(pred, ref, SPACING, ref_labels="lung=1")
    three = ref.copy()
    three[0, 0, 0] = 3
    with pytest.raises(InputError, match=r"value\(s\) 3 that the convention right=1,left=2"):
        score_label_maps(pred, three, SPACING, ref_labels="right=1,left=2")
    score = score_label_maps(pred, three, SPACING, ref_labels="right=1,left=2,background=3")
    assert score.metrics == label_metrics(pred, ref, SPACING)


def test_prediction_values_are_checked_too(pair: Any) -> None:
    pred, ref = pair
    with pytest.raises(InputError, match=r"the prediction holds label value.*255.*pred_labels="):
        score_label_maps(np.where(pred > 0, 255, 0).astype(np.uint8), ref, SPACING)
    score = score_label_maps((pred > 0).astype(np.uint8), ref, SPACING, pred_labels="lung=1")
    assert list(score.metrics) == ["lung"]
    assert "the prediction's (lung=1) labels do not tell right from left" in score.notes[0]


def test_one_sided_prediction_gets_a_hint(pair: Any) -> None:
    pred, ref = pair
    score = score_label_maps((pred > 0).astype(np.uint8), ref, SPACING)
    assert score.metrics["left"]["dice"] == 0.0  # still a failure, never hidden
    assert math.isinf(score.metrics["left"]["hd"])
    assert "no left lung (label 2)" in score.notes[0] and "lung=1" in score.notes[0]


def test_large_and_negative_values_use_the_general_path(pair: Any) -> None:
    pred, ref = pair
    big = np.where(ref > 0, 10_000_000, 0).astype(np.int64)
    score = score_label_maps(pred, big, SPACING, ref_labels="lung=10000000")
    assert score.metrics["lung"] == pytest.approx(label_metrics(pred, ref, SPACING)["lung"])
    neg = np.where(ref > 0, 1, 0).astype(np.int16)
    neg[0, 0, 0] = -1
    with pytest.raises(InputError, match=r"values -1, 0, 1 fit no convention"):
        score_label_maps(pred, neg, SPACING)


def test_float_label_maps() -> None:
    assert as_label_array(np.array([0.0, 1.0, 2.0])).dtype.kind == "i"
    with pytest.raises(InputError, match="non-integer"):
        as_label_array(np.array([0.0, 0.5]), path="/x.nrrd")
    with pytest.raises(InputError, match="non-integer"):
        as_label_array(np.array([0.0, np.nan]))


def test_empty_maps_fit_every_convention() -> None:
    z = np.zeros((3, 4, 5), np.uint8)
    for spec in ("auto", "cip", "lung=255", "right=1,left=2"):
        res = resolve_labels(z, spec)
        assert not res.array.any()


@pytest.mark.parametrize("arr", [
    np.array([[True, False]]),
    np.array([0, 3, 3, 200], np.uint8),
    np.array([-5, 0, 7, 7], np.int16),
    np.array([0, 65535, 12], np.uint16),
    np.array([0, 2**31 - 1, 5], np.int32),
    np.array([4, 4, 4], np.int64),
    np.zeros(0, np.uint8),
])
def test_distinct_values_is_unique(arr: npt.NDArray[Any]) -> None:
    expect = np.unique(arr.astype(np.int64))
    np.testing.assert_array_equal(distinct_values(arr), expect)


def test_label_metrics_refuses_values_no_group_names(pair: Any) -> None:
    """The low-level function no longer scores unknown labels as background: a 0/255
    reference used to give Dice 0 for a perfect lung."""
    pred, ref = pair
    with pytest.raises(InputError, match=r"ref_labels holds label value\(s\) 255"):
        label_metrics(pred, np.where(ref > 0, 255, 0).astype(np.uint8), SPACING)
    with pytest.raises(InputError, match=r"pred_labels holds label value\(s\) 7"):
        label_metrics(np.where(pred > 0, 7, 0), ref, SPACING)
    out = label_metrics(np.where(pred > 0, 7, 0), np.where(ref > 0, 7, 0), SPACING,
                        labels={"lung": (7,)})
    assert out["lung"]["dice"] > 0.85
