"""TIES-merging (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): trim, elect sign, disjoint merge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from ..errors import SoupError
from .registry import register_method
from .sparsify import disjoint_merge, keep_largest, keep_ranked, magnitude_ranks, task_vectors, weights_or_ones
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

    1. Trim: keep the `density` fraction of each task vector's entries with the largest magnitude (at equal
       magnitudes, the entries first in the tensor).
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
    return base + scale * disjoint_merge(taus, weights, majority_sign)


def trim_states(
    taus: Sequence[torch.Tensor], weights: Sequence[float], majority_sign: Literal["total", "frequency"]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every disjoint merge a TIES trim of these task vectors can give, whatever the density (flattened).

    An entry's trimmed set grows with k as ingredients join it, each at its `magnitude_ranks` position. Returns
    `joins` (k × n, the positions at which ingredients join each entry, ascending) and `merged` (n × (k + 1), the
    disjoint merge of each entry with its first s ingredients, s = 0…k), computed with the same functions as
    `ties`, so that `merged_at(joins, merged, keep)` is bit-identical to the trim-and-merge at that `keep`.
    """
    flats = [tau.flatten() for tau in taus]
    ranks = torch.stack([magnitude_ranks(flat) for flat in flats])
    joins = ranks.sort(dim=0).values
    merged = torch.empty(flats[0].numel(), len(flats) + 1)
    merged[:, 0] = 0.0  # nothing kept: no sign agrees, the disjoint mean is 0
    for size in range(1, len(flats) + 1):
        keep = joins[size - 1] + 1
        trimmed = [keep_ranked(flat, rank, keep) for flat, rank in zip(flats, ranks)]
        merged[:, size] = disjoint_merge(trimmed, weights, majority_sign)
    return joins, merged


def merged_at(joins: torch.Tensor, merged: torch.Tensor, keep: int) -> torch.Tensor:
    """The disjoint merge of `trim_states` when each task vector keeps its `keep` largest entries (flattened)."""
    size = (joins[0] < keep).to(torch.uint8 if len(joins) < 256 else torch.int32)
    for row in joins[1:]:
        size.add_(row < keep)
    return merged.gather(1, size.long().unsqueeze(1)).squeeze(1)
