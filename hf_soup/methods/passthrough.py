"""Passthrough ("frankenmerge"): stack layer ranges of several ingredients into one deeper (or shallower) model.

```yaml
method: passthrough
ingredients: [runs/a, runs/b]
slices:                        # half-open layer ranges [start, end), stacked in this order
  - {ingredient: 0, layers: [0, 4]}
  - {ingredient: 1, layers: [2, 6]}
rest: 0                        # embeddings, final norm and head come from this ingredient (default 0)
```
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import SoupError
from ..schedules import LAYER
from .registry import register_method


def _layers_of(reader) -> dict[int, list[str]]:
    layers: dict[int, list[str]] = {}
    for name in reader.names():
        match = LAYER.search(name)
        if match is not None:
            layers.setdefault(int(match.group(1)), []).append(name)
    return layers


def check_slices(parameters: dict[str, Any], count: int) -> dict[str, Any]:
    slices = parameters["slices"]
    if not slices:
        raise SoupError("passthrough: `slices` must list at least one {ingredient: INDEX, layers: [START, END]}")
    for i, item in enumerate(slices):
        if not isinstance(item, dict) or set(item) != {"ingredient", "layers"}:
            raise SoupError(
                f"passthrough: slices[{i}] must be {{ingredient: INDEX, layers: [START, END]}}, got {item!r}"
            )
        index, layers = item["ingredient"], item["layers"]
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise SoupError(f"passthrough: slices[{i}].ingredient must be an index in 0..{count - 1}, got {index!r}")
        if (
            not isinstance(layers, list)
            or len(layers) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers)
            or not 0 <= layers[0] < layers[1]
        ):
            raise SoupError(
                f"passthrough: slices[{i}].layers must be [START, END) with 0 ≤ START < END, got {layers!r}"
            )
    if not 0 <= parameters["rest"] < count:
        raise SoupError(f"passthrough: rest must be an ingredient index in 0..{count - 1}, got {parameters['rest']}")
    return parameters


def layout(parameters: dict[str, Any], readers: Sequence[Any]) -> list[tuple[str, int, str]]:
    """(output name, ingredient index, source name) for every tensor of the stacked model, in output order."""
    rest = parameters["rest"]
    out: list[tuple[str, int, str]] = []
    stacked: list[tuple[str, int, str]] = []
    position = 0
    for item in parameters["slices"]:
        index, (start, end) = item["ingredient"], item["layers"]
        layers = _layers_of(readers[index])
        missing = [layer for layer in range(start, end) if layer not in layers]
        if missing:
            raise SoupError(
                f"passthrough: ingredient {readers[index].label} has no layer {missing[0]} "
                f"(it has layers 0..{max(layers, default=-1)})"
            )
        for layer in range(start, end):
            for name in layers[layer]:
                renamed = re.sub(
                    LAYER, lambda m, p=position: m.group(0).replace(f".{m.group(1)}.", f".{p}."), name, count=1
                )
                stacked.append((renamed, index, name))
            position += 1
    first_layer = True
    for name in readers[rest].names():
        if LAYER.search(name) is None:
            out.append((name, rest, name))
        elif first_layer:
            out.extend(stacked)
            first_layer = False
    return out


@register_method("passthrough", check=check_slices, layout=layout, configure=lambda c, p: fix_config(c, p))
def passthrough(tensors: list[torch.Tensor], *, slices: list, rest: int = 0) -> torch.Tensor:
    """Copy each output tensor from the one ingredient layer it comes from (see `layout`); nothing is averaged.

    Args:
        slices (`list`): `{ingredient: INDEX, layers: [START, END)}` ranges, stacked in order and renumbered.
        rest (`int`, *optional*, defaults to 0): the ingredient whose non-layer tensors (embeddings, final norm,
            head) and config are used; the config's layer count is set to the stacked depth.
    """
    return tensors[0].clone()


def stacked_depth(parameters: dict[str, Any]) -> int:
    return sum(end - start for item in parameters["slices"] for start, end in [item["layers"]])


def fix_config(config: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """The `rest` ingredient's config with the stacked layer count (and per-layer lists) set."""
    depth = stacked_depth(parameters)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            config[key] = depth
    if isinstance(config.get("layer_types"), list):
        types = config["layer_types"]
        config["layer_types"] = [
            types[layer] for item in parameters["slices"] for layer in range(*item["layers"]) if layer < len(types)
        ]
    return config
