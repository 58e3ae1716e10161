"""``medseg qc``: the quality check of :mod:`medseg.qc` on any lung mask."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register"]


def _cmd_qc(args: argparse.Namespace) -> int:
    from medseg.errors import GeometryError
    from medseg.evaluate import to_jsonable
    from medseg.evaluate.labels import resolve_labels
    from medseg.io import load
    from medseg.qc import quality_check

    image = load(args.input, series=args.series)
    mask = load(args.labels)
    if not image.same_grid(mask):
        raise GeometryError("the labels are not on the image's grid: "
                            + image.grid_difference(mask), path=args.labels)
    resolved = resolve_labels(mask.array, args.label_values, role="mask", path=args.labels,
                              flag="--labels")
    result = quality_check(image, resolved.array)
    if args.json:
        out: dict[str, Any] = {"verdict": result.verdict, "reasons": result.reasons,
                               "notes": [*resolved.notes, *result.notes],
                               "slice": result.slice, "signals": result.signals}
        print(json.dumps(to_jsonable(out), indent=2))
        return 0
    print(f"{args.labels}: {result.verdict}")
    for r in result.reasons:
        print(f"  review: {r}")
    for n in (*resolved.notes, *result.notes):
        print(f"  note: {n}")
    if result.slice is not None:
        print(f"  look first at axial slice {result.slice} (1 = most inferior)")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "qc", help="check a lung mask for signs that it is wrong: verdict ok or review",
        description="Run medseg's quality check on LABELS, a lung mask on INPUT's grid (from "
        "medseg or any other tool): the right/left volumes and sides against the patient's "
        "midline, aerated lung left outside the mask, a border that does not follow the "
        "lung, gas with soft-tissue walls (stomach, bowel) labelled lung, dense tissue "
        "enclosed by the lung but left out, slices where the mask jumps. Prints the verdict "
        "(ok or review), the reasons and the slice to look at first. Exits 0 either way; "
        "1 only when the files cannot be read or do not match.",
        epilog="The signals, thresholds and their measured sensitivity and false-alarm rate: "
        "docs/concepts/quality-control.md.")
    p.add_argument("input", type=Path, help="the CT: DICOM folder/file, NIfTI, NRRD or MHA")
    p.add_argument("labels", type=Path, help="lung labels on the CT's grid (e.g. lungs.nii.gz)")
    p.add_argument("--series", metavar="UID", help="SeriesInstanceUID to use")
    p.add_argument("--labels", dest="label_values", default="auto", metavar="SPEC",
                   help="label convention of LABELS (default auto: right=1,left=2, or "
                   "lung=1 for a 0/1 mask, then the side checks are skipped); the grammar "
                   "of 'medseg evaluate --ref-labels'")
    p.add_argument("--json", action="store_true",
                   help='print {"verdict", "reasons", "notes", "slice", "signals"} as JSON')
    p.set_defaults(func=_cmd_qc)
