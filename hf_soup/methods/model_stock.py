"""Model Stock (Jang et al. 2024, https://arxiv.org/abs/2403.19522): interpolate the average towards the base."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SoupError
from .registry import register_method
from .sparsify import task_vectors


def check_at_least_two(parameters: dict[str, Any], count: int) -> dict[str, Any]:
    if count < 2:
        raise SoupError(f"model_stock needs at least 2 ingredients (it uses the angle between them), got {count}")
    return parameters


@register_method("model_stock", check=check_at_least_two)
def model_stock(tensors: list[torch.Tensor], *, base: torch.Tensor) -> torch.Tensor:
    """θ = t · mean(θᵢ) + (1 − t) · θ_base with t = k·cos φ / (1 + (k − 1)·cos φ), per tensor.

    φ is the angle between task vectors τᵢ = θᵢ − θ_base (the mean pairwise cosine for k > 2). Identical task vectors
    (cos φ = 1) give t = 1, the fine-tuned weights; orthogonal ones (cos φ = 0) give the base.
    """
    taus = [tau.flatten() for tau in task_vectors(tensors, base)]
    cosines = []
    for i in range(len(taus)):
        for j in range(i + 1, len(taus)):
            norms = taus[i].norm() * taus[j].norm()
            cosines.append(float(taus[i] @ taus[j] / norms) if norms > 0 else 1.0)
    cosine = max(min(sum(cosines) / len(cosines), 1.0), -1.0)
    k = len(tensors)
    denominator = 1 + (k - 1) * cosine
    ratio = k * cosine / denominator if abs(denominator) > 1e-12 else 0.0
    mean = sum(tensors) / k
    return ratio * mean + (1 - ratio) * base
