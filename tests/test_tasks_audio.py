"""The built-in `audio-classification` task and audio models through the Trainer path: tiny wav2vec2 / HuBERT
classifiers built from config, a `Wav2Vec2FeatureExtractor` saved beside them, clips synthesised in memory (tones of
a class-dependent pitch in noise). Every number of the Trainer path equals `trainer.evaluate()`, the built-in task
equals the Trainer path, the example recipe cooks a soup `AutoModelForAudioClassification` loads, and bad inputs are
refused before any candidate is scored."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_tasks_builtin import assert_same_reports
from test_trainer_scoring import accuracy, arguments, check_against_evaluate

from hf_soup import SoupBuilder, SoupError
from hf_soup.cli import main
from hf_soup.scoring import Scorer
from hf_soup.tasks.audio import AudioClassification

RATE = 16_000
PITCHES = (300.0, 900.0, 2400.0)  # one tone per class


def audio_config(kind="wav2vec2"):
    from transformers import HubertConfig, Wav2Vec2Config

    settings = dict(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
        classifier_proj_size=8,
        num_labels=3,
        vocab_size=8,
    )
    return (Wav2Vec2Config if kind == "wav2vec2" else HubertConfig)(**settings)


def extractor():
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(sampling_rate=RATE, do_normalize=True, return_attention_mask=True)


def noisy(model, seed: int, scale: float = 0.3):
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model.eval()


def runs(tmp_path, build=None, k=3, *, with_extractor=True):
    """k fine-tunes of one init (seed-0 model plus seeded noise), each saved with the feature extractor."""
    from transformers import Wav2Vec2ForSequenceClassification

    build = build or (lambda: Wav2Vec2ForSequenceClassification(audio_config()))
    folders = []
    for seed in range(k):
        torch.manual_seed(0)
        folder = tmp_path / f"run{seed}"
        noisy(build(), seed).save_pretrained(folder)
        if with_extractor:
            extractor().save_pretrained(folder)
        folders.append(folder)
    return folders


def clips(count, seed, *, rate=RATE):
    """Rows `{"audio": {"array", "sampling_rate"}, "label"}`: a tone of the label's pitch in noise, 25–100 ms long
    (so batches are padded)."""
    from datasets import Dataset

    generator = np.random.default_rng(seed)
    audio, labels = [], []
    for _ in range(count):
        label = int(generator.integers(0, len(PITCHES)))
        time = np.arange(int(generator.integers(rate // 40, rate // 10))) / rate
        wave = np.sin(2 * np.pi * PITCHES[label] * time) + 0.3 * generator.standard_normal(time.size)
        audio.append({"array": wave.astype(np.float32), "sampling_rate": rate})
        labels.append(label)
    return Dataset.from_dict({"audio": audio, "label": labels})


def extract_like_run_audio_classification(rows, feature_extractor):
    """The Transformers audio-classification example's evaluation transform: the feature extractor over each clip's
    array at its sampling rate, one label per clip (padding is the collator's: `DataCollatorWithPadding`)."""

    def extract(batch):
        inputs = feature_extractor([a["array"] for a in batch["audio"]], sampling_rate=feature_extractor.sampling_rate)
        return {"input_values": inputs["input_values"], "labels": batch["label"]}

    return rows.map(extract, batched=True, remove_columns=rows.column_names)


def cross_entropy(prediction):
    """Accuracy, and the mean cross-entropy of the logits: a number that moves with every logit."""
    logits, labels = torch.from_numpy(prediction.predictions), torch.from_numpy(prediction.label_ids)
    return {
        "accuracy": float((logits.argmax(-1) == labels).double().mean()),
        "cross_entropy": float(torch.nn.functional.cross_entropy(logits, labels)),
    }


def audio_evaluation(**extra):
    return {
        "splits": {"validation": clips(24, 1), "test": clips(24, 2)},
        "task": "audio-classification",
        "selection_split": "validation",
        "report_splits": ["test"],
        "batch_size": 8,
        "compare": ["uniform", "ensemble"],
        **extra,
    }


def trainer_data(evaluation):
    return {
        name: extract_like_run_audio_classification(rows, extractor()) for name, rows in evaluation["splits"].items()
    }


# -- the Trainer path ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert"])
def test_audio_classifier_scores_equal_trainer_evaluate(tmp_path, kind):
    from transformers import (
        DataCollatorWithPadding,
        HubertForSequenceClassification,
        Wav2Vec2ForSequenceClassification,
    )

    model_class = Wav2Vec2ForSequenceClassification if kind == "wav2vec2" else HubertForSequenceClassification
    folders = runs(tmp_path, lambda: model_class(audio_config(kind)))
    data = trainer_data(audio_evaluation())
    soup, trainer = check_against_evaluate(
        tmp_path,
        folders,
        model_class,
        data,
        compute_metrics=accuracy,
        data_collator=DataCollatorWithPadding(extractor()),
    )
    report = soup.record["report"]
    assert "ensemble" in report["rows"]  # logits: the ensemble is defined
    assert len({s for scores in report["individuals"].values() for s in scores.values()}) > 1


def test_the_trainer_path_knows_an_audio_classifier(tmp_path):
    """Audio classifiers are mostly named `...ForSequenceClassification`: the Trainer path still builds them with
    AutoModelForAudioClassification (what an adapter tasting needs)."""
    from transformers import DataCollatorWithPadding, Trainer, Wav2Vec2ForSequenceClassification

    folders = runs(tmp_path, k=2)
    trainer = Trainer(
        Wav2Vec2ForSequenceClassification.from_pretrained(folders[0]),
        arguments(tmp_path),
        eval_dataset=trainer_data(audio_evaluation())["validation"],
        compute_metrics=accuracy,
        data_collator=DataCollatorWithPadding(extractor()),
    )
    builder = SoupBuilder([str(f) for f in folders], method="greedy", trainer=trainer)
    assert (builder.scorer.task.name, builder.scorer.task.auto_class) == (
        "audio-classification",
        "AutoModelForAudioClassification",
    )


# -- the built-in task ---------------------------------------------------------------------------------------------


def test_audio_classification_scores_equal_the_trainer_path(tmp_path):
    """Raw clips in, through the feature extractor saved with the runs: every individual, soup and ensemble number
    equals the Trainer path's on the clips the Transformers example would extract, to 1e-9, by a continuous metric
    (the loss of the logits) so that any difference in any logit would show."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, Wav2Vec2ForSequenceClassification

    folders = runs(tmp_path)
    evaluation = audio_evaluation(metric="loss")
    ours = SoupBuilder([str(f) for f in folders], method="greedy", evaluation=evaluation).cook(tmp_path / "ours")
    report = ours.record["report"]
    assert report["metric"] == "loss"
    args = TrainingArguments(
        str(tmp_path / "trainer"),
        per_device_eval_batch_size=8,
        report_to="none",
        metric_for_best_model="cross_entropy",
        greater_is_better=False,
    )
    trainer = Trainer(
        Wav2Vec2ForSequenceClassification.from_pretrained(folders[0]),
        args,
        eval_dataset=trainer_data(evaluation),
        compute_metrics=cross_entropy,
        data_collator=DataCollatorWithPadding(extractor()),
    )
    theirs = SoupBuilder([str(f) for f in folders], method="greedy", trainer=trainer).cook(tmp_path / "theirs")
    assert_same_reports(report, theirs.record["report"])
    assert ours.record["strategy"]["chosen"] == theirs.record["strategy"]["chosen"]
    scores = [s for scores in report["individuals"].values() for s in scores.values()]
    assert len(set(scores)) == len(scores)  # real, different numbers: the comparison is not vacuous


def test_clips_are_padded_by_the_feature_extractor_and_cut_to_max_length_seconds(tmp_path):
    from transformers import AutoFeatureExtractor, Wav2Vec2ForSequenceClassification

    folder = runs(tmp_path, k=1)[0]
    saved = AutoFeatureExtractor.from_pretrained(folder)
    rows = clips(6, 3)
    scorer = Scorer({"validation": rows}, task="audio-classification", tokenizer=saved, batch_size=3)
    lengths = [len(a["array"]) for a in rows["audio"]]
    batch = scorer.collator([scorer.split("validation")[i] for i in range(3)])
    assert batch["input_values"].shape == (3, max(lengths[:3]))
    assert batch["attention_mask"].sum(-1).tolist() == lengths[:3]
    assert batch["labels"].tolist() == rows["label"][:3]
    first = np.asarray(rows["audio"][0]["array"])
    assert np.allclose(batch["input_values"][0, : lengths[0]], (first - first.mean()) / np.sqrt(first.var() + 1e-7))

    cut = Scorer({"validation": rows}, task="audio-classification", tokenizer=saved, max_length_seconds=0.03)
    assert [len(row["input_values"]) for row in cut.split("validation")] == [min(n, 480) for n in lengths]
    short = rows.map(lambda row: {"audio": {"array": row["audio"]["array"][:480], "sampling_rate": RATE}})
    by_hand = Scorer({"validation": short}, task="audio-classification", tokenizer=saved)
    model = Wav2Vec2ForSequenceClassification.from_pretrained(folder)
    cut_logits = torch.cat([b[0] for b in cut.outputs(model, "validation")])
    assert torch.equal(cut_logits, torch.cat([b[0] for b in by_hand.outputs(model, "validation")]))


def test_inputs_made_by_a_preprocess_function_are_zero_padded_without_an_extractor():
    """`evaluation.preprocess` makes the inputs and no feature extractor is saved: each input is right-padded with
    zeros, masks included, and the labels kept."""
    rows = clips(3, 9)

    def preprocess(batch):
        arrays = [a["array"] for a in batch["audio"]]
        return {"input_values": arrays, "attention_mask": [[1] * len(a) for a in arrays]}

    scorer = Scorer({"validation": rows}, task="audio-classification", preprocess=preprocess)
    batch = scorer.collator([scorer.split("validation")[i] for i in range(3)])
    lengths = [len(a["array"]) for a in rows["audio"]]
    assert batch["input_values"].shape == (3, max(lengths)) and batch["labels"].tolist() == rows["label"]
    assert batch["attention_mask"].sum(-1).tolist() == lengths
    shortest = lengths.index(min(lengths))
    assert torch.equal(batch["input_values"][shortest, min(lengths) :], torch.zeros(max(lengths) - min(lengths)))


def spectrogram_classifier(kind):
    """A tiny AST or Whisper-encoder classifier and its feature extractor (log-mel frames, not raw samples)."""
    from transformers import (
        ASTConfig,
        ASTFeatureExtractor,
        ASTForAudioClassification,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForAudioClassification,
    )

    torch.manual_seed(0)
    small = dict(num_mel_bins=16, num_labels=3)
    if kind == "ast":
        config = ASTConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_length=32, **small
        )
        return ASTForAudioClassification(config).eval(), ASTFeatureExtractor(num_mel_bins=16, max_length=32)
    config = WhisperConfig(
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=50,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        **small,
    )
    return WhisperForAudioClassification(config).eval(), WhisperFeatureExtractor(feature_size=16, chunk_length=1)


@pytest.mark.parametrize("kind", ["ast", "whisper"])
def test_spectrogram_feature_extractors_feed_their_models(kind):
    """Extractors of log-mel frames (`input_values` of AST, `input_features` of Whisper; neither takes an
    attention mask): the task's logits are the model's on the extractor's batch of the same clips."""
    model, saved = spectrogram_classifier(kind)
    rows = clips(5, 4)
    scorer = Scorer({"validation": rows}, task="audio-classification", tokenizer=saved, batch_size=2)
    ours = torch.cat([logits for logits, _ in scorer.outputs(model, "validation")])
    expected = []
    for start in range(0, 5, 2):
        arrays = [a["array"] for a in rows["audio"][start : start + 2]]
        with torch.no_grad():
            expected.append(model(**saved(arrays, sampling_rate=RATE, return_tensors="pt")).logits)
    assert torch.allclose(ours, torch.cat(expected), atol=1e-6) and ours.std() > 0


def test_a_learned_soup_of_audio_classifiers_runs(tmp_path):
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    folders = runs(tmp_path, k=2)
    evaluation = audio_evaluation(compare=[])
    soup = SoupBuilder(
        [str(f) for f in folders], method="learned", evaluation=evaluation, epochs=2, batch_size=8
    ).cook(tmp_path / "learned")
    losses = soup.record["strategy"]["loss_per_epoch"]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[1] < losses[0]
    scorer = Scorer(
        evaluation["splits"],
        task="audio-classification",
        tokenizer=AutoFeatureExtractor.from_pretrained(soup.path),
        batch_size=8,
    )
    model = AutoModelForAudioClassification.from_pretrained(soup.path).eval()
    rescored = {split: scorer.score(model, split) for split in ("validation", "test")}
    assert soup.record["report"]["rows"]["learned"] == pytest.approx(rescored, abs=1e-12)


def test_the_example_recipe_cooks_a_soup_that_loads(tmp_path):
    """`hf-soup cook recipes/audio_classification.yaml`, its pantry swapped for 3 tiny runs and stand-in clips saved
    where it looks: the soup loads with AutoModelForAudioClassification and its feature extractor, and scores as
    reported."""
    from datasets import DatasetDict
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    folders = runs(tmp_path)
    name = "audio_classification.yaml"
    recipe = yaml.safe_load((Path(__file__).parent.parent / "recipes" / name).read_text())
    del recipe["pantry"]
    recipe["ingredients"] = [str(f) for f in folders]
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / name).write_text(yaml.safe_dump(recipe))
    data = DatasetDict({"validation": clips(24, 1), "test": clips(24, 2)})
    data.save_to_disk(str(tmp_path / recipe["evaluation"]["dataset"]["load_from_disk"].removeprefix("../")))
    assert main(["cook", str(tmp_path / "recipes" / name), "--quiet"]) == 0
    soup = tmp_path / recipe["output"].removeprefix("../")
    record = json.loads((soup / "soup.json").read_text())
    assert record["report"]["metric"] == "accuracy" and set(record["report"]["rows"]) >= {"greedy", "uniform"}
    model = AutoModelForAudioClassification.from_pretrained(soup).eval()
    saved = AutoFeatureExtractor.from_pretrained(soup)  # the runs' feature extractor travels with the soup
    assert type(model).__name__ == "Wav2Vec2ForSequenceClassification" and saved.sampling_rate == RATE
    right = 0
    for row in data["validation"]:
        inputs = saved(row["audio"]["array"], sampling_rate=RATE, return_tensors="pt")
        with torch.no_grad():
            right += int(model(**inputs).logits.argmax(-1).item() == row["label"])
    assert record["report"]["rows"]["greedy"]["validation"] == pytest.approx(right / len(data["validation"]))


