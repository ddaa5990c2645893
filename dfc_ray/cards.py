"""Feature cards: what a named feature is, read from the rows it fires on, its decoder and its causal record.

A card (docs/report.md) holds a feature's identity, its decoder geometry (‖d_A‖, ‖d_B‖, the
relative norm, cos(d_A, d_B), cos(d_A − d_B, v), Latent Scaling β_A/β_B), its activation statistics over a
NAMED row set (frequency, a histogram, an always-on flag, the encoder's pre-activation split into
W_enc^A·x_A and W_enc^B·x_B: which model's residual drives it), its top-activating contexts (the N highest
rows plus one sample per activation quantile, each with the activations of its neighbouring tokens), its
logit lens (d_A, d_B and d_A − d_B through each model's final norm and unembedding) and the causal evidence
the trial measured (c_j and its share, the steering effect where steered, membership in the localisation's
sets).

Statistics come from ONE streaming pass over the layer's store per checkpoint (`store.iter_shards`). The
codes are the crosscoder's own (`encode`: under TopK a feature's activation depends on every other
feature's pre-activation, so the whole encoder runs), and everything kept per row is only the named
features' columns. Contexts need the store's provenance (record index and token position per row, plus
the harvest's corpus token ids); a store harvested before provenance existed gets cards without examples
and a one-line note saying how to re-harvest.

The reference card is the same card for the reference direction v = mean(x_A − x_B) over the row set: its
top contexts by the projection (x_A − x_B)·v̂ and its logit lens.

Plain tensor math over a store, a checkpoint and the pair's unembeddings (no Ray).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from dfc_ray import store
from dfc_ray.attribution import (difference_directions, encode_columns, partition_names, raw_bias, scaling_ratio,
                                 scaling_sums, stronger_rows)
from dfc_ray.config import CardConfig
from dfc_ray.crosscoder import DedicatedFeatureCrosscoder

CARDS = "feature_cards.json"
"""The run folder's cards (the contract in docs/report.md): a list of card objects."""
REFERENCE = -1
"""The `feature` of the reference direction's card."""
Lenses = tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]
"""The pair's `unembedding`s (A, B)."""


@dataclass
class Example:
    """One row of the store, shown as its surrounding tokens."""

    record: int
    """Index of its record in the harvest's corpus (−1 without provenance)."""
    position: int
    """Its token's position in the record (0 = the record's first token)."""
    activation: float
    tokens: list[str] = field(default_factory=list)
    """The context's tokens, decoded one by one."""
    token_activations: list[float | None] = field(default_factory=list)
    """The feature's activation at each context token; None where the store holds no row for that token
    (a one-position store, an attention sink)."""
    marked: int = -1
    """Index in `tokens` of the example's own token."""


