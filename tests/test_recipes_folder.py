from pathlib import Path

import pytest

from hf_soup.recipe import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_example_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.output is not None
    assert recipe.ingredients or recipe.pantry
