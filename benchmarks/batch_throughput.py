"""Cohort throughput: ``medseg batch`` with 1 and 2 workers versus one ``medseg segment``
process per study (what a shell loop over studies does with any per-study tool: a new
Python process, torch and the model loaded again for every study).

Usage:
    python benchmarks/batch_throughput.py [--studies N] [--shape Z,Y,X] [--spacing SX,SY,SZ]
                                          [--workers 1,2] [--method unet|threshold]

Generates N phantom studies (``medseg.synth``, seeds 100..100+N-1) as DICOM series in a
temporary folder, then times, from the command's start to its exit (wall clock):

* ``medseg batch SRC -o OUT --workers W -q`` for each W (a fresh output folder each time);
* ``medseg segment SRC/<study> -o OUT/<study> -q`` once per study, one after the other.

Every command runs as a child process, as a user would run it, so start-up (imports, the
local Dask cluster, model loading) is included. Studies per minute = N / wall x 60. The
per-study overhead of one process per study is (wall of the loop - wall of
``batch --workers 1``) / N: both segment the same studies with the same torch threads in
one process at a time, so the difference is what starting a process and loading the model
costs for each study. Each run's outputs are checked (every study has its lungs.nii.gz).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _triple(text: str, kind: type) -> tuple[int, int, int] | tuple[float, float, float]:
    parts = [kind(p) for p in text.replace("x", ",").split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three values, got {text!r}")
    return tuple(parts)


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    return wall


def _check(out: Path, names: list[str]) -> None:
    missing = [n for n in names if not (out / n / "lungs.nii.gz").is_file()]
    if missing:
        raise SystemExit(f"missing outputs in {out}: {missing}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=12, help="phantom studies (default 12)")
    parser.add_argument("--shape", type=lambda t: _triple(t, int), default=(64, 128, 128),
                        metavar="Z,Y,X", help="voxels per study (default 64,128,128)")
    parser.add_argument("--spacing", type=lambda t: _triple(t, float),
                        default=(2.7, 2.7, 5.0), metavar="SX,SY,SZ",
                        help="voxel size in mm (default 2.7,2.7,5.0, as sample_data)")
    parser.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    parser.add_argument("--method", choices=["unet", "threshold"], default="unet")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    sys.path.append(str(Path(__file__).resolve().parents[1]))
    from benchmarks.segment_before_after import medseg_command

    medseg = medseg_command()

    from medseg.synth import write_phantom_study

    with tempfile.TemporaryDirectory(prefix="medseg-bench-") as tmp:
        root = Path(tmp)
        src = root / "cohort"
        names = [f"study_{i:03d}" for i in range(args.studies)]
        for i, name in enumerate(names):
            study = root / "phantoms" / name
            write_phantom_study(study, seed=100 + i, shape=args.shape, spacing=args.spacing)
            src.mkdir(exist_ok=True)
            (study / "dicom").rename(src / name)

        load = os.getloadavg()[0]
        cores = os.cpu_count() or 1
        import torch

        default_threads = torch.get_num_threads()  # what a fresh process uses
        # (command, wall s, torch threads per study, 1-minute load average after it)
        rows: list[tuple[str, float, int, float]] = []
        for w in workers:
            out = root / f"batch_w{w}"
            wall = _run([*medseg, "batch", str(src), "-o", str(out), "--workers", str(w),
                         "--method", args.method, "-q"])
            _check(out, names)
            rows.append((f"medseg batch SRC -o OUT --workers {w}", wall,
                         default_threads if w == 1 else max(1, cores // w), os.getloadavg()[0]))
        out = root / "loop"
        t0 = time.perf_counter()
        for name in names:
            _run([*medseg, "segment", str(src / name), "-o", str(out / name),
                  "--method", args.method, "-q"])
        loop = time.perf_counter() - t0
        _check(out, names)
        rows.append(("for s in SRC/*; do medseg segment $s -o OUT/$s; done", loop,
                     default_threads,
                     os.getloadavg()[0]))

    import medseg as medseg_pkg

    n = args.studies
    shape = "x".join(map(str, args.shape))
    spacing = "x".join(f"{v:g}" for v in args.spacing)
    print(f"# medseg batch throughput, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"command: python benchmarks/batch_throughput.py --studies {n} --shape "
          f"{','.join(map(str, args.shape))} --spacing {','.join(f'{v:g}' for v in args.spacing)} "
          f"--workers {args.workers} --method {args.method}")
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; load average {load:.2f} at start")
    print(f"software: medseg {medseg_pkg.__version__}, Python {platform.python_version()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads by default)")
    print(f"data: {n} phantom studies, DICOM, {shape} voxels (z,y,x), {spacing} mm, "
          f"method {args.method}")
    print()
    width = max(len(r[0]) for r in rows)
    print(f"| {'command':<{width}} | wall (s) | studies/min | s/study | torch threads/study "
          "| load avg after |")
    print(f"|{'-' * (width + 2)}|---------:|------------:|--------:|--------------------:"
          "|---------------:|")
    for cmd, wall, threads, load_after in rows:
        print(f"| {cmd:<{width}} | {wall:8.1f} | {n / wall * 60:11.1f} | {wall / n:7.2f} | "
              f"{threads:19d} | {load_after:14.2f} |")
    base = rows[0][1]
    if workers[0] == 1:
        overhead = (loop - base) / n
        print()
        print(f"one process per study costs {overhead:.2f} s more per study than "
              f"'medseg batch --workers 1' ({(loop / base - 1) * 100:.0f}% more wall time): "
              "process start, imports and model loading, paid again for every study.")


if __name__ == "__main__":
    main()
