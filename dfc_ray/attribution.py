"""Where the A − B difference lives in a crosscoder: the reference direction split into feature terms.

The reference v is the mean of x_A − x_B over a prompt set at one position (dfc_ray/reference.py).
A crosscoder's raw-space reconstruction is affine in the codes, x̂_m = Σ_j f_j·d_j^m + b_m (d_j^m: feature
j's raw decoder row into model m; b_m = decode(0)_m: the decoder bias plus the per-model mean that the
normalization removed), so along v̂ the mean difference splits exactly into

    ‖v‖ = Σ_j c_j + (b_A − b_B)·v̂ + error,      c_j = mean[f_j] · (d_j^A − d_j^B)·v̂

with `error` the part of v the reconstruction misses. An A-exclusive feature's term is its A write
(d_j^B = 0), a B-exclusive feature's is minus its B write (B behaviour that A lost), a shared feature's
is the difference of its two rows. How many features carry Σ_j c_j (n50, n90) and which partitions
they sit in says whether the RL difference is localised, and where.

Latent Scaling (Minder et al. 2025, "Overcoming sparsity artifacts in crosscoders") checks a feature's
claimed exclusivity: β_m = argmin_β Σ_i ‖y_i^m − β·f_j(x_i)·d_j‖² = Σ_i f_ij⟨d_j, y_i^m⟩ / (‖d_j‖² Σ_i f_ij²),
fitted for both models with ONE direction d_j (the feature's stronger raw row) and y^m = x^m − b_m. A
truly A-exclusive feature has β_A ≈ 1 and β_B ≈ 0; β_B ≈ β_A means B carries the same direction with
the same activation (a shrinkage artifact, not exclusivity).

Plain tensor math on activations the caller provides (no models, no Ray).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from dfc_ray.crosscoder import DedicatedFeatureCrosscoder

PARTITIONS = ("a_exclusive", "b_exclusive", "shared")
"""The DFC's partitions, in the order shares are reported."""
SHARES = (0.5, 0.9)
"""The shares of Σ c_j whose feature counts are reported (n50, n90)."""
ENCODE_ROWS = 1024
"""Rows encoded at once."""


@dataclass
class FeatureTerm:
    """One feature's part of the difference."""

    feature: int
    partition: str
    """a_exclusive, b_exclusive or shared."""
    contribution: float
    """c_j = mean[f_j] · (d_j^A − d_j^B)·v̂, in raw residual units along v̂."""
    share: float
    """c_j / Σ c (0 when Σ c ≤ 0)."""
    mean_activation: float
    """mean[f_j] over the prompts (zeros included)."""
    fires: float
    """Fraction of prompts where f_j > 0."""
    cos_reference: float
    """cos(d_j^A − d_j^B, v)."""
    beta_a: float
    """Latent Scaling: how much of A's activation the feature's direction explains (see the module)."""
    beta_b: float
    """The same for B, with the same direction."""


@dataclass
class Attribution:
    """The reference direction split into feature terms, the bias and the reconstruction's error."""

    n_prompts: int
    reference_norm: float
    """‖v‖: what the parts below add up to."""
    features: float
    """Σ_j c_j."""
    bias: float
    """(b_A − b_B)·v̂ without the normalization means: the decoder biases' part."""
    norm_means: float
    """(mean_A − mean_B)·v̂: the per-model means that normalization removed."""
    error: float
    """‖v‖ − features − bias − norm_means: what the reconstruction misses along v̂."""
    cos_reconstruction: float
    """cos(mean(x̂_A − x̂_B), v): does the dictionary reproduce the difference's direction at all."""
    cos_norm_means: float
    """cos(mean_A − mean_B, v)."""
    n50: int
    """Fewest features whose terms reach 50% of Σ c (the largest first); −1 when Σ c ≤ 0."""
    n90: int
    """The same for 90%."""
    shares: dict[str, float]
    """Partition → Σ of its terms / Σ c (0 each when Σ c ≤ 0)."""
    top: list[FeatureTerm] = field(default_factory=list)
    """The largest positive terms, best first."""
    contributions: list[float] = field(default_factory=list)
    """c_j of every feature (what the causal tests select from)."""
    mean_activations: list[float] = field(default_factory=list)
    """mean[f_j] of every feature (the localisation curve's weights)."""

    def metrics(self) -> dict[str, float]:
        """diff_* trial metrics (dfc_ray/metrics.py); the top features go separately, as diff_top."""
        out = {"diff_n50": self.n50, "diff_n90": self.n90, "diff_reference_norm": self.reference_norm,
               "diff_features": self.features, "diff_bias": self.bias, "diff_norm_means": self.norm_means,
               "diff_error": self.error, "diff_cos_reconstruction": self.cos_reconstruction,
               "diff_cos_norm_means": self.cos_norm_means}
        return out | {f"diff_share_{p}": self.shares[p] for p in PARTITIONS}

    def top_rows(self) -> list[dict[str, Any]]:
        return [asdict(t) for t in self.top]


