"""Writing an adapter soup: a peft adapter folder (concatenated rank, SVD-compressed, or the naive A/B average), or
the soup merged into the base model's weights, streamed tensor by tensor.

The soup of adapters i = 1..k with weights wᵢ is ΔW = Σᵢ wᵢ sᵢ Bᵢ Aᵢ for every module (a module an adapter does not
target contributes nothing), and Σᵢ wᵢ Hᵢ for every full tensor (`modules_to_save`, e.g. a classifier head; the base
tensor stands in for an adapter that did not train it). With Σ wᵢ = 1 this is exactly the soup of the k merged models.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_json
from ..checkpoint import FLOAT_DTYPES, CheckpointReader, TensorInfo
from ..errors import SoupError
from ..writer import CheckpointWriter
from .algebra import concat_factors, delta_weight, difference_squared, naive_factors, norm_squared, truncated_svd
from .reading import PREFIX, Adapter, LoraModule

OUTPUTS = ("concat", "svd", "merged", "naive")
Coefficients = Sequence[float] | Callable[[str], Sequence[float]]
ONE_FILE = 1 << 60  # peft loads a single adapter_model.safetensors, never shards


def module_names(adapters: Sequence[Adapter]) -> list[str]:
    """Every LoRA module of any adapter, in order of first appearance."""
    return list(dict.fromkeys(name for adapter in adapters for name in adapter.modules))


def full_names(adapters: Sequence[Adapter]) -> list[str]:
    """Every full tensor (`modules_to_save`) of any adapter, in order of first appearance."""
    return list(dict.fromkeys(name for adapter in adapters for name in adapter.full))


def unit_names(adapters: Sequence[Adapter]) -> list[str]:
    """What a coefficient can be given for: LoRA modules (by module name) and full tensors (by tensor name)."""
    return [*module_names(adapters), *full_names(adapters)]


def weights_for(coefficients: Coefficients, name: str) -> list[float]:
    return [float(w) for w in (coefficients(name) if callable(coefficients) else coefficients)]


def contributions(adapters: Sequence[Adapter], name: str, weights: Sequence[float]) -> list[tuple[int, LoraModule]]:
    """(index, module) of the adapters that target module `name` with a non-zero weight."""
    return [(i, a.modules[name]) for i, a in enumerate(adapters) if name in a.modules and weights[i] != 0]


def read_factors(adapters: Sequence[Adapter], found: Sequence[tuple[int, LoraModule]]) -> list[tuple[Any, Any]]:
    """fp32 (A, B) of each contribution (fresh tensors: never views of a file mapping)."""
    return [
        (adapters[i].reader.get(m.a_key).float().clone(), adapters[i].reader.get(m.b_key).float().clone())
        for i, m in found
    ]


def exact_factors(adapters: Sequence[Adapter], name: str, weights: Sequence[float]):
    """The exact soup of module `name` as one concatenated pair (A, B) with B A = Σᵢ wᵢ sᵢ Bᵢ Aᵢ, or `None`."""
    found = contributions(adapters, name, weights)
    if not found:
        return None
    return concat_factors(read_factors(adapters, found), [weights[i] * m.scaling for i, m in found])


def mixed_full(
    adapters: Sequence[Adapter], name: str, weights: Sequence[float], base: CheckpointReader | None
) -> torch.Tensor:
    """Σᵢ wᵢ Hᵢ for a full tensor; the base tensor stands in for adapters that did not train it."""
    out = None
    for adapter, weight in zip(adapters, weights):
        if weight == 0:
            continue
        if name in adapter.full:
            tensor = adapter.reader.get(adapter.full[name]).float()
        elif base is not None and name in base:
            tensor = base.get(name).float()
        else:
            raise SoupError(
                f"ingredient {adapter.label} did not train {name}, which other adapters save (modules_to_save); its "
                "value is the base model's, so give the base model folder (`base_model:`)"
            )
        out = tensor * weight if out is None else out.add_(tensor, alpha=weight)
    holder = next(a for a in adapters if name in a.full)
    return out if out is not None else torch.zeros(holder.reader.info(holder.full[name]).shape)


def _require_matrix(module: LoraModule, output: str) -> None:
    if module.kind == "conv":
        raise SoupError(
            f"module {module.name} is a convolution LoRA; adapter_output {output!r} supports linear and embedding "
            "modules only: use adapter_output: concat (exact)"
        )


def _keys(module: LoraModule) -> tuple[str, str]:
    if module.kind == "embedding":
        return f"{PREFIX}{module.name}.lora_embedding_A", f"{PREFIX}{module.name}.lora_embedding_B"
    return f"{PREFIX}{module.name}.lora_A.weight", f"{PREFIX}{module.name}.lora_B.weight"


def plan_adapter(
    adapters: Sequence[Adapter], coefficients: Coefficients, output: str, rank: int | None, dtype: torch.dtype
) -> tuple[list[TensorInfo], list[tuple[str, Any]], dict[str, int]]:
    """Output tensors of an adapter soup (names, shapes) in write order, what makes each, and each module's rank."""
    infos: list[TensorInfo] = []
    jobs: list[tuple[str, Any]] = []
    ranks: dict[str, int] = {}
    for name in module_names(adapters):
        weights = weights_for(coefficients, name)
        found = contributions(adapters, name, weights)
        if not found:
            continue
        first = found[0][1]
        reader = adapters[found[0][0]].reader
        a_shape, b_shape = reader.info(first.a_key).shape, reader.info(first.b_key).shape
        total = sum(m.rank for _, m in found)
        if output == "concat":
            out_rank = total
        else:
            _require_matrix(first, output)
            if output == "svd":
                out_rank = min(rank, total, a_shape[1], b_shape[0])
            else:
                if len({m.rank for _, m in found}) > 1:
                    ranks_seen = {adapters[i].label: m.rank for i, m in found}
                    raise SoupError(
                        f"adapter_output naive averages A and B separately, which needs one rank per module, but "
                        f"module {name} has ranks {ranks_seen}; use the exact soup (adapter_output: concat, merged, "
                        "or svd with rank:)"
                    )
                out_rank = first.rank
        ranks[name] = out_rank
        a_key, b_key = _keys(first)
        infos += [
            TensorInfo(a_key, (out_rank, *a_shape[1:]), dtype),
            TensorInfo(b_key, (b_shape[0], out_rank, *b_shape[2:]), dtype),
        ]
        jobs.append(("module", (name, weights, found, first)))
    for name in full_names(adapters):
        holder = next(a for a in adapters if name in a.full)
        infos.append(TensorInfo(PREFIX + name, holder.reader.info(holder.full[name]).shape, dtype))
        jobs.append(("full", (name, weights_for(coefficients, name))))
    saved = {}
    for adapter in adapters:
        for name, key in adapter.saved_base.items():
            saved.setdefault(name, (adapter, key))
    for adapter, key in saved.values():
        info = adapter.reader.info(key)
        infos.append(TensorInfo(key, info.shape, info.dtype))
        jobs.append(("copy", (adapter, key)))
    if not ranks:
        raise SoupError("every adapter has weight 0: the soup would be the base model; give some weight > 0")
    return infos, jobs, ranks


