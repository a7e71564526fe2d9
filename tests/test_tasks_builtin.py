"""The built-in `token-classification` and `multiple-choice` tasks: soups cooked from raw rows (words and tags;
questions and choices) with no Python of the user's, whose every number equals the Trainer path's on the same
tokenised data, with sub-word tag alignment, bad inputs refused early, ensembles and learned soups."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import bert_config

from hf_soup import SoupBuilder, SoupError
from hf_soup.cli import main
from hf_soup.scoring import Scorer
from hf_soup.strategies.ensemble import average_logits

WORDS = ["john", "mary", "lives", "in", "paris", "rome", "new", "york", "the", "cat", "play", "sing", "walk", "park"]
PIECES = ["##ing", "##ed", "##s"]
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
# a tag per word for the stand-in data (words with a suffix keep the stem's tag)
TAG_OF = {"john": 1, "mary": 1, "paris": 3, "rome": 3, "new": 3, "york": 4}


def word_piece_tokenizer(folder):
    """A real BertTokenizerFast over a small vocab in which `playing`, `walked`, `parks` split into pieces."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *PIECES]) + "\n")
    return BertTokenizerFast(vocab=str(vocab))  # transformers 5 reads `vocab`; `vocab_file` would be ignored


def noisy(model, seed: int, scale: float = 0.05):
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model.eval()


def runs(tmp_path, build, tokenizer, k=3):
    """k fine-tunes of one init (seed-0 model plus seeded noise), each saved with the tokenizer."""
    folders = []
    for seed in range(k):
        torch.manual_seed(0)
        folder = tmp_path / f"run{seed}"
        noisy(build(), seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders


def tagger_config():
    return bert_config(num_labels=5, id2label=dict(enumerate(TAGS)), label2id={t: i for i, t in enumerate(TAGS)})


def tagged_rows(count, seed):
    from datasets import Dataset

    generator = np.random.default_rng(seed)
    tokens, tags = [], []
    for _ in range(count):
        words = [str(w) for w in generator.choice(WORDS, size=int(generator.integers(3, 9)))]
        words = [w + str(generator.choice(["", "ing", "s"])) if w in ("play", "walk", "park") else w for w in words]
        tokens.append(words)
        tags.append([TAG_OF.get(w, 0) for w in words])
    return Dataset.from_dict({"words": tokens, "ner": tags})


def align_like_run_ner(tokenizer, rows):
    """The Transformers token-classification example's tokenisation: tags on first sub-words, -100 elsewhere."""

    def tokenize(batch):
        encoded = tokenizer(batch["words"], is_split_into_words=True, truncation=True)
        labels = []
        for row, tags in enumerate(batch["ner"]):
            previous, aligned = None, []
            for word in encoded.word_ids(row):
                aligned.append(-100 if word is None or word == previous else tags[word])
                previous = word
            labels.append(aligned)
        encoded["labels"] = labels
        return encoded

    return rows.map(tokenize, batched=True, remove_columns=rows.column_names)


def seqeval_metrics(prediction):
    from seqeval.metrics import f1_score

    predictions, labels = prediction.predictions.argmax(-1), prediction.label_ids
    truth = [[TAGS[t] for t in row if t != -100] for row in labels]
    said = [[TAGS[p] for p, t in zip(prow, row) if t != -100] for prow, row in zip(predictions, labels)]
    return {"entity_f1": float(f1_score(truth, said, zero_division=0))}


def trainer_for(tmp_path, model, data, metric, compute_metrics, collator):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        str(tmp_path / "trainer"), per_device_eval_batch_size=8, report_to="none", metric_for_best_model=metric
    )
    return Trainer(model, args, eval_dataset=data, compute_metrics=compute_metrics, data_collator=collator)


def assert_same_reports(ours, theirs):
    assert set(ours["rows"]) == set(theirs["rows"]) and set(ours["individuals"]) == set(theirs["individuals"])
    for name, scores in theirs["individuals"].items():
        assert ours["individuals"][name] == pytest.approx(scores, abs=1e-9), name
    for row, scores in theirs["rows"].items():
        assert ours["rows"][row] == pytest.approx(scores, abs=1e-9), row


