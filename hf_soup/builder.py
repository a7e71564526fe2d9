"""SoupBuilder: ingredients → method → a soup folder that `from_pretrained` loads, with `soup.json` beside it."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import check_output_folder, staged_folder, write_json
from .cache import cached_sha256
from .card import explain_soup
from .checkpoint import CheckpointReader, RenamedReader, TensorInfo, parse_dtype, weight_files
from .comparison import choose
from .compat import Plan, check_configs, plan_soup
from .errors import SoupError
from .ingredient import Ingredient
from .inspection import task_vector_geometry
from .kitchen import Kitchen
from .merge import stream_merge
from .methods import get_method
from .pantry import SKIPPED_FILES, Pantry
from .recipe import Recipe, load_recipe, lookup
from .schedules import per_tensor
from .scoring import Scorer, process_state
from .strategies import StrategyResult, Tasting
from .writer import CheckpointWriter

logger = logging.getLogger(__name__)

SOUP_FORMAT = 1
# Files of the first ingredient (or base model) that are not copied into the soup: weights are cooked, and these
# describe a training run rather than the soup.
NOT_COPIED = {"README.md", "soup.json", "trainer_state.json", "training_args.bin"}
# The file beside a soup where a strategy keeps resumable state (the search strategy's Optuna study).
STUDY_SUFFIX = ".study.log"


@dataclass
class Soup:
    """A cooked soup: its folder and its `soup.json` record."""

    path: Path
    record: dict[str, Any]

    def save_pretrained(self, save_directory: str | os.PathLike, *, max_shard_size="5GB", overwrite=False) -> Soup:
        """Copy the soup to `save_directory` with its weights re-sharded (streamed, staged, renamed)."""
        from .hub import save_soup

        return save_soup(self.path, save_directory, max_shard_size=max_shard_size, overwrite=overwrite)

    def push_to_hub(self, repo_id: str, *, private=None, revision=None, commit_message=None, token=None) -> str:
        """Upload the soup folder to a Hub model repository in one commit; returns the commit URL (`hf_soup.hub`)."""
        from .hub import push_to_hub

        options = {"private": private, "revision": revision, "commit_message": commit_message, "token": token}
        return push_to_hub(self.path, repo_id, **options)


class SoupBuilder:
    """Cook a soup from ingredients with a registered method.

    Args:
        ingredients (`list` of paths, *optional*): model or adapter folders; or use `pantry` (and `select`).
        method (`str`, *optional*, defaults to `"uniform"`): a registered method (`hf_soup.methods.list_methods()`).
        pantry (`str`, *optional*): a pantry folder; all its ingredients, or those whose ids are in `select`.
        base_model, dtype, max_shard_size, seed, allow_pickle, trust_remote_code: see the recipe reference.
        **parameters: the method's parameters, e.g. `weights=[0.7, 0.3]` for `"weighted"`.

    Example:

    ```python
    >>> soup = SoupBuilder(["runs/a/best", "runs/b/best"], method="uniform").cook("soups/uniform")
    >>> model = AutoModelForSequenceClassification.from_pretrained(soup.path)
    ```
    """

    def __init__(self, ingredients: list[str | os.PathLike] | None = None, *, method: str = "uniform", **options):
        data = {"method": method, **options}
        if ingredients is not None:
            data["ingredients"] = [str(path) for path in ingredients]
        self.recipe = Recipe.from_mapping(data)

    @classmethod
    def from_recipe(cls, recipe: Recipe | str | os.PathLike) -> SoupBuilder:
        """A builder for a `Recipe` or the path of a recipe YAML file."""
        builder = cls.__new__(cls)
        builder.recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        return builder

    def ingredients(self) -> list[tuple[Ingredient, Path]]:
        """The recipe's ingredients with their folders, in recipe order (pantry order for a whole pantry)."""
        recipe = self.recipe
        if recipe.pantry is not None:
            if not (recipe.pantry / "pantry.json").is_file():
                raise SoupError(
                    f"{recipe.pantry} is not a pantry (no pantry.json); give the folder SoupCallback wrote"
                )
            pantry = Pantry(recipe.pantry)
            chosen = pantry.list()
            if recipe.select is not None:
                chosen = [pantry.get(ingredient_id) for ingredient_id in recipe.select]
            found = [(ingredient, pantry.location(ingredient)) for ingredient in chosen]
        else:
            found = []
            for folder in recipe.ingredients:
                if not folder.is_dir():
                    raise SoupError(f"ingredient {folder} does not exist or is not a folder; check the path")
                found.append((Ingredient.from_folder(folder), folder))
        seen: dict[Path, str] = {}
        for ingredient, folder in found:
            real = folder.resolve()
            if real in seen:
                raise SoupError(
                    f"ingredient {ingredient.id} is listed twice ({folder}); list each once, and use method: weighted "
                    "to give one ingredient more weight"
                )
            seen[real] = ingredient.id
        return found

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
        recipe = self.recipe
        target = Path(output).absolute() if output is not None else recipe.output
        if target is None:
            raise SoupError(f"{recipe.source}: no output folder; set `output:` in the recipe or pass --output DIR")
        check_output_folder(target, overwrite=overwrite)
        declared = lookup(recipe.method)
        found = self.ingredients()
        if not found:
            raise SoupError(f"{recipe.source}: the ingredient list is empty; give at least one model folder")
        if any(ingredient.kind == "adapter" for ingredient, _ in found):  # peft LoRA adapters: soups in adapter space
            from .adapters import cook_adapters

            return cook_adapters(self, found, target, overwrite=overwrite, progress=progress, scorer=scorer)
        parameters = declared.bind(recipe.parameters, len(found), source=recipe.source)
        labels = [ingredient.id for ingredient, _ in found]
        folders = [folder for _, folder in found]
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
            written = _written(declared, parameters)
            needs_base = written is not None and written.needs_base
            base = None
            if recipe.base_model is not None:
                base = stack.enter_context(
                    CheckpointReader(recipe.base_model, allow_pickle=recipe.allow_pickle, label="base_model")
                )
            layout = getattr(declared, "layout", None)
            if layout is not None:  # a rearranging method: one renamed view of the ingredients' tensors
                merged_from = [RenamedReader(readers, layout(parameters, readers))]
                plan = Plan([TensorInfo(i.name, i.shape, dtype or i.dtype) for i in merged_from[0].infos()])
            else:
                merged_from = readers
                plan = plan_soup(readers, dtype=dtype, base=base if needs_base else None)
            extra: dict[str, Any] = {}
            method, chosen = declared, list(range(len(found)))
            method_parameters = per_tensor(parameters, getattr(declared, "scalar", []), readers[0].names())
            weights = declared.mixing(parameters, len(found)) if getattr(declared, "mixing", None) else None
            statistics = None
            if getattr(declared, "needs_data", False):
                statistics = self._statistics(declared, parameters, found, readers, scorer, target.parent, stack)
            if declared.kind == "strategy":
                storage = target.parent / f"{target.name}{STUDY_SUFFIX}"
                result, extra = self._choose(declared, parameters, found, readers, base, scorer, storage)
                method, method_parameters, chosen = get_method(result.method), result.parameters, result.chosen
                coefficients = result.coefficients(len(found))
                weights = coefficients if not callable(coefficients) else result.record.get("alpha_mean")
            state = process_state()
            if not state.is_main_process:  # under accelerate launch, only the main process writes
                state.wait_for_everyone()
                return Soup(target, {"method": declared.name, **extra})
            hasher = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_soup-sha256"))
            digests = hasher.submit(_ingredient_digests, found, recipe.allow_pickle)
            with staged_folder(target, overwrite=overwrite) as staging:
                prefix = "adapter_model" if readers[0].files[0].name.startswith("adapter_model") else "model"
                writer = CheckpointWriter(staging, plan.infos, max_shard_size=recipe.max_shard_size, prefix=prefix)
                stream_merge(
                    [merged_from[i] for i in chosen] if layout is None else merged_from,
                    method,
                    method_parameters,
                    plan,
                    writer,
                    base=base if method.needs_base else None,
                    seed=recipe.seed,
                    progress=progress,
                    statistics=statistics,
                )
                files = writer.close()
                source = folders[parameters["rest"]] if layout is not None else folders[0]
                _copy_side_files(recipe.base_model or source, staging, dtype)
                if getattr(declared, "configure", None) is not None and (staging / "config.json").is_file():
                    config = declared.configure(json.loads((staging / "config.json").read_text()), parameters)
                    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
                record = self._record(found, digests.result(), declared, parameters, weights, plan.notes, files)
                record.update(extra)
                if declared.kind == "strategy":  # figure 5's data: angles between task vectors, streamed
                    record["task_vectors"] = task_vector_geometry(readers, base, labels=labels).to_dict()
                write_json(staging / "soup.json", record)
                explain_soup(staging, output=target)  # figures 1, 2, 5 (strategies) and the README.md model card
            state.wait_for_everyone()
        logger.info("soup written to %s", target)
        return Soup(target, record)

    def _scorer(self, found, scorer: Scorer | None) -> Scorer:
        """The scorer given, or the one the recipe's `evaluation:` describes."""
        if scorer is not None:
            return scorer
        if self.recipe.evaluation is None:
            raise SoupError(f"{self.recipe.source}: this recipe scores models on data; add an `evaluation:` section")
        return self.recipe.evaluation.scorer(_tokenizer(self.recipe.base_model or found[0][1]))

    def _kitchen(self, found, scorer: Scorer) -> Kitchen:
        """The one resident model, placed as the recipe's `evaluation:` says."""
        evaluation = self.recipe.evaluation
        options = evaluation.placement() if evaluation else {}
        return Kitchen(found[0][1], scorer.task, trust_remote_code=self.recipe.trust_remote_code, **options)

    def _statistics(self, method, parameters, found, readers, scorer, where: Path, stack) -> list[Any]:
        """Run the method's statistics hook with each ingredient in the resident model; spill each ingredient's
        statistics to a temporary safetensors file (one ingredient's worth in memory at a time) and return
        handles that read them back per tensor."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        scorer = self._scorer(found, scorer)
        split = self.recipe.evaluation.selection_split if self.recipe.evaluation else next(iter(scorer.splits))
        folder = Path(tempfile.mkdtemp(prefix=".hf_soup-statistics-", dir=where if where.is_dir() else None))
        stack.callback(shutil.rmtree, folder, True)
        handles = []
        with self._kitchen(found, scorer) as kitchen:
            for index, reader in enumerate(readers):
                kitchen.load((name, reader.get(name)) for name in reader.names())
                values = method.statistics(kitchen, scorer, split, parameters)
                save_file({k: v.contiguous() for k, v in values.items()}, str(folder / f"{index}.safetensors"))
                handles.append(stack.enter_context(safe_open(str(folder / f"{index}.safetensors"), "pt")))
        return handles

    def _choose(
        self, strategy, parameters, found, readers, base, scorer, storage: Path
    ) -> tuple[StrategyResult, dict[str, Any]]:
        """Run a strategy on one resident model; returns its result and the record (choice and report).

        `storage` is the file beside the soup where a strategy keeps resumable state (`search`'s study)."""
        evaluation = self.recipe.evaluation
        scorer = self._scorer(found, scorer)
        selection = evaluation.selection_split if evaluation else next(iter(scorer.splits))
        report_splits = evaluation.report_splits if evaluation else [s for s in scorer.splits if s != selection]
        compared = evaluation.compare if evaluation else ["uniform", "ensemble"]
        with self._kitchen(found, scorer) as kitchen:
            tasting = Tasting(
                [ingredient for ingredient, _ in found],
                readers,
                kitchen,
                scorer,
                selection,
                reuse_recorded=evaluation.reuse_recorded_scores if evaluation else True,
                base=base,
                seed=self.recipe.seed,
            )
            return choose(
                strategy,
                parameters,
                tasting,
                seed=self.recipe.seed,
                report_splits=report_splits,
                compared=compared,
                storage=storage,
            )

    def _record(self, found, digests, declared, parameters, weights, notes, files) -> dict[str, Any]:
        from . import __version__

        weights = weights if weights is not None else [None] * len(found)
        recipe = self.recipe
        return {
            "format": SOUP_FORMAT,
            "hf_soup_version": __version__,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "method": declared.name,
            "parameters": parameters,
            "recipe": {"source": recipe.source, **_jsonable(recipe.raw)},
            "base_model": str(recipe.base_model) if recipe.base_model else None,
            "dtype": recipe.dtype,
            "seed": recipe.seed,
            "ingredients": [
                {
                    "id": ingredient.id,
                    "path": str(folder),
                    "kind": ingredient.kind,
                    "weight": weight,
                    "sha256": digest,
                    "run": ingredient.run,
                    "metric": ingredient.metric,
                    "value": ingredient.value,
                    "split": ingredient.split,
                    "hyperparameters": ingredient.hyperparameters,
                    "base_model": ingredient.base_model,
                }
                for (ingredient, folder), digest, weight in zip(found, digests, weights)
            ],
            "notes": notes,
            "files": sorted(path.name for path in files),
        }


def _written(declared, parameters: dict[str, Any]):
    """The method a recipe's soup is written with: the method itself, or the one a strategy's parameters name
    (`search`'s `merge:`); `None` when only the strategy's run decides (greedy: uniform; learned: weighted)."""
    if declared.kind == "method":
        return declared
    name = declared.written_method(parameters)
    return get_method(name) if name is not None else None


def _tokenizer(folder: Path):
    """The tokenizer saved in a model folder, or `None` when it has none."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
    if not any((folder / name).is_file() for name in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _ingredient_digests(found: list[tuple[Ingredient, Path]], allow_pickle: bool) -> list[dict[str, str]]:
    """sha256 of each ingredient's weight files: from the pantry ledger where recorded, else from the digest cache
    (`hf_soup.cache`) or computed."""
    digests = []
    for ingredient, folder in found:
        if ingredient.sha256:
            digests.append(dict(ingredient.sha256))
        else:
            digests.append(cached_sha256(list(weight_files(folder, allow_pickle=allow_pickle))))
    return digests


def _copy_side_files(source: Path, staging: Path, dtype) -> None:
    """Copy config, generation config and tokenizer files; record a chosen output dtype in the config."""
    weights = {path.name for path in weight_files(source, allow_pickle=True)}
    index_names = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}
    for item in sorted(source.iterdir()):
        if (
            item.is_file()
            and item.name not in weights | index_names | NOT_COPIED
            and not SKIPPED_FILES.match(item.name)
            and not (staging / item.name).exists()
        ):
            shutil.copy2(item, staging / item.name)
    config_path = staging / "config.json"
    if dtype is not None and config_path.is_file():
        config = json.loads(config_path.read_text())
        name = str(dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = name
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
