"""The built-in `token-classification` and `multiple-choice` tasks: soups cooked from raw rows (words and tags;
questions and choices) with no Python of the user's, whose every number equals the Trainer path's on the same
tokenised data, with sub-word tag alignment, bad inputs refused early, ensembles and learned soups."""

import numpy as np
import pytest
import torch
from conftest import bert_config

from hf_soup import SoupBuilder
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