@pytest.fixture
def taggers(tmp_path):
    from transformers import BertForTokenClassification

    tokenizer = word_piece_tokenizer(tmp_path / "tokenizer")
    return runs(tmp_path, lambda: BertForTokenClassification(tagger_config()), tokenizer), tokenizer


def tagging_evaluation(**extra):
    splits = {"validation": tagged_rows(30, 1), "test": tagged_rows(30, 2)}
    return {
        "splits": splits,
        "task": "token-classification",
        "columns": {"tokens": "words", "tags": "ner"},
        "selection_split": "validation",
        "report_splits": ["test"],
        "batch_size": 8,
        "compare": ["uniform", "ensemble"],
        **extra,
    }


def test_token_classification_scores_equal_the_trainer_path(tmp_path, taggers):
    from transformers import BertForTokenClassification, DataCollatorForTokenClassification

    folders, tokenizer = taggers
    evaluation = tagging_evaluation()
    ours = SoupBuilder([str(f) for f in folders], method="greedy", evaluation=evaluation).cook(tmp_path / "ours")
    report = ours.record["report"]
    assert report["metric"] == "entity_f1"
    data = {split: align_like_run_ner(tokenizer, rows) for split, rows in evaluation["splits"].items()}
    trainer = trainer_for(
        tmp_path,
        BertForTokenClassification.from_pretrained(folders[0]),
        data,
        "entity_f1",
        seqeval_metrics,
        DataCollatorForTokenClassification(tokenizer),
    )
    theirs = SoupBuilder([str(f) for f in folders], method="greedy", trainer=trainer).cook(tmp_path / "theirs")
    assert_same_reports(report, theirs.record["report"])
    scores = [s for scores in report["individuals"].values() for s in scores.values()]
    assert max(scores) > 0.1 and len(set(scores)) > 2  # real, different numbers: the comparison is not vacuous


def test_token_metrics_of_averaged_logits(tmp_path, taggers):
    """Entity precision/recall/F1 and token accuracy of one model and of the logit ensemble, against seqeval and
    a count by hand; batches of one model are padded per batch, and the ensemble's line up."""
    from seqeval.metrics import f1_score, precision_score, recall_score
    from transformers import BertForTokenClassification

    folders, tokenizer = taggers
    rows = tagged_rows(20, 3)
    scorers = {
        metric: Scorer(
            {"validation": rows},
            task="token-classification",
            metric=metric,
            tokenizer=tokenizer,
            columns={"tokens": "words", "tags": "ner"},
            batch_size=6,
        )
        for metric in ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")
    }
    models = [BertForTokenClassification.from_pretrained(f).eval() for f in folders]
    outputs = [scorers["entity_f1"].outputs(m, "validation") for m in models]
    assert [b[0].shape[1] for b in outputs[0]] != [outputs[0][0][0].shape[1]] * len(outputs[0])  # per-batch padding
    ensemble = average_logits(outputs)
    aligned = align_like_run_ner(tokenizer, rows)
    truth, said, right, total = [], [], 0, 0
    for row in range(len(aligned)):
        ids = torch.tensor([aligned[row]["input_ids"]])
        labels = torch.tensor(aligned[row]["labels"])
        with torch.no_grad():
            logits = sum(m(input_ids=ids).logits[0] for m in models) / len(models)
        keep = labels != -100
        predicted = logits.argmax(-1)[keep]
        truth.append([TAGS[t] for t in labels[keep].tolist()])
        said.append([TAGS[p] for p in predicted.tolist()])
        right += int((predicted == labels[keep]).sum())
        total += int(keep.sum())
    expected = {
        "entity_f1": f1_score(truth, said),
        "entity_precision": precision_score(truth, said),
        "entity_recall": recall_score(truth, said),
        "token_accuracy": right / total,
    }
    for metric, scorer in scorers.items():
        scorer.outputs(models[0], "validation")  # each scorer learns the tag names from a model it scores
        assert scorer.compute(ensemble) == pytest.approx(expected[metric], abs=1e-6), metric
    assert 0 < expected["entity_f1"] < 1 and expected["entity_precision"] != expected["entity_recall"]