def partition_names(cc: DedicatedFeatureCrosscoder) -> list[str]:
    """Each feature's partition name, by feature index."""
    names = ["shared"] * cc.cfg.dict_size
    for name in ("a_exclusive", "b_exclusive"):
        for j in getattr(cc.partition, name).tolist():
            names[j] = name
    return names


def difference_directions(cc: DedicatedFeatureCrosscoder) -> Tensor:
    """d_j^A − d_j^B in raw space, (dict_size, d_model)."""
    raw = cc.raw_decoder().float()
    return raw[:, 0] - raw[:, 1]


def raw_bias(cc: DedicatedFeatureCrosscoder) -> Tensor:
    """b_m = decode(0): what the reconstruction holds with no feature active, (2, d_model), raw space."""
    with torch.inference_mode():
        return cc.decode(cc.b_enc.new_zeros(1, cc.cfg.dict_size))[0].float()


def encode(cc: DedicatedFeatureCrosscoder, x: Tensor) -> Tensor:
    """Codes (n, dict_size) of raw paired activations x (n, 2, d_model), on x's device."""
    device = cc.b_enc.device
    with torch.inference_mode():
        return torch.cat([cc.encode(x[i:i + ENCODE_ROWS].float().to(device))
                          for i in range(0, len(x), ENCODE_ROWS)]).to(x.device)


def encode_columns(cc: DedicatedFeatureCrosscoder, x: Tensor, features: Sequence[int]) -> Tensor:
    """`encode(cc, x)[:, features]` (n, len(features)), block by block, never holding (n, dict_size) codes."""
    device, index = cc.b_enc.device, torch.as_tensor(list(features), dtype=torch.long)
    with torch.inference_mode():
        return torch.cat([cc.encode_columns(x[i:i + ENCODE_ROWS].float().to(device), index)
                          for i in range(0, len(x), ENCODE_ROWS)]).to(x.device)


def fewest_for(contributions: Tensor, share: float) -> int:
    """Fewest terms (the largest first) whose sum reaches `share` of the total; −1 when the total is ≤ 0."""
    total = float(contributions.sum())
    if total <= 0:
        return -1
    running = contributions.double().sort(descending=True).values.cumsum(0)
    return int((running < share * total).sum()) + 1


def scaling_sums(codes: Tensor, targets: Tensor, directions: Tensor) -> tuple[Tensor, Tensor]:
    """Latent Scaling's sums over rows, (Σ_i f_i⟨d, y_i^m⟩ (n_features, 2), Σ_i f_i²·‖d‖² (n_features, 1)),
    float64: added over blocks of rows, they give `latent_scaling` of all of them (a streaming pass)."""
    codes, targets, directions = codes.double(), targets.double(), directions.double()
    projected = torch.einsum("nmd,fd->nfm", targets, directions)  # ⟨d_f, y_i^m⟩
    return (codes[..., None] * projected).sum(0), (codes.pow(2).sum(0) * directions.pow(2).sum(1))[:, None]


def scaling_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """β from `scaling_sums` (summed over any blocks); 0 for a feature that never fires or has no direction."""
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), torch.zeros_like(numerator)).float()


def latent_scaling(codes: Tensor, targets: Tensor, directions: Tensor) -> Tensor:
    """β (n_features, 2): per feature, argmin_β Σ_i ‖targets_i^m − β·codes_i·d‖² for each model m.

    codes (n, n_features), targets (n, 2, d_model), directions (n_features, d_model); 0 for a feature that
    never fires or has no direction."""
    return scaling_ratio(*scaling_sums(codes, targets, directions))


def stronger_rows(cc: DedicatedFeatureCrosscoder, features: Sequence[int]) -> Tensor:
    """Each feature's stronger raw decoder row (n_features, d_model): the one direction Latent Scaling fits
    for both models."""
    raw = cc.raw_decoder_rows(torch.as_tensor(list(features), dtype=torch.long)).detach().float().cpu()  # (n, 2, d)
    return raw[torch.arange(len(raw)), raw.norm(dim=2).argmax(1)]


