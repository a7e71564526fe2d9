"""Token classification (named entities, parts of speech): a tag per word, scored per entity with `seqeval`.

Raw rows hold `tokens` (the words) and `tags` (one label id per word, or one label name mapped through the model's
`config.label2id`). Words are tokenised with `is_split_into_words=True` and each word's tag goes to its first
sub-word; the other sub-words and the special tokens get -100, which the loss and the metrics ignore (as the
Transformers token-classification example does). Entity metrics read the tag names (BIO / IOB2) from the scored
model's `config.id2label`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..errors import SoupError, brief
from .base import Task, pad_sequences, pad_token_id, require_columns
from .logits import Batches, MetricFunction


@dataclass(frozen=True)
class TokenClassification(Task):
    """A tag per word: raw columns `tokens` and `tags` (`evaluation.columns`)."""

    column_keys: ClassVar[Mapping[str, str | None]] = {"tokens": "tokens", "tags": "tags"}
    label_key: ClassVar[str] = "tags"

    @property
    def metrics(self) -> dict[str, tuple[MetricFunction, bool]]:
        return {
            "entity_f1": (lambda batches, causal: self.entity_score(batches, "f1_score"), True),
            "entity_precision": (lambda batches, causal: self.entity_score(batches, "precision_score"), True),
            "entity_recall": (lambda batches, causal: self.entity_score(batches, "recall_score"), True),
            "token_accuracy": (token_accuracy, True),
            "loss": (token_loss, False),
        }

    def preprocess(self, dataset, *, split: str, tokenizer=None, columns: Mapping[str, str], max_length=None):
        words, tags = self.column(columns, "tokens"), self.column(columns, "tags")
        if "input_ids" in dataset.column_names and words not in dataset.column_names:
            return self.finish(dataset, split=split, columns=columns)  # already tokenised, labels aligned
        require_columns(dataset, {"tokens": words, "tags": tags}, split=split)
        if tokenizer is None or not getattr(tokenizer, "is_fast", False):
            got = "none" if tokenizer is None else type(tokenizer).__name__
            raise SoupError(
                f"token-classification aligns tags to sub-words with a fast tokenizer's word_ids(); got {got}: save a "
                "fast tokenizer (tokenizer.json) in the first ingredient"
            )
        names = self.check_rows(dataset[words], dataset[tags], split)
        label2id = label_ids(tokenizer, names, split) if names else {}
        self._bound.setdefault("label2id", {}).update(label2id)

        def tokenize(batch):
            encoded = tokenizer(batch[words], is_split_into_words=True, truncation=True, max_length=max_length)
            encoded["labels"] = [
                align(encoded.word_ids(row), [label2id.get(t, t) for t in row_tags])
                for row, row_tags in enumerate(batch[tags])
            ]
            return encoded

        processed = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
        return self.finish(processed, split=split, columns=columns)

    def finish(self, dataset, *, split: str, columns: Mapping[str, str]):
        """The model inputs and aligned `labels`; the largest label id is kept to check against the model."""
        dataset = super().finish(dataset, split=split, columns=columns)
        largest = max((max(row, default=-100) for row in dataset["labels"]), default=-100)
        self._bound.setdefault("largest", {})[split] = largest
        return dataset

    @staticmethod
    def check_rows(words: list, tags: list, split: str) -> set[str]:
        """Refuse rows whose words are not a list of strings or whose tags do not match them; the tag names used."""
        names: set[str] = set()
        for row, (row_words, row_tags) in enumerate(zip(words, tags)):
            where = f"split {brief(split)} row {row}"
            if not isinstance(row_words, list) or not all(isinstance(w, str) for w in row_words):
                raise SoupError(
                    f"{where}: tokens must be a list of words (strings), got {brief(row_words)}; "
                    "split the text into words first"
                )
            if not isinstance(row_tags, list) or len(row_tags) != len(row_words):
                raise SoupError(
                    f"{where}: tags must be a list with one tag per word ({len(row_words)} words), "
                    f"got {brief(row_tags)}"
                )
            for tag in row_tags:
                if isinstance(tag, str):
                    names.add(tag)
                elif isinstance(tag, bool) or not isinstance(tag, int) or tag < 0:
                    raise SoupError(
                        f"{where}: tag {brief(tag)} is neither a label id (an integer ≥ 0) nor a "
                        "label name of the model's config.label2id"
                    )
        return names

    def collate(self, tokenizer=None) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        pad_id = pad_token_id(tokenizer)
        return lambda examples: pad_sequences(examples, pad_id, labels=-100)

    def outputs(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.bind(model.config)
        return super().outputs(model, batch)

    def bind(self, config) -> None:
        """Learn the tag names of the scored model (`config.id2label`) and check the data's tags against it: every
        label id within its labels, and label names mapped as its `label2id` maps them. Raises before any forward."""
        names = tuple(config.id2label[i] for i in range(config.num_labels))
        if self._bound.get("names") == names:
            return
        for split, largest in self._bound.get("largest", {}).items():
            if largest >= config.num_labels:
                raise SoupError(
                    f"split {brief(split)} has tag id {largest}, out of range of the model's {config.num_labels} "
                    f"labels ({brief(list(names))}); give tags the model was trained with (ids < {config.num_labels})"
                )
        for name, id_ in self._bound.get("label2id", {}).items():
            if config.label2id.get(name) != id_:
                raise SoupError(
                    f"tag {brief(name)} was mapped to label {id_} by the config beside the tokenizer, but the scored "
                    f"model maps it to {config.label2id.get(name)}; save the fine-tuned config (with its id2label) "
                    "with the tokenizer, or give tags as label ids"
                )
        self._bound["names"] = names

    def entity_score(self, batches: Batches, score: str) -> float:
        """seqeval's micro-averaged entity `score` (`f1_score`, `precision_score`, `recall_score`) of the argmax
        tags, over the labelled sub-words (one per word)."""
        try:
            from seqeval import metrics
        except ImportError:
            raise SoupError(
                "token-classification's entity metrics need seqeval: pip install 'hf_soup[tasks]' (or seqeval)"
            ) from None
        names = self._bound.get("names")
        if names is None:
            raise SoupError("entity metrics need the model's tag names (config.id2label): score a model first")
        truth, predicted = tag_sequences(batches, names)
        return float(getattr(metrics, score)(truth, predicted, zero_division=0))


def align(word_ids: list[int | None], tags: list[int]) -> list[int]:
    """One label per sub-word: the word's tag on its first sub-word, -100 on the others and on special tokens."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(-100 if word is None or word == previous else tags[word])
        previous = word
    return labels


