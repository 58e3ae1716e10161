"""What rule 4 of the postprocessing (soft tissue a lung closes around, issue 12) costs:
``postprocess_labels`` with and without it on the same raw labels, same process.

    python benchmarks/postprocess_cost.py [--input PATH] [--runs N]

Default input: ../shared/data/chest-ct-philips-141 (141 x 512 x 512). The shipped model
segments once (raw labels, before postprocessing); then the postprocessing runs ``--runs``
times each way, alternating; prints the CPU, the medians, the minima, and what rule 4 adds
to the mask (mL).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))

from benchmarks.segment_before_after import cpu_name  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", type=Path, default=SHARED / "chest-ct-philips-141")
    ap.add_argument("--runs", type=int, default=6)
    args = ap.parse_args(argv)

    import numpy as np

    import medseg
    from medseg.inference import DEFAULT_MODEL
    from medseg.inference.postprocess import postprocess_labels
    from medseg.inference.unet import InferenceSettings, unet_labels
    from medseg.models import load_model

    image = medseg.load(args.input)
    raw = unet_labels(image, load_model(DEFAULT_MODEL), InferenceSettings())
    times: dict[bool, list[float]] = {False: [], True: []}
    out: dict[bool, np.ndarray] = {}
    for _ in range(args.runs):
        for enclosed in (False, True):
            t0 = time.perf_counter()
            out[enclosed] = postprocess_labels(raw, image.axial_axis(), hu=image.array,
                                               geometry=image.geometry, enclosed=enclosed)
            times[enclosed].append(time.perf_counter() - t0)
    added = np.count_nonzero((out[True] > 0) & (out[False] == 0)) * image.voxel_volume_ml()
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores)")
    print(f"input: {args.input} {image.shape}")
    for enclosed, name in ((False, "rules 1-3"), (True, "with rule 4")):
        t = times[enclosed]
        print(f"postprocessing, {name}: median {statistics.median(t):.3f} s, "
              f"min {min(t):.3f} s over {len(t)} runs")
    print(f"rule 4 adds {statistics.median(times[True]) - statistics.median(times[False]):.3f}"
          f" s (medians) and {added:.1f} mL of lung")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
