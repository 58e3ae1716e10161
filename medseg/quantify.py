"""Lung measurements from a CT and its lung labels: volumes and densitometry.

Per lung (right = label 1, left = label 2) and for both together ("lung"):

* ``volume_ml``: voxel count x voxel volume (from the spacing), in mL.
* ``mld_hu``: mean lung density, the mean HU inside the mask.
* ``laa950_pct``: low-attenuation area, % of lung voxels below -950 HU: the emphysema index
  validated against pathology by Gevenois et al. (AJRCCM 1996) and used by COPDGene.
* ``pd15_hu``: the 15th percentile of the lung HU distribution (Dirksen et al., the
  density measure of the RINDSCT and EXACTLE trials).
* ``histogram``: counts of lung HU in 10 HU bins from -1100 to +200 HU (values outside
  are counted in the first / last bin).

Densitometry is comparable between scans only under like acquisition: thin slices, a soft
or standard reconstruction kernel, no intravenous contrast, full inspiration (QIBA Lung
Density Profile; COPDGene protocol). Warnings say when the header shows otherwise or does
not say. Volumes are unaffected by these but are by the field of view: a lung cut by the
first or last slice gets a warning, never a silent underestimate.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import numpy.typing as npt

from medseg.conventions import LAA_THRESHOLD_HU, PD_PERCENTILE
from medseg.errors import InputError
from medseg.inference.postprocess import bounding_box
from medseg.volume import CTVolume

__all__ = ["HIST_EDGES", "LAA_THRESHOLD_HU", "PD_PERCENTILE", "quantify"]

#: Histogram bin edges (HU).
HIST_EDGES = np.arange(-1100.0, 201.0, 10.0)
#: Slice thickness above which LAA-950 and PD15 shift (partial volume smooths the noise
#: that puts voxels below -950 HU): COPDGene and QIBA reconstruct at about 1 mm or less.
MAX_THICKNESS_MM = 1.5

_LABELS = {"right": (1,), "left": (2,), "lung": (1, 2)}

# Sharp ("lung", "bone", high-frequency) reconstruction kernels by vendor naming.
_SHARP_NAMES = {"LUNG", "BONE", "BONEPLUS", "EDGE", "SHARP", "DETAIL",  # GE
                "D", "E", "L", "YA", "YB", "YC", "YD", "YE"}                # Philips
#: Siemens B/Br/Bl/I/Q kernels carry their strength: 50 and above is sharp (B60f, Br64).
_SIEMENS = re.compile(r"^(?:BR|BL|QR|B|I|Q)(\d{2})", re.IGNORECASE)
#: Canon/Toshiba: FC50-FC89 are the lung and high-resolution kernels.
_CANON = re.compile(r"^FC([5-8]\d)$", re.IGNORECASE)


def _kernel_is_sharp(kernel: str) -> bool:
    """True for a kernel known to be sharp (see the tables above); unknown names: False."""
    for part in kernel.upper().split("\\"):
        name = part.strip()
        m = _SIEMENS.match(name)
        if name in _SHARP_NAMES or "SHARP" in name or _CANON.match(name) \
                or (m is not None and int(m.group(1)) >= 50):
            return True
    return False


def acquisition_warnings(image: CTVolume) -> list[str]:
    """Why densitometry from this scan may not be comparable (from its header)."""
    md = image.metadata
    out = []
    if md.convolution_kernel is None:
        out.append("reconstruction kernel not recorded: densitometry (LAA-950, PD15) "
                   "cannot be checked for a sharp kernel, which raises LAA-950")
    elif _kernel_is_sharp(md.convolution_kernel):
        out.append(f"sharp reconstruction kernel {md.convolution_kernel!r}: noise inflates "
                   "LAA-950 and lowers PD15; compare only with scans of the same kernel")
    thickness = md.slice_thickness_mm or (image.spacing[2] if md.source_format != "dicom"
                                          else None)
    if thickness is None:
        out.append("slice thickness not recorded")
    elif thickness > MAX_THICKNESS_MM:
        out.append(f"slice thickness {thickness:.2f} mm > {MAX_THICKNESS_MM} mm: partial "
                   "volume lowers LAA-950 and raises PD15 relative to thin-slice protocols")
    if md.contrast_agent:
        out.append(f"contrast agent {md.contrast_agent!r} in the header: contrast raises "
                   "lung density (MLD, PD15)")
    return out


def _lung_stats(hu: npt.NDArray[Any], voxel_ml: float) -> dict[str, Any]:
    n = int(hu.size)
    if n == 0:
        return {"volume_ml": 0.0, "n_voxels": 0, "mld_hu": None, "laa950_pct": None,
                "pd15_hu": None}
    return {
        "volume_ml": round(n * voxel_ml, 2),
        "n_voxels": n,
        "mld_hu": round(float(hu.mean(dtype=np.float64)), 2),
        "laa950_pct": round(100.0 * np.count_nonzero(hu < LAA_THRESHOLD_HU) / n, 3),
        "pd15_hu": round(float(np.percentile(hu, PD_PERCENTILE)), 2),
    }


def quantify(image: CTVolume, labels: CTVolume) -> dict[str, Any]:
    """Volumes and densitometry of each lung; ``labels`` must be on ``image``'s grid."""
    if not labels.same_grid(image, atol_mm=1e-3):
        raise InputError("the labels are not on the CT's grid (shape or world geometry "
                         f"differs: {labels.shape} vs {image.shape})",
                         path=labels.metadata.source_path)
    voxel_ml = image.voxel_volume_ml()
    per_label: dict[str, Any] = {}
    hist: dict[str, list[int]] = {}
    # the lungs' bounding box holds every lung voxel: a third of the volume or less
    box = bounding_box(labels.array > 0, margin=0) or (slice(0, 0),) * 3
    lab = labels.array[box]
    hu = image.array[box]
    for name, values in _LABELS.items():
        mask = lab == values[0]
        for v in values[1:]:
            mask |= lab == v
        vals = hu[mask]
        per_label[name] = _lung_stats(vals, voxel_ml)
        inner = np.clip(vals, HIST_EDGES[0], HIST_EDGES[-1] - 1e-3)
        hist[name] = np.histogram(inner, bins=HIST_EDGES)[0].astype(int).tolist()
    warnings = acquisition_warnings(image) if per_label["lung"]["n_voxels"] else []
    lung = labels.array > 0
    for end, where in ((0, "first"), (-1, "last")):
        if lung[end].any():
            warnings.append(f"lung touches the {where} slice: it may extend beyond the field "
                            "of view, so its volume may be underestimated")
    return {
        "labels": {"right": 1, "left": 2, "lung": [1, 2]},
        "measurements": per_label,
        "histogram": {"bin_edges_hu": HIST_EDGES.tolist(), "counts": hist},
        "definitions": {"laa_threshold_hu": LAA_THRESHOLD_HU,
                        "pd_percentile": PD_PERCENTILE},
        "warnings": warnings,
    }
