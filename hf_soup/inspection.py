"""Inspecting ingredients before cooking: do they fit together, how far apart are they, do they share a base?

Everything is streamed: one tensor of each ingredient (and of the base) at a time, in flat chunks, so memory does
not grow with the model. The geometry is the Gram matrix of the task vectors τᵢ = θᵢ − θ_ref summed over every
floating tensor, with θ_ref the base model when given, else the ingredients' mean; angles, cosines and L2 distances
all follow from it.

Example:

```python
>>> report = inspect_ingredients(["runs/a/best", "runs/b/best", "runs/c/best"], base="bert-base-local")
>>> print(report.text())
>>> report.warnings   # e.g. ["ingredients a and c do not share a base: ..."]
```
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import FLOAT_DTYPES, CheckpointReader
from .compat import check_configs
from .errors import SoupError
from .ingredient import config_hash, detect_kind, folder_labels
from .jsonfile import check_model_files, read_model_file
from .merge import plan_soup

logger = logging.getLogger(__name__)

MIN_WEIGHT_COSINE = 0.2  # fine-tunes of one base: > 0.9 (fresh heads aside); independently initialised weights: ≈ 0
CHUNK = 1 << 22  # elements per chunk, all ingredients together: a few × 32 MB in float64 whatever k and the size


@dataclass
class Geometry:
    """Pairwise geometry of task vectors τᵢ = θᵢ − θ_ref (every floating tensor, flattened and concatenated).

    Attributes:
        labels (`list[str]`): one per ingredient.
        reference (`str`): `"base model"` or `"mean of the ingredients"`.
        gram (`list[list[float]]`): ⟨τᵢ, τⱼ⟩.
        cosine, angle (`list[list[float]]`): cos(τᵢ, τⱼ) and the angle in degrees (NaN where a τ is zero).
        l2 (`list[list[float]]`): ‖θᵢ − θⱼ‖ (the same whatever the reference).
        weight_cosine (`list[list[float]]`): median over weight matrices of the cosine of the raw weights; with a
            base, one more row and column for it. Far below 1 means the two do not come from one pretrained model.
        tensors (`int`): how many tensors were compared.
    """

    labels: list[str]
    reference: str
    gram: list[list[float]]
    cosine: list[list[float]]
    angle: list[list[float]]
    l2: list[list[float]]
    weight_cosine: list[list[float]]
    tensors: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (NaN becomes `None`)."""

        def clean(matrix):
            return [[None if math.isnan(v) else v for v in row] for row in matrix]

        return {
            "ids": self.labels,
            "reference": self.reference,
            "cosine": clean(self.cosine),
            "angle": clean(self.angle),
            "l2": self.l2,
            "weight_cosine": clean(self.weight_cosine),
            "tensors": self.tensors,
        }


