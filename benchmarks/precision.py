"""The network in fp32 against bf16 autocast (``MEDSEG_PRECISION=bf16``), same process, same
study: time of the network stage and how much the raw masks differ.

    python benchmarks/precision.py [--input PATH] [--runs N] [--threads N] [--studies]

Default input: ../shared/data/chest-ct-philips-141. Runs ``unet_labels`` (the shipped
model, one warm-up each) alternating fp32 and bf16 ``--runs`` times and prints the median
network seconds of each, their ratio, and the bf16 mask against the fp32 one (voxels that
differ, Dice per lung). bf16 is fast only where the CPU computes it in hardware (the
``avx512_bf16`` or ``amx_bf16`` CPU flag, printed); elsewhere torch emulates it.
``--studies`` instead segments every shared study (``medseg.segment.segment``: network,
postprocessing and QC) both ways and prints, per study, the voxels that differ, Dice per
lung, the volumes and the QC verdicts: the evidence a model card's ``"cpu_bf16"`` cites.
What bf16 does to the hard cases is measured by the robustness suite:
``MEDSEG_PRECISION=bf16 medseg validate-model --suite robustness -o out/rob_bf16`` against
the same with ``MEDSEG_PRECISION=fp32``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))

from benchmarks.segment_before_after import cpu_name  # noqa: E402


def cpu_line() -> str:
    """The CPU's model name and which of the vector / bf16 flags it has (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return cpu_name()
    family = re.search(r"cpu family\s*:\s*(\d+)", text)
    flags = sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16|avx512f|avx2)\b", text)))
    return (f"{cpu_name()}, family {family.group(1) if family else '?'}, flags: "
            f"{' '.join(flags) or 'none'} (of avx2 avx512f avx512_bf16 amx_bf16)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", type=Path, default=SHARED / "chest-ct-philips-141")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--studies", action="store_true",
                    help="compare the final masks on every shared study instead of timing")
    args = ap.parse_args()
    if args.studies:
        return compare_studies(args.threads)

    import numpy as np

    from medseg.evaluate import label_metrics
    from medseg.inference.unet import InferenceSettings, unet_labels
    from medseg.io import load
    from medseg.models import load_model

    volume = load(args.input)
    model = load_model()
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    masks: dict[str, np.ndarray] = {}
    for i in range(args.runs + 1):  # run 0 is the warm-up of each
        for precision in ("fp32", "bf16"):
            s = InferenceSettings(threads=args.threads, precision=precision)
            masks[precision] = unet_labels(volume, model, s)
            if i:
                times[precision].append(s.timings["network_s"])
    med = {p: statistics.median(t) for p, t in times.items()}
    m = label_metrics(masks["bf16"], masks["fp32"], volume.spacing[::-1])
    print(f"CPU: {cpu_line()}; {args.threads} threads")
    print(f"input: {args.input} {volume.shape}")
    for p in ("fp32", "bf16"):
        print(f"network {p}: median {med[p]:.3f} s of {args.runs} runs "
              f"({', '.join(f'{t:.3f}' for t in times[p])})")
    print(f"fp32 / bf16: {med['fp32'] / med['bf16']:.2f}x")
    print(f"bf16 vs fp32 raw masks: {int((masks['bf16'] != masks['fp32']).sum())} voxels "
          f"differ; Dice right {m['right']['dice']:.5f}, left {m['left']['dice']:.5f}")
    return 0


def compare_studies(threads: int) -> int:
    """fp32 against bf16, the whole ``segment`` (postprocessing and QC included), on the
    shared studies and the sample phantom."""
    import numpy as np
    import torch

    from benchmarks.qc_eval import shared_studies
    from medseg.evaluate.metrics import dice
    from medseg.models import load_model
    from medseg.segment import segment

    torch.set_num_threads(threads)
    studies = shared_studies(SHARED, Path(os.environ.get("TMPDIR", "/tmp"))
                             / "medseg-real-ct-cache")
    model = load_model()
    print(f"CPU: {cpu_line()}; {threads} threads; model {model.spec.name}")
    for name, read in studies.items():
        vol = read()
        out = {}
        for precision in ("fp32", "bf16"):
            os.environ["MEDSEG_PRECISION"] = precision
            r = segment(vol, model=model)
            out[precision] = (np.asarray(r.labels.array), (r.qc or {}).get("verdict"))
        a, b = out["fp32"][0], out["bf16"][0]
        ml = float(np.prod(vol.spacing)) / 1000.0
        vols = {p: "/".join(f"{float((x[0] == s).sum()) * ml:.1f}" for s in (1, 2))
                for p, x in out.items()}
        print(f"{name} {vol.shape}: {int((a != b).sum())} voxels differ of "
              f"{int((a > 0).sum())} lung; Dice right {dice(a == 1, b == 1):.5f}, left "
              f"{dice(a == 2, b == 2):.5f}; mL right/left fp32 {vols['fp32']}, bf16 "
              f"{vols['bf16']}; QC {out['fp32'][1]} / {out['bf16'][1]}", flush=True)
    os.environ.pop("MEDSEG_PRECISION", None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
