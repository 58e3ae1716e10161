"""Should medseg run its U-Net with ONNX Runtime? Times the shipped lung2d-v1 network on the
same batch of slices with PyTorch (eager, inference mode) and with ONNX Runtime (CPU
execution provider, graph optimisations on), same threads, same run; checks the outputs
agree and prints the ratio.

Usage:
    python benchmarks/onnx_vs_torch.py [--slices 141] [--threads 2] [--batch 16]

Needs ``pip install onnxruntime onnx onnxscript`` (not medseg dependencies).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=141, help="slices (default 141)")
    ap.add_argument("--size", type=int, default=256, help="window side in pixels (256)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    import onnxruntime as ort

    from medseg.models import load_model

    torch.set_num_threads(args.threads)
    model = load_model()
    net = model.network.eval()
    rng = np.random.default_rng(0)
    x = rng.random((args.slices, model.spec.in_channels, args.size, args.size),
                   dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "lung2d.onnx"
        torch.onnx.export(net, (torch.from_numpy(x[:args.batch]),), str(onnx_path),
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

        def run_torch() -> np.ndarray:
            with torch.inference_mode():
                return np.concatenate([net(torch.from_numpy(x[i:i + args.batch])).numpy()
                                       for i in range(0, len(x), args.batch)])

        def run_ort() -> np.ndarray:
            return np.concatenate([sess.run(None, {"x": x[i:i + args.batch]})[0]
                                   for i in range(0, len(x), args.batch)])

        run_torch(), run_ort()  # warm-up
        times = {}
        outs = {}
        for name, fn in (("torch", run_torch), ("onnxruntime", run_ort)):
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                outs[name] = fn()
                best = min(best, time.perf_counter() - t0)
            times[name] = best
    diff = float(np.abs(outs["torch"] - outs["onnxruntime"]).max())
    same = float((outs["torch"].argmax(1) == outs["onnxruntime"].argmax(1)).mean())
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, {args.threads} threads")
    print(f"{args.slices} slices of {model.spec.in_channels}x{args.size}x{args.size}, "
          f"batch {args.batch}: torch {times['torch']:.2f} s, onnxruntime "
          f"{times['onnxruntime']:.2f} s, ratio torch/ort "
          f"{times['torch'] / times['onnxruntime']:.2f}")
    print(f"max |logit difference| {diff:.2e}, argmax agreement {same:.6f}")


if __name__ == "__main__":
    main()