def test_sub_word_tags_go_to_the_first_piece(tmp_path):
    from transformers import BertForTokenClassification

    tokenizer = word_piece_tokenizer(tmp_path / "tagger")
    BertForTokenClassification(tagger_config()).save_pretrained(tmp_path / "tagger")  # label2id beside the tokenizer
    tokenizer.save_pretrained(tmp_path / "tagger")
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tagger")
    rows = Dataset.from_dict(
        {
            "tokens": [["john", "playing", "in", "new", "york"], ["mary", "walked"]],
            "tags": [["B-PER", "O", "O", "B-LOC", "I-LOC"], ["B-PER", "O"]],
        }
    )
    scorer = Scorer({"validation": rows}, task="token-classification", tokenizer=tokenizer)
    first = scorer.split("validation")[0]
    pieces = tokenizer.convert_ids_to_tokens(first["input_ids"])
    assert pieces == ["[CLS]", "john", "play", "##ing", "in", "new", "york", "[SEP]"]
    assert first["labels"] == [-100, 1, 0, -100, 0, 3, 4, -100]
    short = Scorer({"validation": rows}, task="token-classification", tokenizer=tokenizer, max_length=4)
    assert short.split("validation")[0]["labels"] == [-100, 1, 0, -100]  # [CLS] john play [SEP]
    assert short.split("validation")[1]["labels"] == [-100, 1, 0, -100]  # [CLS] mary walk [SEP]
    batch = scorer.collator([scorer.split("validation")[i] for i in range(2)])
    assert batch["labels"].tolist()[1] == [-100, 1, 0, -100, -100, -100, -100, -100]  # padding is ignored
    assert batch["input_ids"].tolist()[1][5:] == [0, 0, 0]  # [CLS] mary walk ##ed [SEP], then [PAD]
    assert batch["attention_mask"].tolist()[1] == [1, 1, 1, 1, 1, 0, 0, 0]


# -- multiple choice -------------------------------------------------------------------------------------------------


def question_rows(count, seed, choices=3):
    from datasets import Dataset

    generator = np.random.default_rng(seed)
    questions = [" ".join(generator.choice(WORDS, size=4)) for _ in range(count)]
    options = [[" ".join(generator.choice(WORDS, size=2)) for _ in range(choices)] for _ in range(count)]
    labels = [int(generator.integers(0, choices)) for _ in range(count)]
    return Dataset.from_dict({"prompt": questions, "options": options, "answer": labels})


def pair_like_run_swag(tokenizer, rows):
    """Every (question, choice) pair tokenised, grouped back into one [C, T] list per row."""

    def tokenize(batch):
        count = len(batch["options"][0])
        firsts = [q for q in batch["prompt"] for _ in range(count)]
        seconds = [c for options in batch["options"] for c in options]
        encoded = tokenizer(firsts, seconds, truncation=True)
        grouped = {k: [v[i : i + count] for i in range(0, len(v), count)] for k, v in encoded.items()}
        return {**grouped, "labels": batch["answer"]}

    return rows.map(tokenize, batched=True, remove_columns=rows.column_names)


def accuracy(prediction):
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


@pytest.fixture
def choosers(tmp_path):
    from transformers import BertForMultipleChoice

    tokenizer = word_piece_tokenizer(tmp_path / "tokenizer")
    return runs(tmp_path, lambda: BertForMultipleChoice(bert_config()), tokenizer), tokenizer


def choice_evaluation(**extra):
    return {
        "splits": {"validation": question_rows(40, 1), "test": question_rows(40, 2)},
        "task": "multiple-choice",
        "columns": {"text": "prompt", "choices": "options", "label": "answer"},
        "selection_split": "validation",
        "report_splits": ["test"],
        "batch_size": 8,
        "compare": ["uniform", "ensemble"],
        **extra,
    }


def test_multiple_choice_scores_equal_the_trainer_path(tmp_path, choosers):
    from transformers import BertForMultipleChoice, DataCollatorForMultipleChoice

    folders, tokenizer = choosers
    evaluation = choice_evaluation()
    ours = SoupBuilder([str(f) for f in folders], method="greedy", evaluation=evaluation).cook(tmp_path / "ours")
    report = ours.record["report"]
    assert report["metric"] == "accuracy"
    data = {split: pair_like_run_swag(tokenizer, rows) for split, rows in evaluation["splits"].items()}
    trainer = trainer_for(
        tmp_path,
        BertForMultipleChoice.from_pretrained(folders[0]),
        data,
        "accuracy",
        accuracy,
        DataCollatorForMultipleChoice(tokenizer),
    )
    theirs = SoupBuilder([str(f) for f in folders], method="greedy", trainer=trainer).cook(tmp_path / "theirs")
    assert_same_reports(report, theirs.record["report"])
    scores = [s for scores in report["individuals"].values() for s in scores.values()]
    assert len(set(scores)) > 2


