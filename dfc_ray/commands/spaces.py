"""`dfc-ray spaces list|show|validate`: the sweep specs (search_spaces/*.yaml)."""

from __future__ import annotations

import argparse

import yaml
from rich.console import Console
from rich.padding import Padding
from rich.syntax import Syntax
from rich.text import Text

from dfc_ray.spaces import check_against_pair, field_reference, load_spec, spaces_dirs


def _list_command(args: argparse.Namespace) -> int:
    """Every spec as a block: name and what it runs on one line, its description wrapped at the terminal's
    width under it, its file last (a six-column table wrapped descriptions to a word per line at 80 columns)."""
    console = Console()
    seen = set()
    for folder in spaces_dirs():
        for path in sorted(folder.glob("*.yaml")):
            if path.stem in seen:
                continue
            seen.add(path.stem)
            try:
                spec = load_spec(str(path))
                blocks = f"block{'s' * (len(spec.layers) > 1)} {', '.join(map(str, spec.layers))}"
                name, facts = spec.name, f"{spec.n_trials} trials · {blocks} · pair {spec.pair.a} / {spec.pair.b}"
                about = Text(spec.description)
            except (ValueError, FileNotFoundError) as err:
                name, facts, about = path.stem, "invalid", Text(str(err), style="red")
            console.print(Text(name, style="bold").append(f" · {facts}"))
            console.print(Padding(about, (0, 0, 0, 2), expand=False))
            console.print(Padding(Text(str(path), style="dim"), (0, 0, 0, 2), expand=False))
    return 0


def _show_command(args: argparse.Namespace) -> int:

    spec = load_spec(args.spec)
    console = Console()
    console.print(f"[bold]{spec.name}[/] ({spec.source}): {spec.n_trials} trials, "
                  f"{len(spec.grid)} grid axes, {len(spec.search)} sampled axes, layers {list(spec.layers)}")
    console.print(Syntax(yaml.safe_dump(spec.raw, sort_keys=False), "yaml"))
    # what the protocol sets without the spec saying it (a seed base changes the training data too)
    protocol = spec.eval.protocol
    console.print(f"judged under protocol {protocol.label()} ("
                  + ", ".join(f"{k}: {v}" for k, v in protocol.switches().items())
                  + f"); trained at positions {spec.harvest.positions}, A's replies appended to tool prompts: "
                  + ("yes" if spec.harvest.corpus.with_responses else "no"), highlight=False)
    return 0


def _validate_command(args: argparse.Namespace) -> int:
    for name in args.specs:
        spec = load_spec(name)
        notes = check_against_pair(spec)
        print(f"{spec.source}: valid, {spec.n_trials} trials" + "".join(f"; {note}" for note in notes))
    return 0


def _fields_command(args: argparse.Namespace) -> int:
    print(field_reference(), end="")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    spaces = subparsers.add_parser("spaces", help="List, show and validate sweep specs (search_spaces/*.yaml).")
    actions = spaces.add_subparsers(dest="spaces_command", required=True, metavar="ACTION")
    actions.add_parser("list", help="Every spec found, with its trial count.").set_defaults(func=_list_command)
    show = actions.add_parser("show", help="A spec after `extends` is merged.")
    show.add_argument("spec", help="shipped name (organism48) or path")
    show.set_defaults(func=_show_command)
    validate = actions.add_parser("validate", help="Validate specs; one clear error for the first problem.")
    validate.add_argument("specs", nargs="+", help="shipped names or paths")
    validate.set_defaults(func=_validate_command)
    actions.add_parser("fields", help="Every section's fields with defaults and meaning (docs/spaces.md's "
                                      "field reference).").set_defaults(func=_fields_command)
