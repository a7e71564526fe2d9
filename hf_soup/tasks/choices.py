"""Multiple choice: a question (and, optionally, a context) with C candidate answers, one of them right.

Each row becomes C token sequences, one per choice — `(question, choice)`, or `(context, question + " " + choice)`
when a context column is named, as the Transformers SWAG example pairs them — batched as `[B, C, T]` for an
`AutoModelForMultipleChoice`, whose logits are `[B, C]`: the label is the index of the right choice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import SoupError, brief
from .base import Task, pad_token_id, require_columns
from .logits import CLASS_METRICS, MetricFunction


@dataclass(frozen=True)
class MultipleChoice(Task):
    """One right choice among C: raw columns `text` (the question), `choices` (a list of strings), `label` (the
    index of the right choice) and, optionally, `context`."""

    column_keys: ClassVar[Mapping[str, str | None]] = {
        "text": "question",
        "choices": "choices",
        "label": "label",
        "context": None,
    }

    @property
    def metrics(self) -> dict[str, tuple[MetricFunction, bool]]:
        return dict(CLASS_METRICS)

    def preprocess(self, dataset, *, split: str, tokenizer=None, columns: Mapping[str, str], max_length=None):
        text, choices = self.column(columns, "text"), self.column(columns, "choices")
        label, context = self.column(columns, "label"), self.column(columns, "context")
        if "input_ids" in dataset.column_names and choices not in dataset.column_names:
            return self.finish(dataset, split=split, columns=columns)  # already tokenised: [C, T] per row
        require_columns(dataset, {"text": text, "choices": choices, "label": label, "context": context}, split=split)
        if tokenizer is None:
            raise SoupError("a tokenizer is needed to tokenise text: put tokenizer files in the first ingredient")
        count = check_choices(dataset[choices], dataset[label], split)

        def tokenize(batch):
            firsts, seconds = [], []
            for row, question in enumerate(batch[text]):
                for choice in batch[choices][row]:
                    if context is None:
                        firsts.append(question)
                        seconds.append(choice)
                    else:
                        firsts.append(batch[context][row])
                        seconds.append(f"{question} {choice}")
            encoded = tokenizer(firsts, seconds, truncation=True, max_length=max_length)
            return {key: [value[i : i + count] for i in range(0, len(value), count)] for key, value in encoded.items()}

        kept = [c for c in dataset.column_names if c != label]
        processed = dataset.map(tokenize, batched=True, remove_columns=kept)
        return self.finish(processed, split=split, columns=columns)

    def lengths(self, dataset) -> list[int] | None:
        """The longest choice sequence of each row (a batch is padded to the longest sequence in it)."""
        if "input_ids" not in dataset.column_names or "attention_mask" not in dataset.column_names:
            return None
        return [max(len(sequence) for sequence in row) for row in dataset["input_ids"]]

    def collate(self, tokenizer=None) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """Batch as `[B, C, T]`: every choice of every row right-padded to the longest sequence of the batch."""
        pad_id = pad_token_id(tokenizer)

        def collate_batch(examples: list[dict]) -> dict[str, torch.Tensor]:
            length = max(len(sequence) for e in examples for sequence in e["input_ids"])
            batch = {}
            for key in [k for k in examples[0] if k != "labels"]:
                value = pad_id if key == "input_ids" else 0
                batch[key] = torch.tensor([[list(s) + [value] * (length - len(s)) for s in e[key]] for e in examples])
            batch["labels"] = torch.tensor([e["labels"] for e in examples])
            return batch

        return collate_batch


def check_choices(choices: list, labels: list, split: str) -> int:
    """Refuse rows whose choices are not a list of strings, whose number of choices differs from the first row's, or
    whose label is not the index of one of them; the number of choices."""
    count = None
    for row, (row_choices, label) in enumerate(zip(choices, labels)):
        if not isinstance(row_choices, list) or not all(isinstance(c, str) for c in row_choices):
            raise SoupError(
                f"split {brief(split)} row {row}: choices must be a list of strings (the candidate answers), got "
                f"{brief(row_choices)}; name the list column in evaluation.columns.choices"
            )
        if count is None:
            count = len(row_choices)
            if count < 2:
                raise SoupError(f"split {brief(split)} row {row}: {count} choice(s); a multiple-choice row needs ≥ 2")
        elif len(row_choices) != count:
            raise SoupError(
                f"split {brief(split)} row {row} has {len(row_choices)} choices, row 0 has {count}; every row of a "
                "split needs the same number of choices (one [C, T] tensor per row)"
            )
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < count:
            raise SoupError(
                f"split {brief(split)} row {row}: label {brief(label)} is not the index of one of its {count} choices "
                f"(0…{count - 1})"
            )
    if count is None:
        raise SoupError(f"split {brief(split)} has no rows")
    return count
