"""The reference steering direction (a positive control) and the arithmetic that compares features with it.

The reference at a layer and position is the difference of means, A minus B, of the two models'
residuals on the same prompts: the strongest simple steering baseline. If adding it to B does not
move B, no single direction at that layer/position can, and a feature's null reads as a null of the
model, not of the dictionary. Everything here is plain tensor math (no models, no Ray).
"""

from __future__ import annotations

import torch
from torch import Tensor

NO_STEERABLE_DIRECTION = "no steerable direction at this layer/position"
"""Label of a layer/position where the reference's test effect's 95% CI does not exclude 0 (upwards)."""


def mean_difference(x_a: Tensor, x_b: Tensor) -> Tensor:
    """v = mean_i (x_A,i − x_B,i) over paired rows (n, d_model) → (d_model,), float32."""
    if x_a.shape != x_b.shape or x_a.ndim != 2 or len(x_a) == 0:
        raise ValueError(f"reference: A rows {tuple(x_a.shape)} and B rows {tuple(x_b.shape)}; expected the same "
                         "non-empty (n, d_model) shape")
    return (x_a.float() - x_b.float()).mean(0)


def mean_norm(x: Tensor) -> float:
    """Mean ‖x_i‖ over rows (n, d_model): the residual scale that `scale_to_norm` multiplies."""
    return float(x.float().norm(dim=-1).mean())


def scale_to_norm(direction: Tensor, norm: float) -> Tensor:
    """`direction` rescaled to Euclidean norm `norm` (float32); a zero direction stays zero."""
    length = direction.float().norm()
    if length <= 0:
        return torch.zeros_like(direction, dtype=torch.float32)
    return direction.float() * (float(norm) / length)


def cosines(rows: Tensor, direction: Tensor) -> Tensor:
    """cos(rows_i, direction) for rows (n, d) → (n,); 0 where either vector is zero."""
    rows, direction = rows.float(), direction.float().to(rows.device)
    denominator = rows.norm(dim=-1) * direction.norm()
    return torch.where(denominator > 0, rows @ direction / denominator.clamp_min(1e-30), torch.zeros_like(denominator))


def share_of_reference(feature_pp: float, reference_pp: float) -> float:
    """The feature's test effect as a fraction of the reference's: feature_pp / reference_pp.

    Defined as 0.0 when the reference effect is ≤ 0 (there is no yardstick to be a share of; the
    layer then carries the NO_STEERABLE_DIRECTION label or a non-positive reference, and the feature's
    own pp still says what it did). Never NaN; may be negative or above 1."""
    return float(feature_pp) / float(reference_pp) if reference_pp > 0 else 0.0
