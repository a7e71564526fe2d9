"""Cooking when a sweep ends: `cook_at_end` makes the function a `SoupCallback(cook=...)` calls with its pantry once
the sweep's last run is over, so a training script (or `Trainer.hyperparameter_search`) ends with its soup.

The callback stays light: it imports none of this, and only calls the function it was handed. The function cooks
the pantry like `hf-soup cook` does (a recipe file, or `SoupBuilder`'s options, optionally scored by the user's
`Trainer`), and is checked when the callback is made, so a bad recipe or output fails before any training.

Example:

```python
>>> callback = SoupCallback("pantry", runs=8, cook=cook_at_end("recipes/pantry_greedy.yaml"))
>>> trainer.add_callback(callback)
>>> trainer.hyperparameter_search(backend="optuna", n_trials=8, ...)
>>> callback.soup.path                                # the soup of the 8 trials, cooked as the last one ended
```
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .atomic import check_output_folder
from .builder import SoupBuilder
from .errors import SoupError
from .pantry import Pantry
from .recipe import Recipe, load_recipe
from .soup import Soup


class SweepCook:
    """Cook a sweep's pantry with a recipe or with `SoupBuilder`'s options; made by `cook_at_end`.

    `check(pantry)` (called by `SoupCallback` when it is made) refuses what would fail at the end of the sweep;
    calling it with the pantry cooks the soup and returns the `Soup`.
    """

    def __init__(
        self,
        recipe: Recipe | str | os.PathLike | None,
        *,
        output: str | os.PathLike | None,
        trainer: Any,
        overwrite: bool,
        progress: bool,
        options: dict[str, Any],
    ):
        if recipe is not None and (trainer is not None or options):
            given = ", ".join([*(["trainer"] if trainer is not None else []), *options])
            raise SoupError(
                f"cook_at_end takes a recipe or SoupBuilder's options, not both (given: the recipe and {given}); put "
                "the options in the recipe, or drop the recipe and pass method=..., evaluation=... or trainer=..."
            )
        for key in ("pantry", "ingredients", "select"):
            if key in options:
                raise SoupError(
                    f"cook_at_end cooks the pantry of the SoupCallback it is given to, so it takes no {key!r}; "
                    "cook other ingredients by hand with SoupBuilder or `hf-soup cook`"
                )
        self.recipe = None if recipe is None else recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        self.trainer, self.overwrite, self.progress = trainer, overwrite, progress
        self.options = {"method": "uniform", **options}
        self.output = Path(output).absolute() if output is not None else getattr(self.recipe, "output", None)
        if self.output is None:
            raise SoupError(
                "cook_at_end needs the soup's folder: pass output='soups/NAME' (or set `output:` in the recipe)"
            )

    def builder(self, pantry: Pantry) -> SoupBuilder:
        """A `SoupBuilder` for `pantry` (for a Trainer, scoring with its model as it is now)."""
        recipe = self.recipe
        if recipe is None:
            return SoupBuilder(pantry=str(pantry.root), trainer=self.trainer, **self.options)
        if recipe.pantry is None or recipe.pantry.resolve() != pantry.root.resolve():
            cooked = f"pantry {recipe.pantry}" if recipe.pantry is not None else "`ingredients:`"
            raise SoupError(
                f"recipe {recipe.source} cooks {cooked}, but the SoupCallback fills pantry {pantry.root}; set "
                f"`pantry: {pantry.root}` in the recipe (a path relative to the recipe's folder works too)"
            )
        if recipe.select is not None:
            raise SoupError(
                f"recipe {recipe.source} selects ingredients by id, which the sweep has not made yet; drop `select:` "
                "to cook all the sweep's runs (cook a selection later with `hf-soup cook`)"
            )
        return SoupBuilder.from_recipe(recipe)

    def check(self, pantry: Pantry) -> None:
        """Refuse now what would fail at the end of the sweep: a recipe for another pantry, bad options, a Trainer
        that cannot score, an output folder that is already taken."""
        self.builder(pantry)
        check_output_folder(self.output, overwrite=self.overwrite)

    def __call__(self, pantry: Pantry) -> Soup:
        return self.builder(pantry).cook(self.output, overwrite=self.overwrite, progress=self.progress)


def cook_at_end(
    recipe: Recipe | str | os.PathLike | None = None,
    *,
    output: str | os.PathLike | None = None,
    trainer: Any = None,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> SweepCook:
    """The cook a `SoupCallback` runs on its pantry when the sweep ends: `SoupCallback(pantry, runs=N,
    cook=cook_at_end(...))`.

    Args:
        recipe (`Recipe` or `str`, *optional*): a recipe (or its YAML file) whose `pantry:` is the callback's.
            Without it, the soup is `SoupBuilder(pantry=<the callback's>, trainer=trainer, **options)`.
        output (`str`, *optional*): the soup folder; wins over the recipe's `output:`.
        trainer (`transformers.Trainer`, *optional*): score strategies with this Trainer's evaluation loop (as
            `SoupBuilder(trainer=...)`), its model as it is when the sweep ends; the cook then writes the chosen soup
            into `trainer.model`. Add the callback with `trainer.add_callback(...)` once the Trainer exists.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing non-empty output folder.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar while cooking.
        **options: `SoupBuilder`'s options: `method` (default `"uniform"`), `evaluation`, `base_model`, `dtype`, the
            method's parameters, ...
    """
    return SweepCook(recipe, output=output, trainer=trainer, overwrite=overwrite, progress=progress, options=options)
