"""The `dfc-ray` command line: one sub-command per stage, each registered by its module in dfc_ray/commands/."""

from __future__ import annotations

import argparse
import importlib
import sys

from dfc_ray.failures import EXIT_INTERRUPTED
from dfc_ray.fs import storage_failure

# Each module here defines `add_cli(subparsers)`, which adds its sub-commands and sets
# `func(args) -> int` on them (and `interrupted(args) -> str`, what Ctrl-C leaves behind, where that is
# more than nothing); the domain modules they drive hold no CLI code.
COMMAND_MODULES = [
    "dfc_ray.commands.train",
    "dfc_ray.commands.harvest",
    "dfc_ray.commands.evaluate",
    "dfc_ray.commands.organism",
    "dfc_ray.commands.cluster",
    "dfc_ray.commands.spaces",
    "dfc_ray.commands.sweep",
    "dfc_ray.commands.report",
    "dfc_ray.commands.features",
    "dfc_ray.commands.seed",
    "dfc_ray.commands.doctor",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfc-ray",
        description="Dedicated Feature Crosscoders on a model pair, at sweep scale on Ray.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(subparsers)
    return parser


INTERRUPTED_EXIT = EXIT_INTERRUPTED
"""Exit code after Ctrl-C (128 + SIGINT, as shells report it; dfc_ray/failures.py)."""


def main(argv: list[str] | None = None) -> int:
    try:  # the command modules import torch and friends: seconds in which Ctrl-C is likely
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("dfc-ray: interrupted while starting; nothing was run", file=sys.stderr)
        return INTERRUPTED_EXIT
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: one line saying what was kept and how to go on, never a traceback
        kept = getattr(args, "interrupted", None)
        line = kept(args) if kept else "nothing was written; run the same command again"
        print(f"dfc-ray {args.command}: interrupted; {line}", file=sys.stderr)
        return INTERRUPTED_EXIT
    except (ValueError, FileNotFoundError) as err:
        # Bad input: one clear line, no traceback.
        print(f"dfc-ray {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # storage that cannot be reached: one line too (dfc_ray.fs maps the errors)
        if (line := storage_failure(err)) is None:
            raise
        print(f"dfc-ray {args.command}: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
