"""Pure helpers that TIES and DARE are composed of (not registered methods).

All take and return fp32 tensors and never modify their inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from ..errors import SoupError


def task_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """τᵢ = θᵢ − θ_base."""
    return [tensor - base for tensor in tensors]


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a 1-D tensor, the same value on every device (with NaN in it: NaN, or a value
    that every NaN is counted above).

    The CPU selects it with `kthvalue` (one linear pass; `topk` sorts partially and is slower for large k); CUDA's
    `kthvalue` runs one thread block per row, so there `topk`, which spreads a large row over many, selects it.
    """
    if values.is_cuda:
        return values.topk(k, sorted=False).values.min()
    return values.kthvalue(values.numel() - k + 1).values


def keep_largest(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the k = max(1, ⌊density · n⌋) entries of largest magnitude (exactly k, as in TIES and mergekit).

    Entries whose magnitude equals the k-th largest are kept lowest index first, so the same entries are kept on
    every device (`topk` leaves that choice to its implementation, and CPU and CUDA choose differently). NaN counts
    as the largest magnitude and is always kept, so a diverged ingredient cannot be trimmed into a finite soup.
    """
    if not 0.0 < density <= 1.0:
        raise SoupError(f"density must be in (0, 1], got {density}")
    if density == 1.0 or tau.numel() == 0:
        return tau.clone()
    keep = max(1, int(density * tau.numel()))
    flat = tau.flatten()
    magnitude = flat.abs()
    threshold = kth_largest(magnitude, keep)
    kept = torch.le(magnitude, threshold).logical_not_()
    short = keep - int(kept.count_nonzero())
    if short > 0:  # ties at the threshold: the lowest indices
        kept[(magnitude == threshold).nonzero().flatten()[:short]] = True
    return torch.where(kept, flat, 0.0).view_as(tau)


def drop_and_rescale(tau: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability p and rescale the rest by 1/(1 − p).

    The mask is drawn on the generator's device (the CPU) and moved to `tau`'s, so a seed gives the same mask
    whatever device the merge runs on.
    """
    if not 0.0 <= drop_rate < 1.0:
        raise SoupError(f"drop_rate must be in [0, 1), got {drop_rate}")
    if drop_rate == 0.0:
        return tau.clone()
    keep = torch.rand(tau.shape, generator=generator, device=generator.device) >= drop_rate
    return torch.where(keep.to(tau.device), tau / (1.0 - drop_rate), torch.zeros_like(tau))


def elect_sign(
    taus: Sequence[torch.Tensor], weights: Sequence[float], method: Literal["total", "frequency"]
) -> torch.Tensor:
    """The sign each entry should have: of the weighted sum (`total`, TIES) or of the majority count (`frequency`)."""
    if method == "total":
        mass = sum(w * tau for w, tau in zip(weights, taus))
    else:
        mass = sum(torch.sign(tau) for tau in taus)
    sign = torch.sign(mass)
    return torch.where(sign == 0, torch.ones_like(sign), sign)


def disjoint_mean(taus: Sequence[torch.Tensor], weights: Sequence[float], sign: torch.Tensor) -> torch.Tensor:
    """Weighted mean, per entry, of the task vectors whose (non-zero) entry agrees with `sign`."""
    total = torch.zeros_like(taus[0])
    count = torch.zeros_like(taus[0])
    for weight, tau in zip(weights, taus):
        agree = (torch.sign(tau) == sign) & (tau != 0)
        total += torch.where(agree, weight * tau, torch.zeros_like(tau))
        count += agree.float() * weight
    return torch.where(count != 0, total / count.clamp_min(1e-12), torch.zeros_like(total))


def weights_or_ones(weights: Sequence[float] | None, count: int) -> list[float]:
    return [1.0] * count if weights is None else list(weights)
