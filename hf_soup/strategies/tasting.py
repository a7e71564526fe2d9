"""Tasting: what a strategy works with — the ingredients, ONE resident model, a scorer and the selection split.

Candidate soups are written into the resident model tensor by tensor, reading the ingredients lazily; the
ingredients are never all held in memory. Individual scores and outputs are cached, so the report and the
ensembles reuse what the strategy already computed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from ..checkpoint import FLOAT_DTYPES, CheckpointReader
from ..errors import SoupError
from ..ingredient import Ingredient
from ..kitchen import Kitchen
from ..merge import Parameters, merge_tensor
from ..methods import get_method
from ..scoring import Batches, Scorer
from .registry import StrategyResult

logger = logging.getLogger(__name__)

Coefficients = Sequence[float] | Callable[[str], Sequence[float]]

# What a tasting can do for a strategy. A tasting declares the ones it supports (`Tasting.capabilities`), a strategy
# the ones it needs given its parameters (`register_strategy(needs=...)`); `Tasting.require` checks one against the
# other before the strategy runs.
CAPABILITIES = {
    "mix": "write and score linear soups Σᵢ cᵢ θᵢ (`mix`, `taste`, `taste_uniform`, `groups`)",
    "backward": "give the loss's gradient with respect to the mixing coefficients (`backward`)",
    "apply": "write the soup of any data-free method, tensor by tensor (`apply`: ties, slerp, dare, ...)",
}


def metric_stem(name: str | None, split: str | None = None) -> str:
    """`"eval_accuracy"` → `"accuracy"`: the Trainer prefixes metric names with `eval_` (or the split), and with a
    dict of eval datasets also with the dataset's name: `"eval_validation_accuracy"` → `"accuracy"` for `split`
    `"validation"`."""
    stem = re.sub(r"^(eval|test|validation)_", "", name or "")
    return stem.removeprefix(f"{split}_") if split else stem


class Tasting:
    """The context a strategy tastes candidates in (full models, streamed from their checkpoints).

    Strategies use only this interface, so another kind of ingredient (peft adapters) plugs in with its own class:
    `ingredients`, `count`, `scorer`, `split`, `evaluations`, `recorded` (indices whose score came from the
    pantry), `ranking()`, `score(i)`, `outputs(i, split)`, and what its `capabilities` say (see `CAPABILITIES`):
    `mix(coefficients)`, `taste(coefficients)`, `taste_uniform(members)`, `groups(granularity)` (`"mix"`),
    `backward(alpha, groups, batch, beta)` (`"backward"`) and `apply(method, parameters, chosen)` (`"apply"`: any
    method, not only linear ones). Full models support all three; ask with `supports(capability)`.

    Args:
        ingredients (`list[Ingredient]`), readers (`list[CheckpointReader]`): in recipe order.
        kitchen (`Kitchen`): the resident model.
        scorer (`Scorer`): scores the resident model on a split.
        split (`str`): the selection split.
        reuse_recorded (`bool`, *optional*, defaults to `True`): use an ingredient's recorded score (from the
            pantry) when it was measured on the selection split with the same metric.
        base (`CheckpointReader`, *optional*): the base model, for methods that need it (`apply`).
        seed (`int`, *optional*, defaults to 0): the recipe's seed, for methods that draw random numbers (`apply`).
    """

    capabilities: ClassVar[frozenset[str]] = frozenset({"mix", "backward", "apply"})
    # For each capability a subclass drops: why this kind of tasting lacks it, and what to do instead.
    lacking: ClassVar[Mapping[str, str]] = {}

    def __init__(
        self,
        ingredients: Sequence[Ingredient],
        readers: Sequence[CheckpointReader],
        kitchen: Kitchen,
        scorer: Scorer,
        split: str,
        *,
        reuse_recorded: bool = True,
        base: CheckpointReader | None = None,
        seed: int = 0,
    ):
        self.ingredients = list(ingredients)
        self.base = base
        self.seed = seed
        self.readers = list(readers)
        self.kitchen = kitchen
        self.scorer = scorer
        self.split = split
        self.reuse_recorded = reuse_recorded
        self.names = readers[0].names()
        self._outputs: dict[tuple[int, str], Batches] = {}
        self._sum: dict[str, torch.Tensor] = {}  # fp32 running sum of the ingredients in self._summed
        self._summed: list[int] = []
        self._scores: dict[int, float] = {}
        self.recorded: set[int] = set()

    @property
    def count(self) -> int:
        return len(self.ingredients)

    @property
    def evaluations(self) -> int:
        return self.scorer.evaluations

    # -- capabilities --------------------------------------------------------------------------------------------
    def supports(self, capability: str) -> bool:
        """Whether this tasting can do `capability` (one of `CAPABILITIES`: `"mix"`, `"backward"`, `"apply"`).

        Example:

        ```python
        >>> tasting.supports("apply")  # full models
        True
        >>> adapter_tasting.supports("apply")  # only linear soups are tasted in adapter space
        False
        ```
        """
        if capability not in CAPABILITIES:
            raise SoupError(f"unknown tasting capability {capability!r}; known: {', '.join(CAPABILITIES)}")
        return capability in self.capabilities

    def require(self, needs: Mapping[str, str], who: str) -> None:
        """Refuse what this tasting cannot do: `needs` maps each capability `who` (a strategy) needs to why it needs
        it; the `SoupError` gives that reason, why this tasting lacks the capability and what to do instead."""
        for capability, why in needs.items():
            if not self.supports(capability):
                lack = self.lacking.get(capability, f"{type(self).__name__} cannot {CAPABILITIES[capability]}")
                raise SoupError(f"{who}: {why}, and {lack}")

    def summary(self) -> dict[str, Any]:
        """What the report records about this tasting: the resident model's dtype."""
        return {"dtype": str(self.kitchen.dtype).removeprefix("torch.")}

    # -- writing candidates --------------------------------------------------------------------------------------
    def mix(self, coefficients: Coefficients) -> None:
        """Write Σᵢ cᵢ θᵢ into the resident model (per tensor; `coefficients` may depend on the tensor name)."""
        for name in self.names:
            weights = coefficients(name) if callable(coefficients) else coefficients
            self.kitchen.write(name, self.combine(name, weights))

    def combine(self, name: str, weights: Sequence[float]) -> torch.Tensor:
        """Σᵢ wᵢ θᵢ[name] in fp32 (ingredients with weight 0 are not read); non-float tensors are copied."""
        first = self.readers[0]
        if first.info(name).dtype not in FLOAT_DTYPES:
            return first.get(name)
        out = None
        for reader, weight in zip(self.readers, weights):
            if weight == 0:
                continue
            tensor = reader.get(name).float()  # may be a view of the file mapping: never modified in place
            out = tensor * weight if out is None else out.add_(tensor, alpha=weight)
        return out if out is not None else torch.zeros(first.info(name).shape)

    def apply(
        self, method: str, parameters: Parameters, chosen: Sequence[int] | None = None, *, cache: Any = None
    ) -> None:
        """Write the soup of a registered method over `chosen` (default: all) into the resident model, tensor by
        tensor with the streaming engine's `merge_tensor`: the same tensors the cook then writes to disk.

        `cache` (a search's `TrialCache`, over all the ingredients) gives the tensors it holds instead, the same.
        """
        self.require({"apply": f"a {method!r} soup is written tensor by tensor"}, "apply")
        declared = get_method(method)
        if declared.needs_data or declared.layout is not None:
            raise SoupError(
                f"method {method!r} cannot be tasted candidate by candidate (it needs statistics from data or "
                "rearranges layers); choose a data-free method that merges same-named tensors"
            )
        if declared.needs_base and self.base is None:
            raise SoupError(f"method {method!r} needs the base model: add `base_model:` to the recipe")
        readers = self.readers if chosen is None else [self.readers[i] for i in chosen]
        cache = cache if chosen is None else None
        for name in self.names:
            value = cache.merge(name, parameters) if cache is not None else None
            if value is None:
                value = merge_tensor(name, readers, declared, parameters, base=self.base, seed=self.seed)
            self.kitchen.write(name, value)

    def load_ingredient(self, index: int) -> None:
        """Write one ingredient into the resident model."""
        reader = self.readers[index]
        for name in self.names:
            self.kitchen.write(name, reader.get(name))

    def taste(self, coefficients: Coefficients) -> float:
        """Score the soup Σᵢ cᵢ θᵢ on the selection split."""
        self.mix(coefficients)
        return self.scorer.score(self.kitchen.model, self.split)

    def taste_uniform(self, members: Sequence[int]) -> float:
        """Score the uniform soup of `members` (in that order) on the selection split.

        An fp32 running sum of a prefix of `members` is kept between calls and extended lazily, so a greedy pass
        reads one candidate (plus, after an acceptance, the accepted one) per call instead of every member; the
        result is bit-identical to the `uniform` method over the same members in the same order.
        """
        members = list(members)
        if self._summed != members[: len(self._summed)]:
            self._sum, self._summed = {}, []
        floats = set(self.groups("global"))
        for index in members[len(self._summed) : -1]:
            first, reader = not self._summed, self.readers[index]
            for name in floats:
                tensor = reader.get(name).float()
                self._sum[name] = tensor.clone() if first else self._sum[name].add_(tensor)
            self._summed.append(index)
        last = self.readers[members[-1]]
        for name in self.names:
            if name in floats:
                tensor = last.get(name).float()
                value = torch.add(self._sum[name], tensor).div_(len(members)) if self._summed else tensor
            else:
                value = last.get(name)
            self.kitchen.write(name, value)
        return self.scorer.score(self.kitchen.model, self.split)

    def groups(self, granularity: str) -> dict[str, int]:
        """Which coefficient row each floating tensor uses: its own (`"layer"`) or one for all (`"global"`)."""
        floats = [n for n in self.names if self.readers[0].info(n).dtype in FLOAT_DTYPES]
        return {name: (i if granularity == "layer" else 0) for i, name in enumerate(floats)}

    def backward(
        self, alpha: torch.Tensor, groups: dict[str, int], batch: dict[str, torch.Tensor], beta: torch.Tensor
    ) -> tuple[float, torch.Tensor]:
        """Loss of the soup Σᵢ α[g(t), i] θᵢ on `batch` (logits scaled by `beta`, whose gradient is accumulated),
        and dots[g, i] = ∂loss/∂α[g, i] = Σ_{t in g} ⟨∂loss/∂θ_t, θᵢ_t⟩, streamed ingredient by ingredient.
        """
        if self.kitchen.offloaded:
            raise SoupError("a learned soup needs every weight resident (GPU or CPU): give a device_map without disk")
        k = self.count
        self.mix(lambda name: alpha[groups[name]].tolist() if name in groups else [1.0] + [0.0] * (k - 1))
        model = self.kitchen.model
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        logits = self.scorer.task.training_outputs(model, batch) * beta
        loss = self.scorer.task.training_loss(logits, batch["labels"].to(logits.device), self.scorer.causal)
        loss.backward()
        dots = torch.zeros(alpha.shape)
        for name, group in groups.items():
            parameter = self.kitchen.parameter(name)
            if parameter is None or parameter.grad is None:
                continue
            flat = parameter.grad.detach().float().cpu().reshape(-1)
            for i, reader in enumerate(self.readers):
                dots[group, i] += torch.dot(flat, reader.get(name).float().reshape(-1))
        for parameter in model.parameters():
            parameter.grad = None
            parameter.requires_grad_(False)
        return loss.item(), dots

    # -- individual ingredients ----------------------------------------------------------------------------------
    def outputs(self, index: int, split: str) -> Batches:
        """The outputs of ingredient `index` on `split` (cached)."""
        key = (index, split)
        if key not in self._outputs:
            self.load_ingredient(index)
            self._outputs[key] = self.scorer.outputs(self.kitchen.model, split)
        return self._outputs[key]

    def recorded_score(self, index: int) -> float | None:
        """The pantry's score of an ingredient when it was measured on this split with this metric."""
        ingredient = self.ingredients[index]
        if (
            self.reuse_recorded
            and ingredient.value is not None
            and ingredient.split == self.split
            and metric_stem(ingredient.metric, ingredient.split) == metric_stem(self.scorer.metric.name)
        ):
            return float(ingredient.value)
        return None

    def score(self, index: int) -> float:
        """Selection-split score of one ingredient: recorded when reusable, else evaluated (cached)."""
        if index not in self._scores:
            recorded = self.recorded_score(index)
            if recorded is not None:
                self._scores[index] = recorded
                self.recorded.add(index)
            else:
                self._scores[index] = self.scorer.compute(self.outputs(index, self.split))
        return self._scores[index]

    def ranking(self) -> list[int]:
        """Ingredient indices, best selection score first (ties keep recipe order)."""
        scores = [self.score(i) for i in range(self.count)]
        sign = -1 if self.scorer.metric.greater_is_better else 1
        return sorted(range(self.count), key=lambda i: (sign * scores[i], i))


def serve(tasting: Tasting, soup: Coefficients | StrategyResult) -> None:
    """Write a soup into the resident model: a linear one by its coefficients (any tasting), another method's
    (ties, slerp, ...) tensor by tensor with that method (full-model tastings)."""
    if not isinstance(soup, StrategyResult):
        tasting.mix(soup)
        return
    coefficients = soup.coefficients(tasting.count)
    if coefficients is not None:
        tasting.mix(coefficients)
    elif tasting.supports("apply"):
        tasting.apply(soup.method, soup.parameters, soup.chosen)
    else:
        raise SoupError(
            f"a {soup.method!r} soup cannot be tasted on these ingredients; only linear soups (uniform, weighted) "
            "are tasted in adapter space"
        )
