"""Cooking a soup of LoRA adapters: the one function `SoupBuilder.cook` calls for adapter ingredients."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from .. import comparison
from ..checkpoint import CheckpointReader, parse_dtype
from ..compat import check_configs
from ..errors import SoupError
from ..merge import device_record
from ..methods.registry import Declaration
from ..preparation import Located, Selection, prepare_scorer
from ..recipe import Recipe, lookup
from ..scoring import Scorer
from ..soup import Soup, copy_side_files, staged_soup
from .reading import Adapter, check_against_base, check_same_base, read_adapter, resolve_base
from .tasting import AdapterTasting
from .writing import OUTPUTS, full_names, unit_names, write_adapter, write_merged

logger = logging.getLogger(__name__)
LINEAR_METHODS = ("uniform", "weighted")


def cook_adapters(
    recipe: Recipe,
    located: list[Located],
    target: Path,
    *,
    overwrite: bool,
    progress: bool,
    scorer: Scorer | None = None,
) -> Soup:
    """Cook `recipe` over peft LoRA adapters into `target`; returns a `Soup`.

    The weights come from the method (`uniform`, `weighted`) or the strategy (`greedy`, `learned`, tasted on one base
    model holding every adapter); the soup is written as `adapter_output` says: `concat` (default, exact),
    `svd` (rank `rank`, error reported), `merged` (a full model) or `naive` (A and B averaged: an approximation).
    """
    declared, output = _check_recipe(recipe, located)
    count = len(located)
    parameters = declared.bind(recipe.parameters, count, source=recipe.source)
    dtype = parse_dtype(recipe.dtype) if recipe.dtype else None
    with contextlib.ExitStack() as stack:
        adapters = []
        for ingredient, folder in located:
            adapters.append(read_adapter(folder, ingredient.id, allow_pickle=recipe.allow_pickle))
            stack.callback(adapters[-1].reader.close)
        base_folder = _base_folder(recipe, declared, adapters, output)
        base = None
        if base_folder is not None:  # its config and tokenizer, like a full soup's ingredients: no custom code unasked
            check_configs([Path(base_folder)], ["base_model"], trust_remote_code=recipe.trust_remote_code)
            base = stack.enter_context(
                CheckpointReader(base_folder, allow_pickle=recipe.allow_pickle, label="base_model")
            )
            check_against_base(adapters, base)
        sections: dict[str, Any] = {}
        if declared.kind == "strategy":
            result, sections = choose(recipe, declared, parameters, located, adapters, base_folder, scorer)
            coefficients = result.coefficients(count)
            weights = coefficients if not callable(coefficients) else result.record.get("alpha_mean")
        else:
            weights = declared.mixing(parameters, count)
            coefficients = weights
        base_name = str(base_folder) if base_folder is not None else adapters[0].base_name
        with staged_soup(target, located, recipe, overwrite=overwrite) as staging:
            if staging is None:  # under accelerate launch, only the main process writes
                return Soup(target, {"method": declared.name, **sections})
            if output == "merged":
                files = write_merged(
                    staging.folder,
                    adapters,
                    coefficients,
                    base,
                    dtype=dtype,
                    max_shard_size=recipe.max_shard_size,
                    progress=progress,
                )
                approximation = {"adapter_output": "merged"}
                copy_side_files(base_folder, staging.folder, dtype)
            else:
                files, approximation = write_adapter(
                    staging.folder,
                    adapters,
                    coefficients,
                    output=output,
                    rank=recipe.rank,
                    base=base,
                    base_name=base_name,
                    dtype=dtype,
                )
                copy_side_files(adapters[0].folder, staging.folder, None)
            record = staging.finish(
                declared.name,
                parameters,
                weights=weights,
                notes=_notes(adapters, weights, output, approximation),
                files=files,
                base_model=base_name,
                adapters={a.label: a.summary() for a in adapters},
                device=device_record(recipe.device, torch.device("cpu")),
                **approximation,
                **sections,
            )
    logger.info("adapter soup written to %s", target)
    return Soup(target, record)


def _check_recipe(recipe: Recipe, located: list[Located]) -> tuple[Declaration, str]:
    """The recipe's method or strategy and its adapter output, refused when adapters cannot be souped that way."""
    full = [ingredient.id for ingredient, _ in located if ingredient.kind != "adapter"]
    if full:
        raise SoupError(
            f"ingredients {', '.join(full)} are full models but the others are peft adapters; soup adapters with "
            "adapters, or merge each adapter into its base first (merge_and_unload) and soup full models"
        )
    declared = lookup(recipe.method)
    if declared.kind != "strategy" and declared.name not in LINEAR_METHODS:
        raise SoupError(
            f"{recipe.source}: method {declared.name!r} is not available for LoRA adapters; use uniform, weighted, "
            "greedy or learned (the exact soup Σᵢ wᵢ sᵢ Bᵢ Aᵢ is linear in the adapters)"
        )
    if (recipe.device or "").startswith("cuda"):
        raise SoupError(
            f"{recipe.source}: device: {recipe.device} runs the merge math of full-model soups; a soup of LoRA "
            "adapters is linear in the adapters and is computed on the CPU: remove `device:` or set device: auto"
        )
    output = recipe.adapter_output or "concat"
    if output == "svd" and recipe.rank is None:
        raise SoupError(f"{recipe.source}: adapter_output: svd needs `rank:` (the rank of the compressed adapter)")
    return declared, output


