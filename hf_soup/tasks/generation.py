"""Sequence-to-sequence generation (summarisation, translation): a target text written from a source text.

Raw rows hold `source` and `target` strings. Sources are tokenised (truncated to `max_length`), targets become the
`labels` (`text_target=`, padding -100). A model is scored on what it generates with its own generation config
(`model.generate` with the generation config saved beside the tokenizer, its `max_length` passed explicitly, as
`Seq2SeqTrainer(predict_with_generate=True)` passes `generation_max_length`): the generated tokens and the labels are
decoded without special tokens and compared with ROUGE-L (`rouge_score`), BLEU and chrF (`sacrebleu`) or exact
match, all as fractions (sacrebleu's 0–100 scores / 100). Generated tokens are no logits, so the report has no
ensemble rows; learned soups and Fisher merging train on the teacher-forced loss of the labels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..errors import SoupError, brief
from .base import Task, input_device, pad_sequences, pad_token_id, require_columns
from .logits import Batches, MetricFunction

DEFAULT_MAX_LENGTH = 20  # GenerationConfig's default length, which Seq2SeqTrainer fills in when none is set


@dataclass(frozen=True)
class Seq2SeqGeneration(Task):
    """A target text per source text: raw columns `source` and `target` (`evaluation.columns`)."""

    column_keys: ClassVar[Mapping[str, str | None]] = {"source": "source", "target": "target"}
    label_key: ClassVar[str] = "target"
    ensemble_undefined: ClassVar[str | None] = "seq2seq models are scored on generated tokens, not logits to average"

    @property
    def metrics(self) -> dict[str, tuple[MetricFunction, bool]]:
        return {
            "rougeL": (lambda batches, causal: rouge_l(*self.texts(batches)), True),
            "bleu": (lambda batches, causal: sacrebleu_score("corpus_bleu", *self.texts(batches)), True),
            "chrf": (lambda batches, causal: sacrebleu_score("corpus_chrf", *self.texts(batches)), True),
            "exact_match": (lambda batches, causal: exact_match(*self.texts(batches)), True),
        }

    def set_generation(self, **settings: int) -> None:
        """Override the generation config's `max_length` and `num_beams` (`evaluation.generation_max_length`,
        `evaluation.num_beams`), as `Seq2SeqTrainingArguments.generation_max_length` and `generation_num_beams` do."""
        unknown = sorted(set(settings) - {"max_length", "num_beams"})
        if unknown:
            raise SoupError(f"seq2seq generation setting {brief(unknown[0])} is unknown; give max_length, num_beams")
        self._bound["overrides"] = dict(settings)

    def preprocess(self, dataset, *, split: str, tokenizer=None, columns: Mapping[str, str], max_length=None):
        source, target = self.column(columns, "source"), self.column(columns, "target")
        require_columns(dataset, {"source": source, "target": target}, split=split)
        if tokenizer is None:
            raise SoupError("a tokenizer is needed to tokenise text: put tokenizer files in the first ingredient")
        for key, name in (("source", source), ("target", target)):
            for row, value in enumerate(dataset[name]):
                if not isinstance(value, str):
                    raise SoupError(
                        f"split {brief(split)} row {row}: the {key} must be a string, got {brief(value)}; name the "
                        f"text column in evaluation.columns.{key}"
                    )
        self._bound["tokenizer"] = tokenizer
        folder = Path(str(getattr(tokenizer, "name_or_path", "")))
        if (folder / "generation_config.json").is_file():  # the first ingredient's own generation settings
            from transformers import GenerationConfig

            self._bound["generation"] = GenerationConfig.from_pretrained(folder)

        def tokenize(batch):
            encoded = tokenizer(batch[source], truncation=True, max_length=max_length)
            encoded["labels"] = tokenizer(text_target=batch[target], truncation=True, max_length=max_length)[
                "input_ids"
            ]
            return encoded

        processed = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
        return super().finish(processed, split=split, columns={})

    def finish(self, dataset, *, split: str, columns: Mapping[str, str]):
        """Refuse data processed elsewhere (`evaluation.preprocess`): the metrics decode with the task's tokenizer."""
        raise SoupError(
            f"split {brief(split)}: seq2seq tokenises raw rows itself (source, target) and decodes with that "
            "tokenizer; drop evaluation.preprocess and give raw rows"
        )

    def collate(self, tokenizer=None) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """Sources right-padded to the longest source, labels to the longest target with -100."""
        pad_id = pad_token_id(tokenizer)

        def collate_batch(examples: list[dict]) -> dict[str, torch.Tensor]:
            batch = pad_sequences([{k: v for k, v in e.items() if k != "labels"} for e in examples], pad_id)
            length = max(len(e["labels"]) for e in examples)
            batch["labels"] = torch.tensor(
                [list(e["labels"]) + [-100] * (length - len(e["labels"])) for e in examples]
            )
            return batch

        return collate_batch

    def outputs(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The generated token ids `[B, L]`, with the generation config saved beside the tokenizer (the first
        ingredient's), else the model's; its `max_length` is passed explicitly, as `Seq2SeqTrainer` passes it."""
        device = input_device(model)
        inputs = {k: v.to(device) for k, v in batch.items() if k in self.inputs}
        config = self._bound.get("generation") or model.generation_config
        settings = {} if config.max_new_tokens is not None else {"max_length": config.max_length or DEFAULT_MAX_LENGTH}
        settings.update(self._bound.get("overrides", {}))
        return model.generate(**inputs, generation_config=config, **settings)

    def training_outputs(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Teacher-forced fp32 logits `[B, T, V]` of the labels (the decoder reads the labels shifted right)."""
        device = input_device(model)
        inputs = {k: v.to(device) for k, v in batch.items() if k in self.inputs or k == "labels"}
        return model(**inputs).logits.float()

    def texts(self, batches: Batches) -> tuple[list[str], list[str]]:
        """The decoded generations and targets (special tokens skipped, spaces stripped)."""
        tokenizer = self._bound.get("tokenizer")
        if tokenizer is None:
            raise SoupError("seq2seq metrics decode with the tokenizer of the preprocessed splits: preprocess first")
        pad_id = pad_token_id(tokenizer)
        predicted, targets = [], []
        for generated, labels in batches:
            predicted += tokenizer.batch_decode(generated.tolist(), skip_special_tokens=True)
            targets += tokenizer.batch_decode(
                labels.masked_fill(labels == -100, pad_id).tolist(), skip_special_tokens=True
            )
        return [p.strip() for p in predicted], [t.strip() for t in targets]


def rouge_l(predicted: list[str], targets: list[str]) -> float:
    """The mean ROUGE-L F-measure (stemmed) of each generation against its target."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise SoupError("seq2seq's rougeL needs rouge_score: pip install 'hf_soup[tasks]' (or rouge_score)") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(t, p)["rougeL"].fmeasure for p, t in zip(predicted, targets)]
    return sum(scores) / len(scores) if scores else 0.0


def sacrebleu_score(function: str, predicted: list[str], targets: list[str]) -> float:
    """sacrebleu's corpus BLEU or chrF (`function`) of the generations against the targets, / 100."""
    try:
        import sacrebleu
    except ImportError:
        raise SoupError(
            "seq2seq's bleu and chrf need sacrebleu: pip install 'hf_soup[tasks]' (or sacrebleu)"
        ) from None
    return getattr(sacrebleu, function)(predicted, [targets]).score / 100


def exact_match(predicted: list[str], targets: list[str]) -> float:
    """The share of generations equal to their target."""
    return sum(p == t for p, t in zip(predicted, targets)) / len(targets) if targets else 0.0