def test_multiple_choice_batches_are_rows_by_choices(tmp_path):
    from transformers import BertForMultipleChoice

    tokenizer = word_piece_tokenizer(tmp_path / "tokenizer")
    rows = question_rows(5, 4, choices=4)
    scorer = Scorer(
        {"validation": rows},
        task="multiple-choice",
        tokenizer=tokenizer,
        columns={"text": "prompt", "choices": "options", "label": "answer"},
        batch_size=2,
    )
    first = scorer.split("validation")[0]
    assert len(first["input_ids"]) == 4 and first["labels"] == rows[0]["answer"]
    pair = tokenizer(rows[0]["prompt"], rows[0]["options"][2])["input_ids"]
    assert first["input_ids"][2] == pair  # [CLS] question [SEP] choice [SEP]
    batch = scorer.collator([scorer.split("validation")[i] for i in range(2)])
    assert batch["input_ids"].shape == (2, 4, 9) and batch["token_type_ids"].shape == (2, 4, 9)
    torch.manual_seed(0)
    model = BertForMultipleChoice(bert_config()).eval()
    outputs = scorer.outputs(model, "validation")
    assert [tuple(b[0].shape) for b in outputs] == [(2, 4), (2, 4), (1, 4)]
    with torch.no_grad():
        expected = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(outputs[0][0], expected)
    with_context = Scorer(
        {"validation": rows.add_column("story", ["the cat"] * 5)},
        task="multiple-choice",
        tokenizer=tokenizer,
        columns={"text": "prompt", "choices": "options", "label": "answer", "context": "story"},
    )
    second = tokenizer("the cat", f"{rows[0]['prompt']} {rows[0]['options'][1]}")["input_ids"]
    assert with_context.split("validation")[0]["input_ids"][1] == second  # SWAG's pairing: context, question+choice


# -- bad inputs: one SoupError each, before any candidate is scored ---------------------------------------------------


def refused(tmp_path, folders, evaluation) -> str:
    with pytest.raises(SoupError) as error:
        SoupBuilder([str(f) for f in folders], method="greedy", evaluation=evaluation).cook(tmp_path / "soup")
    assert not (tmp_path / "soup").exists()
    return str(error.value)


def test_a_missing_tags_column_is_refused(tmp_path, taggers):
    message = refused(tmp_path, taggers[0], tagging_evaluation(columns={"tokens": "words", "tags": "ner_tags"}))
    assert "split 'validation' has no tags column 'ner_tags' (columns: ner, words)" in message
    assert "evaluation.columns.tags" in message


def test_tags_out_of_the_models_range_are_refused_before_a_forward_pass(tmp_path, taggers):
    from transformers import BertForTokenClassification

    folders, tokenizer = taggers
    rows = tagged_rows(6, 5)
    rows = rows.map(lambda row, i: {"ner": [7] + row["ner"][1:] if i == 3 else row["ner"]}, with_indices=True)
    message = refused(tmp_path, folders, tagging_evaluation(splits={"validation": rows}, report_splits=[]))
    assert "split 'validation' has tag id 7, out of range of the model's 5 labels" in message
    assert "'B-PER'" in message
    scorer = Scorer(
        {"validation": rows},
        task="token-classification",
        tokenizer=tokenizer,
        columns={"tokens": "words", "tags": "ner"},
    )
    model = BertForTokenClassification.from_pretrained(folders[0])
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(SoupError, match="tag id 7"):
        scorer.outputs(model, "validation")
    assert calls == [] and scorer.evaluations == 0


def test_unknown_tag_names_are_refused(tmp_path, taggers):
    rows = tagged_rows(4, 6).map(lambda row: {"ner": ["B-ORG" if t else "O" for t in row["ner"]]})
    message = refused(tmp_path, taggers[0], tagging_evaluation(splits={"validation": rows}, report_splits=[]))
    assert "tag 'B-ORG', which is not among the model's labels" in message


