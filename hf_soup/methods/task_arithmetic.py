"""Task arithmetic (Ilharco et al. 2023, https://arxiv.org/abs/2212.04089)."""

from __future__ import annotations

from functools import partial

import torch

from .registry import register_method
from .sparsify import task_vectors, weights_or_ones
from .weighted import check_optional_weights


@register_method("task_arithmetic", check=partial(check_optional_weights, allow_negative=True))
def task_arithmetic(
    tensors: list[torch.Tensor], *, base: torch.Tensor, weights: list[float] | None = None, scale: float = 1.0
) -> torch.Tensor:
    """Add scaled task vectors to the base: θ = θ_base + λ Σᵢ wᵢ (θᵢ − θ_base).

    Args:
        weights (`list[float]`, *optional*): one per ingredient (default 1 each); negative weights subtract a task
            (forgetting, "task negation").
        scale (`float`, *optional*, defaults to 1.0): λ.
    """
    out = base.clone()
    for weight, tau in zip(weights_or_ones(weights, len(tensors)), task_vectors(tensors, base)):
        out.add_(tau, alpha=scale * weight)
    return out
