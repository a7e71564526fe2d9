"""The shape every task has: its Auto class, how a raw split becomes model inputs, how examples are batched, how a
forward pass becomes logits, and which metrics it computes from `(logits, labels)` batches.

The base `Task` serves data that already holds the model's inputs (and its labels); each built-in task refines the
steps it does differently (tokenising text, aligning tags to sub-words, pairing a question with every choice).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import SoupError, brief
from .logits import LOGIT_METRICS, Batches, MetricFunction

__all__ = ["Batches", "MetricFunction", "Task", "column_lengths", "input_device", "pad_sequences", "require_columns"]


@dataclass(frozen=True)
class Task:
    """A kind of model and data.

    Attributes:
        name (`str`): the task's name in recipes (`evaluation.task`), e.g. `"sequence-classification"`.
        auto_class (`str`): the transformers Auto class that builds the model.
        default_metric (`str`): the metric used when the recipe names none.
        inputs (`tuple[str, ...]`): model input columns kept after preprocessing.

    A task made by `hf_soup.tasks.get_task` is the scorer's own: tasks that learn something from the model they score
    (the label names of a token classifier) keep it per instance.
    """

    name: str
    auto_class: str
    default_metric: str
    inputs: tuple[str, ...]
    _bound: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    # the `evaluation.columns` keys the task reads, with their default column names
    column_keys: ClassVar[Mapping[str, str | None]] = {"label": "label"}
    # the key of `column_keys` that names the labels
    label_key: ClassVar[str] = "label"
    # why averaging several models' outputs is no logit ensemble (generated tokens); None when they are logits
    ensemble_undefined: ClassVar[str | None] = None
    # what turns raw rows into model inputs, saved with the model: "tokenizer" or "feature_extractor" (audio)
    processing: ClassVar[str] = "tokenizer"
    # whether the task scores generated text (and so takes generation settings)
    generates: ClassVar[bool] = False

    def fresh(self) -> Task:
        """A new instance of this task, with nothing learned from a model yet."""
        return dataclasses.replace(self)

    def model_class(self):
        import transformers

        return getattr(transformers, self.auto_class)

    @property
    def metrics(self) -> dict[str, tuple[MetricFunction, bool]]:
        """The task's built-in metrics: name → (function of `(batches, causal)`, greater_is_better)."""
        return dict(LOGIT_METRICS)

    def set_generation(self, **settings: int) -> None:
        """Generation settings (`max_length`, `num_beams`): only a generating task takes them."""
        if settings:
            raise SoupError(
                f"generation settings {brief(sorted(settings))} mean nothing to task {self.name!r}, which does not "
                "generate; remove them"
            )

    def set_max_length_seconds(self, seconds: float | None) -> None:
        """The longest clip in seconds (`evaluation.max_length_seconds`): only a task that reads audio takes it."""
        if seconds is not None:
            raise SoupError(
                f"max_length_seconds cuts audio clips, which task {self.name!r} does not read; remove it (max_length "
                "truncates text)"
            )

    def set_chat_template(self, enabled: bool) -> None:
        """Prompts through the tokenizer's chat template: only a task with prompts (`causal-generation`) takes it."""
        if enabled:
            raise SoupError(
                f"chat_template shows prompts through the tokenizer's chat template, and task {self.name!r} has no "
                "prompts (task causal-generation has); remove it"
            )

    def check_config(self, config) -> None:
        """Refuse a model config this task cannot score (before the resident model is built); any config by
        default."""

    def column(self, columns: Mapping[str, str], key: str) -> str | None:
        """The raw column the recipe names for `key` (`evaluation.columns`), or the task's default."""
        return columns.get(key, self.column_keys.get(key))

    def check_columns(self, columns: Mapping[str, Any], where: str) -> None:
        """Refuse `evaluation.columns` keys this task does not read."""
        unknown = [key for key in columns if key not in self.column_keys]
        if unknown:
            raise SoupError(
                f"{where}: key {brief(unknown[0])} means nothing to task {self.name!r}; it reads "
                f"{', '.join(self.column_keys)}"
            )

    def preprocess(
        self, dataset, *, split: str, tokenizer=None, columns: Mapping[str, str], max_length: int | None = None
    ):
        """Turn a raw `datasets.Dataset` into model inputs plus `labels`, once. The base task takes data that already
        holds the model's inputs (tokenised, or an image processor's `pixel_values`)."""
        if not set(self.inputs) & set(dataset.column_names):
            raise SoupError(
                f"split {brief(split)} has none of the model inputs {', '.join(self.inputs)} (columns: "
                f"{', '.join(sorted(dataset.column_names))}); give a `preprocess` function (e.g. a processor) that "
                "makes them"
            )
        return self.finish(dataset, split=split, columns=columns)

    def finish(self, dataset, *, split: str, columns: Mapping[str, str]):
        """The model inputs and `labels` (the label column renamed) of already processed data."""
        label = self.column(columns, self.label_key) or "labels"
        if "labels" not in dataset.column_names:
            if label not in dataset.column_names:
                raise SoupError(
                    f"split {brief(split)} has no label column {brief(label)} (columns: "
                    f"{', '.join(sorted(dataset.column_names))}); name it in evaluation.columns.{self.label_key}"
                )
            dataset = dataset.rename_column(label, "labels")
        return dataset.select_columns([c for c in dataset.column_names if c in self.inputs or c == "labels"])

    def lengths(self, dataset) -> list[int] | None:
        """Each row's length along the axis its batch is padded on (tokens), so that rows of like length can be
        batched together; `None` when batches are not padded (no `input_ids`: images) or when the model would see
        the padding (no `attention_mask`), as then a row's outputs depend on the rows batched with it."""
        return column_lengths(dataset, "input_ids") if "attention_mask" in dataset.column_names else None

    def collate(self, tokenizer=None) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """Batch examples: token sequences right-padded (`input_ids` with the tokenizer's pad id), one label each."""
        pad_id = pad_token_id(tokenizer)

        def collate_batch(examples: list[dict]) -> dict[str, torch.Tensor]:
            batch = pad_sequences(examples, pad_id)
            batch["labels"] = torch.tensor([e["labels"] for e in examples])
            return batch

        return collate_batch

    def outputs(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Run the model on a batch and return fp32 logits (the batch is moved to the model's device)."""
        device = input_device(model)
        inputs = {k: v.to(device) for k, v in batch.items() if k in self.inputs}
        return model(**inputs).logits.float()

    def training_outputs(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The logits `training_loss` takes (the forward pass learned soups, Fisher merging and RegMean run): the
        scored outputs, unless the task scores something else (generated tokens)."""
        return self.outputs(model, batch)

    def training_loss(self, logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
        """The loss learned soups and Fisher merging differentiate: cross-entropy of `logits` (from `outputs`)
        against the batch's labels, -100 ignored (next-token for causal LMs; per sub-word for token classification;
        per row over its choices for multiple choice)."""
        if causal:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )


def column_lengths(dataset, column: str) -> list[int] | None:
    """The length of every row's `column` (a list per row), or `None` when the split has no such column."""
    if column not in dataset.column_names:
        return None
    import pyarrow.compute

    values = dataset.with_format("arrow")[column]
    try:
        return pyarrow.compute.list_value_length(values).to_pylist()
    except (TypeError, ValueError, NotImplementedError, pyarrow.ArrowException):  # not an Arrow list column
        return [len(value) for value in dataset[column]]


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id (0 when it has none)."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad_id is None else pad_id


def pad_sequences(examples: list[dict], pad_id: int, *, labels: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad every token column of `examples` to the longest: `input_ids` with `pad_id`, the others (masks, type
    ids) with 0, and `labels` too when `labels` gives their pad value (-100: ignored by the loss and the metrics)."""
    length = max(len(e["input_ids"]) for e in examples)
    batch: dict[str, torch.Tensor] = {}
    for key in [k for k in examples[0] if k != "labels" or labels is not None]:
        value = pad_id if key == "input_ids" else labels if key == "labels" else 0
        batch[key] = torch.tensor([list(e[key]) + [value] * (length - len(e[key])) for e in examples])
    return batch


def require_columns(dataset, wanted: Mapping[str, str | None], *, split: str) -> None:
    """Refuse a split that lacks one of the raw columns `wanted` (`evaluation.columns` key → column name)."""
    for key, name in wanted.items():
        if name is not None and name not in dataset.column_names:
            raise SoupError(
                f"split {brief(split)} has no {key} column {brief(name)} (columns: "
                f"{', '.join(sorted(dataset.column_names))}); name it in evaluation.columns.{key}"
            )


def input_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the device of the first dispatched module (accelerate hooks move them on from there)."""
    hf_map = getattr(model, "hf_device_map", None)
    if hf_map:
        first = next(iter(hf_map.values()))
        if isinstance(first, int):
            return torch.device("cuda", first)
        return torch.device("cpu" if first in ("cpu", "disk") else first)
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")
