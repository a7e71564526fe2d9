"""DARE (Yu et al. 2024, https://arxiv.org/abs/2311.03099): drop task-vector entries at random and rescale."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from ..errors import SoupError
from .registry import register_method
from .sparsify import disjoint_merge, drop_and_rescale, task_vectors, weights_or_ones
from .weighted import check_optional_weights


def check_dare(parameters: dict[str, Any], count: int) -> dict[str, Any]:
    """`drop_rate` in [0, 1) and optional weights, checked before any tensor is read."""
    if not 0.0 <= parameters["drop_rate"] < 1.0:
        raise SoupError(
            f"dare: drop_rate must be in [0, 1), got {parameters['drop_rate']}; it is the probability of dropping a "
            "task-vector entry (0.5 to 0.9 are usual)"
        )
    return check_optional_weights(parameters, count, allow_negative=True)


@register_method("dare", check=check_dare)
def dare(
    tensors: list[torch.Tensor],
    *,
    base: torch.Tensor,
    generator: torch.Generator,
    drop_rate: float,
    weights: list[float] | None = None,
    merge: Literal["linear", "ties"] = "linear",
    majority_sign: Literal["total", "frequency"] = "total",
    scale: float = 1.0,
) -> torch.Tensor:
    """DARE: τ̃ᵢ = mᵢ ⊙ τᵢ / (1 − p) with mᵢ ~ Bernoulli(1 − p), then combined.

    `merge: linear` gives θ_base + λ Σᵢ wᵢ τ̃ᵢ (DARE + task arithmetic; with p = 0 it is task arithmetic);
    `merge: ties` elects signs and takes the disjoint mean of the τ̃ᵢ (DARE-TIES). The masks come from a generator
    seeded by the recipe's `seed` and the tensor name, so the soup is reproducible.

    Args:
        drop_rate (`float`): p, the probability of dropping an entry, in [0, 1).
        weights (`list[float]`, *optional*): one per ingredient (default 1 each).
        merge (`str`, *optional*, defaults to `"linear"`): `"linear"` or `"ties"`.
        majority_sign (`str`, *optional*, defaults to `"total"`): for `merge: ties`.
        scale (`float`, *optional*, defaults to 1.0): λ.
    """
    weights = weights_or_ones(weights, len(tensors))
    taus = [drop_and_rescale(tau, drop_rate, generator) for tau in task_vectors(tensors, base)]
    return dare_combine(taus, base, weights, merge, majority_sign, scale)


def dare_combine(
    taus: Sequence[torch.Tensor],
    base: torch.Tensor,
    weights: Sequence[float],
    merge: Literal["linear", "ties"],
    majority_sign: Literal["total", "frequency"],
    scale: float,
) -> torch.Tensor:
    """Combine the dropped and rescaled task vectors (`drop_and_rescale`): linearly, or by TIES's disjoint merge."""
    if merge == "ties":
        return base + scale * disjoint_merge(taus, weights, majority_sign)
    out = base.clone()
    for weight, tau in zip(weights, taus):
        out.add_(tau, alpha=scale * weight)
    return out
