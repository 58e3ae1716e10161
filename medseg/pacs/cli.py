"""``medseg pacs query|pull|push`` and the DICOMweb options of ``medseg batch``: argument
parsing and printing only; the work is :class:`medseg.pacs.client.PacsClient`.

Credentials are never arguments (they would be in the shell history and in ``ps``): they
come from ``MEDSEG_DICOMWEB_USER``/``MEDSEG_DICOMWEB_PASSWORD``, ``MEDSEG_DICOMWEB_TOKEN``
or ``--auth-file``. Errors print one line naming the URL and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError, MedsegError
from medseg.pacs.options import ORIGINAL_PRIMARY, PacsBatchOptions, SelectionRules

__all__ = ["add_batch_arguments", "batch_options", "register"]

EXIT_OK = 0
EXIT_ERROR = 1

_DATE = re.compile(r"^(\d{8})?(-)?(\d{8})?$")

_CREDENTIALS_HELP = (
    "credentials: MEDSEG_DICOMWEB_USER + MEDSEG_DICOMWEB_PASSWORD (HTTP basic) or "
    "MEDSEG_DICOMWEB_TOKEN (bearer) in the environment, or --auth-file FILE (JSON "
    '{"username": ..., "password": ...} or {"token": ...}, or netrc lines "machine HOST '
    'login USER password PASS"; readable by you only: chmod 600). Never on the command '
    "line, never in the URL; never printed.")

_EXAMPLES = """\
examples:
  export MEDSEG_DICOMWEB_USER=alice MEDSEG_DICOMWEB_PASSWORD=...   # or MEDSEG_DICOMWEB_TOKEN
  medseg pacs query http://localhost:8042/dicom-web --modality CT --date 20240101-20241231
  medseg pacs query http://localhost:8042/dicom-web --study 1.2.840... --series
  medseg pacs pull  http://localhost:8042/dicom-web 1.2.840... --select -o ct/
  medseg segment ct/ -o seg/            # writes lungs.seg.dcm and lungs.sr.dcm
  medseg pacs push  http://localhost:8042/dicom-web seg/lungs.seg.dcm seg/lungs.sr.dcm
  medseg batch dicomweb+http://localhost:8042/dicom-web -o out/ --pacs-modality CT --push

