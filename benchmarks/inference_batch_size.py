"""U-Net inference time against network batch size and slab length, on one study.

Usage:
    python benchmarks/inference_batch_size.py [--input DIR_OR_FILE] [--repeats 2]

Times ``medseg.inference.unet.unet_labels`` (orientation, in-plane resampling, MONAI
``SliceInferer``, inversion onto the source grid; no postprocessing) with the shipped model
for each (batch size, slab slices) pair, best of ``--repeats``; the defaults medseg ships
(``medseg.inference.DEFAULT_BATCH_SIZE``, ``SLAB_SLICES``) come from this table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))
PAIRS = [(4, 8), (4, 16), (8, 16), (8, 32), (16, 16), (16, 48), (48, 48)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=SHARED / "chest-ct-philips-141")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import torch

    from medseg import _alloc
    from medseg.inference import DEFAULT_BATCH_SIZE, SLAB_SLICES
    from medseg.inference.unet import InferenceSettings, unet_labels
    from medseg.io import load
    from medseg.models import load_model

    _alloc.tune()  # as the medseg command does
    volume = load(args.input)
    model = load_model()
    unet_labels(volume, model, InferenceSettings())  # warm-up
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; input {args.input.name} {volume.shape}")
    for batch, slab in PAIRS:
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            unet_labels(volume, model, InferenceSettings(batch_size=batch, slab_slices=slab))
            best = min(best, time.perf_counter() - t0)
        mark = "  (medseg default)" if (batch, slab) == (DEFAULT_BATCH_SIZE, SLAB_SLICES) else ""
        print(f"batch {batch:3d}, slab {slab:3d} slices: {best:.2f} s{mark}", flush=True)


if __name__ == "__main__":
    main()
