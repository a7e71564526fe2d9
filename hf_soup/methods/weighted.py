"""Weighted soup: a linear combination of the ingredients with user weights."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import SoupError
from .registry import register_method


def check_weights(parameters: dict[str, Any], count: int, *, allow_negative: bool = False) -> dict[str, Any]:
    """One finite weight per ingredient (non-negative unless allowed); a zero total cannot be normalised."""
    weights = parameters["weights"]
    if len(weights) != count:
        raise SoupError(f"weights has {len(weights)} value(s) for {count} ingredient(s); give one weight each")
    if not all(math.isfinite(w) for w in weights):
        raise SoupError(f"weights must be finite numbers, got {weights}")
    if not allow_negative and any(w < 0 for w in weights):
        raise SoupError(f"weights must not be negative, got {weights}; drop an ingredient instead of weighting it < 0")
    if parameters.get("normalize") and math.isclose(sum(weights), 0.0, abs_tol=1e-12):
        raise SoupError(f"weights {weights} sum to 0 and cannot be normalised; set normalize: false or change them")
    return parameters


def check_optional_weights(parameters: dict[str, Any], count: int, *, allow_negative: bool) -> dict[str, Any]:
    """`check_weights` for methods whose `weights` may be left out (then 1 each)."""
    if parameters.get("weights") is None:
        return parameters
    return check_weights(parameters, count, allow_negative=allow_negative)


def effective_weights(weights: list[float], normalize: bool) -> list[float]:
    """The weights applied: divided by their sum when `normalize`."""
    total = sum(weights)
    return [w / total for w in weights] if normalize else list(weights)


@register_method(
    "weighted",
    check=check_weights,
    mixing=lambda parameters, count: effective_weights(parameters["weights"], parameters["normalize"]),
)
def weighted(tensors: list[torch.Tensor], *, weights: list[float], normalize: bool = True) -> torch.Tensor:
    """Weighted soup: θ = Σᵢ wᵢ θᵢ, with wᵢ divided by Σⱼ wⱼ when `normalize` (the default).

    Args:
        weights (`list[float]`): one non-negative weight per ingredient, in ingredient order.
        normalize (`bool`, *optional*, defaults to `True`): divide the weights by their sum, so that they average;
            with `False` they are used as given (their sum scales the model).
    """
    applied = effective_weights(weights, normalize)
    out = tensors[0] * applied[0]
    for tensor, weight in zip(tensors[1:], applied[1:]):
        out.add_(tensor, alpha=weight)
    return out