def test_choices_that_are_not_lists_are_refused(tmp_path, choosers):
    rows = question_rows(4, 7).map(lambda row: {"options": " / ".join(row["options"])})
    message = refused(tmp_path, choosers[0], choice_evaluation(splits={"validation": rows}, report_splits=[]))
    assert "row 0: choices must be a list of strings" in message and "evaluation.columns.choices" in message


def test_a_label_that_is_no_choice_is_refused(tmp_path, choosers):
    rows = question_rows(4, 8).map(lambda row, i: {"answer": 3 if i == 2 else row["answer"]}, with_indices=True)
    message = refused(tmp_path, choosers[0], choice_evaluation(splits={"validation": rows}, report_splits=[]))
    assert "row 2: label 3 is not the index of one of its 3 choices (0…2)" in message


def test_a_column_key_the_task_does_not_read_is_refused(tmp_path, choosers):
    message = refused(tmp_path, choosers[0], choice_evaluation(columns={"question": "prompt"}))
    assert "evaluation.columns: key 'question' means nothing to task 'multiple-choice'" in message
    assert "text, choices, label, context" in message


# -- learned soups ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["token-classification", "multiple-choice"])
def test_a_learned_soup_runs(tmp_path, task, request):
    """Learned soups follow the task's loss: -100 sub-words ignored for tags, [B, C] logits for choices. The soup's
    reported score is the scorer's number of the written soup."""
    folders, tokenizer = request.getfixturevalue("taggers" if task == "token-classification" else "choosers")
    evaluation = tagging_evaluation() if task == "token-classification" else choice_evaluation()
    soup = SoupBuilder(
        [str(f) for f in folders], method="learned", evaluation=evaluation, epochs=2, batch_size=8
    ).cook(tmp_path / "learned")
    losses = soup.record["strategy"]["loss_per_epoch"]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[1] < losses[0]
    from transformers import AutoModelForMultipleChoice, AutoModelForTokenClassification

    auto = AutoModelForTokenClassification if task == "token-classification" else AutoModelForMultipleChoice
    keys = {"token-classification": ("tokens", "tags"), "multiple-choice": ("text", "choices", "label")}[task]
    scorer = Scorer(
        evaluation["splits"],
        task=task,
        tokenizer=tokenizer,
        columns={k: v for k, v in evaluation["columns"].items() if k in keys},
        batch_size=8,
    )
    model = auto.from_pretrained(soup.path).eval()
    rescored = {split: scorer.score(model, split) for split in ("validation", "test")}
    assert soup.record["report"]["rows"]["learned"] == pytest.approx(rescored, abs=1e-9)


# -- the example recipes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["token_classification.yaml", "multiple_choice.yaml"])
def test_the_example_recipe_cooks_from_json_lines(tmp_path, name, request):
    """`hf-soup cook` of the recipe in `recipes/`, its pantry swapped for the tiny runs and stand-in data written where
    it looks: raw rows in, a soup and its report out."""
    tagging = name.startswith("token")
    folders, _ = request.getfixturevalue("taggers" if tagging else "choosers")
    recipe = yaml.safe_load((Path(__file__).parent.parent / "recipes" / name).read_text())
    del recipe["pantry"]
    recipe["ingredients"] = [str(f) for f in folders]
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / name).write_text(yaml.safe_dump(recipe))
    for split, seed in (("validation", 1), ("test", 2)):
        if tagging:
            rows = tagged_rows(12, seed).rename_columns({"ner": "ner_tags"})
        else:
            rows = question_rows(12, seed).rename_columns({"prompt": "question", "options": "answers"})
            rows = rows.rename_column("answer", "label")
        rows.to_json(tmp_path / recipe["evaluation"]["dataset"]["data_files"][split].removeprefix("../"))
    assert main(["cook", str(tmp_path / "recipes" / name)]) == 0
    record = json.loads((tmp_path / recipe["output"].removeprefix("../") / "soup.json").read_text())
    assert record["report"]["metric"] == recipe["evaluation"]["metric"]
    assert set(record["report"]["rows"]) >= {"greedy", "uniform", "ensemble"}
    assert all(0 <= score <= 1 for row in record["report"]["rows"].values() for score in row.values())
