"""Soups scored with the user's own Trainer (`SoupBuilder(..., trainer=trainer)`): every number equals
`trainer.evaluate()` of the same weights on the same split, for classification, token classification, multiple
choice, causal LM and seq2seq generation."""

import numpy as np
import pytest
import torch
from conftest import bert_config, launched, llama_config, t5_config

from hf_soup import SoupBuilder, SoupError


def arguments(tmp_path, **extra):
    from transformers import TrainingArguments

    settings = dict(per_device_eval_batch_size=16, report_to="none", metric_for_best_model="accuracy")
    return TrainingArguments(str(tmp_path / "trainer"), **{**settings, **extra})


def accuracy(prediction):
    predictions, labels = prediction.predictions, prediction.label_ids
    predicted = predictions if predictions.ndim == labels.ndim else predictions.argmax(-1)
    keep = labels != -100
    return {"accuracy": float((predicted[keep] == labels[keep]).mean())}


def noisy(model, seed: int, scale: float = 0.02):
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model.eval()


def runs(tmp_path, build, k=3):
    """k fine-tunes of one init (seed-0 model plus seeded noise), saved."""
    folders = []
    for seed in range(k):
        torch.manual_seed(0)
        folder = tmp_path / f"run{seed}"
        noisy(build(), seed).save_pretrained(folder)
        folders.append(folder)
    return folders


def evaluated(trainer_class, folder, model_class, args, data, **options):
    """`trainer.evaluate()` of one saved model on every split: {split: metric}."""
    trainer = trainer_class(model_class.from_pretrained(folder), args, eval_dataset=data, **options)
    metrics = trainer.evaluate()
    name = args.metric_for_best_model
    return {split: metrics[f"eval_{split}_{name}"] for split in data}


def check_against_evaluate(tmp_path, folders, model_class, data, trainer_class=None, method="greedy", **options):
    """Cook with the Trainer, then compare every individual and the soup with `trainer.evaluate()`."""
    from transformers import Trainer

    trainer_class = trainer_class or Trainer
    args = options.pop("args", None) or arguments(tmp_path)
    trainer = trainer_class(model_class.from_pretrained(folders[0]), args, eval_dataset=data, **options)
    soup = SoupBuilder([str(f) for f in folders], method=method, trainer=trainer).cook(tmp_path / "soup")
    report = soup.record["report"]
    for folder in folders:
        expected = evaluated(trainer_class, folder, model_class, args, data, **options)
        assert report["individuals"][folder.name] == pytest.approx(expected, abs=1e-12)
    assert report["rows"][method] == pytest.approx(
        evaluated(trainer_class, soup.path, model_class, args, data, **options), abs=1e-12
    )
    return soup, trainer


def classification_data(count, seed):
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 64, (count, 8), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] >= 34).long().tolist()})


def test_sequence_classification_scores_equal_trainer_evaluate(tmp_path):
    from transformers import BertForSequenceClassification

    folders = runs(tmp_path, lambda: BertForSequenceClassification(bert_config(num_labels=2)))
    data = {"validation": classification_data(40, 1), "test": classification_data(40, 2)}
    soup, trainer = check_against_evaluate(
        tmp_path, folders, BertForSequenceClassification, data, compute_metrics=accuracy
    )
    record = soup.record
    assert record["strategy"]["selection_split"] == "validation" and record["report"]["splits"] == [
        "validation",
        "test",
    ]
    assert "ensemble" in record["report"]["rows"]  # logits: the ensemble is defined
    assert trainer.state.log_history == []  # scoring logged nothing and fired no evaluate callback
    assert record["report"]["metric"] == "accuracy"


def test_token_classification_scores_equal_trainer_evaluate(tmp_path):
    from datasets import Dataset
    from transformers import BertForTokenClassification

    folders = runs(tmp_path, lambda: BertForTokenClassification(bert_config(num_labels=4)))

    def split(seed):
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(4, 64, (24, 6), generator=generator)
        labels = (ids % 4).masked_fill(torch.arange(6) == 0, -100)  # the first sub-word only, as in the examples
        return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})

    data = {"validation": split(1), "test": split(2)}
    check_against_evaluate(tmp_path, folders, BertForTokenClassification, data, compute_metrics=accuracy)


def test_multiple_choice_scores_equal_trainer_evaluate(tmp_path):
    from datasets import Dataset
    from transformers import BertForMultipleChoice

    folders = runs(tmp_path, lambda: BertForMultipleChoice(bert_config()))

    def split(seed):
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(4, 64, (20, 3, 5), generator=generator)
        return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0, 0] % 3).tolist()})

    data = {"validation": split(1), "test": split(2)}
    check_against_evaluate(tmp_path, folders, BertForMultipleChoice, data, compute_metrics=accuracy)


