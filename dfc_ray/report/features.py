"""Cards for a run folder: which features a report names, and their cards (dfc_ray/cards.py) from the run's
checkpoints, stores and pair; `feature_cards.json` beside report.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dfc_ray.cards import (CARDS, REFERENCE, Card, card_settings, causal_evidence, feature_cards, reference_card,
                           unembedding)
from dfc_ray.config import CardConfig
from dfc_ray.fs import redact
from dfc_ray.report.build import TrialResult, read_text


def named_features(report: dict[str, Any], trials: Sequence[TrialResult]) -> dict[str, list[int]]:
    """Trial → the features the report names, in order: the largest attribution terms, the best steering
    trials' features (not a tie: a tie names no feature) and those trials' localisation sets (the curve's
    chosen n largest terms)."""
    by_id = {t.trial_id: t for t in trials}
    named: dict[str, list[int]] = {}

    def name(trial: str, feature: Any) -> None:
        if isinstance(feature, float) and feature.is_integer():  # a metric that went through JSON as a float
            feature = int(feature)
        if isinstance(feature, int) and trial in by_id and feature not in named.setdefault(trial, []):
            named[trial].append(feature)

    for row in report.get("largest_terms") or []:
        name(row.get("trial_id"), row.get("feature"))
    for row in report.get("steering_reference") or []:
        best = row.get("best_trial") or {}
        if (best.get("tied") or 1) == 1:
            name(best.get("trial_id"), best.get("feature"))
    for trial in list(named):
        metrics = by_id[trial].metrics
        n = metrics.get("loc_curve_n")
        for term in (metrics.get("diff_top") or [])[:int(n) if isinstance(n, (int, float)) and n > 0 else 0]:
            name(trial, term.get("feature"))
    return named


def top_terms(trial: TrialResult, n: int) -> list[int]:
    """The trial's n largest attribution terms (its `diff_top`), else its n best-ranked steering features."""
    rows = trial.metrics.get("diff_top") or trial.metrics.get("top_features") or []
    return [int(r["feature"]) for r in rows[:n]]


def run_cards(run_dir: str | Path, trials: Sequence[TrialResult], selection: dict[str, list[int]],
              cfg: CardConfig | None = None) -> list[Card]:
    """The cards of `selection` (trial → features) and one reference card per (store, layer) they read; the
    pair is the run's (spec.yaml), each trial's checkpoint and store are those its metrics record."""
    # deferred: the spec, the pair and the checkpoint loader pull torch and transformers
    from dfc_ray.evaluate import load_crosscoder
    from dfc_ray.pair import load_model, load_tokenizer
    from dfc_ray.spaces import parse_spec
    from dfc_ray.yamlio import parse_yaml

    if not selection:
        return []
    text, where = read_text(run_dir, "spec.yaml")
    if text is None:
        raise FileNotFoundError(f"{where}: no such file (expected a dfc-ray sweep run folder)")
    spec = parse_spec(parse_yaml(text, where), where)
    tokenizer = load_tokenizer(spec.pair)
    lenses = (unembedding(load_model(spec.pair, "a")), unembedding(load_model(spec.pair, "b")))
    by_id = {t.trial_id: t for t in trials}
    cards, references = [], {}
    for trial_id, features in selection.items():
        trial = by_id[trial_id]
        checkpoint, uri = trial.metrics.get("checkpoint"), trial.metrics.get("harvest_store")
        if not checkpoint or not uri:
            raise ValueError(f"{redact(str(run_dir))}: trial {trial_id} records no checkpoint or harvest_store; "
                             "expected a finished trial")
        layer = int(spec.trial_settings(trial.config)["layer"])
        cc = load_crosscoder(str(checkpoint), "cpu")
        cards += feature_cards(cc, uri, layer, features, trial_id, tokenizer, lenses, cfg,
                               {j: causal_evidence(trial.metrics, j) for j in features})
        if (uri, layer) not in references:
            references[(uri, layer)] = reference_card(uri, layer, tokenizer, lenses, cfg)
    return cards + list(references.values())


def report_cards(run_dir: str | Path, report: dict[str, Any], trials: Sequence[TrialResult],
                 cfg: CardConfig | None = None) -> tuple[list[Card], str]:
    """The cards of the features `report` names, and a one-line note when there are none (nothing named, or
    the run's checkpoints, stores or pair cannot be read: the report is still written)."""
    ok = [t for t in trials if t.ok]
    selection = named_features(report, ok)
    if not selection:
        return [], "No feature is named: no trial attributed the difference or steered a feature."
    try:
        return run_cards(run_dir, ok, selection, cfg), ""
    except Exception as err:  # an aid to reading the report: never fail a finished sweep's report over it
        return [], f"No cards: {type(err).__name__}: {err}"


def write_cards(out_dir: str | Path, cards: Sequence[Card], keep: Sequence[Card] = ()) -> Path:
    """`feature_cards.json` (the contract in docs/report.md) in `out_dir`: `cards`, plus those of `keep` (the
    file's earlier cards) that none of them replaces (same trial, feature, layer and row set)."""
    path = Path(out_dir) / CARDS
    new = {_card_key(c) for c in cards}
    kept = [c for c in keep if _card_key(c) not in new]
    path.write_text(json.dumps([c.to_json() for c in [*kept, *cards]], indent=1) + "\n")
    return path


def read_cards(run_dir: str | Path) -> list[Card]:
    """The run's feature_cards.json (none when it is missing or unreadable: cards are then computed again)."""
    text, _ = read_text(run_dir, CARDS)
    try:
        return [Card.from_json(c) for c in json.loads(text)] if text else []
    except (ValueError, TypeError, KeyError, AttributeError):  # not a list of card objects
        return []


def cached_cards(kept: Sequence[Card], trial: str, features: Sequence[int], cfg: CardConfig) -> list[Card] | None:
    """The cards of `features` of `trial` and their reference card from `kept`, when every one of them was made
    with `cfg` (the same settings and so the same rows); None if any is missing (compute them all again)."""
    settings = card_settings(cfg)
    found = {(c.trial, c.feature): c for c in kept if c.settings == settings}
    cards = [found.get((trial, j)) for j in features]
    if not cards or any(c is None for c in cards):
        return None
    reference = next((c for c in kept if c.feature == REFERENCE and c.settings == settings
                      and (c.layer, c.row_set) == (cards[0].layer, cards[0].row_set)), None)
    return None if reference is None else [c for c in cards if c is not None] + [reference]


def _card_key(card: Card) -> tuple[str, int, int, str]:
    return card.trial, card.feature, card.layer, card.row_set
