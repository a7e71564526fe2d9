"""How a tasting of adapters applies a candidate soup to each LoRA module: in place or as branches, by cost.

A LoRA module of an `out × in` weight W holding k adapters of summed rank R = Σᵢ rᵢ can taste the soup
W + Σᵢ cᵢ Bᵢ Aᵢ (cᵢ = wᵢ sᵢ) two ways:

- **in place**: ΔW = Σᵢ cᵢ Bᵢ Aᵢ is formed once (R·out·in multiply-adds) and W + ΔW is written into the base weight,
  so every token then costs one dense product, as in a full model;
- **branches**: W x + Σᵢ cᵢ Bᵢ (Aᵢ x) for every token: R·(in + out) extra multiply-adds per token, and for each of
  the k adapters elementwise passes over the `out` outputs (scale, add; in a backward pass also the scaling's
  gradient), which run far below a matrix product's speed (`ELEMENTWISE`).

Scoring forms ΔW once per candidate for the whole split, so in place wins as soon as the split has more tokens than
about half the layer's width: almost always. A learned soup needs the gradient with respect to the coefficients at
every step: in place it comes from the weight's gradient (out·in per token, plus forming ΔW and the k dot products
⟨∂L/∂W, sᵢ Bᵢ Aᵢ⟩ per step); with branches from the branches' own backward. So for learning, branches win while the
adapters are few and the ranks summed small against a wide layer (a 4096-wide model with two rank-16 adapters), and
in place wins for narrower layers or more adapters (MiniLM's 384 with six rank-8 adapters: measured 16 % faster per
step than branches in `scripts/bench_strategies.py`, where counting multiply-adds alone predicted branches). An
embedding's branch costs R·(1 + out) per token (its A is a lookup). The plan is made per module (`plan`) and
recorded in the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import SoupError, brief, did_you_mean

MIXINGS = ("auto", "in_place", "branches")


# Multiply-adds that one elementwise pass over one activation entry costs, against a matrix product's: such passes
# are bound by memory, not arithmetic. Calibrated with `scripts/bench_strategies.py --rounds` (2 CPU cores, MiniLM).
ELEMENTWISE = 16
# Elementwise passes per adapter and output entry: forward (scale, add), and forward + backward for a learned step.
PASSES = {"scoring": 2, "learning": 6}


@dataclass(frozen=True)
class ModuleShape:
    """What the cost of one LoRA module depends on.

    Attributes:
        entries (`int`): entries of the base weight (out × in; × kernel size for a convolution).
        branch (`int`): multiply-adds per token of one rank-1 branch (in + out; 1 + out for an embedding).
        rank (`int`): the ranks of the adapters on this module, summed (R = Σᵢ rᵢ).
        adapters (`int`): the adapters on this module (k).
        out (`int`): outputs per token (out features, channels, or the embedding's width).
        in_place (`bool`): whether the soup can be written into the base weight (a plain resident weight, tied to
            no other).
    """

    entries: int
    branch: int
    rank: int
    adapters: int
    out: int
    in_place: bool


def costs(shape: ModuleShape, tokens: int, *, learning: bool) -> dict[str, int]:
    """Multiply-adds (elementwise passes weighted by `ELEMENTWISE`) of tasting one module in place and with
    branches, for `tokens` tokens per formed soup (the whole split when scoring, one batch per step when learning)."""
    elementwise = ELEMENTWISE * shape.adapters * shape.out * PASSES["learning" if learning else "scoring"]
    if learning:  # the weight's gradient, ΔW and the k dot products; the branches forward and backward
        return {
            "in_place": (tokens + 2 * shape.rank + 4 * ELEMENTWISE) * shape.entries,
            "branches": tokens * (2 * shape.rank * shape.branch + elementwise),
        }
    return {
        "in_place": (shape.rank + 3 * ELEMENTWISE) * shape.entries,  # ΔW, then add W, write
        "branches": tokens * (shape.rank * shape.branch + elementwise),
    }


def plan(
    shapes: Mapping[str, ModuleShape], tokens: int, *, learning: bool, mixing: str = "auto"
) -> tuple[set[str], dict[str, int]]:
    """The modules tasted in place (the others keep branches) and the record of the choice: `mixing` `"auto"` takes
    the cheaper way per module (`costs`), `"in_place"` every module that allows it, `"branches"` none."""
    check_mixing(mixing)
    chosen: set[str] = set()
    totals = {"in_place": 0, "branches": 0}
    for name, shape in shapes.items():
        cost = costs(shape, tokens, learning=learning)
        if shape.in_place and (mixing == "in_place" or (mixing == "auto" and cost["in_place"] < cost["branches"])):
            chosen.add(name)
        totals["in_place" if name in chosen else "branches"] += cost["in_place" if name in chosen else "branches"]
    record = {
        "in_place": len(chosen),
        "branches": len(shapes) - len(chosen),
        "tokens": tokens,
        "multiply_adds": totals["in_place"] + totals["branches"],
        "multiply_adds_all_branches": sum(costs(s, tokens, learning=learning)["branches"] for s in shapes.values()),
    }
    return chosen, record


def check_mixing(mixing: str) -> None:
    """Refuse a `mixing` that is none of `MIXINGS`."""
    if mixing not in MIXINGS:
        raise SoupError(
            f"adapter mixing {brief(mixing)}{did_you_mean(mixing, MIXINGS)} is unknown; use {', '.join(MIXINGS)}"
        )
