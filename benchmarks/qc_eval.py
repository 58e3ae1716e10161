"""Sensitivity and false-alarm rate of medseg's QC verdict (``medseg.qc``).

    python benchmarks/qc_eval.py [--shared ../shared/data] [--out out/qc_eval] [--json]
                                 [--model NAME]

Cases (every one built from ``../shared/data`` at run time, deterministic):

* **clean** (a correct mask: should be ``ok``): the shipped model's (``--model``, default
  medseg's default model) masks of chest-ct-philips-141,
  LIDC-IDRI-0001, LungFCP-01-0001, RIDER-0117, cip-ct64, the abdominal totalseg CT, the
  sample phantom (and its exact labels), LIDC with 80 HU noise and with 5 mm slices, the
  LIDC right/left hemithorax and apex crops, and each chest study with a 50 mm mass
  inserted (against the pleura, and at the hilum) whose mask includes the mass;
* **failure** (robustness-suite cases a model got wrong: should be ``review``): lung2d-v2 on
  the three LIDC lesion copies (consolidation and masses partly left out) and on the
  base-40 % crop; lung2d-v1 on the lesion copies and on the left hemithorax (55 % labelled
  right); lung2d-v2 on the abdominal CT with the postprocessing before rule 2's skin test
  (air under the mattress cover labelled right lung); and the shipped model's own suite
  failures: each of the suite's LIDC lesion and effusion copies
  (``medseg.train.robustness``) where its mask misses a target (consolidation or masses
  under 95 % inside, an effusion over 5 % labelled lung);
* **damaged** (a correct mask deliberately broken: should be ``review``): right lung
  removed, left lung removed, sides swapped, mask shifted 10 mm to the patient's left and
  10 mm anteriorly, gas below the lungs added as lung, each inserted 50 mm mass cut out.

Prints one table (case, kind, verdict, reasons) and the rates; ``--out`` also writes
``qc_eval.json``. The masks are cached in ``--out`` (``masks/*.npy``), so a second run only
re-runs the QC.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medseg.io import load  # noqa: E402
from medseg.qc import REVIEW, quality_check  # noqa: E402
from medseg.train.lesions import from_canonical, insert_lesion, to_canonical  # noqa: E402
from medseg.volume import CTVolume  # noqa: E402


def _cached(out: Path, name: str, make: Callable[[], np.ndarray]) -> np.ndarray:
    path = out / "masks" / f"{name}.npy"
    if path.exists():
        return np.load(path)
    arr = np.asarray(make(), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)
    return arr


def _shift(vol: CTVolume, mask: np.ndarray, world_axis: int, mm: float) -> np.ndarray:
    """``mask`` moved ``mm`` along world axis 0 (x, to the patient's left) or 1 (y,
    posterior); voxels moved past the edge are lost."""
    d = vol.direction
    index_axis = int(np.argmax(np.abs(d[world_axis, :])))
    arr_axis = 2 - index_axis
    step = round(mm / vol.spacing[index_axis]) * int(np.sign(d[world_axis, index_axis]))
    out = np.roll(mask, step, axis=arr_axis)
    sl = [slice(None)] * 3
    sl[arr_axis] = slice(0, step) if step > 0 else slice(step, None)
    out[tuple(sl)] = 0
    return out


def _gas_below(vol: CTVolume, mask: np.ndarray) -> np.ndarray | None:
    """The largest gas pocket (< -900 HU, >= 5 mL) inside the body under the lungs' lowest
    quarter, or None."""
    from scipy import ndimage

    from medseg.inference.threshold import outside_air

    hu_c, sp = to_canonical(vol)
    m_c, _ = to_canonical(vol, mask)
    gas = (hu_c < -900) & ~outside_air(hu_c < -500) & (m_c == 0)
    zs = np.flatnonzero(m_c.any(axis=(1, 2)))
    if zs.size == 0:
        return None
    cut = zs[0] + (zs[-1] - zs[0]) // 4
    gas[cut:] = False
    lab, n = ndimage.label(gas)
    if n == 0:
        return None
    sizes = np.bincount(lab.ravel())[1:] * float(np.prod(sp)) / 1000
    best = int(np.argmax(sizes))
    if sizes[best] < 5.0:
        return None
    return np.asarray(from_canonical(vol, lab == best + 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "out" / "qc_eval"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--model", default=None,
                    help="model whose masks are the clean cases (default: medseg's default)")
    args = ap.parse_args(argv)
    cases = build_cases(Path(args.shared), Path(args.out), args.model)
    return _evaluate(cases, Path(args.out), args.json)


Case = tuple[str, str, CTVolume, np.ndarray]  # name, kind, image, mask


def shared_studies(shared: Path, cache: Path) -> dict[str, Callable[[], CTVolume]]:
    """The seven studies every real-data benchmark runs on, by short name, each read when
    called (the real-ct archives extracted once into ``cache``)."""
    from medseg.train.realct import load_real_ct

    return {
        "philips-141": lambda: load(shared / "chest-ct-philips-141"),
        "lidc": lambda: load_real_ct(shared, "lidc-idri-0001", cache),
        "lungfcp": lambda: load_real_ct(shared, "lungfcp-01-0001", cache),
        "rider": lambda: load_real_ct(shared, "rider-pilot-0117", cache),
        "cip-ct64": lambda: load(shared / "cip-ct64" / "ct-64Dicom"),
        "totalseg": lambda: load(shared / "totalseg-example" / "example_ct.nii.gz"),
        "phantom": lambda: load(ROOT / "sample_data" / "phantom_000" / "image.nii.gz"),
    }


def build_cases(shared: Path, out: Path, model: str | None = None) -> list[Case]:
    """Every case of the module's docstring, its mask cached in ``out/masks``."""
    out.mkdir(parents=True, exist_ok=True)
    cache = Path("/tmp/medseg-real-ct-cache")

    from medseg.inference import DEFAULT_MODEL
    from medseg.models import load_model
    from medseg.segment import segment
    from medseg.train.robustness import (
        LESION_COPIES,
        _consistency_volumes,
        hemithorax_crop,
        slab_crop,
    )

    models = {"shipped": load_model(model or DEFAULT_MODEL),
              "v2": load_model("lung2d-v2"), "v1": load_model("lung2d-v1")}
    tag = models["shipped"].spec.name  # cache key of the clean masks

    def seg(vol: CTVolume, model: str = "shipped") -> np.ndarray:
        return np.asarray(segment(vol, model=models[model]).labels.array)

    studies = shared_studies(shared, cache)
    cases: list[Case] = []
    vols: dict[str, CTVolume] = {}
    for name, make in studies.items():
        vol = make()
        vols[name] = vol
        m = _cached(out, f"{name}-{tag}", lambda vol=vol: seg(vol))
        cases.append((name, "clean", vol, m))
    # the abdominal CT's mask before rule 2's skin test: the right lung ran down the back
    # (air under the mattress cover, 59 mL), a real failure of lung2d-v2's postprocessing
    from medseg.inference.postprocess import postprocess_labels
    from medseg.inference.unet import InferenceSettings, unet_labels

    ts = vols["totalseg"]
    cases.append(("totalseg (v2 without the skin test)", "failure", ts, _cached(
        out, "totalseg-v2-noskin", lambda: postprocess_labels(
            unet_labels(ts, models["v2"], InferenceSettings()), ts.axial_axis(),
            hu=ts.array, geometry=ts.geometry, at_skin=False))))
    ph_labels = load(ROOT / "sample_data" / "phantom_000" / "labels.nii.gz").array
    cases.append(("phantom exact labels", "clean", vols["phantom"], ph_labels))

    lidc = vols["lidc"]
    lidc_m = cases[1][3]
    variants = _consistency_volumes(lidc, np.random.default_rng([12, 7]))
    for vname in ("noise 80 HU", "5 mm slices"):
        v = variants[vname]
        cases.append((f"lidc {vname}", "clean", v,
                      _cached(out, f"lidc-{vname.replace(' ', '_')}-{tag}",
                              lambda v=v: seg(v))))
    crops = [("right hemithorax", *hemithorax_crop(lidc, 1)),
             ("left hemithorax", *hemithorax_crop(lidc, 2)),
             ("apex 40 %", *slab_crop(lidc, "apex")), ("base 40 %", *slab_crop(lidc, "base"))]
    for cname, vol, _box in crops:
        key = cname.replace(" ", "_").replace("%", "pct")
        if cname == "base 40 %":  # lung2d-v2's failure (left Dice 0.897)
            m = _cached(out, f"lidc-crop-{key}-v2", lambda vol=vol: seg(vol, "v2"))
            cases.append((f"lidc crop {cname} (v2)", "failure", vol, m))
            continue
        m = _cached(out, f"lidc-crop-{key}-{tag}", lambda vol=vol: seg(vol))
        cases.append((f"lidc crop {cname} ({tag})", "clean", vol, m))
        if cname == "left hemithorax":
            m1 = _cached(out, f"lidc-crop-{key}-v1", lambda vol=vol: seg(vol, "v1"))
            cases.append((f"lidc crop {cname} (v1)", "failure", vol, m1))

    # robustness lesion copies (the failures of lung2d-v2 and -v1), on the clean mask of
    # LIDC as the labels to place them
    hu_c, sp = to_canonical(lidc, lidc.array.astype(np.float32))
    lab_c, _ = to_canonical(lidc, lidc_m)
    for c, lesions in enumerate(LESION_COPIES):
        rng = np.random.default_rng([12, 2, c])
        hu = hu_c.copy()
        for kind, anchor, side, diam in lesions:
            insert_lesion(hu, lab_c, sp, rng, kind, anchor=anchor, side=side,
                          diameter_mm=diam)
        vol = lidc.with_array(from_canonical(lidc, hu))
        for model in ("v2", "v1"):
            m = _cached(out, f"lidc-lesions-{c + 1}-{model}",
                        lambda vol=vol, model=model: seg(vol, model))
            cases.append((f"lidc+lesions {c + 1} ({model})", "failure", vol, m))

    # the shipped model's own robustness-suite failures: the suite's LIDC lesion and effusion
    # copies (medseg.train.robustness: its reference, lesions and seeds); a copy where the
    # model misses one of the suite's targets is a failure case
    from medseg.train.realct import derive_lung_labels
    from medseg.train.robustness import LABEL_MODEL, effusion_copies, lesion_copies

    ref, _ = derive_lung_labels(lidc, LABEL_MODEL)
    for cp in [*lesion_copies(lidc, ref), *effusion_copies(lidc, ref)]:
        what = "effusion" if cp.inserted and cp.inserted[0][0] == "effusion" else "lesions"
        m = _cached(out, f"lidc-suite-{what}-{cp.index + 1}-{tag}",
                    lambda v=cp.volume: seg(v))
        missed = suite_misses(cp.inserted, m)
        if missed:
            cases.append((f"lidc+{what} {cp.index + 1} ({tag}: {missed})", "failure",
                          cp.volume, m))

    # damaged masks of the clean chest studies
    for name in ("philips-141", "lidc", "lungfcp", "rider", "cip-ct64", "phantom"):
        vol = vols[name]
        m = next(c[3] for c in cases if c[0] == name)
        for s, side in ((1, "right"), (2, "left")):
            d = m.copy()
            d[d == s] = 0
            cases.append((f"{name}: {side} lung removed", "damaged", vol, d))
        sw = m.copy()
        sw[m == 1], sw[m == 2] = 2, 1
        cases.append((f"{name}: sides swapped", "damaged", vol, sw))
        cases.append((f"{name}: shifted 10 mm left", "damaged", vol, _shift(vol, m, 0, 10.0)))
        cases.append((f"{name}: shifted 10 mm anterior", "damaged", vol,
                      _shift(vol, m, 1, -10.0)))
        gas = _gas_below(vol, m)
        if gas is not None:
            d = m.copy()
            d[gas] = 2
            cases.append((f"{name}: gas below the lungs added", "damaged", vol, d))
        # a 50 mm mass against the pleura and one at the hilum: included (clean) and cut
        # out (damaged); a placement that leaves under 20 mL of mass in the lung is redrawn
        for anchor in ("pleura", "hilum"):
            hu_c2, sp2 = to_canonical(vol, vol.array.astype(np.float32))
            lab_c2, _ = to_canonical(vol, m)
            rng = np.random.default_rng([12, 9])
            for _try in range(10):
                trial = hu_c2.copy()
                les = insert_lesion(trial, lab_c2, sp2, rng, "mass", anchor=anchor, side=1,
                                    diameter_mm=50.0)
                if les is not None and les.voxels * float(np.prod(sp2)) / 1000 >= 20.0:
                    break
            else:
                continue
            ml = les.voxels * float(np.prod(sp2)) / 1000
            lvol = vol.with_array(from_canonical(vol, trial).astype(vol.array.dtype))
            cases.append((f"{name} + 50 mm mass ({anchor}, {ml:.0f} mL), included", "clean",
                          lvol, m))
            d = m.copy()
            d[from_canonical(vol, les.mask)] = 0
            cases.append((f"{name} + 50 mm mass ({anchor}): cut out", "damaged", lvol, d))

    return cases


