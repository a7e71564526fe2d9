"""Tasting: what a strategy works with — the ingredients, ONE resident model, a scorer and the selection split.

Candidate soups are written into the resident model tensor by tensor, reading the ingredients lazily; the
ingredients are never all held in memory. Individual scores and outputs are cached, so the report and the
ensembles reuse what the strategy already computed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

import torch

from ..checkpoint import FLOAT_DTYPES, CheckpointReader
from ..kitchen import Kitchen
from ..pantry import Ingredient
from ..scoring import Batches, Scorer

logger = logging.getLogger(__name__)

Coefficients = Sequence[float] | Callable[[str], Sequence[float]]


def metric_stem(name: str | None) -> str:
    """`"eval_accuracy"` → `"accuracy"`: the Trainer prefixes metric names with the split."""
    return re.sub(r"^(eval|test|validation)_", "", name or "")


class Tasting:
    """The context a strategy tastes candidates in.

    Args:
        ingredients (`list[Ingredient]`), readers (`list[CheckpointReader]`): in recipe order.
        kitchen (`Kitchen`): the resident model.
        scorer (`Scorer`): scores the resident model on a split.
        split (`str`): the selection split.
        reuse_recorded (`bool`, *optional*, defaults to `True`): use an ingredient's recorded score (from the
            pantry) when it was measured on the selection split with the same metric.
    """

    def __init__(
        self,
        ingredients: Sequence[Ingredient],
        readers: Sequence[CheckpointReader],
        kitchen: Kitchen,
        scorer: Scorer,
        split: str,
        *,
        reuse_recorded: bool = True,
    ):
        self.ingredients = list(ingredients)
        self.readers = list(readers)
        self.kitchen = kitchen
        self.scorer = scorer
        self.split = split
        self.reuse_recorded = reuse_recorded
        self.names = readers[0].names()
        self._outputs: dict[tuple[int, str], Batches] = {}
        self._scores: dict[int, float] = {}
        self.recorded: set[int] = set()

    @property
    def count(self) -> int:
        return len(self.ingredients)

    @property
    def evaluations(self) -> int:
        return self.scorer.evaluations

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

    def load_ingredient(self, index: int) -> None:
        """Write one ingredient into the resident model."""
        reader = self.readers[index]
        for name in self.names:
            self.kitchen.write(name, reader.get(name))

    def taste(self, coefficients: Coefficients) -> float:
        """Score the soup Σᵢ cᵢ θᵢ on the selection split."""
        self.mix(coefficients)
        return self.scorer.score(self.kitchen.model, self.split)

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
            and metric_stem(ingredient.metric) == metric_stem(self.scorer.metric.name)
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
