"""Greedy soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482, Recipe 1)."""

from __future__ import annotations

import random
from typing import Literal

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
    with the recipe's `seed` instead (the paper's random-order ablation). The kept soup is the uniform soup of the
    kept ingredients, in the order they were kept.
    """
    ranking = tasting.ranking()
    if order == "random":
        random.Random(seed).shuffle(ranking)
    kept = [ranking[0]]
    best = tasting.score(ranking[0])
    trace = [{"id": tasting.ingredients[ranking[0]].id, "score": best, "accepted": True, "soup_size": 1}]
    for candidate in ranking[1:]:
        members = [*kept, candidate]
        score = tasting.taste_uniform(members)
        accepted = tasting.scorer.better(score, best, strict=rule == ">")
        trace.append(
            {"id": tasting.ingredients[candidate].id, "score": score, "accepted": accepted, "soup_size": len(members)}
        )
        if accepted:
            kept, best = members, score
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
