"""Read a DICOM series with medseg and with SimpleITK's ImageSeriesReader (GDCM) in one run.

Usage: python benchmarks/load_vs_sitk.py [SERIES_DIR] [--repeats N]
Default SERIES_DIR: ../shared/data/chest-ct-philips-141. Prints the best-of-N seconds for
each reader and the ratio (SimpleITK / medseg: above 1 means medseg is faster), and checks the
two arrays are identical. Both include series discovery (medseg: scan + choose + checks;
SimpleITK: GetGDCMSeriesFileNames) and the read. The first, untimed pass warms the file cache.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import medseg

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest-ct-philips-141"


def read_sitk(path: Path) -> np.ndarray:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
    return sitk.GetArrayFromImage(reader.Execute())


def read_medseg(path: Path) -> np.ndarray:
    return medseg.load(path).array


def best_of(fn, path: Path, repeats: int) -> tuple[float, np.ndarray]:
    times = []
    out = fn(path)
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(path)
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("series_dir", nargs="?", type=Path, default=DEFAULT)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    t_sitk, a_sitk = best_of(read_sitk, args.series_dir, args.repeats)
    t_med, a_med = best_of(read_medseg, args.series_dir, args.repeats)
    same = a_sitk.shape == a_med.shape and np.array_equal(a_sitk, a_med)
    print(f"series: {args.series_dir} {a_med.shape[::-1]} (x,y,z)")
    print(f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''}"
          f" python {platform.python_version()}, SimpleITK {sitk.Version_VersionString()},"
          f" medseg {medseg.__version__}")
    print(f"SimpleITK ImageSeriesReader: {t_sitk:.3f} s (best of {args.repeats})")
    print(f"medseg.load:                 {t_med:.3f} s (best of {args.repeats})")
    print(f"ratio SimpleITK/medseg:      {t_sitk / t_med:.2f}x  arrays identical: {same}")


if __name__ == "__main__":
    main()