def write_adapter(
    folder: Path,
    adapters: Sequence[Adapter],
    coefficients: Coefficients,
    *,
    output: str = "concat",
    rank: int | None = None,
    base: CheckpointReader | None = None,
    base_name: str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[list[Path], dict[str, Any]]:
    """Write the adapter soup into `folder` (a staging folder): `adapter_model.safetensors` + `adapter_config.json`.

    - `"concat"`: exact, rank Σᵢ rᵢ per module: A = [A₁; …; Aₖ], B = [w₁s₁B₁ … wₖsₖBₖ]; written with scaling 1
      (lora_alpha = r), so `PeftModel.from_pretrained` computes B A = Σᵢ wᵢ sᵢ Bᵢ Aᵢ.
    - `"svd"`: the best rank-`rank` approximation of that ΔW per module (exact when `rank` ≥ Σ rᵢ).
    - `"naive"`: A and B averaged separately (peft's `combination_type="linear"`): an approximation, NOT the soup.

    Returns:
        the written files and the approximation record: relative Frobenius error ‖ΔW_written − ΔW‖ / ‖ΔW‖ per module
        and overall (0 for `"concat"`).
    """
    dtype = dtype or adapters[0].reader.info(next(iter(adapters[0].modules.values())).a_key).dtype
    infos, jobs, ranks = plan_adapter(adapters, coefficients, output, rank, dtype)
    errors: dict[str, float] = {}
    error_total = norm_total = 0.0

    def tensors() -> Iterator[torch.Tensor]:
        nonlocal error_total, norm_total
        for kind, job in jobs:
            if kind == "module":
                name, weights, found, _ = job
                factors = read_factors(adapters, found)
                scaled = [weights[i] * m.scaling for i, m in found]
                a, b = concat_factors(factors, scaled)
                if output == "svd":
                    a, b, error, total = truncated_svd(a, b, ranks[name])
                elif output == "naive":
                    exact = (a, b)
                    a, b = naive_factors(factors, scaled)
                    error, total = difference_squared((a, b), exact), norm_squared(*exact)
                else:
                    error, total = 0.0, 0.0
                if output in ("svd", "naive"):
                    errors[name] = math.sqrt(error / total) if total > 0 else 0.0
                    error_total, norm_total = error_total + error, norm_total + total
                yield a
                yield b
            elif kind == "full":
                yield mixed_full(adapters, *job, base)
            else:
                adapter, key = job
                yield adapter.reader.get(key)

    writer = CheckpointWriter(folder, infos, max_shard_size=ONE_FILE, prefix="adapter_model")
    for info, tensor in zip(infos, tensors()):
        writer.write(info.name, tensor.to(info.dtype))
    files = writer.close()
    _write_config(folder, adapters, ranks, base_name)
    record: dict[str, Any] = {"adapter_output": output, "ranks": ranks}
    if output in ("svd", "naive"):
        record["relative_error"] = math.sqrt(error_total / norm_total) if norm_total > 0 else 0.0
        record["relative_error_per_module"] = errors
        if output == "svd":
            record["rank"] = rank
    return [*files, folder / "adapter_config.json"], record


def _write_config(folder: Path, adapters: Sequence[Adapter], ranks: dict[str, int], base_name: str | None) -> None:
    """`adapter_config.json` of the soup: the first adapter's settings, every module at scaling 1 (alpha = r)."""
    common = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): r for name, r in ranks.items() if r != common}
    saved = sorted({m for a in adapters for m in (a.config.get("modules_to_save") or [])})
    config = dict(adapters[0].config)
    config.update(
        r=common,
        lora_alpha=common,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(ranks),
        use_rslora=False,
        init_lora_weights=True,
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        inference_mode=True,
        modules_to_save=saved or None,
        base_model_name_or_path=base_name if base_name is not None else adapters[0].base_name,
    )
    write_json(folder / "adapter_config.json", config)


