"""Compatibility checks over ingredient headers and configs, done before any output is written.

Everything here reads headers and JSON only; tensor values (NaN/Inf) are checked while streaming, inside the
staging folder, so a failure still leaves no output.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import FLOAT_DTYPES, CheckpointReader, TensorInfo
from .errors import SoupError

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """What the soup will hold: one `TensorInfo` per output tensor, and notes on what was decided."""

    infos: list[TensorInfo]
    notes: list[str] = field(default_factory=list)

    @property
    def largest(self) -> int:
        return max((info.nbytes for info in self.infos), default=0)


def read_config(folder: Path, name: str = "config.json") -> dict | None:
    """`config.json` (or another JSON file) of a model folder as a dict (`None` when absent); bad JSON is a clear
    error."""
    path = folder / name
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except ValueError as error:
        raise SoupError(f"{path} is not valid JSON ({error}); save the model again") from None
    if not isinstance(config, dict):
        raise SoupError(f"{path} must hold a JSON object")
    return config


def check_configs(folders: Sequence[Path], labels: Sequence[str], *, trust_remote_code: bool = False) -> None:
    """Same `model_type` and `architectures` everywhere; remote-code configs (model or tokenizer) only on opt-in."""
    configs = [read_config(folder) for folder in folders]
    first = next(((label, c) for label, c in zip(labels, configs) if c is not None), None)
    for label, config, folder in zip(labels, configs, folders):
        if not trust_remote_code:
            tokenizer = read_config(folder, "tokenizer_config.json")
            for name, found in (("config.json", config), ("tokenizer_config.json", tokenizer)):
                if found is not None and found.get("auto_map"):
                    raise SoupError(
                        f"ingredient {label}: {name} has auto_map (custom code from the model repo); hf_soup runs "
                        "no remote code unless you opt in with trust_remote_code: true"
                    )
        if config is None:
            continue
        if first is None:
            continue
        for key in ("model_type", "architectures"):
            if config.get(key) != first[1].get(key):
                raise SoupError(
                    f"ingredient {label} has {key} {config.get(key)!r} but {first[0]} has {first[1].get(key)!r}; "
                    "a soup needs ingredients fine-tuned from one architecture"
                )


def plan_soup(
    readers: Sequence[CheckpointReader],
    *,
    dtype: torch.dtype | None = None,
    base: CheckpointReader | None = None,
) -> Plan:
    """Check names, shapes and dtypes across ingredients and decide each output tensor's dtype.

    Args:
        readers: one per ingredient, in recipe order.
        dtype: the output dtype for floating tensors; `None` keeps the first ingredient's dtype per tensor.
        base: the base model, when the method needs one (it must have every tensor too).
    """
    if not readers:
        raise SoupError("no ingredients: give at least one model folder (ingredients: [...]) or a pantry")
    first = readers[0]
    names = first.names()
    wanted = set(names)
    for reader in [*readers[1:], *([base] if base is not None else [])]:
        have = set(reader.names())
        missing, extra = sorted(wanted - have), sorted(have - wanted)
        if missing or extra:
            what = f"lacks {_few(missing)}" if missing else f"has extra {_few(extra)}"
            raise SoupError(
                f"ingredient {reader.label} {what} compared with {first.label}; ingredients must have the same "
                "tensors (same architecture, same tied-weight setting, same adapter targets)"
            )
    notes = []
    mixed: set[tuple[torch.dtype, ...]] = set()
    infos = []
    for name in names:
        reference = first.info(name)
        for reader in [*readers[1:], *([base] if base is not None else [])]:
            info = reader.info(name)
            if info.shape != reference.shape:
                raise SoupError(
                    f"ingredient {reader.label}: tensor {name} has shape {list(info.shape)} but {first.label} has "
                    f"{list(reference.shape)}; ingredients must come from one architecture (vocab size, heads, ...)"
                )
            is_float = info.dtype in FLOAT_DTYPES
            if is_float != (reference.dtype in FLOAT_DTYPES):
                raise SoupError(
                    f"ingredient {reader.label}: tensor {name} is {info.dtype} but {first.label} has "
                    f"{reference.dtype}; a tensor must be floating in every ingredient or in none"
                )
            if not is_float and info.dtype != reference.dtype:
                raise SoupError(
                    f"ingredient {reader.label}: non-floating tensor {name} is {info.dtype} but {first.label} "
                    f"has {reference.dtype}"
                )
        if reference.dtype in FLOAT_DTYPES:
            dtypes = tuple(sorted({str(r.info(name).dtype) for r in readers}))
            if len(dtypes) > 1:
                mixed.add(dtypes)
            infos.append(TensorInfo(name, reference.shape, dtype or reference.dtype))
        else:
            infos.append(reference)
    if mixed:
        target = f"{dtype}" if dtype is not None else f"the dtype of {first.label} for each tensor"
        notes.append(
            f"ingredients mix dtypes ({'; '.join(', '.join(m) for m in sorted(mixed))}): every tensor is averaged "
            f"in float32 and written as {target}; set `dtype:` to choose"
        )
    if len(readers) == 1:
        notes.append(f"only one ingredient ({first.label}): the soup is that model")
    for note in notes:
        logger.warning(note)
    return Plan(infos, notes)


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return f"{shown} (+{len(names) - 3} more)" if len(names) > 3 else shown
