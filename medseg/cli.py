"""The ``medseg`` command line: one entry point, subcommands that only parse arguments and
call the library. Expected errors (:class:`medseg.errors.MedsegError`) print one line,
``medseg: error: <file>: series <uid>: <reason>``, and exit with status 1; a wrong argument
exits with status 2 (argparse)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg._version import __version__
from medseg.conventions import METHODS, Method
from medseg.errors import MedsegError
from medseg.inference import DEFAULT_BATCH_SIZE, DEFAULT_MODEL
from medseg.inference.device import DEVICE_HELP, device_argument

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
        out = {"path": str(args.path), "format": fmt, **vol.summary(),
               "corrections": list(vol.metadata.corrections)}
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            print(f"{args.path}: {fmt.upper()} volume {vol.shape[2]}x{vol.shape[1]}x"
                  f"{vol.shape[0]} (x,y,z), spacing "
                  f"{'x'.join(f'{v:.4g}' for v in vol.spacing)} mm, orientation "
                  f"{vol.geometry.orientation_code()}, {vol.array.dtype}, "
                  f"values {out['min']:.6g}..{out['max']:.6g}")
            for c in vol.metadata.corrections:
                print(f"  correction: {c}")
        return EXIT_OK
    scan = io.scan_dicom(args.path, series_uid=args.series)
    # read the chosen series' pixels and run the checks loading runs: "would use" is what
    # segment and convert load, and a series they refuse is shown refused, with the reason
    io.verify_chosen(scan)
    data = scan.to_dict()
    data["format"] = "dicom"
    if scan.chosen:
        data["segment"] = _segment_check(args.path, scan.chosen.series_uid)
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
        check = data["segment"]
        if not check["accepted"]:
            print(f"segment would refuse it: {check['reason']}")
        for w in check["warnings"]:
            print(f"segment would warn: {w}")
        return EXIT_OK
    print(f"medseg: error: {scan.root}: nothing to use: {scan.choice_reason}", file=sys.stderr)
    return EXIT_ERROR


def _segment_check(path: Path, series_uid: str) -> dict[str, Any]:
    """What ``medseg segment`` would say of the series before segmenting it (not CT, not HU,
    no body: refused; reservations: warnings), so ``info`` promises what ``segment`` does."""
    from medseg import io
    from medseg.errors import MedsegError
    from medseg.segment import check_input

    try:
        warnings = check_input(io.load(path, series=series_uid))
    except MedsegError as exc:
        return {"accepted": False, "reason": exc.reason, "warnings": []}
    return {"accepted": True, "reason": None, "warnings": warnings}


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


class _Progress:
    """One line on stderr, redrawn in place on a terminal; silent otherwise or with --quiet."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (total - done) if done else 0.0
        width = 30
        bar = "#" * int(width * done / max(total, 1))
        print(f"\r{self.label} [{bar:<{width}}] {done}/{total} slices, {elapsed:.1f} s, "
              f"ETA {eta:.0f} s", end="", file=sys.stderr, flush=True)
        if done >= total:
            print(file=sys.stderr)


def _cmd_segment(args: argparse.Namespace) -> int:
    from medseg.segment import segment_study

    if args.reference is None and str(args.reference_labels) != "auto":
        from medseg.errors import ConfigError

        raise ConfigError("--reference-labels applies to --reference LABELS, and none was "
                          "given")
    model: Any = args.model
    if Method(args.method) is Method.UNET:
        from medseg import _alloc
        from medseg.models import load_model

        model = load_model(args.model or DEFAULT_MODEL)  # a wrong --model fails first
        if args.own_process:  # torch and MONAI's objects: no collection walks them again
            _alloc.freeze_heap()
    progress = _Progress("segmenting", not args.quiet)
    try:
        result = segment_study(args.input, args.out_dir, series=args.series,
                               method=args.method, model=model,
                               batch_size=args.batch_size, threads=args.threads,
                               progress=progress, reference=args.reference,
                               report=not args.no_report, study_id=args.study_id,
                               show_phi=args.show_phi, dicom_outputs=not args.no_dicom_seg,
                               reference_labels=args.reference_labels, device=args.device)
    except KeyboardInterrupt as exc:  # Ctrl-C: the outputs are one unit (medseg.io.atomic)
        if progress.enabled:
            print(file=sys.stderr)  # end the progress line
        state = str(exc) or "nothing written, the output folder is as it was"
        print(f"medseg: interrupted: {args.out_dir}: {state}", file=sys.stderr)
        return EXIT_INTERRUPTED
    summary = result.summary
    for w in summary["warnings"]:
        print(f"medseg: warning: {args.input}: {w}", file=sys.stderr)
    if not args.quiet:
        v = summary["volumes_ml"]
        print(f"wrote {args.out_dir / 'lungs.nii.gz'} and segment.json: right {v['right']:.0f} "
              f"mL, left {v['left']:.0f} mL, total {v['total']:.0f} mL in "
              f"{summary['timings_s']['total']:.1f} s")
    return EXIT_OK