@dataclass
class Card:
    """One feature of one trial's dictionary (or the reference direction: `feature` = REFERENCE)."""

    trial: str
    layer: int
    feature: int
    partition: str
    """a_exclusive, b_exclusive, shared, or reference."""
    row_set: str
    """What `frequency` and the histogram count over, e.g. "layer_001 store, all 151872 rows (all_tokens)"."""
    n_rows: int
    frequency: float
    """Share of the row set where the feature is active (code > 0)."""
    always_on: bool
    """frequency ≥ CardConfig.always_on: a bias-like feature rather than a concept."""
    histogram: dict[str, list[float]]
    """`edges` and `counts` of the activations where it fires (the page plots the counts on a log axis)."""
    encoder_split: dict[str, float]
    """Mean W_enc^A·x_A (`a`) and W_enc^B·x_B (`b`) over the rows where it fires (normalized units), and
    `a_share` = a / (|a| + |b|): which model's residual drives it."""
    decoder: dict[str, float]
    """norm_a, norm_b (raw ‖d_A‖, ‖d_B‖), relative_norm ‖d_A‖/(‖d_A‖+‖d_B‖), cos_ab, cos_reference
    (cos(d_A − d_B, v), v over the row set), beta_a, beta_b (Latent Scaling over the row set)."""
    top_examples: list[Example]
    quantile_examples: list[Example]
    """One sampled row per CardConfig.quantile of the firing activations, lowest quantile first."""
    logit_lens: dict[str, dict[str, list[list[Any]]]]
    """`a`, `b`, `diff` → `top` / `bottom`: [token, logit] pairs of d_A (through A's final norm and
    unembedding), d_B (through B's) and d_A − d_B (through A's); empty for a zero row."""
    causal: dict[str, Any] = field(default_factory=dict)
    """What the trial measured about this feature (`causal_evidence`)."""
    note: str = ""
    """Why something is missing (e.g. the store has no provenance), in one line; empty otherwise."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The CardConfig it was made with, as JSON: `dfc-ray features` re-uses a card of feature_cards.json made
    with the settings it asks for instead of another pass over the store."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Card:
        """A card as `to_json` wrote it."""
        examples = {k: [Example(**e) for e in data.get(k) or []] for k in ("top_examples", "quantile_examples")}
        return cls(**(data | examples))


def card_settings(cfg: CardConfig) -> dict[str, Any]:
    """`cfg` as a card records it (JSON types: what a card read back from feature_cards.json holds)."""
    return json.loads(json.dumps(asdict(cfg)))


# ---------------------------------------------------------------- the logit lens


def unembedding(model: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """direction (d_model,) → logits (vocab,) through the model's final norm and output embedding (a
    direction read as if it were the last residual)."""
    base = getattr(model, "base_model", model)
    norm = getattr(base, "norm", None) or getattr(base, "final_layer_norm", None)
    head = model.get_output_embeddings()

    def lens(direction: Tensor) -> Tensor:
        with torch.inference_mode():
            h = direction.to(head.weight.dtype).to(head.weight.device)[None, None]
            return head(norm(h) if norm is not None else h)[0, 0].float().cpu()
    return lens


def lens_tokens(logits: Tensor, tokenizer, k: int) -> dict[str, list[list[Any]]]:
    """The k highest and lowest logits as [token, logit] pairs."""
    top, bottom = logits.topk(k), (-logits).topk(k)
    return {"top": [[tokenizer.decode([int(i)]), round(float(v), 4)] for v, i in zip(top.values, top.indices)],
            "bottom": [[tokenizer.decode([int(i)]), round(-float(v), 4)] for v, i in zip(bottom.values,
                                                                                      bottom.indices)]}


def logit_lens(lenses: Lenses, tokenizer,
               d_a: Tensor, d_b: Tensor, k: int) -> dict[str, dict[str, list[list[Any]]]]:
    """d_A through A, d_B through B, d_A − d_B through A; an empty lens for a zero direction."""
    empty: dict[str, list[list[Any]]] = {"top": [], "bottom": []}
    parts = {"a": (d_a, lenses[0]), "b": (d_b, lenses[1]), "diff": (d_a - d_b, lenses[0])}
    return {name: lens_tokens(lens(d), tokenizer, k) if bool(d.any()) else empty for name, (d, lens) in parts.items()}


# ---------------------------------------------------------------- the streaming pass


def _rows(uri: str, layer: int, limit: int) -> Iterator[tuple[Tensor, np.ndarray | None]]:
    """The layer's shards in harvest order, cut at `limit` rows (0 = all)."""
    seen = 0
    for rows, provenance in store.iter_shards(uri, layer):
        if limit and seen + len(rows) > limit:
            rows, provenance = rows[:limit - seen], None if provenance is None else provenance[:limit - seen]
        seen += len(rows)
        yield rows, provenance
        if limit and seen >= limit:
            return


def row_set_name(uri: str, layer: int, n_rows: int) -> str:
    """How a card names its row set: the layer's store, how many of its rows, at which positions."""
    manifest = store.read_manifest(uri, layer)
    which = f"all {n_rows}" if n_rows == manifest.total_rows else f"the first {n_rows} of {manifest.total_rows}"
    return f"{store.layer_dir(layer)} store, {which} rows ({manifest.spec.positions})"


