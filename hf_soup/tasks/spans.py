"""Extractive question answering: the answer is a span of the context, scored with SQuAD's exact match and F1.

Raw rows hold `question`, `context` and `answers` in SQuAD's shape (`{"text": [...], "answer_start": [...]}`).
Each row is tokenised as the Transformers question-answering example does for evaluation: `(question, context)`
with `truncation="only_second"`, so a long context overflows into several features that overlap by a stride. A
feature's labels are `[start, end, feature]`: the token positions of the first answer (0, the `[CLS]` token, when
the answer is not inside this feature: what a model's own loss is trained on) and the feature's number, through which
the metrics find the feature's example and the character offsets of its context tokens. A model's outputs are its
start and end logits stacked as `[B, T, 2]`, so an ensemble averages them feature by feature.

The answer of an example is the best span over all its features: among the `N_BEST` highest start and end logits of
the context tokens, the span with `end ≥ start`, at most `MAX_ANSWER_TOKENS` tokens long, whose start + end logit is
the highest; its characters are cut from the context through the offsets.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import SoupError, brief
from .base import Task, input_device, require_columns
from .logits import Batches, MetricFunction

N_BEST = 20  # start and end candidates per feature, as in the Transformers example
MAX_ANSWER_TOKENS = 30
DEFAULT_MAX_LENGTH = 384
PUNCTUATION = set(string.punctuation)


@dataclass(frozen=True)
class QuestionAnswering(Task):
    """An answer span per question: raw columns `question`, `context` and `answers` (`evaluation.columns`)."""

    column_keys: ClassVar[Mapping[str, str | None]] = {
        "question": "question",
        "context": "context",
        "answers": "answers",
    }
    label_key: ClassVar[str] = "answers"

    @property
    def metrics(self) -> dict[str, tuple[MetricFunction, bool]]:
        return {
            "f1": (lambda batches, causal: self.squad(batches)[1], True),
            "exact_match": (lambda batches, causal: self.squad(batches)[0], True),
            "loss": (lambda batches, causal: float(span_loss(*joined(batches))), False),
        }

    def preprocess(self, dataset, *, split: str, tokenizer=None, columns: Mapping[str, str], max_length=None):
        question, context = self.column(columns, "question"), self.column(columns, "context")
        answers = self.column(columns, "answers")
        require_columns(dataset, {"question": question, "context": context, "answers": answers}, split=split)
        if tokenizer is None or not getattr(tokenizer, "is_fast", False):
            got = "none" if tokenizer is None else type(tokenizer).__name__
            raise SoupError(
                f"question-answering maps answers to tokens with a fast tokenizer's offsets; got {got}: save a fast "
                "tokenizer (tokenizer.json) in the first ingredient"
            )
        if getattr(tokenizer, "padding_side", "right") != "right":
            raise SoupError(
                "question-answering pairs (question, context) with right padding; set padding_side='right'"
            )
        contexts, texts = dataset[context], check_answers(dataset[question], dataset[context], dataset[answers], split)
        length = max_length or min(DEFAULT_MAX_LENGTH, getattr(tokenizer, "model_max_length", DEFAULT_MAX_LENGTH))
        stride = min(128, length // 3)

        def tokenize(batch, indices):
            try:
                encoded = tokenizer(
                    [q.lstrip() for q in batch[question]],
                    batch[context],
                    truncation="only_second",
                    max_length=length,
                    stride=stride,
                    return_overflowing_tokens=True,
                    return_offsets_mapping=True,
                )
            except Exception as error:  # noqa: BLE001 - tokenizers raises plain Exceptions for a question too long
                raise SoupError(
                    f"split {brief(split)}: cannot fit a question and its context into max_length {length} with "
                    f"stride {stride} ({str(error).splitlines()[0][:160]}); raise evaluation.max_length"
                ) from None
            samples = encoded.pop("overflow_to_sample_mapping")
            offsets, labels = [], []
            for i, sample in enumerate(samples):
                kept = [o if s == 1 else None for o, s in zip(encoded["offset_mapping"][i], encoded.sequence_ids(i))]
                offsets.append([list(o) if o is not None else [-1, -1] for o in kept])
                labels.append(positions(kept, batch[answers][sample]))
            encoded["offset_mapping"] = offsets
            encoded["labels"] = labels
            encoded["example"] = [indices[s] for s in samples]
            return encoded

        processed = dataset.map(tokenize, batched=True, with_indices=True, remove_columns=dataset.column_names)
        features = self._bound.setdefault("features", [])
        examples = self._bound.setdefault("examples", [])
        first, base = len(features), len(examples)
        for example, offsets in zip(processed["example"], processed["offset_mapping"]):
            features.append((base + example, [tuple(o) if o[0] >= 0 else None for o in offsets]))
        examples.extend(zip(contexts, texts))
        processed = processed.map(
            lambda row, i: {"labels": [*row["labels"], first + i]}, with_indices=True, remove_columns=["example"]
        )
        return super().finish(processed, split=split, columns={})

    def finish(self, dataset, *, split: str, columns: Mapping[str, str]):
        """Refuse data processed elsewhere (an `evaluation.preprocess` function): the metrics need each feature's
        example and context offsets, which only the task's own tokenisation records."""
        raise SoupError(
            f"split {brief(split)}: question-answering tokenises raw rows itself (question, context, answers) to know "
            "each feature's example and context offsets; drop evaluation.preprocess and give raw rows"
        )

    def outputs(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Start and end logits stacked as `[B, T, 2]` (fp32)."""
        device = input_device(model)
        output = model(**{k: v.to(device) for k, v in batch.items() if k in self.inputs})
        return torch.stack([output.start_logits, output.end_logits], dim=-1).float()

    def training_loss(self, logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
        """The mean of the start and end cross-entropies, as question-answering models compute their loss."""
        return span_loss(logits, labels)

    def answers(self, batches: Batches) -> dict[int, str]:
        """The predicted answer text of every example the batches' features belong to, by example (on equal scores
        the example's first feature wins, whatever order the features were scored in)."""
        features = self._bound.get("features", [])
        best: dict[int, tuple[float, int, str]] = {}
        for logits, labels in batches:
            for row in range(labels.shape[0]):
                feature = int(labels[row, 2])
                example, offsets = features[feature]
                score, text = best_span(logits[row, : len(offsets)], offsets, self._bound["examples"][example][0])
                if example not in best or (score, -feature) > best[example][:2]:
                    best[example] = (score, -feature, text)
        return {example: best[example][2] for example in sorted(best)}

    def squad(self, batches: Batches) -> tuple[float, float]:
        """Exact match and F1 (fractions of the examples, SQuAD's normalisation) of the predicted answers."""
        predicted = self.answers(batches)
        if not predicted:
            raise SoupError("question-answering metrics need at least one scored example")
        truths = [self._bound["examples"][example][1] for example in predicted]
        exact = [
            max(float(normalize(p) == normalize(t)) for t in truth) for p, truth in zip(predicted.values(), truths)
        ]
        f1 = [max(token_f1(p, t) for t in truth) for p, truth in zip(predicted.values(), truths)]
        return sum(exact) / len(exact), sum(f1) / len(f1)


def check_answers(questions: list, contexts: list, answers: list, split: str) -> list[list[str]]:
    """Refuse rows that are not SQuAD-shaped: question and context strings, answers `{"text": [str, ...],
    "answer_start": [int, ...]}` of equal length (at least one answer), each inside the context. The answer texts of
    every row."""
    texts = []
    for row, (question, context, answer) in enumerate(zip(questions, contexts, answers)):
        where = f"split {brief(split)} row {row}"
        for key, value in (("question", question), ("context", context)):
            if not isinstance(value, str):
                raise SoupError(f"{where}: the {key} must be a string, got {brief(value)}")
        shape = isinstance(answer, Mapping) and isinstance(answer.get("text"), list)
        shape = shape and isinstance(answer.get("answer_start"), list)
        if not shape or len(answer["text"]) != len(answer["answer_start"]):
            raise SoupError(
                f"{where}: answers must be SQuAD-shaped, {{'text': [str, ...], 'answer_start': [int, ...]}} with one "
                f"start per text, got {brief(answer)}; name the column in evaluation.columns.answers"
            )
        for text, start in zip(answer["text"], answer["answer_start"]):
            if not isinstance(text, str) or isinstance(start, bool) or not isinstance(start, int):
                raise SoupError(f"{where}: answer {brief(text)} at {brief(start)} must be a string at an integer")
            if not 0 <= start <= len(context) - len(text):
                raise SoupError(
                    f"{where}: answer {brief(text)} at character {start} does not lie inside the context "
                    f"({len(context)} characters); answer_start counts characters from the context's start"
                )
        if not answer["text"]:
            raise SoupError(
                f"{where} has no answer; question-answering scores SQuAD v1-style answerable questions (the best span "
                "is always an answer): keep only rows with at least one answer"
            )
        texts.append(list(answer["text"]))
    return texts


def positions(offsets: list, answer: Mapping[str, Any]) -> list[int]:
    """Token positions `[start, end]` of the first answer in a feature whose context tokens have character `offsets`
    (`None` elsewhere); `[0, 0]` (the `[CLS]` token) when the answer is not wholly inside the feature."""
    start_char = answer["answer_start"][0]
    end_char = start_char + len(answer["text"][0])
    inside = [i for i, o in enumerate(offsets) if o is not None]
    if not inside or offsets[inside[0]][0] > start_char or offsets[inside[-1]][1] < end_char:
        return [0, 0]
    start = max(i for i in inside if offsets[i][0] <= start_char)
    end = min(i for i in inside if offsets[i][1] >= end_char)
    return [start, end]


def best_span(logits: torch.Tensor, offsets: list, context: str) -> tuple[float, str]:
    """The best valid span of one feature (`logits` `[T, 2]`, `offsets` of its `T` tokens, `None` outside the
    context): its start + end logit and its text; `(-inf, "")` when the feature has no context token."""
    inside = torch.tensor([o is not None for o in offsets])
    if not inside.any():
        return float("-inf"), ""
    start_logits = logits[:, 0].masked_fill(~inside, float("-inf"))
    end_logits = logits[:, 1].masked_fill(~inside, float("-inf"))
    count = min(N_BEST, int(inside.sum()))
    starts = torch.argsort(start_logits, descending=True, stable=True)[:count]
    ends = torch.argsort(end_logits, descending=True, stable=True)[:count]
    scores = start_logits[starts][:, None] + end_logits[ends][None, :]
    length = ends[None, :] - starts[:, None] + 1
    scores = scores.masked_fill((length < 1) | (length > MAX_ANSWER_TOKENS), float("-inf"))
    flat = int(torch.argmax(scores))
    score = float(scores.reshape(-1)[flat])
    if score == float("-inf"):
        return score, ""
    start, end = int(starts[flat // count]), int(ends[flat % count])
    return score, context[offsets[start][0] : offsets[end][1]]


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(c for c in text.lower() if c not in PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, truth: str) -> float:
    """SQuAD's F1 of the normalised tokens two answers share (0 when they share none, as in SQuAD v1.1's script
    and `evaluate`'s `squad`, even when both normalise to nothing, e.g. "the")."""
    predicted, true = normalize(prediction).split(), normalize(truth).split()
    same = sum((collections.Counter(predicted) & collections.Counter(true)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(true)
    return 2 * precision * recall / (precision + recall)


def joined(batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    """All features' logits (right-padded with -inf to the longest batch) and labels."""
    length = max(logits.shape[1] for logits, _ in batches)
    pad = [torch.nn.functional.pad(lg, (0, 0, 0, length - lg.shape[1]), value=float("-inf")) for lg, _ in batches]
    return torch.cat(pad), torch.cat([lb for _, lb in batches])


def span_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(cross-entropy of the start logits against the start positions + the same for the ends) / 2."""
    cross_entropy = torch.nn.functional.cross_entropy
    return (cross_entropy(logits[..., 0], labels[:, 0]) + cross_entropy(logits[..., 1], labels[:, 1])) / 2
