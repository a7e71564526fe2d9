import pytest

from hf_soup.errors import SoupError
from hf_soup.recipe import RECIPE_KEYS, Recipe, load_recipe


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_paths_resolve_against_the_recipe_folder(tmp_path):
    sub = tmp_path / "recipes"
    sub.mkdir()
    recipe = load_recipe(
        write(sub, "method: weighted\ningredients: [../runs/a, /abs/b]\nweights: [1, 2]\noutput: out\n")
    )
    assert recipe.ingredients == [(sub / "../runs/a").absolute(), (tmp_path / "/abs/b")]
    assert recipe.output == sub / "out"
    assert recipe.parameters == {"weights": [1, 2]}
    assert recipe.source == str(sub / "recipe.yaml")


def test_pantry_and_select(tmp_path):
    recipe = load_recipe(write(tmp_path, "method: uniform\npantry: p\nselect: [a, b]\ndtype: bf16\nseed: 3\n"))
    assert recipe.pantry == tmp_path / "p" and recipe.select == ["a", "b"]
    assert recipe.dtype == "bf16" and recipe.seed == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "a recipe must be a mapping of keys to values, got list"),
        ("ingredients: [a]\n", r"needs `method:`"),
        ("method: uniform\n", "say what goes in the soup"),
        ("method: uniform\ningredients: [a]\npantry: p\n", "either `ingredients:` or `pantry:`"),
        ("method: uniform\ningredients: [a]\nselect: [x]\n", "add `pantry: DIR`"),
        ("method: uniform\npantry: p\nselect: []\n", "non-empty list of ingredient ids"),
        ("method: uniform\ningredients: a\n", r"`ingredients` must be a list, got str 'a'"),
        ("method: uniform\ningredients: [a, 3]\n", r"ingredients\[1\] must be a folder path"),
        (
            "method: uniform\ningredients: [a]\nwieghts: [1]\n",
            "unknown key 'wieghts'; recipe keys: method, ingredients",
        ),
        ("method: weighted\ningredients: [a]\nwieghts: [1]\n", "parameters of method 'weighted': weights, normalize"),
        ("method: 3\ningredients: [a]\n", r"`method` must be a string, got int 3"),
        (
            "method: avg\ningredients: [a]\n",
            "unknown method 'avg'; methods: dare, .*, ties, uniform, weighted; strategies: greedy, learned",
        ),
        ("method: uniform\ningredients: [a]\ndtype: int8\n", "unknown dtype 'int8'"),
        ("method: uniform\ningredients: [a]\nmax_shard_size: huge\n", "cannot read size 'huge'"),
        ("method: uniform\ningredients: [a]\nmax_shard_size: [1]\n", "`max_shard_size` must be bytes"),
        ("method: uniform\ningredients: [a]\nseed: true\n", r"`seed` must be an integer, got bool"),
        ("method: uniform\ningredients: [a]\nallow_pickle: 'yes'\n", r"`allow_pickle` must be true or false"),
        ("method: uniform\ningredients: [a]\noutput: 5\n", r"`output` must be a str"),
        ("method: uniform\n  bad: [\n", "is not valid YAML at line 2"),
    ],
)
def test_bad_recipes(tmp_path, text, message):
    with pytest.raises(SoupError, match=message):
        load_recipe(write(tmp_path, text))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(SoupError, match="cannot read recipe .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


def test_from_mapping_matches_python_keywords():
    recipe = Recipe.from_mapping({"method": "weighted", "ingredients": ["a", "b"], "weights": [1, 1]})
    assert recipe.method == "weighted" and len(recipe.ingredients) == 2
    assert "method" in RECIPE_KEYS and "weights" not in RECIPE_KEYS
