"""The one reader of the JSON files hf_soup takes from outside, each checked against its declared shape.

A `Shape` says which JSON types a value may be (`"object"`, `"list"`, `"string"`, `"integer"`, `"number"`,
`"finite"` (a finite number), `"boolean"`, `"null"`) and, inside objects and lists, the shapes of what they hold:
`fields` (known keys, checked where present), `required` (keys that must be present) and `each` (every list item, or
every value of an object not named in `fields`). `read_json` parses a file and checks it: bad JSON, or valid JSON of
the wrong shape, is a one-line `SoupError` that names the file, the field, what was found and what was expected.

The files of a Transformers or peft folder are declared here (`MODEL_FILES`: `config.json`, `generation_config.json`,
`tokenizer_config.json`, `special_tokens_map.json`, `adapter_config.json`, `preprocessor_config.json`, shard
indexes). Each declares the fields hf_soup reads, and those the libraries it hands the folder to would choke on; keys
not declared are left alone.
`pantry.json` is checked by `hf_soup.pantry`, `soup.json` by `hf_soup.record` (its shape is declared there).

Example:

```python
>>> config = read_model_file(Path("runs/a/best"), "config.json")   # None when the folder has none
>>> check_model_files(Path("runs/a/best"), label="ingredient a")    # every JSON file a cook would read or copy
```
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SoupError, brief

TYPE_NAMES = {
    "object": "an object",
    "list": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "finite": "a finite number",
    "boolean": "true or false",
    "null": "null",
}


@dataclass(frozen=True)
class Shape:
    """The shape of a JSON value.

    Args:
        kinds (`tuple[str, ...]`): the JSON types it may be (keys of `TYPE_NAMES`).
        fields (`dict[str, Shape]`, *optional*): for an object, the shapes of known keys (checked where present).
        required (`tuple[str, ...]`, *optional*): for an object, the keys that must be present.
        each (`Shape`, *optional*): the shape of every item of a list, or of every value of an object whose key is
            not in `fields`.
    """

    kinds: tuple[str, ...]
    fields: Mapping[str, Shape] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    each: Shape | None = None

    def __post_init__(self):
        unknown = [kind for kind in self.kinds if kind not in TYPE_NAMES]
        if unknown or not self.kinds:
            raise ValueError(f"unknown JSON type(s) {unknown} in a Shape; use {', '.join(TYPE_NAMES)}")

    def allows(self, value: Any) -> bool:
        """Whether `value`'s own type is one of `kinds` (what it holds is not looked at)."""
        return any(is_kind(value, kind) for kind in self.kinds)


def shape(*kinds: str, fields: Mapping[str, Shape] | None = None, required=(), each: Shape | None = None) -> Shape:
    """A `Shape` (see there): `shape("string", "null")`, `shape("object", fields={"r": shape("integer")})`."""
    return Shape(tuple(kinds), dict(fields or {}), tuple(required), each)


ANY = shape(*TYPE_NAMES)


def is_kind(value: Any, kind: str) -> bool:
    """Whether `value` is of the JSON type `kind` (a key of `TYPE_NAMES`): booleans are not numbers, and an integer
    too large for a float is not a number."""
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):  # JSON true/false are not numbers here
        return False
    if kind == "integer":
        return isinstance(value, int)
    if kind in ("number", "finite"):
        if not isinstance(value, (int, float)):
            return False
        try:
            number = float(value)  # an integer too large for a float is not a number any reader can use
        except OverflowError:
            return False
        return kind == "number" or math.isfinite(number)
    return isinstance(value, {"object": dict, "list": list, "string": str}[kind])


