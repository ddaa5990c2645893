"""Rank A-exclusive features by how well their activation separates tool from non-tool prompts.

Activations are read where steering writes: the last prompt token (weakness 4 of the seed study was
training/evaluating at different positions). Positives are tool prompts (ground truth non-empty);
negatives are prompts that need no tool (small talk) and plain text. Each feature gets Cohen's d
and AUROC of its activation, positives vs negatives, plus the firing statistics steering uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import torch
from torch import Tensor

from dfc_ray.crosscoder import DedicatedFeatureCrosscoder
from dfc_ray.interventions import last_prompt_residuals


NO_SIGNAL = "no feature separates tool prompts"
"""What a trial reports instead of a feature when every candidate's ranking statistic ties
(docs/evaluation.md): a tie broken by index is no choice."""


def has_signal(keys: Sequence[Hashable], null: Hashable) -> bool:
    """Whether a ranking's statistics (one key per candidate) tell candidates apart: an all-tied ranking
    (Cohen's d 0 and AUROC 0.5 for every never-firing feature, equal log-prob gains) has no winner; a
    lone candidate has one unless its key is the statistic's `null` (no effect)."""
    return len(set(keys)) > 1 or (len(keys) == 1 and keys[0] != null)


@dataclass
class FeatureStats:
    """One feature's separation of positives (tool prompts) from negatives."""

    feature: int
    """Index in the dictionary."""
    cohens_d: float
    """(mean_pos − mean_neg) / pooled standard deviation; 0 when the feature never varies."""
    auroc: float
    """P(activation on a random positive > on a random negative), ties counted half."""
    mean_pos: float
    """Mean activation over positives (zeros included)."""
    mean_neg: float
    """Mean activation over negatives (zeros included)."""
    fire_pos: float
    """Fraction of positives on which the feature is active."""
    fire_neg: float
    """Fraction of negatives on which the feature is active."""
    typical: float
    """Mean activation over the positives where it fires (0 if it never does): a natural steering scale."""


def last_token_codes(cc: DedicatedFeatureCrosscoder, model_a: torch.nn.Module, model_b: torch.nn.Module, tokenizer,
                     prompts: Sequence[str], layer: int, batch_size: int = 32) -> Tensor:
    """Crosscoder codes (n_prompts, dict_size) at each prompt's last token, on CPU."""

    x = torch.stack([last_prompt_residuals(model, tokenizer, prompts, layer, batch_size) for model in (model_a,
                                                                                                       model_b)],
                    dim=1)
    return encode_pairs(cc, x)


def encode_pairs(cc: DedicatedFeatureCrosscoder, x: Tensor) -> Tensor:
    """Codes (n, dict_size) on CPU of raw paired activations x (n, 2, d_model), 1024 rows at a time."""
    device = cc.b_enc.device
    with torch.inference_mode():
        return torch.cat([cc.encode(x[i:i + 1024].float().to(device)) for i in range(0, len(x), 1024)]).cpu()


def auroc(pos: Tensor, neg: Tensor) -> Tensor:
    """Per-column AUROC of (n_pos, F) vs (n_neg, F) scores via the Mann–Whitney U statistic (ties = ½)."""
    scores = torch.cat([pos, neg]).double()
    # Average ranks with ties: rank = (#smaller) + (#equal + 1) / 2, computed per column by sorting.
    order = scores.argsort(0)
    sorted_scores = scores.gather(0, order)
    ranks_sorted = torch.empty_like(scores)
    for col in range(scores.shape[1]):
        _, inverse, counts = sorted_scores[:, col].unique_consecutive(return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        ranks_sorted[:, col] = (ends - (counts.double() - 1) / 2)[inverse]
    ranks = torch.empty_like(ranks_sorted).scatter_(0, order, ranks_sorted)
    n_pos, n_neg = len(pos), len(neg)
    u = ranks[:n_pos].sum(0) - n_pos * (n_pos + 1) / 2
    return (u / (n_pos * n_neg)).float()


def cohens_d(pos: Tensor, neg: Tensor) -> Tensor:
    """Per-column Cohen's d with the pooled (n−1) standard deviation; 0 where both groups are constant."""
    n_pos, n_neg = len(pos), len(neg)
    diff = pos.mean(0) - neg.mean(0)
    pooled = (((n_pos - 1) * pos.var(0) + (n_neg - 1) * neg.var(0)) / max(n_pos + n_neg - 2, 1)).sqrt()
    return torch.where(pooled > 0, diff / pooled.clamp_min(1e-12), torch.zeros_like(diff))


def rank_features(pos: Tensor, neg: Tensor, features: Sequence[int] | Tensor) -> list[FeatureStats]:
    """Stats of `features` from codes on positives (n_pos, D) and negatives (n_neg, D), best first.

    Sorted by Cohen's d, then AUROC (descending)."""
    feats = torch.as_tensor(features, dtype=torch.long)
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError(f"ranking: {len(pos)} positive and {len(neg)} negative prompts; expected at least 2 of each")
    if len(feats) == 0:
        return []
    p, n = pos[:, feats].float(), neg[:, feats].float()
    d, area = cohens_d(p, n), auroc(p, n)
    fires = p > 0
    typical = (p * fires).sum(0) / fires.sum(0).clamp_min(1)
    stats = [FeatureStats(int(f), float(d[i]), float(area[i]), float(p[:, i].mean()), float(n[:, i].mean()),
                          float(fires[:, i].float().mean()), float((n[:, i] > 0).float().mean()), float(typical[i]))
             for i, f in enumerate(feats.tolist())]
    return sorted(stats, key=lambda s: (-s.cohens_d, -s.auroc, s.feature))


def separates(ranking: Sequence[FeatureStats]) -> bool:
    """Whether the Cohen's d ranking has a winner (see `has_signal`)."""
    return has_signal([(s.cohens_d, s.auroc) for s in ranking], (0.0, 0.5))
