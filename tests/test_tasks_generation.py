"""The built-in `seq2seq` task: soups of encoder-decoder models chosen by what they generate (ROUGE-L, BLEU, chrF,
exact match), every number equal to `Seq2SeqTrainer(predict_with_generate=True)`'s on the same tokenised rows; no
ensemble rows (generated tokens are no logits); learned soups on the teacher-forced loss."""

import numpy as np
import pytest
import torch
from conftest import t5_config

from hf_soup import SoupBuilder, SoupError
from hf_soup.scoring import Scorer

WORDS = ["john", "mary", "lives", "in", "paris", "rome", "the", "cat", "sat", "on", "mat", "red", "big", "house"]
WORDS += ["near", "river", "dog", "new", "york", "walk", "park", "play", "sing", "old", "tree", "blue", "sky"]
SPECIALS = ["[PAD]", "[SEP]", "[CLS]", "[UNK]", "[MASK]"]  # pad 0, end of sequence 1: T5's ids


def tokenizer_in(folder):
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate([*SPECIALS, *WORDS])})
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def text_rows(count, seed):
    """Sources of 3 to 8 words; the target repeats the first two or three of them."""
    from datasets import Dataset

    generator = np.random.default_rng(seed)
    sources = [[str(w) for w in generator.choice(WORDS, size=int(generator.integers(3, 9)))] for _ in range(count)]
    targets = [" ".join(words[: int(generator.integers(2, 4))]) for words in sources]
    return Dataset.from_dict({"article": [" ".join(s) for s in sources], "summary": targets})


@pytest.fixture
def writers(tmp_path):
    """Three fine-tunes of one init of a tiny T5 (seed-0 model plus seeded noise), each with the tokenizer."""
    from transformers import T5ForConditionalGeneration

    tokenizer = tokenizer_in(tmp_path / "tokenizer")
    folders = []
    for seed in range(3):
        torch.manual_seed(0)
        model = T5ForConditionalGeneration(t5_config())
        generator = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
        folder = tmp_path / f"run{seed}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders, tokenizer


def evaluation(**extra):
    return {
        "splits": {"validation": text_rows(20, 1), "test": text_rows(20, 2)},
        "task": "seq2seq",
        "columns": {"source": "article", "target": "summary"},
        "selection_split": "validation",
        "report_splits": ["test"],
        "batch_size": 8,
        "compare": ["uniform", "ensemble"],
        **extra,
    }


