"""From a recipe to what a cook needs: the ingredients located, the saved tokenizer (or, for audio, feature
extractor), the scorer, the resident model (`Kitchen`) and the `Selection` (which split chooses the soup, which are
reported, which rows are compared).

Both cooks (full models in `hf_soup.builder`, LoRA adapters in `hf_soup.adapters.cooking`) and the on-demand figures
(`hf_soup.recipe_plots`) prepare through here, so a recipe means the same thing to each of them.

Example:

```python
>>> recipe = load_recipe("recipes/greedy.yaml")
>>> located = locate(recipe)                       # [Located(ingredient, folder), ...]
>>> scorer = prepare_scorer(recipe, located[0].folder)
>>> selection = Selection.of(recipe.evaluation, scorer)
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .checkpoint import parse_dtype
from .errors import SoupError, first_line
from .evaluation import COMPARED_BY_DEFAULT, Evaluation
from .ingredient import Ingredient, folder_labels
from .jsonfile import read_model_file
from .kitchen import Kitchen
from .pantry import Pantry
from .recipe import Recipe
from .scoring import Scorer
from .tasks import TASKS
from .tokenization import has_tokenizer, load_tokenizer

FEATURE_EXTRACTOR_FILE = "preprocessor_config.json"


class Located(NamedTuple):
    """An ingredient and the folder its files are read from."""

    ingredient: Ingredient
    folder: Path


def locate(recipe: Recipe) -> list[Located]:
    """The recipe's ingredients with their folders, in recipe order (pantry order for a whole pantry); an
    ingredient listed twice is refused. Folders given by path get ids that tell them apart (`folder_labels`)."""
    if recipe.pantry is not None:
        if not (recipe.pantry / "pantry.json").is_file():
            raise SoupError(f"{recipe.pantry} is not a pantry (no pantry.json); give the folder SoupCallback wrote")
        pantry = Pantry(recipe.pantry)
        chosen = pantry.list() if recipe.select is None else [pantry.get(i) for i in recipe.select]
        found = [Located(ingredient, pantry.location(ingredient)) for ingredient in chosen]
    else:
        found = []
        reserved = ["base_model"] if recipe.base_model is not None else []
        for folder, label in zip(recipe.ingredients, folder_labels(recipe.ingredients, reserved=reserved)):
            if not folder.is_dir():
                raise SoupError(f"ingredient {folder} does not exist or is not a folder; check the path")
            found.append(Located(Ingredient.from_folder(folder, ingredient_id=label), folder))
    seen: set[Path] = set()
    for ingredient, folder in found:
        real = folder.resolve()
        if real in seen:
            raise SoupError(
                f"ingredient {ingredient.id} is listed twice ({folder}); list each once, and use method: weighted "
                "to give one ingredient more weight"
            )
        seen.add(real)
    return found


def saved_tokenizer(*folders: Path | None):
    """The tokenizer saved in the first of `folders` that has one, or `None` when none has. Its JSON files are
    checked before Transformers reads them, and what Transformers still cannot load is a one-line `SoupError`."""
    for folder in folders:
        if folder is not None and has_tokenizer(Path(folder)):
            return load_tokenizer(Path(folder))
    return None


def saved_feature_extractor(*folders: Path | None):
    """The feature extractor saved in the first of `folders` that has one (`preprocessor_config.json`), or `None`
    when none has; its JSON is checked first, and what Transformers still cannot load is a one-line `SoupError`."""
    for folder in folders:
        if folder is not None and (Path(folder) / FEATURE_EXTRACTOR_FILE).is_file():
            from transformers import AutoFeatureExtractor

            read_model_file(Path(folder), FEATURE_EXTRACTOR_FILE)
            try:
                return AutoFeatureExtractor.from_pretrained(folder)
            except (ValueError, TypeError, AttributeError, KeyError, OSError) as error:
                raise SoupError(
                    f"cannot load the feature extractor saved in {folder} ({type(error).__name__}: "
                    f"{first_line(error)}); save it again (feature_extractor.save_pretrained)"
                ) from None
    return None


def saved_processing_class(recipe: Recipe, *folders: Path | None):
    """What turns the recipe's raw rows into model inputs, saved in the first of `folders` that has one: the
    feature extractor for a task that reads audio (`Task.processing`), otherwise the tokenizer; `None` if none is
    saved."""
    task = TASKS.get(recipe.evaluation.task) if recipe.evaluation is not None else None
    if task is not None and task.processing == "feature_extractor":
        return saved_feature_extractor(*folders)
    return saved_tokenizer(*folders)


def prepare_scorer(recipe: Recipe, *folders: Path | None, vocabulary=None, scorer: Scorer | None = None) -> Scorer:
    """The scorer given from Python, or the one the recipe's `evaluation:` section describes, reading raw rows with
    the soup's processing class: the merged vocabulary's tokenizer when the recipe has one (`vocabulary`, a
    `hf_soup.vocabulary` choice), else the one saved in the first of `folders` that has one
    (`saved_processing_class`)."""
    if scorer is not None:
        return scorer
    if recipe.evaluation is None:
        raise SoupError(f"{recipe.source}: this recipe scores models on data; add an `evaluation:` section")
    processing = vocabulary.tokenizer if vocabulary is not None else saved_processing_class(recipe, *folders)
    return recipe.evaluation.scorer(processing)


@dataclass(frozen=True)
class Selection:
    """How a strategy's soup is chosen and reported: the one owner of the `evaluation:` defaults.

    Attributes:
        split (`str`): the split the soup is chosen on (`selection_split`).
        report_splits (`list[str]`): splits reported, never used to choose.
        compared (`list[str]`): the report's extra rows (`compare`).
        reuse_recorded (`bool`): reuse pantry scores measured on `split` (`reuse_recorded_scores`).
        placement (`dict`): the `Kitchen` keyword arguments (`device_map`, `max_memory`, `offload_folder`).
        dtype (`str`): the resident model's dtype for scoring (`float32`, `bfloat16`, `float16`).
    """

    split: str
    report_splits: list[str] = field(default_factory=list)
    compared: list[str] = field(default_factory=lambda: list(COMPARED_BY_DEFAULT))
    reuse_recorded: bool = True
    placement: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"

    @classmethod
    def of(cls, evaluation: Evaluation | None, scorer: Scorer) -> Selection:
        """From the recipe's `evaluation:` section; without one (a scorer given from Python), the scorer's first
        split chooses and the others are reported."""
        if evaluation is not None:
            return cls(
                evaluation.selection_split,
                list(evaluation.report_splits),
                list(evaluation.compare),
                evaluation.reuse_recorded_scores,
                evaluation.placement(),
                evaluation.resident_dtype,
            )
        first = next(iter(scorer.splits))
        return cls(first, [split for split in scorer.splits if split != first])


def open_kitchen(
    recipe: Recipe,
    folder: Path,
    scorer: Scorer,
    selection: Selection,
    config_overrides: dict | None = None,
    *,
    dtype: str | None = None,
) -> Kitchen:
    """The one resident model: the scorer's own (a Trainer's model), or one built from `folder` (its config changed
    by `config_overrides`, e.g. a union vocabulary's size), placed and typed as the selection says (`dtype` overrides
    its dtype: statistics that go into the soup's math are gathered in float32)."""
    if scorer.resident is not None:
        return Kitchen.around(scorer.resident)
    return Kitchen(
        folder,
        scorer.task,
        dtype=parse_dtype(dtype or selection.dtype),
        trust_remote_code=recipe.trust_remote_code,
        config_overrides=config_overrides,
        **selection.placement,
    )
