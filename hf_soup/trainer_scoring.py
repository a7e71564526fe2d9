"""Scoring with the user's own `Trainer`: its evaluation loop, data collator, `compute_metrics`,
`metric_for_best_model` / `greater_is_better`, eval datasets and (for a `Seq2SeqTrainer` with
`predict_with_generate`) its generation settings. Any task a Trainer evaluates can then be souped.

A causal LM whose `Seq2SeqTrainer` generates is judged on its answers (task `causal-generation`). Transformers'
`Seq2SeqTrainer.prediction_step` also runs the model on each batch with its labels for `eval_loss`, and a
decoder-only model's loss needs labels as wide as its `input_ids`, so its batches must hold prompts and answers of
one width `L`: prompts left-padded (the model writes on after the last token), answers as `labels`, both padded to
`L` (`tokenizer.padding_side = "left"`, `DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=L)`).
Each prediction is then the `L` prompt tokens followed by the generated ones, which `compute_metrics` keeps
(`predictions[:, L:]`); its `eval_loss` is no loss of the answers (the forward pass sees only the prompts), so the
soup is chosen by a `compute_metrics` key. Other layouts are refused before any candidate is scored.

A `TrainerScorer` is a scorer like `hf_soup.scoring.Scorer` (strategies never see the Trainer): each candidate is
scored by `trainer.predict(split, metric_key_prefix="eval")`, which runs `trainer.evaluate`'s loop without logging
or firing the evaluate callbacks, so the numbers equal `trainer.evaluate()` on the same weights and split. Its
resident model is `trainer.model`: candidates are written into it in place (no second copy of the weights), so after
a cook it holds the last soup served, the chosen one.

Example:

```python
>>> trainer = Seq2SeqTrainer(model, args, eval_dataset={"validation": val, "test": test},
...                          data_collator=collator, compute_metrics=rouge)     # args.predict_with_generate=True
>>> soup = SoupBuilder(pantry="pantry", method="greedy", trainer=trainer).cook("soups/greedy")
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import SoupError, brief, did_you_mean, first_line
from .scoring import BaseScorer, Batches, Metric
from .tasks import TASKS, Task, answer_logits, input_device

# model class name ending → (task name, the Auto class that builds such a model from a config)
TASK_NAMES = {
    "ForSequenceClassification": ("sequence-classification", "AutoModelForSequenceClassification"),
    "ForTokenClassification": ("token-classification", "AutoModelForTokenClassification"),
    "ForQuestionAnswering": ("question-answering", "AutoModelForQuestionAnswering"),
    "ForMultipleChoice": ("multiple-choice", "AutoModelForMultipleChoice"),
    "ForCausalLM": ("causal-lm", "AutoModelForCausalLM"),
    "ForConditionalGeneration": ("seq2seq", "AutoModelForSeq2SeqLM"),
    "ForSeq2SeqLM": ("seq2seq", "AutoModelForSeq2SeqLM"),
    "ForAudioClassification": ("audio-classification", "AutoModelForAudioClassification"),
    "ForImageClassification": ("image-classification", "AutoModelForImageClassification"),
}
# `evaluation:` keys that still mean something with a Trainer (the rest comes from the Trainer)
EVALUATION_KEYS = ("task", "selection_split", "report_splits", "compare", "reuse_recorded_scores")


@dataclass(frozen=True)
class TrainerTask(Task):
    """The task of a Trainer's model: its forward pass on a batch the Trainer's collator made gives the logits
    (labels stay in the batch: encoder-decoder models build their decoder inputs from them)."""

    def model_class(self):
        """The Auto class that builds this task's model (for a tasting that builds its own: adapters)."""
        if not self.auto_class:
            raise SoupError(
                f"the Trainer's model is a {self.name}, whose task hf_soup does not know, so it cannot build another "
                "one around adapters; score full models with this Trainer, or adapters with a known model head"
            )
        return super().model_class()

    def outputs(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        device = input_device(model)
        return model(**{k: v.to(device) for k, v in batch.items()}).logits.float()

    def training_outputs(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The logits learned soups train on: the forward pass on the batch, or for a causal LM whose Trainer
        generates (its batches hold only prompts), the teacher-forced logits of the answers."""
        if self.name == "causal-generation":
            return answer_logits(model, batch)
        return self.outputs(model, batch)


class Predicted(list):
    """One model's predictions on a split, as one `(predictions, label_ids)` batch, with the metrics the Trainer's
    loop computed for them (`metrics`): a `Scorer`'s `Batches`, so ensembles can average them."""

    def __init__(self, predictions: torch.Tensor, label_ids: torch.Tensor, metrics: dict[str, float]):
        super().__init__([(predictions, label_ids)])
        self.metrics = metrics


class TrainerScorer(BaseScorer):
    """Score candidates with a `transformers.Trainer` (or `Seq2SeqTrainer`).

    Args:
        trainer (`Trainer`): with `compute_metrics`, `args.metric_for_best_model` and eval data (`eval_dataset`: one
            `Dataset`, or a dict of named splits: the selection split and the report splits).
        evaluation (`dict`, *optional*): `task` (checked against the Trainer's model; default: the model's, and
            `causal-generation` for a causal LM whose Trainer generates), `selection_split` (default: the split
            `metric_for_best_model` names, else the first), `report_splits` (default: the other splits), `compare`,
            `reuse_recorded_scores`.

    Every bad setting is refused here, before any candidate is scored.
    """

    def __init__(self, trainer, evaluation: Mapping[str, Any] | None = None):
        evaluation = dict(evaluation or {})
        extra = [key for key in evaluation if key not in EVALUATION_KEYS]
        if extra:
            raise SoupError(
                f"evaluation {brief(extra[0])} comes from the Trainer when a trainer is given (its eval_dataset, "
                f"data collator, compute_metrics and metric_for_best_model); give only {', '.join(EVALUATION_KEYS)}"
            )
        self.trainer, args = trainer, trainer.args
        if args.prediction_loss_only:
            raise SoupError(
                "the Trainer's args have prediction_loss_only=True, so its evaluation gives only the loss and never "
                "calls compute_metrics; set TrainingArguments(prediction_loss_only=False)"
            )
        if trainer.compute_metrics is None:
            raise SoupError(
                "the Trainer has no compute_metrics, so its evaluation gives only the loss; give it compute_metrics "
                "(Trainer(..., compute_metrics=...)), the function that turns predictions into the soup's metric"
            )
        data = trainer.eval_dataset
        if data is None or isinstance(data, Mapping) and not data:
            raise SoupError(
                "the Trainer has no eval_dataset; give Trainer(..., eval_dataset={'validation': ..., 'test': ...}): "
                "the selection split and the splits to report"
            )
        named = dict(data) if isinstance(data, Mapping) else {evaluation.get("selection_split", "validation"): data}
        metric, split = _metric_name(args.metric_for_best_model, named)
        selection = evaluation.get("selection_split", split or next(iter(named)))
        report = list(evaluation.get("report_splits", [name for name in named if name != selection]))
        for name, key in [(selection, "selection_split"), *((s, "report_splits") for s in report)]:
            if name not in named:
                raise SoupError(
                    f"evaluation {key} {name!r} is not among the Trainer's eval datasets ({', '.join(named)}); "
                    "name one of them, or add it to eval_dataset"
                )
        self.splits = {name: named[name] for name in [selection, *[s for s in report if s != selection]]}
        self.evaluation = {"selection_split": selection, "report_splits": report, **evaluation}
        greater = args.greater_is_better if args.greater_is_better is not None else not metric.endswith("loss")
        self.metric = Metric(metric, self._compute_metric, greater)
        model_class = type(_unwrap(trainer.model)).__name__
        name, auto_class = task_of(model_class)
        generates = bool(getattr(args, "predict_with_generate", False))
        if name == "causal-lm" and generates:
            name = "causal-generation"
        _check_task(evaluation.get("task"), name, model_class, generates)
        self.task = TrainerTask(name, auto_class, metric, ())
        self.collator = trainer.data_collator
        self.resident = trainer.model
        self.evaluations = 0
        if name == "causal-generation":
            if metric == "loss":
                raise SoupError(
                    "metric_for_best_model is the loss, but a causal LM whose Trainer generates sees only the prompts "
                    "in the forward pass that gives eval_loss, so it is no loss of the answers; choose the soup by a "
                    "compute_metrics key (e.g. exact_match)"
                )
            for split in self.splits:
                self._check_prompt_batches(split)
        self.ensemble_undefined: str | None = None  # set when its predictions turn out not to be logits
        if generates:
            self.ensemble_undefined = "the Trainer generates (predict_with_generate): its predictions are token ids"
        elif trainer.preprocess_logits_for_metrics is not None:
            self.ensemble_undefined = "the Trainer's preprocess_logits_for_metrics turns logits into other predictions"

    def split(self, name: str):
        """A split as the Trainer's loop feeds it: the columns the model does not take removed."""
        if name not in self.splits:
            raise SoupError(f"no split {name!r}; the Trainer's eval datasets are: {', '.join(self.splits)}")
        return self.trainer.get_test_dataloader(self.splits[name]).dataset

    def _check_prompt_batches(self, split: str) -> None:
        """Refuse batches a causal LM cannot be judged on by generation (see the module's docstring): no labels,
        labels and prompts of different widths, right-padded prompts. The first batch of `split` is checked."""
        data = self.split(split)
        rows = [data[i] for i in range(min(len(data), self.trainer.args.per_device_eval_batch_size))]
        try:
            batch = self.collator(rows)
        except (ValueError, TypeError, KeyError, RuntimeError) as error:
            raise SoupError(
                f"the Trainer's data collator cannot batch the first rows of split {split!r} ({first_line(error)}); "
                "give it a collator that pads prompts and answers (DataCollatorForSeq2Seq)"
            ) from None
        ids, labels, mask = batch.get("input_ids"), batch.get("labels"), batch.get("attention_mask")
        if labels is None:
            raise SoupError(
                f"split {split!r}: the Trainer's batches have no labels, and Seq2SeqTrainer hands compute_metrics "
                "only `labels` (as label_ids): put each answer's token ids in a labels column"
            )
        if ids is not None and np.shape(labels)[-1] != np.shape(ids)[-1]:
            raise SoupError(
                f"split {split!r}: the prompts (input_ids) are {np.shape(ids)[-1]} tokens wide and the answers "
                f"(labels) {np.shape(labels)[-1]}, but Seq2SeqTrainer also runs the model on each batch with its "
                "labels for eval_loss, and a decoder-only model's loss needs labels as wide as input_ids (else it "
                "fails in transformers' loss). Pad both to one width L: tokenizer.padding_side = 'left', "
                "DataCollatorForSeq2Seq(tokenizer, padding='max_length', max_length=L), prompts and answers tokenised "
                "with truncation to L; compute_metrics then keeps predictions[:, L:] (what follows the prompt)"
            )
        if mask is not None and not np.asarray(mask)[:, -1].all():
            raise SoupError(
                f"split {split!r}: the prompts are right-padded (attention_mask ends in 0), but a decoder-only model "
                "writes on after the last position, which must be the prompt's last token: set "
                "tokenizer.padding_side = 'left' before making the data collator"
            )

    def outputs(self, model: torch.nn.Module, split: str) -> Predicted:
        """`trainer.predict` of `model` on `split`: predictions, labels and the Trainer's metrics."""
        if split not in self.splits:
            raise SoupError(f"no split {split!r}; the Trainer's eval datasets are: {', '.join(self.splits)}")
        trainer, own = self.trainer, self.trainer.model
        trainer.model = model  # the resident model is the Trainer's own, unless a tasting built another (adapters)
        try:
            output = trainer.predict(self.splits[split], metric_key_prefix="eval")
        finally:
            trainer.model = own
        self.evaluations += 1
        predictions, labels = output.predictions, output.label_ids
        if isinstance(predictions, tuple) or isinstance(labels, tuple):  # e.g. question answering: start, end
            self.ensemble_undefined = "the model's predictions are a tuple of arrays, not one array of logits"
            predictions = predictions[0] if isinstance(predictions, tuple) else predictions
            labels = labels[0] if isinstance(labels, tuple) else labels
        metrics = {key.removeprefix("eval_"): value for key, value in output.metrics.items()}
        if self.metric.name not in metrics:
            shown = sorted(k for k in metrics if not k.endswith(("_runtime", "_per_second", "preparation_time")))
            raise SoupError(
                f"metric_for_best_model {self.metric.name!r} is not among the Trainer's metrics ({', '.join(shown)}); "
                "set metric_for_best_model to one of them (without the eval_ prefix is fine)"
            )
        return Predicted(torch.from_numpy(np.asarray(predictions)), torch.from_numpy(np.asarray(labels)), metrics)

    def _compute_metric(self, batches: Batches, causal: bool) -> float:
        """The metric of predictions: the Trainer's own number for one model's, `compute_metrics` for an ensemble's
        averaged logits."""
        if isinstance(batches, Predicted):
            return float(batches.metrics[self.metric.name])
        from transformers import EvalPrediction

        predictions = np.concatenate([b[0].numpy() for b in batches])
        labels = np.concatenate([b[1].numpy() for b in batches])
        values = self.trainer.compute_metrics(EvalPrediction(predictions=predictions, label_ids=labels))
        values = {key.removeprefix("eval_"): value for key, value in values.items()}
        if self.metric.name not in values:
            raise SoupError(
                f"compute_metrics gives no {self.metric.name!r} for averaged logits (it gave {', '.join(values)}); "
                "metric_for_best_model must be one of compute_metrics' keys for the ensemble rows"
            )
        return float(values[self.metric.name])


def task_of(model_class: str) -> tuple[str, str]:
    """The task name and Auto class of a model class: by the Auto audio-classification mapping first (audio models
    are mostly named `...ForSequenceClassification`), then by the class name's ending; the class name and no Auto
    class for a model of a task hf_soup does not know."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES

    if model_class in MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES.values():
        return TASK_NAMES["ForAudioClassification"]
    return next((task for end, task in TASK_NAMES.items() if model_class.endswith(end)), (model_class, ""))


def _check_task(wanted: str | None, name: str, model_class: str, generates: bool) -> None:
    """Refuse an `evaluation.task` that does not fit the Trainer: a generating task whose Trainer does not generate,
    or a task of another kind of model."""
    if wanted is None or wanted == name:
        return
    if wanted not in TASKS:
        raise SoupError(
            f"evaluation task {brief(wanted)}{did_you_mean(wanted, TASKS)} is unknown; tasks: {', '.join(TASKS)}"
        )
    if TASKS[wanted].generates and not generates:
        raise SoupError(
            f"evaluation task {wanted!r} is judged on generated text, but the Trainer does not generate (its "
            "predictions are logits): use a Seq2SeqTrainer with Seq2SeqTrainingArguments(predict_with_generate=True) "
            "and a compute_metrics that decodes the generated ids"
        )
    raise SoupError(
        f"evaluation task {wanted!r} does not fit the Trainer's model, a {model_class} (task {name!r}"
        f"{' as its Trainer generates' if generates else ''}); give the Trainer a {TASKS[wanted].auto_class} model, "
        "or drop evaluation.task"
    )


def _metric_name(metric_for_best_model: str | None, splits: Mapping[str, Any]) -> tuple[str, str | None]:
    """`metric_for_best_model` without the Trainer's `eval_` prefix, and the split it names (`eval_<split>_<metric>`
    with a dict of eval datasets), if any."""
    if not metric_for_best_model:
        raise SoupError(
            "the Trainer's args have no metric_for_best_model; set TrainingArguments(metric_for_best_model=...) to "
            "the compute_metrics key the soup is chosen by (and greater_is_better if it is not obvious)"
        )
    name = metric_for_best_model.removeprefix("eval_")
    for split in splits:
        if name.startswith(f"{split}_"):
            return name.removeprefix(f"{split}_"), split
    return name, None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft model."""
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model
