"""What the quality check adds to a study: ``medseg.qc.quality_check`` against the rest of
``medseg.segment.segment`` on the same input, same process.

    python benchmarks/qc_cost.py [--input PATH] [--runs N]

Default input: ../shared/data/chest-ct-philips-141 (141 x 512 x 512). Segments once with
the shipped model (QC off, warm after a first call), then times the QC ``--runs`` times on
that mask; prints the CPU, both medians and the ratio. The issue's target: <= 0.5 s per
141-slice study.
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
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)

    import medseg
    from medseg.inference import DEFAULT_MODEL
    from medseg.models import load_model
    from medseg.qc import quality_check
    from medseg.segment import segment

    image = medseg.load(args.input)
    model = load_model(DEFAULT_MODEL)
    segment(image, model=model, qc=False)  # warm-up: first-call costs out of the timing
    seg_times, qc_times = [], []
    labels = None
    for _ in range(args.runs):
        t0 = time.perf_counter()
        labels = segment(image, model=model, qc=False).labels
        seg_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = quality_check(image, labels)
        qc_times.append(time.perf_counter() - t0)
    seg, qc = statistics.median(seg_times), statistics.median(qc_times)
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores)")
    print(f"input: {args.input} {image.shape}; verdict {result.verdict}")
    print(f"segment (no QC): median {seg:.2f} s over {args.runs} runs")
    print(f"quality_check:   median {qc:.3f} s (min {min(qc_times):.3f}, max "
          f"{max(qc_times):.3f}); {100 * qc / seg:.1f} % of segment")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
