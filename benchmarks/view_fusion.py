"""An axial and a coronal (or sagittal) lung network, alone and fused, on the robustness
suite's LIDC copies (an experiment: ``medseg segment`` runs axial models only).

    python benchmarks/view_fusion.py --other out/train_lung2d_c1/lung2d-c1.json
                                     [--axial lung2d-v8] [--shared ../shared/data]

Both networks run on the model's prepared grid (:func:`medseg.train.data.prepare_slices`:
2 mm in plane, the series' own slices; the coronal one on the stack turned by
:mod:`medseg.train.views` and its probabilities turned back), *raw*: no postprocessing, no
inversion to the study's grid, so the numbers compare the views with each other, not with
the suite's table. Fusions: ``mean`` of the two softmax outputs; ``union``: a voxel is lung
when either network says so (the larger lung probability, the smaller background one);
``mean lung, axial sides``: the mean lung probability, right and left as the axial one has
them.
Prints LIDC-IDRI-0001's Dice per lung against the suite's reference, then per inserted
lesion and effusion (``lesion_copies`` / ``effusion_copies``, the suite's own) the % of its
voxels labelled lung.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))

from benchmarks.segment_before_after import cpu_name  # noqa: E402


def probabilities(model: Any, image: npt.NDArray[np.float32], slice_mm: float
                  ) -> npt.NDArray[np.float32]:
    """Softmax (3, K, I, J) of ``model`` on a prepared axial stack, in its own view."""
    from medseg.train.data import Sample
    from medseg.train.loop import predict_sample

    spec = model.spec
    stack = Sample("stack", image, np.zeros(image.shape, np.uint8), slice_mm=slice_mm)
    return predict_sample(model.network, stack, spec, 2 ** len(spec.strides), softmax=True)


def fusions(pa: npt.NDArray[np.float32], pb: npt.NDArray[np.float32]
            ) -> dict[str, npt.NDArray[np.float32]]:
    union = np.maximum(pa, pb)
    union[0] = np.minimum(pa[0], pb[0])
    # the mean lung probability, split into right and left as the axial network splits it
    # (a sagittal slice shows one lung: which one is the axial view's call)
    lung = (pa[1] + pa[2] + pb[1] + pb[2]) / 2
    right = pa[1] / np.maximum(pa[1] + pa[2], 1e-6)
    sides = np.stack([1 - lung, lung * right, lung * (1 - right)])
    return {"axial": pa, "other": pb, "mean": (pa + pb) / 2, "union": union,
            "mean lung, axial sides": sides}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--axial", default="lung2d-v8", help="an axial model (name or card)")
    ap.add_argument("--other", required=True, help="a model of another view (its card)")
    ap.add_argument("--shared", type=Path, default=SHARED)
    args = ap.parse_args(argv)

    from medseg.inference import LABEL_MODEL
    from medseg.models import load_model
    from medseg.train.data import prepare_slices
    from medseg.train.realct import IGNORE, derive_lung_labels, load_real_ct
    from medseg.train.robustness import effusion_copies, lesion_copies

    axial, other = load_model(args.axial), load_model(args.other)
    cache = Path(tempfile.gettempdir()) / "medseg-real-ct-cache"
    lidc = load_real_ct(args.shared, "lidc-idri-0001", cache)
    ref, _ = derive_lung_labels(lidc, LABEL_MODEL)
    slice_mm = float(np.linalg.norm(np.asarray(lidc.geometry.affine_ras)[:3, 2]))
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores); axial {axial.spec.name}, "
          f"{other.spec.view} {other.spec.name}; LIDC-IDRI-0001, prepared grid, raw networks")

    def both(volume: Any, labels: npt.NDArray[Any]
             ) -> tuple[dict[str, npt.NDArray[np.float32]], npt.NDArray[np.uint8]]:
        img, lab = prepare_slices(volume, volume.with_array(labels.astype(np.uint8)),
                                  axial.spec)
        assert lab is not None
        return fusions(probabilities(axial, img, slice_mm),
                       probabilities(other, img, slice_mm)), lab

    probs, rlab = both(lidc, ref)
    valid = rlab != IGNORE
    print("| LIDC Dice right / left | " + " | ".join(probs) + " |")
    print("|---|" + "---:|" * len(probs))
    cells = []
    for p in probs.values():
        lab = p.argmax(0)
        d = [2 * int(((lab == s) & (rlab == s) & valid).sum())
             / max(1, int(((lab == s) & valid).sum() + ((rlab == s) & valid).sum()))
             for s in (1, 2)]
        cells.append(f"{d[0]:.4f} / {d[1]:.4f}")
    print("| clean | " + " | ".join(cells) + " |")
    print()
    print("| % of the voxels labelled lung | " + " | ".join(probs) + " |")
    print("|---|" + "---:|" * len(probs))
    for copies in (lesion_copies(lidc, ref), effusion_copies(lidc, ref)):
        for cp in copies:
            code = np.zeros(lidc.shape, np.uint8)
            for i, (_k, _n, m, _mc) in enumerate(cp.inserted):
                code[m] = i + 1
            probs, lab = both(cp.volume, code)
            for i, (kind, name, _m, _mc) in enumerate(cp.inserted):
                m = lab == i + 1
                title = f"copy {cp.index + 1}: " + (f"effusion {name}" if kind == "effusion"
                                                     else name)
                print(f"| {title} | " + " | ".join(
                    f"{100.0 * float((p.argmax(0)[m] > 0).mean()):.1f}"
                    for p in probs.values()) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
