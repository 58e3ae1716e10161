"""The robustness suite's helpers (LIDC XML, nodule placement, crops, the abdominal-CT
reference) and, on the shared data, the suite itself on the shipped model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg.inference import DEFAULT_MODEL
from medseg.train.robustness import (
    crop_volume,
    hemithorax_crop,
    lateral_crop,
    missed_without_lung_below,
    nodule_mask,
    parse_lidc_xml,
    rows_markdown,
    slab_crop,
    totalseg_reference,
)
from medseg.volume import CTVolume, Geometry

XML = """<?xml version="1.0" encoding="UTF-8"?>
<LidcReadMessage xmlns="http://www.nih.gov">
<readingSession>
  <unblindedReadNodule><noduleID>N1</noduleID>
    <roi><imageZposition>5.0</imageZposition><imageSOP_UID>1.2.3.2</imageSOP_UID>
      <inclusion>TRUE</inclusion>
      <edgeMap><xCoord>2</xCoord><yCoord>3</yCoord></edgeMap>
      <edgeMap><xCoord>6</xCoord><yCoord>3</yCoord></edgeMap>
      <edgeMap><xCoord>6</xCoord><yCoord>7</yCoord></edgeMap>
      <edgeMap><xCoord>2</xCoord><yCoord>7</yCoord></edgeMap>
    </roi>
  </unblindedReadNodule>
  <nonNodule><nonNoduleID>X</nonNoduleID><imageSOP_UID>1.2.3.1</imageSOP_UID></nonNodule>
</readingSession>
<readingSession>
  <unblindedReadNodule><noduleID>7</noduleID>
    <roi><imageSOP_UID>1.2.3.3</imageSOP_UID><inclusion>TRUE</inclusion>
      <edgeMap><xCoord>10</xCoord><yCoord>1</yCoord></edgeMap>
    </roi>
    <roi><imageSOP_UID>1.2.3.2</imageSOP_UID><inclusion>FALSE</inclusion>
      <edgeMap><xCoord>3</xCoord><yCoord>4</yCoord></edgeMap>
    </roi>
  </unblindedReadNodule>
