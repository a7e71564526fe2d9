"""SoupCallback with real tiny Trainer runs: from-config BERT, 32 rows in memory, CPU, offline."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from conftest import ACCELERATE_LAUNCH  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_soup.callback import SoupCallback  # noqa: E402
from hf_soup.errors import SoupError  # noqa: E402
from hf_soup.ingredient import config_hash  # noqa: E402
from hf_soup.pantry import Pantry  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts_callback" / "train_tiny.py"
CONFIG = BertConfig(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=2
)
# Scripted evaluation: the metric at each step is fixed, so which checkpoint is best is known in advance.
SCORES = {2: 0.5, 4: 0.9, 6: 0.7, 8: 0.8}


def tiny_model(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(CONFIG)


def tiny_data() -> Dataset:
    ids = torch.randint(0, 64, (32, 8), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})


class Scripted:
    """compute_metrics that returns `scores[global_step]` as `score`."""

    def __init__(self, scores: dict[int, float]):
        self.scores = scores
        self.trainer = None

    def __call__(self, eval_prediction):
        return {"score": self.scores[self.trainer.state.global_step]}


class Spy(TrainerCallback):
    """After SoupCallback (listed before it), remember the pantry's steps and copy each saved checkpoint."""

    def __init__(self, pantry: Path, snapshots: Path, crash_at: int | None = None):
        self.pantry, self.snapshots, self.crash_at = Pantry(pantry), snapshots, crash_at
        self.seen: dict[int, list[int]] = {}

    def on_save(self, args, state, control, **kwargs):
        self.seen[state.global_step] = sorted(i.step for i in self.pantry.list())
        shutil.copytree(
            Path(args.output_dir) / f"checkpoint-{state.global_step}", self.snapshots / str(state.global_step)
        )
        if state.global_step == self.crash_at:
            raise KeyboardInterrupt("simulated crash")


