"""`CTVolume`: the one data type that crosses every stage of medseg.

Conventions (stated once, used everywhere):

* ``array`` is indexed ``[k, j, i]`` = ``(z, y, x)``: slice, row, column, exactly like
  ``SimpleITK.GetArrayFromImage``. ``i`` runs along a DICOM row (the column index),
  ``j`` down the rows, ``k`` across slices.
* World coordinates are **LPS** millimetres (+x patient Left, +y Posterior, +z Superior),
  the convention of DICOM and ITK. Conversion to RAS (NIfTI, nibabel) is explicit:
  :attr:`Geometry.affine_ras`.
* ``origin`` is the world position of the *centre* of voxel ``(i, j, k) = (0, 0, 0)``.
* ``spacing`` is ``(sx, sy, sz)`` in index order ``(i, j, k)``, millimetres.
* ``direction`` is a 3x3 orthonormal matrix whose **columns** are the world unit vectors
  of the index axes ``i``, ``j``, ``k`` (ITK's convention).

The world position of voxel ``(i, j, k)`` is ``origin + direction @ (spacing * (i, j, k))``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from medseg.errors import GeometryError, PixelDataError

__all__ = ["LPS_TO_RAS", "CTVolume", "Geometry", "VolumeMetadata", "canonical_order",
           "canonical_view", "from_canonical", "to_canonical"]

#: Flips x and y: LPS <-> RAS (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Largest deviation from orthonormality accepted in a direction matrix (ITK uses 1e-6
#: for its own check; DICOM orientation cosines are often written with 6 decimals).
ORTHONORMAL_TOLERANCE = 1e-4


def _as_vec3(value: Any, name: str) -> tuple[float, float, float]:
    arr = np.asarray(value, dtype=float).reshape(-1)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise GeometryError(f"{name} must be 3 finite numbers, got {value!r}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


@dataclass(frozen=True)
class Geometry:
    """World geometry of a 3D grid (see the module docstring for conventions)."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: npt.NDArray[np.float64] = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        object.__setattr__(self, "origin", _as_vec3(self.origin, "origin"))
        spacing = _as_vec3(self.spacing, "spacing")
        if min(spacing) <= 0:
            raise GeometryError(f"spacing must be positive, got {spacing}")
        object.__setattr__(self, "spacing", spacing)
        direction = np.array(self.direction, dtype=float).reshape(3, 3)
        if not np.all(np.isfinite(direction)):
            raise GeometryError("direction cosines contain NaN or infinity")
        gram = direction.T @ direction
        if not np.allclose(gram, np.eye(3), atol=ORTHONORMAL_TOLERANCE):
            raise GeometryError(
                "direction cosines are not orthonormal (sheared or singular grid): "
                f"{np.round(direction, 6).tolist()}"
            )
        direction.setflags(write=False)
        object.__setattr__(self, "direction", direction)

    # -- affines -------------------------------------------------------------------------
    @property
    def affine(self) -> npt.NDArray[np.float64]:
        """4x4 matrix mapping ``(i, j, k, 1)`` to LPS millimetres."""
        aff = np.eye(4)
        aff[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        aff[:3, 3] = self.origin
        return aff

    @property
    def affine_ras(self) -> npt.NDArray[np.float64]:
        """4x4 matrix mapping ``(i, j, k, 1)`` to RAS millimetres (NIfTI/nibabel)."""
        return LPS_TO_RAS @ self.affine

    @classmethod
    def from_affine(cls, affine: npt.ArrayLike, *, ras: bool = False) -> Geometry:
        """Build from a 4x4 affine mapping ``(i, j, k)`` to LPS (or RAS if ``ras``)."""
        aff = np.asarray(affine, dtype=float)
        if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
            raise GeometryError(f"affine must be a finite 4x4 matrix, got shape {aff.shape}")
        if ras:
            aff = LPS_TO_RAS @ aff
        lin = aff[:3, :3]
        spacing = np.linalg.norm(lin, axis=0)
        if np.any(spacing <= 1e-12) or abs(np.linalg.det(lin)) <= 1e-12:
            raise GeometryError(f"affine is singular: {np.round(aff, 6).tolist()}")
        return cls(
            origin=_as_vec3(aff[:3, 3], "origin"),
            spacing=_as_vec3(spacing, "spacing"),
            direction=lin / spacing[None, :],
        )

    # -- coordinates ---------------------------------------------------------------------
    def index_to_world(self, ijk: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """World LPS positions of (N, 3) continuous indices in ``(i, j, k)`` order."""
        pts = np.atleast_2d(np.asarray(ijk, dtype=float))
        return pts @ (self.direction * np.asarray(self.spacing)[None, :]).T + np.asarray(
            self.origin
        )

    def world_to_index(self, xyz: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Continuous ``(i, j, k)`` indices of (N, 3) world LPS positions."""
        pts = np.atleast_2d(np.asarray(xyz, dtype=float)) - np.asarray(self.origin)
        return (pts @ self.direction) / np.asarray(self.spacing)[None, :]

    def orientation_code(self) -> str:
        """Three letters naming the world direction each index axis ``i, j, k`` points to
        (LPS letters: ``L``/``R``, ``P``/``A``, ``S``/``I``), e.g. ``"LPS"`` for a
        standard axial DICOM series, ``"RAS"`` for a typical NIfTI."""
        letters = (("L", "R"), ("P", "A"), ("S", "I"))
        code = ""
        for axis in range(3):
            col = self.direction[:, axis]
            w = int(np.argmax(np.abs(col)))
            code += letters[w][0] if col[w] > 0 else letters[w][1]
        return code

    def is_close(self, other: Geometry, *, atol_mm: float = 1e-3, atol_dir: float = 1e-5) -> bool:
        """Same origin (within ``atol_mm``), spacing and direction (within ``atol_dir``)."""
        return bool(
            np.allclose(self.origin, other.origin, atol=atol_mm)
            and np.allclose(self.spacing, other.spacing, atol=atol_mm)
            and np.allclose(self.direction, other.direction, atol=atol_dir)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "origin_lps_mm": [round(v, 6) for v in self.origin],
            "spacing_mm": [round(v, 6) for v in self.spacing],
            "direction": [[round(float(v), 8) for v in row] for row in self.direction],
            "orientation": self.orientation_code(),
        }


@dataclass
class VolumeMetadata:
    """What is known about where a volume came from. Fields are ``None`` when unknown."""

    modality: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None
    sop_class_uid: str | None = None
    #: SOPInstanceUID of each slice, in array order ``k`` (DICOM sources only).
    sop_instance_uids: tuple[str, ...] = ()
    series_description: str | None = None
    series_number: int | None = None
    manufacturer: str | None = None
    manufacturer_model: str | None = None
    convolution_kernel: str | None = None
    slice_thickness_mm: float | None = None
    body_part: str | None = None
    #: ContrastBolusAgent (0018,0010) when the header names one (None: not stated).
    contrast_agent: str | None = None
    study_date: str | None = None
    #: Identifying data: never printed in reports unless asked for.
    patient_id: str | None = None
    patient_name: str | None = None
    #: ``"dicom"``, ``"nifti"``, ``"nrrd"``, ``"mha"``, ``"synthetic"``...
    source_format: str | None = None
    source_path: str | None = None
    #: Files each slice came from, in array order ``k`` (DICOM sources only).
    source_files: tuple[str, ...] = ()
    #: What the loader changed to give a regular grid (tilt correction, resampling...).
    corrections: list[str] = field(default_factory=list)
    #: Things a user should know that did not stop loading.
    warnings: list[str] = field(default_factory=list)
    #: The DICOM header (pydicom Dataset, pixel data not read) of each source file, by path,
    #: as the loader read them (DICOM sources only; in memory, never written out): the DICOM
    #: SEG writer reuses them instead of reading every file again.
    source_headers: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def copy(self) -> VolumeMetadata:
        return dataclasses.replace(
            self, corrections=list(self.corrections), warnings=list(self.warnings)
        )

    def summary(self, *, show_phi: bool = False) -> dict[str, Any]:
        """A JSON-ready dict; patient name and ID only with ``show_phi``."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name != "source_headers"}
        out.pop("sop_instance_uids")
        out.pop("source_files")
        out["n_source_files"] = len(set(self.source_files))
        if not show_phi:
            out.pop("patient_id")
            out.pop("patient_name")
        return out


@dataclass
class CTVolume:
    """A 3D image (HU for CT, integer labels for masks) with its world geometry.

    ``array`` is ``(z, y, x)``; ``geometry`` places it in LPS millimetres; see
    :mod:`medseg.volume` for the conventions.
    """

    array: npt.NDArray[Any]
    geometry: Geometry
    metadata: VolumeMetadata = field(default_factory=VolumeMetadata)

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        if arr.ndim != 3:
            raise PixelDataError(f"a volume needs a 3D array, got shape {arr.shape}")
        if min(arr.shape) < 1:
            raise PixelDataError(f"a volume cannot be empty, got shape {arr.shape}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise PixelDataError(f"{n_bad} voxel(s) are NaN or infinite")
        if arr.dtype.kind not in "biuf":
            raise PixelDataError(f"unsupported voxel type {arr.dtype}")
        self.array = arr

    # -- convenience ---------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """``(z, y, x)`` = ``(nk, nj, ni)``."""
        s = self.array.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing

    @property
    def origin(self) -> tuple[float, float, float]:
        return self.geometry.origin

    @property
    def direction(self) -> npt.NDArray[np.float64]:
        return self.geometry.direction

    @property
    def affine(self) -> npt.NDArray[np.float64]:
        return self.geometry.affine

    def axial_axis(self) -> int:
        """The array axis (0, 1 or 2 of ``(z, y, x)``) whose index direction is closest to
        the patient's superior-inferior axis: the axis across axial slices."""
        return 2 - int(np.argmax(np.abs(self.direction[2, :])))

    def voxel_volume_ml(self) -> float:
        sx, sy, sz = self.geometry.spacing
        return sx * sy * sz / 1000.0

    def with_array(self, array: npt.NDArray[Any]) -> CTVolume:
        """A volume on the same grid with other voxels (e.g. a label map)."""
        arr = np.asarray(array)
        if arr.shape != self.array.shape:
            raise PixelDataError(
                f"array shape {arr.shape} does not match the grid {self.array.shape}"
            )
        return CTVolume(arr, self.geometry, self.metadata.copy())

    def same_grid(self, other: CTVolume, *, atol_mm: float = 1e-3) -> bool:
        """Same shape and the same world geometry (the test for "on the input's grid")."""
        return self.shape == other.shape and self.geometry.is_close(
            other.geometry, atol_mm=atol_mm
        )

    def grid_difference(self, other: CTVolume) -> str:
        """How two grids differ, in words ("" when :meth:`same_grid`)."""
        parts = []
        if self.shape != other.shape:
            parts.append(f"shape (z,y,x) {self.shape} vs {other.shape}")
        a, b = self.geometry, other.geometry
        if not np.allclose(a.spacing, b.spacing, atol=1e-4):
            parts.append("spacing " + "x".join(f"{v:.4g}" for v in a.spacing) + " vs "
                         + "x".join(f"{v:.4g}" for v in b.spacing) + " mm")
        d = float(np.linalg.norm(np.subtract(a.origin, b.origin)))
        if d > 1e-3:
            parts.append(f"origin {d:.3g} mm apart")
        if not np.allclose(a.direction, b.direction, atol=1e-5):
            parts.append(f"orientation {a.orientation_code()} vs {b.orientation_code()} "
                         f"(direction cosines differ by up to "
                         f"{float(np.abs(a.direction - b.direction).max()):.3g})")
        return "; ".join(parts)

    def world_bounds(self) -> npt.NDArray[np.float64]:
        """(2, 3) min and max LPS corners of the voxel centres."""
        nk, nj, ni = self.shape
        corners = np.array(
            [[i, j, k] for i in (0, ni - 1) for j in (0, nj - 1) for k in (0, nk - 1)], float
        )
        pts = self.geometry.index_to_world(corners)
        return np.stack([pts.min(axis=0), pts.max(axis=0)])

    def summary(self) -> dict[str, Any]:
        arr = self.array
        return {
            "shape_zyx": list(self.shape),
            "dtype": str(arr.dtype),
            **self.geometry.to_dict(),
            "min": float(arr.min()),
            "max": float(arr.max()),
        }


# -- the canonical (S, P, L) array frame ---------------------------------------------------
def canonical_order(direction: npt.NDArray[np.float64]
                    ) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Array-axis permutation and flips taking a (z, y, x) array on a grid with this
    ``direction`` (columns: world vectors of i, j, k) to canonical (S, P, L) order: array
    axes towards world Superior, Posterior, Left (LPS), the radiological frame; axis-aligned
    grids only (nearest axis for oblique ones). ``np.flip(np.transpose(a, perm), [axes
    where flips])`` is a view: writing to it writes to ``a``."""
    d = direction
    # array axes are (k, j, i) = index axes (2, 1, 0)
    world_of_array_axis = []
    sign = []
    for index_axis in (2, 1, 0):
        w = int(np.argmax(np.abs(d[:, index_axis])))
        world_of_array_axis.append(w)
        sign.append(float(d[w, index_axis]) > 0)
    # canonical array order: world z, y, x
    perm = tuple(world_of_array_axis.index(w) for w in (2, 1, 0))
    flips = tuple(not sign[p] for p in perm)
    return (int(perm[0]), int(perm[1]), int(perm[2])), (flips[0], flips[1], flips[2])


def canonical_view(geometry: Geometry
                   ) -> tuple[Callable[[npt.NDArray[Any]], npt.NDArray[Any]],
                              tuple[float, float, float]]:
    """A function giving any (z, y, x) array on ``geometry``'s grid in canonical (S, P, L)
    order as a *view* (writing to it writes to the array), and the voxel spacing (mm) along
    those three axes."""
    order, flipped = canonical_order(geometry.direction)
    flips = tuple(i for i, f in enumerate(flipped) if f)
    spacing_zyx = geometry.spacing[::-1]
    sp = (float(spacing_zyx[order[0]]), float(spacing_zyx[order[1]]),
          float(spacing_zyx[order[2]]))

    def view(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.flip(np.transpose(a, order), flips) if flips else np.transpose(a, order)

    return view, sp


def _canonical_ops(volume: CTVolume) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """:func:`canonical_order` of ``volume``'s grid."""
    return canonical_order(volume.direction)


def to_canonical(volume: CTVolume, array: npt.NDArray[Any] | None = None
                 ) -> tuple[npt.NDArray[Any], tuple[float, float, float]]:
    """``array`` (default ``volume.array``) in canonical (S, P, L) order, and its spacing."""
    view, sp = canonical_view(volume.geometry)
    return np.ascontiguousarray(view(volume.array if array is None else array)), sp


def from_canonical(volume: CTVolume, canonical: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The inverse of :func:`to_canonical`: back to ``volume``'s own array order."""
    perm, flips = _canonical_ops(volume)
    out = canonical
    for ax, f in enumerate(flips):
        if f:
            out = np.flip(out, ax)
    return np.ascontiguousarray(np.transpose(out, np.argsort(perm)))
