"""Rule 5 of the postprocessing (issue 12): where the border of the image matrix cuts a
lung, the aerated lung along the cut that a network takes for outside air is put back;
outside air, fat and a foam mattress at the border are not. Synthetic chests with known
answers (:class:`Chest`, 2 x 2 x 4 mm)."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.inference.image_edge import add_lung_at_image_edge
from tests.inference.test_postprocess_anatomy import STORAGES, Chest

#: The image's first column lies 10 mm inside the right lung (which spans x -80 .. -20).
CUT_X = -70.0


def _cut_chest(band_mm: float = 24.0) -> tuple[Chest, np.ndarray]:
    """A chest whose image starts inside the right lung; the "network" leaves out the lung
    within ``band_mm`` of the cut (it took it for outside air). Returns the chest and the
    band."""
    c = Chest(x_range=(CUT_X, 190.0))
    assert (c.truth[:, :, 0] == 1).any()  # the lung reaches the image's border
    band = (c.truth == 1) & (c.x < CUT_X + band_mm)
    c.net[band] = 0
    return c, band


def test_lung_cut_by_the_image_edge_is_put_back() -> None:
    c, band = _cut_chest()
    before = c.run(image_edge=False)
    assert not (before[band] > 0).any()
    added: dict[int, int] = {}
    out = c.run(edge_added=added)
    assert (out[band] == 1).mean() >= 0.9
    assert set(added) == {1} and added[1] == np.count_nonzero((out == 1) & (before == 0))
    # nothing outside the lung: not the outside air, not the body wall, not the left lung
    wrong = (out != before) & ~band
    assert c.ml(wrong) < 0.5, c.ml(wrong)


def test_vessels_in_the_band_are_lung_too() -> None:
    c, band = _cut_chest()
    # a vessel running along z through the middle of the band
    vessel = band & (np.abs(c.y + 5.0) < 3.0) & (np.abs(c.x - CUT_X - 12.0) < 3.0) & \
        (np.abs(c.z) < 30.0)
    assert vessel.sum() > 20
    c.hu[vessel] = 40
    out = c.run()
    assert (out[vessel] == 1).mean() >= 0.9


def test_nothing_added_where_the_lung_is_not_cut() -> None:
    """The whole chest inside the image, a foam mattress (-800 HU) under the back along the
    posterior border and a blanket at the lateral border: nothing changes."""
    c = Chest()
    c.hu[c.y > 92.0] = -800            # mattress along the posterior border
    c.hu[(c.x < -120.0) & (np.abs(c.y) < 40.0)] = -750  # a blanket at the right border
    labels = c.net.copy()
    assert add_lung_at_image_edge(labels, c.hu, c.geometry) == {}
    np.testing.assert_array_equal(labels, c.net)


def test_air_and_fat_at_the_cut_are_not_lung() -> None:
    """The image cuts the body but not the lung: fat (-100 HU) and air at the border stay
    out, and a lung labelled in full is left as it is."""
    c = Chest(x_range=(-100.0, 190.0))   # the body reaches the border; the lung does not
    c.hu[(c.hu == 40) & (c.x < -85.0)] = -100
    assert not (c.truth[:, :, 0] > 0).any()
    np.testing.assert_array_equal(c.run(), c.run(image_edge=False))


def test_air_at_the_cut_is_not_lung() -> None:
    """The band the network left out is air (a pneumothorax at the cut), not lung."""
    c, band = _cut_chest()
    c.hu[band] = -1000
    out = c.run()
    assert not (out[band] > 0).any()


@pytest.mark.parametrize(("perm", "flips"), STORAGES)
def test_same_answer_whatever_the_storage(perm: tuple[int, int, int],
                                          flips: tuple[bool, bool, bool]) -> None:
    c, _ = _cut_chest()
    ref = c.run()
    np.testing.assert_array_equal(c.run_stored(perm, flips), ref)
