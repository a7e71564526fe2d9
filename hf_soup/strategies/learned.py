"""Learned soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482, appendix I), without k models in memory.

The soup is θ(α) = Σᵢ αᵢ θᵢ with α = softmax(α_raw) over ingredients, one α per tensor ("layer") or one for the
whole model ("global"), and a logit scale β; α_raw and β are trained by AdamW on the selection split.

The paper held all k models in memory (490 GB for 72 CLIP models). Here only the resident model and its gradient
are: for each step, θ(α) is streamed into the resident model, one forward/backward gives g = ∂L/∂θ, and then
∂L/∂αᵢ = Σ_{tensors of the group} ⟨g, θᵢ⟩ is accumulated by streaming the ingredients once more. Peak memory is
the model, its gradient, and k tensors at a time — independent of k beyond that.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Literal

import torch

from ..errors import SoupError
from .registry import StrategyResult, register_strategy
from .tasting import Tasting


def _needs(parameters: Mapping[str, Any]) -> dict[str, str]:
    return {
        "mix": "learned tastes its soup",
        "backward": "learned follows the loss's gradient with respect to the mixing coefficients",
    }


@register_strategy("learned", needs=_needs)
def learned(
    tasting: Tasting,
    *,
    granularity: Literal["layer", "global"] = "layer",
    epochs: int = 5,
    lr: float = 0.05,
    batch_size: int = 32,
    seed: int,
) -> StrategyResult:
    """Learned soup: mixing coefficients α (softmax over ingredients, per tensor or global) and a logit scale β,
    trained by AdamW (weight decay 0) on the selection split. Defaults follow the paper's code: α uniform at the
    start, β = 1, lr 0.05, 5 epochs. β changes calibration, not the soup's weights: it is recorded, not baked in.
    """
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise SoupError(f"learned: epochs and batch_size must be ≥ 1 and lr > 0 (got {epochs}, {batch_size}, {lr})")
    scorer, k = tasting.scorer, tasting.count
    groups = tasting.groups(granularity)
    rows = max(groups.values(), default=0) + 1
    raw = torch.full((rows, k), 1.0 / k, requires_grad=True)  # as the paper: softmax of equal values, α uniform
    beta = torch.tensor(1.0, requires_grad=True)
    optimizer = torch.optim.AdamW([raw, beta], lr=lr, weight_decay=0.0)
    data = scorer.split(tasting.split)
    order = list(range(len(data)))
    shuffler = random.Random(seed)
    losses = []
    for _ in range(epochs):
        shuffler.shuffle(order)
        epoch_loss = []
        for start in range(0, len(order), batch_size):
            batch = scorer.collator([data[i] for i in order[start : start + batch_size]])
            alpha = torch.softmax(raw, dim=1)
            optimizer.zero_grad(set_to_none=True)
            loss, dots = tasting.backward(alpha.detach(), groups, batch, beta)
            alpha.backward(dots)
            optimizer.step()
            epoch_loss.append(loss)
        losses.append(sum(epoch_loss) / len(epoch_loss))
    alpha = torch.softmax(raw.detach(), dim=1)

    def mixing(name: str) -> list[float]:
        return alpha[groups[name]].tolist() if name in groups else [1.0] + [0.0] * (k - 1)

    score = tasting.taste(mixing)
    record = {
        "granularity": granularity,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "beta": beta.item(),
        "loss_per_epoch": losses,
        "alpha_mean": alpha.mean(0).tolist(),
        "alpha": {name: alpha[row].tolist() for name, row in groups.items()}
        if granularity == "layer"
        else alpha[0].tolist(),
    }
    return StrategyResult(
        chosen=list(range(k)),
        method="weighted",
        parameters=lambda name: {"weights": mixing(name), "normalize": False},
        score=score,
        record=record,
    )