def label_ids(tokenizer, names: set[str], split: str) -> dict[str, int]:
    """Label ids of tag names, from `label2id` of the model config saved beside the tokenizer."""
    from transformers import AutoConfig

    folder = Path(str(getattr(tokenizer, "name_or_path", "")))
    if not (folder / "config.json").is_file():
        raise SoupError(
            f"split {brief(split)} gives tags as names ({brief(sorted(names))}) but no model config lies beside the "
            "tokenizer to map them through label2id; give tags as label ids, or save the config with the tokenizer"
        )
    label2id = AutoConfig.from_pretrained(folder).label2id
    unknown = sorted(names - set(label2id))
    if unknown:
        raise SoupError(
            f"split {brief(split)} has tag {brief(unknown[0])}, which is not among the model's labels "
            f"({brief(list(label2id))} in {folder}/config.json); give tags the model was trained with"
        )
    return {name: label2id[name] for name in names}


def labelled(batches: Batches):
    """Per row: the argmax predictions and the labels of the labelled positions (label ≠ -100)."""
    for logits, labels in batches:
        predictions = logits.argmax(-1)
        for row in range(labels.shape[0]):
            keep = labels[row] != -100
            yield predictions[row][keep].tolist(), labels[row][keep].tolist()


def tag_sequences(batches: Batches, names: tuple[str, ...]) -> tuple[list[list[str]], list[list[str]]]:
    """The true and predicted tag names of every row, as seqeval takes them."""
    truth, predicted = [], []
    for row_predictions, row_labels in labelled(batches):
        truth.append([names[i] for i in row_labels])
        predicted.append([names[i] for i in row_predictions])
    return truth, predicted


def token_accuracy(batches: Batches, causal: bool) -> float:
    """The share of labelled sub-words (one per word) whose argmax is the tag."""
    right = total = 0
    for row_predictions, row_labels in labelled(batches):
        right += sum(p == t for p, t in zip(row_predictions, row_labels))
        total += len(row_labels)
    return right / total if total else 0.0


def token_loss(batches: Batches, causal: bool) -> float:
    """Mean cross-entropy over the labelled sub-words."""
    logits = torch.cat([lg.reshape(-1, lg.shape[-1]) for lg, _ in batches])
    labels = torch.cat([lb.reshape(-1) for _, lb in batches])
    return float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100))