def _cmd_train(args: argparse.Namespace) -> int:
    from medseg.config import read_yaml
    from medseg.train import load_train_config, train

    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    job = read_yaml(args.config).get("job")
    if job == "train_refine":  # the 3D refinement stage (medseg.train.refine)
        from medseg.errors import ConfigError
        from medseg.train.refine import load_refine_config, train_refiner

        if args.device not in (None, "cpu"):
            raise ConfigError(f"--device {args.device}: the 3D refinement stage trains on "
                              "the CPU only (medseg.train.refine)", path=args.config)

        rcfg = load_refine_config(args.config, output_dir=args.output_dir)
        if args.max_minutes is not None:
            rcfg.training.minutes = args.max_minutes
        rcard = train_refiner(rcfg, log=log)
        if not args.quiet:
            out = Path(rcfg.output_dir)
            pair = out / f"{rcard['name']}-on-{rcfg.base_model}.json"
            print(f"refinement card: {out / (rcard['name'] + '.json')}; with its slice "
                  f"model: {pair}")
        return EXIT_OK
    cfg = load_train_config(args.config, output_dir=args.output_dir, max_minutes=args.max_minutes,
                            device=args.device)
    card = train(cfg, log=log)
    if not args.quiet:
        print(f"model card: {Path(cfg.output_dir) / (card['name'] + '.json')}")
    return EXIT_OK


def _fmt_metric(v: float) -> str:
    return "inf" if v == float("inf") else f"{v:.3f}"


_METRIC_KEYS = ("dice", "iou", "hd", "hd95", "assd", "nsd", "volume_diff_ml")


def _print_metric_table(metrics: dict[str, dict[str, float]]) -> None:
    print(f"  {'label':<6}" + "".join(f"{k:>15}" for k in _METRIC_KEYS))
    for label, m in metrics.items():
        print(f"  {label:<6}" + "".join(f"{_fmt_metric(m[k]):>15}" for k in _METRIC_KEYS))


def _label_convention(text: str) -> Any:
    from medseg.errors import ConfigError
    from medseg.evaluate import LabelConvention

    try:
        return LabelConvention.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.reason) from exc


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from medseg.errors import ConfigError
    from medseg.evaluate import to_jsonable
    from medseg.validation import evaluate_cohort, evaluate_pair

    single = args.pred is not None or args.ref is not None
    cohort = args.pred_dir is not None or args.ref_dir is not None
    if single == cohort or (single and (args.pred is None or args.ref is None)) or (
            cohort and (args.pred_dir is None or args.ref_dir is None or args.out_dir is None)):
        raise ConfigError("give PRED REF for one pair, or --pred-dir D --ref-dir D -o OUT_DIR "
                          "for a cohort")
    labels = {"pred_labels": args.pred_labels, "ref_labels": args.ref_labels,
              "flags": ("--pred-labels", "--ref-labels")}
    if single:
        res = evaluate_pair(args.pred, args.ref, **labels)
        if args.json:
            print(json.dumps(to_jsonable(res), indent=2))
        else:
            print(f"{args.pred} ({res['labels']['pred']}) vs {args.ref} "
                  f"({res['labels']['ref']}), distances in mm:")
            _print_metric_table(res["metrics"])
            for note in res["notes"]:
                print(f"  note: {note}")
        return EXIT_OK
    result = evaluate_cohort(args.pred_dir, args.ref_dir, args.out_dir, **labels)
    acc = result.accumulator
    summary = acc.summary()
    if args.json:
        print(json.dumps(to_jsonable({
            "cases": acc.rows(), "summary": acc.summary_rows(), "notes": result.notes,
            "failed": result.failed, "unmatched_predictions": result.unmatched_predictions,
            "outputs": {k: str(v) for k, v in result.outputs.items()}}), indent=2))
    else:
        lung = summary["lung"]
        print(f"{len(acc)} cases; Dice (both lungs) mean {_fmt_metric(lung['dice'].mean or 0)}"
              f", median {_fmt_metric(lung['dice'].median or 0)}; "
              f"{len(result.failed)} failed")
        for cid in result.failed:
            print(f"  failed: {cid}: {result.notes.get(cid, 'a lung missed (Dice 0)')}")
        for cid in result.unmatched_predictions:
            print(f"  no reference for prediction {cid!r}: not scored")
        noted = [cid for cid in result.notes if cid not in result.failed]
        for cid in noted[:5]:
            print(f"  note: {cid}: {result.notes[cid]}")
        if len(noted) > 5:
            print(f"  ... and {len(noted) - 5} more notes (cohort.html, --json)")
        print(f"wrote {', '.join(str(p) for p in result.outputs.values())}")
    return EXIT_ERROR if result.failed and args.fail_on_failure else EXIT_OK


