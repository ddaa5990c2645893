"""`dfc-ray report RUN`: rebuild and print a sweep's report from its results.jsonl."""

from __future__ import annotations

import argparse

from pathlib import Path

from rich.console import Console

from dfc_ray.fs import RunFolder
from dfc_ray.report import print_report, run_report, write_report


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="rebuild and print a sweep's report from its results.jsonl",
                              description="Rebuild report.json, report.md and plots/ from RUN/results.jsonl and "
                                          "print the terminal report. RUN is a run folder or an s3:// prefix.")
    p.add_argument("run", metavar="RUN", help="run folder, file:// or s3:// prefix holding results.jsonl")
    p.add_argument("--full", action="store_true",
                   help="print every table of report.md too (default: the verdict and the headline, one screen)")
    p.add_argument("--out", help="folder for the report files (default: RUN for a local run; for an s3:// run "
                                 "the report is only printed unless --out is given)")
    p.set_defaults(func=_run_cli, interrupted=lambda a: "report files may be half rewritten; run the same command "
                   "again (it rebuilds them from results.jsonl, which it never changes)")


def _run_cli(args: argparse.Namespace) -> int:
    console = Console()
    if args.out is None and args.run.startswith("s3://"):
        report = run_report(args.run)
    else:
        target = args.out or args.run.removeprefix("file://")
        if Path(target).is_dir():  # a folder this user cannot write is refused before the report is built
            try:
                RunFolder(target, create=False).check_writable()
            except ValueError as err:
                raise ValueError(f"{err}; or pass --out FOLDER for the report files") from None
        report = write_report(args.run, out_dir=args.out)
    print_report(report, console, full=args.full)
    if "plots" in report:
        console.print(f"wrote report.json, report.md and {len(report['plots'])} plots to {args.out or args.run}")
    return 0