def make_trainer(tmp_path: Path, callbacks: list, *, scores=SCORES, model=None, model_init=None, **overrides):
    options = dict(
        output_dir=str(tmp_path / "out"),
        run_name="lr-a",
        max_steps=max(scores),
        per_device_train_batch_size=8,
        learning_rate=1e-4,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        logging_steps=2,
        save_total_limit=1,
        metric_for_best_model="score",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    options.update(overrides)
    metrics = Scripted(scores)
    data = tiny_data()
    trainer = Trainer(
        model=None if model_init else (model or tiny_model()),
        model_init=model_init,
        args=TrainingArguments(**options),
        train_dataset=data,
        eval_dataset=data,
        compute_metrics=metrics,
        callbacks=callbacks,
    )
    metrics.trainer = trainer
    return trainer


def assert_same_tensors(left: Path, right: Path) -> None:
    a, b = load_file(left), load_file(right)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_best_checkpoint_survives_rotation_bit_for_bit(tmp_path):
    pantry = tmp_path / "pantry"
    spy = Spy(pantry, tmp_path / "snap")
    trainer = make_trainer(tmp_path, [SoupCallback(pantry, split="validation", tags={"sweep": "t"}), spy])
    trainer.train()
    # Each new best replaced the previous one as soon as it was saved; later worse checkpoints changed nothing.
    assert spy.seen == {2: [2], 4: [4], 6: [4], 8: [4]}
    (entry,) = Pantry(pantry).list()
    folder = Pantry(pantry).location(entry)
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-4"
    assert os.path.samefile(folder / "model.safetensors", best / "model.safetensors")  # hard-linked weights
    assert not os.path.samefile(folder / "config.json", best / "config.json")  # JSON copied, never linked

    shutil.rmtree(tmp_path / "out")  # rotation and deleting output_dir cannot lose the ingredient
    assert Pantry(pantry).verify() == []
    assert_same_tensors(folder / "model.safetensors", tmp_path / "snap" / "4" / "model.safetensors")
    assert entry.value == trainer.state.best_metric == 0.9
    assert (entry.metric, entry.greater_is_better, entry.split, entry.step) == ("eval_score", True, "validation", 4)
    assert (entry.run, entry.kind, entry.tags) == ("lr-a", "full", {"sweep": "t"})
    assert entry.config_hash == config_hash(tmp_path / "snap" / "4")
    assert not (folder / "optimizer.pt").exists()
    hyper = entry.hyperparameters
    assert (hyper["learning_rate"], hyper["seed"], hyper["weight_decay"], hyper["max_steps"]) == (1e-4, 42, 0.0, 8)
    assert (hyper["lr_scheduler_type"], hyper["total_train_batch_size"]) == ("linear", 8)
    assert {"warmup_steps", "label_smoothing_factor", "num_train_epochs"} <= hyper.keys()


def test_when_end_adds_once_at_the_end(tmp_path):
    pantry = tmp_path / "pantry"
    spy = Spy(pantry, tmp_path / "snap")
    trainer = make_trainer(tmp_path, [SoupCallback(pantry, when="end"), spy], load_best_model_at_end=True)
    trainer.train()
    assert spy.seen == {2: [], 4: [], 6: [], 8: []}
    assert [(i.step, i.value) for i in Pantry(pantry).list()] == [(4, 0.9)]


def test_keep_last_n_evaluated_checkpoints(tmp_path):
    pantry = tmp_path / "pantry"
    spy = Spy(pantry, tmp_path / "snap")
    make_trainer(tmp_path, [SoupCallback(pantry, keep="last:2"), spy]).train()
    assert spy.seen == {2: [2], 4: [2, 4], 6: [4, 6], 8: [6, 8]}
    entries = Pantry(pantry).list()
    assert [(i.step, i.value) for i in entries] == [(6, 0.7), (8, 0.8)]
    for entry in entries:
        snapshot = tmp_path / "snap" / str(entry.step) / "model.safetensors"
        assert_same_tensors(Pantry(pantry).location(entry) / "model.safetensors", snapshot)
    assert Pantry(pantry).verify() == []


def test_a_failed_add_does_not_stop_training_and_is_retried(tmp_path, monkeypatch, caplog):
    steps, add = [], Pantry.add

    def flaky_add(self, source, **kwargs):
        steps.append(kwargs["step"])
        if len(steps) == 2:
            raise OSError(28, "No space left on device")
        return add(self, source, **kwargs)

    monkeypatch.setattr(Pantry, "add", flaky_add)
    pantry = tmp_path / "pantry"
    spy = Spy(pantry, tmp_path / "snap")
    trainer = make_trainer(tmp_path, [SoupCallback(pantry), spy])
    trainer.train()
    assert trainer.state.global_step == 8 and steps == [2, 4, 4]
    assert spy.seen == {2: [2], 4: [2], 6: [4], 8: [4]}  # the new best at 4 got in at the next save
    assert "could not update pantry" in caplog.text and "No space left on device" in caplog.text


def test_lora_run_stores_the_adapter_and_its_base(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    model = get_peft_model(
        BertForSequenceClassification.from_pretrained(base),
        LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"]),
    )
    pantry = tmp_path / "pantry"
    make_trainer(tmp_path, [SoupCallback(pantry), Spy(pantry, tmp_path / "snap")], model=model).train()
    (entry,) = Pantry(pantry).list()
    folder = Pantry(pantry).location(entry)
    assert (entry.kind, entry.step, entry.base_model) == ("adapter", 4, str(base))
    assert (folder / "adapter_config.json").is_file() and not (folder / "model.safetensors").exists()
    names = load_file(folder / "adapter_model.safetensors").keys()
    assert any("lora_A" in n for n in names) and any("classifier" in n for n in names)  # modules_to_save kept
    assert not any("attention.self.key" in n for n in names)  # not a merged model
    assert_same_tensors(folder / "adapter_model.safetensors", tmp_path / "snap" / "4" / "adapter_model.safetensors")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"metric_for_best_model": None}, "metric_for_best_model='eval_loss'"),
        ({"eval_strategy": "no"}, "eval_strategy='steps'"),
    ],
)
def test_bad_training_arguments_fail_before_training(tmp_path, overrides, message):
    trainer = make_trainer(tmp_path, [SoupCallback(tmp_path / "pantry")], **overrides)
    with pytest.raises(SoupError, match=message):
        trainer.train()
    assert trainer.state.global_step == 0 and not list((tmp_path / "out").glob("checkpoint-*"))


def test_unwritable_pantry_fails_before_training(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    trainer = make_trainer(tmp_path, [SoupCallback(tmp_path / "a-file" / "pantry")])
    with pytest.raises(SoupError, match="is not writable"):
        trainer.train()
    assert trainer.state.global_step == 0 and not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"keep": "last:0"}, "keep must be"),
        ({"keep": "worst"}, "keep must be"),
        ({"when": "later"}, "when must be one of"),
        ({"keep": "last:2", "when": "end"}, "use when='save'"),
        ({"tags": {"bad": object()}}, "JSON values"),
        ({"tags": ["a"]}, "tags must be a dict"),
        ({"split": ""}, "split must be"),
    ],
)
def test_bad_settings_are_refused(tmp_path, arguments, message):
    with pytest.raises(SoupError, match=message):
        SoupCallback(tmp_path / "pantry", **arguments)


