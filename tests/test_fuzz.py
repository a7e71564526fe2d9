"""Fuzzing recipe parsing: whatever the YAML holds, the only error is a `SoupError` with one non-empty line.

Structures are arbitrary nestings of mappings, lists and scalars, and valid recipes with one key replaced, added or
dropped; text is written and read back through `load_recipe`, as are random text, random bytes and valid recipe
texts with random edits. A recipe that passes is also bound to its method's signature (`Declaration.bind`, what a
cook does before reading any tensor), which must refuse bad parameters the same way.
"""

from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_soup.errors import SoupError
from hf_soup.evaluation import EVALUATION_KEYS
from hf_soup.methods import METHODS
from hf_soup.recipe import RECIPE_KEYS, Recipe, load_recipe, lookup
from hf_soup.strategies import STRATEGIES

FUZZ = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

EVALUATION = {
    "task": "sequence-classification",
    "dataset": {"load_from_disk": "data"},
    "columns": {"text": "sentence", "label": "label"},
    "metric": "accuracy",
    "selection_split": "validation",
    "report_splits": ["test", "shift"],
    "compare": ["uniform", "ensemble"],
    "batch_size": 8,
    "max_length": 64,
}
# Valid recipes, one per kind of key they exercise; each is checked to pass before it is mutated.
VALID = [
    {"method": "uniform", "ingredients": ["runs/a", "runs/b"], "output": "soup", "dtype": "bf16", "seed": 3},
    {
        "method": "weighted",
        "ingredients": ["a", "b"],
        "weights": [0.7, 0.3],
        "normalize": True,
        "max_shard_size": "1GB",
    },
    {"method": "ties", "ingredients": ["a", "b"], "base_model": "base", "density": [0.2, 0.5], "scale": 1.0},
    {"method": "dare", "pantry": "pantry", "select": ["a", "b"], "base_model": "base", "drop_rate": 0.5},
    {"method": "slerp", "ingredients": ["a", "b"], "t": [{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}]},
    {"method": "passthrough", "ingredients": ["a", "b"], "slices": [{"ingredient": 0, "layers": [0, 2]}], "rest": 1},
    {"method": "uniform", "ingredients": ["lora/a", "lora/b"], "adapter_output": "svd", "rank": 4},
    {"method": "uniform", "ingredients": ["a"], "allow_pickle": True, "trust_remote_code": False},
    {"method": "greedy", "pantry": "pantry", "rule": ">", "evaluation": EVALUATION},
    {"method": "learned", "ingredients": ["a", "b"], "epochs": 2, "lr": 0.1, "evaluation": EVALUATION},
    {
        "method": "search",
        "merge": "ties",
        "base_model": "base",
        "ingredients": ["a", "b"],
        "space": {"density": {"low": 0.1, "high": 1.0}, "scale": {"low": 0.5, "high": 2.0, "groups": 2}},
        "fixed": {"majority_sign": "total"},
        "trials": 12,
        "evaluation": EVALUATION,
    },
]
# Keys a fuzzer would rarely spell by chance: every recipe, evaluation and parameter key.
NAMES = sorted(
    {*RECIPE_KEYS, *EVALUATION_KEYS, "splits", "filter", "value", "ingredient", "layers", "load_from_disk", "path"}
    | {name for declared in [*METHODS.values(), *STRATEGIES.values()] for name in declared.parameters}
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from([*NAMES, *METHODS, *STRATEGIES, "5GB", "bf16", "validation", "../x", "", "\x00", "\u2028"])
)
keys = st.sampled_from(NAMES) | st.text(max_size=8) | st.integers() | st.booleans() | st.none() | st.floats()
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=10
)


def refused_cleanly(call, *args, **kwargs):
    """Run `call`; a `SoupError` must carry one non-empty line. Any other exception fails the test."""
    try:
        return call(*args, **kwargs)
    except SoupError as error:
        message = str(error)
        assert message.strip(), "empty message"
        assert len(message.splitlines()) == 1, f"not one line: {message!r}"
        return None


def check(data, folder):
    """Validate a mapping as a recipe; when it passes, bind its parameters as a cook would."""
    recipe = refused_cleanly(Recipe.from_mapping, data, base_dir=folder, source="fuzz.yaml")
    if recipe is not None:
        refused_cleanly(lookup(recipe.method).bind, recipe.parameters, count(recipe))


def count(recipe: Recipe) -> int:
    """How many ingredients the recipe names (2 for a whole pantry)."""
    return len(recipe.ingredients) or len(recipe.select or []) or 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("data", VALID, ids=lambda data: data["method"])
def test_the_valid_recipes_pass(data, folder):
    recipe = Recipe.from_mapping(data, base_dir=folder)
    lookup(recipe.method).bind(recipe.parameters, count(recipe))


@FUZZ
@given(data=values)
def test_arbitrary_structures(data, folder):
    check(data, folder)


@FUZZ
@given(case=st.sampled_from(VALID).flatmap(lambda r: st.tuples(st.just(r), st.sampled_from(sorted(r)), values)))
def test_valid_recipes_with_one_value_replaced(case, folder):
    recipe, key, value = case
    check({**recipe, key: value}, folder)


@FUZZ
@given(recipe=st.sampled_from(VALID), key=keys, value=values, dropped=st.sampled_from([None, *RECIPE_KEYS]))
def test_valid_recipes_with_a_key_added_or_dropped(recipe, key, value, dropped, folder):
    mutated = {**recipe, key: value}
    mutated.pop(dropped, None)
    check(mutated, folder)


@FUZZ
@given(key=st.sampled_from(sorted(EVALUATION)) | keys, value=values, method=st.sampled_from(["greedy", "learned"]))
def test_evaluation_sections_with_one_value_replaced(key, value, method, folder):
    check({"method": method, "ingredients": ["a", "b"], "evaluation": {**EVALUATION, key: value}}, folder)


@FUZZ
@given(data=values)
def test_any_structure_written_as_yaml(data, folder):
    path = folder / "structure.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    refused_cleanly(load_recipe, path)


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200))
def test_random_text_and_bytes(text, folder):
    path = folder / "random.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    refused_cleanly(load_recipe, path)


@FUZZ
@given(
    recipe=st.sampled_from(VALID),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 3), st.text(max_size=3)), min_size=1, max_size=4),
)
def test_valid_recipe_texts_with_random_edits(recipe, edits, folder):
    """Characters inserted, replaced or deleted in a valid recipe's YAML text: parser errors and odd values."""
    text = yaml.safe_dump(recipe, sort_keys=False)
    for position, length, insert in edits:
        position %= len(text) + 1
        text = text[:position] + insert + text[position + length :]
    path = folder / "edited.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    refused_cleanly(load_recipe, path)


def test_deeply_nested_yaml_is_refused_cleanly(folder):
    path = folder / "deep.yaml"
    path.write_text("method: uniform\ningredients: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(SoupError, match="nests lists or mappings too deeply"):
        load_recipe(path)
