"""Fisher-weighted averaging (Matena & Raffel 2022, https://arxiv.org/abs/2111.09832)."""

from __future__ import annotations

from typing import Any

import torch

from .registry import register_method


def fisher_diagonals(kitchen, scorer, split: str, parameters: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher of the resident model: the mean over examples of the squared gradient of
    each example's loss, F = E[(∂ℓ/∂θ)²], on up to `examples` rows of `split` (one example per backward pass)."""
    model, data = kitchen.model, scorer.split(split)
    count = min(len(data), parameters["examples"])
    targets = {name: kitchen.parameter(name) for name in kitchen.names()}
    targets = {name: p for name, p in targets.items() if p is not None and p.is_floating_point()}
    sums = {name: torch.zeros(p.shape) for name, p in targets.items()}
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    try:
        for row in range(count):
            batch = scorer.collator([data[row]])
            model.zero_grad(set_to_none=True)
            logits = scorer.task.training_outputs(model, batch)
            scorer.task.training_loss(logits, batch["labels"].to(logits.device), scorer.causal).backward()
            for name, parameter in targets.items():
                if parameter.grad is not None:
                    sums[name] += parameter.grad.detach().float().cpu() ** 2
    finally:
        for parameter in model.parameters():
            parameter.grad = None
            parameter.requires_grad_(False)
    return {name: total / max(count, 1) for name, total in sums.items()}


@register_method("fisher", statistics=fisher_diagonals)
def fisher(
    tensors: list[torch.Tensor], *, statistics: list[torch.Tensor | None], examples: int = 256, floor: float = 1e-6
) -> torch.Tensor:
    """Fisher merging: θ = Σᵢ Fᵢ ⊙ θᵢ / Σᵢ Fᵢ, entry by entry, with Fᵢ the diagonal Fisher of ingredient i.

    Each Fᵢ is estimated on the recipe's evaluation `selection_split` (see `fisher_diagonals`). `floor` × the mean
    Fisher of the tensor is added to every Fᵢ (relative, because a confident model has tiny gradients), so entries
    no example touched fall back to the plain mean; tensors without a Fisher (buffers) are averaged uniformly.

    Args:
        examples (`int`, *optional*, defaults to 256): examples used to estimate each Fisher.
        floor (`float`, *optional*, defaults to 1e-6): added to every entry, relative to the tensor's mean Fisher.
    """
    if any(f is None for f in statistics):
        return sum(tensors) / len(tensors)
    scale = float(sum(f.mean() for f in statistics)) / len(statistics)
    if scale == 0.0:
        return sum(tensors) / len(tensors)
    weights = [f + floor * scale for f in statistics]
    return sum(w * t for w, t in zip(weights, tensors)) / sum(weights)