# -- bad inputs: one SoupError each, before any candidate is scored ------------------------------------------------


@pytest.fixture
def never_scored(monkeypatch):
    """Fail the test if any candidate reaches a forward pass."""

    def outputs(self, model, batch):
        raise AssertionError("a candidate was scored")

    monkeypatch.setattr(AudioClassification, "outputs", outputs)


def refused(tmp_path, folders, evaluation) -> str:
    with pytest.raises(SoupError) as error:
        SoupBuilder([str(f) for f in folders], method="greedy", evaluation=evaluation).cook(tmp_path / "soup")
    assert not (tmp_path / "soup").exists()
    assert len(str(error.value).splitlines()) == 1
    return str(error.value)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"columns": {"audio": "speech"}},
            "split 'validation' has no audio column 'speech' (columns: audio, label); name it in "
            "evaluation.columns.audio",
        ),
        (
            {"splits": {"validation": clips(4, 5, rate=8_000)}},
            "split 'validation' row 0: the audio is sampled at 8000 Hz but the feature extractor expects 16000 Hz; "
            "resample it, e.g. dataset.cast_column('audio', datasets.Audio(sampling_rate=16000))",
        ),
        (
            {"splits": {"validation": clips(4, 5).map(lambda row: {"sound": row["audio"]["array"]})}},
            None,  # filled below: bare arrays, with the column named
        ),
        ({"max_length": 100}, "evaluation.max_length truncates text; audio clips are cut by max_length_seconds"),
        ({"max_length_seconds": 0}, "max_length_seconds cuts audio clips: a number of seconds > 0"),
        ({"max_length_seconds": True}, "evaluation.max_length_seconds must be a int or float, got bool True"),
    ],
    ids=["missing-column", "sampling-rate", "bare-arrays", "max-length", "zero-seconds", "bool-seconds"],
)
def test_bad_audio_inputs_are_refused(tmp_path, never_scored, change, message):
    folders = runs(tmp_path, k=2)
    if message is None:
        change = {**change, "columns": {"audio": "sound"}}
        message = "split 'validation' row 0: an audio clip must be {'array': [...], 'sampling_rate': ...}"
    evaluation = audio_evaluation(**{"report_splits": [], **change})
    assert message in refused(tmp_path, folders, evaluation)