def found(value: Any) -> str:
    """What a JSON value is, for an error message: "a list", "an integer 7", "a string 'abc'", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"an integer {brief(value, 40)}"
    if isinstance(value, float):
        return f"a number {brief(value)}"
    if isinstance(value, str):
        return f"a string {brief(value, 40)}"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def expected(kinds: tuple[str, ...]) -> str:
    """The allowed JSON types in words ("a string or null")."""
    names = [TYPE_NAMES[kind] for kind in kinds]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check(value: Any, declared: Shape, where: str, fix: str, path: str = "") -> None:
    """Refuse `value` when it does not have the `declared` shape: a `SoupError` naming `where` (the file), the field
    (`path`, e.g. `ingredients[0].id`), what was found and what was expected, and ending with `fix`."""
    if not declared.allows(value):
        if not path:
            wanted = "a JSON object" if declared.kinds == ("object",) else expected(declared.kinds)
            raise SoupError(f"{where} must hold {wanted}, found {found(value)}; {fix}")
        raise SoupError(f"{where}: field {path} must be {expected(declared.kinds)}, found {found(value)}; {fix}")
    if isinstance(value, dict):
        for key in declared.required:
            if key not in value:
                raise SoupError(f"{where}{': ' + path if path else ''} has no field {key!r}; {fix}")
        for key, item in value.items():
            inner = declared.fields.get(key)
            if inner is not None:
                check(item, inner, where, fix, f"{path}.{key}" if path else key)
            elif declared.each is not None:
                check(item, declared.each, where, fix, f"{path}[{brief(key, 40)}]")
    elif isinstance(value, list) and declared.each is not None:
        for number, item in enumerate(value):
            check(item, declared.each, where, fix, f"{path}[{number}]")


def parse_json(path: str | os.PathLike, *, fix: str, label: str = "") -> Any:
    """The JSON value in the file `path`; unreadable, not UTF-8, not JSON or nested too deeply is a `SoupError`
    `"{label}{path} is not valid JSON (why); {fix}"`."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError, too many digits
        reason = " ".join(str(error).split()) or type(error).__name__
        raise SoupError(f"{label}{path} is not valid JSON ({reason}); {fix}") from None
    except RecursionError:
        raise SoupError(f"{label}{path} is not valid JSON (it nests too deeply); {fix}") from None


def read_json(path: str | os.PathLike, declared: Shape, *, fix: str, label: str = "") -> Any:
    """The JSON value in the file `path`, parsed (`parse_json`) and checked against its `declared` shape (`check`).

    Args:
        path (`str` or `Path`): the file.
        declared (`Shape`): what it must hold.
        fix (`str`): how to fix a bad file, the end of every message ("save the model again").
        label (`str`, *optional*): what the message starts with before the path ("ingredient a: ").
    """
    data = parse_json(path, fix=fix, label=label)
    check(data, declared, f"{label}{path}", fix)
    return data


# -- the files of a Transformers / peft folder --------------------------------------------------------------------

