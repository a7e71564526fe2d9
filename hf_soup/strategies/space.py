"""Search spaces: which parameters of a merge method the `search` strategy tunes, and over which values.

```yaml
space:
  density: {low: 0.1, high: 1.0}           # a number in [low, high] (`log: true` samples on a log scale)
  scale: {low: 0.5, high: 2.0, step: 0.25} # a number on a grid of `step`
  weights: {low: 0.0, high: 1.0}           # a list parameter: one number per ingredient
  majority_sign: {choices: [total, frequency]}
  t: {low: 0.0, high: 1.0, groups: 3}      # one value per layer group (evolutionary merging, per-layer)
```

A parameter with `groups: G` takes G values: the model's layers are cut into G contiguous groups along depth
(embeddings go with the first, the head and final norm with the last; see `hf_soup.schedules.depth`), so the search
stays G-dimensional however deep the model is. Each value the sampler proposes is called a *dimension* and is named
`density`, `weights[2]` or `t@1` (group 1).
"""

from __future__ import annotations

import itertools
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SoupError
from ..methods import Method, get_method
from ..schedules import depth, layer_count, per_tensor

SPEC_KEYS = {"low", "high", "log", "step", "choices", "groups"}


@dataclass(frozen=True)
class Dimension:
    """One number (or choice) the sampler proposes.

    Attributes:
        name (`str`): `parameter`, `parameter[i]` (i-th ingredient) or with `@g` (layer group g).
        parameter (`str`): the merge method's parameter it sets.
        index (`int`, *optional*): the ingredient, for list parameters.
        group (`int`): the layer group (0 when the parameter has one value for the whole model).
        low, high (`float`), log (`bool`), step (`float`, *optional*), integer (`bool`): a numeric range.
        choices (`list`, *optional*): a categorical dimension instead.
    """

    name: str
    parameter: str
    index: int | None
    group: int
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    step: float | None = None
    integer: bool = False
    choices: tuple[Any, ...] | None = None

    def value(self, number: float) -> float | int:
        """A number of this dimension's type."""
        return int(round(number)) if self.integer else number

    def suggest(self, trial) -> Any:
        """Ask an Optuna trial for this dimension's value."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def grid(self, points: int) -> list[Any]:
        """The values a grid search tries: the choices, the `step` grid, or `points` values from low to high."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is not None:
            count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
            values = [self.low + n * self.step for n in range(count)]
        elif self.log:
            values = np.geomspace(self.low, self.high, points).tolist()
        else:
            values = np.linspace(self.low, self.high, points).tolist()
        values = [round(v, 12) for v in values]
        return sorted({int(round(v)) for v in values}) if self.integer else values