def test_a_clip_of_two_channels_or_a_label_name_is_refused(tmp_path, never_scored):
    from datasets import Dataset, Value

    folders = runs(tmp_path, k=2)
    stereo = {"array": np.zeros((2, 800), dtype=np.float32), "sampling_rate": RATE}
    rows = Dataset.from_dict({"audio": [stereo] * 3, "label": [0, 1, 2]})
    message = refused(tmp_path, folders, audio_evaluation(splits={"validation": rows}, report_splits=[]))
    assert "row 0: an audio clip must be one channel of samples (a non-empty 1-D array), got shape (2, 800)" in message
    rows = clips(4, 6).cast_column("label", Value("string"))
    message = refused(tmp_path, folders, audio_evaluation(splits={"validation": rows}, report_splits=[]))
    assert "row 0: the label must be a class id (an integer ≥ 0), got '" in message


def test_no_feature_extractor_is_refused(tmp_path, never_scored):
    folders = runs(tmp_path, k=2, with_extractor=False)
    message = refused(tmp_path, folders, audio_evaluation())
    assert "audio-classification turns clips into model inputs with the model's feature extractor, but none" in message
    assert "feature_extractor.save_pretrained(folder) writes preprocessor_config.json" in message
    from transformers import BertTokenizerFast

    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    tokenizer = BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"))  # given from Python instead of an extractor
    with pytest.raises(SoupError, match="feature extractor, but got a BertTokenizer"):
        Scorer({"validation": clips(4, 7)}, task="audio-classification", tokenizer=tokenizer)


