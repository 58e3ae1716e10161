"""What rule 4 (soft tissue a lung closes around), rule 5 (lung cut by the image's
border) or rule 2's skin test (air against the skin, ``--rule skin``) of the postprocessing
costs (issue 12): ``postprocess_labels`` with and without the rule on the same raw labels,
same process.

    python benchmarks/postprocess_cost.py [--input PATH | --real-ct NAME]
                                          [--rule 4|5|skin] [--runs N]

Default input: ../shared/data/chest-ct-philips-141 (141 x 512 x 512); ``--real-ct
rider-pilot-0117`` (a study of ``../shared/data/real-ct``, extracted once into
out/real-ct-cache) is one whose image border cuts a lung. The shipped model segments once
(raw labels, before postprocessing); then the postprocessing runs ``--runs`` times each
way, alternating; prints the CPU, the medians, the minima, and what the rule adds to the
mask (mL).
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
    ap.add_argument("--real-ct", default=None, help="a study of real-ct/ by name")
    ap.add_argument("--rule", choices=("4", "5", "skin"), default="4")
    ap.add_argument("--runs", type=int, default=6)
    args = ap.parse_args(argv)
    if args.real_ct:
        from medseg.train.realct import real_ct_path

        args.input = real_ct_path(SHARED, args.real_ct, ROOT / "out" / "real-ct-cache")
    flag = {"4": "enclosed", "5": "image_edge", "skin": "at_skin"}[args.rule]

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
        for on in (False, True):
            t0 = time.perf_counter()
            out[on] = postprocess_labels(raw, image.axial_axis(), hu=image.array,
                                         geometry=image.geometry, **{flag: on})
            times[on].append(time.perf_counter() - t0)
    vml = image.voxel_volume_ml()
    added = np.count_nonzero((out[True] > 0) & (out[False] == 0)) * vml
    removed = np.count_nonzero((out[True] == 0) & (out[False] > 0)) * vml
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores)")
    print(f"input: {args.input} {image.shape}")
    for on, name in ((False, f"without rule {args.rule}"), (True, f"with rule {args.rule}")):
        t = times[on]
        print(f"postprocessing, {name}: median {statistics.median(t):.3f} s, "
              f"min {min(t):.3f} s over {len(t)} runs")
    print(f"rule {args.rule} costs "
          f"{statistics.median(times[True]) - statistics.median(times[False]):.3f}"
          f" s (medians); adds {added:.1f} mL of lung, removes {removed:.1f} mL")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
