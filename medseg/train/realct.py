"""Real, unlabelled chest CT from ``../shared/data`` with lung labels derived and verified.

How the labels are made (written down here and in the model card):

1. the previous shipped model (``lung2d-v1``) segments the study with medseg's own
   preprocessing and postprocessing (U);
2. the classical threshold baseline segments it too (T; :mod:`medseg.inference.threshold`);
3. the label is U, and the voxels where the two disagree (lung vs not, or right vs left),
   grown by one voxel in plane, are marked *ignore* (:data:`IGNORE`): no gradient is taken
   there. So are dense voxels (> -500 HU) that a lung's in-slice closing (radius
   :data:`ENCLOSED_RADIUS_MM`) encloses but the label leaves out: a real tumour or
   consolidation that v1 may have dropped from the lung is never taught as background.

Both methods agree on about 98 % of the lung voxels of these studies (Dice U vs T: philips
0.977, LungFCP 0.987, RIDER left 0.991; RIDER's right lung 0.81 where its tumour and collapse
are, all of which is ignored). The overlays were inspected (coronal and axial) before use;
``medseg train`` writes them to its output folder (``labels-<name>.png``) so a person can look
again.

Real CT in ``real-ct/`` ships as ``.tar.xz`` of its DICOM: it is extracted once into a cache
folder (atomically: a temporary folder renamed into place).
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from medseg.errors import NotFoundError
from medseg.inference import LABEL_MODEL
from medseg.volume import CTVolume

__all__ = ["ENCLOSED_RADIUS_MM", "IGNORE", "REAL_SOURCES", "derive_lung_labels",
           "load_real_ct", "real_ct_path"]

#: Label value for voxels the loss ignores.
IGNORE = 255
#: In-slice closing radius (mm) that finds dense tissue enclosed by a lung.
ENCLOSED_RADIUS_MM = 12.0
#: Dense: above fat/partial-volume lung; tumour, consolidation, fluid, vessels.
DENSE_HU = -500.0

#: Real studies by short name: path under the shared data folder, and a one-line description.
REAL_SOURCES: dict[str, tuple[str, str]] = {
    "philips-141": ("chest-ct-philips-141",
                    "Philips Brilliance Big Bore chest CT, 141 x 2 mm, a lung lesion"),
    "lidc-idri-0001": ("real-ct/lidc-idri-0001",
                       "LIDC-IDRI-0001, GE contrast chest CT, whole lungs, 133 x 2.5 mm, "
                       "-2048 padding, nodules"),
    "lungfcp-01-0001": ("real-ct/lungfcp-01-0001",
                        "LungFCP-01-0001, Siemens B31f, 98 x 1 mm upper-chest slab, NSCLC"),
    "rider-pilot-0117": ("real-ct/rider-pilot-0117",
                         "RIDER Pilot 0117, GE contrast, 95 x 0.8 mm mid-chest slab, NSCLC, "
                         "-3024 padding"),
}


def real_ct_path(shared_data: str | Path, name: str, cache_dir: str | Path) -> Path:
    """Folder (or file) holding the study's DICOM; ``.tar.xz`` archives are extracted once
    into ``cache_dir/<name>``."""
    if name not in REAL_SOURCES:
        raise NotFoundError(f"unknown real study {name!r}; known: {', '.join(REAL_SOURCES)}")
    src = Path(shared_data) / REAL_SOURCES[name][0]
    if not src.exists():
        raise NotFoundError("real study not found", path=src)
    archives = sorted(p for p in src.glob("*.tar.xz") if "seg" not in p.name)
    if not archives:
        return src
    target = Path(cache_dir) / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    for arch in archives:
        with tarfile.open(arch, "r:xz") as tf:
            tf.extractall(tmp, filter="data")
    os.replace(tmp, target)
    return target


def load_real_ct(shared_data: str | Path, name: str, cache_dir: str | Path) -> CTVolume:
    from medseg.io import load

    # scanner padding (LIDC -2048, RIDER -3024) is set to air by the loader itself
    return load(real_ct_path(shared_data, name, cache_dir))


def _in_plane_disk(radius_vox: tuple[float, float]) -> npt.NDArray[np.bool_]:
    ry, rx = (max(1, round(r)) for r in radius_vox)
    y, x = np.ogrid[-ry:ry + 1, -rx:rx + 1]
    disk = (y / max(ry, 1e-6)) ** 2 + (x / max(rx, 1e-6)) ** 2 <= 1.0
    return disk[None]


def derive_lung_labels(volume: CTVolume, model: Any = LABEL_MODEL
                       ) -> tuple[npt.NDArray[np.uint8], dict[str, float]]:
    """Derived labels on ``volume``'s grid (0, 1, 2 and :data:`IGNORE`) and agreement
    figures. Works for axial studies (array axis 0 across slices)."""
    from medseg.evaluate import label_metrics
    from medseg.inference.postprocess import bounding_box, postprocess_labels
    from medseg.inference.threshold import threshold_labels
    from medseg.inference.unet import InferenceSettings, unet_labels
    from medseg.models import load_model

    loaded = load_model(model) if isinstance(model, (str, Path)) else model
    # fp32 whatever the CPU: derived labels (training, the suite's reference) are the
    # same on every machine
    u = postprocess_labels(unet_labels(volume, loaded, InferenceSettings(precision="fp32")),
                           volume.axial_axis())
    t = threshold_labels(volume)
    agree = label_metrics(u, t, volume.spacing[::-1])
    disagree = (u > 0) != (t > 0)
    disagree |= (u > 0) & (t > 0) & (u != t)
    plane = np.zeros((3, 3, 3), bool)
    plane[1] = ndimage.generate_binary_structure(2, 1)
    ignore = ndimage.binary_dilation(disagree, plane)
    sy, sx = volume.spacing[1], volume.spacing[0]
    disk = _in_plane_disk((ENCLOSED_RADIUS_MM / sy, ENCLOSED_RADIUS_MM / sx))
    dense = volume.array > DENSE_HU
    for lab in (1, 2):
        lung = u == lab
        if not lung.any():
            continue
        box = bounding_box(lung, margin=disk.shape[1])
        assert box is not None
        closed = ndimage.binary_closing(lung[box], disk)
        ignore[box] |= closed & ~lung[box] & dense[box]
    out = u.copy()
    out[ignore] = IGNORE
    stats = {"dice_unet_vs_threshold_right": round(agree["right"]["dice"], 4),
             "dice_unet_vs_threshold_left": round(agree["left"]["dice"], 4),
             "ignored_fraction_of_lung": round(float(ignore.sum()) / max(1, int((u > 0).sum())),
                                               4)}
    return out, stats