See docs/how-to/pacs.md.
"""


def _wrap(text: str) -> str:
    """Wrap a description by hand: the raw formatter (which keeps the examples' layout)
    does not."""
    return textwrap.fill(text, width=88)


def _date(text: str) -> str:
    m = _DATE.match(text.strip())
    if not text.strip() or m is None or (m.group(2) is None and m.group(3) is not None):
        raise argparse.ArgumentTypeError(f"expected YYYYMMDD or a range YYYYMMDD-YYYYMMDD "
                                         f"(either end may be left open), got {text!r}")
    return text.strip()


def _image_type(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("any", ""):
        return ()
    return tuple(v.strip().upper() for v in text.split(",") if v.strip())


def _add_connection(p: argparse.ArgumentParser, *, batch: bool = False) -> None:
    g = p.add_argument_group("connection" if not batch else
                             "DICOMweb connection (SOURCE = dicomweb+URL)")
    g.add_argument("--auth-file", type=Path, default=None, metavar="FILE",
                   help="credentials file (JSON or netrc style, mode 600); default: the "
                   "MEDSEG_DICOMWEB_* environment variables")
    g.add_argument("--ca-bundle", type=Path, default=None, metavar="PEM",
                   help="CA certificate(s) to verify the server's TLS certificate (a "
                   "hospital's private CA)")
    g.add_argument("--insecure", action="store_true",
                   help="do not verify the TLS certificate (test servers only: a warning is "
                   "printed)")
    g.add_argument("--pacs-timeout" if batch else "--timeout", dest="pacs_timeout",
                   type=float, default=30.0, metavar="SECONDS",
                   help="give up on a request after this long without an answer (default 30)")
    g.add_argument("--pacs-retries" if batch else "--retries", dest="pacs_retries", type=int,
                   default=2, metavar="N",
                   help="retries on connection errors and 408/429/503/504 (default 2)")


def _warn_insecure(args: argparse.Namespace, url: str) -> None:
    if args.insecure:
        print(f"medseg: warning: {url}: --insecure: the server's TLS certificate is not "
              "verified; anyone on the network path can read the images and the "
              "credentials", file=sys.stderr)


def _client(args: argparse.Namespace) -> Any:
    from medseg.pacs.client import PacsClient, make_config

    _warn_insecure(args, args.url)
    config = make_config(args.url, auth_file=args.auth_file, ca_bundle=args.ca_bundle,
                         insecure=args.insecure, timeout=args.pacs_timeout,
                         retries=args.pacs_retries)
    return PacsClient(config)


def _rules(args: argparse.Namespace) -> SelectionRules:
    return SelectionRules(axial=not args.allow_oblique, image_type=args.image_type)


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _s(v: Any) -> str:
    return "" if v is None else str(v)


def _cmd_query(args: argparse.Namespace) -> int:
    client = _client(args)
    filters = {"PatientID": args.patient, "Modality" if args.series else
               "ModalitiesInStudy": args.modality,
               "StudyDate": args.date, "SeriesDescription" if args.series else
               "StudyDescription": args.description}
    filters = {k: v for k, v in filters.items() if v}
    if not args.series:
        if args.study:
            filters["StudyInstanceUID"] = args.study
        studies = client.search_studies(filters, limit=args.limit)
        if args.json:
            print(json.dumps([s.to_dict(args.show_phi) for s in studies], indent=2))
            return EXIT_OK
        header = ["StudyInstanceUID", "date", "modalities", "series", "instances",
                  "description"] + (["PatientID"] if args.show_phi else [])
        _table([[s.study_uid, _s(s.date), "/".join(s.modalities), _s(s.n_series),
                 _s(s.n_instances), _s(s.description)]
                + ([_s(s.patient_id)] if args.show_phi else []) for s in studies], header)
        print(f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'}")
        return EXIT_OK
    series = client.search_series(args.study, filters, limit=args.limit)
    choice = None
    problem = None
    if args.study:
        from medseg.pacs.select import choose_series

        series = [client.complete_series(r) for r in series]
        try:
            choice = choose_series(series, _rules(args), study=args.study)
        except MedsegError as exc:
            problem = str(exc)
    if args.json:
        out: Any = [dict(r.to_dict(), chosen=choice is not None and
                         r.series_uid == choice.series.series_uid) for r in series]
        print(json.dumps(out, indent=2))
        return EXIT_OK
    _table([["*" if choice and r.series_uid == choice.series.series_uid else " ",
             r.series_uid, _s(r.modality), _s(r.number), _s(r.n_instances),
             f"{r.slice_thickness:g}" if r.slice_thickness is not None else "",
             "/".join(r.image_type or ()), _s(r.description)] for r in series],
           [" ", "SeriesInstanceUID", "modality", "number", "instances", "thickness",
            "image type", "description"])
    print(f"{len(series)} series")
    if choice is not None:
        print(f"would segment: {choice.series.series_uid} ({choice.reason})")
    elif problem:
        print(f"nothing to segment: {problem}")
    return EXIT_OK


def _cmd_pull(args: argparse.Namespace) -> int:
    from medseg.errors import PacsNotFoundError

    client = _client(args)
    series = None
    if args.series or args.select:
        found = [client.complete_series(r) if args.select else r
                 for r in client.search_series(args.study)]
        if not found:
            raise PacsNotFoundError(f"study {args.study} is not on the server (QIDO-RS "
                                    "found no series)", url=client.url)
        if args.series:
            series = [r for r in found if r.series_uid == args.series]
            if not series:
                raise PacsNotFoundError(f"study {args.study} has no series {args.series}",
                                        url=client.url)
        else:
            from medseg.pacs.select import choose_series

            choice = choose_series(found, _rules(args), study=args.study)
            series = [choice.series]
            if not args.quiet:
                print(f"chose series {choice.series.series_uid} ({choice.reason})")
    n = client.pull(args.study, args.out_dir, series=series)
    if not args.quiet:
        what = f"series {series[0].series_uid}" if series else f"study {args.study}"
        print(f"pulled {n} instance(s) of {what} into {args.out_dir}")
    return EXIT_OK


def _cmd_push(args: argparse.Namespace) -> int:
    client = _client(args)
    result = client.store(args.paths, check=False)
    for uid, why in result.warnings.items():
        print(f"medseg: warning: {result.files.get(uid, uid)}: stored with a warning: {why}",
              file=sys.stderr)
    if not args.quiet:
        print(f"stored {len(result.stored)} of {len(result.files)} instance(s) on "
              f"{client.url}")
    result.raise_for_failures(client.url)
    return EXIT_OK


def register(sub: Any) -> None:
    """Add the ``pacs`` subcommand (with query, pull, push) to the ``medseg`` parser."""
    p = sub.add_parser(
        "pacs", help="query, pull and push studies on a DICOMweb server (PACS)",
        description=_wrap("Talk to a DICOMweb server (Orthanc, dcm4chee, Google/Azure/AWS "
        "health imaging, ...): find studies and series (QIDO-RS), download a study or "
        "series (WADO-RS), store files such as the lungs.seg.dcm and lungs.sr.dcm that "
        "'medseg segment' writes (STOW-RS). URL is the DICOMweb root, e.g. "
        "http://localhost:8042/dicom-web (Orthanc). TLS certificates are verified. "
        + _CREDENTIALS_HELP),
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    psub = p.add_subparsers(dest="pacs_command", metavar="ACTION", required=True)

    q = psub.add_parser(
        "query", help="list studies (or series) matching filters",
        description=_wrap("List the studies matching the filters (QIDO-RS), or with --series "
        "their series; with --study UID --series also which series medseg would segment "
        "and why the others are not used. Patient identifiers are shown only with "
        "--show-phi."), epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("url", help="DICOMweb root URL")
    q.add_argument("--series", action="store_true", help="list series instead of studies")
    q.add_argument("--study", metavar="UID", help="only this StudyInstanceUID")
    q.add_argument("--patient", metavar="ID", help="PatientID")
    q.add_argument("--date", type=_date, metavar="DATE",
                   help="StudyDate YYYYMMDD or range YYYYMMDD-YYYYMMDD")
    q.add_argument("--modality", metavar="M",
                   help="modality, e.g. CT (ModalitiesInStudy, or Modality with --series)")
    q.add_argument("--description", metavar="TEXT",
                   help="Study (or Series) Description; * matches any characters")
    q.add_argument("--limit", type=int, default=None, metavar="N",
                   help="at most N results (default all)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.add_argument("--show-phi", action="store_true", help="show PatientID/PatientName")
    _add_selection(q)
    _add_connection(q)
    q.set_defaults(func=_cmd_query)

    pl = psub.add_parser(
        "pull", help="download a study or series (one file per instance)",
        description=_wrap("Download STUDY (every series), one series (--series UID) or the series "
        "medseg would segment (--select: CT, axial, ORIGINAL/PRIMARY, thinnest slices, then "
        "most instances) into OUT_DIR, one DICOM file per instance named after its "
        "SOPInstanceUID, in the transfer syntax the server holds. Atomic: written into a "
        "temporary folder beside OUT_DIR and renamed when complete; OUT_DIR must not exist "
        "or be empty."), epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("url", help="DICOMweb root URL")
    pl.add_argument("study", help="StudyInstanceUID")
    pl.add_argument("-o", "--out-dir", type=Path, required=True, help="folder to create")
    which = pl.add_mutually_exclusive_group()
    which.add_argument("--series", metavar="UID", help="only this SeriesInstanceUID")
    which.add_argument("--select", action="store_true",
                       help="only the series medseg would segment (see the rules above)")
    pl.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    _add_selection(pl)
    _add_connection(pl)
    pl.set_defaults(func=_cmd_pull)

    ps = psub.add_parser(
        "push", help="store DICOM files (e.g. lungs.seg.dcm, lungs.sr.dcm) on the server",
        description=_wrap("Store the DICOM files PATH (folders are searched recursively) with "
        "STOW-RS and check the server's answer: every instance refused or missing from the "
        "answer is listed with the reason, and the exit status is then 1."),
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ps.add_argument("url", help="DICOMweb root URL")
    ps.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="DICOM file or folder")
    ps.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    _add_connection(ps)
    ps.set_defaults(func=_cmd_push)


def _add_selection(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("series selection")
    g.add_argument("--image-type", type=_image_type, default=ORIGINAL_PRIMARY,
                   metavar="VALUES", help="required first ImageType values, comma-separated "
                   "(default ORIGINAL,PRIMARY; 'any' accepts every series)")
    g.add_argument("--allow-oblique", action="store_true",
                   help="accept series that are not axial (the loader reads any orientation)")


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    """The DICOMweb options of ``medseg batch`` (used when SOURCE is ``dicomweb+URL``)."""
    g = p.add_argument_group(
        "DICOMweb source", "With SOURCE dicomweb+http(s)://HOST/ROOT every study matching "
        "the filters is pulled (the series chosen as by 'medseg pacs pull --select'), "
        "segmented into OUT_DIR/<StudyInstanceUID>/ and, with --push, its SEG and SR are "
        "stored back. " + _CREDENTIALS_HELP)
    g.add_argument("--push", action="store_true",
                   help="store lungs.seg.dcm and lungs.sr.dcm of each study on the server")
    g.add_argument("--pacs-modality", metavar="M", help="only studies with this modality, "
                   "e.g. CT (default: every study; those without a CT series fail)")
    g.add_argument("--pacs-date", type=_date, metavar="DATE",
                   help="StudyDate YYYYMMDD or range YYYYMMDD-YYYYMMDD")
    g.add_argument("--pacs-patient", metavar="ID", help="PatientID")
    g.add_argument("--pacs-description", metavar="TEXT",
                   help="StudyDescription (* matches any characters)")
    _add_connection(p, batch=True)


def batch_options(args: argparse.Namespace) -> PacsBatchOptions | None:
    """The :class:`PacsBatchOptions` of a ``medseg batch`` command line: ``None`` for a
    folder or manifest source given no DICOMweb option."""
    from medseg.pacs.options import is_dicomweb_source

    given = any([args.push, args.pacs_modality, args.pacs_date, args.pacs_patient,
                 args.pacs_description, args.auth_file, args.ca_bundle, args.insecure])
    if not is_dicomweb_source(str(args.source)):
        if given:
            raise ConfigError("--push, --pacs-* and the connection options need a DICOMweb "
                              f"SOURCE dicomweb+http(s)://..., got {args.source}")
        return None
    _warn_insecure(args, str(args.source))
    try:
        return PacsBatchOptions(
            modality=args.pacs_modality, date=args.pacs_date, patient=args.pacs_patient,
            description=args.pacs_description, push=args.push,
            auth_file=str(args.auth_file) if args.auth_file else None,
            ca_bundle=str(args.ca_bundle) if args.ca_bundle else None,
            insecure=args.insecure, timeout=args.pacs_timeout, retries=args.pacs_retries)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