def _cmd_validate_model(args: argparse.Namespace) -> int:
    from medseg.train.validate import validate_on_cip

    shared = args.shared_data or _default_shared_data()
    rob = None
    if args.suite in ("robustness", "all"):
        from medseg.train.robustness import run_robustness

        rob = run_robustness(shared, model=args.model, out_dir=args.output_dir,
                             device=args.device,
                             log=None if args.json else
                             (lambda m: print(f"  {m}", file=sys.stderr)))
    if args.suite == "robustness":
        assert rob is not None
        _print_robustness(rob, args.json)
        return EXIT_OK
    res = validate_on_cip(shared, method=args.method, model=args.model,
                          val_fraction=args.val_fraction, device=args.device)
    if args.json:
        from medseg.evaluate import to_jsonable

        out = to_jsonable(res) if rob is None else {"cip": to_jsonable(res), "robustness": rob}
        print(json.dumps(out, indent=2))
        return EXIT_OK
    name = res["model"]["name"] if res["model"] else res["method"]
    print(f"{name} on {res['data']}, held-out slices {res['validation_slices'][0]}-"
          f"{res['validation_slices'][1]} (z {res['validation_z_mm'][0]} to "
          f"{res['validation_z_mm'][1]} mm)")
    _print_metric_table(res["metrics"])
    if rob is not None:
        print()
        _print_robustness(rob, False)
    return EXIT_OK


def _print_robustness(rob: dict[str, Any], as_json: bool) -> None:
    from medseg.train.robustness import RobustnessRow, rows_markdown

    if as_json:
        print(json.dumps(rob, indent=2))
        return
    print(f"robustness of {rob['model']}: {rob['passed']} passed, {rob['failed']} failed "
          f"({rob['timings_s']['total']} s)\n")
    print(rows_markdown([RobustnessRow(**r) for r in rob["rows"]]))
    for k, v in rob["notes"].items():
        print(f"- {k}: {v}")


def _default_shared_data() -> Path:
    import os

    env = os.environ.get("MEDSEG_SHARED_DATA")
    return Path(env) if env else Path("../shared/data")


def _cmd_run(args: argparse.Namespace) -> int:
    from medseg.config import read_yaml
    from medseg.errors import ConfigError

    job = read_yaml(args.config).get("job")
    if job in ("train", "train_refine"):
        return _cmd_train(argparse.Namespace(config=args.config, output_dir=None,
                                             max_minutes=None, device=None, quiet=args.quiet))
    if job == "batch":
        from medseg.batch_cli import run_config

        return run_config(args.config, quiet=args.quiet)
    if job == "listen":
        from medseg.node.cli import run_config as run_node_config

        return run_node_config(args.config, quiet=args.quiet)
    raise ConfigError(f"unknown job {job!r}; known: train, train_refine, batch, listen",
                      path=args.config)


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
        paths = write_phantom_study(out_dir, seed=seed, shape=args.shape, spacing=args.spacing,
                                    abdomen=args.abdomen, effusion=args.effusion,
                                    coverage=args.coverage)
        if not args.quiet:
            print(f"phantom seed {seed}: " + ", ".join(str(p) for p in paths.values()))
    return EXIT_OK