@pytest.mark.parametrize(
    ("crash_at", "later", "expected"),
    [
        (4, {6: 0.7}, [(4, 0.9)]),  # the resume checkpoint is the best and stays so: found again by its weights
        (4, {6: 0.95}, [(6, 0.95)]),  # ... and is then beaten: replaced, not duplicated
        (6, {8: 0.95}, [(8, 0.95)]),  # the best (4) came before the resume checkpoint: known from trainer_state.json
    ],
)
def test_resume_does_not_duplicate(tmp_path, crash_at, later, expected):
    pantry = tmp_path / "pantry"
    scores = {**SCORES, **later}
    spy = Spy(pantry, tmp_path / "snap", crash_at=crash_at)
    crashing = make_trainer(tmp_path, [SoupCallback(pantry), spy], scores=scores)
    with pytest.raises(KeyboardInterrupt):
        crashing.train()
    assert [i.step for i in Pantry(pantry).list()] == [4]  # in the pantry before the crash
    resumed = make_trainer(tmp_path, [SoupCallback(pantry)], scores=scores)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / f"checkpoint-{crash_at}"))
    assert resumed.state.global_step == 8
    entries = Pantry(pantry).list()
    assert [(i.step, i.value) for i in entries] == expected
    assert entries[0].value == resumed.state.best_metric
    assert Pantry(pantry).verify() == []


def test_hyperparameter_search_one_ingredient_per_trial(tmp_path):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pantry = tmp_path / "pantry"
    rates = [1e-4, 3e-4]
    trainer = make_trainer(
        tmp_path, [SoupCallback(pantry, tags={"sweep": "hp"})], model_init=lambda trial: tiny_model()
    )
    trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": trial.suggest_categorical("learning_rate", rates)},
        backend="optuna",
        n_trials=2,
        direction="maximize",
        sampler=optuna.samplers.GridSampler({"learning_rate": rates}),
    )
    entries = Pantry(pantry).list()
    assert sorted(i.run for i in entries) == ["lr-a-run-0", "lr-a-run-1"]
    assert sorted(i.tags["learning_rate"] for i in entries) == rates
    for entry in entries:
        assert entry.tags["trial"] == entry.run.removeprefix("lr-a-") and entry.tags["sweep"] == "hp"
        assert entry.hyperparameters["learning_rate"] == entry.tags["learning_rate"]
        assert (entry.step, entry.value) == (4, 0.9)


def run_tiny(pantry: Path, output: Path, *extra: str, launcher: list[str] | None = None) -> subprocess.Popen:
    command = [*(launcher or [sys.executable]), str(SCRIPT), "--pantry", str(pantry), "--output", str(output), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, cwd=output.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen, output: Path, timeout: float = 120) -> list[dict]:
    try:
        log, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        log, _ = process.communicate()
        pytest.fail(f"subprocess timed out:\n{log[-3000:]}")
    assert process.returncode == 0, log[-3000:]
    return [json.loads(path.read_text()) for path in sorted(output.parent.glob(f"{output.name}.result-*.json"))]


def test_accelerate_launch_two_processes_write_one_entry(tmp_path):
    results = finish(run_tiny(tmp_path / "pantry", tmp_path / "out", launcher=ACCELERATE_LAUNCH), tmp_path / "out")
    assert sorted(r["rank"] for r in results) == [0, 1] and {r["world_size"] for r in results} == {2}
    calls = {r["rank"]: r["calls"] for r in results}
    assert calls[0]["check_writable"] >= 1 and calls[0]["add"] >= 1
    assert calls[1] == {"check_writable": 0, "add": 0, "remove": 0, "list": 0}  # only the main process writes
    (entry,) = Pantry(tmp_path / "pantry").list()
    assert entry.value == results[0]["best_metric"]
    assert entry.hyperparameters["total_train_batch_size"] == 8  # 4 per device x 2 processes
    assert Pantry(tmp_path / "pantry").verify() == []


def test_concurrent_writers_lose_nothing(tmp_path):
    pantry = tmp_path / "pantry"
    (tmp_path / "ready").mkdir()
    args = ("--keep", "last:3", "--steps", "8", "--every", "1", "--ready", str(tmp_path / "ready"), "--writers", "2")
    processes = [run_tiny(pantry, tmp_path / f"out-{name}", "--run-name", name, *args) for name in ("a", "b")]
    (a,), (b,) = (finish(process, tmp_path / f"out-{name}") for name, process in zip(("a", "b"), processes))
    assert a["calls"]["add"] == b["calls"]["add"] == 8 and a["calls"]["remove"] == b["calls"]["remove"] == 5
    assert a["adding"][0] < b["adding"][1] and b["adding"][0] < a["adding"][1]  # the writers did overlap
    entries = Pantry(pantry).list()
    assert sorted((i.run, i.step) for i in entries) == [(r, s) for r in ("a", "b") for s in (6, 7, 8)]
    assert Pantry(pantry).verify() == []