def test_a_damaged_feature_extractor_file_is_refused(tmp_path, never_scored):
    folders = runs(tmp_path, k=2)
    path = folders[0] / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "sampling_rate": "16k"}))
    message = refused(tmp_path, folders, audio_evaluation())
    assert "preprocessor_config.json: field sampling_rate must be an integer, found a string '16k'" in message


def test_max_length_seconds_is_refused_for_a_task_that_reads_no_audio(tmp_path):
    folders = runs(tmp_path, k=2)
    evaluation = audio_evaluation(task="sequence-classification", max_length_seconds=5)
    message = refused(tmp_path, folders, evaluation)
    assert "max_length_seconds cuts audio clips" in message and "task is 'sequence-classification'" in message
    with pytest.raises(SoupError, match="max_length_seconds cuts audio clips, which task 'causal-lm' does not read"):
        Scorer({"validation": clips(2, 8)}, task="causal-lm", max_length_seconds=5)


@pytest.mark.skipif(__import__("importlib").util.find_spec("torchcodec") is not None, reason="torchcodec decodes")
def test_an_audio_column_that_cannot_be_decoded_says_what_to_install(tmp_path, never_scored):
    """A `datasets.Audio` column of files needs torchcodec to decode: without it, one SoupError with the fix."""
    from datasets import Audio, Dataset

    rows = Dataset.from_dict({"audio": [{"bytes": b"RIFF", "path": None}] * 2, "label": [0, 1]})
    rows = rows.cast_column("audio", Audio(sampling_rate=RATE))
    message = refused(tmp_path, runs(tmp_path, k=2), audio_evaluation(splits={"validation": rows}, report_splits=[]))
    assert "the audio column 'audio' cannot be decoded" in message and "pip install torchcodec" in message
