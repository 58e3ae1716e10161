"""medseg.qc: the verdict on correct and deliberately damaged masks (the sample phantom's
exact labels; the real-CT cases are in tests/inference/test_trained_model.py and
benchmarks/qc_eval.py), ``medseg qc``, and the verdict in segment's outputs and the batch
summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import medseg
from medseg.batch.state import StudyRow
from medseg.batch.summary import summary_rows
from medseg.cli import main
from medseg.errors import GeometryError
from medseg.qc import OK, REVIEW, quality_check
from medseg.segment import segment_study
from medseg.train.lesions import from_canonical
from medseg.volume import CTVolume, to_canonical

PHANTOM = Path(__file__).resolve().parent.parent / "sample_data" / "phantom_000"


@pytest.fixture(scope="module")
def phantom() -> tuple[CTVolume, np.ndarray]:
    image = medseg.load(PHANTOM / "image.nii.gz")
    labels = np.asarray(medseg.load(PHANTOM / "labels.nii.gz").array, np.uint8)
    return image, labels


def _ball(image: CTVolume, centre_vox: tuple[int, int, int], radius_mm: float) -> np.ndarray:
    sx, sy, sz = image.spacing
    k, j, i = np.ogrid[:image.shape[0], :image.shape[1], :image.shape[2]]
    kc, jc, ic = centre_vox
    return np.asarray(((k - kc) * sz) ** 2 + ((j - jc) * sy) ** 2 + ((i - ic) * sx) ** 2
                      <= radius_mm ** 2)


def _centre(mask: np.ndarray) -> tuple[int, int, int]:
    k, j, i = (round(float(a.mean())) for a in np.nonzero(mask))
    return k, j, i


def test_exact_labels_are_ok(phantom) -> None:
    image, labels = phantom
    r = quality_check(image, labels)
    assert r.verdict == OK, r.reasons
    assert r.reasons == [] and r.slice is None
    assert r.signals["volume_ml"]["right"] > 1000 and r.signals["volume_ml"]["left"] > 1000
    assert r.signals["midline"]["from"] in ("spine", "body")


def test_a_lung_removed_is_review(phantom) -> None:
    image, labels = phantom
    damaged = np.where(labels == 2, 0, labels)
    r = quality_check(image, damaged)
    assert r.verdict == REVIEW
    assert any("no left lung" in x for x in r.reasons)
    assert any("aerated tissue that looks like lung" in x for x in r.reasons)
    assert r.signals["aerated_missed_ml"] > 500
    assert r.slice is not None and 1 <= r.slice <= image.shape[0]


def test_sides_swapped_is_review(phantom) -> None:
    image, labels = phantom
    swapped = labels.copy()
    swapped[labels == 1], swapped[labels == 2] = 2, 1
    r = quality_check(image, swapped)
    assert r.verdict == REVIEW
    assert any("sides swapped" in x for x in r.reasons)
    assert r.signals["wrong_side_fraction"]["right"] > 0.9


def test_one_lung_labelled_as_two_is_review(phantom) -> None:
    image, labels = phantom
    split = labels.copy()
    right = labels == 1
    k, j, i = np.nonzero(right)
    lateral = np.zeros_like(right)
    half = i < np.median(i) if image.direction[0, 0] > 0 else i > np.median(i)
    lateral[k[half], j[half], i[half]] = True
    # the medial half of the right lung is called left
    split[right & ~lateral] = 2
    split[labels == 2] = 0
    r = quality_check(image, split)
    assert r.verdict == REVIEW
    assert any("share" in x and "surface" in x for x in r.reasons)


def test_shifted_mask_is_review(phantom) -> None:
    image, labels = phantom
    step = round(10.0 / image.spacing[0])  # 10 mm along i (world x for this phantom)
    shifted = np.roll(labels, step, axis=2)
    shifted[:, :, :step] = 0
    r = quality_check(image, shifted)
    assert r.verdict == REVIEW, r.signals


def test_gas_with_soft_tissue_walls_labelled_lung_is_review(phantom) -> None:
    image, labels = phantom
    hu = np.asarray(image.array, np.float32).copy()
    lung = labels > 0
    k_low = int(np.flatnonzero(lung.any(axis=(1, 2)))[0])
    # a stomach under the left lung's base: soft-tissue wall, gas inside, inside the body
    kc = max(6, k_low - 8)
    _, jc, ic = _centre(labels == 2)
    wall = _ball(image, (kc, jc, ic), 30.0)
    gas = _ball(image, (kc, jc, ic), 22.0)
    hu[wall & ~lung] = 40.0
    hu[gas & ~lung] = -1000.0
    damaged = labels.copy()
    damaged[gas & ~lung] = 2
    r = quality_check(image.with_array(hu), damaged)
    assert r.verdict == REVIEW
    assert any("gas with soft-tissue walls" in x for x in r.reasons), r.reasons
    # the same stomach left unlabelled is fine
    assert quality_check(image.with_array(hu), labels).verdict == OK


def test_air_against_the_skin_labelled_lung_is_review(phantom) -> None:
    """A mattress cover (-100 HU) 5 mm behind the back, the air between it and the skin
    (partial volume, -750 HU) labelled right lung over the middle of the back: the strip the
    abdominal totalseg example had before rule 2's skin test."""
    image, labels = phantom
    hu_c, _ = to_canonical(image, np.asarray(image.array, np.float32))
    lab_c, _ = to_canonical(image, labels)
    body = hu_c > -500
    n_p = hu_c.shape[1]
    # the body's posterior surface, per (axial slice, lateral column)
    back = n_p - 1 - np.argmax(body[:, ::-1, :], axis=1)
    has = body.any(axis=1)
    strip = np.zeros(hu_c.shape, bool)
    cover = np.zeros(hu_c.shape, bool)
    k_lo, k_hi = hu_c.shape[0] // 4, 3 * hu_c.shape[0] // 4
    for k in range(k_lo, k_hi):
        for x in np.flatnonzero(has[k]):
            b = back[k, x]
            cover[k, b + 3:b + 5, x] = True
            if hu_c.shape[2] // 4 < x < hu_c.shape[2] // 2:
                strip[k, b + 1:b + 3, x] = True
    hu_c[cover] = -100.0
    hu_c[strip] = -750.0
    hu = from_canonical(image, hu_c)
    damaged_c = lab_c.copy()
    damaged_c[strip] = 1
    damaged = from_canonical(image, damaged_c)
    r = quality_check(image.with_array(hu), damaged)
    assert r.verdict == REVIEW
    assert any("against the skin" in x for x in r.reasons), r.reasons
    assert r.signals["at_skin_ml"] > 5
    # the cover without the strip labelled is fine
    clean = quality_check(image.with_array(hu), labels)
    assert clean.verdict == OK, clean.reasons
    assert clean.signals["at_skin_ml"] == 0


