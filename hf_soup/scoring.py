"""Scorers: a resident model + an evaluation split → a number (and a per-split report).

Splits are preprocessed once, when the scorer is made, and their rows sorted by length (longest first, stable) when
the metric does not depend on the rows' order and the padding is masked (`Task.lengths`): every batch is then padded
to nearly its own length (dynamic padding) and every model is scored over the same order, so ensembles still average
the same rows. Batches are collated once
and kept (within `BATCH_CACHE_BYTES`); forward passes run under `torch.inference_mode`. Under `accelerate launch`
each process scores a contiguous shard of the split and the outputs are gathered in order, so every process computes
the same number.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import SoupError, did_you_mean, first_line
from .tasks import Batches, Task, collate, flat, get_task, preprocess_split

# Collated batches a scorer keeps for reuse by every candidate (beyond this, batches are collated at each scoring).
BATCH_CACHE_BYTES = 512 * 2**20


def process_state():
    """accelerate's process state; on a machine without GPUs it must be asked for CPU processes (gloo), or a
    `accelerate launch` run would look like one process."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


@dataclass
class Metric:
    """A named metric over `(logits, labels)` batches with its direction. `order_free`: the number does not depend
    on the order of the rows (built-in metrics); a user's `compute_metrics` or `evaluate` module may, so the scorer
    keeps the split's order for it."""

    name: str
    compute: Callable[[Batches, bool], float]
    greater_is_better: bool
    order_free: bool = False


def make_metric(
    metric: str | Callable | None,
    *,
    task: Task,
    greater_is_better: bool | None = None,
    key: str | None = None,
    trust_remote_code: bool = False,
) -> Metric:
    """A `Metric` from a name the task builds in (`task.metrics`), an `evaluate` module (local path; a Hub name only
    with `trust_remote_code`, as its Python code is downloaded and run), a Trainer-style
    `compute_metrics(EvalPrediction) -> dict` callable, or `"module:function"` naming one."""
    metric = metric or task.default_metric
    builtin = task.metrics
    if isinstance(metric, str) and metric in builtin:
        function, direction = builtin[metric]
        return Metric(metric, function, direction if greater_is_better is None else greater_is_better, True)
    if isinstance(metric, str) and ":" in metric and not os.path.exists(metric):
        module_name, _, attribute = metric.partition(":")
        try:
            metric = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError, TypeError) as error:
            raise SoupError(
                f"cannot import compute_metrics {metric!r} ({error}); write it as 'module:function'"
            ) from None
    if callable(metric):
        return _callable_metric(metric, task, greater_is_better, key)
    return _evaluate_metric(str(metric), task, greater_is_better, key, trust_remote_code)


def _pick(values: Mapping[str, Any], key: str | None, where: str) -> float:
    if key is None:
        if len(values) != 1:
            raise SoupError(f"{where} returned {sorted(values)}; say which one to use with metric_key")
        key = next(iter(values))
    if key not in values:
        raise SoupError(f"{where} returned no {key!r} (it returned {sorted(values)}); fix metric_key")
    return float(values[key])