STRING, OPTIONAL_STRING, OPTIONAL_BOOLEAN = shape("string"), shape("string", "null"), shape("boolean", "null")
OPTIONAL_INTEGER = shape("integer", "null")
TOKEN_IDS = shape("integer", "list", "null", each=shape("integer"))
TOKEN = shape("string", "object", "null", fields={"content": STRING})  # a string or a serialised AddedToken
TOKENS = {name: TOKEN for name in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token")}
TOKENS["mask_token"] = TOKEN
TOKENS["additional_special_tokens"] = shape("list", "null", each=shape("string", "object", fields={"content": STRING}))

CONFIG = shape(
    "object",
    fields={
        "model_type": STRING,
        "architectures": shape("list", "null", each=STRING),
        "auto_map": shape("object", "null"),
        "dtype": OPTIONAL_STRING,
        "torch_dtype": OPTIONAL_STRING,
    },
)
GENERATION_CONFIG = shape(
    "object",
    fields={
        **{name: TOKEN_IDS for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")},
        **{name: OPTIONAL_INTEGER for name in ("max_length", "max_new_tokens", "min_length", "top_k", "num_beams")},
        "do_sample": OPTIONAL_BOOLEAN,
        "temperature": shape("number", "null"),
        "top_p": shape("number", "null"),
    },
)
TOKENIZER_CONFIG = shape(
    "object",
    fields={
        **TOKENS,
        "auto_map": shape("object", "list", "null"),  # a list in the old [slow, fast] form
        "tokenizer_class": OPTIONAL_STRING,
        "model_max_length": shape("number", "null"),
        "added_tokens_decoder": shape("object", "null", each=shape("object", fields={"content": STRING})),
        "chat_template": shape("string", "list", "null"),
        "padding_side": OPTIONAL_STRING,
        "truncation_side": OPTIONAL_STRING,
    },
)
SPECIAL_TOKENS_MAP = shape("object", fields=TOKENS)
ADAPTER_CONFIG = shape(
    "object",
    fields={
        "peft_type": OPTIONAL_STRING,
        "task_type": OPTIONAL_STRING,
        "base_model_name_or_path": OPTIONAL_STRING,
        "revision": OPTIONAL_STRING,
        "r": shape("integer"),
        "lora_alpha": shape("finite"),
        "rank_pattern": shape("object", "null", each=shape("integer")),
        "alpha_pattern": shape("object", "null", each=shape("finite")),
        "use_rslora": OPTIONAL_BOOLEAN,
        "use_dora": OPTIONAL_BOOLEAN,
        "lora_bias": OPTIONAL_BOOLEAN,
        "fan_in_fan_out": OPTIONAL_BOOLEAN,
        "bias": OPTIONAL_STRING,
        "init_lora_weights": shape("boolean", "string", "null"),
        "target_modules": shape("list", "string", "null", each=STRING),
        "modules_to_save": shape("list", "null", each=STRING),
        "target_parameters": shape("list", "null"),
        "layer_replication": shape("list", "null"),
        "trainable_token_indices": shape("list", "object", "null"),
    },
)
PREPROCESSOR_CONFIG = shape(  # an audio feature extractor's settings (or an image processor's)
    "object",
    fields={
        "feature_extractor_type": OPTIONAL_STRING,
        "image_processor_type": OPTIONAL_STRING,
        "processor_class": OPTIONAL_STRING,
        "sampling_rate": shape("integer"),
        "feature_size": shape("integer"),
        "padding_value": shape("finite"),
        "padding_side": OPTIONAL_STRING,
        "return_attention_mask": OPTIONAL_BOOLEAN,
        "do_normalize": OPTIONAL_BOOLEAN,
    },
)
SHARD_INDEX = shape(
    "object",
    required=("weight_map",),
    fields={"weight_map": shape("object", each=STRING), "metadata": shape("object", "null")},
)
SHARD_INDEX_FIX = "re-save the checkpoint (save_pretrained) or copy its index again"
SAVE_TOKENIZER = "save the tokenizer again (tokenizer.save_pretrained)"

# file name → (its shape, how to fix a bad one)
MODEL_FILES: dict[str, tuple[Shape, str]] = {
    "config.json": (CONFIG, "save the model again"),
    "generation_config.json": (GENERATION_CONFIG, "save the model again"),
    "tokenizer_config.json": (TOKENIZER_CONFIG, SAVE_TOKENIZER),
    "special_tokens_map.json": (SPECIAL_TOKENS_MAP, SAVE_TOKENIZER),
    "adapter_config.json": (ADAPTER_CONFIG, "save the adapter again"),
    "preprocessor_config.json": (PREPROCESSOR_CONFIG, "save the feature extractor again (save_pretrained)"),
    "model.safetensors.index.json": (SHARD_INDEX, SHARD_INDEX_FIX),
    "adapter_model.safetensors.index.json": (SHARD_INDEX, SHARD_INDEX_FIX),
    "pytorch_model.bin.index.json": (SHARD_INDEX, SHARD_INDEX_FIX),
}


def read_model_file(folder: Path, name: str, *, label: str = "", fix: str | None = None) -> Any:
    """The checked content of the JSON file `name` (a key of `MODEL_FILES`) in a model or adapter folder, or `None`
    when the folder has no such file. `fix` replaces the file's usual advice (e.g. for a soup folder)."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    declared, usual = MODEL_FILES[name]
    label += "shard index " if declared is SHARD_INDEX else ""
    return read_json(path, declared, fix=fix or usual, label=label)


def check_model_files(folder: Path, *, label: str = "", fix: str | None = None) -> None:
    """Check every JSON file of `MODEL_FILES` that `folder` holds (what a cook reads, copies or hands to
    Transformers); a wrong one is a `SoupError`."""
    for name in MODEL_FILES:
        read_model_file(folder, name, label=label, fix=fix)


__all__ = [
    "ANY",
    "MODEL_FILES",
    "Shape",
    "check",
    "check_model_files",
    "is_kind",
    "parse_json",
    "read_json",
    "read_model_file",
    "shape",
]
