"""The MONAI names medseg uses, imported once without two heavy modules that MONAI's package
``__init__`` pulls in only for features medseg never touches.

``import monai`` imports every MONAI submodule. Two of them import large libraries at module
level for one feature each: ``monai.utils.jupyter_utils`` imports ``matplotlib.pyplot``
(notebook plots of training curves) and ``monai.data.ultrasound_confidence_map`` imports
``scipy.signal`` (the ultrasound confidence-map transform). Both guard the import (a
``try`` / MONAI's ``optional_import``) and simply disable their feature when it fails, so
medseg imports MONAI with the two names marked absent (``None`` in ``sys.modules``, Python's
own "not importable" marker) and removes the markers right after: later imports of
matplotlib.pyplot or scipy.signal, by medseg or by the user's code, work as usual. Measured
with ``python -X importtime -m medseg.cli segment`` on chest-ct-philips-141 (2026-12-07,
2-core AMD EPYC Zen 5): 0.19 s for pyplot and 0.28 s for scipy.signal of a 6.8 s command.
"""

from __future__ import annotations

import sys

#: Modules hidden while MONAI is imported (see the module docstring).
UNUSED_BY_MEDSEG = ("matplotlib.pyplot", "scipy.signal")


def _import_monai() -> None:
    if "monai" in sys.modules:
        return
    hidden = [m for m in UNUSED_BY_MEDSEG if m not in sys.modules]
    for m in hidden:
        sys.modules[m] = None  # type: ignore[assignment]
    try:
        import monai  # noqa: F401
    finally:
        for m in hidden:
            if m in sys.modules and sys.modules[m] is None:
                del sys.modules[m]


_import_monai()

from monai.data import MetaTensor  # noqa: E402
from monai.inferers import SliceInferer  # noqa: E402
from monai.networks.nets import UNet  # noqa: E402
from monai.transforms import (  # noqa: E402
    Compose,
    Invertd,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

__all__ = ["UNUSED_BY_MEDSEG", "Compose", "Invertd", "MetaTensor", "Orientationd",
           "ScaleIntensityRanged", "SliceInferer", "Spacingd", "UNet"]
