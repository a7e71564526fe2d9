"""Strategies: soups whose weights are chosen by held-out score. Importing this package registers them."""

from . import greedy, learned, search  # noqa: F401  (registration)
from .registry import STRATEGIES, Strategy, StrategyResult, get_strategy, register_strategy
from .tasting import Tasting

__all__ = ["STRATEGIES", "Strategy", "StrategyResult", "Tasting", "get_strategy", "register_strategy"]