def generation_metrics(tokenizer):
    """A Seq2SeqTrainer compute_metrics as the Transformers summarisation example writes it: -100 to pad, decode
    without special tokens, then rouge_score's ROUGE-L, sacrebleu's BLEU and chrF (/ 100) and exact match."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def compute_metrics(prediction):
        predictions = np.where(prediction.predictions != -100, prediction.predictions, tokenizer.pad_token_id)
        labels = np.where(prediction.label_ids != -100, prediction.label_ids, tokenizer.pad_token_id)
        said = [s.strip() for s in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        truth = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        return {
            "rougeL": float(np.mean([scorer.score(t, s)["rougeL"].fmeasure for s, t in zip(said, truth)])),
            "bleu": sacrebleu.corpus_bleu(said, [truth]).score / 100,
            "chrf": sacrebleu.corpus_chrf(said, [truth]).score / 100,
            "exact_match": float(np.mean([s == t for s, t in zip(said, truth)])),
        }

    return compute_metrics


@pytest.mark.parametrize(
    "metric, generation",
    [("rougeL", {}), ("chrf", {}), ("bleu", {}), ("chrf", {"generation_max_length": 6, "num_beams": 2})],
)
def test_seq2seq_scores_equal_the_seq2seq_trainer_path(tmp_path, writers, metric, generation):
    from transformers import (
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        T5ForConditionalGeneration,
    )

    folders, tokenizer = writers
    settings = evaluation(metric=metric, **generation)
    ours = SoupBuilder([str(f) for f in folders], method="greedy", evaluation=settings).cook(tmp_path / "ours")
    report = ours.record["report"]
    assert report["metric"] == metric
    assert "ensemble" not in report["rows"] and "generated tokens" in report["undefined"]["ensemble"]

    def encode(batch):
        encoded = tokenizer(batch["article"], truncation=True)
        encoded["labels"] = tokenizer(text_target=batch["summary"], truncation=True)["input_ids"]
        return encoded

    data = {
        name: rows.map(encode, batched=True, remove_columns=rows.column_names)
        for name, rows in settings["splits"].items()
    }
    model = T5ForConditionalGeneration.from_pretrained(folders[0])
    args = Seq2SeqTrainingArguments(
        str(tmp_path / "trainer"),
        per_device_eval_batch_size=8,
        report_to="none",
        metric_for_best_model=metric,
        predict_with_generate=True,
        generation_max_length=generation.get("generation_max_length", 20),  # 20: the saved config's, as hf_soup
        generation_num_beams=generation.get("num_beams"),
    )
    trainer = Seq2SeqTrainer(
        model,
        args,
        eval_dataset=data,
        compute_metrics=generation_metrics(tokenizer),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
    )
    theirs = SoupBuilder([str(f) for f in folders], method="greedy", trainer=trainer).cook(tmp_path / "theirs")
    theirs = theirs.record["report"]
    assert set(theirs["rows"]) == set(report["rows"])
    for name, scores in theirs["individuals"].items():
        assert report["individuals"][name] == pytest.approx(scores, abs=1e-9), name
    for row, scores in theirs["rows"].items():
        assert report["rows"][row] == pytest.approx(scores, abs=1e-9), row
    scores = [s for scores in report["individuals"].values() for s in scores.values()]
    assert max(scores) > 0 and len(set(scores)) > 2  # real, different numbers: the comparison is not vacuous


def test_generated_text_is_decoded_and_scored(tmp_path):
    """Each metric of hand-made generations: tokens decoded without specials, padding and -100 ignored."""
    tokenizer = tokenizer_in(tmp_path / "tokenizer")
    from datasets import Dataset

    rows = Dataset.from_dict({"source": ["john lives in paris", "the cat sat"], "target": ["john paris", "cat"]})
    scorer = Scorer({"validation": rows}, task="seq2seq", tokenizer=tokenizer, metric="exact_match")
    batch = scorer.collator([scorer.split("validation")[i] for i in range(2)])
    assert tokenizer.convert_ids_to_tokens(batch["labels"][0].tolist()) == ["[CLS]", "john", "paris", "[SEP]"]
    assert batch["labels"][1].tolist()[-1] == -100  # [CLS] cat [SEP], then padding the loss ignores
    ids = tokenizer(["john paris", "the cat"])["input_ids"]
    generated = torch.tensor([[0, *ids[0], 0], [0, *ids[1], 0]])  # decoder start, [CLS] ... [SEP], pad
    assert scorer.task.texts([(generated, batch["labels"])]) == (["john paris", "the cat"], ["john paris", "cat"])
    assert scorer.compute([(generated, batch["labels"])]) == 0.5
    rouge = Scorer({"validation": rows}, task="seq2seq", tokenizer=tokenizer)  # rougeL by default
    assert rouge.metric.name == "rougeL"
    assert rouge.compute([(generated, batch["labels"])]) == pytest.approx((1 + 2 * 0.5 * 1 / 1.5) / 2)


def test_rows_that_are_not_text_are_refused(tmp_path, writers):
    from datasets import Dataset

    rows = Dataset.from_dict({"article": ["john lives", "mary"], "summary": [["john"], ["mary"]]})
    with pytest.raises(SoupError) as error:
        SoupBuilder(
            [str(f) for f in writers[0]],
            method="greedy",
            evaluation=evaluation(splits={"validation": rows}, report_splits=[]),
        ).cook(tmp_path / "soup")
    assert "split 'validation' row 0: the target must be a string, got ['john']" in str(error.value)
    assert not (tmp_path / "soup").exists()
    missing = evaluation(columns={"source": "article", "target": "abstract"}, report_splits=[])
    with pytest.raises(SoupError, match="has no target column 'abstract'"):
        SoupBuilder([str(f) for f in writers[0]], method="greedy", evaluation=missing).cook(tmp_path / "soup")


def test_a_learned_soup_trains_on_the_teacher_forced_loss(tmp_path, writers):
    from transformers import AutoModelForSeq2SeqLM

    folders, tokenizer = writers
    settings = evaluation(compare=["uniform"])
    soup = SoupBuilder([str(f) for f in folders], method="learned", evaluation=settings, epochs=2, batch_size=8).cook(
        tmp_path / "learned"
    )
    losses = soup.record["strategy"]["loss_per_epoch"]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[1] < losses[0]
    scorer = Scorer(settings["splits"], task="seq2seq", tokenizer=tokenizer, columns=settings["columns"], batch_size=8)
    model = AutoModelForSeq2SeqLM.from_pretrained(soup.path).eval()
    rescored = {split: scorer.score(model, split) for split in ("validation", "test")}
    assert soup.record["report"]["rows"]["learned"] == pytest.approx(rescored, abs=1e-9)
    batch = scorer.collator([scorer.split("validation")[i] for i in range(8)])
    with torch.no_grad():
        own = model(**{k: v for k, v in batch.items() if k != "token_type_ids"}).loss
        logits = scorer.task.training_outputs(model, batch)
    assert float(scorer.task.training_loss(logits, batch["labels"], False)) == pytest.approx(float(own), abs=1e-6)


def test_generation_settings_are_refused_for_a_task_that_does_not_generate(tmp_path):
    from hf_soup.evaluation import Evaluation

    with pytest.raises(
        SoupError,
        match="r.yaml: evaluation.num_beams sets generation, which only tasks seq2seq and causal-generation do",
    ):
        Evaluation.from_mapping(
            {
                "task": "question-answering",
                "selection_split": "validation",
                "dataset": {"path": "json"},
                "num_beams": 4,
            },
            base_dir=tmp_path,
            source="r.yaml",
        )
    with pytest.raises(SoupError, match="must be ≥ 1, got 0"):
        Evaluation.from_mapping(
            {"task": "seq2seq", "selection_split": "validation", "dataset": {"path": "json"}, "num_beams": 0},
            base_dir=tmp_path,
            source="r.yaml",
        )
