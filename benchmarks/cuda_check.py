"""The CUDA path against the CPU's: the same studies segmented with ``--device cuda`` and
``--device cpu`` in one process; times (warm) and the agreement of the masks.

    python benchmarks/cuda_check.py [--input PATH] [--big] [--device cuda] [--runs N]

For a session lent the GPU machine (issue 14: "the philips study <= 1 s warm, masks
identical or within Dice 0.999 of the CPU's"), as one prepared call, e.g.
``python -m pip install -e . && python benchmarks/cuda_check.py --big``. Default input:
../shared/data/chest-ct-philips-141; ``--big`` adds a 512 x 512 x 600 phantom (medseg.synth,
the peak-memory benchmark's size). Each study: a first call (CUDA start-up, cuDNN choice),
then ``--runs`` timed calls per device (``torch.cuda.synchronize`` before each clock), the
Dice per lung and the count of differing voxels between the CUDA and CPU masks, and the GPU
memory peak. On a machine without a GPU it says so and exits 2 (``--device cpu`` runs the
CPU against itself, to check the script).
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


def _timed(fn, device: str) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", type=Path, default=SHARED / "chest-ct-philips-141")
    ap.add_argument("--big", action="store_true", help="also a 512 x 512 x 600 phantom")
    ap.add_argument("--device", default="cuda", help="the device to check (default cuda)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    import medseg
    from medseg.errors import ConfigError
    from medseg.inference import DEFAULT_MODEL
    from medseg.inference.device import resolve_device
    from medseg.models import load_model
    from medseg.segment import segment

    try:
        device = resolve_device(args.device)
    except ConfigError as exc:
        print(f"cuda_check: {exc}", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else "none"
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores); GPU: {gpu}; torch {torch.__version__}")
    studies = [(args.input.name, lambda: medseg.load(args.input))]
    if args.big:
        from medseg.synth import make_phantom

        studies.append(("phantom 600x512x512",
                        lambda: make_phantom(7, (600, 512, 512), (0.7, 0.7, 0.5))[0]))
    model = load_model(DEFAULT_MODEL)
    print("| study | device | first (s) | median warm (s) | runs |")
    print("|---|---|---:|---:|---:|")
    agreement = []
    for name, make in studies:
        volume = make()
        masks = {}
        for dev in ("cpu", device):
            if dev in masks:
                continue
            if dev.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(dev)
            def run(d: str = dev, v: object = volume) -> object:
                return segment(v, model=model, device=d, qc=False)  # type: ignore[arg-type]

            first, seg = _timed(run, dev)
            times = [_timed(run, dev)[0] for _ in range(args.runs)]
            masks[dev] = np.asarray(seg.labels.array)  # type: ignore[attr-defined]
            extra = ""
            if dev.startswith("cuda"):
                extra = f" (GPU peak {torch.cuda.max_memory_allocated(dev) / 2**20:.0f} MiB)"
            print(f"| {name} | {dev}{extra} | {first:.2f} | {statistics.median(times):.2f} | "
                  f"{args.runs} |")
        a, b = masks["cpu"], masks[device]
        dice = {}
        for label, side in ((1, "right"), (2, "left")):
            x, y = a == label, b == label
            dice[side] = 2 * float((x & y).sum()) / max(1, int(x.sum() + y.sum()))
        agreement.append(f"{name}: Dice CPU vs {device} right {dice['right']:.5f}, left "
                         f"{dice['left']:.5f}; {int((a != b).sum())} voxels differ of {a.size}")
    print("\n".join(agreement))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
