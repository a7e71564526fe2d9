"""The comparison report: best individual, uniform soup, the cooked soup(s) and ensembles, on every split.

"Best individual" is the ingredient with the best *selection* score, reported on every split (picking it by a
report split would leak). Ensembles average the ingredients' logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .strategies.ensemble import average_logits, greedy_ensemble
from .strategies.registry import STRATEGIES, Strategy, StrategyResult, get_strategy
from .strategies.tasting import Coefficients, Tasting


def coefficients_of(result: StrategyResult, count: int) -> Coefficients:
    """The per-ingredient coefficients (or per-tensor function) of a strategy's soup."""
    if result.method == "uniform":
        return [1.0 / len(result.chosen) if i in result.chosen else 0.0 for i in range(count)]
    parameters = result.parameters

    def spread(weights: Sequence[float]) -> list[float]:
        full = [0.0] * count
        for index, weight in zip(result.chosen, weights):
            full[index] = weight
        return full

    if callable(parameters):
        return lambda name: spread(parameters(name)["weights"])
    return spread(parameters["weights"])


def compare(
    tasting: Tasting,
    splits: Sequence[str],
    soups: Mapping[str, Coefficients],
    *,
    ensembles: bool = True,
) -> dict[str, Any]:
    """Score every row on every split; returns a JSON-able report (see `markdown`)."""
    scorer = tasting.scorer
    count = tasting.count
    individuals = {
        tasting.ingredients[i].id: {split: scorer.compute(tasting.outputs(i, split)) for split in splits}
        for i in range(count)
    }
    best = tasting.ingredients[tasting.ranking()[0]].id
    rows: dict[str, dict[str, float]] = {"best individual": individuals[best]}
    for name, coefficients in soups.items():
        tasting.mix(coefficients)
        rows[name] = {split: scorer.score(tasting.kitchen.model, split) for split in splits}
    if ensembles and count > 1:
        rows["ensemble"] = {
            split: scorer.compute(average_logits([tasting.outputs(i, split) for i in range(count)]))
            for split in splits
        }
        kept, _, trace = greedy_ensemble(tasting)
        rows["greedy ensemble"] = {
            split: scorer.compute(average_logits([tasting.outputs(i, split) for i in kept])) for split in splits
        }
    return {
        "metric": scorer.metric.name,
        "greater_is_better": scorer.metric.greater_is_better,
        "selection_split": tasting.split,
        "splits": list(splits),
        "best_individual": best,
        "rows": rows,
        "individuals": individuals,
        "greedy_ensemble": [tasting.ingredients[i].id for i in kept] if ensembles and count > 1 else None,
    }


def markdown(report: Mapping[str, Any]) -> str:
    """The report as a Markdown table (rows × splits; the selection split is marked)."""
    splits = report["splits"]
    header = [f"{s} (selection)" if s == report["selection_split"] else s for s in splits]
    lines = [
        f"| {report['metric']} | " + " | ".join(header) + " |",
        "|---|" + "---:|" * len(splits),
    ]
    for name, scores in report["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[s]:.4f}" for s in splits) + " |")
    return "\n".join(lines)


def choose(
    strategy: Strategy,
    parameters: Mapping[str, Any],
    tasting: Tasting,
    *,
    seed: int,
    report_splits: Sequence[str],
    compared: Sequence[str],
) -> tuple[StrategyResult, dict[str, Any]]:
    """Run a strategy on a tasting, then score the comparison rows; returns its result and the `soup.json` record
    (the choice under `strategy`, the comparison under `report`). Works for any tasting (full models, adapters)."""

    def run(declared: Strategy, given: Mapping[str, Any]) -> StrategyResult:
        context = {"seed": seed} if "seed" in declared.context else {}
        return declared.function(tasting, **given, **context)

    count, before = tasting.count, tasting.scorer.evaluations
    result = run(strategy, parameters)
    used = tasting.scorer.evaluations - before
    soups: dict[str, Coefficients] = {"uniform": [1.0 / count] * count} if "uniform" in compared else {}
    for name in compared:
        if name in STRATEGIES and name != strategy.name:
            soups[name] = coefficients_of(run(get_strategy(name), {}), count)
    soups[strategy.name] = coefficients_of(result, count)
    report = compare(tasting, [tasting.split, *report_splits], soups, ensembles="ensemble" in compared)
    record = {
        "strategy": {
            "name": strategy.name,
            "parameters": dict(parameters),
            "selection_split": tasting.split,
            "score": result.score,
            "chosen": [tasting.ingredients[i].id for i in result.chosen],
            "evaluations": used,
            **result.record,
        },
        "report": report,
    }
    return result, record
