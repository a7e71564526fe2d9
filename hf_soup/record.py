"""`soup.json`, the record of a soup: its one writer (`write_record`) and its one reader (`read_record`).

A soup folder is an ordinary `from_pretrained` (or peft) folder plus `soup.json`: the recipe, the ingredients with
their sha256 and weights, what the method decided and, for strategies, the choice (`strategy`) and the comparison
(`report`). `SoupRecord` is its typed form, versioned by `format`; on reading, the format and the type of every field
hf_soup uses are checked, so the card, the figures, the hub and the CLI can rely on them. Sections that only some
soups have (`strategy`, `report`, `task_vectors`, `adapters`, ...) travel in `sections`.

Example:

```python
>>> record = read_record("soups/greedy")          # the checked soup.json, as a dict
>>> record["method"], [i["id"] for i in record["ingredients"]]
```
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_json
from .errors import SoupError, brief

FORMAT = 1
NAME = "soup.json"


@dataclass
class IngredientEntry:
    """One ingredient as the soup records it: where it came from, its weight in the soup and its sha256."""

    id: str
    path: str
    kind: str
    weight: Any  # a number, `None` (chosen per tensor or not linear) or a list (per-layer)
    sha256: dict[str, str]
    run: str | None = None
    metric: str | None = None
    value: float | None = None
    split: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None


@dataclass
class SoupRecord:
    """The typed `soup.json`. `to_dict()` is what is written; `sections` holds the optional parts (`strategy`,
    `report`, `task_vectors`, `adapters`, `adapter_output`, ...) at the top level of the file."""

    method: str
    parameters: dict[str, Any]
    recipe: dict[str, Any]
    ingredients: list[IngredientEntry]
    files: list[str]
    notes: list[str] = field(default_factory=list)
    base_model: str | None = None
    dtype: str | None = None
    seed: int = 0
    sections: dict[str, Any] = field(default_factory=dict)
    hf_soup_version: str = ""
    created_at: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )
    format: int = FORMAT

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able mapping written as `soup.json` (sections at the top level, after the common fields)."""
        data = {
            "format": self.format,
            "hf_soup_version": self.hf_soup_version,
            "created_at": self.created_at,
            "method": self.method,
            "parameters": self.parameters,
            "recipe": self.recipe,
            "base_model": self.base_model,
            "dtype": self.dtype,
            "seed": self.seed,
            "ingredients": [asdict(entry) for entry in self.ingredients],
            "notes": self.notes,
            "files": self.files,
        }
        return _jsonable({**data, **self.sections})


# The fields a soup.json must have, and the JSON types every field this hf_soup reads must hold where present.
REQUIRED = ("format", "method", "ingredients")
FIELDS: dict[str, tuple[type, ...]] = {
    "format": (int,),
    "hf_soup_version": (str,),
    "created_at": (str,),
    "method": (str,),
    "parameters": (dict,),
    "recipe": (dict,),
    "base_model": (str, type(None)),
    "dtype": (str, type(None)),
    "seed": (int,),
    "ingredients": (list,),
    "notes": (list,),
    "files": (list,),
    "strategy": (dict, type(None)),
    "report": (dict, type(None)),
    "task_vectors": (dict, type(None)),
}
ENTRY: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "path": (str,),
    "kind": (str,),
    "sha256": (dict,),
    "run": (str, type(None)),
    "base_model": (str, type(None)),
}
TYPE_NAMES = {
    int: "an integer",
    str: "a string",
    dict: "an object",
    list: "a list",
    bool: "a boolean",
    type(None): "null",
}


def write_record(folder: str | os.PathLike, record: SoupRecord | dict[str, Any]) -> dict[str, Any]:
    """Write `soup.json` into `folder` atomically; returns the mapping written."""
    data = record.to_dict() if isinstance(record, SoupRecord) else _jsonable(record)
    write_json(Path(folder) / NAME, data)
    return data


def read_record(folder: str | os.PathLike) -> dict[str, Any]:
    """The `soup.json` of a soup folder, checked: it parses, it is an object, its format is one this hf_soup reads,
    and every common field has its type. A bad file is a `SoupError` that names the file and the field."""
    path = Path(folder) / NAME
    if not path.is_file():
        raise SoupError(f"{folder} is not a soup folder (no {NAME}); give a folder that hf-soup cook wrote")
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        raise SoupError(f"{path} is not valid JSON ({error}); cook the soup again") from None
    except RecursionError:
        raise SoupError(f"{path} nests too deeply to be a soup record; cook the soup again") from None
    check_record(data, str(path))
    return data


def check_record(data: Any, where: str) -> None:
    """Refuse a `soup.json` mapping of the wrong shape, naming `where`, the field, what was found and expected."""
    if not isinstance(data, dict):
        raise SoupError(f"{where} must hold a JSON object, found {_kind(data)}; cook the soup again")
    for key in REQUIRED:
        if key not in data:
            raise SoupError(f"{where} has no {key!r}; it was not written by hf-soup cook: cook the soup again")
    for key, kinds in FIELDS.items():
        if key in data:
            _check_type(data[key], kinds, f"{where}: {key!r}")
    if data["format"] != FORMAT:
        raise SoupError(
            f"{where} has format {brief(data['format'])}, this hf_soup reads format {FORMAT}; cook the soup again "
            "with this version, or install the hf_soup that wrote it"
        )
    for n, entry in enumerate(data["ingredients"]):
        _check_type(entry, (dict,), f"{where}: ingredients[{n}]")
        if "id" not in entry:
            raise SoupError(f"{where}: ingredients[{n}] has no 'id'; cook the soup again")
        for key, kinds in ENTRY.items():
            if key in entry:
                _check_type(entry[key], kinds, f"{where}: ingredients[{n}].{key}")
    for key in ("files", "notes"):
        for n, item in enumerate(data.get(key) or []):
            _check_type(item, (str,), f"{where}: {key}[{n}]")


def _check_type(value: Any, kinds: tuple[type, ...], what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, kinds):  # JSON true/false are not integers here
        expected = " or ".join(TYPE_NAMES[kind] for kind in kinds)
        raise SoupError(f"{what} must be {expected}, found {_kind(value)}; cook the soup again")


def _kind(value: Any) -> str:
    """What a JSON value is, for an error message ("a list", "a number 1.5", ...)."""
    if type(value) in TYPE_NAMES and not isinstance(value, int) or isinstance(value, bool):
        return TYPE_NAMES[type(value)]
    return f"a number {brief(value)}" if isinstance(value, (int, float)) else type(value).__name__


def _jsonable(value: Any) -> Any:
    """`value` as plain JSON types (paths, dtypes and other objects as strings)."""
    return json.loads(json.dumps(value, default=str))


__all__ = ["FORMAT", "IngredientEntry", "SoupRecord", "check_record", "read_record", "write_record"]