def test_enclosed_tumour_left_out_is_review(phantom) -> None:
    image, labels = phantom
    hu = np.asarray(image.array, np.float32).copy()
    tumour = _ball(image, _centre(labels == 1), 18.0) & (labels == 1)
    hu[tumour] = 40.0
    included = quality_check(image.with_array(hu), labels)
    assert included.verdict == OK, included.reasons
    cut = np.where(tumour, 0, labels)
    r = quality_check(image.with_array(hu), cut)
    assert r.verdict == REVIEW
    assert any("dense tissue enclosed by the lung" in x for x in r.reasons)
    assert r.signals["dense_left_out_ml"] >= 15


def test_pleural_mass_cut_out_is_review(phantom) -> None:
    """A 50 mm mass against the chest wall (benchmarks/qc_eval.py's damage, on the
    phantom): included in the mask it is ok; cut out, it leaves a bite in the lung's
    outline that the chest-wall check finds; with the lungs cut by the image's side the
    check is skipped."""
    from medseg.train.lesions import insert_lesion
    from medseg.train.robustness import crop_volume

    image, labels = phantom
    hu_c, sp = to_canonical(image, np.asarray(image.array, np.float32))
    lab_c, _ = to_canonical(image, labels)
    # a placement in the lung's middle third (those at the base, under which there is no
    # lung, are not found: docs/concepts/quality-control.md)
    les = insert_lesion(hu_c, lab_c, sp, np.random.default_rng([12, 0]), "mass",
                        anchor="pleura", side=1, diameter_mm=50.0)
    assert les is not None
    with_mass = image.with_array(from_canonical(image, hu_c).astype(image.array.dtype))
    included = quality_check(with_mass, labels)
    assert included.verdict == OK, included.reasons
    assert included.signals["chest_wall_bite_ml"] == 0
    cut = np.where(from_canonical(image, les.mask), 0, labels)
    r = quality_check(with_mass, cut)
    assert r.verdict == REVIEW
    assert any("bite in the lung's outline against the chest wall" in x for x in r.reasons)
    assert r.signals["chest_wall_bite_ml"] >= 5 and r.slice is not None
    # the mass's axial slices hold the slice to look at
    ks = np.flatnonzero(les.mask.any(axis=(1, 2))) + 1
    assert ks.min() - 2 <= r.slice <= ks.max() + 2, (r.slice, ks)
    # the image cut inside the lateral edge of each lung (no chest wall there): not
    # checked (tests/inference/test_trained_model.py: a hemithorax of a real CT)
    cols = np.flatnonzero(labels.any(axis=(0, 1)))
    edge = slice(cols[0] + 10, cols[-1] - 10)
    side_cut = quality_check(crop_volume(with_mass, (slice(None), slice(None), edge)),
                             cut[:, :, edge])
    assert side_cut.signals["cut_cm2"]["side"] > 2
    assert side_cut.signals["chest_wall_bite_ml"] is None
    # a mask without sides: not checked (closing both lungs together fills the heart)
    binary = quality_check(with_mass, np.where(cut > 0, 3, 0).astype(np.uint8))
    assert binary.signals["chest_wall_bite_ml"] is None


