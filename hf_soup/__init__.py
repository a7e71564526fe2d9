"""hf_soup: model soups for Hugging Face Transformers.

Collect every fine-tuning run's best checkpoint into a pantry, then cook a soup (an average of their weights) that
`from_pretrained` loads like any model.
"""

from .builder import Soup, SoupBuilder
from .checkpoint import CheckpointReader, CheckpointWriter
from .errors import SoupError
from .methods import get_method, list_methods, register_method
from .pantry import Ingredient, Pantry
from .recipe import Recipe, load_recipe

__version__ = "0.1.0"

__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "Ingredient",
    "Pantry",
    "Recipe",
    "Soup",
    "SoupBuilder",
    "SoupError",
    "__version__",
    "get_method",
    "list_methods",
    "load_recipe",
    "register_method",
]