@dataclass
class _Pass:
    """What one pass over the store kept: per named feature its firing rows and activations, the sums the
    statistics need, and every row's provenance (small: two ints per row)."""

    n_rows: int = 0
    fire_rows: list[list[np.ndarray]] = field(default_factory=list)
    fire_acts: list[list[np.ndarray]] = field(default_factory=list)
    pre_sums: Tensor | None = None
    scaling: tuple[Tensor, Tensor] | None = None
    diff_sum: Tensor | None = None
    provenance: list[np.ndarray] | None = field(default_factory=list)


def _stream(cc: DedicatedFeatureCrosscoder, uri: str, layer: int, features: Sequence[int], limit: int) -> _Pass:
    index = torch.as_tensor(list(features), dtype=torch.long)
    enc = cc.W_enc.detach().float()[index]  # (F, 2, d), normalized space
    directions, bias = stronger_rows(cc, features), raw_bias(cc).cpu()
    out = _Pass(fire_rows=[[] for _ in features], fire_acts=[[] for _ in features])
    for rows, provenance in _rows(uri, layer, limit):
        codes = encode_columns(cc, rows, features)  # the full encoder: TopK needs every pre-activation
        with torch.inference_mode():
            pre = torch.einsum("nmd,fmd->nfm", cc.normalize(rows), enc)  # W_enc^m·x_m per feature and model
        fires = codes > 0
        out.pre_sums = (0 if out.pre_sums is None else out.pre_sums) + (pre * fires[..., None]).double().sum(0)
        sums = scaling_sums(codes, rows - bias, directions)
        out.scaling = sums if out.scaling is None else (out.scaling[0] + sums[0], out.scaling[1] + sums[1])
        diff = (rows[:, 0] - rows[:, 1]).double().sum(0)
        out.diff_sum = diff if out.diff_sum is None else out.diff_sum + diff
        for i in range(len(index)):
            hit = fires[:, i].nonzero()[:, 0]
            out.fire_rows[i].append(hit.numpy() + out.n_rows)
            out.fire_acts[i].append(codes[hit, i].numpy())
        if out.provenance is not None:
            out.provenance = None if provenance is None else out.provenance + [provenance]
        out.n_rows += len(rows)
    return out


# ---------------------------------------------------------------- examples


