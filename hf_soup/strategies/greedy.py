"""Greedy soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482, Recipe 1), and its α-blend variant."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any, Literal

from ..errors import SoupError
from .registry import StrategyResult, register_strategy
from .tasting import Tasting


def check_alpha(parameters: dict[str, Any], count: int) -> dict[str, Any]:
    """`alpha` is absent (the paper's uniform greedy soup), one number or a non-empty grid of numbers in (0, 1]."""
    alpha = parameters.get("alpha")
    if alpha is None:
        return parameters
    grid = alpha if isinstance(alpha, list) else [alpha]
    if not grid or not all(isinstance(a, float) and math.isfinite(a) and 0.0 < a <= 1.0 for a in grid):
        raise SoupError(
            f"greedy: alpha must be a number in (0, 1] or a list of them (a grid tried for each candidate), got "
            f"{alpha!r}; e.g. alpha: 0.3 or alpha: [0.1, 0.3, 0.5]"
        )
    return {**parameters, "alpha": sorted(set(grid)) if isinstance(alpha, list) else alpha}


def _needs(parameters: Mapping[str, Any]) -> dict[str, str]:
    return {"mix": "greedy tastes candidate soups"}


@register_strategy("greedy", check=check_alpha, needs=_needs)
def greedy(
    tasting: Tasting,
    *,
    rule: Literal[">=", ">"] = ">=",
    order: Literal["score", "random"] = "score",
    alpha: float | list[float] | None = None,
    seed: int,
) -> StrategyResult:
    """Greedy soup: add ingredients best-first, keeping each one only if the held-out score does not drop.

    Ingredients are sorted by their selection-split score (recorded pantry scores are reused when they were measured
    on the same split), the best starts the soup, and each next one is kept if the score of the average with it is
    ≥ the score without it (`rule: ">"` keeps only strict improvements). `order: random` shuffles the candidates
    with the recipe's `seed` instead (the paper's random-order ablation). The kept soup is the uniform soup of the
    kept ingredients, in the order they were kept.

    With `alpha`, each candidate is blended in instead of averaged: θ ← (1 − α)·θ + α·θᵢ, kept only if the score
    improves. `alpha` is one number, or a grid: every α of the grid is tried for each candidate and the best one is
    kept (ties: the smallest α). The soup is then the weighted soup of the kept ingredients, and the trace records
    the α of every step.
    """
    ranking = tasting.ranking()
    if order == "random":
        random.Random(seed).shuffle(ranking)
    best = tasting.score(ranking[0])
    trace = [{"id": tasting.ingredients[ranking[0]].id, "score": best, "accepted": True, "soup_size": 1}]
    record = {
        "rule": rule,
        "order": order,
        "trace": trace,
        "recorded_scores_used": sorted(tasting.ingredients[i].id for i in tasting.recorded),
    }
    if alpha is not None:
        return _blend(tasting, ranking, best, alpha if isinstance(alpha, list) else [alpha], rule, record)
    kept = [ranking[0]]
    for candidate in ranking[1:]:
        members = [*kept, candidate]
        score = tasting.taste_uniform(members)
        accepted = tasting.scorer.better(score, best, strict=rule == ">")
        trace.append(
            {"id": tasting.ingredients[candidate].id, "score": score, "accepted": accepted, "soup_size": len(members)}
        )
        if accepted:
            kept, best = members, score
    record["kept"] = [tasting.ingredients[i].id for i in kept]
    return StrategyResult(chosen=kept, method="uniform", parameters={}, score=best, record=record)


def _blend(
    tasting: Tasting, ranking: list[int], best: float, grid: list[float], rule: str, record: dict[str, Any]
) -> StrategyResult:
    """The α-blend greedy pass: the soup's coefficients c ← (1 − α)·c + α·eᵢ for each kept candidate i."""
    scorer, count = tasting.scorer, tasting.count
    coefficients = [0.0] * count
    coefficients[ranking[0]] = 1.0
    record["trace"][0]["alpha"] = 1.0
    for candidate in ranking[1:]:
        tried: dict[float, float] = {}
        for alpha in grid:
            blend = [(1.0 - alpha) * c for c in coefficients]
            blend[candidate] += alpha
            tried[alpha] = tasting.taste(blend)
        chosen = grid[0]
        for alpha in grid[1:]:
            if scorer.better(tried[alpha], tried[chosen], strict=True):
                chosen = alpha
        accepted = scorer.better(tried[chosen], best, strict=rule == ">")
        if accepted:
            coefficients = [(1.0 - chosen) * c for c in coefficients]
            coefficients[candidate] += chosen
            best = tried[chosen]
        record["trace"].append(
            {
                "id": tasting.ingredients[candidate].id,
                "score": tried[chosen],
                "accepted": accepted,
                "soup_size": sum(c > 0 for c in coefficients),
                "alpha": chosen,
                "tried": [{"alpha": a, "score": s} for a, s in tried.items()],
            }
        )
    chosen_indices = [i for i in range(count) if coefficients[i] > 0]
    record["alpha"] = grid if len(grid) > 1 else grid[0]
    record["kept"] = [tasting.ingredients[i].id for i in chosen_indices]
    record["coefficients"] = {tasting.ingredients[i].id: coefficients[i] for i in chosen_indices}
    return StrategyResult(
        chosen=chosen_indices,
        method="weighted",
        parameters={"weights": [coefficients[i] for i in chosen_indices], "normalize": False},
        score=best,
        record=record,
    )
