"""report.html: the report as one self-contained static page (Jinja2 template, plots inlined as base64, no
script, no network), so it opens from a run folder, an S3 download or a cluster's head node.

It holds the headline, a one-sentence verdict per layer, the plots, the report's tables (report.md's
sections) with every named feature linked to its card, the cards and the reference card."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2

from dfc_ray.cards import REFERENCE, Card
from dfc_ray.report.build import PARTITION_SHARES
from dfc_ray.report.render import sections

HTML = "report.html"
TEMPLATES = Path(__file__).parent / "templates"


def card_anchor(trial: str, feature: int) -> str:
    """The id of a card on the page (the reference card of a layer: `reference-<layer>`)."""
    return f"card-{trial}-{feature}"


def verdict(row: dict[str, Any]) -> str:
    """One sentence per layer of report.json's `difference`: how many features carry the difference, in which
    partitions, and what steering B with the top ones recovers of the reference's effect."""
    def mean(stat: dict[str, Any] | None) -> float | None:
        return None if not stat or stat.get("mean") is None else float(stat["mean"])

    n50, n90 = mean(row["n50"]["sizes"]), mean(row["n90"]["sizes"])
    shares = {p: mean(row["shares"][p]) for p in PARTITION_SHARES}
    top = max(row["top_partition"], key=lambda p: row["top_partition"][p]) if any(row["top_partition"].values()) \
        else None
    text = f"The A − B difference at block {row['layer']}"
    if n50 is None:
        text += " is not carried by the dictionaries' features (Σ c_j ≤ 0 in every trial)"
    else:
        text += f" is carried by ~{n50:.0f} features for half of Σ c_j (~{n90:.0f} for 90%)" if n90 is not None \
            else f" is carried by ~{n50:.0f} features for half of Σ c_j"
    text += "; shares " + ", ".join(f"{p.replace('_', '-')} {v:+.2f}" for p, v in shares.items() if v is not None)
    if top is not None:
        text += (f"; the largest term is {top.replace('_', '-')} in {row['top_partition'][top]} of "
                 f"{row['n_trials']} trials")
    curve = [point for point in row.get("curve") or [] if mean(point["share"]) is not None]
    if curve:
        last = curve[-1]
        text += (f"; steering B with the top {last['n']} recovers {mean(last['share']):.0%} of the reference "
                 "effect")
    return text + "."


def _plots(report: dict[str, Any], run_dir: Path) -> list[dict[str, str]]:
    out = []
    for plot in report.get("plots") or []:
        path = run_dir / plot
        if path.is_file():
            out.append({"name": Path(plot).stem.replace("_", " "),
                        "data": base64.b64encode(path.read_bytes()).decode()})
    return out


def _shade(activation: float | None, peak: float) -> str:
    """A token's background: white at 0, deep orange at the example's peak; grey where no row exists."""
    if activation is None:
        return "#eeeeee"
    strength = max(0.0, min(1.0, activation / peak)) if peak > 0 else 0.0
    return f"rgba(255, 120, 0, {0.08 + 0.72 * strength:.2f})" if activation > 0 else "#ffffff"


def _card_view(card: Card) -> dict[str, Any]:
    """What the template shows of a card: its fields plus the shaded tokens of each example."""
    data = card.to_json()
    for kind in ("top_examples", "quantile_examples"):
        for example in data[kind]:
            peak = max([a for a in example["token_activations"] if a] + [example["activation"]])
            example["spans"] = [{"text": t.replace("\n", "⏎"), "shade": _shade(a, peak),
                                 "marked": i == example["marked"], "title": "no row" if a is None else f"{a:.3g}"}
                                for i, (t, a) in enumerate(zip(example["tokens"], example["token_activations"]))]
    counts = card.histogram.get("counts") or []
    top = max(counts, default=0)
    # log-density bars: height ∝ log10(1 + count) / log10(1 + the largest count)
    data["bars"] = [0.0 if not top else 100 * math.log10(1 + c) / math.log10(1 + top) for c in counts]
    data["anchor"] = f"reference-{card.layer}" if card.feature == REFERENCE else card_anchor(card.trial, card.feature)
    return data


def render_html(report: dict[str, Any], run_dir: str | Path, cards: Sequence[Card], cards_note: str = "") -> str:
    """The page's HTML (`write_html` writes it)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.ChainableUndefined)
    # a token as a quoted string, `</tool_call>` as written (autoescape makes it safe; tojson shows \u003c)
    env.filters["quoted"] = lambda token: json.dumps(token, ensure_ascii=False)
    anchors = {(c.trial, c.feature) for c in cards if c.feature != REFERENCE}
    tables = []
    for section in sections(report):
        linked = "trial" in section.columns and "feature" in section.columns
        trial_col = section.columns.index("trial") if linked else -1
        feature_col = section.columns.index("feature") if linked else -1
        rows = []
        for row in section.rows:
            cells = [{"text": cell, "href": ""} for cell in row]
            if linked and row[feature_col].isdigit() and (row[trial_col], int(row[feature_col])) in anchors:
                cells[feature_col]["href"] = "#" + card_anchor(row[trial_col], int(row[feature_col]))
            rows.append(cells)
        tables.append({"title": section.title, "note": section.note, "columns": section.columns, "rows": rows,
                       "remarks": section.remarks})
    views = [_card_view(c) for c in cards]
    return env.get_template("report.html.j2").render(
        report=report, run=report.get("run") or {}, verdicts=[verdict(r) for r in report.get("difference") or []],
        tables=tables, plots=_plots(report, Path(run_dir)), cards=[v for v in views if v["feature"] != REFERENCE],
        references=[v for v in views if v["feature"] == REFERENCE], cards_note=cards_note)


def write_html(report: dict[str, Any], out_dir: str | Path, cards: Sequence[Card], cards_note: str = "") -> Path:
    """`report.html` in `out_dir` (which holds the report's plots)."""
    path = Path(out_dir) / HTML
    path.write_text(render_html(report, out_dir, cards, cards_note))
    return path
