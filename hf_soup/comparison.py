"""The comparison report: best individual, uniform soup, the cooked soup(s) and ensembles, on every split.

"Best individual" is the ingredient with the best *selection* score, reported on every split (picking it by a
report split would leak). Ensembles average the ingredients' logits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .strategies.ensemble import average_logits, greedy_ensemble
from .strategies.registry import STRATEGIES, Strategy, StrategyResult, get_strategy
from .strategies.tasting import Coefficients, Tasting, serve

# Scores shown to people (this report's table, the model card's `model-index`) are rounded to 4 decimals;
# `soup.json` keeps them exact.
DECIMALS = 4


def rounded(score: float) -> float:
    """`score` rounded to `DECIMALS` decimals for people (NaN and infinities as they are)."""
    return round(score, DECIMALS) if isinstance(score, float) and math.isfinite(score) else score


def compare(
    tasting: Tasting,
    splits: Sequence[str],
    soups: Mapping[str, Coefficients | StrategyResult],
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
    for name, soup in soups.items():
        serve(tasting, soup)
        rows[name] = {split: scorer.score(tasting.kitchen.model, split) for split in splits}
    undefined = {}
    if ensembles and count > 1 and scorer.ensemble_undefined is not None:  # known once outputs were computed
        undefined = {"ensemble": scorer.ensemble_undefined, "greedy ensemble": scorer.ensemble_undefined}
        ensembles = False
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
        "undefined": undefined,  # rows that are not defined for these outputs, with why
        **tasting.summary(),  # the resident model's dtype; for adapters, how the soups were tasted
    }


def markdown(report: Mapping[str, Any]) -> str:
    """The report as a Markdown table (rows × splits; the selection split is marked), then the rows that are not
    defined for these predictions, with why."""
    splits = report["splits"]
    header = [f"{s} (selection)" if s == report["selection_split"] else s for s in splits]
    lines = [
        f"| {report['metric']} | " + " | ".join(header) + " |",
        "|---|" + "---:|" * len(splits),
    ]
    for name, scores in report["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[s]:.{DECIMALS}f}" for s in splits) + " |")
    undefined = report.get("undefined") or {}
    for reason in dict.fromkeys(undefined.values()):  # rows left out, and why (once per reason)
        rows = ", ".join(name for name, why in undefined.items() if why == reason)
        lines += ["", f"Not defined for these predictions: {rows} ({reason})."]
    return "\n".join(lines)


def choose(
    strategy: Strategy,
    parameters: Mapping[str, Any],
    tasting: Tasting,
    *,
    seed: int,
    report_splits: Sequence[str],
    compared: Sequence[str],
    storage: Path | None = None,
) -> tuple[StrategyResult, dict[str, Any]]:
    """Run a strategy on a tasting, then score the comparison rows; returns its result and the `soup.json` record
    (the choice under `strategy`, the comparison under `report`). Works for any tasting (full models, adapters):
    a strategy that needs a capability the tasting lacks (`Strategy.capabilities_needed`, `Tasting.require`) is
    refused before anything is tasted.

    `storage` is a file beside the soup where a strategy may keep state that lets an interrupted cook resume
    (`search`'s study)."""

    supplied = {"seed": seed, "storage": storage}
    runs = [(strategy, parameters)]
    runs += [(get_strategy(name), {}) for name in compared if name in STRATEGIES and name != strategy.name]
    for declared, given in runs:  # what the tasting cannot do is refused before anything is tasted
        tasting.require(declared.capabilities_needed(given), declared.name)

    def run(declared: Strategy, given: Mapping[str, Any]) -> StrategyResult:
        context = {name: supplied[name] for name in declared.context}
        return declared.function(tasting, **given, **context)

    count, before = tasting.count, tasting.scorer.evaluations
    result = run(strategy, parameters)
    used = tasting.scorer.evaluations - before
    soups: dict[str, Coefficients | StrategyResult] = (
        {"uniform": [1.0 / count] * count} if "uniform" in compared else {}
    )
    for declared, given in runs[1:]:
        soups[declared.name] = run(declared, given)
    soups[strategy.name] = result
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
