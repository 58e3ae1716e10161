from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import GeometryError, PixelDataError
from medseg.volume import CTVolume, Geometry


def _rotation(angle_deg: float, axis: int) -> np.ndarray:
    a = np.radians(angle_deg)
    c, s = np.cos(a), np.sin(a)
    r = np.eye(3)
    i, j = [k for k in range(3) if k != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.85, 1.2, 0.9), (0.7, 0.7, 2.5)])
@pytest.mark.parametrize("angle", [0.0, 17.0, 90.0])
def test_index_world_round_trip(spacing: tuple[float, float, float], angle: float) -> None:
    g = Geometry(origin=(-10.0, 20.5, 3.25), spacing=spacing, direction=_rotation(angle, 0))
    ijk = np.array([[0, 0, 0], [1, 2, 3], [10.5, -1, 7]], float)
    world = g.index_to_world(ijk)
    np.testing.assert_allclose(g.world_to_index(world), ijk, atol=1e-9)
    # the definition: origin + direction @ (spacing * ijk)
    expected = np.asarray(g.origin) + (g.direction @ (np.asarray(spacing) * ijk[1]))
    np.testing.assert_allclose(world[1], expected, atol=1e-9)


def test_affine_and_ras() -> None:
    g = Geometry(origin=(1, 2, 3), spacing=(0.5, 0.6, 2.0))
    np.testing.assert_allclose(g.affine[:3, 3], (1, 2, 3))
    np.testing.assert_allclose(np.diag(g.affine)[:3], (0.5, 0.6, 2.0))
    ras = g.affine_ras
    np.testing.assert_allclose(ras[:3, 3], (-1, -2, 3))
    back = Geometry.from_affine(ras, ras=True)
    assert back.is_close(g, atol_mm=1e-9)
    assert g.orientation_code() == "LPS"
    flipped = Geometry(origin=(0, 0, 0), spacing=(1, 1, 1), direction=np.diag([-1.0, -1.0, 1.0]))
    assert flipped.orientation_code() == "RAS"


def test_sheared_and_singular_geometry_refused() -> None:
    shear = np.eye(3)
    shear[0, 2] = 0.3
    with pytest.raises(GeometryError, match="not orthonormal"):
        Geometry(origin=(0, 0, 0), spacing=(1, 1, 1), direction=shear)
    singular = np.eye(4)
    singular[2, 2] = 0.0
    with pytest.raises(GeometryError, match="singular"):
        Geometry.from_affine(singular)
    with pytest.raises(GeometryError, match="positive"):
        Geometry(origin=(0, 0, 0), spacing=(1, 0, 1))
    with pytest.raises(GeometryError, match="finite"):
        Geometry(origin=(0, float("nan"), 0), spacing=(1, 1, 1))


def test_volume_validates_array() -> None:
    g = Geometry(origin=(0, 0, 0), spacing=(1, 1, 1))
    with pytest.raises(PixelDataError, match="3D"):
        CTVolume(np.zeros((4, 4)), g)
    bad = np.zeros((2, 3, 4), np.float32)
    bad[1, 1, 1] = np.nan
    with pytest.raises(PixelDataError, match="1 voxel"):
        CTVolume(bad, g)
    v = CTVolume(np.zeros((2, 3, 4), np.int16), g)
    assert v.shape == (2, 3, 4)
    labels = v.with_array(np.ones((2, 3, 4), np.uint8))
    assert labels.same_grid(v)
    with pytest.raises(PixelDataError, match="does not match"):
        v.with_array(np.ones((2, 3, 5), np.uint8))