def task_vector_geometry(
    readers: Sequence[CheckpointReader],
    base: CheckpointReader | None = None,
    *,
    labels: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
) -> Geometry:
    """Stream the ingredients once and return their task-vector `Geometry` (vs `base`, else vs their mean).

    Args:
        readers (`list[CheckpointReader]`): the ingredients.
        base (`CheckpointReader`, *optional*): the model they were fine-tuned from.
        labels (`list[str]`, *optional*): names of the ingredients (defaults to the readers' labels).
        names (`list[str]`, *optional*): the tensors to compare (defaults to the first ingredient's floating tensors).
    """
    k = len(readers)
    labels = list(labels) if labels is not None else [reader.label for reader in readers]
    names = [n for n in (names or readers[0].names()) if readers[0].info(n).dtype in FLOAT_DTYPES]
    gram = torch.zeros(k, k, dtype=torch.float64)
    per_matrix: list[torch.Tensor] = []  # raw-weight cosines of each weight matrix (base as a last row)
    per_tensor: list[torch.Tensor] = []
    for name in names:
        flats = [reader.get(name).reshape(-1) for reader in readers]
        base_flat = base.get(name).reshape(-1) if base is not None else None
        raw = torch.zeros(k + (base is not None), k + (base is not None), dtype=torch.float64)
        step = max(1 << 12, CHUNK // (k + 1))  # so the float64 temporaries do not grow with k
        for start in range(0, flats[0].numel(), step):
            stacked = torch.stack([flat[start : start + step].double() for flat in flats])
            reference = base_flat[start : start + step].double() if base_flat is not None else stacked.mean(0)
            everything = torch.cat([stacked, reference[None]]) if base_flat is not None else stacked
            raw += _gram(everything)
            gram += _gram(stacked - reference)
        norms = raw.diagonal().sqrt()
        cosine = raw / (norms[:, None] * norms[None, :])
        (per_matrix if len(readers[0].info(name).shape) >= 2 else per_tensor).append(cosine)
        del flats, base_flat
    chosen = per_matrix or per_tensor
    size = k + (base is not None)
    weight_cosine = [[_median([float(c[i, j]) for c in chosen]) for j in range(size)] for i in range(size)]
    norms = gram.diagonal().sqrt()
    cosine = [[_cosine(gram, norms, i, j) for j in range(k)] for i in range(k)]
    angle = [
        [0.0 if i == j else math.degrees(math.acos(max(-1.0, min(1.0, c)))) for j, c in enumerate(row)]
        for i, row in enumerate(cosine)
    ]
    l2 = [
        [0.0 if i == j else math.sqrt(max(0.0, float(gram[i, i] + gram[j, j] - 2 * gram[i, j]))) for j in range(k)]
        for i in range(k)
    ]
    return Geometry(
        labels=labels,
        reference="base model" if base is not None else "mean of the ingredients",
        gram=gram.tolist(),
        cosine=cosine,
        angle=angle,
        l2=l2,
        weight_cosine=weight_cosine,
        tensors=len(names),
    )


def _gram(rows: torch.Tensor) -> torch.Tensor:
    """rows @ rows.T by pairwise dot products (a small-matrix GEMM can be far slower on busy CPUs)."""
    count = rows.shape[0]
    out = torch.empty(count, count, dtype=torch.float64)
    for i in range(count):
        for j in range(i, count):
            out[i, j] = out[j, i] = torch.dot(rows[i], rows[j])
    return out


def _median(values: list[float]) -> float:
    values = [value for value in values if not math.isnan(value)]
    return statistics.median(values) if values else math.nan


def _cosine(gram: torch.Tensor, norms: torch.Tensor, i: int, j: int) -> float:
    if norms[i] == 0 or norms[j] == 0:
        return math.nan
    if i == j:
        return 1.0
    value = float(gram[i, j] / (norms[i] * norms[j]))
    return max(-1.0, min(1.0, value))


@dataclass
class Inspection:
    """What `inspect_ingredients` found.

    Attributes:
        labels, folders, kinds, config_hashes (`list`): one per ingredient.
        parameters (`list[int]`): floating parameters of each ingredient (elements).
        geometry (`Geometry`, *optional*): task-vector angles and distances (`None` when not computable).
        problems (`list[str]`): why a soup of them cannot be cooked (empty when compatible).
        warnings (`list[str]`): e.g. that ingredients do not share a base.
        notes (`list[str]`): what to keep in mind reading the numbers.
    """

    labels: list[str]
    folders: list[str]
    kinds: list[str]
    config_hashes: list[str | None]
    parameters: list[int]
    geometry: Geometry | None
    base: str | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def compatible(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ingredients": [
                {"id": label, "path": folder, "kind": kind, "config_hash": digest, "parameters": count}
                for label, folder, kind, digest, count in zip(
                    self.labels, self.folders, self.kinds, self.config_hashes, self.parameters
                )
            ],
            "base": self.base,
            "compatible": self.compatible,
            "problems": self.problems,
            "warnings": self.warnings,
            "notes": self.notes,
            "task_vectors": self.geometry.to_dict() if self.geometry is not None else None,
        }

    def text(self) -> str:
        """A plain-text report (what `hf-soup inspect` prints)."""
        rows = [
            [label, kind, f"{count:,}", digest or "-"]
            for label, kind, count, digest in zip(self.labels, self.kinds, self.parameters, self.config_hashes)
        ]
        parts = [_table(["ingredient", "kind", "parameters", "config hash"], rows)]
        parts.append("compatible: " + ("yes (same architecture, tensors and shapes)" if self.compatible else "NO"))
        parts.extend(f"problem: {problem}" for problem in self.problems)
        geometry = self.geometry
        if geometry is not None:
            labels = geometry.labels
            parts.append(f"\ntask-vector angles in degrees (vs the {geometry.reference}, {geometry.tensors} tensors)")
            parts.append(
                _table(["", *labels], [[a, *(_number(v, 1) for v in row)] for a, row in zip(labels, geometry.angle)])
            )
            parts.append("\nL2 distances ‖θi − θj‖")
            parts.append(
                _table(["", *labels], [[a, *(_number(v, 4) for v in row)] for a, row in zip(labels, geometry.l2)])
            )
        parts.extend(f"note: {note}" for note in self.notes)
        parts.extend(f"warning: {warning}" for warning in self.warnings)
        return "\n".join(parts)


