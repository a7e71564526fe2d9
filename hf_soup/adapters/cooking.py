"""Cooking a soup of LoRA adapters: the one function `SoupBuilder.cook` calls for adapter ingredients."""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import comparison
from ..atomic import staged_folder, write_json
from ..card import explain_soup
from ..checkpoint import CheckpointReader, parse_dtype
from ..compat import check_configs
from ..errors import SoupError
from ..ingredient import Ingredient
from .reading import Adapter, check_against_base, check_same_base, read_adapter, resolve_base
from .writing import OUTPUTS, full_names, unit_names, write_adapter, write_merged

logger = logging.getLogger(__name__)
LINEAR_METHODS = ("uniform", "weighted")


def cook_adapters(
    builder, found: list[tuple[Ingredient, Path]], target: Path, *, overwrite: bool, progress: bool, scorer=None
):
    """Cook the recipe of `builder` over peft LoRA adapters into `target`; returns a `Soup`.

    The weights come from the method (`uniform`, `weighted`) or the strategy (`greedy`, `learned`, tasted on one base
    model holding every adapter); the soup is written as `adapter_output` says: `concat` (default, exact),
    `svd` (rank `rank`, error reported), `merged` (a full model) or `naive` (A and B averaged: an approximation).
    """
    from ..builder import Soup, _ingredient_digests
    from ..recipe import lookup
    from ..scoring import process_state

    recipe = builder.recipe
    full = [ingredient.id for ingredient, _ in found if ingredient.kind != "adapter"]
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
    output = recipe.adapter_output or "concat"
    if output == "svd" and recipe.rank is None:
        raise SoupError(f"{recipe.source}: adapter_output: svd needs `rank:` (the rank of the compressed adapter)")
    count = len(found)
    parameters = declared.bind(recipe.parameters, count, source=recipe.source)
    dtype = parse_dtype(recipe.dtype) if recipe.dtype else None
    with contextlib.ExitStack() as stack:
        adapters = []
        for ingredient, folder in found:
            adapters.append(read_adapter(folder, ingredient.id, allow_pickle=recipe.allow_pickle))
            stack.callback(adapters[-1].reader.close)
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
        if base_folder is not None:  # its config and tokenizer, like a full soup's ingredients: no custom code unasked
            check_configs([Path(base_folder)], ["base_model"], trust_remote_code=recipe.trust_remote_code)
        base = (
            stack.enter_context(CheckpointReader(base_folder, allow_pickle=recipe.allow_pickle, label="base_model"))
            if base_folder is not None
            else None
        )
        if base is not None:
            check_against_base(adapters, base)
        extra: dict[str, Any] = {}
        if declared.kind == "strategy":
            result, extra = choose(builder, declared, parameters, found, adapters, base_folder, scorer)
            coefficients = result.coefficients(count)
            weights = coefficients if not callable(coefficients) else result.record.get("alpha_mean")
        else:
            weights = declared.mixing(parameters, count)
            coefficients = weights
        state = process_state()
        if not state.is_main_process:
            state.wait_for_everyone()
            return Soup(target, {"method": declared.name, **extra})
        hasher = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_soup-sha256"))
        digests = hasher.submit(_ingredient_digests, found, recipe.allow_pickle)
        base_name = str(base_folder) if base_folder is not None else adapters[0].base_name
        with staged_folder(target, overwrite=overwrite) as staging:
            if output == "merged":
                files = write_merged(
                    staging,
                    adapters,
                    coefficients,
                    base,
                    dtype=dtype,
                    max_shard_size=recipe.max_shard_size,
                    progress=progress,
                )
                approximation = {"adapter_output": "merged"}
                _copy_side_files(base_folder, staging, dtype)
            else:
                files, approximation = write_adapter(
                    staging,
                    adapters,
                    coefficients,
                    output=output,
                    rank=recipe.rank,
                    base=base,
                    base_name=base_name,
                    dtype=dtype,
                )
                _copy_side_files(adapters[0].folder, staging, None)
            notes = _notes(adapters, weights, output, approximation)
            record = builder._record(found, digests.result(), declared, parameters, weights, notes, files)
            record.update(
                base_model=base_name, adapters={a.label: a.summary() for a in adapters}, **approximation, **extra
            )
            write_json(staging / "soup.json", record)
            explain_soup(staging, output=target)  # the model card, part of the same atomic rename
        state.wait_for_everyone()
    logger.info("adapter soup written to %s", target)
    return Soup(target, record)


def _copy_side_files(source: Path, staging: Path, dtype) -> None:
    from ..builder import _copy_side_files as copy

    copy(source, staging, dtype)


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


def choose(builder, strategy, parameters, found, adapters, base_folder, scorer):
    """Run a strategy on one base model holding every adapter; returns its result and the record (as the builder
    does for full models)."""
    from ..builder import _tokenizer
    from .tasting import AdapterTasting

    recipe = builder.recipe
    evaluation = recipe.evaluation
    if scorer is None:
        if evaluation is None:
            raise SoupError(f"strategy {strategy.name!r} needs an `evaluation:` section or a scorer")
        tokenizer = next((t for t in (_tokenizer(Path(base_folder)), _tokenizer(found[0][1])) if t is not None), None)
        scorer = evaluation.scorer(tokenizer)
    _check_task(adapters, scorer)
    selection = evaluation.selection_split if evaluation else next(iter(scorer.splits))
    report_splits = evaluation.report_splits if evaluation else [s for s in scorer.splits if s != selection]
    compared = evaluation.compare if evaluation else ["uniform", "ensemble"]
    options = evaluation.placement() if evaluation else {}
    with AdapterTasting(
        [ingredient for ingredient, _ in found],
        adapters,
        Path(base_folder),
        scorer,
        selection,
        reuse_recorded=evaluation.reuse_recorded_scores if evaluation else True,
        trust_remote_code=recipe.trust_remote_code,
        **options,
    ) as tasting:
        units, tasted = set(unit_names(adapters)), set(tasting.groups("layer"))
        if units != tasted:  # the coefficients found per unit must reach every unit that is written
            odd = sorted(units ^ tasted)
            raise SoupError(
                f"the adapter files and the peft model disagree on the souped modules ({odd[:3]}); "
                "save the adapters again with this peft version"
            )
        return comparison.choose(
            strategy, parameters, tasting, seed=recipe.seed, report_splits=report_splits, compared=compared
        )


def _check_task(adapters: list[Adapter], scorer) -> None:
    expected = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}.get(scorer.task.name)
    task_type = adapters[0].config.get("task_type")
    if expected and task_type and task_type != expected:
        raise SoupError(
            f"the adapters were trained with task_type {task_type} but evaluation.task is {scorer.task.name!r}; set "
            "evaluation.task to the adapters' task"
        )


__all__ = ["OUTPUTS", "cook_adapters", "choose"]
