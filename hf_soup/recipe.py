"""Recipes: a YAML mapping (or Python keyword arguments) → a validated `Recipe`, before any tensor is read.

```yaml
method: weighted                      # a registered method: `hf-soup methods` lists them
ingredients: [runs/a/best, runs/b/best]
weights: [0.7, 0.3]                   # the method's own parameters sit at the top level
dtype: bfloat16
output: soups/weighted
```

Relative paths in a recipe file are resolved against the folder of that file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import parse_dtype, parse_size
from .errors import SoupError, brief, did_you_mean, first_line
from .evaluation import Evaluation
from .merge import check_device
from .methods import METHODS, get_method
from .methods.registry import Declaration
from .strategies import STRATEGIES, get_strategy
from .tokenization import TokenizerChoice

# key → its meaning (quoted in errors); the method's parameters are accepted beside these.
RECIPE_KEYS = {
    "method": "the merge method or strategy (see `hf-soup methods`)",
    "ingredients": "list of model or adapter folders",
    "pantry": "a pantry folder whose ingredients are used (all, or those in `select`)",
    "select": "ingredient ids of the pantry to use",
    "base_model": "folder of the model fine-tuning started from (for methods that need it; files copied from it)",
    "dtype": "output dtype of floating tensors: float32, bfloat16, float16 (default: the ingredients')",
    "output": "folder to write the soup to (the CLI's --output wins)",
    "max_shard_size": "largest weight file, e.g. '5GB' (default 5GB)",
    "seed": "seed of the methods that draw random numbers (default 0)",
    "device": "where the merge math runs: cpu (default), cuda, cuda:N, or auto (the GPU when torch sees one)",
    "allow_pickle": "read pickle (.bin) ingredients with torch.load(weights_only=True) (default false)",
    "trust_remote_code": "accept custom code: auto_map in config or tokenizer, evaluate metrics from the Hub (default "
    "false)",
    "evaluation": "data, metric and splits that strategies (greedy, learned) score on",
    "adapter_output": "for LoRA adapter ingredients: concat (exact, default), svd (with rank), merged, naive",
    "rank": "rank of the SVD-compressed adapter (adapter_output: svd)",
    "tokenizer": "the soup's vocabulary when tokenizers differ: union, base or an ingredient id (default: refused)",
}
ADAPTER_OUTPUTS = ("concat", "svd", "merged", "naive")


SEEDS = 2**32  # seeds are 0 ≤ seed < 2**32: what every generator a method or strategy may use accepts (numpy's too)
KIND_NAMES = {str: "a string", int: "an integer", list: "a list", bool: "true or false", dict: "a mapping"}
# key → the type its value must have (checked once for every key; `evaluation` is checked by `Evaluation`)
KINDS = {
    "ingredients": list,
    "pantry": str,
    "select": list,
    "base_model": str,
    "dtype": str,
    "output": str,
    "seed": int,
    "device": str,
    "allow_pickle": bool,
    "trust_remote_code": bool,
    "adapter_output": str,
    "rank": int,
    "tokenizer": (str, dict),
}


def lookup(name: Any, source: str | None = None) -> Declaration:
    """The method or strategy called `name`; the error lists both (and the near miss, for a typo)."""
    if isinstance(name, str) and name in STRATEGIES:
        return get_strategy(name)
    if isinstance(name, str) and name in METHODS:
        return get_method(name)
    where = f"{source}: " if source else ""
    raise SoupError(
        f"{where}unknown method {brief(name)}{did_you_mean(name, [*METHODS, *STRATEGIES])}; methods: "
        f"{', '.join(sorted(METHODS))}; strategies: {', '.join(sorted(STRATEGIES))}"
    )


@dataclass
class Recipe:
    """A validated recipe. Build it with `Recipe.from_mapping` or `load_recipe`, not field by field."""

    method: str
    ingredients: list[Path] = field(default_factory=list)
    pantry: Path | None = None
    select: list[str] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    base_model: Path | None = None
    dtype: str | None = None
    output: Path | None = None
    max_shard_size: int | str = "5GB"
    seed: int = 0
    device: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    evaluation: Evaluation | None = None
    adapter_output: str | None = None
    rank: int | None = None
    tokenizer: TokenizerChoice | None = None
    source: str = "<python>"
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Any, *, base_dir: str | os.PathLike | None = None, source: str = "<python>") -> Recipe:
        """Validate a recipe mapping; relative paths are resolved against `base_dir` (default: the working folder)."""
        if data is None:
            raise SoupError(
                f"{source}: the recipe is empty; write `key: value` lines: method:, ingredients: (or pantry:), output:"
            )
        if not isinstance(data, Mapping):
            raise SoupError(
                f"{source}: a recipe must be a mapping of keys to values, got {type(data).__name__}; write `key: "
                "value` lines such as `method: uniform`, `ingredients: [...]`, `output: DIR`"
            )
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        method, parameters = _method(data, source)
        given = {key: _typed(data, key, kind, source) for key, kind in KINDS.items()}
        _check_contents(given, source)
        _check_output_format(given, data, source)
        trust_remote_code = bool(given["trust_remote_code"])
        evaluation = data.get("evaluation")
        if evaluation is not None:
            evaluation = Evaluation.from_mapping(
                evaluation, base_dir=base, source=source, trust_remote_code=trust_remote_code
            )

        def path_of(key: str) -> Path | None:
            return None if given[key] is None else (base / given[key]).absolute()

        recipe = cls(
            method=method.name,
            ingredients=[(base / item).absolute() for item in given["ingredients"] or []],
            pantry=path_of("pantry"),
            select=given["select"],
            parameters=parameters,
            base_model=path_of("base_model"),
            dtype=given["dtype"],
            output=path_of("output"),
            max_shard_size="5GB" if data.get("max_shard_size") is None else data["max_shard_size"],
            seed=given["seed"] or 0,
            device=given["device"],
            allow_pickle=bool(given["allow_pickle"]),
            trust_remote_code=trust_remote_code,
            evaluation=evaluation,
            adapter_output=given["adapter_output"],
            rank=given["rank"],
            tokenizer=TokenizerChoice.parse(given["tokenizer"], source),
            source=source,
            raw=dict(data),
        )
        _check_needs(method, recipe)
        return recipe


def _method(data: Mapping[str, Any], source: str) -> tuple[Declaration, dict[str, Any]]:
    """The recipe's method or strategy, and its parameters (the keys that are not recipe keys)."""
    name = _typed(data, "method", str, source)
    if name is None:
        raise SoupError(f"{source}: the recipe needs `method:`, e.g. method: uniform (see `hf-soup methods`)")
    method = lookup(name, source)
    parameters = {key: value for key, value in data.items() if key not in RECIPE_KEYS}
    unknown = [key for key in parameters if key not in method.parameters]
    if unknown:
        accepted = ", ".join(method.parameters) or "none"
        hint = did_you_mean(unknown[0], [*RECIPE_KEYS, *method.parameters])
        raise SoupError(
            f"{source}: unknown key {brief(unknown[0])}{hint}; recipe keys: {', '.join(RECIPE_KEYS)}; parameters "
            f"of {method.kind} {method.name!r}: {accepted}"
        )
    return method, parameters


