"""`dfc-ray organism build|info`: build the shipped tiny model pair, or show its card."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from dfc_ray.organism.build import DIALECT_RECIPES, build_pair, console, dialect_config


def add_cli(subparsers: Any) -> None:
    """``dfc-ray organism build [--out DIR] [--seed N] [--dialect D]`` and ``dfc-ray organism info``."""
    # deferred: the organism package loads transformers (keeps `dfc-ray --help` fast)
    from dfc_ray.organism import PAIR_DIR

    parser = subparsers.add_parser("organism", help="the embedded tiny model pair (build it, show its card)")
    sub = parser.add_subparsers(dest="organism_command", required=True, metavar="SUBCOMMAND")
    build = sub.add_parser("build", help="train the pair from scratch (tokenizer, B, then A by RL)")
    build.add_argument("--out", default="", help="output folder (default: the package's pair of that dialect)")
    build.add_argument("--dialect", default="hermes", choices=list(DIALECT_RECIPES),
                       help="A's tool-call dialect; llama3 builds A on --base's B (no pretraining)")
    build.add_argument("--base", default=str(PAIR_DIR),
                       help="pair folder whose B and tokenizer a non-hermes build starts from (default: the shipped "
                       "pair)")
    build.add_argument("--seed", type=int, default=0, help="seed for data, weights and sampling")
    build.add_argument("--reuse-base", action="store_true",
                       help="keep the B and tokenizer already in --out (same seed) and redo only RL and the card")
    build.set_defaults(func=_cli_build, interrupted=lambda a: f"{a.out or 'the ' + a.dialect + ' pair folder'} may "
                       "hold a partly rebuilt pair; run the build again")
    info = sub.add_parser("info", help="print the shipped pair's card")
    info.add_argument("--dir", default=str(PAIR_DIR), help="pair folder (default: the package's pair)")
    info.set_defaults(func=_cli_info)


def _cli_build(args: argparse.Namespace) -> int:
    # deferred: the organism package loads transformers
    from dfc_ray.organism import DIALECT_PAIR_DIRS

    out = args.out or str(DIALECT_PAIR_DIRS[args.dialect])
    base = None if args.dialect == "hermes" or args.reuse_base else args.base
    card = build_pair(out, cfg=dialect_config(args.dialect, args.seed), seed=args.seed, reuse_base=args.reuse_base,
                      base_dir=base)
    _print_card(card)
    return 0


def _cli_info(args: argparse.Namespace) -> int:
    # deferred: the organism package loads transformers
    from dfc_ray.organism import read_card

    _print_card(read_card(args.dir))
    return 0


def _print_card(card: dict[str, Any]) -> None:

    head = Table(title="organism pair", show_header=False)
    for key in ("params", "layers", "d_model", "vocab", "dtype", "seed", "build_seconds", "torch_threads"):
        head.add_row(key, str(card.get(key)))
    console.print(head)
    table = Table(title="greedy, strict scorer")
    table.add_column("model")
    table.add_column("split")
    for key in ("correct", "lenient", "format_ok", "name_ok"):
        table.add_column(key, justify="right")
    for model in ("a", "b"):
        for split, m in card[model].items():
            table.add_row(model.upper(), split, *(f"{m[k]:.1%}" for k in ("correct", "lenient", "format_ok",
                                                                          "name_ok")))
    console.print(table)
