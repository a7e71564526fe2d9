"""Ensemble baselines: average the ingredients' logits (k forward passes at inference, the cost soups avoid)."""

from __future__ import annotations

from collections.abc import Sequence

from ..scoring import Batches
from .tasting import Tasting


def average_logits(outputs: Sequence[Batches]) -> Batches:
    """The logit ensemble: per batch, the mean of the members' logits (labels from the first)."""
    return [(sum(member[b][0] for member in outputs) / len(outputs), outputs[0][b][1]) for b in range(len(outputs[0]))]


def greedy_ensemble(tasting: Tasting) -> tuple[list[int], float, list[dict]]:
    """Greedy ensemble: members best-first, each kept if the ensemble's selection score does not drop.

    Uses the cached outputs of each ingredient on the selection split (no extra forward passes).
    """
    ranking = tasting.ranking()
    split = tasting.split
    kept = [ranking[0]]
    best = tasting.scorer.compute(tasting.outputs(ranking[0], split))
    trace = [{"id": tasting.ingredients[ranking[0]].id, "score": best, "accepted": True}]
    for candidate in ranking[1:]:
        score = tasting.scorer.compute(average_logits([tasting.outputs(i, split) for i in [*kept, candidate]]))
        accepted = tasting.scorer.better(score, best)
        if accepted:
            kept.append(candidate)
            best = score
        trace.append({"id": tasting.ingredients[candidate].id, "score": score, "accepted": accepted})
    return kept, best, trace
