"""The strategy registry: soups whose weights are chosen by a scorer (greedy, learned, ...).

A strategy is one function `strategy(tasting, **parameters) -> StrategyResult`; like a method, its keyword-only
parameters are its declaration, checked before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import SoupError
from ..methods.registry import Declaration, declare


@dataclass(frozen=True)
class Strategy(Declaration):
    """A registered strategy: `function(tasting, **parameters) -> StrategyResult`."""

    kind = "strategy"


@dataclass
class StrategyResult:
    """What a strategy chose.

    Attributes:
        chosen (`list[int]`): indices of the ingredients in the soup, in the order they are summed.
        method (`str`): the method that writes the soup from the chosen ingredients (`"uniform"`, `"weighted"`).
        parameters (`dict` or `Callable[[str], dict]`): that method's parameters, or a function of the tensor name
            giving them (per-layer coefficients).
        score (`float`): the soup's score on the selection split.
        record (`dict`): what to keep in `soup.json`: trace, coefficients, evaluations used, ...
    """

    chosen: list[int]
    method: str
    parameters: dict[str, Any] | Callable[[str], dict[str, Any]]
    score: float
    record: dict[str, Any] = field(default_factory=dict)


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(
    name: str | None = None,
    *,
    check: Callable[[dict[str, Any], int], dict[str, Any]] | None = None,
    overwrite: bool = False,
) -> Callable[[Callable[..., StrategyResult]], Callable[..., StrategyResult]]:
    """Register a strategy; its signature declares its parameters (see `register_method`)."""

    def decorate(function: Callable[..., StrategyResult]) -> Callable[..., StrategyResult]:
        strategy_name = name or function.__name__
        if strategy_name in STRATEGIES and not overwrite:
            raise SoupError(f"strategy {strategy_name!r} is already registered; pass overwrite=True to replace it")
        parameters, context = declare(function, strategy_name, "the tasting")
        STRATEGIES[strategy_name] = Strategy(strategy_name, function, parameters, context, check)
        return function

    return decorate


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise SoupError(f"unknown strategy {name!r}; registered strategies: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]