def write_merged(
    folder: Path,
    adapters: Sequence[Adapter],
    coefficients: Coefficients,
    base: CheckpointReader,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
) -> list[Path]:
    """Write base + the soup as a full model into `folder`, streamed from the base checkpoint tensor by tensor:
    W' = W + Σᵢ wᵢ sᵢ Bᵢ Aᵢ (in fp32, written in the base's dtype or `dtype`), full tensors Σᵢ wᵢ Hᵢ, the rest copied.
    """
    from tqdm.auto import tqdm

    modules = {name + ".weight": name for name in module_names(adapters)}
    fulls = set(full_names(adapters))
    for adapter in adapters:
        for module in adapter.modules.values():
            _require_matrix(module, "merged")
    missing = [name for name in [*modules, *fulls] if name not in base]
    if missing:
        raise SoupError(
            f"the base model {base.label} has no tensor {missing[0]}, which the adapters change; give the base the "
            "adapters were trained on (`base_model:`), saved with the same model class"
        )
    infos = [
        TensorInfo(i.name, i.shape, dtype if dtype is not None and i.dtype in FLOAT_DTYPES else i.dtype)
        for i in base.infos()
    ]
    writer = CheckpointWriter(folder, infos, max_shard_size=max_shard_size, prefix="model")
    for info in tqdm(infos, desc="merging adapter soup", disable=not progress):
        name = info.name
        if name in modules:
            weight = base.get(name).float()
            pair = exact_factors(adapters, modules[name], weights_for(coefficients, modules[name]))
            if pair is not None:
                module = next(a.modules[modules[name]] for a in adapters if modules[name] in a.modules)
                delta = delta_weight(*pair, module.transposed)
                if delta.shape != weight.shape:
                    raise SoupError(
                        f"module {modules[name]}: the adapters' ΔW has shape {list(delta.shape)} but the base weight "
                        f"{list(weight.shape)}; the adapters were trained on another base"
                    )
                weight = weight + delta  # never in place: the base tensor may be a view of the file mapping
            value = weight
        elif name in fulls:
            value = mixed_full(adapters, name, weights_for(coefficients, name), base)
        else:
            value = base.get(name)
        writer.write(name, value.to(info.dtype))
    return writer.close()