class Contexts:
    """Turns rows into token contexts: the harvest's corpus, every row's provenance and the tokenizer."""

    def __init__(self, corpus: list[np.ndarray], provenance: np.ndarray, tokenizer, cfg: CardConfig):
        self.corpus, self.provenance, self.tokenizer, self.cfg = corpus, provenance, tokenizer, cfg

    def example(self, row: int, activation: float, activations: Callable[[np.ndarray], np.ndarray]) -> Example:
        """Row `row` as its record's tokens around its position, each with the feature's activation there
        (`activations(rows)` gives it for rows of the store; None for tokens the store has no row for)."""
        record, position = (int(v) for v in self.provenance[row])
        ids = self.corpus[record]
        if position >= len(ids):  # a response token (with_responses): the corpus keeps prompts only
            return Example(record, position, activation)
        start, stop = max(0, position - self.cfg.context), min(len(ids), position + 1 + self.cfg.context // 4)
        stored = np.nonzero(self.provenance[:, 0] == record)[0]
        stored = stored[(self.provenance[stored, 1] >= start) & (self.provenance[stored, 1] < stop)]
        by_position: dict[int, float] = dict(zip(self.provenance[stored, 1].tolist(),
                                                 activations(stored).tolist()))
        return Example(record, position, activation, [self.tokenizer.decode([int(t)]) for t in ids[start:stop]],
                       [by_position.get(p) for p in range(start, stop)], position - start)


def _examples(rows: np.ndarray, acts: np.ndarray, contexts: Contexts | None, cfg: CardConfig,
              lookup: Callable[[np.ndarray], np.ndarray]) -> tuple[list[Example], list[Example]]:
    """(the `cfg.top` highest rows, one row per quantile) as examples; without provenance, none."""
    if contexts is None or not len(acts):
        return [], []
    order = np.argsort(-acts, kind="stable")
    top = [contexts.example(int(rows[i]), float(acts[i]), lookup) for i in order[:cfg.top]]
    ascending = order[::-1]
    picks = [int(ascending[min(len(acts) - 1, int(q * len(acts)))]) for q in cfg.quantiles]
    return top, [contexts.example(int(rows[i]), float(acts[i]), lookup) for i in picks]


def _histogram(acts: np.ndarray, bins: int) -> dict[str, list[float]]:
    if not len(acts):
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(acts, bins=bins)
    return {"edges": edges.round(6).tolist(), "counts": counts.astype(float).tolist()}


# ---------------------------------------------------------------- cards


def feature_cards(cc: DedicatedFeatureCrosscoder, uri: str, layer: int, features: Sequence[int], trial: str,
                  tokenizer, lenses: Lenses,
                  cfg: CardConfig | None = None, causal: dict[int, dict[str, Any]] | None = None) -> list[Card]:
    """Cards of `features` of one checkpoint over the layer's store at `uri` (one streaming pass);
    `lenses` are the pair's `unembedding`s (A, B); `causal` the trial's evidence per feature."""
    cfg = cfg or CardConfig()
    if not features:
        return []
    if bad := [j for j in features if not 0 <= j < cc.cfg.dict_size]:
        raise ValueError(f"feature {bad[0]}: expected an index in [0, {cc.cfg.dict_size}) of trial {trial}'s "
                         "dictionary")
    cc = cc.cpu().eval()
    seen = _stream(cc, uri, layer, features, cfg.rows)
    corpus = store.read_corpus(uri)
    traced = seen.provenance is not None and corpus is not None
    note = "" if traced else f"this store keeps no record or token position per row: {store.REHARVEST}"
    provenance = np.concatenate(seen.provenance) if traced and seen.provenance else np.empty((0, 2), np.int64)
    contexts = Contexts(corpus, provenance, tokenizer, cfg) if traced and corpus is not None else None
    raw = cc.raw_decoder().detach().float().cpu()
    names, differences = partition_names(cc), difference_directions(cc).cpu()
    v = seen.diff_sum.float() / max(seen.n_rows, 1) if seen.diff_sum is not None else torch.zeros(cc.cfg.d_model)
    betas = scaling_ratio(*seen.scaling) if seen.scaling is not None else torch.zeros(len(features), 2)
    row_set = row_set_name(uri, layer, seen.n_rows)
    cards = []
    for i, j in enumerate(features):
        rows, acts = np.concatenate(seen.fire_rows[i]), np.concatenate(seen.fire_acts[i])
        dense = np.zeros(seen.n_rows, np.float32)
        dense[rows] = acts
        top, sampled = _examples(rows, acts, contexts, cfg, lambda r: dense[r])
        frequency = len(acts) / max(seen.n_rows, 1)
        pre = (seen.pre_sums[i] / max(len(acts), 1)).tolist() if seen.pre_sums is not None else [0.0, 0.0]
        norm_a, norm_b = float(raw[j, 0].norm()), float(raw[j, 1].norm())
        cards.append(Card(
            trial=trial, layer=layer, feature=int(j), partition=names[j], row_set=row_set, n_rows=seen.n_rows,
            frequency=frequency, always_on=frequency >= cfg.always_on, histogram=_histogram(acts, cfg.bins),
            encoder_split={"a": pre[0], "b": pre[1], "a_share": abs(pre[0]) / max(abs(pre[0]) + abs(pre[1]), 1e-12)},
            decoder={"norm_a": norm_a, "norm_b": norm_b, "relative_norm": norm_a / max(norm_a + norm_b, 1e-12),
                     "cos_ab": _cos(raw[j, 0], raw[j, 1]), "cos_reference": _cos(differences[j], v),
                     "beta_a": float(betas[i, 0]), "beta_b": float(betas[i, 1])},
            top_examples=top, quantile_examples=sampled,
            logit_lens=logit_lens(lenses, tokenizer, raw[j, 0], raw[j, 1], cfg.lens_tokens),
            causal=(causal or {}).get(int(j), {}), note=note, settings=card_settings(cfg)))
    return cards


def reference_card(uri: str, layer: int, tokenizer, lenses: Lenses, cfg: CardConfig | None = None) -> Card:
    """The card of v = mean(x_A − x_B) over the row set: top contexts by (x_A − x_B)·v̂ (two passes: v, then
    the projections), its logit lens (v through A's and B's final norm and unembedding; `diff` = `a`)."""
    cfg = cfg or CardConfig()
    total, n = None, 0
    for rows, _ in _rows(uri, layer, cfg.rows):
        diff = (rows[:, 0] - rows[:, 1]).double().sum(0)
        total, n = diff if total is None else total + diff, n + len(rows)
    v = (total / max(n, 1)).float() if total is not None else torch.zeros(0)
    unit = v / v.norm().clamp_min(1e-12)
    projections, traced = [], []
    for rows, provenance in _rows(uri, layer, cfg.rows):
        projections.append(((rows[:, 0] - rows[:, 1]) @ unit).numpy())
        traced.append(provenance)
    projection = np.concatenate(projections) if projections else np.empty(0, np.float32)
    corpus = store.read_corpus(uri)
    ok = corpus is not None and bool(traced) and all(p is not None for p in traced)
    contexts = Contexts(corpus, np.concatenate(traced), tokenizer, cfg) if ok and corpus is not None else None
    positive = np.nonzero(projection > 0)[0]
    top, sampled = _examples(positive, projection[positive], contexts, cfg, lambda r: projection[r])
    lens = logit_lens(lenses, tokenizer, v, torch.zeros_like(v), cfg.lens_tokens)
    lens["b"], lens["diff"] = lens_tokens(lenses[1](v), tokenizer, cfg.lens_tokens), lens["a"]
    frequency = len(positive) / max(n, 1)
    return Card(trial="", layer=layer, feature=REFERENCE, partition="reference", row_set=row_set_name(uri, layer, n),
                n_rows=n, frequency=frequency, always_on=False,  # a direction, not a feature: never "always on"
                histogram=_histogram(projection[positive], cfg.bins), encoder_split={},
                decoder={"norm": float(v.norm())}, top_examples=top, quantile_examples=sampled, logit_lens=lens,
                note="" if ok else f"this store keeps no record or token position per row: {store.REHARVEST}",
                settings=card_settings(cfg))


def _cos(a: Tensor, b: Tensor) -> float:
    norm = float(a.norm() * b.norm())
    return float(a @ b) / norm if norm > 0 else 0.0


# ---------------------------------------------------------------- causal evidence from the trial's metrics


def causal_evidence(metrics: dict[str, Any], feature: int) -> dict[str, Any]:
    """What a trial's metrics say about `feature`: its attribution term (c_j, share, cos to v, β), the
    steering effect with its CI and α where it was the steered feature, and in which localisation sets it
    sits (the curve and patch_a take the largest terms first, ablate_b the largest B-exclusive ones)."""
    terms = metrics.get("diff_top") or []
    out: dict[str, Any] = {}
    term = next((t for t in terms if t.get("feature") == feature), None)
    if term is not None:
        out["attribution"] = {k: term.get(k) for k in ("contribution", "share", "cos_reference", "beta_a", "beta_b",
                                                         "mean_activation", "fires")}
        out["attribution"]["rank"] = terms.index(term) + 1
    if metrics.get("steer_feature") == feature:
        out["steering"] = {"target": metrics.get("steer_target"), "alpha": metrics.get("steer_alpha"),
                           "delta_pp": metrics.get("steer_delta_pp"), "lo": metrics.get("steer_delta_pp_lo"),
                           "hi": metrics.get("steer_delta_pp_hi")}
    ranked = {"curve": [t.get("feature") for t in terms], "patch_a": [t.get("feature") for t in terms],
              "ablate_b": [t.get("feature") for t in terms if t.get("partition") == "b_exclusive"]}
    sets = {}
    for name, order in ranked.items():
        n = metrics.get(f"loc_{name}_n")
        if isinstance(n, (int, float)) and n > 0 and feature in order[:int(n)]:
            sets[name] = {"n": int(n), "pp": metrics.get(f"loc_{name}_pp"), "lo": metrics.get(f"loc_{name}_pp_lo"),
                          "hi": metrics.get(f"loc_{name}_pp_hi")}
    if sets:
        out["localisation"] = sets
    return out
