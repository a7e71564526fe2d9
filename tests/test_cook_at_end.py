"""SoupCallback(cook=..., runs=N): the sweep's soup is cooked when its last run ends, with real tiny Trainer runs
(from-config BERT, 32 rows in memory, CPU, offline)."""

import json
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ACCELERATE_LAUNCH
from datasets import Dataset
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from hf_soup import SoupBuilder, SoupCallback, cook_at_end
from hf_soup.errors import SoupError
from hf_soup.pantry import Pantry
from hf_soup.sweep import SweepCook

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts_callback" / "cook_at_end.py"
CONFIG = BertConfig(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=2
)
RATES = [1e-3, 2e-3, 3e-3]


def tiny_model(trial=None) -> BertForSequenceClassification:
    torch.manual_seed(0)  # one start point for every run: a soup averages fine-tunes of one init
    return BertForSequenceClassification(CONFIG)


def tiny_data() -> Dataset:
    ids = torch.randint(0, 64, (32, 8), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def make_trainer(tmp_path: Path, callbacks: list, *, name: str = "run", model_init=None, **overrides) -> Trainer:
    options = dict(
        output_dir=str(tmp_path / "runs" / name),
        run_name=name,
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        save_total_limit=1,
        metric_for_best_model="accuracy",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    options.update(overrides)
    return Trainer(
        model=None if model_init else tiny_model(),
        model_init=model_init,
        args=TrainingArguments(**options),
        train_dataset=tiny_data(),
        eval_dataset=tiny_data(),
        compute_metrics=accuracy,
        callbacks=callbacks,
    )


class Watcher(TrainerCallback):
    """Listed after SoupCallback: after each run, whether the soup folder exists yet."""

    def __init__(self, soup: Path):
        self.soup, self.seen = soup, []

    def on_train_end(self, args, state, control, **kwargs):
        self.seen.append((self.soup / "soup.json").is_file())


@pytest.fixture
def cook_calls(monkeypatch) -> list[Path]:
    """The pantry of every call of a `cook_at_end` cook."""
    calls, call = [], SweepCook.__call__

    def counted(self, pantry):
        calls.append(pantry.root)
        return call(self, pantry)

    monkeypatch.setattr(SweepCook, "__call__", counted)
    return calls


def write_recipe(path: Path, **keys) -> Path:
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in keys.items()))
    return path


def assert_same_tensors(left: Path, right: Path) -> None:
    a, b = load_file(left / "model.safetensors"), load_file(right / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_loop_of_three_trainers_cooks_once_after_the_third(tmp_path, cook_calls):
    recipe = write_recipe(tmp_path / "soup.yaml", method="uniform", pantry="pantry", output="soups/uniform")
    callback = SoupCallback(tmp_path / "pantry", runs=3, cook=cook_at_end(recipe), tags={"sweep": "lr"})
    watcher = Watcher(tmp_path / "soups" / "uniform")
    for index, rate in enumerate(RATES):  # one callback object given to every Trainer of the sweep
        make_trainer(tmp_path, [callback, watcher], name=f"lr{index}", learning_rate=rate).train()
    assert watcher.seen == [False, False, True] and len(cook_calls) == 1 and callback.ended == 3
    assert callback.error is None and callback.soup.path == tmp_path / "soups" / "uniform"
    entries = Pantry(tmp_path / "pantry").list()
    assert sorted(e.run for e in entries) == ["lr0", "lr1", "lr2"]
    assert sorted(i["id"] for i in callback.soup.record["ingredients"]) == sorted(e.id for e in entries)
    by_hand = SoupBuilder.from_recipe(recipe).cook(tmp_path / "by-hand", progress=False)
    assert_same_tensors(callback.soup.path, by_hand.path)  # the same recipe, cooked by hand: bit for bit
    trained = [load_file(Pantry(tmp_path / "pantry").location(e) / "model.safetensors") for e in entries]
    name = "classifier.weight"
    assert not torch.equal(trained[0][name], trained[1][name])  # the runs differ: the soup is not one of them


def test_hyperparameter_search_cooks_once_at_the_end_scored_by_its_trainer(tmp_path, cook_calls):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trainer = make_trainer(tmp_path, [], name="hp", model_init=tiny_model)
    soup = tmp_path / "soups" / "greedy"
    callback = SoupCallback(
        tmp_path / "pantry",
        split="validation",
        runs=3,
        cook=cook_at_end(method="greedy", trainer=trainer, output=soup, progress=False),
    )
    watcher = Watcher(soup)
    trainer.add_callback(callback)
    trainer.add_callback(watcher)
    trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": trial.suggest_categorical("learning_rate", RATES)},
        backend="optuna",
        n_trials=3,
        direction="maximize",
        sampler=optuna.samplers.GridSampler({"learning_rate": RATES}),
    )
    assert watcher.seen == [False, False, True] and len(cook_calls) == 1 and callback.error is None
    entries = Pantry(tmp_path / "pantry").list()
    assert sorted(e.run for e in entries) == ["hp-run-0", "hp-run-1", "hp-run-2"]
    record = json.loads((soup / "soup.json").read_text())
    assert record["strategy"]["name"] == "greedy" and len(record["ingredients"]) == 3
    # The same greedy soup, chosen by hand after the search by a fresh Trainer on the same data, is the same soup.
    fresh = make_trainer(tmp_path, [], name="again")
    by_hand = SoupBuilder(pantry=str(tmp_path / "pantry"), method="greedy", trainer=fresh).cook(
        tmp_path / "by-hand", progress=False
    )
    assert by_hand.record["strategy"]["trace"] == record["strategy"]["trace"]
    assert_same_tensors(soup, by_hand.path)


