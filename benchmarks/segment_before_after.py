"""``medseg segment`` time of this tree against an earlier commit, same input, same run.

Usage:
    python benchmarks/segment_before_after.py [--base COMMIT] [--runs N] [--input PATH]
                                              [--method unet|threshold] [--info]

The earlier commit is checked out into a temporary ``git worktree``; each tree runs
``medseg segment INPUT -o OUT`` as a user types it (the console script beside this Python;
cold: imports, model loading, reading, segmentation, postprocessing, report, DICOM SEG and
SR), alternating
between the trees so that load on the machine hits both alike. Prints each run, the medians
and the ratio. Default input: ../shared/data/chest-ct-philips-141; default base: the last
commit before lung2d-v2 (adcdefd). ``--method threshold`` times ``segment --method
threshold`` (no network); ``--info`` times ``medseg info INPUT`` instead (start-up and reading
the headers and pixels).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def medseg_command() -> list[str]:
    """The ``medseg`` command as a user runs it: the console script installed beside this
    Python (its exit costs what a user's does: ``python -m medseg.cli`` ended 0.9 s sooner
    before medseg froze its heap at exit, docs/benchmarks.md), else ``python -m medseg.cli``.
    The script imports medseg from ``PYTHONPATH`` first, so a ``--base`` tree runs its own."""
    script = Path(sys.executable).with_name("medseg")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "medseg.cli"]


def run(tree: Path, src: Path, out: Path, method: str = "unet", info: bool = False) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = ["info", str(src)] if info else ["segment", str(src), "-o", str(out), "--method",
                                           method]
    t0 = time.perf_counter()
    subprocess.run([*medseg_command(), *cmd], check=True, env=env, cwd=tree,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="adcdefd", help="earlier commit to compare against")
    ap.add_argument("--runs", type=int, default=3, help="runs per tree (alternating)")
    ap.add_argument("--input", type=Path, default=SHARED / "chest-ct-philips-141")
    ap.add_argument("--method", choices=("unet", "threshold"), default="unet")
    ap.add_argument("--info", action="store_true", help="time `medseg info INPUT` instead")
    args = ap.parse_args()
    what = "medseg info" if args.info else f"medseg segment --method {args.method}"
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; {what} {args.input}")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            times: dict[str, list[float]] = {"base": [], "this": []}
            for r in range(args.runs):
                for name, tree in (("base", base), ("this", ROOT)):
                    t = run(tree, args.input, Path(tmp) / f"{name}{r}", args.method,
                            args.info)
                    times[name].append(t)
                    print(f"run {r + 1} {name:4s} {t:6.2f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT,
                           check=False)
    mb, mt = statistics.median(times["base"]), statistics.median(times["this"])
    print(f"median: base ({args.base}) {mb:.2f} s, this tree {mt:.2f} s, "
          f"this/base = {mt / mb:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
