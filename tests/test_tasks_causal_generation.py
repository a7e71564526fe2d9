"""Causal LMs judged on the answers they generate: the built-in `causal-generation` task (prompts left-padded, the
prompt's tokens stripped, exact match) and the Trainer path (`Seq2SeqTrainer(predict_with_generate=True)` over a
decoder-only model, prompts and answers padded to one width). Every number of the Trainer path equals
`trainer.evaluate()`, the built-in task equals the Trainer path, and bad layouts are refused before scoring."""

import numpy as np
import pytest
import torch
from conftest import llama_config, t5_config

from hf_soup import SoupBuilder, SoupError
from hf_soup.scoring import Scorer
from hf_soup.tasks import answer_logits

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "house", "river", "bird", "fish"]
VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "say", "user", "assistant", ":", "Red", *WORDS]  # pad 0, bos 1, eos 2
CHAT = (
    "{% for message in messages %}{{ bos_token }} {{ message['role'] }} : {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
WIDTH = 8  # the Trainer path's one width of prompts and answers
NEW_TOKENS = 3  # the longest answer: a word and the end of sequence, one token to spare


def word_tokenizer(chat_template: str | None = None):
    """A word-level tokenizer made in memory: `<s>` before every text, words split on spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def rows(count, seed, *, prompt="prompt", answer="answer"):
    """`say w1 … wn` (1 to 4 words); the answer is the first word."""
    from datasets import Dataset

    generator = np.random.default_rng(seed)
    words = [[str(w) for w in generator.choice(WORDS, size=int(generator.integers(1, 5)))] for _ in range(count)]
    return Dataset.from_dict({prompt: ["say " + " ".join(w) for w in words], answer: [w[0] for w in words]})


def tokenized(tokenizer, data, chat=False):
    """What the task feeds the model: prompt ids, answer ids (no `<s>`) then the end of sequence."""
    prompts = list(data["prompt"])
    if chat:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompts)["input_ids"]
    answers = tokenizer(list(data["answer"]), add_special_tokens=False)["input_ids"]
    return ids, [a + [tokenizer.eos_token_id] for a in answers]


def train(model, tokenizer, steps, seed, lr=3e-3):
    """Teacher-forced training on the answers (the prompt's positions ignored)."""
    ids, answers = tokenized(tokenizer, rows(128, seed))
    sequences = [p + a for p, a in zip(ids, answers)]
    length = max(map(len, sequences))
    inputs = torch.tensor([s + [0] * (length - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences])
    labels = torch.tensor([[-100] * len(p) + a + [-100] * (length - len(p) - len(a)) for p, a in zip(ids, answers)])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(sequences), (32,), generator=generator)
        loss = model(input_ids=inputs[pick], attention_mask=mask[pick], labels=labels[pick]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def fine_tunes(tmp_path_factory):
    """Three fine-tunes of one briefly trained tiny Llama (each a few more steps on its own data), saved with the
    tokenizer (chat template included)."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("causal-generation")
    tokenizer = word_tokenizer(CHAT)
    torch.manual_seed(0)
    config = llama_config(vocab_size=len(VOCAB), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base = train(LlamaForCausalLM(config), tokenizer, 60, seed=0)
    folders = []
    for index, steps in enumerate((10, 25, 45)):
        model = LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        folder = root / f"run{index}"
        train(model, tokenizer, steps, seed=index + 1).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders, tokenizer


def evaluation(**extra):
    return {
        "splits": {"validation": rows(24, 11), "test": rows(24, 12)},
        "task": "causal-generation",
        "selection_split": "validation",
        "report_splits": ["test"],
        "batch_size": 8,
        "generation_max_length": NEW_TOKENS,
        "compare": ["uniform", "ensemble"],
        **extra,
    }


def answer_metrics(tokenizer, width=WIDTH):
    """A compute_metrics for a decoder-only Seq2SeqTrainer: drop the `width` prompt tokens, then decode as the
    seq2seq examples do (-100 to pad, no special tokens, stripped)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def compute_metrics(prediction):
        generated = prediction.predictions[:, width:]
        generated = np.where(generated != -100, generated, tokenizer.pad_token_id)
        labels = np.where(prediction.label_ids != -100, prediction.label_ids, tokenizer.pad_token_id)
        said = [s.strip() for s in tokenizer.batch_decode(generated, skip_special_tokens=True)]
        truth = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        return {
            "exact_match": float(np.mean([s == t for s, t in zip(said, truth)])),
            "rougeL": float(np.mean([rouge.score(t, s)["rougeL"].fmeasure for s, t in zip(said, truth)])),
            "chrf": sacrebleu.corpus_chrf(said, [truth]).score / 100,
        }

    return compute_metrics


def trainer_data(tokenizer, splits, chat=False):
    from datasets import Dataset

    data = {}
    for name, split in splits.items():
        ids, answers = tokenized(tokenizer, split, chat)
        data[name] = Dataset.from_dict({"input_ids": ids, "labels": answers})
    return data


def make_trainer(
    tmp_path, folder, tokenizer, data, *, metric="exact_match", num_beams=None, collator=None, width=WIDTH, **args
):
    """A Seq2SeqTrainer over a decoder-only model: prompts left-padded and answers padded to `width`, generating
    NEW_TOKENS after them (generation_max_length counts the prompt)."""
    from transformers import DataCollatorForSeq2Seq, LlamaForCausalLM, Seq2SeqTrainer, Seq2SeqTrainingArguments

    left = word_tokenizer()
    left.padding_side = "left"
    settings = dict(
        per_device_eval_batch_size=8,
        report_to="none",
        metric_for_best_model=metric,
        predict_with_generate=True,
        generation_max_length=width + NEW_TOKENS,
        generation_num_beams=num_beams,
    )
    return Seq2SeqTrainer(
        LlamaForCausalLM.from_pretrained(folder),
        Seq2SeqTrainingArguments(str(tmp_path / "trainer"), **{**settings, **args}),
        eval_dataset=data,
        processing_class=left,
        data_collator=collator or DataCollatorForSeq2Seq(left, padding="max_length", max_length=width),
        compute_metrics=answer_metrics(tokenizer, width),
    )


@pytest.mark.parametrize("metric, num_beams", [("exact_match", None), ("chrf", 2)])
def test_the_trainer_path_equals_evaluate_and_the_built_in_task_equals_it(tmp_path, fine_tunes, metric, num_beams):
    folders, tokenizer = fine_tunes
    padding_side = tokenizer.padding_side
    settings = evaluation(metric=metric, **({"num_beams": num_beams} if num_beams else {}))
    data = trainer_data(tokenizer, settings["splits"])
    trainer = make_trainer(tmp_path, folders[0], tokenizer, data, metric=metric, num_beams=num_beams)
    theirs = SoupBuilder([str(f) for f in folders], method="greedy", trainer=trainer).cook(tmp_path / "theirs")
    theirs = theirs.record["report"]
    assert theirs["metric"] == metric and "ensemble" not in theirs["rows"]
    for folder in [*folders, tmp_path / "theirs"]:
        evaluated = make_trainer(tmp_path, folder, tokenizer, data, metric=metric, num_beams=num_beams).evaluate()
        expected = {split: evaluated[f"eval_{split}_{metric}"] for split in data}
        got = theirs["individuals"].get(folder.name) or theirs["rows"]["greedy"]
        assert got == pytest.approx(expected, abs=1e-12), folder.name

    ours = SoupBuilder([str(f) for f in folders], method="greedy", evaluation=settings).cook(tmp_path / "ours")
    report = ours.record["report"]
    assert report["metric"] == metric and "generated tokens" in report["undefined"]["ensemble"]
    assert set(report["rows"]) == set(theirs["rows"]) and {"greedy", "uniform"} <= set(report["rows"])
    for name, scores in theirs["individuals"].items():
        assert report["individuals"][name] == pytest.approx(scores, abs=1e-9), name
    for row, scores in theirs["rows"].items():
        assert report["rows"][row] == pytest.approx(scores, abs=1e-9), row
    scores = [s for scores in report["individuals"].values() for s in scores.values()]
    assert max(scores) > 0.3 and len(set(scores)) > 2  # real, different numbers: the comparison is not vacuous
    assert tokenizer.padding_side == padding_side  # the user's tokenizer is not turned to left padding


def test_a_greedy_soup_cooks_end_to_end_and_rescores_the_same(tmp_path, fine_tunes):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders, _ = fine_tunes
    settings = evaluation(compare=["uniform"])
    soup = SoupBuilder([str(f) for f in folders], method="greedy", evaluation=settings).cook(tmp_path / "soup")
    report = soup.record["report"]
    assert report["metric"] == "exact_match" and soup.record["strategy"]["name"] == "greedy"
    tokenizer = AutoTokenizer.from_pretrained(soup.path)
    scorer = Scorer(settings["splits"], task="causal-generation", tokenizer=tokenizer, batch_size=8)
    scorer.task.set_generation(max_length=NEW_TOKENS)
    model = AutoModelForCausalLM.from_pretrained(soup.path).eval()
    rescored = {split: scorer.score(model, split) for split in ("validation", "test")}
    assert report["rows"]["greedy"] == pytest.approx(rescored, abs=1e-12)
    best = max(s["validation"] for s in report["individuals"].values())
    assert report["rows"]["greedy"]["validation"] >= best


def test_prompts_are_left_padded_and_the_prompt_is_stripped(fine_tunes):
    from transformers import AutoModelForCausalLM

    folders, tokenizer = fine_tunes
    data = rows(6, 3)
    scorer = Scorer({"validation": data}, task="causal-generation", tokenizer=tokenizer, metric="exact_match")
    scorer.task.set_generation(max_length=NEW_TOKENS)
    batch = scorer.collator([scorer.split("validation")[i] for i in range(6)])
    ids, answers = tokenized(tokenizer, data)
    width = max(map(len, ids))
    assert batch["input_ids"].tolist() == [[0] * (width - len(p)) + p for p in ids]  # left-padded
    assert batch["attention_mask"][:, -1].all() and batch["labels"][:, 0].ne(-100).all()
    model = AutoModelForCausalLM.from_pretrained(folders[2]).eval()
    generated = scorer.task.outputs(model, batch)
    assert generated.shape[1] <= NEW_TOKENS  # only what follows the prompt
    by_hand = model.generate(**{k: batch[k] for k in ("input_ids", "attention_mask")}, max_new_tokens=NEW_TOKENS)
    assert generated.tolist() == by_hand[:, width:].tolist()
    said = [s.strip() for s in tokenizer.batch_decode(by_hand[:, width:], skip_special_tokens=True)]
    assert scorer.compute([(generated, batch["labels"])]) == np.mean([s == a for s, a in zip(said, data["answer"])])
    short = Scorer({"validation": data}, task="causal-generation", tokenizer=tokenizer, max_length=3)
    assert short.split("validation")["input_ids"] == [p[-3:] for p in ids]  # the end is what the answer follows


def test_exact_match_compares_stripped_texts_and_casefold_folds_case(fine_tunes):
    from datasets import Dataset

    _, tokenizer = fine_tunes
    data = Dataset.from_dict({"prompt": ["say red", "say red blue"], "answer": ["red", "red"]})
    scorer = Scorer({"validation": data}, task="causal-generation", tokenizer=tokenizer)
    assert scorer.metric.name == "exact_match"  # the task's default
    labels = scorer.collator([scorer.split("validation")[i] for i in range(2)])["labels"]
    generated = torch.tensor([tokenizer.convert_tokens_to_ids(["red", "</s>", "<pad>"]), [8, 2, 0]])  # 8: "Red"
    assert scorer.task.texts([(generated, labels)]) == (["red", "Red"], ["red", "red"])
    assert scorer.compute([(generated, labels)]) == 0.5
    folded = Scorer({"validation": data}, task="causal-generation", tokenizer=tokenizer, metric="exact_match_casefold")
    assert folded.compute([(generated, labels)]) == 1.0


def test_chat_template_prompts_equal_the_trainer_path_on_templated_prompts(tmp_path, fine_tunes):
    from transformers import AutoTokenizer

    folders, tokenizer = fine_tunes
    settings = evaluation(chat_template=True, compare=["uniform"])
    ids, _ = tokenized(tokenizer, settings["splits"]["validation"], chat=True)
    scorer = Scorer(
        settings["splits"], task="causal-generation", tokenizer=AutoTokenizer.from_pretrained(folders[0]),
        chat_template=True,
    )  # fmt: skip
    assert scorer.split("validation")["input_ids"] == ids
    assert tokenizer.convert_ids_to_tokens(ids[0])[:4] == ["<s>", "user", ":", "say"]  # one <s>: the template's
    assert tokenizer.convert_ids_to_tokens(ids[0])[-2:] == ["assistant", ":"]  # the generation prompt
    ours = SoupBuilder([str(f) for f in folders], method="greedy", evaluation=settings).cook(tmp_path / "ours")
    data = trainer_data(tokenizer, settings["splits"], chat=True)
    width = max(len(row) for split in data.values() for row in split["input_ids"])
    trainer = make_trainer(tmp_path, folders[0], tokenizer, data, width=width)
    theirs = SoupBuilder([str(f) for f in folders], method="greedy", trainer=trainer).cook(tmp_path / "theirs")
    report, expected = ours.record["report"], theirs.record["report"]
    for name, scores in expected["individuals"].items():
        assert report["individuals"][name] == pytest.approx(scores, abs=1e-9), name
    for row, scores in expected["rows"].items():
        assert report["rows"][row] == pytest.approx(scores, abs=1e-9), row
    plain = SoupBuilder([str(f) for f in folders], method="greedy", evaluation=evaluation(compare=["uniform"]))
    assert plain.cook(tmp_path / "plain").record["report"]["individuals"] != report["individuals"]  # it changed


def test_answer_logits_are_the_teacher_forced_logits_of_each_answer(fine_tunes):
    """The learned-soup loss: one forward pass over prompt + answer, the same logits whichever side the labels are
    padded on, and its cross-entropy equals the model's own loss with the prompt ignored."""
    from transformers import AutoModelForCausalLM

    folders, tokenizer = fine_tunes
    data = rows(5, 4)
    scorer = Scorer({"validation": data}, task="causal-generation", tokenizer=tokenizer)
    batch = scorer.collator([scorer.split("validation")[i] for i in range(5)])
    model = AutoModelForCausalLM.from_pretrained(folders[1]).eval()
    with torch.no_grad():
        logits = scorer.task.training_outputs(model, batch)
        loss = float(scorer.task.training_loss(logits, batch["labels"], scorer.causal))
        left = {**batch, "labels": torch.stack([torch.cat([r[r == -100], r[r != -100]]) for r in batch["labels"]])}
        moved = answer_logits(model, left)
    for row in range(5):
        keep = batch["labels"][row] != -100
        assert torch.allclose(moved[row][left["labels"][row] != -100], logits[row][keep], atol=1e-5)
    ids, answers = tokenized(tokenizer, data)
    own = []
    with torch.no_grad():
        for prompt, answer in zip(ids, answers):
            labels = torch.tensor([[-100] * len(prompt) + answer])
            own.append(model(input_ids=torch.tensor([prompt + answer]), labels=labels).loss * len(answer))
    assert loss == pytest.approx(float(sum(own)) / sum(map(len, answers)), abs=1e-5)


def test_a_learned_soup_trains_on_the_answers_loss(tmp_path, fine_tunes):
    folders, _ = fine_tunes
    settings = evaluation(compare=["uniform"], report_splits=[])
    soup = SoupBuilder([str(f) for f in folders], method="learned", evaluation=settings, epochs=2, batch_size=8).cook(
        tmp_path / "learned"
    )
    losses = soup.record["strategy"]["loss_per_epoch"]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[1] < losses[0]


def test_a_learned_soup_through_the_trainer_trains_on_the_answers_loss(tmp_path, fine_tunes):
    """The Trainer's batches (prompts and answers both left-padded to WIDTH) give the built-in task's answer loss."""
    from transformers import AutoModelForCausalLM

    folders, tokenizer = fine_tunes
    data = rows(16, 11)
    trainer = make_trainer(tmp_path, folders[0], tokenizer, trainer_data(tokenizer, {"validation": data}))
    builder = SoupBuilder([str(f) for f in folders], method="learned", trainer=trainer, epochs=2, batch_size=8)
    losses = builder.cook(tmp_path / "learned").record["strategy"]["loss_per_epoch"]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[1] < losses[0]
    theirs = builder.scorer
    scorer = Scorer({"validation": data}, task="causal-generation", tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folders[2]).eval()
    with torch.no_grad():
        batch = theirs.collator([theirs.split("validation")[i] for i in range(8)])
        assert batch["labels"][:, 0].eq(-100).any()  # answers left-padded, as the collator pads them
        loss = theirs.task.training_loss(theirs.task.training_outputs(model, batch), batch["labels"], theirs.causal)
        ours = scorer.collator([scorer.split("validation")[i] for i in range(8)])
        own = scorer.task.training_loss(scorer.task.training_outputs(model, ours), ours["labels"], scorer.causal)
    assert float(loss) == pytest.approx(float(own), abs=1e-5)


# -- bad inputs: one clear error each, before any candidate is scored ---------------------------------------------
def test_a_missing_answer_column_is_refused(tmp_path, fine_tunes):
    folders, _ = fine_tunes
    settings = evaluation(columns={"prompt": "prompt", "answer": "reply"})
    with pytest.raises(SoupError, match="split 'validation' has no answer column 'reply'.*evaluation.columns.answer"):
        SoupBuilder([str(f) for f in folders], method="greedy", evaluation=settings).cook(tmp_path / "soup")
    assert not (tmp_path / "soup").exists()


def test_a_tokenizer_without_chat_template_is_refused(tmp_path, fine_tunes):
    _, tokenizer = fine_tunes
    with pytest.raises(SoupError, match="chat_template is true but the tokenizer has no chat template"):
        Scorer({"validation": rows(4, 1)}, task="causal-generation", tokenizer=word_tokenizer(), chat_template=True)
    with pytest.raises(SoupError, match="task 'seq2seq' has no prompts"):
        Scorer({"validation": rows(4, 1)}, task="seq2seq", tokenizer=tokenizer, chat_template=True)


def test_chat_template_is_refused_for_other_tasks_in_a_recipe(tmp_path):
    from hf_soup.evaluation import Evaluation

    with pytest.raises(SoupError, match="r.yaml: evaluation.chat_template .* only task causal-generation has"):
        Evaluation.from_mapping(
            {"task": "causal-lm", "selection_split": "validation", "dataset": {"path": "json"}, "chat_template": True},
            base_dir=tmp_path,
            source="r.yaml",
        )


def test_the_task_on_an_encoder_decoder_model_is_refused(tmp_path, fine_tunes):
    from transformers import T5ForConditionalGeneration

    _, tokenizer = fine_tunes
    folders = []
    for index in range(2):
        torch.manual_seed(index)
        T5ForConditionalGeneration(t5_config()).save_pretrained(tmp_path / f"t5-{index}")
        tokenizer.save_pretrained(tmp_path / f"t5-{index}")
        folders.append(str(tmp_path / f"t5-{index}"))
    builder = SoupBuilder(folders, method="greedy", evaluation=evaluation())
    with pytest.raises(SoupError, match="causal-generation generates with a decoder-only model.*encoder-decoder 't5'"):
        builder.cook(tmp_path / "soup")
    assert not (tmp_path / "soup").exists()


def test_a_trainer_that_does_not_generate_is_refused_for_the_generation_task(tmp_path, fine_tunes):
    folders, tokenizer = fine_tunes
    data = trainer_data(tokenizer, {"validation": rows(8, 1)})
    trainer = make_trainer(tmp_path, folders[0], tokenizer, data, predict_with_generate=False)
    with pytest.raises(SoupError, match="is judged on generated text, but the Trainer does not generate"):
        SoupBuilder(folders, method="greedy", trainer=trainer, evaluation={"task": "causal-generation"})


def test_a_seq2seq_model_is_refused_for_causal_generation_through_the_trainer(tmp_path, fine_tunes):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, T5ForConditionalGeneration

    _, tokenizer = fine_tunes
    args = Seq2SeqTrainingArguments(
        str(tmp_path / "t"), report_to="none", metric_for_best_model="exact_match", predict_with_generate=True
    )
    data = trainer_data(tokenizer, {"validation": rows(8, 1)})
    trainer = Seq2SeqTrainer(
        T5ForConditionalGeneration(t5_config()), args, eval_dataset=data, compute_metrics=answer_metrics(tokenizer)
    )
    with pytest.raises(
        SoupError, match=r"does not fit the Trainer's model, a T5ForConditionalGeneration \(task 'seq2"
    ):
        SoupBuilder([str(tmp_path)], method="greedy", trainer=trainer, evaluation={"task": "causal-generation"})


@pytest.mark.parametrize(
    "change, message",
    [
        ("longest", r"prompts \(input_ids\) are \d+ tokens wide and the answers \(labels\) \d+.*max_length=L"),
        ("right", "the prompts are right-padded"),
        ("no labels", "the Trainer's batches have no labels"),
        ("loss", "metric_for_best_model is the loss"),
        ("loss only", "prediction_loss_only=True"),
    ],
)
def test_trainer_layouts_a_decoder_only_model_cannot_generate_from_are_refused(tmp_path, fine_tunes, change, message):
    from transformers import DataCollatorForSeq2Seq

    folders, tokenizer = fine_tunes
    data = trainer_data(tokenizer, {"validation": rows(8, 1)})
    options = {}
    if change == "longest":  # answers padded to the longest answer: narrower than the prompts
        left = word_tokenizer()
        left.padding_side = "left"
        options["collator"] = DataCollatorForSeq2Seq(left)
    elif change == "right":
        options["collator"] = DataCollatorForSeq2Seq(word_tokenizer(), padding="max_length", max_length=WIDTH)
    elif change == "no labels":
        data = {"validation": data["validation"].remove_columns("labels")}
    elif change == "loss":
        options["metric"] = "loss"
    else:
        options["prediction_loss_only"] = True
    trainer = make_trainer(tmp_path, folders[0], tokenizer, data, **options)
    with pytest.raises(SoupError, match=message):
        SoupBuilder(folders, method="greedy", trainer=trainer)
    assert not (tmp_path / "soup").exists()