def _callable_metric(function: Callable, task: Task, greater_is_better: bool | None, key: str | None) -> Metric:
    from transformers import EvalPrediction

    if greater_is_better is None:
        raise SoupError("a compute_metrics callable needs greater_is_better: true or false")
    name = getattr(function, "__name__", "compute_metrics")

    def compute(batches: Batches, causal: bool) -> float:
        logits, labels = (
            _padded(batches)
            if batches[0][0].dim() == 3 and batches[0][1].dim() == 2  # per-token logits: causal, token classes
            else (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
        )
        values = function(EvalPrediction(predictions=logits.numpy(), label_ids=labels.numpy()))
        return _pick(values, key, name)

    return Metric(key or name, compute, greater_is_better)


def _padded(batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(b[0].shape[1] for b in batches)
    logits = torch.cat([torch.nn.functional.pad(lg, (0, 0, 0, length - lg.shape[1])) for lg, _ in batches])
    labels = torch.cat([torch.nn.functional.pad(lb, (0, length - lb.shape[1]), value=-100) for _, lb in batches])
    return logits, labels


def _evaluate_metric(
    name: str, task: Task, greater_is_better: bool | None, key: str | None, trust_remote_code: bool
) -> Metric:
    builtin = task.metrics
    if not os.path.exists(name) and not trust_remote_code:
        raise SoupError(
            f"metric {name!r}{did_you_mean(name, builtin)} is not built in for {task.name} ({', '.join(builtin)}) "
            "nor a local evaluate module; an evaluate module from the Hub runs downloaded Python code, so hf_soup "
            "loads one only with trust_remote_code: true in the recipe; or give a compute_metrics 'module:function'"
        )
    import evaluate

    try:
        module = evaluate.load(name)
    except Exception as error:  # noqa: BLE001 - evaluate raises many kinds of errors when offline or missing
        local = " (a local path)" if Path(name).exists() else ""
        raise SoupError(
            f"cannot load evaluate metric {name!r}{local}{did_you_mean(name, builtin)}: "
            f"{first_line(error)}; offline, use a built-in metric "
            f"({', '.join(builtin)}), an evaluate module folder or script by local path, or a compute_metrics "
            "callable"
        ) from None
    if greater_is_better is None:
        raise SoupError(f"evaluate metric {name!r}: say greater_is_better: true or false")

    def compute(batches: Batches, causal: bool) -> float:
        logits, labels = flat(batches, causal)
        values = module.compute(predictions=logits.argmax(-1).tolist(), references=labels.tolist())
        return _pick(values, key or getattr(module, "name", None), f"evaluate metric {name!r}")

    return Metric(key or Path(name).stem, compute, greater_is_better)


class BaseScorer:
    """What every scorer shares. A scorer has `task`, `metric` (a `Metric`), `splits` and `evaluations`, and gives
    `outputs(model, split)`; from those this class gives the score, its comparisons and its direction.

    Attributes:
        resident (`torch.nn.Module`, *optional*): the model the scorer scores in (a Trainer's); `None` when the
            kitchen builds the resident model.
        ensemble_undefined (`str`, *optional*): why averaging the outputs of several models would not be a logit
            ensemble (generated tokens, preprocessed predictions); `None` when the outputs are logits.
    """

    resident: torch.nn.Module | None = None
    ensemble_undefined: str | None = None
    task: Task
    metric: Metric

    @property
    def causal(self) -> bool:
        return self.task.name == "causal-lm"

    def compute(self, batches: Batches) -> float:
        """The metric of already computed outputs (one model's, or an ensemble's averaged logits)."""
        return self.metric.compute(batches, self.causal)

    def score(self, model: torch.nn.Module, split: str) -> float:
        """The metric of `model` on `split`."""
        return self.compute(self.outputs(model, split))

    def better(self, a: float, b: float, *, strict: bool = False) -> bool:
        """Whether score `a` beats `b` (`≥` by default, `>` with `strict`), in the metric's direction."""
        if self.metric.greater_is_better:
            return a > b if strict else a >= b
        return a < b if strict else a <= b

    def best(self, scores: Mapping[str, float]) -> str:
        """The key of the best score."""
        pick = max if self.metric.greater_is_better else min
        return pick(scores, key=scores.__getitem__)


class Scorer(BaseScorer):
    """Score models on named splits with one metric.

    Args:
        splits (`dict[str, datasets.Dataset]`): raw splits (e.g. `{"validation": ..., "test": ..., "shift": ...}`).
        task (`str`, *optional*, defaults to `"sequence-classification"`): see `hf_soup.tasks.TASKS`.
        metric: a name the task builds in (`task.metrics`: `accuracy`, `macro_f1`, `loss`, `perplexity`,
            `next_token_accuracy`; `entity_f1`, `entity_precision`, `entity_recall`, `token_accuracy` for token
            classification), an `evaluate` module path, a `compute_metrics` callable, or `"module:function"`.
        greater_is_better (`bool`, *optional*): direction; built-in metrics know theirs.
        metric_key (`str`, *optional*): which value of a dict-returning metric to use.
        tokenizer, columns, max_length, preprocess: see `hf_soup.tasks.preprocess_split` (for
            `audio-classification`, `tokenizer` is the model's feature extractor).
        collator (`Callable`, *optional*): `list[example] -> batch`; defaults to padding by the task.
        batch_size (`int`, *optional*, defaults to 32).
        trust_remote_code (`bool`, *optional*, defaults to `False`): allow an `evaluate` metric from the Hub (its
            downloaded Python code runs).
        generation (`dict`, *optional*): `max_length` and `num_beams` of a generating task (`seq2seq`,
            `causal-generation`), over its generation config.
        max_length_seconds (`float`, *optional*): `audio-classification` cuts every clip to its first seconds.
        chat_template (`bool`, *optional*, defaults to `False`): show `causal-generation` prompts as a user message
            through the tokenizer's chat template (with the generation prompt).
        sort_by_length (`bool`, *optional*, defaults to `True`): batch each split's rows longest first (stable) when
            the metric is order-free and the task knows the rows' lengths; `False` batches them in split order.

    Example:

    ```python
    >>> scorer = Scorer({"validation": val, "test": test}, tokenizer=tokenizer, columns={"text": "sentence"})
    >>> scorer.score(model, "validation")
    0.84
    ```
    """

    def __init__(
        self,
        splits: Mapping[str, Any],
        *,
        task: str = "sequence-classification",
        metric: str | Callable | None = None,
        greater_is_better: bool | None = None,
        metric_key: str | None = None,
        tokenizer=None,
        columns: Mapping[str, str] | None = None,
        max_length: int | None = None,
        preprocess: Callable | None = None,
        collator: Callable | None = None,
        batch_size: int = 32,
        trust_remote_code: bool = False,
        generation: Mapping[str, int | None] | None = None,
        max_length_seconds: float | None = None,
        chat_template: bool = False,
        sort_by_length: bool = True,
    ):
        if not splits:
            raise SoupError("a scorer needs at least one split")
        if batch_size < 1:
            raise SoupError(f"batch_size must be ≥ 1, got {batch_size}")
        self.task = get_task(task)
        self.ensemble_undefined = self.task.ensemble_undefined
        self.task.set_generation(**{k: v for k, v in (generation or {}).items() if v is not None})
        self.task.set_max_length_seconds(max_length_seconds)
        self.task.set_chat_template(chat_template)
        self.task.check_columns(columns or {}, "columns")
        self.metric = make_metric(
            metric,
            task=self.task,
            greater_is_better=greater_is_better,
            key=metric_key,
            trust_remote_code=trust_remote_code,
        )
        self.batch_size = batch_size
        self.collator = collator or collate(self.task, tokenizer)
        self.splits = {
            name: preprocess_split(
                data,
                self.task,
                split=name,
                tokenizer=tokenizer,
                columns=columns,
                max_length=max_length,
                preprocess=preprocess,
            )
            for name, data in splits.items()
        }
        sort = sort_by_length and self.metric.order_free
        # the rows of each split in the order they are batched: longest first, or the split's own order
        self.orders = {
            name: _order(self.task.lengths(data) if sort else None, len(data)) for name, data in self.splits.items()
        }
        self._collated: dict[tuple, list[dict[str, Any]]] = {}
        self._collated_bytes = 0
        self.evaluations = 0

    def split(self, name: str):
        if name not in self.splits:
            raise SoupError(f"no split {name!r}; the scorer has: {', '.join(self.splits)}")
        return self.splits[name]

    def outputs(self, model: torch.nn.Module, split: str) -> Batches:
        """(logits, labels) of every batch of `split`, in the scorer's order of its rows (`orders`); sharded over
        processes and gathered."""
        state = process_state()
        model.eval()
        batches: Batches = []
        for batch in self.batches(split, state.num_processes, state.process_index):
            with torch.inference_mode():
                batches.append((self.task.outputs(model, batch).cpu(), batch["labels"]))
        if state.num_processes > 1:
            from accelerate.utils import gather_object

            batches = [b for shard in gather_object([batches]) for b in shard]
        self.evaluations += 1
        return batches

    def batches(self, split: str, processes: int = 1, index: int = 0) -> Iterator[dict[str, Any]]:
        """The collated batches of process `index`'s contiguous shard of `split` (of `processes`), in the scorer's
        order; collated once and kept while they fit in `BATCH_CACHE_BYTES`."""
        key = (split, processes, index)
        if key in self._collated:
            yield from self._collated[key]
            return
        data, rows = self.split(split), _shard(self.orders[split], processes, index)
        kept: list[dict[str, Any]] | None = []
        size = 0
        for start in range(0, len(rows), self.batch_size):
            batch = self.collator([data[i] for i in rows[start : start + self.batch_size]])
            if kept is not None:
                size += sum(v.nbytes for v in batch.values() if isinstance(v, torch.Tensor))
                if self._collated_bytes + size <= BATCH_CACHE_BYTES:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        if kept is not None:
            self._collated[key] = kept
            self._collated_bytes += size


def _order(lengths: list[int] | None, count: int) -> list[int]:
    """Row indices longest first (ties in split order), or the split's order when the lengths are unknown."""
    if lengths is None:
        return list(range(count))
    return sorted(range(count), key=lambda row: -lengths[row])


def _shard(rows: list[int], processes: int, index: int) -> list[int]:
    """Process `index`'s contiguous share of `rows`, as `datasets.Dataset.shard(contiguous=True)` cuts it."""
    size, extra = divmod(len(rows), processes)
    start = index * size + min(index, extra)
    return rows[start : start + size + (1 if index < extra else 0)]
