"""The ingredient record: one fine-tuned checkpoint and what is known about it, as a pantry's ledger holds it.

`Ingredient.from_dict` checks every field of a record read from a ledger; `config_hash` and `detect_kind` describe a
model or adapter folder. The pantry (`pantry.py`) stores these records; the cooking side reads them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SoupError, brief
from .jsonfile import is_kind, read_model_file

LEDGER = "pantry.json"  # the ledger's file name, named in errors about its records
KINDS = ("full", "adapter")
# Config keys that differ between fine-tunes of one base without making them different models.
VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_commit_hash",
    "architectures",
}


def config_hash(folder: str | os.PathLike) -> str | None:
    """A short hash of `config.json` (or `adapter_config.json`) without the keys that fine-tuning changes.

    Two ingredients from one base have the same hash; `None` when the folder has no config.
    """
    folder = Path(folder)
    for name in ("config.json", "adapter_config.json"):
        if (folder / name).is_file():
            config = read_model_file(folder, name)
            kept = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
            return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]
    return None


def detect_kind(folder: str | os.PathLike) -> str:
    """`"adapter"` for a peft adapter folder, `"full"` for a Transformers model folder."""
    return "adapter" if (Path(folder) / "adapter_config.json").is_file() else "full"


def folder_labels(folders: Sequence[str | os.PathLike], *, reserved: Iterable[str] = ()) -> list[str]:
    """One label per folder that names it unambiguously: its name, lengthened by its parent folders only as far as
    needed to tell it from the other folders (`a/ft_00` and `b/ft_00`) and from the `reserved` labels (`base_model`).

    The one labelling rule for folders given by path: ingredient ids of a recipe's `ingredients:`, `hf-soup inspect`.
    A folder that no suffix tells apart (`/ft` beside `/a/ft`) is labelled by its absolute path.
    """
    reserved = set(reserved)
    paths = [Path(folder).absolute() for folder in folders]
    labels = []
    for path in paths:
        others = [other.parts for other in paths if other != path]  # a folder listed twice keeps one label
        label = str(path)
        for depth in range(1, len(path.parts)):
            suffix = path.parts[-depth:]
            if "/".join(suffix) not in reserved and all(other[-depth:] != suffix for other in others):
                label = "/".join(suffix)
                break
        labels.append(label)
    return labels


@dataclass
class Ingredient:
    """One fine-tuned checkpoint and what is known about it.

    Args:
        id (`str`): unique within its pantry (for a loose folder: the folder name, with as many of its parent folders
            as tell it from the recipe's other folders, see `folder_labels`).
        path (`str`): folder relative to the pantry root (absolute for a loose folder).
        kind (`str`): `"full"` (Transformers model folder) or `"adapter"` (peft adapter folder).
        sha256 (`dict[str, str]`): weight file name → hex sha256.
        metric (`str`, *optional*): name of the metric the run was selected by, e.g. `"eval_accuracy"`.
        value (`float`, *optional*): its value at this checkpoint.
        greater_is_better (`bool`, *optional*): direction of `metric`.
        split (`str`, *optional*): the evaluation split `value` was measured on.
        step (`int`, *optional*): global step of the checkpoint.
        run (`str`, *optional*): run name.
        hyperparameters (`dict`): what made this run differ (learning rate, seed, ...).
        tags (`dict`): user tags.
        base_model (`str`, *optional*), base_revision (`str`, *optional*): what it was fine-tuned from.
        config_hash (`str`, *optional*): see `config_hash`.
        size (`int`): bytes of weights.
        created_at (`str`): ISO 8601 UTC.
    """

    id: str
    path: str
    kind: str = "full"
    sha256: dict[str, str] = field(default_factory=dict)
    metric: str | None = None
    value: float | None = None
    greater_is_better: bool | None = None
    split: str | None = None
    step: int | None = None
    run: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None
    base_revision: str | None = None
    config_hash: str | None = None
    size: int = 0
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The record as the ledger holds it (mappings copied one level; `dataclasses.asdict` copies every level and
        made rewriting a ledger of hundreds of entries several times slower)."""
        return {name: dict(value) if isinstance(value, dict) else value for name, value in vars(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = LEDGER) -> Ingredient:
        """A record read from a ledger, every field checked (a `SoupError` names the field and the fix)."""
        if not isinstance(data, Mapping):
            raise SoupError(f"{source}: an ingredient record must be a mapping, got {type(data).__name__}")
        known = _field_names(cls)
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise SoupError(
                f"{source}: unknown field(s) {brief(', '.join(map(repr, unknown)))} in ingredient "
                f"{brief(data.get('id'))}; known fields: {', '.join(sorted(known))}; remove them or upgrade hf_soup"
            )
        for required in ("id", "path"):
            if not isinstance(data.get(required), str) or not data[required].isprintable() or not data[required]:
                raise SoupError(
                    f"{source}: an ingredient record lacks a non-empty printable string {required!r} (got "
                    f"{brief(data.get(required))}); fix the record or restore {LEDGER} from a backup"
                )
        for name, (check, allowed) in _FIELD_TYPES.items():
            if name in data and not check(data[name]):
                raise SoupError(
                    f"{source}: ingredient {brief(data['id'])} has {name} = {brief(data[name])}; expected "
                    f"{allowed}; fix the record or restore {LEDGER} from a backup"
                )
        values = dict(data)
        if values.get("value") is not None:
            values["value"] = float(values["value"])
        return cls(**values)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, ingredient_id: str | None = None) -> Ingredient:
        """A loose ingredient (not in a pantry): a model or adapter folder given by path, its id `ingredient_id` (by
        default the folder's name; `folder_labels` gives ids that tell same-named folders apart)."""
        folder = Path(folder).absolute()
        kind, digest = detect_kind(folder), config_hash(folder)
        return cls(id=ingredient_id or folder.name, path=str(folder), kind=kind, config_hash=digest)


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


def _file_name(name: str) -> bool:
    return name.isprintable() and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _number(value: Any) -> bool:
    return is_kind(value, "number")  # not a boolean, nor an integer too large for a float


_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "kind": (lambda value: value in KINDS, f"one of {', '.join(map(repr, KINDS))}"),
    "sha256": (
        lambda value: isinstance(value, dict) and all(_file_name(k) and isinstance(v, str) for k, v in value.items()),
        "a mapping of weight file name (in the ingredient's folder) to hex sha256",
    ),
    "metric": (lambda value: value is None or isinstance(value, str), "a string or null"),
    "value": (lambda value: value is None or _number(value), "a number or null"),
    "greater_is_better": (lambda value: value is None or isinstance(value, bool), "true, false or null"),
    "split": (lambda value: value is None or isinstance(value, str), "a string or null"),
    "step": (lambda value: value is None or (isinstance(value, int) and not isinstance(value, bool)), "an integer"),
    "run": (lambda value: value is None or isinstance(value, str), "a string or null"),
    "hyperparameters": (lambda value: isinstance(value, dict), "a mapping"),
    "tags": (lambda value: isinstance(value, dict), "a mapping"),
    "base_model": (lambda value: value is None or isinstance(value, str), "a string or null"),
    "base_revision": (lambda value: value is None or isinstance(value, str), "a string or null"),
    "config_hash": (lambda value: value is None or isinstance(value, str), "a string or null"),
    "size": (lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= 0, "bytes (>= 0)"),
    "created_at": (lambda value: isinstance(value, str), "an ISO 8601 time string"),
}
