"""Tasks: how a split becomes model inputs (once), and how a model's outputs become logits and labels.

A task knows its Auto class, how to tokenize a raw split, how to batch it, and how to turn a forward pass into
`(logits, labels)` on the CPU. Scorers and strategies only see those.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import SoupError


@dataclass(frozen=True)
class Task:
    """A kind of model and data.

    Attributes:
        name (`str`): `"sequence-classification"`, `"causal-lm"` or `"image-classification"`.
        auto_class (`str`): the transformers Auto class that builds the model.
        default_metric (`str`): the metric used when the recipe names none.
        inputs (`tuple[str, ...]`): model input columns kept after preprocessing.
    """

    name: str
    auto_class: str
    default_metric: str
    inputs: tuple[str, ...]

    def model_class(self):
        import transformers

        return getattr(transformers, self.auto_class)

    def outputs(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Run the model on a batch and return fp32 logits on the CPU (the batch is moved to the model's device)."""
        device = _input_device(model)
        inputs = {k: v.to(device) for k, v in batch.items() if k in self.inputs}
        return model(**inputs).logits.float()


TASKS = {
    "sequence-classification": Task(
        "sequence-classification",
        "AutoModelForSequenceClassification",
        "accuracy",
        ("input_ids", "attention_mask", "token_type_ids"),
    ),
    "causal-lm": Task("causal-lm", "AutoModelForCausalLM", "loss", ("input_ids", "attention_mask")),
    "image-classification": Task(
        "image-classification", "AutoModelForImageClassification", "accuracy", ("pixel_values",)
    ),
}


def training_loss(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """Cross-entropy of logits against labels (next-token, padding -100 ignored, for causal LMs)."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise SoupError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]


def _input_device(model: torch.nn.Module) -> torch.device:
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


def preprocess_split(
    dataset,
    task: Task,
    *,
    split: str,
    tokenizer=None,
    columns: Mapping[str, str] | None = None,
    max_length: int | None = None,
    preprocess: Callable[[Any], Any] | None = None,
):
    """Turn a raw `datasets.Dataset` into model inputs plus `labels`, once.

    Args:
        dataset: the split.
        columns: `{"text": ..., "text_pair": ..., "label": ...}` (or `"image"` for images) naming the raw columns.
        preprocess: a function `batch -> batch` used instead of the built-in tokenisation (e.g. an image processor).
    """
    columns = dict(columns or {})
    label = columns.get("label", "label")
    names = set(dataset.column_names)
    if preprocess is not None:
        processed = dataset.map(preprocess, batched=True)
    elif task.name == "image-classification":
        if "pixel_values" not in names:
            raise SoupError(
                f"split {split!r} has no pixel_values column; give a `preprocess` function (e.g. an image processor)"
            )
        processed = dataset
    elif "input_ids" in names and columns.get("text", "text") not in names:
        processed = dataset  # already tokenised
    else:
        text = columns.get("text", "text")
        if text not in names:
            raise SoupError(
                f"split {split!r} has no text column {text!r} (columns: {', '.join(sorted(names))}); "
                "name it in evaluation.columns.text"
            )
        if tokenizer is None:
            raise SoupError("a tokenizer is needed to tokenise text: put tokenizer files in the first ingredient")
        pair = columns.get("text_pair")
        if pair is not None and pair not in names:
            raise SoupError(f"split {split!r} has no text_pair column {pair!r}")

        def tokenize(batch):
            arguments = [batch[text]] + ([batch[pair]] if pair else [])
            return tokenizer(*arguments, truncation=True, max_length=max_length)

        processed = dataset.map(tokenize, batched=True)
    if task.name == "causal-lm":
        processed = processed.map(lambda batch: {"labels": batch["input_ids"]}, batched=True)
    else:
        if label not in processed.column_names:
            raise SoupError(
                f"split {split!r} has no label column {label!r} (columns: {', '.join(sorted(processed.column_names))})"
                "; name it in evaluation.columns.label"
            )
        if label != "labels":
            processed = (
                processed.rename_column(label, "labels") if "labels" not in processed.column_names else processed
            )
    keep = [c for c in processed.column_names if c in task.inputs or c == "labels"]
    return processed.select_columns(keep)


def collate(task: Task, tokenizer=None) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Pad a list of examples into a batch; label padding is -100 for language modelling."""

    def collate_batch(examples: list[dict]) -> dict[str, torch.Tensor]:
        if task.name == "image-classification":
            return {
                "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]),
                "labels": torch.tensor([e["labels"] for e in examples]),
            }
        pad_id = getattr(tokenizer, "pad_token_id", None)
        pad_id = 0 if pad_id is None else pad_id
        length = max(len(e["input_ids"]) for e in examples)
        batch: dict[str, torch.Tensor] = {}
        for key in [k for k in examples[0] if k != "labels"]:
            value = pad_id if key == "input_ids" else 0
            batch[key] = torch.tensor([list(e[key]) + [value] * (length - len(e[key])) for e in examples])
        if task.name == "causal-lm":
            batch["labels"] = torch.tensor(
                [list(e["labels"]) + [-100] * (length - len(e["labels"])) for e in examples]
            )
        else:
            batch["labels"] = torch.tensor([e["labels"] for e in examples])
        return batch

    return collate_batch
