"""The built-in `question-answering` task (extractive, SQuAD-shaped rows): every number equals the Trainer path's on
the same features, answers map back through sub-word offsets and across the features of an overflowing context, bad
rows are refused before scoring, and learned soups train on the start/end loss."""

import collections
import json
import re
import string
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import bert_config

from hf_soup import SoupBuilder, SoupError
from hf_soup.cli import main
from hf_soup.scoring import Scorer
from hf_soup.tasks.spans import best_span

WORDS = ["who", "where", "lives", "in", "paris", "rome", "john", "mary", "the", "cat", "a", "dog", "new", "york"]
WORDS += ["sat", "on", "mat", "red", "big", "house", "near", "river", "play", "walk", "park", "is", "was", ".", ","]
PIECES = ["##ing", "##ed", "##s"]
MAX_LENGTH = 24  # short enough that long contexts overflow into several features
STRIDE = MAX_LENGTH // 3  # the task's stride for this max_length


def word_piece_tokenizer(folder):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *PIECES]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def squad_rows(count, seed):
    """Contexts of 4 to 30 words (`playing`, `parks`, ... split into pieces); the answer is a slice of 1 to 3 words."""
    from datasets import Dataset

    generator = np.random.default_rng(seed)
    rows = {"query": [], "passage": [], "gold": []}
    stems = [w for w in WORDS if w not in (".", ",")]
    for _ in range(count):
        words = [str(w) for w in generator.choice(stems, size=int(generator.integers(4, 31)))]
        words = [w + str(generator.choice(["", "ing", "s"])) if w in ("play", "walk", "park") else w for w in words]
        first = int(generator.integers(0, len(words)))
        answer = " ".join(words[first : first + int(generator.integers(1, 4))])
        context = " ".join(words)
        start = len(" ".join(words[:first])) + (1 if first else 0)
        assert context[start : start + len(answer)] == answer
        rows["query"].append(" ".join(generator.choice(stems, size=3)))
        rows["passage"].append(context)
        rows["gold"].append({"text": [answer], "answer_start": [start]})
    return Dataset.from_dict(rows)


def noisy(model, seed, scale=0.05):
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model.eval()


