"""Where the time of one study goes inside a warm process: ``segment_study`` on the same
input N times after a warm-up (imports done, model loaded, allocator tuned, as a batch
worker runs), each stage's median from ``segment.json``'s timings.

    python benchmarks/stage_times.py [--input PATH] [--runs N] [--base COMMIT]
                                     [--model NAME_OR_CARD ...]

Default input: ../shared/data/chest-ct-philips-141. ``--base COMMIT`` also runs an earlier
commit (checked out into a temporary ``git worktree``, this script run there with
``PYTHONPATH`` set to it) first, and prints both tables side by side. ``--model`` (repeated)
times each model in this process, one column each (e.g. the two-view lung2d-v19 against
lung2d-v8).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))


def measure(src: Path, runs: int, model_name: str | None = None) -> dict[str, float]:
    """Median seconds per stage (and ``wall``) over ``runs`` warm runs."""
    import medseg.inference.unet  # torch, MONAI
    import medseg.io.dicom_seg  # highdicom
    import medseg.report.study  # noqa: F401  (Jinja2)
    from medseg import _alloc
    from medseg.models import load_model
    from medseg.segment import segment_study

    _alloc.tune()
    model = load_model(model_name) if model_name else load_model()
    freeze = getattr(_alloc, "freeze_heap", None)  # (a --base tree may predate it)
    if freeze is not None:
        freeze()  # as a batch worker does once its model is loaded
    per: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(runs + 1):
            out = Path(tmp) / f"run{r}"
            t0 = time.perf_counter()
            segment_study(src, out, model=model)
            wall = time.perf_counter() - t0
            if r == 0:
                continue  # the warm-up
            timings = json.loads((out / "segment.json").read_text())["timings_s"]
            for k, v in {**timings, "wall": wall}.items():
                per.setdefault(k, []).append(float(v))
    return {k: statistics.median(v) for k, v in per.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", type=Path, default=SHARED / "chest-ct-philips-141")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--base", default=None, help="earlier commit to compare against")
    ap.add_argument("--model", action="append", default=None,
                    help="a model to time (name or card); repeat it to compare models in "
                         "the same process, e.g. --model lung2d-v8 --model lung2d-v19 "
                         "(default: the default model)")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.json:  # the child run of --base: one JSON line, and which medseg it ran
        import medseg

        print(json.dumps({**measure(args.input, args.runs), "medseg": medseg.__file__}))
        return 0
    from benchmarks.segment_before_after import cpu_name

    tables: dict[str, dict[str, float]] = {}
    if args.base:
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp) / "base"
            subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base],
                           cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            try:
                env = {**os.environ, "PYTHONPATH": str(base)}
                out = subprocess.run([sys.executable, __file__, "--json", "--input",
                                      str(args.input), "--runs", str(args.runs)],
                                     cwd=base, env=env, check=True, capture_output=True,
                                     text=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                if not str(result.pop("medseg")).startswith(str(base)):
                    raise SystemExit("the base run did not import the base tree's medseg")
                tables[f"base {args.base}"] = result
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT,
                               check=False)
    if args.model:
        for name in args.model:
            tables[f"this tree, {name}"] = measure(args.input, args.runs, name)
    else:
        tables["this tree"] = measure(args.input, args.runs)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; {args.input}; "
          f"median of {args.runs} warm runs (s)")
    keys = list(dict.fromkeys(k for t in tables.values() for k in t))
    print("| stage | " + " | ".join(tables) + " |")
    print("|---|" + "---:|" * len(tables))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{t[k]:.3f}" if k in t else "" for t in tables.values())
              + " |")
    return 0


if __name__ == "__main__":
    # appended, not prepended: the --base child must import medseg from its PYTHONPATH
    sys.path.append(str(ROOT))
    raise SystemExit(main())
