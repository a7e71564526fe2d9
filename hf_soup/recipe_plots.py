"""Figures drawn on demand from a recipe (`hf-soup plot interpolation|landscape|angles RECIPE`): the recipe's
ingredients are tasted on one resident model, the figure's data computed and drawn (`hf_soup.plots`), and the card
of the recipe's soup folder refreshed (`hf_soup.card`).

Example:

```python
>>> plot_recipe("interpolation", "recipes/greedy.yaml", steps=5)   # figure_interpolation.png + .json, card updated
```
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from .atomic import write_json
from .card import write_card
from .checkpoint import CheckpointReader
from .compat import check_configs
from .errors import SoupError
from .plots import (
    interpolation_curve,
    landscape,
    pair_gains,
    plot_angles,
    plot_interpolation,
    plot_landscape,
    task_vector_angles,
)
from .preparation import Selection, locate, open_kitchen, prepare_scorer
from .recipe import Recipe, load_recipe
from .record import NAME as RECORD_NAME
from .strategies import Tasting
from .vocabulary import prepare_vocabulary


@contextlib.contextmanager
def recipe_tasting(recipe: Recipe, base: str | Path | None = None) -> Iterator[Tasting]:
    """The recipe's ingredients in a `Tasting` on one resident model, scored on its `evaluation:` data; `base`
    (default: the recipe's `base_model`) is the tasting's base. With a `tokenizer:` choice, the ingredients and the
    base are read in the soup's vocabulary (`hf_soup.vocabulary`), as the cook reads them."""
    located = locate(recipe)
    if not located or any(ingredient.kind == "adapter" for ingredient, _ in located):
        raise SoupError("these figures need full-model ingredients (no adapters) in the recipe")
    labels, folders = [i.id for i, _ in located], [folder for _, folder in located]
    check_configs(folders, labels, trust_remote_code=recipe.trust_remote_code)
    base = base or recipe.base_model
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(CheckpointReader(f, label=label)) for f, label in zip(folders, labels)]
        reader = stack.enter_context(CheckpointReader(base, label="base")) if base is not None else None
        vocabulary, _ = prepare_vocabulary(
            recipe.tokenizer, readers, reader, source=recipe.source, trust_remote_code=recipe.trust_remote_code
        )
        overrides = None
        if vocabulary is not None:
            readers, reader = vocabulary.align(readers, reader)
            overrides = vocabulary.config_overrides()
        scorer = prepare_scorer(recipe, recipe.base_model or folders[0], vocabulary=vocabulary)
        selection = Selection.of(recipe.evaluation, scorer)
        kitchen = stack.enter_context(open_kitchen(recipe, folders[0], scorer, selection, overrides))
        ingredients = [i for i, _ in located]
        yield Tasting(ingredients, readers, kitchen, scorer, selection.split, reuse_recorded=False, base=reader)


def plot_recipe(kind: str, recipe, *, output=None, pair=None, base=None, split=None, **options) -> Path:
    """`hf-soup plot interpolation|landscape|angles`: compute the data, write `figure_<kind>.png` and its numbers
    (`figure_<kind>.json`) into `output` (default: the recipe's soup folder), and refresh the card there.

    `options`: `steps` (points along α, default 11), `grid` (points per axis, default 11) and `span` (default
    (-0.5, 1.5)) of the landscape, `gains` (angles: also score the soup of every pair).
    """
    steps, grid, span = options.get("steps", 11), options.get("grid", 11), options.get("span", (-0.5, 1.5))
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    with recipe_tasting(recipe, base) as tasting:
        target = Path(output) if output is not None else recipe.output
        if target is None or not target.is_dir():
            raise SoupError(f"no folder to draw into ({target}); cook the recipe first or pass --output DIR")
        ids = [i.id for i in tasting.ingredients]
        index = []
        for name in pair or []:
            if name not in ids:
                raise SoupError(f"no ingredient {name!r} in the recipe; its ingredients: {', '.join(ids)}")
            index.append(ids.index(name))
        if kind in ("interpolation", "landscape") and not pair:  # default: the two best by selection score
            index = tasting.ranking()[:2]
        if kind in ("interpolation", "landscape") and len(index) != 2:
            raise SoupError(f"plot {kind} needs --pair A B (two of: {', '.join(ids)})")
        reader = tasting.base
        if kind == "interpolation":
            splits = [split] if split else list(tasting.scorer.splits)
            alphas = [n / (steps - 1) for n in range(steps)] if steps > 1 else [0.0, 1.0]
            data, draw = interpolation_curve(tasting, *index, alphas, splits=splits), plot_interpolation
        elif kind == "landscape":
            if reader is None:
                raise SoupError("plot landscape needs the base model θ₀: set `base_model:` or pass --base DIR")
            data, draw = landscape(tasting, reader, *index, grid=grid, span=span, split=split), plot_landscape
        elif kind == "angles":
            data = task_vector_angles(tasting.readers, reader, labels=ids)
            data["gains"] = pair_gains(tasting, split=split) if options.get("gains") else None
            draw = lambda d, path: plot_angles(d, path, d["gains"])  # noqa: E731
        else:
            raise SoupError(f"unknown figure {kind!r}; choose report, interpolation, landscape or angles")
    write_json(target / f"figure_{kind}.json", data)
    path = draw(data, target / f"figure_{kind}.png")
    if (target / RECORD_NAME).is_file():
        write_card(target)
    return path
