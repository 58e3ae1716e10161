"""What the allocator thresholds of ``medseg._alloc`` buy: ``segment_study`` on one study in
two fresh child processes, glibc defaults versus ``medseg._alloc.tune()``, same run.

Usage:
    python benchmarks/allocator.py [--input DIR_OR_FILE] [--repeats 3]

Each child imports medseg, loads the model, segments once to warm up, then times
``--repeats`` runs of the whole ``medseg segment`` job (read, segment, mask, report, DICOM SEG
and SR) and reports the best and median seconds, the minor page faults per run and the peak
resident set size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))

CHILD = r"""
import json, resource, statistics, sys, tempfile, time
tune, src, repeats = sys.argv[1] == "1", sys.argv[2], int(sys.argv[3])
if tune:
    from medseg import _alloc
    assert _alloc.tune(), "mallopt refused"
import medseg.inference.unet, medseg.report.study
from medseg.models import load_model
from medseg.segment import segment_study
model = load_model()
with tempfile.TemporaryDirectory() as tmp:
    segment_study(src, tmp + "/o", model=model)
    times, faults = [], []
    for _ in range(repeats):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        segment_study(src, tmp + "/o", model=model)
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
print(json.dumps({"best": min(times), "median": statistics.median(times),
                  "faults": statistics.median(faults), "peak_gib": peak}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=SHARED / "chest-ct-philips-141")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; input {args.input.name}")
    res = {}
    for tune in (False, True):
        out = subprocess.run([sys.executable, "-c", CHILD, "1" if tune else "0",
                              str(args.input), str(args.repeats)],
                             check=True, capture_output=True, text=True).stdout
        res[tune] = r = json.loads(out.strip().splitlines()[-1])
        name = "medseg._alloc.tune()" if tune else "glibc defaults     "
        print(f"{name}: best {r['best']:.2f} s, median {r['median']:.2f} s, "
              f"{r['faults'] / 1000:.0f} k minor page faults per run, "
              f"peak RSS {r['peak_gib']:.2f} GiB", flush=True)
    print(f"ratio (median): {res[False]['median'] / res[True]['median']:.2f}x")


if __name__ == "__main__":
    main()
