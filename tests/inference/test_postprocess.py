from __future__ import annotations

import numpy as np

from medseg.inference.postprocess import bounding_box, postprocess_labels


def test_largest_component_per_lung_and_holes() -> None:
    lab = np.zeros((10, 40, 40), np.uint8)
    lab[2:8, 5:20, 5:15] = 1
    lab[4, 10, 10] = 0            # a hole (vessel) inside the right lung
    lab[2:8, 12:14, 8:10] = 0     # a tube through the slices: a hole in each slice
    lab[0, 30, 30] = 1            # a speck far away: removed
    lab[2:8, 5:20, 25:35] = 2
    lab[5, 2, 2] = 2              # a speck: removed
    out = postprocess_labels(lab)
    assert out[4, 10, 10] == 1 and out[5, 12, 8] == 1
    assert out[0, 30, 30] == 0 and out[5, 2, 2] == 0
    assert (out == 2).sum() == 6 * 15 * 10
    assert (out == 1).sum() == 6 * 15 * 10


def test_fill_never_overwrites_the_other_lung() -> None:
    lab = np.zeros((3, 20, 20), np.uint8)
    lab[:, 2:18, 2:18] = 1
    lab[:, 8:12, 8:12] = 2        # left-labelled island inside the right lung
    out = postprocess_labels(lab)
    assert (out[:, 8:12, 8:12] == 2).all()


def test_empty_and_bbox() -> None:
    assert postprocess_labels(np.zeros((2, 3, 4), np.uint8)).sum() == 0
    m = np.zeros((5, 6, 7), bool)
    m[1:3, 2, 4:6] = True
    assert bounding_box(m, margin=0) == (slice(1, 3), slice(2, 3), slice(4, 6))
    assert bounding_box(np.zeros((2, 2), bool)) is None


def test_fragment_of_one_lung_touching_the_other_goes_to_the_other() -> None:
    """The 2D network's typical slip: a lateral patch of the left lung labelled right. It
    touches the left lung, not the right one: it becomes left, not a hole."""
    lab = np.zeros((6, 30, 40), np.uint8)
    lab[1:5, 5:25, 3:15] = 1
    lab[1:5, 5:25, 20:37] = 2
    lab[1:5, 8:20, 32:37] = 1       # mislabelled patch inside the left lung's outline
    lab[2, 2, 30] = 1               # a speck touching nothing: dropped
    out = postprocess_labels(lab)
    assert (out[1:5, 8:20, 32:37] == 2).all()
    assert (out == 1).sum() == 4 * 20 * 12
    assert out[2, 2, 30] == 0


def test_holes_filled_across_axial_slices_whatever_the_storage_axis() -> None:
    lab = np.zeros((8, 20, 20), np.uint8)
    lab[1:7, 3:17, 3:17] = 1
    lab[:, 9:11, 9:11] = 0          # a vessel running superior-inferior through the lung
    axial = postprocess_labels(lab, axial_axis=0)
    assert (axial[1:7, 9:11, 9:11] == 1).all()
    stored_coronal = np.ascontiguousarray(lab.transpose(1, 0, 2))  # (y, z, x)
    out = postprocess_labels(stored_coronal, axial_axis=1)
    np.testing.assert_array_equal(out.transpose(1, 0, 2), axial)
