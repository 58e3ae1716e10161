"""Validation of a lung model on the held-out part of cip-ct64, end to end.

The whole cip-ct64 study is segmented on its own grid exactly as ``medseg segment`` does;
the metrics are computed on the slices training never saw: the inferior part of the lung
(:func:`medseg.train.validation_cut`, the same cut as in training), on the native grid and
spacing. Cropping both masks to those slices makes a flat face at the cut in both, which
counts in the surface metrics of both alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import NotFoundError
from medseg.evaluate import label_metrics
from medseg.segment import segment
from medseg.train.data import cip_reference, validation_cut

__all__ = ["validate_on_cip"]


def validate_on_cip(shared_data: str | Path, *, method: str = "unet", model: Any = None,
                    val_fraction: float = 0.5, device: str = "cpu") -> dict[str, Any]:
    """Metrics per lung (and both) of ``method`` on cip-ct64's validation slices."""
    root = Path(shared_data)
    ref = cip_reference(root)
    if ref is None:
        raise NotFoundError("cip-ct64 (ct-64Dicom and lm-64.nrrd) not found",
                            path=root / "cip-ct64")
    image, labels = ref
    seg = segment(image, method=method, model=model, device=device)
    # slices in inferior -> superior order by their world z (LPS +z is superior)
    nk = image.shape[0]
    z = image.geometry.index_to_world(np.c_[np.zeros((nk, 2)), np.arange(nk)])[:, 2]
    order = np.argsort(z)
    lung = np.asarray(labels.array.reshape(nk, -1).any(axis=1))[order]
    val = np.sort(order[:validation_cut(lung, val_fraction)])
    if not np.array_equal(np.diff(val), np.ones(len(val) - 1, int)):
        raise AssertionError("validation slices are not contiguous")  # axial study expected
    sl = slice(int(val[0]), int(val[-1]) + 1)
    spacing = image.spacing[::-1]  # (z, y, x) = array axis order
    metrics = label_metrics(seg.labels.array[sl], labels.array[sl], spacing)
    return {
        "data": "cip-ct64 (COPDGene case, 64x64x79, 4.17x4.17x3.99 mm; CIP labels)",
        "validation_slices": [int(val[0]), int(val[-1])],
        "validation_z_mm": [round(float(z[val].min()), 2), round(float(z[val].max()), 2)],
        "method": seg.method,
        "model": seg.model,
        "metrics": metrics,
        "warnings": seg.warnings,
    }