def _cos(a: Tensor, b: Tensor) -> float:
    norm = float(a.norm() * b.norm())
    return float(a @ b) / norm if norm > 0 else 0.0


def attribute(cc: DedicatedFeatureCrosscoder, x: Tensor, top: int = 10) -> Attribution:
    """Split v = mean(x_A − x_B) over the rows of x (n, 2, d_model; raw activations at one position)
    into the crosscoder's feature terms, its bias and its error (module docstring)."""
    if x.ndim != 3 or x.shape[1] != 2 or x.shape[2] != cc.cfg.d_model or len(x) == 0:
        raise ValueError(f"attribution: activations of shape {tuple(x.shape)}; expected (n ≥ 1, 2, {cc.cfg.d_model})")
    x = x.detach().float().cpu()
    cc_device = cc.b_enc.device
    codes = encode(cc, x.to(cc_device)).cpu()
    directions, bias = difference_directions(cc).cpu(), raw_bias(cc).cpu()
    v = (x[:, 0] - x[:, 1]).mean(0)
    norm = float(v.norm())
    unit = v / norm if norm > 0 else torch.zeros_like(v)
    mean_f = codes.mean(0)
    c = mean_f * (directions @ unit)
    means = cc.norm_mean.detach().float().cpu()
    bias_diff, means_diff = bias[0] - bias[1], means[0] - means[1]
    features, norm_means = float(c.sum()), float(means_diff @ unit)
    decoder_bias = float(bias_diff @ unit) - norm_means
    reconstructed = mean_f @ directions + bias_diff  # mean(x̂_A − x̂_B): decode is affine
    shares = {p: float(c[getattr(cc.partition, p).cpu()].sum()) / features if features > 0 else 0.0
              for p in PARTITIONS}
    names = partition_names(cc)
    order = [j for j in c.argsort(descending=True).tolist()[:top] if c[j] > 0]
    betas = latent_scaling(codes[:, order], x - bias, stronger_rows(cc, order))
    terms = [FeatureTerm(feature=j, partition=names[j], contribution=float(c[j]),
                         share=float(c[j]) / features if features > 0 else 0.0, mean_activation=float(mean_f[j]),
                         fires=float((codes[:, j] > 0).float().mean()), cos_reference=_cos(directions[j], v),
                         beta_a=float(betas[i, 0]), beta_b=float(betas[i, 1])) for i, j in enumerate(order)]
    return Attribution(
        n_prompts=len(x), reference_norm=norm, features=features, bias=decoder_bias, norm_means=norm_means,
        error=norm - features - decoder_bias - norm_means, cos_reconstruction=_cos(reconstructed, v),
        cos_norm_means=_cos(means_diff, v), n50=fewest_for(c, SHARES[0]), n90=fewest_for(c, SHARES[1]),
        shares=shares, top=terms, contributions=c.tolist(), mean_activations=mean_f.tolist())


def largest_terms(attribution: Attribution, n: int, features: Sequence[int] | None = None) -> list[int]:
    """The n features (among `features`, default all) with the largest positive terms, largest first."""
    pool = range(len(attribution.contributions)) if features is None else features
    c = attribution.contributions
    return sorted((j for j in pool if c[j] > 0), key=lambda j: (-c[j], j))[:n]


def mean_write(cc: DedicatedFeatureCrosscoder, attribution: Attribution, features: Sequence[int]) -> Tensor:
    """Σ_j mean[f_j]·(d_j^A − d_j^B) over `features`: what they add, on average, to x̂_A − x̂_B (d_model,)."""
    index = torch.as_tensor(list(features), dtype=torch.long)
    weights = torch.tensor(attribution.mean_activations)[index]
    return weights @ difference_directions(cc).cpu()[index] if len(index) else torch.zeros(cc.cfg.d_model)


def patch_norms(cc: DedicatedFeatureCrosscoder, codes: Tensor, features: Sequence[int]) -> Tensor:
    """Per row of `codes` (n, dict_size), ‖Σ_j f_j·(d_j^A − d_j^B)‖ over `features`: the size of a patch
    that moves those features' writes from one model's to the other's (n,)."""
    index = torch.as_tensor(list(features), dtype=torch.long)
    return (codes.float().cpu()[:, index] @ difference_directions(cc).cpu()[index]).norm(dim=-1)
