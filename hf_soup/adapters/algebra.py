"""Pure tensor functions over LoRA factors: the exact soup, its SVD compression, and the naive A/B average.

For one module, adapter i contributes cᵢ Bᵢ Aᵢ with cᵢ = wᵢ sᵢ (its soup weight times its own scaling). Nothing here
forms a full out × in matrix unless asked (`delta_weight`): norms and the SVD work on the factors, in O((out + in) R²)
for a total rank R.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Factors = tuple[torch.Tensor, torch.Tensor]  # (A: r × in [× kh × kw], B: out × r [× 1 × 1])


def concat_factors(factors: Sequence[Factors], coefficients: Sequence[float]) -> Factors:
    """The exact soup as one LoRA pair of rank Σᵢ rᵢ: A = [A₁; …; Aₖ], B = [c₁B₁ … cₖBₖ], so B A = Σᵢ cᵢ Bᵢ Aᵢ.

    This is peft's `combination_type="cat"`; it also holds for convolutions (A stacks output channels, B input
    channels).
    """
    a = torch.cat([a for a, _ in factors], dim=0)
    b = torch.cat([b * c for (_, b), c in zip(factors, coefficients)], dim=1)
    return a, b


def delta_weight(a: torch.Tensor, b: torch.Tensor, transposed: bool) -> torch.Tensor:
    """ΔW = B A in the layout of the base weight (transposed for embeddings and `fan_in_fan_out` layers)."""
    delta = b @ a
    return delta.T if transposed else delta


def norm_squared(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖B A‖²_F = tr((BᵀB)(AAᵀ)), in float64, without forming B A."""
    a, b = a.double(), b.double()
    return float(((b.T @ b) * (a @ a.T)).sum())


def difference_squared(first: Factors, second: Factors) -> float:
    """‖B₁A₁ − B₂A₂‖²_F from the factors: the norm of the pair ([A₁; A₂], [B₁, −B₂])."""
    (a1, b1), (a2, b2) = first, second
    return max(norm_squared(torch.cat([a1, a2]), torch.cat([b1, -b2], dim=1)), 0.0)


def truncated_svd(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The best rank-`rank` approximation of ΔW = B A (Eckart–Young), as LoRA factors, and its squared error.

    With B = Q_b R_b and Aᵀ = Q_a R_a (thin QR), ΔW = Q_b (R_b R_aᵀ) Q_aᵀ, so the SVD of the small R × R core gives
    that of ΔW. The singular values are split evenly: B' = U √S, A' = √S Vᵀ.

    Returns:
        `(A', B', error², total²)`: ‖ΔW − B'A'‖²_F = Σ_{j > rank} σⱼ² and ‖ΔW‖²_F = Σ σⱼ² (exactly 0 error when
        `rank` ≥ the rank of ΔW).
    """
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    kept = min(rank, s.numel())
    root = s[:kept].sqrt()
    new_b = (q_b @ u[:, :kept]) * root
    new_a = root[:, None] * (vh[:kept] @ q_a.T)
    return new_a.float(), new_b.float(), float((s[kept:] ** 2).sum()), float((s**2).sum())


def naive_factors(factors: Sequence[Factors], coefficients: Sequence[float]) -> Factors:
    """A and B averaged separately, as peft's `add_weighted_adapter(combination_type="linear")` does:
    A = Σᵢ sign(cᵢ) √|cᵢ| Aᵢ, B = Σᵢ √|cᵢ| Bᵢ. Their product (Σ √cᵢ Bᵢ)(Σ √cⱼ Aⱼ) has cross terms Bᵢ Aⱼ (i ≠ j):
    it is NOT the soup Σᵢ cᵢ Bᵢ Aᵢ (peft issues #2796, #2918, #3004, #3761). All ranks must be equal.
    """
    roots = [abs(c) ** 0.5 for c in coefficients]
    a = sum((a * (r if c >= 0 else -r) for (a, _), r, c in zip(factors, roots, coefficients)), torch.tensor(0.0))
    b = sum((b * r for (_, b), r in zip(factors, roots)), torch.tensor(0.0))
    return a, b
