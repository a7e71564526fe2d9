"""Spherical interpolation of two ingredients (Shoemake 1985; as used for model merging by mergekit)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SoupError
from .registry import register_method


def check_two(parameters: dict[str, Any], count: int) -> dict[str, Any]:
    if count != 2:
        raise SoupError(f"slerp interpolates exactly 2 ingredients, got {count}; use multislerp for more")
    if not 0.0 <= parameters["t"] <= 1.0:
        raise SoupError(f"slerp: t must be in [0, 1], got {parameters['t']}")
    return parameters


@register_method("slerp", check=check_two)
def slerp(tensors: list[torch.Tensor], *, t: float = 0.5, collinear: float = 0.9995) -> torch.Tensor:
    """θ = sin((1−t)Ω)/sin Ω · θ₀ + sin(tΩ)/sin Ω · θ₁, with Ω the angle between θ₀ and θ₁ (flattened).

    t = 0 gives θ₀ and t = 1 gives θ₁. When |cos Ω| > `collinear` (nearly parallel), the formula is ill-conditioned
    and linear interpolation (1−t)θ₀ + tθ₁ is used, as the limit of slerp.

    Args:
        t (`float`, *optional*, defaults to 0.5): position between the first (0) and second (1) ingredient.
        collinear (`float`, *optional*, defaults to 0.9995): |cos Ω| above which linear interpolation is used.
    """
    first, second = tensors
    a, b = first.flatten(), second.flatten()
    norms = a.norm() * b.norm()
    cosine = (a @ b / norms).clamp(-1.0, 1.0) if norms > 0 else first.new_ones(())
    if cosine.abs() > collinear:
        return torch.lerp(first, second, t)
    omega = torch.arccos(cosine)
    sine = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / sine) * first + (torch.sin(t * omega) / sine) * second
