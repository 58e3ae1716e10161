"""Is a volume CT in Hounsfield units? A check that needs numpy only, so commands that
do not run the network (``medseg info``, ``segment --method threshold``) start without
importing torch and MONAI (:mod:`medseg.preprocess` re-exports it)."""

from __future__ import annotations

import numpy as np

from medseg.errors import InputError
from medseg.volume import CTVolume

__all__ = ["AIR_HU_RANGE", "MAX_PADDING_FRACTION", "PADDING_WARN_FRACTION", "check_hounsfield"]

#: Plausibility window for "this volume is in HU": outside-body air must be near -1000.
#: The 1st percentile of the voxels, scanner padding left out (see below).
AIR_HU_RANGE = (-1100.0, -850.0)
#: Voxels below ``AIR_HU_RANGE[0]`` are taken for scanner padding outside the reconstruction
#: circle and left out of the percentile when they are at most this fraction of the volume.
#: The loaders already set padding to air (:mod:`medseg.io.padding`); this guards volumes
#: built in Python with padding still in them. Outside a circle inscribed in the square
#: matrix lies 1 - pi/4 = 21.5 % of a slice; more than half the volume below air is not CT.
MAX_PADDING_FRACTION = 0.5
#: ... and from this fraction on a warning says so (a few noisy air voxels are not worth one).
PADDING_WARN_FRACTION = 0.001


def check_hounsfield(volume: CTVolume) -> list[str]:
    """Raise if the volume is clearly not in HU; return warnings for doubtful cases.

    A CT in HU has air around the body near -1000 HU. A volume whose lowest values are far
    from that (e.g. raw stored values 0..4095 with the rescale not applied, or a normalised
    0..1 image) would give an all-background mask; medseg refuses it instead.

    Scanner padding (values below -1100 HU, outside the reconstruction circle) is not what
    the percentile looks at: the loaders set it to air, and for a volume built in Python that
    still holds it, values below ``AIR_HU_RANGE[0]`` are left out when they are at most
    :data:`MAX_PADDING_FRACTION` of the voxels (a warning says so); more is refused.
    """
    arr = volume.array
    flat = arr.reshape(-1)
    step = max(1, flat.size // 2_000_000)
    sample = flat[::step].astype(np.float32)
    lo, hi = AIR_HU_RANGE
    below = sample < lo
    frac_below = float(np.count_nonzero(below)) / sample.size
    warnings: list[str] = []
    if frac_below > MAX_PADDING_FRACTION:
        raise InputError(
            f"does not look like CT in Hounsfield units: {100 * frac_below:.0f} % of voxels "
            f"are below {lo:.0f} (air is near -1000; scanner padding outside the field of "
            f"view is at most {100 * MAX_PADDING_FRACTION:.0f} %)",
            path=volume.metadata.source_path)
    if frac_below > 0:
        sample = sample[~below]
    if frac_below >= PADDING_WARN_FRACTION:
        warnings.append(
            f"{100 * frac_below:.1f} % of voxels are below {lo:.0f} HU (scanner padding?); "
            "left out of the HU check")
    low = float(np.percentile(sample, 1))
    if not lo <= low <= hi:
        raise InputError(
            f"does not look like CT in Hounsfield units: the darkest 1 % of voxels is at "
            f"{low:.0f}, air should be near -1000 (range {lo:.0f}..{hi:.0f}); "
            "was the rescale slope/intercept lost, or the image normalised?",
            path=volume.metadata.source_path)
    return warnings
