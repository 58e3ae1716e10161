"""``medseg listen`` and ``medseg run <job: listen>``: the DICOM node's command line.

Every line the node logs goes to stderr with a UTC timestamp (``-q``: errors only). The
node runs until Ctrl-C or SIGTERM (what systemd and docker send), then stops listening,
lets the study in progress give its attempt back, and exits 0. Exit status 1 when it cannot
start (port in use, no model, bad settings: the reason is printed)."""

from __future__ import annotations

import argparse
import datetime as _dt
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from medseg.conventions import METHODS, Method
from medseg.errors import ConfigError

__all__ = ["register", "run_config"]


def _logger(quiet: bool) -> Any:
    lock = threading.Lock()

    def log(message: str) -> None:
        if quiet and not message.startswith("error:"):
            return
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        with lock:
            print(f"{stamp} medseg listen: {message}", file=sys.stderr, flush=True)

    return log


def serve(config: Any, *, quiet: bool = False) -> int:
    """Run the node of ``config`` (a :class:`~medseg.node.service.NodeConfig`) until
    stopped; the exit status."""
    from medseg.node.service import run_node

    log = _logger(quiet)
    stop = threading.Event()

    def on_term(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        run_node(config, log=log, stop=stop)
    except KeyboardInterrupt:
        log("stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _config(**kwargs: Any) -> Any:
    from medseg.node.service import NodeConfig

    try:
        return NodeConfig(**kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _cmd_listen(args: argparse.Namespace) -> int:
    config = _config(out_dir=str(args.out_dir), port=args.port, host=args.host,
                     ae_title=args.ae_title, allow=list(args.allow or []),
                     allow_any=args.allow_any, allow_addresses=list(args.allow_address or []),
                     send_to=args.send_to, quiet_time=args.quiet_time,
                     incomplete_timeout=args.incomplete_timeout, method=args.method,
                     model=args.model, threads=args.threads, max_attempts=args.max_attempts,
                     show_phi=args.show_phi, tls_cert=_opt(args.tls_cert),
                     tls_key=_opt(args.tls_key), tls_ca=_opt(args.tls_ca),
                     device=args.device)
    return serve(config, quiet=args.quiet)


def _opt(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def run_config(path: str | Path, *, quiet: bool = False) -> int:
    """``medseg run pipelines/dicom_node.yaml`` (``job: listen``; the keys are those of
    :class:`~medseg.node.service.NodeConfig`)."""
    from medseg.config import from_mapping, read_yaml
    from medseg.node.service import NodeConfig

    p = Path(path)
    data = read_yaml(p)
    if data.get("job") != "listen":
        raise ConfigError(f"expected 'job: listen', got job {data.get('job')!r}", path=p)
    config = from_mapping(NodeConfig, {k: v for k, v in data.items() if k != "job"}, path=p)
    return serve(config, quiet=quiet)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from exc
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value:g}")
    return value


def register(sub: Any) -> None:
    """Add the ``listen`` subcommand to the ``medseg`` parser."""
    from medseg.batch_cli import positive_int
    from medseg.inference.device import DEVICE_HELP, device_argument

    p = sub.add_parser(
        "listen", help="run as a DICOM node: receive CT by C-STORE, send SEG and SR back",
        description="Listen for DICOM associations (a Storage SCP): the PACS, Orthanc or a "
        "modality sends CT series by C-STORE; a series is complete when its sender released "
        "the association and nothing arrived for --quiet-time seconds. Each complete study "
        "is segmented as 'medseg batch' segments a study (the same selection of the series "
        "as the DICOMweb batch: CT, axial, no localizer, thinnest slices; the same "
        "OUT_DIR/<study>/ outputs, summary.csv and batch.sqlite, retries, the model loaded "
        "once), and with --send-to its DICOM SEG and SR are sent back by C-STORE. Only the "
        "calling AE titles given with --allow may store. Received instances wait in "
        "OUT_DIR/.spool/ until their study is done; OUT_DIR/node.sqlite records every series "
        "(why it was or was not segmented) and every send. Stop with Ctrl-C or SIGTERM; a "
        "restart resumes where it stopped.",
        epilog="Orthanc autorouting, dcm4chee, firewall and TLS notes: "
        "docs/how-to/dicom-node.md. The same settings as a YAML file: "
        "pipelines/dicom_node.yaml (medseg run).")
    p.add_argument("-o", "--out-dir", type=Path, required=True,
                   help="output folder (results, state, spool)")
    p.add_argument("--port", type=_port, default=11112,
                   help="TCP port to listen on (default 11112, the registered DICOM port; "
                   "104 needs root)")
    p.add_argument("--host", default="0.0.0.0",
                   help="address to listen on (default 0.0.0.0: every interface; "
                   "127.0.0.1: this machine only)")
    p.add_argument("--ae-title", default="MEDSEG",
                   help="this node's AE title; associations must be addressed to it "
                   "(default MEDSEG)")
    p.add_argument("--allow", nargs="+", action="extend", metavar="CALLING_AE",
                   help="calling AE titles that may store (e.g. ORTHANC); others are "
                   "rejected at association. Required unless --allow-any")
    p.add_argument("--allow-any", action="store_true",
                   help="accept every calling AE title (only on a closed network)")
    p.add_argument("--allow-address", nargs="+", action="extend", metavar="IP",
                   help="also require one of these source IP addresses")
    p.add_argument("--send-to", metavar="AE@HOST:PORT",
                   help="where the DICOM SEG and SR go by C-STORE, e.g. ORTHANC@pacs:4242 "
                   "(default: nowhere, results stay in OUT_DIR)")
    p.add_argument("--quiet-time", type=_seconds, default=10.0, metavar="SECONDS",
                   help="a series is complete this long after its last instance, once the "
                   "sender released the association (default 10)")
    p.add_argument("--incomplete-timeout", type=_seconds, default=3600.0, metavar="SECONDS",
                   help="discard a series whose sender aborted and never sent it again "
                   "after this long (default 3600)")
    p.add_argument("--method", choices=METHODS, default=Method.UNET.value,
                   help="unet (default): the trained 2D U-Net; threshold: the HU baseline")
    p.add_argument("--model", default=None,
                   help="shipped model name or path to a model card .json (loaded once)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: all cores)")
    p.add_argument("--max-attempts", type=positive_int, default=2,
                   help="tries per study (default 2)")
    p.add_argument("--device", type=device_argument, default="cpu", help=DEVICE_HELP)
    p.add_argument("--show-phi", action="store_true",
                   help="show patient name, ID and study date in the reports (never in logs)")
    p.add_argument("--tls-cert", type=Path, metavar="PEM",
                   help="DICOM over TLS: this node's certificate (with --tls-key)")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="the certificate's key")
    p.add_argument("--tls-ca", type=Path, metavar="PEM",
                   help="require senders' certificates signed by this CA (and verify the "
                   "--send-to destination with it)")
    p.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    p.set_defaults(func=_cmd_listen)
