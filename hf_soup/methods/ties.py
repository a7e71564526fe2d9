"""TIES-merging (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): trim, elect sign, disjoint merge."""

from __future__ import annotations

from typing import Any, Literal

import torch

from ..errors import SoupError
from .registry import register_method
from .sparsify import disjoint_mean, elect_sign, keep_largest, task_vectors, weights_or_ones
from .weighted import check_optional_weights


def check_ties(parameters: dict[str, Any], count: int) -> dict[str, Any]:
    """`density` in (0, 1] and optional non-negative weights, checked before any tensor is read."""
    if not 0.0 < parameters["density"] <= 1.0:
        raise SoupError(
            f"ties: density must be in (0, 1], got {parameters['density']}; it is the fraction of entries kept per "
            "task vector (0.2 to 0.5 are usual)"
        )
    return check_optional_weights(parameters, count, allow_negative=False)


@register_method("ties", check=check_ties)
def ties(
    tensors: list[torch.Tensor],
    *,
    base: torch.Tensor,
    density: float,
    weights: list[float] | None = None,
    majority_sign: Literal["total", "frequency"] = "total",
    scale: float = 1.0,
) -> torch.Tensor:
    """TIES: θ = θ_base + λ · disjoint_mean(trim(τᵢ, density)), where τᵢ = θᵢ − θ_base.

    1. Trim: keep the `density` fraction of each task vector's entries with the largest magnitude.
    2. Elect: each entry's sign is that of the weighted sum of the trimmed vectors (`total`) or of the majority
       of their signs (`frequency`).
    3. Disjoint merge: average, per entry, only the trimmed values that agree with the elected sign.

    Args:
        density (`float`): fraction of entries kept per task vector, in (0, 1].
        weights (`list[float]`, *optional*): one non-negative weight per ingredient (default 1 each).
        majority_sign (`str`, *optional*, defaults to `"total"`): `"total"` or `"frequency"`.
        scale (`float`, *optional*, defaults to 1.0): λ.
    """
    weights = weights_or_ones(weights, len(tensors))
    taus = [keep_largest(tau, density) for tau in task_vectors(tensors, base)]
    sign = elect_sign(taus, weights, majority_sign)
    return base + scale * disjoint_mean(taus, weights, sign)