def suite_misses(inserted: list[tuple[str, str, np.ndarray, np.ndarray]], mask: np.ndarray
                 ) -> str:
    """Which of the robustness suite's targets a mask of a lesion or effusion copy misses
    (``inserted``: the copy's (kind, name, mask on the volume's grid, canonical mask)):
    consolidation or mass voxels under 95 % inside the lung (per kind, over the copy), an
    effusion over 5 % labelled lung; "" when none."""
    from medseg.train.robustness import EFFUSION_IN_LUNG_MAX_PCT, LESION_INSIDE_MIN_PCT

    missed: list[str] = []
    lung = mask > 0
    for kind in ("consolidation", "mass"):
        ms = [m for k, _, m, _ in inserted if k == kind]
        n = sum(int(np.count_nonzero(m)) for m in ms)
        if n:
            pct = 100.0 * sum(int(np.count_nonzero(m & lung)) for m in ms) / n
            if pct < LESION_INSIDE_MIN_PCT:
                missed.append(f"{kind} {pct:.0f} % inside")
    for k, name, m, _ in inserted:
        if k == "effusion":
            pct = 100.0 * np.count_nonzero(m & lung) / max(1, np.count_nonzero(m))
            if pct > EFFUSION_IN_LUNG_MAX_PCT:
                missed.append(f"effusion {name} {pct:.0f} % labelled lung")
    return ", ".join(missed)


