"""Test helpers: the same volume written with another index order / orientation, and
label maps compared in world space."""

from __future__ import annotations

import numpy as np

from medseg.volume import CTVolume, Geometry


def reindex(vol: CTVolume, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]
            ) -> CTVolume:
    """The same voxels in world space under another index order: index axis ``n`` of the
    result is axis ``perm[n]`` of ``vol`` (in (i, j, k) terms), reversed where ``flips[n]``."""
    shape_ijk = np.array(vol.shape[::-1])
    arr_ijk = vol.array.transpose(2, 1, 0)  # (i, j, k)
    arr = arr_ijk.transpose(perm)
    for n, f in enumerate(flips):
        if f:
            arr = np.flip(arr, axis=n)
    # affine: new index -> old index -> world
    m = np.zeros((4, 4))
    m[3, 3] = 1
    for n, (axis, f) in enumerate(zip(perm, flips, strict=True)):
        m[axis, n] = -1.0 if f else 1.0
        if f:
            m[axis, 3] = shape_ijk[axis] - 1
    affine = vol.affine @ m
    geometry = Geometry.from_affine(affine)
    return CTVolume(np.ascontiguousarray(arr.transpose(2, 1, 0)), geometry, vol.metadata.copy())


def labels_on_grid(src: CTVolume, target: CTVolume) -> np.ndarray:
    """Nearest-neighbour resampling of ``src``'s labels onto ``target``'s grid, by world
    position (exact for grids that differ by axis permutations and flips)."""
    nk, nj, ni = target.shape
    kk, jj, ii = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    world = target.geometry.index_to_world(np.c_[ii.ravel(), jj.ravel(), kk.ravel()])
    idx = np.rint(src.geometry.world_to_index(world)).astype(int)
    out = np.zeros(target.shape, src.array.dtype).reshape(-1)
    shape_ijk = np.array(src.shape[::-1])
    ok = np.all((idx >= 0) & (idx < shape_ijk), axis=1)
    out[ok] = src.array[idx[ok, 2], idx[ok, 1], idx[ok, 0]]
    return out.reshape(target.shape)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum() + b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s
