"""`dfc-ray features RUN [--trial T] (--feature J | --top N)`: feature cards in the terminal, and
RUN/feature_cards.json."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dfc_ray.cards import REFERENCE, Card, Example
from dfc_ray.config import CardConfig
from dfc_ray.report.build import load_results
from dfc_ray.report.features import cached_cards, read_cards, run_cards, top_terms, write_cards


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "features", help="show what features are: their cards (contexts, logit lens, density, causal evidence)",
        description="Print feature cards of a run's checkpoints (top-activating contexts with per-token "
                    "highlighting, logit lens, density over the layer's store, decoder geometry, the trial's causal "
                    "evidence) and the reference direction's card; writes RUN/feature_cards.json.")
    p.add_argument("run", metavar="RUN", help="a local sweep run folder")
    p.add_argument("--trial", help="trial id (default: the trial with the largest attribution term)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--feature", type=int, nargs="+", metavar="J", help="feature index(es) of the trial's "
                                                                          "dictionary")
    which.add_argument("--top", type=int, metavar="N", help="the trial's N largest attribution terms")
    p.add_argument("--rows", type=int, default=CardConfig.rows, help="rows of the store to count over (0 = all)")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    if args.top is not None and args.top < 1:
        raise ValueError(f"--top {args.top}: expected a number of features ≥ 1")
    trials = [t for t in load_results(args.run) if t.ok]
    if args.trial is None:
        ranked = sorted((t for t in trials if t.metrics.get("diff_top") or t.metrics.get("top_features")),
                        key=lambda t: -float((t.metrics.get("diff_top") or [{}])[0].get("contribution") or 0))
        if not ranked:
            raise ValueError(f"{args.run}: no finished trial has attribution terms or ranked features; "
                             "pass --trial and --feature")
        trial = ranked[0]
    else:
        trial = next((t for t in trials if t.trial_id == args.trial), None)
        if trial is None:
            raise ValueError(f"--trial {args.trial}: not a finished trial of {args.run}; expected one of "
                             f"{', '.join(t.trial_id for t in trials[:8])}")
    features = args.feature if args.feature is not None else top_terms(trial, args.top)
    cfg, kept = CardConfig(rows=args.rows), read_cards(args.run)
    # the report's own cards when it made these with these settings: no second pass over the store
    cards = cached_cards(kept, trial.trial_id, features, cfg)
    reused = cards is not None
    if cards is None:
        cards = run_cards(args.run, trials, {trial.trial_id: features}, cfg)
    console = Console()
    for card in cards:
        console.print(card_panel(card))
    if reused:
        console.print(f"{len(cards)} cards from {args.run}/feature_cards.json (made with these settings)")
        return 0
    path = write_cards(args.run.removeprefix("file://"), cards, keep=kept)
    console.print(f"wrote {len(cards)} cards to {path}")
    return 0


def highlighted(example: Example) -> Text:
    """The example's tokens, each on a background as strong as its activation relative to the example's
    (the example's own token underlined); tokens without a stored row stay plain."""
    text = Text()
    peak = max([a for a in example.token_activations if a] + [example.activation, 1e-12])
    for i, (token, act) in enumerate(zip(example.tokens, example.token_activations)):
        shade = int(255 - 175 * min(1.0, max(0.0, act / peak))) if act is not None else 255
        style = f"black on rgb(255,{shade},{shade})" if act else ""
        text.append(token.replace("\n", "⏎"), style=style + (" underline bold" if i == example.marked else ""))
    return text


def _lens_table(card: Card) -> Table:
    table = Table("lens", "top tokens", "bottom tokens", box=None, pad_edge=False)
    for name, lens in card.logit_lens.items():
        if lens["top"]:
            table.add_row(name, " ".join(repr(t) for t, _ in lens["top"]), " ".join(repr(t) for t, _ in lens["bottom"]))
    return table


def _causal_text(causal: dict[str, Any]) -> str:
    parts = []
    if term := causal.get("attribution"):
        parts.append(f"c_j {term['contribution']:.3g} (rank {term['rank']}, share {term['share']:.0%})")
    if steer := causal.get("steering"):
        parts.append(f"steered {steer['target']}: Δ {steer['delta_pp']:+.1f} pp [{steer['lo']:+.1f}, "
                     f"{steer['hi']:+.1f}] at α {steer['alpha']:g}")
    for name, test in (causal.get("localisation") or {}).items():
        parts.append(f"in {name}'s top {test['n']}")
    return "; ".join(parts) or "no causal test names it"


def card_panel(card: Card) -> Panel:
    """A card as a rich panel: identity, statistics, geometry, causal evidence, lens, examples."""
    title = ("reference direction v" if card.feature == REFERENCE
             else f"trial {card.trial} · feature {card.feature} · {card.partition}") + f" · layer {card.layer}"
    lines: list[Any] = [Text(f"fires on {card.frequency:.1%} of {card.row_set}"
                             + ("  ALWAYS-ON" if card.always_on else ""))]
    if card.feature != REFERENCE:
        d, split = card.decoder, card.encoder_split
        lines += [Text(f"‖d_A‖ {d['norm_a']:.3g}  ‖d_B‖ {d['norm_b']:.3g}  relative {d['relative_norm']:.2f}  "
                       f"cos(d_A,d_B) {d['cos_ab']:+.2f}  cos(d_A−d_B, v) {d['cos_reference']:+.2f}  "
                       f"β_A {d['beta_a']:.2f} β_B {d['beta_b']:.2f}"),
                  Text(f"encoder: W_A·x_A {split['a']:+.3g}  W_B·x_B {split['b']:+.3g} "
                       f"(A share {split['a_share']:.0%})"),
                  Text(f"causal: {_causal_text(card.causal)}")]
    else:
        lines.append(Text(f"‖v‖ {card.decoder['norm']:.3g}; contexts by projection on v"))
    lines.append(_lens_table(card))
    if card.note:
        lines.append(Text(card.note, style="yellow"))
    for label, examples in (("top", card.top_examples), ("quantiles", card.quantile_examples)):
        for e in examples:
            lines.append(Text.assemble((f"{label} {e.activation:7.3g} r{e.record}:{e.position}  ", "dim"),
                                       highlighted(e)))
    return Panel(Group(*lines), title=title, title_align="left")