def test_causal_lm_scores_equal_trainer_evaluate(tmp_path):
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    folders = runs(tmp_path, lambda: LlamaForCausalLM(llama_config()))

    def split(seed):
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(4, 64, (16, 8), generator=generator)
        return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    def next_token_accuracy(prediction):
        predictions, labels = prediction.predictions[:, :-1], prediction.label_ids[:, 1:]
        return {"accuracy": float((predictions == labels).mean())}

    data = {"validation": split(1), "test": split(2)}
    soup, _ = check_against_evaluate(
        tmp_path,
        folders,
        LlamaForCausalLM,
        data,
        compute_metrics=next_token_accuracy,
        preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
    )
    assert "ensemble" not in soup.record["report"]["rows"]  # predictions are token ids: no logit ensemble
    assert "preprocess_logits_for_metrics" in soup.record["report"]["undefined"]["ensemble"]


def test_seq2seq_generation_scores_equal_trainer_evaluate(tmp_path):
    from datasets import Dataset
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, T5ForConditionalGeneration

    folders = runs(tmp_path, lambda: T5ForConditionalGeneration(t5_config()), k=2)

    def split(seed):
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(2, 64, (12, 6), generator=generator)
        return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids[:, :3].tolist()})

    def exact_match(prediction):
        predictions, labels = prediction.predictions[:, 1:4], prediction.label_ids[:, :3]
        return {
            "exact_match": float((predictions == labels).all(-1).mean()),
            "token_match": float((predictions == labels).mean()),
        }

    args = Seq2SeqTrainingArguments(
        str(tmp_path / "trainer"),
        per_device_eval_batch_size=4,
        report_to="none",
        metric_for_best_model="token_match",
        predict_with_generate=True,
        generation_max_length=5,
    )
    data = {"validation": split(1), "test": split(2)}
    soup, _ = check_against_evaluate(
        tmp_path,
        folders,
        T5ForConditionalGeneration,
        data,
        trainer_class=Seq2SeqTrainer,
        args=args,
        compute_metrics=exact_match,
    )
    report = soup.record["report"]
    assert "ensemble" not in report["rows"] and "greedy ensemble" not in report["rows"]
    assert "predict_with_generate" in report["undefined"]["ensemble"]
    card = (soup.path / "README.md").read_text()
    assert "Not defined for these predictions: ensemble, greedy ensemble (the Trainer generates" in card


# -- bad inputs: one clear error each, before any candidate is scored ---------------------------------------------
@pytest.fixture
def classifier_runs(tmp_path):
    from transformers import BertForSequenceClassification

    return runs(tmp_path, lambda: BertForSequenceClassification(bert_config(num_labels=2)), k=2)


def trainer_for(folder, args, **options):
    from transformers import BertForSequenceClassification, Trainer

    return Trainer(BertForSequenceClassification.from_pretrained(folder), args, **options)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"compute_metrics": None}, "the Trainer has no compute_metrics"),
        ({"eval_dataset": None}, "the Trainer has no eval_dataset"),
        ({"args": {"metric_for_best_model": None}}, "no metric_for_best_model"),
        ({"evaluation": {"selection_split": "dev"}}, "selection_split 'dev' is not among the Trainer's eval datasets"),
        ({"evaluation": {"report_splits": ["shift"]}}, "report_splits 'shift' is not among"),
        ({"evaluation": {"dataset": {"path": "csv"}}}, "comes from the Trainer when a trainer is given"),
    ],
)
def test_bad_trainer_settings_are_refused_before_scoring(tmp_path, classifier_runs, change, message):
    args = arguments(tmp_path, **change.get("args", {}))
    options = {"compute_metrics": accuracy, "eval_dataset": {"validation": classification_data(8, 1)}}
    options.update({k: v for k, v in change.items() if k in options})
    trainer = trainer_for(classifier_runs[0], args, **options)
    with pytest.raises(SoupError, match=message):
        SoupBuilder(classifier_runs, method="greedy", trainer=trainer, evaluation=change.get("evaluation"))
    assert not (tmp_path / "soup").exists()


