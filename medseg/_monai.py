"""The MONAI names medseg uses, imported once without two heavy modules that MONAI's package
``__init__`` pulls in only for features medseg never touches.

``import monai`` imports every MONAI submodule. Some of them import large libraries at module
level for one feature each: ``monai.utils.jupyter_utils`` imports ``matplotlib.pyplot``
(notebook plots of training curves), ``monai.visualize.utils`` the ``matplotlib`` package
(to reach pyplot, for ``matshow3d``) and ``monai.data.ultrasound_confidence_map``
``scipy.signal`` (the ultrasound confidence-map transform). Each guards the import (a
``try`` / MONAI's ``optional_import``) and simply disables its feature when it fails (every
MONAI use of matplotlib goes through pyplot), so medseg imports MONAI with these names
marked absent (``None`` in ``sys.modules``, Python's own "not importable" marker) and
removes the markers right after: later imports of matplotlib, matplotlib.pyplot or
scipy.signal, by medseg (the cohort report, training curves) or by the user's code, work as
usual. Measured with ``python -X importtime -m medseg.cli segment`` on chest-ct-philips-141
(2026-12-07, 2-core AMD EPYC Zen 5): 0.19 s for pyplot and 0.28 s for scipy.signal of a 6.8
s command; the matplotlib package itself (its colour maps) 0.22 s more (2-core Intel Xeon,
2026-12-07, night).
"""

from __future__ import annotations

import sys

#: Modules hidden while MONAI is imported (see the module docstring).
UNUSED_BY_MEDSEG = ("matplotlib", "matplotlib.pyplot", "scipy.signal")


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
