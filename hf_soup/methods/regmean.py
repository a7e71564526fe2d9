"""RegMean (Jin et al. 2023, https://arxiv.org/abs/2212.09849): closed-form merge of linear layers."""

from __future__ import annotations

from typing import Any

import torch

from .registry import register_method


def input_grams(kitchen, scorer, split: str, parameters: dict[str, Any]) -> dict[str, torch.Tensor]:
    """For every `nn.Linear` of the resident model, G = XᵀX / n over the inputs X it sees on up to `examples` rows
    of `split`, keyed by the layer's weight name."""
    model, data = kitchen.model, scorer.split(split)
    count = min(len(data), parameters["examples"])
    grams: dict[str, torch.Tensor] = {}
    seen: dict[str, int] = {}
    hooks = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            name = f"{module_name}.weight"

            def record(module, inputs, output, name=name):
                x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1]).cpu()
                grams[name] = grams.get(name, 0) + x.T @ x
                seen[name] = seen.get(name, 0) + x.shape[0]

            hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            for start in range(0, count, scorer.batch_size):
                batch = scorer.collator([data[i] for i in range(start, min(start + scorer.batch_size, count))])
                scorer.task.training_outputs(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: gram / seen[name] for name, gram in grams.items()}


@register_method("regmean", statistics=input_grams)
def regmean(
    tensors: list[torch.Tensor],
    *,
    statistics: list[torch.Tensor | None],
    reduce_non_diagonal: float = 0.9,
    examples: int = 256,
) -> torch.Tensor:
    """RegMean: for a linear layer y = W x, the W minimising Σᵢ ‖Xᵢ Wᵢᵀ − Xᵢ Wᵀ‖², W = (Σᵢ Wᵢ Gᵢ)(Σᵢ Gᵢ)⁻¹.

    Gᵢ = XᵢᵀXᵢ is the Gram matrix of the layer's inputs under ingredient i, its off-diagonal entries scaled by
    `reduce_non_diagonal` (α; α = 0 gives a diagonal, per-input-feature weighted mean). Tensors that are not linear
    weights (biases, norms, embeddings) are averaged uniformly.

    Args:
        reduce_non_diagonal (`float`, *optional*, defaults to 0.9): α in [0, 1].
        examples (`int`, *optional*, defaults to 256): rows of the evaluation split used for the Gram matrices.
    """
    if tensors[0].dim() != 2 or any(g is None for g in statistics):
        return sum(tensors) / len(tensors)
    grams = [reduce_non_diagonal * g + (1 - reduce_non_diagonal) * torch.diag(torch.diagonal(g)) for g in statistics]
    total = sum(grams)
    rhs = sum(g @ w.T for g, w in zip(grams, tensors))
    try:
        return torch.linalg.solve(total, rhs).T
    except RuntimeError:  # singular: the least-squares solution
        return torch.linalg.lstsq(total, rhs).solution.T
