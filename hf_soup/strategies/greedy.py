"""Greedy soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482, Recipe 1)."""

from __future__ import annotations

import random
from typing import Literal

import torch

from ..checkpoint import FLOAT_DTYPES
from .registry import StrategyResult, register_strategy
from .tasting import Tasting


@register_strategy("greedy")
def greedy(
    tasting: Tasting, *, rule: Literal[">=", ">"] = ">=", order: Literal["score", "random"] = "score", seed: int
) -> StrategyResult:
    """Greedy soup: add ingredients best-first, keeping each one only if the held-out score does not drop.

    Ingredients are sorted by their selection-split score (recorded pantry scores are reused when they were measured
    on the same split), the best starts the soup, and each next one is kept if the score of the average with it is
    ≥ the score without it (`rule: ">"` keeps only strict improvements). `order: random` shuffles the candidates
    with the recipe's `seed` instead (the paper's random-order ablation).

    The running soup is an fp32 sum of the kept ingredients: each candidate is written into the resident model as
    (sum + θ) / (n + 1), tensor by tensor, so the kept soup is bit-identical to the uniform soup of the kept
    ingredients in the order they were kept.
    """
    ranking = tasting.ranking()
    if order == "random":
        random.Random(seed).shuffle(ranking)
    first = ranking[0]
    reader = tasting.readers[first]
    floats = [n for n in tasting.names if reader.info(n).dtype in FLOAT_DTYPES]
    total = {name: reader.get(name).float().clone() for name in floats}
    kept = [first]
    best = tasting.score(first)
    trace = [{"id": tasting.ingredients[first].id, "score": best, "accepted": True, "soup_size": 1}]
    for candidate in ranking[1:]:
        candidate_reader = tasting.readers[candidate]
        size = len(kept) + 1
        for name in tasting.names:
            if name in total:
                value = torch.add(total[name], candidate_reader.get(name).float()).div_(size)
            else:
                value = candidate_reader.get(name)
            tasting.kitchen.write(name, value)
        score = tasting.scorer.score(tasting.kitchen.model, tasting.split)
        accepted = tasting.scorer.better(score, best, strict=rule == ">")
        if accepted:
            for name in floats:
                total[name].add_(candidate_reader.get(name).float())
            kept.append(candidate)
            best = score
        trace.append(
            {"id": tasting.ingredients[candidate].id, "score": score, "accepted": accepted, "soup_size": size}
        )
    return StrategyResult(
        chosen=kept,
        method="uniform",
        parameters={},
        score=best,
        record={
            "rule": rule,
            "order": order,
            "trace": trace,
            "kept": [tasting.ingredients[i].id for i in kept],
            "recorded_scores_used": sorted(tasting.ingredients[i].id for i in tasting.recorded),
        },
    )