def _register_info(sub: Any) -> None:
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


def _register_convert(sub: Any) -> None:
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


def _register_segment(sub: Any) -> None:
    from medseg.batch_cli import positive_int

    p = sub.add_parser(
        "segment", help="segment the lungs of a CT: lungs.nii.gz + segment.json",
        description="Segment the right (label 1) and left (label 2) lung of INPUT. Writes "
        "OUT_DIR/lungs.nii.gz (uint8, on the input's exact grid and orientation) and "
        "OUT_DIR/segment.json (what ran, model checksum, input summary, timings, lung volumes, "
        "warnings); for DICOM input also OUT_DIR/lungs.seg.dcm (DICOM SEG on the source images' "
        "planes) and OUT_DIR/lungs.sr.dcm (DICOM SR measurement report). The outputs are one "
        "unit: OUT_DIR is locked while a run writes, and a failed or interrupted run leaves it "
        "as it was; these files of an earlier run that this run does not write (e.g. the SEG "
        "after a NIfTI run, report.* with --no-report) are removed, other files are left "
        "alone (docs/concepts/outputs.md). Runs offline on the CPU with the model shipped in "
        "the package.")
    p.add_argument("input", type=Path, help="DICOM folder/file, NIfTI, NRRD or MHA (CT in HU)")
    p.add_argument("-o", "--out-dir", type=Path, required=True, help="output folder")
    p.add_argument("--series", metavar="UID", help="SeriesInstanceUID to use")
    p.add_argument("--method", choices=METHODS, default=Method.UNET.value,
                   help="unet (default): the trained 2D U-Net; threshold: the classical "
                   "HU-threshold baseline")
    p.add_argument("--model", default=None,
                   help="shipped model name or path to a model card .json (default "
                   f"{DEFAULT_MODEL})")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help=f"slices per network call (default {DEFAULT_BATCH_SIZE}, the fastest "
                   "measured on a 2-core CPU; see docs/benchmarks.md)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for the network (default: torch's choice)")
    p.add_argument("--device", type=device_argument, default="cpu", help=DEVICE_HELP)
    p.add_argument("--reference", type=Path, default=None, metavar="LABELS",
                   help="reference labels on the input's grid (1 right, 2 left): the report "
                   "then holds Dice, HD95 ... against it")
    p.add_argument("--reference-labels", type=_label_convention, default="auto",
                   metavar="SPEC", help="label convention of --reference (default auto: "
                   "right=1,left=2, or lung=1 for a 0/1 mask); the grammar of 'medseg "
                   "evaluate --ref-labels', e.g. lung=255 or cip"),
    p.add_argument("--study-id", default=None,
                   help="name shown in the report (default: the input's name)")
    p.add_argument("--no-report", action="store_true",
                   help="skip report.json/.html/.csv (lungs.nii.gz and segment.json only)")
    p.add_argument("--show-phi", action="store_true",
                   help="show patient name, ID and study date in the report (hidden by "
                   "default)")
    p.add_argument("--no-dicom-seg", action="store_true",
                   help="for DICOM input, skip lungs.seg.dcm (DICOM SEG) and lungs.sr.dcm "
                   "(DICOM SR measurement report), written by default")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    p.set_defaults(func=_cmd_segment)