@pytest.fixture
def readers(tmp_path):
    """Three fine-tunes of one init of a tiny BertForQuestionAnswering, each saved with the word-piece tokenizer."""
    from transformers import BertForQuestionAnswering

    tokenizer = word_piece_tokenizer(tmp_path / "tokenizer")
    folders = []
    for seed in range(3):
        torch.manual_seed(0)
        folder = tmp_path / f"run{seed}"
        noisy(BertForQuestionAnswering(bert_config(num_labels=2)), seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders, tokenizer


def evaluation(**extra):
    return {
        "splits": {"validation": squad_rows(30, 1), "test": squad_rows(23, 2)},
        "task": "question-answering",
        "columns": {"question": "query", "context": "passage", "answers": "gold"},
        "max_length": MAX_LENGTH,
        "selection_split": "validation",
        "report_splits": ["test"],
        "batch_size": 8,
        "compare": ["uniform", "ensemble"],
        **extra,
    }


# -- the Transformers question-answering example, written out independently as the Trainer path's side ------------


def features_like_run_qa(tokenizer, rows):
    """run_qa.py's tokenisation (question, context) with overflow, its start/end positions of the first answer,
    and per feature its example and the offsets of its context tokens (None elsewhere)."""
    encoded = tokenizer(
        [q.lstrip() for q in rows["query"]],
        list(rows["passage"]),
        truncation="only_second",
        max_length=MAX_LENGTH,
        stride=STRIDE,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    starts, ends, examples, offsets = [], [], [], []
    for i, sample in enumerate(encoded["overflow_to_sample_mapping"]):
        sequence_ids = encoded.sequence_ids(i)
        mapping = encoded["offset_mapping"][i]
        answer = rows["gold"][sample]
        start_char = answer["answer_start"][0]
        end_char = start_char + len(answer["text"][0])
        token_start = sequence_ids.index(1)
        token_end = len(sequence_ids) - 1 - sequence_ids[::-1].index(1)
        if not (mapping[token_start][0] <= start_char and mapping[token_end][1] >= end_char):
            starts.append(0)
            ends.append(0)
        else:
            while token_start < len(mapping) and mapping[token_start][0] <= start_char:
                token_start += 1
            starts.append(token_start - 1)
            while mapping[token_end][1] >= end_char:
                token_end -= 1
            ends.append(token_end + 1)
        examples.append(sample)
        offsets.append([o if s == 1 else None for o, s in zip(mapping, sequence_ids)])
    from datasets import Dataset

    keep = ("input_ids", "token_type_ids", "attention_mask")
    data = Dataset.from_dict({**{k: encoded[k] for k in keep}, "start_positions": starts, "end_positions": ends})
    return data, examples, offsets


def normalize_answer(s):
    """The SQuAD v1.1 evaluation script's normalisation."""

    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def squad_f1(prediction, ground_truth):
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def postprocess(start_logits, end_logits, examples, offsets, rows, n_best=20, max_answer_length=30):
    """run_qa's post-processing over each feature's context tokens: n-best starts and ends, the best valid span."""
    best, passages = {}, list(rows["passage"])
    for feature, (example, mapping) in enumerate(zip(examples, offsets)):
        context_tokens = [i for i, o in enumerate(mapping) if o is not None]
        start_indexes = sorted(context_tokens, key=lambda i: -start_logits[feature][i])[:n_best]
        end_indexes = sorted(context_tokens, key=lambda i: -end_logits[feature][i])[:n_best]
        for start in start_indexes:
            for end in end_indexes:
                if end < start or end - start + 1 > max_answer_length:
                    continue
                score = float(start_logits[feature][start]) + float(end_logits[feature][end])
                if example not in best or score > best[example][0]:
                    text = passages[example][mapping[start][0] : mapping[end][1]]
                    best[example] = (score, text)
    return [best.get(example, (0.0, ""))[1] for example in range(len(rows))]


def squad_metrics(tokenizer, splits):
    """A Trainer compute_metrics with run_qa's post-processing; a plain Trainer does not say which eval split it
    scores, so the split is known by its number of features (they differ here)."""
    prepared = {}
    for rows in splits.values():
        data, examples, offsets = features_like_run_qa(tokenizer, rows)
        prepared[len(data)] = (rows, examples, offsets)
    assert len(prepared) == len(splits)

    def compute_metrics(prediction):
        start_logits, end_logits = prediction.predictions
        rows, examples, offsets = prepared[len(start_logits)]
        answers = postprocess(start_logits, end_logits, examples, offsets, rows)
        truths = [gold["text"] for gold in rows["gold"]]
        exact = [max(normalize_answer(a) == normalize_answer(t) for t in ts) for a, ts in zip(answers, truths)]
        f1 = [max(squad_f1(a, t) for t in ts) for a, ts in zip(answers, truths)]
        return {"exact_match": float(np.mean(exact)), "f1": float(np.mean(f1))}

    return compute_metrics


@pytest.mark.parametrize("metric", ["f1", "exact_match"])
def test_question_answering_scores_equal_the_trainer_path(tmp_path, readers, metric):
    from transformers import BertForQuestionAnswering, DataCollatorWithPadding, Trainer, TrainingArguments

    folders, tokenizer = readers
    settings = evaluation(metric=metric)
    ours = SoupBuilder([str(f) for f in folders], method="greedy", evaluation=settings).cook(tmp_path / "ours")
    report = ours.record["report"]
    assert report["metric"] == metric and report["undefined"] == {}
    splits = settings["splits"]
    data = {name: features_like_run_qa(tokenizer, rows)[0] for name, rows in splits.items()}
    assert len(data["validation"]) > len(splits["validation"])  # long contexts overflowed into several features
    args = TrainingArguments(
        str(tmp_path / "trainer"), per_device_eval_batch_size=8, report_to="none", metric_for_best_model=metric
    )
    trainer = Trainer(
        BertForQuestionAnswering.from_pretrained(folders[0]),
        args,
        eval_dataset=data,
        compute_metrics=squad_metrics(tokenizer, splits),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    theirs = SoupBuilder([str(f) for f in folders], method="greedy", trainer=trainer).cook(tmp_path / "theirs")
    theirs = theirs.record["report"]
    assert set(theirs["undefined"]) == {"ensemble", "greedy ensemble"}  # a plain Trainer's predictions are a tuple
    for name, scores in theirs["individuals"].items():
        assert report["individuals"][name] == pytest.approx(scores, abs=1e-9), name
    for row, scores in theirs["rows"].items():
        assert report["rows"][row] == pytest.approx(scores, abs=1e-9), row
    assert (
        ours.record["strategy"]["chosen"]
        == json.loads((tmp_path / "theirs" / "soup.json").read_text())["strategy"]["chosen"]
    )
    scores = [s for scores in report["individuals"].values() for s in scores.values()]
    assert max(scores) > 0 and len(set(scores)) > 2  # real, different numbers: the comparison is not vacuous
    assert set(report["rows"]) >= {"ensemble", "greedy ensemble"}


def test_the_ensemble_averages_start_and_end_logits_feature_by_feature(tmp_path, readers):
    from transformers import BertForQuestionAnswering

    folders, tokenizer = readers
    rows = squad_rows(12, 3)
    scorer = Scorer(
        {"validation": rows},
        task="question-answering",
        metric="f1",
        tokenizer=tokenizer,
        columns={"question": "query", "context": "passage", "answers": "gold"},
        max_length=MAX_LENGTH,
        batch_size=5,
    )
    models = [BertForQuestionAnswering.from_pretrained(f).eval() for f in folders]
    outputs = [scorer.outputs(m, "validation") for m in models]
    from hf_soup.strategies.ensemble import average_logits

    ensemble = average_logits(outputs)
    data, examples, offsets = features_like_run_qa(tokenizer, rows)
    starts, ends = [], []
    for feature in range(len(data)):
        inputs = {k: torch.tensor([data[feature][k]]) for k in ("input_ids", "token_type_ids", "attention_mask")}
        with torch.no_grad():
            out = [m(**inputs) for m in models]
        starts.append((sum(o.start_logits[0] for o in out) / 3).numpy())
        ends.append((sum(o.end_logits[0] for o in out) / 3).numpy())
    answers = postprocess(starts, ends, examples, offsets, rows)
    expected = np.mean([max(squad_f1(a, t) for t in gold["text"]) for a, gold in zip(answers, rows["gold"])])
    assert scorer.compute(ensemble) == pytest.approx(expected, abs=1e-9)
    assert [tuple(b[0].shape[::2]) for b in outputs[0]][0] == (5, 2)  # [B, T, 2]: start and end logits


# -- offsets back to text --------------------------------------------------------------------------------------------


def test_an_answer_over_two_sub_words_maps_back_to_the_context(tmp_path):
    tokenizer = word_piece_tokenizer(tmp_path / "tokenizer")
    from datasets import Dataset

    context = "john was playing in the park"
    rows = Dataset.from_dict(
        {"question": ["who"], "context": [context], "answers": [{"text": ["playing"], "answer_start": [9]}]}
    )
    scorer = Scorer({"validation": rows}, task="question-answering", tokenizer=tokenizer)
    feature = scorer.split("validation")[0]
    pieces = tokenizer.convert_ids_to_tokens(feature["input_ids"])
    assert pieces == ["[CLS]", "who", "[SEP]", "john", "was", "play", "##ing", "in", "the", "park", "[SEP]"]
    assert feature["labels"] == [5, 6, 0]  # play, ##ing; feature 0
    logits = torch.full((len(pieces), 2), -5.0)
    logits[5, 0], logits[6, 1] = 3.0, 2.0  # start on `play`, end on `##ing`
    logits[1, 0] = logits[1, 1] = 9.0  # the question's token is no answer, however high its logits
    offsets = [None, None, None, (0, 4), (5, 8), (9, 13), (13, 16), (17, 19), (20, 23), (24, 28), None]
    assert best_span(logits, offsets, context) == (5.0, "playing")
    scored = scorer.compute([(logits[None], torch.tensor([feature["labels"]]))])
    assert scored == 1.0
    logits[9, 1] = 4.0  # `play` … `park` beats `play` … `##ing`
    assert best_span(logits, offsets, context)[1] == "playing in the park"
    assert scorer.compute([(logits[None], torch.tensor([feature["labels"]]))]) == 0.5  # 'the' dropped: 1 of 3 tokens


def test_a_long_context_overflows_and_its_best_feature_answers(tmp_path):
    tokenizer = word_piece_tokenizer(tmp_path / "tokenizer")
    from datasets import Dataset

    context = "john lives in paris near the river . mary was walking in the big park near the red house in rome ."
    start = context.index("red house")
    rows = Dataset.from_dict(
        {"question": ["where"], "context": [context], "answers": [{"text": ["red house"], "answer_start": [start]}]}
    )
    scorer = Scorer({"validation": rows}, task="question-answering", tokenizer=tokenizer, max_length=16)
    features = [scorer.split("validation")[i] for i in range(len(scorer.split("validation")))]
    assert len(features) == 3  # 16 tokens with a stride of 5: the context is cut into three overlapping windows
    assert [f["labels"][2] for f in features] == [0, 1, 2]
    found = [f["labels"][:2] for f in features]
    assert found[0] == [0, 0]  # the answer is not in the first window: [CLS]
    pieces = [tokenizer.convert_ids_to_tokens(f["input_ids"]) for f in features]
    inside = [i for i, f in enumerate(found) if f != [0, 0]]
    assert inside and all(pieces[i][found[i][0] : found[i][1] + 1] == ["red", "house"] for i in inside)
    batches = []
    for i, feature in enumerate(features):
        logits = torch.zeros((len(feature["input_ids"]), 2))
        if i == inside[-1]:  # the last window that holds the answer is sure of it
            logits[found[i][0], 0] = logits[found[i][1], 1] = 8.0
        batches.append((logits[None], torch.tensor([feature["labels"]])))
    assert scorer.task.answers(batches) == {0: "red house"}
    assert scorer.compute(batches) == 1.0


# -- bad inputs ------------------------------------------------------------------------------------------------------


def refused(tmp_path, folders, settings) -> str:
    with pytest.raises(SoupError) as error:
        SoupBuilder([str(f) for f in folders], method="greedy", evaluation=settings).cook(tmp_path / "soup")
    assert not (tmp_path / "soup").exists()
    return str(error.value)


def test_a_missing_answers_column_is_refused(tmp_path, readers):
    message = refused(tmp_path, readers[0], evaluation(columns={"question": "query", "context": "passage"}))
    assert "split 'validation' has no answers column 'answers' (columns: gold, passage, query)" in message
    assert "evaluation.columns.answers" in message


def test_answers_that_are_strings_are_refused(tmp_path, readers):
    rows = squad_rows(4, 4)
    rows = rows.map(lambda row: {"gold": row["gold"]["text"][0]}, remove_columns=["gold"])
    message = refused(tmp_path, readers[0], evaluation(splits={"validation": rows}, report_splits=[]))
    assert "split 'validation' row 0: answers must be SQuAD-shaped" in message
    assert "got 'paris'" in message or "got '" in message and "evaluation.columns.answers" in message


@pytest.mark.parametrize(
    "starts, expected",
    [
        ([], "row 2: answers must be SQuAD-shaped, {'text': [str, ...], 'answer_start': [int, ...]} with one start"),
        ([500], "row 2: answer '"),
    ],
)
def test_answers_not_in_squad_shape_are_refused(tmp_path, readers, starts, expected):
    rows = squad_rows(4, 4)
    rows = rows.map(
        lambda row, i: {"gold": {**row["gold"], "answer_start": starts}} if i == 2 else row, with_indices=True
    )
    message = refused(tmp_path, readers[0], evaluation(splits={"validation": rows}, report_splits=[]))
    assert expected in message
    if starts:
        assert "at character 500 does not lie inside the context" in message


def test_a_preprocess_function_and_a_question_too_long_are_refused(tmp_path, readers):
    rows = squad_rows(4, 5)
    message = refused(tmp_path, readers[0], evaluation(splits={"validation": rows}, report_splits=[], preprocess=dict))
    assert "question-answering tokenises raw rows itself" in message and "drop evaluation.preprocess" in message
    long = rows.map(lambda row: {"query": " ".join(["who"] * 40)})
    message = refused(tmp_path, readers[0], evaluation(splits={"validation": long}, report_splits=[]))
    assert f"cannot fit a question and its context into max_length {MAX_LENGTH}" in message
    assert "raise evaluation.max_length" in message


# -- learned soups ---------------------------------------------------------------------------------------------------


def test_a_learned_soup_trains_on_the_start_and_end_loss(tmp_path, readers):
    from transformers import AutoModelForQuestionAnswering

    folders, tokenizer = readers
    settings = evaluation()
    soup = SoupBuilder([str(f) for f in folders], method="learned", evaluation=settings, epochs=2, batch_size=8).cook(
        tmp_path / "learned"
    )
    losses = soup.record["strategy"]["loss_per_epoch"]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[1] < losses[0]
    scorer = Scorer(
        settings["splits"],
        task="question-answering",
        tokenizer=tokenizer,
        columns=settings["columns"],
        max_length=MAX_LENGTH,
        batch_size=8,
    )
    model = AutoModelForQuestionAnswering.from_pretrained(soup.path).eval()
    rescored = {split: scorer.score(model, split) for split in ("validation", "test")}
    assert soup.record["report"]["rows"]["learned"] == pytest.approx(rescored, abs=1e-9)
    batch = scorer.collator([scorer.split("validation")[i] for i in range(8)])
    labels = batch.pop("labels")
    with torch.no_grad():
        own = model(**batch, start_positions=labels[:, 0], end_positions=labels[:, 1]).loss
        logits = scorer.task.outputs(model, batch)
    assert float(scorer.task.training_loss(logits, labels, False)) == pytest.approx(float(own), abs=1e-6)


# -- the example recipe ----------------------------------------------------------------------------------------------


def test_the_example_recipe_cooks_from_json_lines(tmp_path, readers):
    folders, _ = readers
    name = "question_answering.yaml"
    recipe = yaml.safe_load((Path(__file__).parent.parent / "recipes" / name).read_text())
    del recipe["pantry"]
    recipe["ingredients"] = [str(f) for f in folders]
    recipe["evaluation"]["max_length"] = MAX_LENGTH
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / name).write_text(yaml.safe_dump(recipe))
    for split, seed in (("validation", 1), ("test", 2)):
        rows = squad_rows(12, seed).rename_columns({"query": "question", "passage": "context", "gold": "answers"})
        rows.to_json(tmp_path / recipe["evaluation"]["dataset"]["data_files"][split].removeprefix("../"))
    assert main(["cook", str(tmp_path / "recipes" / name)]) == 0
    record = json.loads((tmp_path / recipe["output"].removeprefix("../") / "soup.json").read_text())
    assert record["report"]["metric"] == recipe["evaluation"]["metric"] == "f1"
    assert set(record["report"]["rows"]) >= {"greedy", "uniform", "ensemble"}
    assert all(0 <= score <= 1 for row in record["report"]["rows"].values() for score in row.values())
