"""Tasks scored on the text a model generates: sequence-to-sequence generation (`seq2seq`: summarisation, translation,
a target written from a source) and causal-LM generation (`causal-generation`: a short answer written after a prompt).

Both generate with one loop (`Generation.generate`): `model.generate` with the generation config saved beside the
tokenizer (the first ingredient's), else the model's, and `evaluation.generation_max_length` / `num_beams` over it, as
`Seq2SeqTrainer(predict_with_generate=True)` passes `generation_max_length` / `generation_num_beams`. The generated
tokens and the labels are decoded without special tokens, stripped, and compared with ROUGE-L (`rouge_score`), BLEU
and chrF (`sacrebleu`), exact match, or exact match of case-folded texts, all as fractions (sacrebleu's 0–100 scores
/ 100). Generated tokens are no logits, so the report has no ensemble rows; learned soups and Fisher merging train on
the teacher-forced loss of the labels.

- `seq2seq` (`AutoModelForSeq2SeqLM`): raw `source` and `target` strings; sources are right-padded for the encoder,
  targets become the labels (`text_target=`); the generation length is the decoder's `max_length`.
- `causal-generation` (`AutoModelForCausalLM`, decoder-only): raw `prompt` and `answer` strings; each prompt (shown
  as a user message through the tokenizer's chat template with `evaluation.chat_template: true`) is left-padded,
  since a decoder-only model writes on after the last token, and what the model writes after it is its answer. The
  generation length counts new tokens only (`max_new_tokens`), so left padding never changes it.
"""

from __future__ import annotations

