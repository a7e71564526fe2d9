"""Per-tensor values of a scalar method parameter: a gradient over layer depth, and overrides by tensor name.

```yaml
t: 0.5                                   # one value everywhere
t: [0.0, 0.5, 1.0]                       # interpolated over depth: first layer 0.0, middle 0.5, last layer 1.0
t:                                       # by tensor name: the first filter contained in the name wins
  - {filter: self_attn, value: [0.0, 1.0]}
  - {filter: mlp, value: 0.3}
  - {value: 0.5}                         # everything else
```

A tensor's depth is its layer index (`layers.3.`, `layer.3.`, `h.3.`, `blocks.3.`) over the number of layers;
tensors outside the layers sit at depth 0 when their name contains "embed", else at depth 1 (final norm, heads).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .errors import SoupError

LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def is_schedule(value: Any) -> bool:
    """Whether a parameter value is a schedule (a list) rather than one number."""
    return isinstance(value, list)


def _numbers(value: Any, where: str) -> list[float]:
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise SoupError(
            f"{where} must be a number or a non-empty list of numbers (a gradient over depth), got {value!r}"
        )
    if not all(abs(v) < 1e300 for v in values):  # NaN, ±inf and integers a float cannot hold
        raise SoupError(f"{where} must hold finite numbers, got {value!r:.80}")
    return [float(v) for v in values]


def validate(value: list, where: str) -> list:
    """Check a schedule's shape; returns it with numbers as floats."""
    if all(not isinstance(item, Mapping) for item in value):
        return _numbers(value, where)
    checked = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or "value" not in item or set(item) - {"filter", "value"}:
            raise SoupError(
                f"{where}[{i}] must be {{filter: TEXT, value: NUMBER or [NUMBERS]}} (the last may omit filter), "
                f"got {item!r}"
            )
        if "filter" in item and (not isinstance(item["filter"], str) or not item["filter"]):
            raise SoupError(f"{where}[{i}].filter must be a non-empty string contained in tensor names")
        checked.append({**item, "value": _numbers(item["value"], f"{where}[{i}].value")})
    return checked


def values_in(value: Any) -> list[float]:
    """Every number a parameter value mentions (for range checks)."""
    if not is_schedule(value):
        return [value]
    return [v for item in value for v in (item["value"] if isinstance(item, Mapping) else [item])]


def depth(name: str, layer_count: int) -> float:
    """Position of a tensor in [0, 1] along the model's depth."""
    match = LAYER.search(name)
    if match is None:
        return 0.0 if "embed" in name else 1.0
    return int(match.group(1)) / max(layer_count - 1, 1)


def value_at(value: Any, name: str, layer_count: int) -> Any:
    """The value a parameter takes for tensor `name`."""
    if not is_schedule(value):
        return value
    if all(isinstance(item, Mapping) for item in value):
        chosen = next((item for item in value if "filter" not in item or item["filter"] in name), None)
        if chosen is None:
            raise SoupError(f"no entry of a filtered schedule matches tensor {name}; end the list with {{value: ...}}")
        value = chosen["value"]
    points = value if isinstance(value, list) else [value]
    if len(points) == 1:
        return points[0]
    return float(np.interp(depth(name, layer_count), np.linspace(0.0, 1.0, len(points)), points))


def layer_count(names: Iterable[str]) -> int:
    indices = [int(m.group(1)) for m in map(LAYER.search, names) if m is not None]
    return max(indices) + 1 if indices else 1


def per_tensor(parameters: Mapping[str, Any], scalar: Iterable[str], names: Iterable[str]):
    """`parameters` itself when no scalar parameter is scheduled, else a function tensor name → parameters."""
    scheduled = [key for key in scalar if is_schedule(parameters.get(key))]
    if not scheduled:
        return dict(parameters)
    count = layer_count(names)
    return lambda name: {key: value_at(v, name, count) if key in scheduled else v for key, v in parameters.items()}
