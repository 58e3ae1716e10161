"""End-to-end lung segmentation time: medseg versus lungmask R231, same machine, same run.

Usage:
    python benchmarks/segment_vs_lungmask.py [--case philips|synthetic300|all] [--threads N]
                                             [--warm-up]

Cases: ``philips`` = ../shared/data/chest-ct-philips-141 (141 x 512 x 512, DICOM);
``synthetic300`` = a 300 x 512 x 512 phantom written as NIfTI. Both tools read the same input
file(s) from disk and write a NIfTI mask, timed from the start of reading to the written outputs.
Both are timed warm (imports done, model loaded: lungmask builds its ``LMInferer`` before its
clock); with ``--warm-up`` each tool first processes the input once untimed (a worker's steady
state after its first study); medseg is also timed cold, as the command a user types
(``python -m medseg.cli segment``).

lungmask runs its own ``LMInferer`` pipeline (its preprocessing, its 31 M-parameter U-Net at
256 x 256, its postprocessing). Its weights cannot be downloaded here, so its U-Net is built
with random weights (seeded): the arithmetic is the same as with trained weights; only its
postprocessing, which depends on the predicted mask, may take a different time.
Needs ``pip install lungmask`` (the ``bench`` extra).

Peak memory of medseg on a 512 x 512 x 600 volume: ``--memory`` runs ``medseg segment`` in a
child process and reports its maximum resident set size.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # appended: medseg itself still comes from PYTHONPATH first
from benchmarks.segment_before_after import medseg_command  # noqa: E402

SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))


def make_synthetic(path: Path, n_slices: int) -> Path:
    from medseg.io import save
    from medseg.synth import make_phantom

    image, _ = make_phantom(seed=7, shape=(n_slices, 512, 512), spacing=(0.7, 0.7, 1.0))
    save(image, path)
    return path


def run_medseg(src: Path, out: Path, threads: int | None, model_name: str,
               warm_up: bool = False) -> float:
    """Warm, like lungmask below: libraries imported and the model loaded before the clock
    starts (lungmask's ``LMInferer`` is built before its clock too). Everything else that
    ``medseg segment`` does is timed: read, segment, write the mask, the report files
    (HTML with montages, JSON, CSV) and, for DICOM input, the DICOM SEG and SR."""
    import medseg.inference.unet  # torch, MONAI
    import medseg.io.dicom_seg  # highdicom
    import medseg.io.dicom_sr
    import medseg.report.study  # noqa: F401  (Jinja2, matplotlib)
    from medseg import _alloc
    from medseg.models import load_model
    from medseg.segment import segment_study

    _alloc.tune()  # as the medseg command does (lungmask, run later in this process, gains too)
    model = load_model(model_name)
    _alloc.freeze_heap()  # as a batch worker does once its model is loaded
    if warm_up:  # a worker's steady state: one study done before the timed one
        segment_study(src, out.with_name(out.name + "_warm_up"), threads=threads, model=model)
    t0 = time.perf_counter()
    segment_study(src, out, threads=threads, model=model)
    return time.perf_counter() - t0


def run_medseg_cli(src: Path, out: Path, threads: int | None, model_name: str) -> float:
    """Cold: the wall time of the command a user types, Python start-up and imports included."""
    cmd = [*medseg_command(), "segment", str(src), "-o", str(out), "-q", "--model", model_name]
    if threads:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def run_lungmask(src: Path, out: Path, threads: int | None, warm_up: bool = False) -> float:
    import SimpleITK as sitk
    import torch
    from lungmask import LMInferer
    from lungmask.resunet import UNet

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = UNet(n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True,
               residual=False)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "r231_random.pth"
        torch.save(net.state_dict(), weights)
        inferer = LMInferer(modelpath=str(weights), force_cpu=True, tqdm_disable=True)

        def once() -> float:
            t0 = time.perf_counter()
            if src.is_dir():
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(src)))
                image = reader.Execute()
            else:
                image = sitk.ReadImage(str(src))
            mask = inferer.apply(image)
            out_img = sitk.GetImageFromArray(mask)
            out_img.CopyInformation(image)
            out.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(out_img, str(out / "lungmask.nii.gz"), useCompression=True)
            return time.perf_counter() - t0

        if warm_up:
            once()
        return once()


def peak_memory(src: Path, out: Path, model_name: str) -> float:
    """Maximum RSS (GiB) of a child process running ``medseg segment``, from that child's
    own resource usage (``os.wait4``), not the maximum over every child of this process."""
    cmd = [*medseg_command(), "segment", str(src), "-o", str(out), "-q", "--model", model_name]
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"medseg segment failed with exit code {proc.returncode}")
    return usage.ru_maxrss / 1024**2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["philips", "synthetic300", "all"], default="all")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory", action="store_true",
                    help="only measure medseg's peak memory on a 600-slice 512x512 volume")
    ap.add_argument("--model", default=None,
                    help="medseg's model: a shipped name or a card (default: the default "
                         "model, lung2d-v8; lung2d-v19 for the two-view model)")
    ap.add_argument("--warm-up", action="store_true",
                    help="run each tool once on the input before its timed (warm) run: the "
                         "steady state of a worker after its first study (first-call set-up, "
                         "caches); without it the timed run is the process's first")
    args = ap.parse_args()
    from medseg.inference import DEFAULT_MODEL

    model_name = args.model or DEFAULT_MODEL
    if not args.memory:
        try:
            import lungmask  # noqa: F401
        except ImportError:
            sys.exit("lungmask is not installed: pip install -e '.[bench]'")
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        if args.memory:
            src = tmpd / "ct600.nii.gz"
            subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "from segment_vs_lungmask import make_synthetic; "
                            "from pathlib import Path; make_synthetic(Path(sys.argv[2]), 600)",
                            str(Path(__file__).parent), str(src)], check=True)
            gib = peak_memory(src, tmpd / "out_mem", model_name)
            print(f"medseg segment --model {model_name}, 512x512x600: peak RSS {gib:.2f} GiB")
            return
        cases = []
        if args.case in ("philips", "all"):
            cases.append(("chest-ct-philips-141 (DICOM 512x512x141)",
                          SHARED / "chest-ct-philips-141"))
        if args.case in ("synthetic300", "all"):
            cases.append(("synthetic 512x512x300 (NIfTI)",
                          make_synthetic(tmpd / "ct300.nii.gz", 300)))
        for label, src in cases:
            t_cli = run_medseg_cli(src, tmpd / "medseg_cli", args.threads, model_name)
            t_med = run_medseg(src, tmpd / "medseg", args.threads, model_name, args.warm_up)
            t_lm = run_lungmask(src, tmpd / "lungmask", args.threads, args.warm_up)
            warm = "warm, after a warm-up study" if args.warm_up else "warm"
            print(f"{label}: medseg ({model_name}) {t_med:.2f} s ({warm}; the command, cold: "
                  f"{t_cli:.1f} s), "
                  f"lungmask R231 {t_lm:.1f} s ({warm}), ratio {t_lm / t_med:.1f}x "
                  f"(cold command: {t_lm / t_cli:.1f}x)", flush=True)


if __name__ == "__main__":
    main()