def test_a_slice_the_mask_got_wrong_is_review(phantom) -> None:
    image, labels = phantom
    damaged = labels.copy()
    zs = np.flatnonzero((labels == 1).any(axis=(1, 2)))
    k = int(zs[len(zs) // 2])
    damaged[k][damaged[k] == 1] = 0
    r = quality_check(image, damaged)
    assert r.verdict == REVIEW
    assert r.signals["slice_jumps"], r.signals
    canon_k = int(np.flatnonzero(to_canonical(image, (np.arange(image.shape[0])[:, None, None]
                                                      == k).repeat(image.shape[1], 1)
                                              .repeat(image.shape[2], 2))[0]
                                 .any(axis=(1, 2)))[0])
    assert any(abs(s - (canon_k + 1)) <= 1 for s in r.signals["slice_jumps"])


def test_hemithorax_field_of_view_is_a_note_not_a_review(phantom) -> None:
    from medseg.train.robustness import hemithorax_crop

    image, labels = phantom
    crop, box = hemithorax_crop(image, 1)
    r = quality_check(crop, labels[box])
    assert r.verdict == OK, r.reasons
    assert any("no left lung" in n for n in r.notes)


def test_binary_mask_skips_the_side_checks(phantom) -> None:
    image, labels = phantom
    r = quality_check(image, np.where(labels > 0, 3, 0).astype(np.uint8))
    assert r.verdict == OK, r.reasons
    assert any("does not tell right from left" in n for n in r.notes)


def test_labels_on_another_grid_are_refused(phantom) -> None:
    image, labels = phantom
    with pytest.raises(GeometryError):
        quality_check(image, labels[1:])
    moved = image.with_array(labels)
    moved = CTVolume(moved.array, type(image.geometry)(
        (image.origin[0] + 5, *image.origin[1:]), image.spacing, image.direction))
    with pytest.raises(GeometryError, match="grid"):
        quality_check(image, moved)


def test_cli_json_and_exit_codes(phantom, tmp_path: Path, capsys) -> None:
    image, labels = phantom
    swapped = labels.copy()
    swapped[labels == 1], swapped[labels == 2] = 2, 1
    path = medseg.save(image.with_array(swapped), tmp_path / "swapped.nii.gz")
    assert main(["qc", str(PHANTOM / "image.nii.gz"), str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "review"
    assert any("swapped" in r for r in out["reasons"])
    assert set(out) == {"verdict", "reasons", "notes", "slice", "signals"}
    assert main(["qc", str(PHANTOM / "image.nii.gz"), str(PHANTOM / "labels.nii.gz")]) == 0
    assert ": ok" in capsys.readouterr().out
    other = medseg.save(CTVolume(swapped[:-2], image.geometry), tmp_path / "short.nii.gz")
    assert main(["qc", str(PHANTOM / "image.nii.gz"), str(other)]) == 1
    err = capsys.readouterr().err
    assert "short.nii.gz" in err and "grid" in err


def test_segment_outputs_carry_the_verdict(tmp_path: Path) -> None:
    out = tmp_path / "ph"
    res = segment_study(PHANTOM / "image.nii.gz", out, method="threshold")
    summary = json.loads((out / "segment.json").read_text())
    assert summary["qc"]["verdict"] in (OK, REVIEW)
    assert summary["qc"] == res.segmentation.qc
    assert "qc_s" in summary["timings_s"]
    report = json.loads((out / "report.json").read_text())
    assert report["qc"] == summary["qc"]
    header = (out / "report.csv").read_text().splitlines()[0].split(",")
    assert "qc_verdict" in header and "qc_reasons" in header
    html = (out / "report.html").read_text()
    assert ("Quality check: ok" in html) if summary["qc"]["verdict"] == OK \
        else ("Review this mask" in html)


def test_review_banner_and_montage_frame(phantom, tmp_path: Path) -> None:
    from medseg.report.study import render_html, study_report
    from medseg.visualize import overlay_montage

    image, labels = phantom
    damaged = np.where(labels == 2, 0, labels)
    lab = image.with_array(damaged)
    qc = quality_check(image, damaged).to_dict()
    rep = study_report(image, lab, study_id="x", qc=qc)
    html = render_html(rep, image, lab)
    assert "Review this mask" in html and "no left lung" in html
    assert f"axial slice {qc['slice']}" in html
    plain = overlay_montage(image, lab, view="axial", n=6)
    framed = overlay_montage(image, lab, view="axial", n=6, highlight=qc["slice"])
    assert plain != framed


def test_batch_summary_lists_review_first() -> None:
    def row(sid: str, status: str, verdict: str | None) -> StudyRow:
        return StudyRow(study_id=sid, source="s", reference=None, params="{}", status=status,
                        attempts=1, result={"volumes_ml": {"right": 1, "left": 1, "total": 2},
                                            "warnings": [], "qc_verdict": verdict,
                                            "qc_reasons": ["why"] if verdict == REVIEW
                                            else []})

    rows = summary_rows([row("a", "done", OK), row("b", "done", REVIEW),
                         row("c", "failed", None), row("d", "done", REVIEW)])
    assert [r["study_id"] for r in rows] == ["c", "b", "d", "a"]
    assert rows[1]["qc_verdict"] == REVIEW and rows[1]["qc_reasons"] == "why"
    assert rows[0]["qc_verdict"] == ""


def test_from_canonical_roundtrip_used_by_the_checks(phantom) -> None:
    image, labels = phantom
    canon, _ = to_canonical(image, labels)
    assert np.array_equal(from_canonical(image, canon), labels)
