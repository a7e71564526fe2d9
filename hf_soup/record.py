"""`soup.json`, the record of a soup: its one writer (`write_record`) and its one reader (`read_record`).

A soup folder is an ordinary `from_pretrained` (or peft) folder plus `soup.json`: the recipe, the ingredients with
their sha256 and weights, what the method decided and, for strategies, the choice (`strategy`) and the comparison
(`report`). `SoupRecord` is its typed form, versioned by `format`; on reading, the format and the type of every field
hf_soup uses are checked, so the card, the figures, the hub and the CLI can rely on them. Sections that only some
soups have (`strategy`, `report`, `task_vectors`, `adapters`, `vocabulary`, ...) travel in `sections`.

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
from .jsonfile import ANY, check, parse_json, shape

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


# The shape of a soup.json: the fields it must have, and the JSON types of every field this hf_soup (the card, the
# figures, the hub) reads, nested where they are read nested (`hf_soup.jsonfile.Shape`).
FIX = "cook the soup again"
NUMBER, OPTIONAL_NUMBER, STRING = shape("number"), shape("number", "null"), shape("string")
OPTIONAL_STRING, STRINGS = shape("string", "null"), shape("list", each=shape("string"))
SCORES = shape("object", each=NUMBER)  # split → score
MATRIX = shape("list", each=shape("list", each=OPTIONAL_NUMBER))
ENTRY = shape(
    "object",
    required=("id",),
    fields={
        "id": STRING,
        "path": STRING,
        "kind": STRING,
        "sha256": shape("object", each=STRING),
        "weight": shape("number", "list", "null", each=shape("number", "list", "null")),
        "run": OPTIONAL_STRING,
        "metric": OPTIONAL_STRING,
        "value": OPTIONAL_NUMBER,
        "split": OPTIONAL_STRING,
        "hyperparameters": shape("object", "null"),
        "base_model": OPTIONAL_STRING,
    },
)
STEP = shape(
    "object",
    required=("id", "score", "accepted"),
    fields={
        "id": STRING,
        "score": NUMBER,
        "accepted": shape("boolean"),
        "alpha": NUMBER,
        "soup_size": shape("integer"),
    },
)
TRIAL = shape(
    "object",
    required=("trial", "state"),
    fields={"trial": shape("integer"), "state": STRING, "score": OPTIONAL_NUMBER, "parameters": shape("object")},
)
STRATEGY = shape(
    "object",
    "null",
    required=("name",),
    fields={
        "name": STRING,
        "selection_split": OPTIONAL_STRING,
        "score": NUMBER,
        "chosen": shape("list"),
        "evaluations": shape("integer", "null"),
        "trace": shape("list", "null", each=STEP),
        "alpha_mean": shape("list", each=NUMBER),
        "beta": NUMBER,
        "loss_per_epoch": shape("list", "null", each=NUMBER),
        "history": shape("list", "null", each=TRIAL),
        "sampler": OPTIONAL_STRING,
        "merge": OPTIONAL_STRING,
        "best_trial": shape("integer", "null"),
        "best_parameters": shape("object"),
        "fixed": shape("object", "null"),
        "seconds_per_trial": OPTIONAL_NUMBER,
        "resumed_trials": shape("integer"),
    },
)
REPORT = shape(
    "object",
    "null",
    required=("metric", "selection_split", "splits", "rows", "individuals", "best_individual"),
    fields={
        "metric": STRING,
        "greater_is_better": shape("boolean"),
        "selection_split": STRING,
        "splits": STRINGS,
        "best_individual": STRING,
        "rows": shape("object", each=SCORES),
        "individuals": shape("object", each=SCORES),
        "greedy_ensemble": shape("list", "null", each=STRING),
        "dtype": OPTIONAL_STRING,
        "adapter_mixing": shape("object", "null"),
    },
)
TASK_VECTORS = shape(
    "object",
    "null",
    fields={
        "ids": STRINGS,
        "reference": STRING,
        **{name: MATRIX for name in ("cosine", "angle", "l2", "weight_cosine")},
        "tensors": shape("integer"),
    },
)
INTEGER = shape("integer")
VOCABULARY = shape(
    "object",
    "null",
    required=("tokenizer", "tokens", "rows"),
    fields={
        "tokenizer": STRING,
        "reference": STRING,
        "tokens": INTEGER,
        "rows": INTEGER,
        "padding_rows": INTEGER,
        "pad_to_multiple_of": shape("integer", "null"),
        "mapping": shape(
            "list",
            each=shape(
                "object",
                required=("token", "id", "ids"),
                fields={"token": STRING, "id": INTEGER, "ids": shape("object"), "filled_from": STRINGS},
            ),
        ),
        "dropped": shape("object", each=STRINGS),
        "chat_template": OPTIONAL_STRING,
    },
)
RECIPE = shape(
    "object",
    fields={"evaluation": shape("object", "null", fields={"task": OPTIONAL_STRING, "dataset": ANY, "splits": ANY})},
)
RECORD = shape(
    "object",
    required=("format", "method", "ingredients"),
    fields={
        "format": shape("integer"),
        "hf_soup_version": STRING,
        "created_at": STRING,
        "method": STRING,
        "parameters": shape("object"),
        "recipe": RECIPE,
        "base_model": OPTIONAL_STRING,
        "dtype": OPTIONAL_STRING,
        "seed": shape("integer"),
        "ingredients": shape("list", each=ENTRY),
        "notes": STRINGS,
        "files": STRINGS,
        "strategy": STRATEGY,
        "report": REPORT,
        "task_vectors": TASK_VECTORS,
        "vocabulary": VOCABULARY,
    },
)
VERSIONED = shape("object", required=("format",), fields={"format": shape("integer")})


def write_record(folder: str | os.PathLike, record: SoupRecord | dict[str, Any]) -> dict[str, Any]:
    """Write `soup.json` into `folder` atomically; returns the mapping written."""
    data = record.to_dict() if isinstance(record, SoupRecord) else _jsonable(record)
    write_json(Path(folder) / NAME, data)
    return data


def read_record(folder: str | os.PathLike) -> dict[str, Any]:
    """The `soup.json` of a soup folder, checked: it parses, it is an object, its format is one this hf_soup reads,
    and every field hf_soup reads has its type (`RECORD`). A bad file is a `SoupError` that names the file and the
    field."""
    path = Path(folder) / NAME
    if not path.is_file():
        raise SoupError(f"{folder} is not a soup folder (no {NAME}); give a folder that hf-soup cook wrote")
    data = parse_json(path, fix=FIX)
    check_record(data, str(path))
    return data


def check_record(data: Any, where: str) -> None:
    """Refuse a `soup.json` mapping of the wrong shape, naming `where`, the field, what was found and expected: its
    format first (a newer format may have another shape), then every field (`hf_soup.jsonfile.check`)."""
    check(data, VERSIONED, where, FIX)
    if data["format"] != FORMAT:
        raise SoupError(
            f"{where} has format {brief(data['format'])}, this hf_soup reads format {FORMAT}; cook the soup again "
            "with this version, or install the hf_soup that wrote it"
        )
    check(data, RECORD, where, FIX)


def _jsonable(value: Any) -> Any:
    """`value` as plain JSON types (paths, dtypes and other objects as strings)."""
    return json.loads(json.dumps(value, default=str))


__all__ = ["FORMAT", "IngredientEntry", "SoupRecord", "check_record", "read_record", "write_record"]
