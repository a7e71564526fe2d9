"""Pure helpers that TIES and DARE are composed of (not registered methods).

All take and return fp32 tensors and never modify their inputs. What does not depend on a method's parameters
(the magnitude order behind a trim, DARE's random draws) is computed by its own helper, so a search can keep it
between trials (`hf_soup.strategies.trial_cache`) and get bit-identical tensors.
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


def kept_count(density: float, numel: int) -> int:
    """How many entries a trim to `density` keeps: k = max(1, ⌊density · n⌋) (exactly k, as in TIES and mergekit)."""
    if not 0.0 < density <= 1.0:
        raise SoupError(f"density must be in (0, 1], got {density}")
    return max(1, int(density * numel))


def keep_largest(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the k = `kept_count(density, n)` entries of largest magnitude.

    Among entries of equal magnitude at the cut, those earlier in the flattened tensor are kept (fp32 task vectors
    hold many equal magnitudes): the same entries as the first k of `magnitude_ranks`, on any machine.
    """
    keep = kept_count(density, tau.numel())
    if density == 1.0 or tau.numel() == 0:
        return tau.clone()
    flat = tau.flatten()
    magnitude = flat.abs()
    cut = kth_largest(magnitude, keep)
    kept = ~(magnitude <= cut)  # NaN is kept, as the largest (the engine then names the diverged ingredient)
    short = keep - int(kept.count_nonzero())
    if short > 0:  # ties at the cut: the lowest indices
        kept[(magnitude == cut).nonzero().flatten()[:short]] = True
    return torch.where(kept, flat, 0.0).view_as(tau)


def magnitude_ranks(tau: torch.Tensor) -> torch.Tensor:
    """Each entry's position when the entries are ordered by magnitude, largest first (equal magnitudes: earlier
    entry first), flattened. `keep_ranked(tau, ranks, k)` equals `keep_largest` at any density giving k."""
    numel = tau.numel()
    # A non-negative float's bits, read as an integer, order as the float does (NaN above Inf); integers sort fast.
    order = torch.argsort(-tau.flatten().float().abs().view(torch.int32), stable=True)
    dtype = torch.int32 if numel < 2**31 else torch.int64
    ranks = torch.empty(numel, dtype=dtype)
    ranks[order] = torch.arange(numel, dtype=dtype)
    return ranks


def keep_ranked(tau: torch.Tensor, ranks: torch.Tensor, keep: int) -> torch.Tensor:
    """`tau` (flattened) with all but its `keep` first entries by `magnitude_ranks` set to 0."""
    return torch.where(ranks < keep, tau.flatten(), 0.0)


def drop_and_rescale(tau: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability p and rescale the rest by 1/(1 − p)."""
    _check_drop_rate(drop_rate)
    return tau.clone() if drop_rate == 0.0 else rescale_kept(tau, drop_rate, draws(tau, generator))


def draws(tau: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The uniform draws that decide which entries of `tau` DARE drops (whatever the drop rate), drawn on the
    generator's device (the CPU), so a seed gives the same mask whatever device the merge runs on."""
    return torch.rand(tau.shape, generator=generator, device=generator.device)


def rescale_kept(tau: torch.Tensor, drop_rate: float, uniform: torch.Tensor) -> torch.Tensor:
    """Drop the entries whose draw in `uniform` is below p; rescale the rest by 1/(1 − p)."""
    _check_drop_rate(drop_rate)
    if drop_rate == 0.0:
        return tau.clone()
    return torch.where((uniform >= drop_rate).to(tau.device), tau / (1.0 - drop_rate), torch.zeros_like(tau))


def _check_drop_rate(drop_rate: float) -> None:
    if not 0.0 <= drop_rate < 1.0:
        raise SoupError(f"drop_rate must be in [0, 1), got {drop_rate}")


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


def disjoint_merge(
    taus: Sequence[torch.Tensor], weights: Sequence[float], majority_sign: Literal["total", "frequency"]
) -> torch.Tensor:
    """Elect each entry's sign, then take the disjoint mean of the task vectors that agree with it (TIES)."""
    return disjoint_mean(taus, weights, elect_sign(taus, weights, majority_sign))


def weights_or_ones(weights: Sequence[float] | None, count: int) -> list[float]:
    return [1.0] * count if weights is None else list(weights)