def _base_folder(recipe: Recipe, declared: Declaration, adapters: list[Adapter], output: str) -> Path | None:
    """The base model's folder (`base_model:` or the adapters' `base_model_name_or_path`); refused when the soup
    needs it and it cannot be found."""
    check_same_base(adapters, recipe.base_model)
    named = next((a.base_name for a in adapters if a.base_name), None)
    base_folder = recipe.base_model or resolve_base(named)
    partial_heads = [n for n in full_names(adapters) if not all(n in a.full for a in adapters)]
    if base_folder is None and (output == "merged" or declared.kind == "strategy" or partial_heads):
        why = (
            "adapter_output: merged writes base + soup"
            if output == "merged"
            else f"strategy {declared.name!r} scores the soup on the base model"
            if declared.kind == "strategy"
            else f"{partial_heads[0]} is missing from some adapters and its base value stands in"
        )
        raise SoupError(
            f"{why}, so the base model folder is needed: set `base_model:` in the recipe (adapter_config.json of "
            f"{adapters[0].label} names {named!r}, which is not a local folder or cached model)"
        )
    return base_folder


def _notes(adapters: list[Adapter], weights, output: str, approximation: dict[str, Any]) -> list[str]:
    notes = []
    if isinstance(weights, list) and abs(sum(weights) - 1.0) > 1e-6:
        notes.append(
            f"weights sum to {sum(weights):.6g}, not 1: the adapter soup is base + Σ wᵢ ΔWᵢ (heads Σ wᵢ Hᵢ), which "
            "differs from the full-model soup Σ wᵢ θᵢ"
        )
    if output == "naive":
        notes.append(
            f"adapter_output naive averages A and B separately: NOT the soup of the adapters, relative error "
            f"{approximation['relative_error']:.4g} (peft issues #2796, #2918, #3004, #3761)"
        )
    if output == "svd":
        notes.append(
            f"SVD-compressed to rank {approximation['rank']}: relative error {approximation['relative_error']:.4g}"
        )
    if (
        len({a.config.get("use_rslora", False) for a in adapters}) > 1
        or len({m.scaling for a in adapters for m in a.modules.values()}) > 1
    ):
        notes.append("adapters have different scalings (ranks, alphas or rsLoRA): each keeps its own in the soup")
    for note in notes:
        logger.log(logging.INFO if note.startswith("adapters have") else logging.WARNING, note)
    return notes


def choose(recipe: Recipe, strategy, parameters, located, adapters, base_folder, scorer):
    """Run a strategy on one base model holding every adapter; returns its result and the record (as the builder
    does for full models)."""
    scorer = prepare_scorer(recipe, Path(base_folder), located[0].folder, scorer=scorer)
    _check_task(adapters, scorer)
    selection = Selection.of(recipe.evaluation, scorer)
    with AdapterTasting(
        [ingredient for ingredient, _ in located],
        adapters,
        Path(base_folder),
        scorer,
        selection.split,
        reuse_recorded=selection.reuse_recorded,
        trust_remote_code=recipe.trust_remote_code,
        dtype=parse_dtype(selection.dtype),
        **selection.placement,
    ) as tasting:
        units, tasted = set(unit_names(adapters)), set(tasting.groups("layer"))
        if units != tasted:  # the coefficients found per unit must reach every unit that is written
            odd = sorted(units ^ tasted)
            raise SoupError(
                f"the adapter files and the peft model disagree on the souped modules ({odd[:3]}); "
                "save the adapters again with this peft version"
            )
        return comparison.choose(
            strategy,
            parameters,
            tasting,
            seed=recipe.seed,
            report_splits=selection.report_splits,
            compared=selection.compared,
        )


def _check_task(adapters: list[Adapter], scorer) -> None:
    expected = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM", "causal-generation": "CAUSAL_LM"}.get(
        scorer.task.name
    )
    task_type = adapters[0].config.get("task_type")
    if expected and task_type and task_type != expected:
        raise SoupError(
            f"the adapters were trained with task_type {task_type} but evaluation.task is {scorer.task.name!r}; set "
            "evaluation.task to the adapters' task"
        )


__all__ = ["OUTPUTS", "cook_adapters", "choose"]