def _check_contents(given: dict[str, Any], source: str) -> None:
    """What goes in the soup: `ingredients:` (folder paths), or `pantry:` with an optional `select:`."""
    ingredients, pantry, select = given["ingredients"], given["pantry"], given["select"]
    for i, item in enumerate(ingredients or []):
        if not isinstance(item, str) or not item:
            raise SoupError(f"{source}: ingredients[{i}] must be a folder path (string), got {brief(item)}")
    if ingredients is not None and pantry is not None:
        raise SoupError(f"{source}: give either `ingredients:` or `pantry:` (with optional `select:`), not both")
    if ingredients is None and pantry is None:
        raise SoupError(f"{source}: say what goes in the soup: `ingredients: [folder, ...]` or `pantry: DIR`")
    if select is not None:
        if pantry is None:
            raise SoupError(f"{source}: `select:` picks ingredient ids of a pantry; add `pantry: DIR`")
        if not select or not all(isinstance(i, str) for i in select):
            raise SoupError(f"{source}: `select:` must be a non-empty list of ingredient ids (strings)")


def _check_output_format(given: dict[str, Any], data: Mapping[str, Any], source: str) -> None:
    """dtype, shard size, device, seed and the adapter output: values each key can take."""
    if given["dtype"] is not None:
        _parsed(parse_dtype, given["dtype"], "dtype", source)
    max_shard_size = data.get("max_shard_size")
    if max_shard_size is not None:
        if not isinstance(max_shard_size, (int, str)) or isinstance(max_shard_size, bool):
            raise SoupError(
                f"{source}: `max_shard_size` must be bytes or a size like '5GB', got {brief(max_shard_size)}"
            )
        _parsed(parse_size, max_shard_size, "max_shard_size", source)
    if given["device"] is not None:
        _parsed(check_device, given["device"], "device", source)
    seed = given["seed"]
    if seed is not None and not 0 <= seed < SEEDS:
        raise SoupError(f"{source}: `seed` must be an integer from 0 to {SEEDS - 1}, got {seed}")
    adapter_output, rank = given["adapter_output"], given["rank"]
    if adapter_output is not None and adapter_output not in ADAPTER_OUTPUTS:
        raise SoupError(f"{source}: adapter_output {adapter_output!r} is unknown; choose {', '.join(ADAPTER_OUTPUTS)}")
    if (rank is not None or adapter_output == "svd") and (adapter_output != "svd" or rank is None or rank < 1):
        raise SoupError(
            f"{source}: adapter_output: svd goes with `rank:`, the rank of the compressed adapter (a positive "
            f"integer); got adapter_output {adapter_output!r}, rank {rank!r}"
        )


