"""Tasks over text sequences: sequence classification (one label per text or text pair) and causal language
modelling (every next token is a label)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import SoupError, brief
from .base import Task, pad_sequences, pad_token_id, require_columns


@dataclass(frozen=True)
class SequenceClassification(Task):
    """One label per text (or text pair): raw columns `text`, `text_pair` (optional) and `label`."""

    column_keys: ClassVar[Mapping[str, str | None]] = {"text": "text", "text_pair": None, "label": "label"}

    def preprocess(self, dataset, *, split: str, tokenizer=None, columns: Mapping[str, str], max_length=None):
        text, pair = self.column(columns, "text"), self.column(columns, "text_pair")
        names = set(dataset.column_names)
        if "input_ids" in names and text not in names:
            return self.finish(dataset, split=split, columns=columns)  # already tokenised
        if text not in names:
            raise SoupError(
                f"split {brief(split)} has no text column {brief(text)} (columns: {', '.join(sorted(names))}); "
                "name it in evaluation.columns.text"
            )
        if tokenizer is None:
            raise SoupError("a tokenizer is needed to tokenise text: put tokenizer files in the first ingredient")
        require_columns(dataset, {"text_pair": pair}, split=split)

        def tokenize(batch):
            arguments = [batch[text]] + ([batch[pair]] if pair else [])
            return tokenizer(*arguments, truncation=True, max_length=max_length)

        return self.finish(dataset.map(tokenize, batched=True), split=split, columns=columns)


@dataclass(frozen=True)
class CausalLM(SequenceClassification):
    """Next-token prediction: raw column `text`; the labels are the input ids (padding -100)."""

    column_keys: ClassVar[Mapping[str, str | None]] = {"text": "text"}

    def finish(self, dataset, *, split: str, columns: Mapping[str, str]):
        dataset = dataset.map(lambda batch: {"labels": batch["input_ids"]}, batched=True)
        return dataset.select_columns([c for c in dataset.column_names if c in self.inputs or c == "labels"])

    def collate(self, tokenizer=None) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        pad_id = pad_token_id(tokenizer)
        return lambda examples: pad_sequences(examples, pad_id, labels=-100)
