"""Tasks: how a split becomes model inputs (once), how examples are batched, how a model's outputs become logits
and labels, and which metrics a task computes. One module per task family, each task one object:

- `sequences`: `sequence-classification`, `causal-lm`
- `images`: `image-classification`
- `tokens`: `token-classification` (tags aligned to sub-words, seqeval entity metrics)
- `choices`: `multiple-choice` (`[B, C, T]` batches)
- `spans`: `question-answering` (extractive: answer spans of the context, SQuAD exact match and F1)
- `generation`: `seq2seq` and `causal-generation` (generated text scored with ROUGE-L, BLEU, chrF, exact match;
  one generation loop)
- `audio`: `audio-classification` (clips through the model's feature extractor)

Scorers and strategies see only a task's methods (`preprocess`, `collate`, `outputs`, `metrics`,
`training_outputs`, `training_loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import SoupError, brief, did_you_mean
from .audio import AUDIO_INPUTS, AudioClassification
from .base import Batches, MetricFunction, Task, column_lengths, input_device
from .choices import MultipleChoice
from .generation import CausalGeneration, Seq2SeqGeneration, answer_logits
from .images import ImageClassification
from .logits import flat
from .sequences import CausalLM, SequenceClassification
from .spans import QuestionAnswering
from .tokens import TokenClassification

__all__ = [
    "TASKS",
    "Batches",
    "MetricFunction",
    "Task",
    "answer_logits",
    "collate",
    "column_lengths",
    "flat",
    "get_task",
    "input_device",
    "preprocess_split",
]

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        SequenceClassification(
            "sequence-classification", "AutoModelForSequenceClassification", "accuracy", TEXT_INPUTS
        ),
        CausalLM("causal-lm", "AutoModelForCausalLM", "loss", ("input_ids", "attention_mask")),
        ImageClassification("image-classification", "AutoModelForImageClassification", "accuracy", ("pixel_values",)),
        TokenClassification("token-classification", "AutoModelForTokenClassification", "entity_f1", TEXT_INPUTS),
        MultipleChoice("multiple-choice", "AutoModelForMultipleChoice", "accuracy", TEXT_INPUTS),
        QuestionAnswering("question-answering", "AutoModelForQuestionAnswering", "f1", TEXT_INPUTS),
        Seq2SeqGeneration("seq2seq", "AutoModelForSeq2SeqLM", "rougeL", ("input_ids", "attention_mask")),
        AudioClassification("audio-classification", "AutoModelForAudioClassification", "accuracy", AUDIO_INPUTS),
        CausalGeneration("causal-generation", "AutoModelForCausalLM", "exact_match", ("input_ids", "attention_mask")),
    )
}


def get_task(name: str) -> Task:
    """A new instance of the task called `name` (a scorer's own)."""
    if name not in TASKS:
        raise SoupError(f"unknown task {brief(name)}{did_you_mean(name, TASKS)}; tasks: {', '.join(TASKS)}")
    return TASKS[name].fresh()


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
        task (`Task`): what the rows are (`get_task(name)`); its `column_keys` are the `columns` it reads.
        tokenizer: what turns raw rows into model inputs (`task.processing`): the tokenizer, or for
            `audio-classification` the feature extractor.
        columns (`dict`, *optional*): raw column names by key, e.g. `{"text": "sentence", "label": "label"}`, or
            `{"tokens": "words", "tags": "ner_tags"}` for token classification.
        preprocess: a function `batch -> batch` used instead of the task's own (e.g. an image processor); its
            output must hold the model inputs and the label column.
    """
    columns = dict(columns or {})
    if preprocess is not None:
        return task.finish(dataset.map(preprocess, batched=True), split=split, columns=columns)
    return task.preprocess(dataset, split=split, tokenizer=tokenizer, columns=columns, max_length=max_length)


def collate(task: Task, tokenizer=None) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """The task's batching of examples (padding with the tokenizer's pad id, or the feature extractor's `pad`; label
    padding -100 where labels are sequences)."""
    return task.collate(tokenizer)
