"""The ``medseg`` command line: one entry point, subcommands that only parse arguments and
call the library. Expected errors (:class:`medseg.errors.MedsegError`) print one line,
``medseg: error: <file>: series <uid>: <reason>``, and exit with status 1; a wrong argument
exits with status 2 (argparse)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg._version import __version__
from medseg.errors import MedsegError

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _fmt_series(s: dict[str, Any], chosen: bool) -> list[str]:
    mark = "*" if chosen else ("-" if not s["usable"] else " ")
    desc = s.get("description") or ""
    head = (f"  [{mark}] {s['series_instance_uid']}  #{s.get('series_number')}  "
            f"{desc!r}  {s.get('modality') or '?'}  {s['n_slices']} slices "
            f"{s.get('columns')}x{s.get('rows')}")
    lines = [head]
    if "pixel_spacing_mm" in s:
        gap = s["slice_spacing_mm"]
        spacing = (f"{gap['median']:.3f}" if gap["min"] == gap["max"]
                   else f"{gap['min']:.3f}-{gap['max']:.3f}")
        lines.append(
            f"      pixel {s['pixel_spacing_mm'][0]:.4g}x{s['pixel_spacing_mm'][1]:.4g} mm, "
            f"slice spacing {spacing} mm, orientation {s['orientation_cosines']}, "
            f"tilt {s['gantry_tilt_deg']:.2f} deg, {', '.join(s['transfer_syntaxes'])}")
        for c in s.get("corrections", []):
            lines.append(f"      correction: {c}")
    if s.get("problem"):
        lines.append(f"      cannot be used: {s['problem']}")
    return lines


def _cmd_info(args: argparse.Namespace) -> int:
    from medseg import io

    fmt = io.detect_format(args.path)
    if fmt != "dicom":
        vol = io.load(args.path)
        out = {"path": str(args.path), "format": fmt, **vol.summary()}
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            print(f"{args.path}: {fmt.upper()} volume {vol.shape[2]}x{vol.shape[1]}x"
                  f"{vol.shape[0]} (x,y,z), spacing "
                  f"{'x'.join(f'{v:.4g}' for v in vol.spacing)} mm, orientation "
                  f"{vol.geometry.orientation_code()}, {vol.array.dtype}, "
                  f"values {out['min']:.6g}..{out['max']:.6g}")
        return EXIT_OK
    scan = io.scan_dicom(args.path, series_uid=args.series)
    data = scan.to_dict()
    data["format"] = "dicom"
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK if scan.chosen else EXIT_ERROR
    print(f"{scan.root}: {len(scan.series)} image series, {len(scan.skipped)} file(s) skipped")
    for s in data["series"]:
        for line in _fmt_series(s, s["series_instance_uid"] == data["chosen_series"]):
            print(line)
    if scan.skipped:
        counts = Counter(s.reason for s in scan.skipped)
        print("  skipped:")
        for reason, n in counts.most_common():
            print(f"    {n:5d} x {reason}")
        if args.verbose:
            for s in scan.skipped:
                print(f"      {s.path}: {s.reason}")
    if scan.chosen:
        print(f"would use: {scan.chosen.series_uid} ({scan.choice_reason})")
        return EXIT_OK
    print(f"medseg: error: {scan.root}: nothing to use: {scan.choice_reason}", file=sys.stderr)
    return EXIT_ERROR


def _cmd_convert(args: argparse.Namespace) -> int:
    from medseg import io

    vol = io.load(args.input, series=args.series)
    out = io.save(vol, args.output)
    if not args.quiet:
        print(f"wrote {out}: {vol.shape[2]}x{vol.shape[1]}x{vol.shape[0]} (x,y,z), "
              f"spacing {'x'.join(f'{v:.4g}' for v in vol.spacing)} mm, "
              f"orientation {vol.geometry.orientation_code()}, {vol.array.dtype}")
        for c in vol.metadata.corrections:
            print(f"  correction: {c}")
    return EXIT_OK


def _parse_triple(text: str, kind: type) -> tuple[Any, Any, Any]:
    parts = text.replace("x", ",").split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three values like 64,128,128, got {text!r}")
    try:
        vals = tuple(kind(p) for p in parts)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not numbers: {text!r}") from exc
    if any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"values must be positive, got {text!r}")
    return vals


def _cmd_synth(args: argparse.Namespace) -> int:
    from medseg.synth import write_phantom_study

    for i in range(args.count):
        seed = args.seed + i
        out_dir = args.out_dir if args.count == 1 else args.out_dir / f"phantom_{seed:03d}"
        paths = write_phantom_study(out_dir, seed=seed, shape=args.shape, spacing=args.spacing)
        if not args.quiet:
            print(f"phantom seed {seed}: " + ", ".join(str(p) for p in paths.values()))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medseg",
        description="Lung segmentation and reporting for chest CT. Reads DICOM folders "
        "(several series, compressed, enhanced multi-frame, DICOMDIR), NIfTI, NRRD and MHA.",
        epilog="Run 'medseg COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "info", help="list the series in a folder and which one medseg would use",
        description="Discover the DICOM series under PATH (or describe a NIfTI/NRRD/MHA file): "
        "UIDs, description, slices, size, spacing, orientation, gantry tilt, corrections, what "
        "was skipped and why, and which series medseg would use.")
    p.add_argument("path", type=Path, help="DICOM folder, DICOMDIR, DICOM file, or volume file")
    p.add_argument("--series", metavar="UID", help="SeriesInstanceUID to use")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("-v", "--verbose", action="store_true", help="list every skipped file")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "convert", help="write the volume medseg loads (HU, world geometry) to NIfTI/NRRD/MHA",
        description="Load INPUT exactly as medseg's segmentation would (series choice, slice "
        "order, rescale to HU, tilt/spacing correction) and write it to OUTPUT. The format "
        "follows OUTPUT's suffix: .nii.gz, .nii, .nrrd or .mha. Written atomically.")
    p.add_argument("input", type=Path, help="DICOM folder/file, NIfTI, NRRD or MHA")
    p.add_argument("output", type=Path, help="output file, e.g. ct.nii.gz")
    p.add_argument("--series", metavar="UID", help="SeriesInstanceUID to use")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "synth", help="generate labelled synthetic chest-CT phantoms",
        description="Write deterministic chest-CT phantoms with exact lung labels "
        "(0 background, 1 right lung, 2 left lung): OUT_DIR/dicom/, image.nii.gz, "
        "labels.nii.gz. With --count N, one sub-folder per phantom.")
    p.add_argument("out_dir", type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--count", type=int, default=1, help="number of phantoms (default 1)")
    p.add_argument("--shape", type=lambda t: _parse_triple(t, int), default=(64, 128, 128),
                   metavar="Z,Y,X", help="voxels (default 64,128,128)")
    p.add_argument("--spacing", type=lambda t: _parse_triple(t, float),
                   default=(2.7, 2.7, 5.0), metavar="SX,SY,SZ",
                   help="voxel size in mm (default 2.7,2.7,5.0)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=_cmd_synth)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except MedsegError as exc:
        print(f"medseg: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("medseg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