import copy
import inspect
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
class Generation(Task):
    """What the tasks scored on generated text share: their metrics, their generation settings, the one generation
    loop and the decoding of generations and labels. A subclass says how rows become prompts and labels."""

    generates: ClassVar[bool] = True
    # the `model.generate` argument `generation_max_length` sets: the decoder's length, or the new tokens only
    length_setting: ClassVar[str] = "max_length"

    @property
    def metrics(self) -> dict[str, tuple[MetricFunction, bool]]:
        return {
            "rougeL": (lambda batches, causal: rouge_l(*self.texts(batches)), True),
            "bleu": (lambda batches, causal: sacrebleu_score("corpus_bleu", *self.texts(batches)), True),
            "chrf": (lambda batches, causal: sacrebleu_score("corpus_chrf", *self.texts(batches)), True),
            "exact_match": (lambda batches, causal: exact_match(*self.texts(batches)), True),
            "exact_match_casefold": (lambda batches, causal: exact_match(*self.texts(batches), casefold=True), True),
        }

    def set_generation(self, **settings: int) -> None:
        """Override the generation config's length and `num_beams` (`evaluation.generation_max_length`,
        `evaluation.num_beams`), as `Seq2SeqTrainingArguments.generation_max_length` and `generation_num_beams` do."""
        unknown = sorted(set(settings) - {"max_length", "num_beams"})
        if unknown:
            raise SoupError(
                f"{self.name} generation setting {brief(unknown[0])} is unknown; give max_length, num_beams"
            )
        self._bound["overrides"] = dict(settings)

    def check_texts(self, dataset, wanted: Mapping[str, str], *, split: str, tokenizer) -> None:
        """Refuse a split without the `wanted` columns (key → column name) or with values that are not strings, and
        a missing tokenizer."""
        require_columns(dataset, wanted, split=split)
        if tokenizer is None:
            raise SoupError("a tokenizer is needed to tokenise text: put tokenizer files in the first ingredient")
        for key, name in wanted.items():
            for row, value in enumerate(dataset[name]):
                if not isinstance(value, str):
                    raise SoupError(
                        f"split {brief(split)} row {row}: the {key} must be a string, got {brief(value)}; name the "
                        f"text column in evaluation.columns.{key}"
                    )

    def bind(self, tokenizer) -> None:
        """Keep the tokenizer (the metrics decode with it) and the generation config saved beside it (the first
        ingredient's own generation settings)."""
        self._bound["tokenizer"] = tokenizer
        folder = Path(str(getattr(tokenizer, "name_or_path", "")))
        if (folder / "generation_config.json").is_file():
            from transformers import GenerationConfig

            self._bound["generation"] = GenerationConfig.from_pretrained(folder)

    def finish(self, dataset, *, split: str, columns: Mapping[str, str]):
        """Refuse data processed elsewhere (`evaluation.preprocess`): the metrics decode with the task's tokenizer."""
        raise SoupError(
            f"split {brief(split)}: {self.name} tokenises raw rows itself ({', '.join(self.column_keys)}) and decodes "
            "with that tokenizer; drop evaluation.preprocess and give raw rows"
        )

    def default_length(self, config) -> int:
        """The generation length when neither the generation config's `max_new_tokens` nor the recipe sets one."""
        return config.max_length or DEFAULT_MAX_LENGTH

    def generate(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The generated token ids `[B, L]` (for a decoder-only model, the prompt first): the generation config saved
        beside the tokenizer, else the model's, with the recipe's settings over it and its length passed explicitly,
        as `Seq2SeqTrainer` passes it."""
        device = input_device(model)
        inputs = {k: v.to(device) for k, v in batch.items() if k in self.inputs}
        config = self._bound.get("generation") or model.generation_config
        settings = dict(self._bound.get("overrides", {}))
        length = settings.pop("max_length", None)
        if length is None and config.max_new_tokens is None:
            length = self.default_length(config)
        if length is not None:
            settings[self.length_setting] = length
        config = copy.deepcopy(config)  # the settings go into a copy, as `generate` would put its keyword arguments
        config.update(**settings)
        return model.generate(**inputs, generation_config=config)

    def texts(self, batches: Batches) -> tuple[list[str], list[str]]:
        """The decoded generations and labels (special tokens skipped, spaces stripped)."""
        tokenizer = self._bound.get("tokenizer")
        if tokenizer is None:
            raise SoupError(
                f"{self.name} metrics decode with the tokenizer of the preprocessed splits: preprocess first"
            )
        pad_id = pad_token_id(tokenizer)
        predicted, targets = [], []
        for generated, labels in batches:
            predicted += tokenizer.batch_decode(generated.tolist(), skip_special_tokens=True)
            targets += tokenizer.batch_decode(
                labels.masked_fill(labels == -100, pad_id).tolist(), skip_special_tokens=True
            )
        return [p.strip() for p in predicted], [t.strip() for t in targets]


@dataclass(frozen=True)
class Seq2SeqGeneration(Generation):
    """A target text per source text: raw columns `source` and `target` (`evaluation.columns`)."""

    column_keys: ClassVar[Mapping[str, str | None]] = {"source": "source", "target": "target"}
    label_key: ClassVar[str] = "target"
    ensemble_undefined: ClassVar[str | None] = "seq2seq models are scored on generated tokens, not logits to average"

    def preprocess(self, dataset, *, split: str, tokenizer=None, columns: Mapping[str, str], max_length=None):
        source, target = self.column(columns, "source"), self.column(columns, "target")
        self.check_texts(dataset, {"source": source, "target": target}, split=split, tokenizer=tokenizer)
        self.bind(tokenizer)

        def tokenize(batch):
            encoded = tokenizer(batch[source], truncation=True, max_length=max_length)
            encoded["labels"] = tokenizer(text_target=batch[target], truncation=True, max_length=max_length)[
                "input_ids"
            ]
            return encoded

        processed = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
        return Task.finish(self, processed, split=split, columns={})

    def collate(self, tokenizer=None) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """Sources right-padded to the longest source, labels to the longest target with -100."""
        pad_id = pad_token_id(tokenizer)

        def collate_batch(examples: list[dict]) -> dict[str, torch.Tensor]:
            batch = pad_sequences([{k: v for k, v in e.items() if k != "labels"} for e in examples], pad_id)
            batch["labels"] = pad_labels([e["labels"] for e in examples])
            return batch

        return collate_batch

    def outputs(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The generated token ids `[B, L]` (see `Generation.generate`)."""
        return self.generate(model, batch)

    def training_outputs(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Teacher-forced fp32 logits `[B, T, V]` of the labels (the decoder reads the labels shifted right)."""
        device = input_device(model)
        inputs = {k: v.to(device) for k, v in batch.items() if k in self.inputs or k == "labels"}
        return model(**inputs).logits.float()


@dataclass(frozen=True)
class CausalGeneration(Generation):
    """A short answer per prompt, written by a decoder-only model: raw columns `prompt` and `answer`."""

    column_keys: ClassVar[Mapping[str, str | None]] = {"prompt": "prompt", "answer": "answer"}
    label_key: ClassVar[str] = "answer"
    ensemble_undefined: ClassVar[str | None] = (
        "causal-generation models are scored on generated tokens, not logits to average"
    )
    length_setting: ClassVar[str] = "max_new_tokens"

    def set_chat_template(self, enabled: bool) -> None:
        """Show each prompt as a user message through the tokenizer's chat template (`evaluation.chat_template`)."""
        self._bound["chat_template"] = bool(enabled)

    def check_config(self, config) -> None:
        if getattr(config, "is_encoder_decoder", False):
            raise SoupError(
                f"task causal-generation generates with a decoder-only model (AutoModelForCausalLM), but the model "
                f"is an encoder-decoder {config.model_type!r}; use evaluation.task: seq2seq (source and target "
                "columns) for it"
            )

    def default_length(self, config) -> int:
        """20 new tokens: the generation config's `max_length` counts the prompt, which left padding lengthens."""
        return DEFAULT_MAX_LENGTH

    def preprocess(self, dataset, *, split: str, tokenizer=None, columns: Mapping[str, str], max_length=None):
        prompt, answer = self.column(columns, "prompt"), self.column(columns, "answer")
        self.check_texts(dataset, {"prompt": prompt, "answer": answer}, split=split, tokenizer=tokenizer)
        self.bind(tokenizer)
        chat = self._bound.get("chat_template", False)
        if chat and not getattr(tokenizer, "chat_template", None):
            raise SoupError(
                "evaluation.chat_template is true but the tokenizer has no chat template (its chat_template is "
                "empty); save one with the tokenizer (tokenizer.chat_template = ...; save_pretrained) or drop "
                "chat_template"
            )
        end = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

        def tokenize(batch):
            if chat:
                texts = [
                    tokenizer.apply_chat_template(
                        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
                    )
                    for text in batch[prompt]
                ]
                ids = tokenizer(texts, add_special_tokens=False)["input_ids"]  # the template writes its own
            else:
                ids = tokenizer(batch[prompt])["input_ids"]
            ids = [row[-max_length:] if max_length else row for row in ids]  # the end is what the answer follows
            answers = tokenizer(batch[answer], add_special_tokens=False, truncation=True, max_length=max_length)
            return {
                "input_ids": ids,
                "attention_mask": [[1] * len(row) for row in ids],
                "labels": [row + end for row in answers["input_ids"]],
            }

        processed = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
        for row, ids in enumerate(processed["input_ids"]):
            if not ids:
                raise SoupError(
                    f"split {brief(split)} row {row}: the prompt is empty (no tokens); a model needs a prompt to "
                    "answer after"
                )
        return processed

    def collate(self, tokenizer=None) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """Prompts left-padded to the longest prompt (the pad id, mask 0), answers right-padded with -100. The
        tokenizer is left as it is (its `padding_side` is not used)."""
        pad_id = pad_token_id(tokenizer)

        def collate_batch(examples: list[dict]) -> dict[str, torch.Tensor]:
            length = max(len(e["input_ids"]) for e in examples)
            room = [length - len(e["input_ids"]) for e in examples]
            return {
                "input_ids": torch.tensor([[pad_id] * n + list(e["input_ids"]) for n, e in zip(room, examples)]),
                "attention_mask": torch.tensor([[0] * n + [1] * (length - n) for n in room]),
                "labels": pad_labels([e["labels"] for e in examples]),
            }

        return collate_batch

    def outputs(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The token ids generated after the prompt `[B, N]` (see `Generation.generate`)."""
        return self.generate(model, batch)[:, batch["input_ids"].shape[1] :]

    def training_outputs(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Teacher-forced fp32 logits of the answers, aligned with the labels (see `answer_logits`)."""
        return answer_logits(model, batch)


def answer_logits(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The teacher-forced fp32 logits `[B, A, V]` of a decoder-only model for each row's answer.

    Each row's prompt (its `input_ids` where the `attention_mask` is 1) is followed by its answer (its `labels` that
    are not -100); the rows are left-padded to one length and run in one forward pass, with position ids counted
    over the mask as `generate` counts them. The logits that predict each answer token are put where that token
    sits in `labels` (zeros where the labels are -100), so `labels` may be padded on either side, as the built-in
    task (right) or `DataCollatorForSeq2Seq` with a left-padding tokenizer (left) pads them.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    rows = [torch.cat([i[m.bool()], a[a != -100]]) for i, m, a in zip(ids, mask, labels)]
    length = max(len(row) for row in rows)
    sequences = torch.stack([torch.nn.functional.pad(row, (length - len(row), 0)) for row in rows])
    attention = torch.stack([torch.nn.functional.pad(torch.ones_like(row), (length - len(row), 0)) for row in rows])
    device = input_device(model)
    inputs = {"input_ids": sequences.to(device), "attention_mask": attention.to(device)}
    if "position_ids" in inspect.signature(model.forward).parameters:
        inputs["position_ids"] = ((attention.cumsum(-1) - 1).masked_fill(attention == 0, 0)).to(device)
    logits = model(**inputs).logits.float()
    answers = logits.new_zeros((*labels.shape, logits.shape[-1]))
    for row, row_labels in enumerate(labels):
        where = (row_labels != -100).nonzero().squeeze(-1).to(device)
        if len(where):
            answers[row, where] = logits[row, length - len(where) - 1 : length - 1]
    return answers


def pad_labels(labels: list[list[int]]) -> torch.Tensor:
    """Label sequences right-padded with -100 (ignored by the loss) to the longest."""
    length = max(len(row) for row in labels)
    return torch.tensor([list(row) + [-100] * (length - len(row)) for row in labels])


def rouge_l(predicted: list[str], targets: list[str]) -> float:
    """The mean ROUGE-L F-measure (stemmed) of each generation against its target."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise SoupError("rougeL needs rouge_score: pip install 'hf_soup[tasks]' (or rouge_score)") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(t, p)["rougeL"].fmeasure for p, t in zip(predicted, targets)]
    return sum(scores) / len(scores) if scores else 0.0


def sacrebleu_score(function: str, predicted: list[str], targets: list[str]) -> float:
    """sacrebleu's corpus BLEU or chrF (`function`) of the generations against the targets, / 100."""
    try:
        import sacrebleu
    except ImportError:
        raise SoupError("bleu and chrf need sacrebleu: pip install 'hf_soup[tasks]' (or sacrebleu)") from None
    return getattr(sacrebleu, function)(predicted, [targets]).score / 100


def exact_match(predicted: list[str], targets: list[str], *, casefold: bool = False) -> float:
    """The share of generations equal to their target (both already stripped), compared case-folded with
    `casefold` (`str.casefold`: "Paris" matches "paris")."""
    if casefold:
        predicted, targets = [p.casefold() for p in predicted], [t.casefold() for t in targets]
    return sum(p == t for p, t in zip(predicted, targets)) / len(targets) if targets else 0.0