@dataclass
class SearchSpace:
    """The dimensions of a search over the parameters of `method`, the `fixed` parameters, and `count` ingredients.

    Build it with `SearchSpace.parse`, which checks everything before any tensor is read.
    """

    method: Method
    dimensions: list[Dimension]
    fixed: dict[str, Any]
    groups: dict[str, int]
    count: int

    @classmethod
    def parse(cls, merge: str, space: Any, fixed: Any, count: int) -> SearchSpace:
        """Check a recipe's `merge`, `space` and `fixed` against the method's declaration."""
        method = get_method(merge)
        if method.needs_data or method.layout is not None:
            raise SoupError(
                f"search: method {merge!r} cannot be searched (it needs statistics from data or rearranges layers); "
                "choose a data-free method such as weighted, slerp, task_arithmetic, ties or dare"
            )
        if not isinstance(space, Mapping) or not space:
            raise SoupError(
                "search: `space:` must map parameters of the merge method to ranges, e.g. "
                "space: {density: {low: 0.1, high: 1.0}}"
            )
        if not isinstance(fixed, Mapping):
            raise SoupError(f"search: `fixed:` must map parameters of {merge!r} to values, got {fixed!r}")
        accepted = ", ".join(method.parameters) or "none"
        for name in [*space, *fixed]:
            if name not in method.parameters:
                raise SoupError(f"search: {name!r} is not a parameter of method {merge!r}; its parameters: {accepted}")
        both = sorted(set(space) & set(fixed))
        if both:
            raise SoupError(f"search: {both[0]!r} is both searched (`space:`) and fixed (`fixed:`); keep one")
        dimensions, groups = [], {}
        for name, spec in space.items():
            annotation = method.parameters[name].annotation
            groups[name] = _groups(name, spec)
            indices = list(range(count)) if _is_list(annotation) else [None]
            for group, index in itertools.product(range(groups[name]), indices):
                label = name + ("" if index is None else f"[{index}]") + ("" if groups[name] == 1 else f"@{group}")
                dimensions.append(_dimension(label, name, index, group, spec, annotation))
        parsed = cls(method, dimensions, dict(fixed), groups, count)
        middle = parsed.middle()
        for d in dimensions:  # the method's own checks at both ends of every range, the other values in the middle
            for end in d.choices or (d.value(d.low), d.value(d.high)):
                for key in parsed._keys():
                    parsed.bind({**middle, d.name: end}, key)
        return parsed

    def middle(self) -> dict[str, Any]:
        """A value for every dimension: the first choice, or the middle of the range."""
        return {d.name: d.choices[0] if d.choices else d.value((d.low + d.high) / 2) for d in self.dimensions}

    def held(self) -> dict[str, Any]:
        """The method's parameters that no trial changes (fixed, or left at their defaults), as the method binds
        them."""
        bound = self.bind(self.middle(), self._keys()[0])
        return {name: value for name, value in bound.items() if name not in self.groups}

    def _keys(self) -> list[tuple[int, ...]]:
        """Every combination of layer groups a tensor can fall in (one group index per searched parameter)."""
        return list(itertools.product(*(range(g) for g in self.groups.values())))

    def bind(self, values: Mapping[str, Any], key: tuple[int, ...]) -> dict[str, Any]:
        """The merge method's checked parameters for the tensors in layer groups `key`."""
        chosen = dict(self.fixed)
        for (name, _), group in zip(self.groups.items(), key):
            dims = [d for d in self.dimensions if d.parameter == name and d.group == group]
            chosen[name] = [values[d.name] for d in dims] if dims[0].index is not None else values[dims[0].name]
        return self.method.bind(chosen, self.count)

    def parameters(self, values: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any] | Callable[[str], dict]:
        """The merge method's parameters for one proposal: a dict, or a function of the tensor name when a
        parameter has layer groups (or a fixed parameter is a schedule)."""
        keys = self._keys()
        bound = {key: self.bind(values, key) for key in keys}
        if len(keys) == 1:
            return per_tensor(bound[keys[0]], self.method.scalar, names)
        layers = layer_count(names)
        scheduled = {key: per_tensor(value, self.method.scalar, names) for key, value in bound.items()}

        def of(name: str) -> dict[str, Any]:
            position = depth(name, layers)
            key = tuple(min(int(position * g), g - 1) for g in self.groups.values())
            chosen = scheduled[key]
            return chosen(name) if callable(chosen) else chosen

        return of

    def grid(self, points: int) -> dict[str, list[Any]]:
        """The grid sampler's values for every dimension."""
        return {d.name: d.grid(points) for d in self.dimensions}

    def to_dict(self) -> list[dict[str, Any]]:
        """The dimensions as JSON (for `soup.json`)."""
        rows = []
        for d in self.dimensions:
            row = {"name": d.name, "parameter": d.parameter, "group": d.group}
            row.update({"choices": list(d.choices)} if d.choices else {"low": d.low, "high": d.high, "log": d.log})
            rows.append(row)
        return rows


def _is_list(annotation: Any) -> bool:
    """Whether a parameter takes a list (one value per ingredient), e.g. `list[float] | None`."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) not in (list, tuple) else (annotation,)
    return any(typing.get_origin(a) in (list, tuple) for a in (options or (annotation,)))


def _element(annotation: Any) -> Any:
    """The number type of an annotation: `int` for `int`, `int | None` and `list[int]`; else what it holds."""
    options = [a for a in (typing.get_args(annotation) or (annotation,)) if a is not type(None)]
    if typing.get_origin(annotation) in (list, tuple):
        options = list(typing.get_args(annotation))
    if len(options) == 1 and typing.get_origin(options[0]) in (list, tuple):
        options = list(typing.get_args(options[0]))
    return options[0] if len(options) == 1 else None


def _groups(name: str, spec: Any) -> int:
    if not isinstance(spec, Mapping):
        raise SoupError(
            f"search: space.{name} must be a mapping like {{low: 0.1, high: 1.0}} or {{choices: [a, b]}}, got "
            f"{spec!r}; put parameters that are not searched under `fixed:`"
        )
    groups = spec.get("groups", 1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise SoupError(f"search: space.{name}.groups must be a positive integer (layer groups), got {groups!r}")
    return groups


def _dimension(label: str, name: str, index: int | None, group: int, spec: Mapping[str, Any], annotation: Any):
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise SoupError(
            f"search: space.{name} has unknown key {unknown[0]!r}; allowed: {', '.join(sorted(SPEC_KEYS))}"
        )
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) - {"choices", "groups"} or not isinstance(choices, list) or not choices:
            raise SoupError(f"search: space.{name}.choices must be a non-empty list, alone (no low/high)")
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise SoupError(f"search: space.{name}.choices must hold numbers, strings, booleans or null")
        return Dimension(label, name, index, group, choices=tuple(choices))
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    numbers = [low, high] + ([step] if step is not None else [])
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in numbers):
        raise SoupError(
            f"search: space.{name} needs numbers `low` and `high` (and optional `step`), got {dict(spec)!r}"
        )
    if not low < high or not isinstance(log, bool) or (log and low <= 0) or (step is not None and step <= 0):
        raise SoupError(
            f"search: space.{name} must have low < high, a positive step, and low > 0 with log: true; "
            f"got {dict(spec)!r}"
        )
    if log and step is not None:
        raise SoupError(f"search: space.{name}: give either `log: true` or `step`, not both")
    return Dimension(label, name, index, group, float(low), float(high), log, step, _element(annotation) is int)