def _register_evaluate(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate", help="score predicted lung masks against references (one pair or a cohort)",
        description="One pair: 'medseg evaluate PRED REF' prints Dice, IoU, Hausdorff, HD95, "
        "ASSD, NSD (2 mm) and volume difference for the right lung (label 1), the left lung "
        "(2) and both together; distances in mm from the voxel spacing. The two grids must be "
        "the same in world space. Both maps' label values are checked against their "
        "conventions (--pred-labels, --ref-labels): a binary 0/1 reference scores both lungs "
        "together, with a note; 255 or CIP label maps need their convention given, else the "
        "command refuses and names the values found. "
        "A cohort: 'medseg evaluate --pred-dir D --ref-dir D -o OUT' "
        "matches REF_DIR/<id>.nii.gz with PRED_DIR/<id>.nii.gz or PRED_DIR/<id>/lungs.nii.gz "
        "and writes cohort.html, cohort_cases.csv and cohort_summary.csv; a missing or "
        "unreadable prediction counts as a failure, never drops out.",
        epilog="See docs/concepts/metrics.md for the definitions.")
    p.add_argument("pred", type=Path, nargs="?", help="predicted label file")
    p.add_argument("ref", type=Path, nargs="?", help="reference label file")
    p.add_argument("--pred-dir", type=Path, help="folder of predictions (cohort)")
    p.add_argument("--ref-dir", type=Path, help="folder of references (cohort)")
    p.add_argument("-o", "--out-dir", type=Path, help="cohort report folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--fail-on-failure", action="store_true",
                   help="exit 1 when a cohort case failed (a missed lung)")
    p.add_argument("--pred-labels", type=_label_convention, default="right=1,left=2",
                   metavar="SPEC", help="label convention of the predictions (default "
                   "right=1,left=2, medseg's and lungmask's); see --ref-labels")
    p.add_argument("--ref-labels", type=_label_convention, default="auto", metavar="SPEC",
                   help="label convention of the references: 'right=1,left=2', 'lung=1', "
                   "'lung=255', 'lung=1-255', 'right=1+3,left=2+4-5', add "
                   "'background=N-M' for other structures, or 'cip' for a Chest Imaging "
                   "Platform label map. Default 'auto': right=1,left=2, or lung=1 for a "
                   "0/1 mask (then only both lungs together are scored, with a note). A "
                   "value the convention does not name is an error")
    p.set_defaults(func=_cmd_evaluate)


def _register_train(sub: Any) -> None:
    p = sub.add_parser(
        "train", help="train the lung U-Net from a YAML config",
        description="Train the 2D U-Net as configured in CONFIG (e.g. "
        "pipelines/train_lung2d.yaml): phantoms + the labelled real study, Dice+CE loss, "
        "validation Dice every epoch, early stopping. Writes weights, a model card (JSON with "
        "the weights' SHA-256), log.csv and curves.png to the output folder. A config with "
        "job: train_refine (e.g. pipelines/train_lung3d_r2.yaml) trains the 3D refinement "
        "stage of a slice model instead (medseg.train.refine): --max-minutes then overrides "
        "training.minutes.")
    p.add_argument("config", type=Path, help="training config (YAML)")
    p.add_argument("--output-dir", default=None, help="override output_dir")
    p.add_argument("--max-minutes", type=float, default=None, help="override max_minutes")
    p.add_argument("--device", type=device_argument, default=None,
                   help="override device (the config's, default cpu): " + DEVICE_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help="no per-epoch log")
    p.set_defaults(func=_cmd_train)


def _register_validate_model(sub: Any) -> None:
    p = sub.add_parser(
        "validate-model", help="score a lung model on the held-out part of cip-ct64",
        description="Segment ../shared/data/cip-ct64 end to end and score the inferior part "
        "of the lungs, which training holds out (the same cut as pipelines/train_lung2d.yaml): "
        "Dice, IoU, Hausdorff, HD95, ASSD, NSD and volume difference per lung and for both, "
        "on the study's own grid. The numbers in docs/model-card.md come from this command.")
    p.add_argument("--shared-data", type=Path, default=None,
                   help="folder holding cip-ct64 (default $MEDSEG_SHARED_DATA or "
                   "../shared/data)")
    p.add_argument("--method", choices=METHODS, default=Method.UNET.value,
                   help="what to score (default unet)")
    p.add_argument("--model", default=None,
                   help="shipped model name or path to a model card .json (default "
                   f"{DEFAULT_MODEL})")
    p.add_argument("--val-fraction", type=float, default=0.5,
                   help="held-out inferior fraction of the lung slices (default 0.5, as "
                   "trained)")
    p.add_argument("--suite", choices=["cip", "robustness", "all"], default="cip",
                   help="cip: the held-out cip-ct64 scores (default); robustness: the real-CT "
                   "robustness suite (docs/concepts/robustness.md; a few minutes); all: both")
    p.add_argument("-o", "--output-dir", type=Path, default=None,
                   help="robustness: write robustness.json, robustness.md and overlay PNGs "
                   "here")
    p.add_argument("--device", type=device_argument, default="cpu", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_validate_model)


