"""SoupBuilder: ingredients → method → a soup folder that `from_pretrained` loads, with `soup.json` beside it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapters import cook_adapters
from .atomic import check_output_folder
from .checkpoint import CheckpointReader, RenamedReader, TensorInfo, parse_dtype
from .comparison import choose
from .compat import check_configs
from .errors import SoupError
from .inspection import task_vector_geometry
from .jsonfile import read_model_file
from .merge import Parameters, Plan, device_record, merge_device, plan_soup, stream_merge
from .methods import Method, get_method
from .preparation import Located, Selection, locate, open_kitchen, prepare_scorer
from .recipe import Recipe, load_recipe, lookup
from .schedules import per_tensor
from .scoring import Scorer
from .soup import Soup, copy_side_files, staged_soup
from .strategies import StrategyResult, Tasting
from .trainer_scoring import TrainerScorer
from .vocabulary import prepare_vocabulary
from .writer import CheckpointWriter

logger = logging.getLogger(__name__)

# The file beside a soup where a strategy keeps resumable state (the search strategy's Optuna study).
STUDY_SUFFIX = ".study.log"


class SoupBuilder:
    """Cook a soup from ingredients with a registered method.

    Args:
        ingredients (`list` of paths, *optional*): model or adapter folders; or use `pantry` (and `select`).
        method (`str`, *optional*, defaults to `"uniform"`): a registered method (`hf_soup.methods.list_methods()`).
        pantry (`str`, *optional*): a pantry folder; all its ingredients, or those whose ids are in `select`.
        trainer (`transformers.Trainer`, *optional*): score strategies with this Trainer's own evaluation loop (its
            eval datasets, collator, `compute_metrics`, `metric_for_best_model`, generation); see
            `hf_soup.trainer_scoring`. `evaluation` may then only choose splits and rows.
        base_model, dtype, max_shard_size, seed, allow_pickle, trust_remote_code: see the recipe reference.
        **parameters: the method's parameters, e.g. `weights=[0.7, 0.3]` for `"weighted"`.

    Example:

    ```python
    >>> soup = SoupBuilder(["runs/a/best", "runs/b/best"], method="uniform").cook("soups/uniform")
    >>> model = AutoModelForSequenceClassification.from_pretrained(soup.path)
    ```
    """

    def __init__(
        self, ingredients: list[str | os.PathLike] | None = None, *, method: str = "uniform", trainer=None, **options
    ):
        data = {"method": method, **options}
        if ingredients is not None:
            data["ingredients"] = [str(path) for path in ingredients]
        self.scorer = None
        if trainer is not None:  # score with the user's Trainer: its eval datasets are the recipe's splits
            self.scorer = TrainerScorer(trainer, options.get("evaluation"))
            data["evaluation"] = {"splits": self.scorer.splits, **self.scorer.evaluation}
        self.recipe = Recipe.from_mapping(data)

    @classmethod
    def from_recipe(cls, recipe: Recipe | str | os.PathLike) -> SoupBuilder:
        """A builder for a `Recipe` or the path of a recipe YAML file."""
        builder = cls.__new__(cls)
        builder.recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        builder.scorer = None
        return builder

    def ingredients(self) -> list[Located]:
        """The recipe's ingredients with their folders, in recipe order (pantry order for a whole pantry)."""
        return locate(self.recipe)

    def cook(
        self,
        output: str | os.PathLike | None = None,
        *,
        overwrite: bool = False,
        progress: bool = True,
        scorer: Scorer | None = None,
    ) -> Soup:
        """Check everything, choose the weights (strategies), then stream the soup into a staging folder and rename
        it to `output`.

        Args:
            output (`str`, *optional*): the soup folder; defaults to the recipe's `output`.
            overwrite (`bool`, *optional*, defaults to `False`): replace an existing non-empty output folder.
            progress (`bool`, *optional*, defaults to `True`): show a progress bar.
            scorer (`Scorer`, *optional*): for strategies, a ready scorer instead of the recipe's `evaluation`.
        """
        recipe, scorer = self.recipe, scorer or self.scorer
        target = Path(output).absolute() if output is not None else recipe.output
        if target is None:
            raise SoupError(f"{recipe.source}: no output folder; set `output:` in the recipe or pass --output DIR")
        check_output_folder(target, overwrite=overwrite)
        located = self.ingredients()
        if not located:
            raise SoupError(f"{recipe.source}: the ingredient list is empty; give at least one model folder")
        if any(ingredient.kind == "adapter" for ingredient, _ in located):  # LoRA adapters: soups in adapter space
            if recipe.tokenizer is not None:
                raise SoupError(
                    f"{recipe.source}: `tokenizer:` merges the vocabularies of full models; an adapter soup keeps "
                    "the base model's tokenizer: remove `tokenizer:`"
                )
            return cook_adapters(recipe, located, target, overwrite=overwrite, progress=progress, scorer=scorer)
        declared = lookup(recipe.method)
        parameters = declared.bind(recipe.parameters, len(located), source=recipe.source)
        try:
            device = merge_device(recipe.device)
        except SoupError as error:
            raise SoupError(f"{recipe.source}: {error}") from None
        labels = [ingredient.id for ingredient, _ in located]
        folders = [folder for _, folder in located]
        check_configs(
            folders + ([recipe.base_model] if recipe.base_model else []),
            labels + ["base_model"],
            trust_remote_code=recipe.trust_remote_code,
        )
        dtype = parse_dtype(recipe.dtype) if recipe.dtype else None
        with contextlib.ExitStack() as stack:
            readers = [
                stack.enter_context(CheckpointReader(folder, allow_pickle=recipe.allow_pickle, label=label))
                for label, folder in zip(labels, folders)
            ]
            base = None
            if recipe.base_model is not None:
                base = stack.enter_context(
                    CheckpointReader(recipe.base_model, allow_pickle=recipe.allow_pickle, label="base_model")
                )
            vocabulary, vocabulary_notes = prepare_vocabulary(
                recipe.tokenizer, readers, base, source=recipe.source, trust_remote_code=recipe.trust_remote_code
            )
            if vocabulary is not None:  # the ingredients' embedding and output rows in the soup's vocabulary
                readers, base = vocabulary.align(readers, base)
            rearranged = getattr(declared, "layout", None) is not None  # passthrough: one renamed view
            merged_from, plan = _plan(declared, parameters, readers, base, dtype)
            plan.notes += vocabulary_notes
            decision = self._decide(declared, parameters, located, readers, base, scorer, target, stack, vocabulary)
            with staged_soup(target, located, recipe, overwrite=overwrite) as staging:
                if staging is None:  # under accelerate launch, only the main process writes
                    return Soup(target, {"method": declared.name, **decision.sections})
                method, chosen = decision.method, decision.chosen
                writer = CheckpointWriter(
                    staging.folder, plan.infos, max_shard_size=recipe.max_shard_size, prefix=_prefix(readers[0])
                )
                stream_merge(
                    merged_from if rearranged else [merged_from[i] for i in chosen],
                    method,
                    decision.parameters,
                    plan,
                    writer,
                    base=base if method.needs_base else None,
                    seed=recipe.seed,
                    progress=progress,
                    statistics=decision.statistics,
                    device=device,
                )
                files = writer.close()
                source = folders[parameters["rest"]] if rearranged else folders[0]
                copy_side_files(recipe.base_model or source, staging.folder, dtype)
                if getattr(declared, "configure", None) is not None and (staging.folder / "config.json").is_file():
                    config = declared.configure(read_model_file(staging.folder, "config.json"), parameters)
                    (staging.folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
                sections = {**decision.sections, "device": device_record(recipe.device, device)}
                if vocabulary is not None:  # its tokenizer, config.json's vocab_size, and the mapping in soup.json
                    vocabulary.write(staging.folder)
                    sections["vocabulary"] = vocabulary.record
                if declared.kind == "strategy":  # figure 5's data: angles between task vectors, streamed
                    sections["task_vectors"] = task_vector_geometry(readers, base, labels=labels).to_dict()
                record = staging.finish(
                    declared.name, parameters, weights=decision.weights, notes=plan.notes, files=files, **sections
                )
        logger.info("soup written to %s", target)
        return Soup(target, record)

    def _decide(
        self, declared, parameters, located, readers, base, scorer, target: Path, stack, vocabulary=None
    ) -> Decision:
        """What the soup is written with: the method and its per-tensor parameters, or what a strategy chose on one
        resident model (then `sections` holds its choice and report for `soup.json`)."""
        count = len(located)
        statistics = None
        if getattr(declared, "needs_data", False):
            statistics = self._statistics(
                declared, parameters, located, readers, scorer, target.parent, stack, vocabulary
            )
        if declared.kind != "strategy":
            weights = declared.mixing(parameters, count) if getattr(declared, "mixing", None) else None
            per = per_tensor(parameters, getattr(declared, "scalar", []), readers[0].names())
            return Decision(declared, per, list(range(count)), weights, {}, statistics)
        storage = target.parent / f"{target.name}{STUDY_SUFFIX}"
        result, sections = self._choose(declared, parameters, located, readers, base, scorer, storage, vocabulary)
        coefficients = result.coefficients(count)
        weights = coefficients if not callable(coefficients) else result.record.get("alpha_mean")
        method = get_method(result.method)
        return Decision(method, result.parameters, result.chosen, weights, sections, statistics)

    def _statistics(self, method, parameters, located, readers, scorer, where: Path, stack, vocabulary) -> list[Any]:
        """Run the method's statistics hook with each ingredient in the resident model; spill each ingredient's
        statistics to a temporary safetensors file (one ingredient's worth in memory at a time) and return
        handles that read them back per tensor."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        recipe = self.recipe
        scorer = self._scorer(located, scorer, vocabulary)
        selection = Selection.of(recipe.evaluation, scorer)
        folder = Path(tempfile.mkdtemp(prefix=".hf_soup-statistics-", dir=where if where.is_dir() else None))
        stack.callback(shutil.rmtree, folder, True)
        handles = []
        with open_kitchen(
            recipe, located[0].folder, scorer, selection, _overrides(vocabulary), dtype="float32"
        ) as kitchen:
            for index, reader in enumerate(readers):
                kitchen.load((name, reader.get(name)) for name in reader.names())
                values = method.statistics(kitchen, scorer, selection.split, parameters)
                save_file({k: v.contiguous() for k, v in values.items()}, str(folder / f"{index}.safetensors"))
                handles.append(stack.enter_context(safe_open(str(folder / f"{index}.safetensors"), "pt")))
        return handles

    def _choose(
        self, strategy, parameters, located, readers, base, scorer, storage: Path, vocabulary=None
    ) -> tuple[StrategyResult, dict[str, Any]]:
        """Run a strategy on one resident model; returns its result and the record (choice and report).

        `storage` is the file beside the soup where a strategy keeps resumable state (`search`'s study)."""
        recipe = self.recipe
        scorer = self._scorer(located, scorer, vocabulary)
        selection = Selection.of(recipe.evaluation, scorer)
        with open_kitchen(recipe, located[0].folder, scorer, selection, _overrides(vocabulary)) as kitchen:
            ingredients = [ingredient for ingredient, _ in located]
            tasting = Tasting(
                ingredients,
                readers,
                kitchen,
                scorer,
                selection.split,
                reuse_recorded=selection.reuse_recorded,
                base=base,
                seed=recipe.seed,
            )
            return choose(
                strategy,
                parameters,
                tasting,
                seed=recipe.seed,
                report_splits=selection.report_splits,
                compared=selection.compared,
                storage=storage,
            )

    def _scorer(self, located, scorer, vocabulary) -> Scorer:
        """The scorer given, or the recipe's, reading rows with the soup's tokenizer (`prepare_scorer`)."""
        recipe = self.recipe
        return prepare_scorer(recipe, recipe.base_model or located[0].folder, vocabulary=vocabulary, scorer=scorer)


def _overrides(vocabulary) -> dict[str, Any] | None:
    """The resident model's config changes: the soup's vocabulary size."""
    return vocabulary.config_overrides() if vocabulary is not None else None


@dataclass
class Decision:
    """What a full-model soup is written with (see `SoupBuilder._decide`)."""

    method: Method
    parameters: Parameters
    chosen: list[int]
    weights: Any
    sections: dict[str, Any]
    statistics: list[Any] | None


def _plan(declared, parameters, readers, base, dtype) -> tuple[list, Plan]:
    """The readers the soup is streamed from and its plan (tensor names, shapes, output dtypes), checked before
    any tensor is read. A rearranging method (`passthrough`) reads one renamed view of the ingredients."""
    layout = getattr(declared, "layout", None)
    if layout is not None:
        merged_from = [RenamedReader(readers, layout(parameters, readers))]
        return merged_from, Plan([TensorInfo(i.name, i.shape, dtype or i.dtype) for i in merged_from[0].infos()])
    written = _written(declared, parameters)
    needs_base = written is not None and written.needs_base
    return readers, plan_soup(readers, dtype=dtype, base=base if needs_base else None)


def _prefix(reader: CheckpointReader) -> str:
    """The weight files' name: `adapter_model` for peft folders, else `model`."""
    return "adapter_model" if reader.files[0].name.startswith("adapter_model") else "model"


def _written(declared, parameters: dict[str, Any]):
    """The method a recipe's soup is written with: the method itself, or the one a strategy's parameters name
    (`search`'s `merge:`); `None` when only the strategy's run decides (greedy: uniform; learned: weighted)."""
    if declared.kind == "method":
        return declared
    name = declared.written_method(parameters)
    return get_method(name) if name is not None else None