def test_a_metric_the_trainer_does_not_compute_is_refused_at_the_first_evaluation(tmp_path, classifier_runs):
    trainer = trainer_for(
        classifier_runs[0],
        arguments(tmp_path, metric_for_best_model="f1"),
        compute_metrics=accuracy,
        eval_dataset={"validation": classification_data(8, 1)},
    )
    builder = SoupBuilder(classifier_runs, method="greedy", trainer=trainer)
    with pytest.raises(
        SoupError, match=r"metric_for_best_model 'f1' is not among the Trainer's metrics \(accuracy, loss"
    ):
        builder.cook(tmp_path / "soup")
    assert builder.scorer.evaluations == 1 and not (tmp_path / "soup").exists()


def test_the_resident_model_is_the_trainers_own(tmp_path, classifier_runs):
    """No second copy of the weights: candidates are written into trainer.model, which ends holding the soup."""
    trainer = trainer_for(
        classifier_runs[0], arguments(tmp_path), compute_metrics=accuracy, eval_dataset=classification_data(16, 1)
    )
    model = trainer.model
    soup = SoupBuilder(classifier_runs, method="greedy", trainer=trainer).cook(tmp_path / "soup")
    from transformers import BertForSequenceClassification

    cooked = BertForSequenceClassification.from_pretrained(soup.path)
    assert trainer.model is model
    for (name, value), (_, expected) in zip(model.state_dict().items(), cooked.state_dict().items()):
        assert torch.equal(value, expected), name
    assert soup.record["strategy"]["selection_split"] == "validation"  # a single eval Dataset is the selection split
    assert np.isfinite(soup.record["strategy"]["score"])


def test_learned_soup_through_the_trainer(tmp_path):
    """The learned soup trains its coefficients on batches the Trainer's collator makes; its score is the Trainer's."""
    from transformers import BertForSequenceClassification

    folders = runs(tmp_path, lambda: BertForSequenceClassification(bert_config(num_labels=2)), k=2)
    data = {"validation": classification_data(32, 1), "test": classification_data(32, 2)}
    soup, _ = check_against_evaluate(
        tmp_path, folders, BertForSequenceClassification, data, method="learned", compute_metrics=accuracy
    )
    alpha = soup.record["strategy"]["alpha_mean"]
    assert len(alpha) == 2 and sum(alpha) == pytest.approx(1.0)


def test_two_process_launch_scores_with_the_trainers_distributed_evaluation(ingredients, splits, tmp_path):
    """Under `accelerate launch` (2 CPU processes, gloo) the Trainer's loop shards each split and gathers the
    predictions: every rank sees the numbers of one process, the same greedy trace, and one soup is written."""
    from pathlib import Path

    from datasets import DatasetDict

    DatasetDict({name: split.rename_column("label", "labels") for name, split in splits.items()}).save_to_disk(
        str(tmp_path / "data")
    )
    script = Path(__file__).parent / "scripts_trainer" / "trainer_launch.py"
    arguments = [str(script), "--ingredients", *map(str, ingredients), "--data", str(tmp_path / "data")]
    one, two = launched(arguments, tmp_path)
    assert [r["world_size"] for r in two] == [2, 2] and one["world_size"] == 1
    for result in two:
        assert result["trace"] == one["trace"]
        assert result["report"] == one["report"] and result["individuals"] == one["individuals"]
    assert (tmp_path / "two" / "soup.json").is_file()  # written once, by the main process
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf_soup-staging")] == []


def test_recorded_pantry_scores_are_reused_when_split_and_metric_match(tmp_path, classifier_runs):
    """SoupCallback records `eval_<split>_<metric>` with a dict of eval datasets; the Trainer path reuses it for the
    same split and metric: a greedy soup of 2 then costs 1 evaluation (the soup), not 3."""
    from hf_soup import Pantry

    data = {"validation": classification_data(16, 1), "test": classification_data(16, 2)}
    args = arguments(tmp_path, metric_for_best_model="validation_accuracy")
    pantry = Pantry(tmp_path / "pantry")
    for folder in classifier_runs:
        value = trainer_for(folder, args, compute_metrics=accuracy, eval_dataset=data).evaluate()
        pantry.add(
            folder,
            metric="eval_validation_accuracy",
            value=value["eval_validation_accuracy"],
            greater_is_better=True,
            split="validation",
            run=folder.name,
        )
    trainer = trainer_for(classifier_runs[0], args, compute_metrics=accuracy, eval_dataset=data)
    soup = SoupBuilder(pantry=str(pantry.root), method="greedy", trainer=trainer).cook(tmp_path / "soup")
    assert soup.record["strategy"]["evaluations"] == 1
    recorded = {i.id: i.value for i in pantry.list()}
    assert {i: scores["validation"] for i, scores in soup.record["report"]["individuals"].items()} == recorded
