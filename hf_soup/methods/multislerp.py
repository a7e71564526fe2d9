"""Spherical average of several ingredients: a weighted mean on the hypersphere, then the mean norm."""

from __future__ import annotations

from functools import partial

import torch

from .registry import register_method
from .sparsify import weights_or_ones
from .weighted import check_optional_weights


@register_method("multislerp", check=partial(check_optional_weights, allow_negative=False))
def multislerp(tensors: list[torch.Tensor], *, weights: list[float] | None = None) -> torch.Tensor:
    """Barycentric interpolation on the sphere (Buss & Fillmore 2001, one tangent-space step).

    Each θᵢ is split into direction uᵢ = θᵢ/‖θᵢ‖ and norm. With m the normalised weighted mean of the uᵢ, the
    directions are mapped to the tangent space at m (log map), averaged with the weights, mapped back (exp map)
    and scaled by the weighted mean norm. For two ingredients and weights (1−t, t) this is slerp.

    Args:
        weights (`list[float]`, *optional*): one non-negative weight per ingredient (default equal), normalised.
    """
    weights = weights_or_ones(weights, len(tensors))
    total = sum(weights)
    weights = [w / total for w in weights]
    shape = tensors[0].shape
    vectors = [tensor.flatten() for tensor in tensors]
    norms = [vector.norm() for vector in vectors]
    if any(norm == 0 for norm in norms):
        return sum(w * t for w, t in zip(weights, tensors))
    units = [vector / norm for vector, norm in zip(vectors, norms)]
    mean = sum(w * u for w, u in zip(weights, units))
    if mean.norm() < 1e-12:
        return sum(w * t for w, t in zip(weights, tensors))
    mean = mean / mean.norm()
    tangent = torch.zeros_like(mean)
    for weight, unit in zip(weights, units):
        cosine = (unit @ mean).clamp(-1.0, 1.0)
        angle = torch.arccos(cosine)
        direction = unit - cosine * mean
        if angle > 1e-7:
            tangent += weight * angle * direction / direction.norm().clamp_min(1e-30)
    length = tangent.norm()
    point = mean if length < 1e-12 else torch.cos(length) * mean + torch.sin(length) * tangent / length
    return (point * sum(w * n for w, n in zip(weights, norms))).reshape(shape)