def snapshot(pantry: Path) -> dict[str, bytes]:
    return {str(p.relative_to(pantry)): p.read_bytes() for p in sorted(pantry.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("failing", ["recipe", "function"])
def test_a_failing_cook_keeps_every_pantry_entry_and_reports_the_error(tmp_path, caplog, failing):
    pantry = tmp_path / "pantry"
    before: dict[str, bytes] = {}
    if failing == "recipe":  # weights for 2 ingredients, but the sweep makes 3: refused when the sweep is cooked
        recipe = write_recipe(tmp_path / "w.yaml", method="weighted", weights=[1, 2], pantry="pantry", output="soup")
        cook = cook_at_end(recipe, progress=False)
    else:

        def cook(pantry_seen: Pantry):
            before.update(snapshot(pantry_seen.root))
            raise RuntimeError("the disk of the soup is full")

    callback = SoupCallback(pantry, runs=3, cook=cook)
    with caplog.at_level(logging.ERROR, logger="hf_soup.callback"):
        for index, rate in enumerate(RATES):
            output = make_trainer(tmp_path, [callback], name=f"lr{index}", learning_rate=rate).train()
            assert output.global_step == 4  # train() returns: the sweep is not discarded
    expected = "weights" if failing == "recipe" else "the disk of the soup is full"
    assert expected in str(callback.error) and callback.soup is None
    assert isinstance(callback.error, SoupError if failing == "recipe" else RuntimeError)
    (logged,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "cook at the end of the sweep failed" in logged.getMessage() and expected in logged.getMessage()
    assert str(pantry) in logged.getMessage()
    assert (logged.exc_info is None) == (failing == "recipe")  # a traceback for what is not a bad input
    entries = Pantry(pantry).list()
    assert sorted(e.run for e in entries) == ["lr0", "lr1", "lr2"] and Pantry(pantry).verify() == []
    if before:
        assert snapshot(pantry) == before  # not one byte of the pantry changed
    assert not (tmp_path / "soup").exists() and not list(tmp_path.glob(".*soup*"))  # no half-written soup
    with pytest.raises(type(callback.error), match=expected.split()[0]):  # asked for explicitly: raised
        callback.end_sweep()
    assert Pantry(pantry).verify() == [] and len(Pantry(pantry).list()) == 3


def test_end_sweep_cooks_a_loop_of_trainers_with_their_own_callbacks(tmp_path):
    recipe = write_recipe(tmp_path / "soup.yaml", method="uniform", pantry="pantry", output="soups/uniform")
    for index, rate in enumerate(RATES[:2]):  # a new callback per Trainer, as in the README's loop
        callback = SoupCallback(tmp_path / "pantry", cook=cook_at_end(recipe, progress=False))
        make_trainer(tmp_path, [callback], name=f"lr{index}", learning_rate=rate).train()
        assert callback.soup is None  # no `runs`: nothing is cooked by itself
    soup = callback.end_sweep()
    assert soup is callback.soup and (soup.path / "model.safetensors").is_file()
    assert len(soup.record["ingredients"]) == 2


def test_end_sweep_without_a_cook_is_refused(tmp_path):
    with pytest.raises(SoupError, match="none was given"):
        SoupCallback(tmp_path / "pantry").end_sweep()


def bad_setups(tmp_path: Path) -> dict[str, tuple]:
    """name → (a function that builds the callback, the words its error must contain)."""
    pantry = tmp_path / "pantry"
    good = write_recipe(tmp_path / "good.yaml", method="uniform", pantry="pantry", output="soup")
    other = write_recipe(tmp_path / "other.yaml", method="uniform", pantry="elsewhere", output="soup")
    folders = write_recipe(tmp_path / "folders.yaml", method="uniform", ingredients=["a", "b"], output="soup")
    selected = write_recipe(tmp_path / "select.yaml", method="uniform", pantry="pantry", select=["x"], output="soup")
    no_output = write_recipe(tmp_path / "no-output.yaml", method="uniform", pantry="pantry")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("kept")
    unscored = Trainer(tiny_model(), TrainingArguments(str(tmp_path / "x"), report_to="none", use_cpu=True))
    return {
        "runs=0": (lambda: SoupCallback(pantry, runs=0, cook=cook_at_end(good)), "whole number >= 1"),
        "runs=-2": (lambda: SoupCallback(pantry, runs=-2, cook=cook_at_end(good)), "whole number >= 1"),
        "runs=2.5": (lambda: SoupCallback(pantry, runs=2.5, cook=cook_at_end(good)), "whole number >= 1"),
        "runs=True": (lambda: SoupCallback(pantry, runs=True, cook=cook_at_end(good)), "whole number >= 1"),
        "runs without cook": (lambda: SoupCallback(pantry, runs=3), "together with cook="),
        "cook not callable": (lambda: SoupCallback(pantry, runs=3, cook=str(good)), "cook must be a function"),
        "missing recipe": (lambda: SoupCallback(pantry, cook=cook_at_end(tmp_path / "nope.yaml")), "cannot read"),
        "other pantry": (lambda: SoupCallback(pantry, cook=cook_at_end(other)), "but the SoupCallback fills"),
        "ingredients recipe": (lambda: SoupCallback(pantry, cook=cook_at_end(folders)), "`ingredients:`, but"),
        "select": (lambda: SoupCallback(pantry, cook=cook_at_end(selected)), "drop `select:`"),
        "no output": (lambda: SoupCallback(pantry, cook=cook_at_end(no_output)), "needs the soup's folder"),
        "output taken": (lambda: SoupCallback(pantry, cook=cook_at_end(good, output=tmp_path / "taken")), "not empty"),
        "recipe and options": (lambda: cook_at_end(good, method="greedy"), "not both"),
        "pantry option": (lambda: cook_at_end(pantry="p", output="s"), "takes no 'pantry'"),
        "unknown method": (lambda: SoupCallback(pantry, cook=cook_at_end(method="soupy", output="s")), "unknown"),
        "unscored trainer": (
            lambda: SoupCallback(pantry, cook=cook_at_end(method="greedy", trainer=unscored, output="s")),
            "no compute_metrics",
        ),
    }


BAD = [
    "runs=0", "runs=-2", "runs=2.5", "runs=True", "runs without cook", "cook not callable", "missing recipe",
    "other pantry", "ingredients recipe", "select", "no output", "output taken", "recipe and options",
    "pantry option", "unknown method", "unscored trainer",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_options_are_one_clear_error_before_training(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    build, words = bad_setups(tmp_path)[case]
    with pytest.raises(SoupError) as caught:
        build()
    message = str(caught.value)
    assert words in message and "\n" not in message
    assert not (tmp_path / "pantry").exists() and not (tmp_path / "soup").exists()  # nothing made, nothing trained
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["file"]


@pytest.mark.slow  # two processes start, each importing torch and transformers: about 20-30 s
def test_accelerate_launch_two_processes_cook_together_and_only_the_main_one_writes(tmp_path):
    """A 2-trial hyperparameter search under `accelerate launch` (gloo, 2 CPU processes): both processes score the
    greedy soup with the Trainer's distributed evaluation, only rank 0 writes it, none waits for ever."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    output = tmp_path / "two"
    command = [*ACCELERATE_LAUNCH, str(SCRIPT), "--output", str(output)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"two.rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["ended"] for r in ranks] == [2, 2]
    assert [r["calls"] for r in ranks] == [{"cook": 1, "finish": 1}, {"cook": 1, "finish": 0}]  # rank 0 writes
    assert [r["error"] for r in ranks] == [None, None]
    assert ranks[0]["strategy"] == ranks[1]["strategy"]  # the same choice, scored together
    record = json.loads((tmp_path / "two-soup" / "soup.json").read_text())
    assert record["strategy"]["chosen"] == ranks[0]["strategy"]["chosen"] and len(record["ingredients"]) == 2
    assert Pantry(tmp_path / "two-pantry").verify() == [] and len(Pantry(tmp_path / "two-pantry").list()) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