def _register_run(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="run a job described by a pipelines/*.yaml file",
        description="Run the job a YAML config describes: its 'job' key says which ('batch': "
        "segment a folder, a manifest or a DICOMweb server, as 'medseg batch'; 'train': train "
        "a model, as 'medseg train'; 'listen': run the DICOM node, as 'medseg listen'), the "
        "other keys are that command's options. The file is "
        "read with yaml.safe_load and validated before anything runs: an unknown key or a bad "
        "value is an error naming the file. Examples: pipelines/batch_lung.yaml, "
        "pipelines/train_lung2d_v2.yaml, pipelines/dicom_node.yaml.")
    p.add_argument("config", type=Path, help="pipeline config (YAML)")
    p.add_argument("-q", "--quiet", action="store_true", help="less output")
    p.set_defaults(func=_cmd_run)


def _register_synth(sub: Any) -> None:
    from medseg.batch_cli import positive_int

    p = sub.add_parser(
        "synth", help="generate labelled synthetic chest-CT phantoms",
        description="Write deterministic chest-CT phantoms with exact lung labels "
        "(0 background, 1 right lung, 2 left lung): OUT_DIR/dicom/, image.nii.gz, "
        "labels.nii.gz. With --count N, one sub-folder per phantom.")
    p.add_argument("out_dir", type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--count", type=positive_int, default=1, help="number of phantoms (default 1)")
    p.add_argument("--shape", type=lambda t: _parse_triple(t, int), default=(64, 128, 128),
                   metavar="Z,Y,X", help="voxels (default 64,128,128). The generator "
                   "holds full-size float64 intermediates: about 130 bytes per voxel at its "
                   "peak (19 GiB for 600,512,512; measured), so keep clinical-size "
                   "phantoms to a few hundred slices")
    p.add_argument("--spacing", type=lambda t: _parse_triple(t, float),
                   default=(2.7, 2.7, 5.0), metavar="SX,SY,SZ",
                   help="voxel size in mm (default 2.7,2.7,5.0)")
    p.add_argument("--abdomen", action="store_true", help="add the upper abdomen: liver, "
                   "spleen, stomach with a gas bubble, gas-containing colon and small bowel "
                   "(never lung)")
    p.add_argument("--effusion", action="store_true", help="add pleural effusion(s): "
                   "dependent fluid replacing lung in the costophrenic recess (label 0)")
    p.add_argument("--coverage", choices=("chest", "abdomen"), default="chest",
                   help="scanned range: chest (default) or abdomen (only the bottom 20-60 mm "
                   "of the lungs and the upper abdomen)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=_cmd_synth)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medseg",
        description="Lung segmentation and reporting for chest CT. Reads DICOM folders "
        "(several series, compressed, enhanced multi-frame, DICOMDIR), NIfTI, NRRD and MHA.",
        epilog="Run 'medseg COMMAND --help' for the options of a command. Environment: "
        "MEDSEG_PRECISION=auto|fp32|bf16 sets the network's precision. auto (default) runs "
        "bfloat16 on a CPU with AVX512_BF16 or AMX for a model validated for it (the shipped "
        "one: 1.6x faster network, masks within Dice 0.9995 of fp32; docs/benchmarks.md), "
        "else fp32; segment.json records which ran.",
    )
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _register_info(sub)
    _register_convert(sub)
    _register_segment(sub)
    _register_evaluate(sub)
    _register_train(sub)
    _register_validate_model(sub)
    _register_run(sub)
    _register_synth(sub)
    # commands with their own module
    from medseg.batch_cli import register as register_batch
    from medseg.node.cli import register as register_listen
    from medseg.pacs.cli import register as register_pacs
    from medseg.qc_cli import register as register_qc

    register_qc(sub)
    register_batch(sub)
    register_pacs(sub)
    register_listen(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # the process's own command line (not a caller's main(argv)): the process ends after it,
    # so its heap may be frozen (medseg._alloc.freeze_heap); a caller keeps its collector
    args.own_process = argv is None
    from medseg import _alloc

    _alloc.tune()
    try:
        return int(args.func(args))
    except MedsegError as exc:
        print(f"medseg: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("medseg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if args.own_process:
            _alloc.freeze_heap()  # its exit need not walk torch's objects (0.9 s)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
