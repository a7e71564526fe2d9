"""Uniform soup: the plain average of the ingredients (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482)."""

from __future__ import annotations

import torch

from .registry import register_method


@register_method("uniform", mixing=lambda parameters, count: [1.0 / count] * count)
def uniform(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Average every ingredient: θ = (1/k) Σᵢ θᵢ.

    The sum runs left to right in fp32 and is divided by k once, so the result is bit-identical to
    `sum(tensors) / k`.
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    out = torch.add(tensors[0], tensors[1])
    for tensor in tensors[2:]:
        out.add_(tensor)
    return out.div_(len(tensors))
