"""`dfc-ray doctor`: the machine, the path each stage takes on it, and the fast paths' self-checks, as one table."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table


def add_cli(subparsers: Any) -> None:
    """``dfc-ray doctor [--device DEVICE]``."""
    parser = subparsers.add_parser("doctor", help="the machine, each stage's path on it and the fast paths' "
                                                  "self-checks (exit 1 when one failed)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    parser.set_defaults(func=_cli_doctor)


def _cli_doctor(args: argparse.Namespace) -> int:
    # deferred: dfc_ray.doctor loads torch, transformers and the organism; `dfc-ray --help` should not wait for them
    from dfc_ray import doctor

    rows = doctor.report(doctor.device_named(args.device))
    table = Table("what", "value", title="dfc-ray doctor", title_justify="left")
    for row in rows:
        table.add_row(row.what, row.value if row.ok else f"[bold red]{row.value}[/]")
    Console().print(table)
    return 0 if all(row.ok for row in rows) else 1
