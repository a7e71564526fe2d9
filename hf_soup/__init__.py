"""hf_soup: model soups for Hugging Face Transformers.

Collect every fine-tuning run's best checkpoint into a pantry (`SoupCallback`), then cook a soup — an average of
their weights, chosen by held-out score if you like — that `from_pretrained` loads like any model (`SoupBuilder`,
`hf-soup cook`). Names are imported on first use, so `from hf_soup import SoupCallback` in a training script does
not load the cooking machinery.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "SoupCallback": "callback",
    "Soup": "soup",
    "SoupBuilder": "builder",
    "cook_at_end": "sweep",
    "CheckpointReader": "checkpoint",
    "CheckpointWriter": "writer",
    "SoupError": "errors",
    "Evaluation": "evaluation",
    "write_card": "card",
    "push_to_hub": "hub",
    "Inspection": "inspection",
    "inspect_ingredients": "inspection",
    "Kitchen": "kitchen",
    "get_method": "methods",
    "list_methods": "methods",
    "register_method": "methods",
    "Ingredient": "ingredient",
    "Pantry": "pantry",
    "Recipe": "recipe",
    "load_recipe": "recipe",
    "Scorer": "scoring",
    "StrategyResult": "strategies",
    "Tasting": "strategies",
    "get_strategy": "strategies",
    "register_strategy": "strategies",
}

__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "Evaluation",
    "Ingredient",
    "Inspection",
    "Kitchen",
    "Pantry",
    "Recipe",
    "Scorer",
    "Soup",
    "SoupBuilder",
    "SoupCallback",
    "SoupError",
    "StrategyResult",
    "Tasting",
    "cook_at_end",
    "get_method",
    "get_strategy",
    "inspect_ingredients",
    "list_methods",
    "load_recipe",
    "push_to_hub",
    "register_method",
    "register_strategy",
    "write_card",
    "__version__",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_soup' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .builder import SoupBuilder
    from .callback import SoupCallback
    from .card import write_card
    from .checkpoint import CheckpointReader
    from .errors import SoupError
    from .evaluation import Evaluation
    from .hub import push_to_hub
    from .ingredient import Ingredient
    from .inspection import Inspection, inspect_ingredients
    from .kitchen import Kitchen
    from .methods import get_method, list_methods, register_method
    from .pantry import Pantry
    from .recipe import Recipe, load_recipe
    from .scoring import Scorer
    from .soup import Soup
    from .strategies import StrategyResult, Tasting, get_strategy, register_strategy
    from .sweep import cook_at_end
    from .writer import CheckpointWriter