def _evaluate(cases: list[Case], out: Path, as_json: bool) -> int:
    rows: list[dict[str, Any]] = []
    qc_times: list[float] = []
    for name, kind, vol, m in cases:
        t0 = time.perf_counter()
        r = quality_check(vol, m)
        qc_times.append(time.perf_counter() - t0)
        rows.append({"case": name, "kind": kind, "verdict": r.verdict, "reasons": r.reasons,
                     "notes": r.notes, "signals": r.signals})
    summary: dict[str, Any] = {}
    for kind in ("clean", "failure", "damaged"):
        sel = [r for r in rows if r["kind"] == kind]
        n_rev = sum(r["verdict"] == REVIEW for r in sel)
        summary[kind] = {"cases": len(sel), "review": n_rev}
    bad = summary["failure"]["review"] + summary["damaged"]["review"]
    n_bad = summary["failure"]["cases"] + summary["damaged"]["cases"]
    summary["sensitivity"] = round(bad / max(1, n_bad), 3)
    summary["false_alarm_rate"] = round(summary["clean"]["review"] /
                                        max(1, summary["clean"]["cases"]), 3)
    summary["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    summary["clean_masks_model"] = next(
        (name.rsplit("(", 1)[-1].rstrip(")") for name, *_ in cases if "crop right" in name),
        "")
    result = {"summary": summary, "rows": rows}
    (out / "qc_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    if as_json:
        print(json.dumps(result, indent=2))
        return 0
    print("| case | kind | verdict | reasons |\n|---|---|---|---|")
    for r in rows:
        short = "; ".join(x.split(":")[0][:90] for x in r["reasons"])
        print(f"| {r['case']} | {r['kind']} | {r['verdict']} | {short} |")
    print()
    print(json.dumps(summary))
    print(f"QC time per case: median {np.median(qc_times):.2f} s, max {max(qc_times):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