</readingSession>
</LidcReadMessage>
"""


def test_parse_lidc_xml(tmp_path: Path) -> None:
    p = tmp_path / "069.xml"
    p.write_text(XML)
    rois = parse_lidc_xml(p)
    assert [(r.reader, r.nodule_id, r.sop_uid, r.inclusion) for r in rois] == [
        (0, "N1", "1.2.3.2", True), (1, "7", "1.2.3.3", True), (1, "7", "1.2.3.2", False)]
    assert rois[0].points == [(2, 3), (6, 3), (6, 7), (2, 7)]  # (x = column, y = row)


def _headers(z_of_uid: dict[str, float]) -> dict[str, dict[str, object]]:
    return {uid: {"ipp": np.array([-8.0, -6.0, z]), "iop": np.array([1.0, 0, 0, 0, 1.0, 0]),
                  "spacing": np.array([1.0, 2.0]), "rows": 12, "cols": 16}
            for uid, z in z_of_uid.items()}


@pytest.mark.parametrize("reverse", [False, True])
def test_nodule_mask_lands_on_its_slice_whatever_the_storage_order(tmp_path: Path,
                                                                    reverse: bool) -> None:
    p = tmp_path / "x.xml"
    p.write_text(XML)
    rois = parse_lidc_xml(p)
    # three slices at z = 0, 5, 10 mm; PixelSpacing (row 1 mm, column 2 mm)
    headers = _headers({"1.2.3.1": 0.0, "1.2.3.2": 5.0, "1.2.3.3": 10.0})
    if reverse:  # stored superior -> inferior: k = 0 is z = 10
        geom = Geometry((-8.0, -6.0, 10.0), (2.0, 1.0, 5.0), np.diag([1.0, 1.0, -1.0]))
    else:
        geom = Geometry((-8.0, -6.0, 0.0), (2.0, 1.0, 5.0))
    vol = CTVolume(np.zeros((3, 12, 16), np.int16), geom)
    mask, missing = nodule_mask(vol, rois, headers)
    assert missing == 0
    k_mid, k_top = 1, (0 if reverse else 2)
    # reader 1's square (rows 3-7, columns 2-6) on z = 5: the union is of each reader's own
    # (inclusion - exclusion), so reader 2's exclusion ROI does not cut into it
    assert mask[k_mid, 3:8, 2:7].all()
    assert mask[k_mid].sum() == 25
    assert mask[k_top, 1, 10] and mask[k_top].sum() == 1  # single-point ROI
    assert not mask[2 - k_top].any()
    # world position of a filled voxel equals the DICOM pixel's
    w = vol.geometry.index_to_world([2, 3, k_mid])[0]
    assert np.allclose(w, [-8.0 + 2 * 2.0, -6.0 + 3 * 1.0, 5.0])


def test_unknown_sop_uid_is_counted() -> None:
    from medseg.train.robustness import NoduleRoi

    vol = CTVolume(np.zeros((3, 12, 16), np.int16), Geometry((0, 0, 0), (1, 1, 1)))
    mask, missing = nodule_mask(vol, [NoduleRoi(0, "a", "9.9", True, [(1, 1)])], {})
    assert missing == 1 and not mask.any()


def _body(direction: np.ndarray) -> CTVolume:
    arr = np.full((10, 40, 60), -1000, np.int16)
    arr[:, 5:35, 10:50] = 40  # body: x index 10..49, midline between 29 and 30
    return CTVolume(arr, Geometry((-30.0, -20.0, 100.0), (1.5, 1.0, 2.5), direction))


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, -1.0, 1.0]),
                                       np.diag([1.0, 1.0, -1.0])])
def test_crop_keeps_world_positions(direction: np.ndarray) -> None:
    vol = _body(direction)
    for side in (1, 2):
        crop, box = hemithorax_crop(vol, side)
        sub = vol.array[box]
        assert crop.shape == sub.shape
        assert np.array_equal(crop.array, sub)
        # a voxel's world position is the same in the crop and the full volume
        starts = [s.indices(n)[0] for s, n in zip(box, vol.shape, strict=True)]
        for kji in [(0, 0, 0), (3, 7, 5), (9, 39, crop.shape[2] - 1)]:
            full = (kji[2] + starts[2], kji[1] + starts[1], kji[0] + starts[0])
            assert np.allclose(crop.geometry.index_to_world(kji[::-1]),
                               vol.geometry.index_to_world(full))
        # every kept voxel is on the requested side of the body midline (world x)
        xs = crop.geometry.index_to_world(
            np.c_[np.arange(crop.shape[2]), np.zeros((crop.shape[2], 2))])[:, 0]
        mid = float(np.mean(vol.geometry.index_to_world(
            np.c_[np.arange(10, 50), np.zeros((40, 2))])[:, 0]))
        assert (xs < mid).all() if side == 1 else (xs > mid).all()
    for part in ("apex", "base"):
        crop, box = slab_crop(vol, part)
        z = crop.geometry.index_to_world(np.c_[np.zeros((crop.shape[0], 2)),
                                                np.arange(crop.shape[0])])[:, 2]
        z_all = vol.geometry.index_to_world(np.c_[np.zeros((10, 2)), np.arange(10)])[:, 2]
        assert crop.shape[0] == 4
        assert (z.min() == np.sort(z_all)[-4]) if part == "apex" else (z.max() ==
                                                                       np.sort(z_all)[3])


def test_crop_volume_subsets_slice_metadata() -> None:
    vol = _body(np.eye(3))
    vol.metadata.sop_instance_uids = tuple(str(k) for k in range(10))
    crop = crop_volume(vol, (slice(2, 5), slice(None), slice(None)))
    assert crop.metadata.sop_instance_uids == ("2", "3", "4")
    assert np.allclose(crop.origin, vol.geometry.index_to_world([0, 0, 2])[0])


def test_totalseg_reference_on_a_synthetic_abdomen() -> None:
    """Body (soft tissue) in air; two posterior air pockets either side of the midline that
    reach the top slices (lung bases), an anterior pocket at the top (stomach) and one low
    down (colon): gas."""
    nz, ny, nx = 20, 60, 80
    arr = np.full((nz, ny, nx), -1000, np.int16)  # index (k, j, i): i -> L, j -> P, k -> S
    arr[:, 5:55, 5:75] = 30
    arr[14:, 38:50, 12:30] = -850   # patient right (small i), posterior: right lung base
    arr[12:, 38:50, 50:68] = -850   # patient left: left lung base
    arr[16:, 10:20, 45:60] = -950   # anterior, at the top: stomach gas
    arr[3:8, 20:30, 30:45] = -950   # colon gas low down
    vol = CTVolume(arr, Geometry((0, 0, 0), (3.0, 3.0, 3.0)))
    ref = totalseg_reference(vol, min_ml=0.1)
    assert (ref[14:, 38:50, 12:30] == 1).all()
    assert (ref[12:, 38:50, 50:68] == 2).all()
    assert (ref[16:, 10:20, 45:60] == 3).all()
    assert (ref[3:8, 20:30, 30:45] == 3).all()
    assert not ref[arr == 30].any() and not ref[:, :5].any()  # tissue, outside air
    # the same in RAS storage (flipped x and y): the labels follow the anatomy
    ras = CTVolume(arr[:, ::-1, ::-1].copy(),
                   Geometry((0, 0, 0), (3.0, 3.0, 3.0), np.diag([-1.0, -1.0, 1.0])))
    ref_ras = totalseg_reference(ras, min_ml=0.1)
    assert np.array_equal(ref_ras[:, ::-1, ::-1], ref)


def test_rows_markdown() -> None:
    from medseg.train.robustness import RobustnessRow

    md = rows_markdown([RobustnessRow("a", "m", 0.98765, ">= 0.97", True),
                        RobustnessRow("b", "n", "x|y", "refused", False)])
    assert md.splitlines()[0] == "| case | measure | value | target | result |"
    assert "| a | m | 0.9877 | >= 0.97 | pass |" in md and "| b | n | x/y | refused | FAIL |" in md


def test_missed_without_lung_below_tells_a_lesion_on_the_dome_from_one_at_the_wall() -> None:
    lung = np.zeros((10, 6, 6), bool)
    lung[2:9, :, :3] = True                 # a lung block over x < 3 from z = 2 up
    lung[5:9, :, 3:] = True                 # ... and over x >= 3 from z = 5 up
    missed = np.zeros_like(lung)
    missed[3:5, 1:3, 3:5] = True            # under the lung of x >= 3: nothing below it
    assert missed_without_lung_below(missed, lung) == 100.0
    missed[:] = False
    missed[6:8, 1:3, 1:3] = True            # taken out of the lung's middle: lung below
    lung[missed] = False
    assert missed_without_lung_below(missed, lung) == 0.0
    missed[0:2, 0, 0] = True                # 2 more voxels under every lung
    assert missed_without_lung_below(missed, lung) == 20.0
    assert np.isnan(missed_without_lung_below(np.zeros_like(lung), lung))


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, -1.0, 1.0])])
def test_lateral_crop_cuts_the_lung_at_the_image_border(direction: np.ndarray) -> None:
    vol = _body(direction)
    for cols in (slice(14, 27), slice(33, 46)):  # a right lung, then a left lung
        lung = np.zeros(vol.shape, bool)
        lung[2:8, 10:30, cols] = True  # 13 columns of 1.5 mm
        crop, box = lateral_crop(vol, lung, depth_mm=6.0)  # 4 columns
        kept = lung[box]
        assert kept.sum() == lung.sum() * 9 // 13
        # the lung now reaches the crop's border on its lateral side, and the crop keeps
        # the body's middle and the other side
        on_border = kept[:, :, 0].any() or kept[:, :, -1].any()
        assert on_border and crop.shape[2] > 30
        assert np.array_equal(crop.array, vol.array[box])


#: What the shipped model (lung2d-v8, with today's postprocessing) meets: every targeted
#: row of the suite, as measured on 2026-12-07 by `medseg validate-model --suite robustness`
#: (values in the comments; the table is in docs/model-card.md). Keys are (case, measure
#: prefix); True = the row must pass, False = reported, and the shipped model misses it
#: (issue 12 is open for these: inserted consolidation 90 % inside, two right effusions
#: 7 % and 12 % inside; the rotation row is met since the slices of a tilted patient are
#: turned upright for the network, medseg.inference.pose).
SHIPPED_MEETS: dict[tuple[str, str], bool] = {
    ('lidc', 'Dice right vs reference'): True,  # 0.9843
    ('lidc', 'Dice left vs reference'): True,  # 0.9944
    ('lidc+lesions 1', 'Dice min(R,L) vs lung+lesion ref'): True,  # 0.9834
    ('lidc+lesions 2', 'Dice min(R,L) vs lung+lesion ref'): True,  # 0.9832
    ('lidc+lesions 3', 'Dice min(R,L) vs lung+lesion ref'): True,  # 0.9762
    ('lidc+lesions', '% consolidation voxels in lung'): False,  # 89.93 (air bronchograms)
    ('lidc+lesions', '% mass voxels in lung'): True,  # 96.9377
    ('lidc+effusion 1', '% effusion right 15 mm labelled lung'): False,  # 7.0695
    ('lidc+effusion 1', '% effusion left 35 mm labelled lung'): True,  # 1.3745
    ('lidc+effusion 1', 'Dice min(R,L) vs ref without fluid'): True,  # 0.9842
    ('lidc+effusion 2', '% effusion right 35 mm labelled lung'): False,  # 12.0303
    ('lidc+effusion 2', '% effusion left 15 mm labelled lung'): True,  # 4.7183
    ('lidc+effusion 2', 'Dice min(R,L) vs ref without fluid'): True,  # 0.9774
    ('lidc nodules', '% nodule voxels in lung'): True,  # 100.0
    ('totalseg abdomen', 'mL lung label on gut gas'): True,  # 0.0
    ('totalseg abdomen', 'mL lung label outside the reference bases'): True,  # 11.475
    ('totalseg abdomen', 'right base recall'): True,  # 0.9864
    ('totalseg abdomen', 'left base recall'): True,  # 0.9566
    ('crop right hemithorax', 'Dice right vs cropped ref'): True,  # 0.9765
    ('crop right hemithorax', '% lung labelled the wrong side'): True,  # 0.0057
    ('crop left hemithorax', 'Dice left vs cropped ref'): True,  # 0.9863
    ('crop left hemithorax', '% lung labelled the wrong side'): True,  # 0.0
    ('crop apex 40 %', 'Dice right vs cropped ref'): True,  # 0.9943
    ('crop apex 40 %', 'Dice left vs cropped ref'): True,  # 0.9973
    ('crop apex 40 %', '% lung labelled the wrong side'): True,  # 0.0001
    ('crop base 40 %', 'Dice right vs cropped ref'): True,  # 0.9615
    ('crop base 40 %', 'Dice left vs cropped ref'): True,  # 0.9783
    ('crop base 40 %', '% lung labelled the wrong side'): True,  # 0.0
    ('crop matrix cuts the right lung 20 mm', 'Dice right vs cropped ref'): True,  # 0.9861
    ('crop matrix cuts the right lung 20 mm', 'Dice left vs cropped ref'): True,  # 0.9933
    ('crop matrix cuts the right lung 20 mm', '% lung labelled the wrong side'): True,  # 0.0
    ('crop matrix cuts the left lung 20 mm', 'Dice right vs cropped ref'): True,  # 0.9872
    ('crop matrix cuts the left lung 20 mm', 'Dice left vs cropped ref'): True,  # 0.9939
    ('crop matrix cuts the left lung 20 mm', '% lung labelled the wrong side'): True,  # 0.0001
    ('consistency', 'noise 80 HU: Dice min(R,L) vs clean mask'): True,  # 0.9945
    ('consistency', 'rotation 12 deg: Dice min(R,L) vs clean mask'): True,  # 0.9885 (upright)
    ('consistency', '5 mm slices: Dice min(R,L) vs clean mask'): True,  # 0.9821 (thick slices)
    ('consistency', 'reversed storage: voxels differing from clean'): True,  # 0.0
    ('cip-ct64 held-out', 'Dice right'): True,  # 0.9862
    ('cip-ct64 held-out', 'Dice left'): True,  # 0.9850
    ('bad input', 'MR series'): True,  # refused
    ('bad input', 'non-HU 0..4095'): True,  # refused
    ('bad input', 'all air'): True,  # refused
}
#: Floors for the rows the shipped model misses, a little under what it measured: they are
#: not met yet, but a change that makes them worse fails. (value >= floor, or <= for "%
#: effusion" rows.)
SHIPPED_FLOORS: dict[tuple[str, str], float] = {
    ('lidc+lesions', '% consolidation voxels in lung'): 86.0,
    ('lidc+effusion 1', '% effusion right 15 mm labelled lung'): 8.5,
    ('lidc+effusion 2', '% effusion right 35 mm labelled lung'): 13.5,
}


@pytest.mark.shared_data
@pytest.mark.slow
def test_robustness_suite_on_the_shipped_model(shared_data: Path, tmp_path: Path) -> None:
    from medseg.train.robustness import run_robustness
    from tests.conftest import need

    need(shared_data, "real-ct/lidc-idri-0001")
    need(shared_data, "totalseg-example/example_ct.nii.gz")
    res = run_robustness(shared_data, model=DEFAULT_MODEL, cache_dir=tmp_path / "cache",
                         out_dir=tmp_path / "out")
    rows = res["rows"]
    assert {"case", "measure", "value", "target", "passed"} <= set(rows[0])
    cases = {r["case"].split(" ")[0] for r in rows}
    assert {"lidc", "lidc+lesions", "lidc+effusion", "totalseg", "crop",
            "consistency", "cip-ct64", "bad"} <= cases
    for name in ("robustness.json", "robustness.md", "lidc-coronal.png", "lidc-axial.png",
                 "totalseg-reference-coronal.png"):
        assert (tmp_path / "out" / name).is_file()
    # every inserted lesion has its own row (reported only), and the notes say where the
    # lost part of each lies
    own = [r for r in rows if r["case"].startswith("lidc+lesions ")
           and r["measure"].startswith("% ")]
    assert len(own) == 11 and all(r["passed"] is None for r in own)
    assert any(k.endswith("misses") and "no lung under them" in v
               for k, v in res["notes"].items())
    # bad input is always refused
    assert all(r["passed"] for r in rows if r["case"] == "bad input")
    assert len([r for r in rows if r["case"] == "bad input"]) == 3
    _assert_rows(rows, SHIPPED_MEETS, SHIPPED_FLOORS)


def _assert_rows(rows: list[dict], meets: dict[tuple[str, str], bool],
                 floors: dict[tuple[str, str], float]) -> None:
    """Every (case, measure prefix) of ``meets`` and ``floors`` has rows; those marked True
    pass; each floored row is at its floor or better (<= for "% effusion" rows)."""
    for (case, measure), must in meets.items():
        hits = [r for r in rows if r["case"] == case and r["measure"].startswith(measure)]
        assert hits, (case, measure)
        if must:
            assert all(r["passed"] for r in hits), hits
    for (case, measure), floor in floors.items():
        hits = [r for r in rows if r["case"] == case and r["measure"].startswith(measure)]
        assert hits, (case, measure)
        for r in hits:
            ok = r["value"] <= floor if "effusion" in measure else r["value"] >= floor
            assert ok, (r, floor)


#: What the two-view lung2d-v19 meets beyond lung2d-v8 (docs/model-card.md, "lung2d-v19";
#: measured 2026-12-07: 40 rows pass, 3 fail), and the rows where it is known to give up a
#: little against v8 (floors a little under what it measured).
V19_MEETS: dict[tuple[str, str], bool] = {
    ('lidc+effusion 1', '% effusion right 15 mm labelled lung'): True,  # 4.40 (v8 7.07)
    ('consistency', '5 mm slices: Dice min(R,L) vs clean mask'): True,  # 0.9805 (v8 0.9769)
    ('lidc+lesions', '% mass voxels in lung'): True,  # 95.74 (v8 96.94)
}
V19_FLOORS: dict[tuple[str, str], float] = {
    ('lidc+lesions 2', '% mass (spine, right, 30 mm)'): 68.0,  # 71.03 (v8 81.88)
    ('lidc+effusion 2', '% effusion right 35 mm labelled lung'): 10.5,  # 9.58 (v8 12.03)
    ('lidc', 'Dice right vs reference'): 0.988,  # 0.9891 (v8 0.9843)
}


@pytest.mark.shared_data
@pytest.mark.slow
def test_robustness_suite_on_the_two_view_model(shared_data: Path, tmp_path: Path) -> None:
    from medseg.train.robustness import run_robustness
    from tests.conftest import need

    need(shared_data, "real-ct/lidc-idri-0001")
    need(shared_data, "totalseg-example/example_ct.nii.gz")
    res = run_robustness(shared_data, model="lung2d-v19", cache_dir=tmp_path / "cache")
    rows = res["rows"]
    assert res["passed"] >= 40 and res["failed"] <= 3, (res["passed"], res["failed"])
    _assert_rows(rows, V19_MEETS, V19_FLOORS)
