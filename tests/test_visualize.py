from __future__ import annotations

import io

import numpy as np
import pytest

from medseg.synth import make_phantom
from medseg.visualize import overlay_montage
from tests.helpers import reindex


@pytest.mark.parametrize("view", ["axial", "coronal"])
def test_montage_is_a_png_and_orientation_independent(view: str) -> None:
    import matplotlib.image as mpimg

    image, labels = make_phantom(seed=2, shape=(20, 64, 64), spacing=(5.0, 5.0, 10.0))
    png = overlay_montage(image, labels, view=view, n=3)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    flipped = overlay_montage(reindex(image, (1, 0, 2), (True, False, True)),
                              reindex(labels, (1, 0, 2), (True, False, True)), view=view, n=3)
    a = mpimg.imread(io.BytesIO(png))
    b = mpimg.imread(io.BytesIO(flipped))
    assert a.shape == b.shape
    # the same picture whatever the storage order (titles are identical too)
    assert np.abs(a - b).mean() < 1e-3


def test_bad_view() -> None:
    image, labels = make_phantom(seed=2, shape=(8, 32, 32))
    with pytest.raises(ValueError, match="axial"):
        overlay_montage(image, labels, view="sagittal")
