"""The strategy registry: soups whose weights are chosen by a scorer (greedy, learned, ...).

A strategy is one function `strategy(tasting, **parameters) -> StrategyResult`; like a method, its keyword-only
parameters are its declaration, checked before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import SoupError
from ..methods import get_method
from ..methods.registry import Declaration, declare


@dataclass(frozen=True)
class Strategy(Declaration):
    """A registered strategy: `function(tasting, **parameters) -> StrategyResult`.

    Attributes:
        writes (`Callable`, *optional*): `writes(parameters) -> str | None`, see `written_method`.
        needs (`Callable`, *optional*): `needs(parameters) -> dict[str, str]`, see `capabilities_needed`.
    """

    kind = "strategy"
    writes: Callable[[dict[str, Any]], str | None] | None = None
    needs: Callable[[Mapping[str, Any]], Mapping[str, str]] | None = None

    def written_method(self, parameters: dict[str, Any]) -> str | None:
        """The method whose soup this strategy writes, when its recipe parameters say (`search`'s `merge:`)."""
        return self.writes(parameters) if self.writes is not None else None

    def capabilities_needed(self, parameters: Mapping[str, Any]) -> dict[str, str]:
        """The tasting capabilities this strategy uses with these parameters (see
        `hf_soup.strategies.tasting.CAPABILITIES`), each with why: checked by `Tasting.require` before it runs.

        Example:

        ```python
        >>> get_strategy("search").capabilities_needed({"merge": "ties"})
        {'mix': 'search tastes candidate soups', 'apply': "method 'ties' is not a linear combination"}
        ```
        """
        return dict(self.needs(parameters)) if self.needs is not None else {}


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

    def coefficients(self, count: int) -> list[float] | Callable[[str], list[float]] | None:
        """The coefficient of each of the `count` ingredients (or a function of the tensor name giving them) when
        the soup is a linear combination of them (`uniform`, `weighted`, ...); `None` for other methods (ties, ...).
        """
        mixing = get_method(self.method).mixing
        if mixing is None:
            return None

        def spread(parameters: dict[str, Any]) -> list[float]:
            full = [0.0] * count
            for index, weight in zip(self.chosen, mixing(parameters, len(self.chosen))):
                full[index] = weight
            return full

        if callable(self.parameters):
            return lambda name: spread(self.parameters(name))
        return spread(self.parameters)


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(
    name: str | None = None,
    *,
    check: Callable[[dict[str, Any], int], dict[str, Any]] | None = None,
    writes: Callable[[dict[str, Any]], str | None] | None = None,
    needs: Callable[[Mapping[str, Any]], Mapping[str, str]] | None = None,
    overwrite: bool = False,
) -> Callable[[Callable[..., StrategyResult]], Callable[..., StrategyResult]]:
    """Register a strategy; its signature declares its parameters (see `register_method`).

    `writes(parameters)` names the method the soup is written with when the recipe chooses it (so that a recipe
    whose soup needs `base_model:` is refused before any tensor is read). `needs(parameters)` maps each tasting
    capability the strategy uses (`"mix"`, `"backward"`, `"apply"`: see `hf_soup.strategies.tasting.CAPABILITIES`)
    to why, so that a tasting that lacks one (adapters cannot `"apply"`) is refused before the strategy runs.
    """

    def decorate(function: Callable[..., StrategyResult]) -> Callable[..., StrategyResult]:
        strategy_name = name or function.__name__
        if strategy_name in STRATEGIES and not overwrite:
            raise SoupError(f"strategy {strategy_name!r} is already registered; pass overwrite=True to replace it")
        parameters, context = declare(function, strategy_name, "the tasting")
        STRATEGIES[strategy_name] = Strategy(strategy_name, function, parameters, context, check, writes, needs)
        return function

    return decorate


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise SoupError(f"unknown strategy {name!r}; registered strategies: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]
