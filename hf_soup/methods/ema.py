"""Averages of one run's checkpoints, oldest first: EMA and SWA (Izmailov et al. 2018, https://arxiv.org/abs/1803.05407)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SoupError
from .registry import register_method


def ema_weights(count: int, decay: float) -> list[float]:
    """The weight of each of `count` checkpoints (oldest first) in an EMA started at the first one."""
    return [decay ** (count - 1)] + [(1 - decay) * decay ** (count - 1 - i) for i in range(1, count)]


def swa_weights(count: int, last: int | None) -> list[float]:
    """Equal weights over the last `last` checkpoints (all when `None`), zero before."""
    used = count if last is None else min(last, count)
    return [0.0] * (count - used) + [1.0 / used] * used


def check_decay(parameters: dict[str, Any], count: int) -> dict[str, Any]:
    if not 0.0 <= parameters["decay"] < 1.0:
        raise SoupError(f"ema: decay must be in [0, 1), got {parameters['decay']}")
    return parameters


def check_last(parameters: dict[str, Any], count: int) -> dict[str, Any]:
    if parameters["last"] is not None and parameters["last"] < 1:
        raise SoupError(f"swa: last must be ≥ 1, got {parameters['last']}")
    return parameters


def _combine(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0])
    for weight, tensor in zip(weights, tensors):
        if weight:
            out.add_(tensor, alpha=weight)
    return out


@register_method("ema", check=check_decay, mixing=lambda p, count: ema_weights(count, p["decay"]))
def ema(tensors: list[torch.Tensor], *, decay: float = 0.9) -> torch.Tensor:
    """Exponential moving average of checkpoints in training order (oldest first): e₁ = θ₁, eₜ = d·eₜ₋₁ + (1−d)·θₜ.

    Ingredients must be listed oldest first (a pantry filled by `SoupCallback(keep="last:N")` is in that order).

    Args:
        decay (`float`, *optional*, defaults to 0.9): d.
    """
    return _combine(tensors, ema_weights(len(tensors), decay))


@register_method("swa", check=check_last, mixing=lambda p, count: swa_weights(count, p["last"]))
def swa(tensors: list[torch.Tensor], *, last: int | None = None) -> torch.Tensor:
    """Stochastic weight averaging: the equal-weight mean of the last N checkpoints (ingredients oldest first).

    Args:
        last (`int`, *optional*): N; all ingredients when unset.
    """
    return _combine(tensors, swa_weights(len(tensors), last))
