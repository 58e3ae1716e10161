"""Sliding-window overlap and blending: accuracy and time where they matter.

Usage:
    python benchmarks/window_overlap.py [--seeds 3] [--fov-mm 640]

At the model's 2 mm pixels a 256-pixel window covers 512 mm, so for an ordinary chest field
of view (350-500 mm) every slice is one window and overlap and blending change nothing. They
matter only for a wider field of view, where windows meet inside the body. This script makes
phantoms (``medseg.synth``, exact labels) with a ``--fov-mm`` field of view (default 640 mm:
two windows per axis that meet near the body's middle) and segments them with each overlap
and blending mode, reporting Dice per lung against the phantom labels and the inference time.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="phantoms (seeds 300..)")
    ap.add_argument("--fov-mm", type=float, default=640.0)
    ap.add_argument("--slices", type=int, default=48)
    args = ap.parse_args()
    import torch

    from medseg import _alloc
    from medseg.evaluate.metrics import dice
    from medseg.inference.postprocess import postprocess_labels
    from medseg.inference.unet import InferenceSettings, unet_labels
    from medseg.models import load_model
    from medseg.synth import make_phantom

    _alloc.tune()
    model = load_model()
    n = 512
    spacing = (args.fov_mm / n, args.fov_mm / n, 6.0)
    cases = [make_phantom(seed=300 + s, shape=(args.slices, n, n), spacing=spacing)
             for s in range(args.seeds)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"{args.seeds} phantoms {args.slices}x{n}x{n} at {spacing[0]:.2f} mm "
          f"(field of view {args.fov_mm:.0f} mm = {args.fov_mm / 2:.0f} model pixels)")
    print(f"{'overlap':>8} {'blending':>9} {'Dice right':>11} {'Dice left':>10} "
          f"{'min Dice':>9} {'time (s)':>9}")
    for overlap in (0.0, 0.25, 0.5):
        for mode in ("constant", "gaussian"):
            d_r, d_l, secs = [], [], 0.0
            for image, labels in cases:
                settings = InferenceSettings(overlap=overlap, blend_mode=mode)
                t0 = time.perf_counter()
                raw = unet_labels(image, model, settings)
                secs += time.perf_counter() - t0
                pred = postprocess_labels(raw, image.axial_axis())
                d_r.append(dice(pred == 1, labels.array == 1))
                d_l.append(dice(pred == 2, labels.array == 2))
            print(f"{overlap:>8.2f} {mode:>9} {np.mean(d_r):>11.4f} {np.mean(d_l):>10.4f} "
                  f"{min(d_r + d_l):>9.4f} {secs:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
