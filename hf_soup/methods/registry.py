"""The method registry: a merge method is one function, and its signature is its declaration.

A method takes the ingredients' tensors for one tensor name (fp32, same shape) as its first positional argument and
its parameters as keyword-only arguments; it returns one tensor and never mutates its inputs. The tensors are on the
recipe's `device` (the CPU by default): a method makes new tensors on theirs (`zeros_like`, `new_ones`), and draws
random numbers from `generator` on the CPU, moving the result, so a seed gives the same soup on every device.
Keyword-only parameters named in `CONTEXT` are supplied by the engine (the base model's tensor, a seeded generator),
not by the recipe. Everything else is a recipe parameter: its annotation gives the type that is checked, its default
makes it optional. Recipes are checked against this declaration before any tensor is read.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import SoupError
from ..schedules import is_schedule, validate, values_in

# Engine-supplied keyword arguments: a method asks for one by naming it in its signature.
CONTEXT = {
    "base": "the base model's fp32 tensor of the same name (the recipe must name `base_model`)",
    "generator": "a CPU `torch.Generator` seeded from the recipe's `seed` and the tensor name",
    "seed": "the recipe's `seed` (for strategies that draw random numbers)",
    "storage": "a file beside the soup where a strategy keeps what lets an interrupted cook resume (or None)",
    "statistics": "per-ingredient statistics of the same tensor (None where there are none), from the method's "
    "`statistics` hook run on the recipe's evaluation data",
}


@dataclass(frozen=True)
class Declaration:
    """A registered function whose keyword-only parameters are its declaration (methods and strategies).

    Attributes:
        name (`str`): the name recipes use.
        function (`Callable`): the registered function.
        parameters (`dict[str, inspect.Parameter]`): recipe parameters, in signature order.
        context (`tuple[str, ...]`): engine-supplied keyword arguments the function takes (see `CONTEXT`).
        check (`Callable`, *optional*): `check(parameters, count) -> parameters`, value checks that need the number
            of ingredients (raises `SoupError`); may return normalised parameters.
    """

    name: str
    function: Callable[..., Any]
    parameters: dict[str, inspect.Parameter]
    context: tuple[str, ...]
    check: Callable[[dict[str, Any], int], dict[str, Any]] | None = None

    kind = "method"

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.function) or ""
        return doc.splitlines()[0] if doc else ""

    def bind(self, given: Mapping[str, Any], count: int, *, source: str | None = None) -> dict[str, Any]:
        """Check recipe parameters against the signature (names, required, types) and the method's own check.

        Returns the full parameter set with defaults filled in. `source` (the recipe's file) starts the message of
        any `SoupError`, so the user knows which file to fix.
        """
        try:
            return self._bind(given, count)
        except SoupError as error:
            if source is None or str(error).startswith(f"{source}: "):
                raise
            raise SoupError(f"{source}: {error}") from None

    def _bind(self, given: Mapping[str, Any], count: int) -> dict[str, Any]:
        accepted = list(self.parameters)
        unknown = [name for name in given if name not in self.parameters]
        if unknown:
            hint = ", ".join(accepted) if accepted else "none"
            raise SoupError(f"unknown parameter {unknown[0]!r} for {self.kind} {self.name!r}; accepted: {hint}")
        bound: dict[str, Any] = {}
        for name, parameter in self.parameters.items():
            if name in given:
                bound[name] = _check_type(self.name, name, given[name], parameter.annotation)
            elif parameter.default is inspect.Parameter.empty:
                raise SoupError(f"{self.kind} {self.name!r} needs parameter {name!r}; accepted: {', '.join(accepted)}")
            else:
                bound[name] = parameter.default
        if self.check is not None:
            scheduled = [name for name in self.scalar if is_schedule(bound.get(name))]
            for name in scheduled:  # every value a schedule can take must pass the method's own checks
                for value in values_in(bound[name]):
                    self.check({**bound, **{n: values_in(bound[n])[0] for n in scheduled}, name: value}, count)
            if not scheduled:
                bound = self.check(bound, count)
        return bound

    @property
    def scalar(self) -> list[str]:
        """Parameters that take one number, and so may be scheduled per tensor (see `hf_soup.schedules`)."""
        return [name for name, p in self.parameters.items() if _scalar(p.annotation)]


@dataclass(frozen=True)
class Method(Declaration):
    """A registered merge method: `function(tensors, **parameters, **context) -> Tensor`.

    Attributes:
        mixing (`Callable`, *optional*): `mixing(parameters, count) -> list[float]`, the coefficient each ingredient
            gets, for methods that are linear combinations (recorded in `soup.json` and the model card).
    """

    mixing: Callable[[dict[str, Any], int], list[float]] | None = None
    statistics: Callable[..., dict[str, Any]] | None = None
    layout: Callable[..., list[tuple[str, int, str]]] | None = None
    configure: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None

    @property
    def needs_base(self) -> bool:
        return "base" in self.context

    @property
    def needs_data(self) -> bool:
        """Whether the method computes statistics on data (it then needs the recipe's `evaluation:`)."""
        return self.statistics is not None


def declare(
    function: Callable[..., Any], name: str, what: str
) -> tuple[dict[str, inspect.Parameter], tuple[str, ...]]:
    """Read a registered function's signature: one positional argument (`what`), then keyword-only parameters.

    Returns the recipe parameters and the engine-supplied context names.
    """
    if not name.isidentifier() or name != name.lower():
        raise SoupError(f"name {name!r} must be a lower-case identifier, e.g. 'task_arithmetic'")
    signature = inspect.signature(function)
    hints = typing.get_type_hints(function)
    positional = [
        p
        for p in signature.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) != 1:
        raise SoupError(
            f"{name!r} must take {what} as its one positional argument and its parameters as keyword-only "
            "arguments (def f(first, *, weight: float = 1.0))"
        )
    parameters, context = {}, []
    for parameter in signature.parameters.values():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        if parameter.name in CONTEXT:
            context.append(parameter.name)
        else:
            parameters[parameter.name] = parameter.replace(annotation=hints.get(parameter.name, Any))
    return parameters, tuple(context)


def _scalar(annotation: Any) -> bool:
    if annotation in (float, int):
        return True
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return False
    args = typing.get_args(annotation)
    return all(a in (float, int, type(None)) for a in args) and any(a in (float, int) for a in args)


def _check_type(method: str, name: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a simple annotation (float, int, bool, str, Literal, list[float], optional)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(method, name, value, arg)
            except SoupError as error:
                errors.append(str(error))
        raise SoupError(errors[0])
    if origin is typing.Literal:
        if value not in args:
            raise SoupError(f"method {method!r}: {name} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SoupError(f"method {method!r}: {name} must be a list, got {type(value).__name__} {value!r}")
        return [_check_type(method, f"{name}[{i}]", item, args[0] if args else Any) for i, item in enumerate(value)]
    if annotation in (float, int) and isinstance(value, list):
        return validate(value, f"method {method!r}: {name}")
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SoupError(f"method {method!r}: {name} must be a number, got {type(value).__name__} {value!r}")
        number = float(value) if abs(value) < 1e300 else math.inf  # int → float overflows past ~1e308
        if not math.isfinite(number):
            raise SoupError(f"method {method!r}: {name} must be a finite number, got {value!r:.60}")
        return number
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SoupError(f"method {method!r}: {name} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation in (bool, str, list, dict) and not isinstance(value, annotation):
        raise SoupError(
            f"method {method!r}: {name} must be a {annotation.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


METHODS: dict[str, Method] = {}


def register_method(
    name: str | None = None,
    *,
    check: Callable[[dict[str, Any], int], dict[str, Any]] | None = None,
    mixing: Callable[[dict[str, Any], int], list[float]] | None = None,
    statistics: Callable[..., dict[str, Any]] | None = None,
    layout: Callable[..., list[tuple[str, int, str]]] | None = None,
    configure: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None,
    overwrite: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a merge method; its signature declares its parameters.

    Args:
        name (`str`, *optional*): the recipe name; defaults to the function name.
        check (`Callable`, *optional*): `check(parameters, count) -> parameters` for value checks.
        mixing (`Callable`, *optional*): `mixing(parameters, count) -> list[float]` for linear methods.
        statistics (`Callable`, *optional*): `statistics(kitchen, scorer, split, parameters) -> {name: tensor}`, run
            with each ingredient loaded in the resident model; the method then takes `statistics` (see `CONTEXT`).
        layout (`Callable`, *optional*): `layout(parameters, readers) -> [(output name, ingredient, source name)]`
            for methods that rearrange tensors instead of merging same-named ones (passthrough); the function then
            receives the one source tensor of each output tensor.
        configure (`Callable`, *optional*): `configure(config, parameters) -> config`, fixes up the soup's config.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing method of that name.

    Example:

    ```python
    >>> @register_method("halfway")
    ... def halfway(tensors, *, t: float = 0.5):
    ...     "Linear interpolation of two ingredients."
    ...     return torch.lerp(tensors[0], tensors[1], t)
    ```
    """

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        method_name = name or function.__name__
        if method_name in METHODS and not overwrite:
            raise SoupError(f"method {method_name!r} is already registered; pass overwrite=True to replace it")
        parameters, context = declare(function, method_name, "the list of tensors")
        if statistics is not None and "statistics" not in context:
            raise SoupError(f"method {method_name!r} has a statistics hook but no `statistics` keyword argument")
        METHODS[method_name] = Method(
            method_name, function, parameters, context, check, mixing, statistics, layout, configure
        )
        return function

    return decorate


def get_method(name: str) -> Method:
    """The registered method called `name`; the error lists every registered method."""
    if not isinstance(name, str) or name not in METHODS:
        raise SoupError(f"unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def list_methods() -> list[Method]:
    """Every registered method, by name."""
    return [METHODS[name] for name in sorted(METHODS)]