def _number(value: float, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    cells = [headers, *rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def inspect_ingredients(
    folders: Sequence[str | os.PathLike],
    base: str | os.PathLike | None = None,
    *,
    labels: Sequence[str] | None = None,
    min_weight_cosine: float = MIN_WEIGHT_COSINE,
    allow_pickle: bool = False,
) -> Inspection:
    """Check that ingredients can be souped and measure how far apart they are, streaming tensor by tensor.

    Args:
        folders (`list` of paths): model (or adapter) folders.
        base (`str`, *optional*): the model they were fine-tuned from; task vectors are taken against it (else
            against the ingredients' mean).
        labels (`list[str]`, *optional*): names to show (defaults to the folder names, lengthened by their parent
            folders where two share a name: `folder_labels`).
        min_weight_cosine (`float`, *optional*, defaults to 0.2): below this median cosine of two ingredients' weight
            matrices, they are reported as not sharing a base.
        allow_pickle (`bool`, *optional*, defaults to `False`): read `pytorch_model.bin` weights.
    """
    paths = [Path(folder) for folder in folders]
    if not paths:
        raise SoupError("inspect needs at least one ingredient folder")
    base_path = Path(base) if base is not None else None
    if labels is None:
        labels = folder_labels(paths, reserved=["base"] if base_path is not None else [])
    labels = list(labels)
    for path, label in [*zip(paths, labels), *([(base_path, "base")] if base_path is not None else [])]:
        if path.is_dir():  # a wrong-shaped JSON file is an error, not an incompatibility to report
            check_model_files(path, label=f"ingredient {label}: " if label != "base" else "base: ")
    with contextlib.ExitStack() as stack:
        readers = [
            stack.enter_context(CheckpointReader(path, allow_pickle=allow_pickle, label=label))
            for path, label in zip(paths, labels)
        ]
        base_reader = (
            stack.enter_context(CheckpointReader(base_path, allow_pickle=allow_pickle, label="base"))
            if base_path is not None
            else None
        )
        report = Inspection(
            labels=labels,
            folders=[str(path) for path in paths],
            kinds=[detect_kind(path) for path in paths],
            config_hashes=[config_hash(path) for path in paths],
            parameters=[sum(math.prod(i.shape) for i in r.infos() if i.dtype in FLOAT_DTYPES) for r in readers],
            geometry=None,
            base=str(base_path) if base_path is not None else None,
        )
        try:
            check_configs(paths + ([base_path] if base_path else []), labels + (["base"] if base_path else []))
            plan_soup(readers, base=base_reader)
        except SoupError as error:
            report.problems.append(str(error))
        _check_bases(report, paths, base_path)
        if "adapter" in report.kinds:
            report.notes.append("task-vector angles are not computed for adapters (a LoRA task vector is B·A)")
            return report
        shared = _shared_names([*readers, *([base_reader] if base_reader else [])])
        if not shared:
            return report
        report.geometry = task_vector_geometry(readers, base_reader, labels=labels, names=shared)
    _check_distances(report, min_weight_cosine)
    if len(paths) == 2 and base_path is None:
        report.notes.append(
            "with two ingredients and no base, task vectors vs their mean are opposite (180°); "
            "pass the base model (--base DIR) for meaningful angles"
        )
    for warning in report.warnings:
        logger.warning(warning)
    return report


def _shared_names(readers: Sequence[CheckpointReader]) -> list[str]:
    """Floating tensors every reader has, with the same shape."""
    first = readers[0]
    return [
        name
        for name in first.names()
        if first.info(name).dtype in FLOAT_DTYPES
        and all(name in r and r.info(name).shape == first.info(name).shape for r in readers[1:])
    ]


def _check_bases(report: Inspection, paths: list[Path], base: Path | None) -> None:
    """Warn when config hashes (or adapters' declared bases) differ."""
    hashes = {h for h in report.config_hashes if h is not None}
    if base is not None and config_hash(base) is not None and "adapter" not in report.kinds:
        hashes.add(config_hash(base))
    if len(hashes) > 1:
        listed = ", ".join(f"{label}: {digest}" for label, digest in zip(report.labels, report.config_hashes))
        report.warnings.append(
            f"ingredients do not share a base: their configs differ beyond what fine-tuning changes (config hash "
            f"{listed}); soup only fine-tunes of one pretrained model"
        )
    if "adapter" in report.kinds:
        declared = {}
        for label, path in zip(report.labels, paths):
            config = read_model_file(path, "adapter_config.json", label=f"ingredient {label}: ")
            if config is not None:
                declared[label] = config.get("base_model_name_or_path")
        if len(set(declared.values())) > 1:
            report.warnings.append(
                f"adapters name different base models ({', '.join(f'{k}: {v}' for k, v in declared.items())}); "
                "they do not share a base, so a soup of them is not meaningful"
            )


def _check_distances(report: Inspection, threshold: float) -> None:
    """Warn about pairs whose weights are far apart (median cosine of the weight matrices below `threshold`)."""
    geometry = report.geometry
    names = [*report.labels, *(["base"] if report.base is not None else [])]
    far = [
        (names[i], names[j], geometry.weight_cosine[i][j])
        for i in range(len(names))
        for j in range(i + 1, len(names))
        if geometry.weight_cosine[i][j] < threshold
    ]
    for a, b, value in far:
        report.warnings.append(
            f"{a} and {b} do not share a base: their weights are far apart (median cosine of the weight matrices "
            f"{value:.3f} < {threshold}); fine-tune every ingredient from the same pretrained model"
        )