def _check_needs(method: Declaration, recipe: Recipe) -> None:
    """A strategy or data-driven method needs `evaluation:`; a method built on task vectors needs `base_model:`."""
    if (method.kind == "strategy" or getattr(method, "needs_data", False)) and recipe.evaluation is None:
        raise SoupError(
            f"{recipe.source}: {method.kind} {method.name!r} needs data: add an `evaluation:` section "
            "(dataset, selection_split, metric; see README)"
        )
    written = method.written_method(recipe.parameters) if method.kind == "strategy" else method.name
    if written is not None and get_method(written).needs_base and recipe.base_model is None:
        raise SoupError(
            f"{recipe.source}: method {written!r} needs `base_model:` (the folder fine-tuning started from)"
        )


def _typed(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], source: str) -> Any:
    value = data.get(key)
    if value is None:
        return None
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        names = " or ".join(KIND_NAMES[k] for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise SoupError(
            f"{source}: `{key}` must be {names}, got {type(value).__name__} {brief(value)} ({RECIPE_KEYS[key]})"
        )
    return value


def _parsed(parse, value: Any, key: str, source: str) -> Any:
    """`parse(value)`, its error prefixed with the recipe and the key."""
    try:
        return parse(value)
    except SoupError as error:
        raise SoupError(f"{source}: `{key}`: {error}") from None


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe YAML file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SoupError(f"cannot read recipe {path}: {error.strerror or error}; give a YAML file's path") from None
    except UnicodeDecodeError as error:
        raise SoupError(
            f"recipe {path} is not UTF-8 text (byte {error.start} cannot be decoded); save it as UTF-8 YAML"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or first_line(error)
        raise SoupError(
            f"recipe {path} is not valid YAML{line}: {problem}; fix the YAML there (brackets, indentation, quotes)"
        ) from None
    except RecursionError:
        raise SoupError(f"recipe {path} nests lists or mappings too deeply; a recipe is a few levels deep") from None
    return Recipe.from_mapping(data, base_dir=path.absolute().parent, source=str(path))
