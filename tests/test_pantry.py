import hashlib
import json
import multiprocessing
import os

import pytest
from conftest import make_model, save_model

from hf_soup.errors import SoupError
from hf_soup.pantry import Ingredient, Pantry, config_hash


@pytest.fixture
def run_folder(tmp_path):
    folder = save_model(make_model("llama", 1), tmp_path / "run")
    (folder / "optimizer.pt").write_bytes(b"optimizer moments")
    (folder / "training_args.bin").write_bytes(b"pickle")
    (folder / "trainer_state.json").write_text("{}")
    return folder


def test_add_records_everything_and_hashes_weights(tmp_path, run_folder):
    pantry = Pantry(tmp_path / "pantry")
    ingredient = pantry.add(
        run_folder,
        metric="eval_loss",
        value=1.25,
        greater_is_better=False,
        split="validation",
        step=40,
        run="lr-1e-4",
        hyperparameters={"learning_rate": 1e-4},
        tags={"sweep": "a"},
        base_model="tiny",
    )
    assert ingredient.id == "lr-1e-4-40"
    folder = pantry.location(ingredient)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "trainer_state.json",
    ]
    digest = hashlib.sha256((run_folder / "model.safetensors").read_bytes()).hexdigest()
    assert ingredient.sha256 == {"model.safetensors": digest}
    assert ingredient.size == (run_folder / "model.safetensors").stat().st_size
    assert ingredient.config_hash == config_hash(run_folder)
    ledger = json.loads((tmp_path / "pantry" / "pantry.json").read_text())
    assert ledger["format"] == 1
    assert ledger["ingredients"][0]["value"] == 1.25
    assert ledger["ingredients"][0]["hyperparameters"] == {"learning_rate": 1e-4}
    assert pantry.list() == [ingredient]
    assert pantry.verify() == []


def test_hardlink_where_possible_copy_on_request(tmp_path, run_folder):
    pantry = Pantry(tmp_path / "pantry")
    linked = pantry.add(run_folder, run="a")
    copied = pantry.add(run_folder, run="a", link="copy")
    source_inode = (run_folder / "model.safetensors").stat().st_ino
    assert (pantry.location(linked) / "model.safetensors").stat().st_ino == source_inode
    assert (pantry.location(copied) / "model.safetensors").stat().st_ino != source_inode
    assert copied.id == "a-2"
    # the pantry keeps the weights when the run folder is deleted (checkpoint rotation)
    for item in run_folder.iterdir():
        item.unlink()
    run_folder.rmdir()
    assert pantry.verify() == []


def test_ids_and_removal(tmp_path, run_folder):
    pantry = Pantry(tmp_path / "pantry")
    first = pantry.add(run_folder, ingredient_id="mine")
    with pytest.raises(SoupError, match="already has an ingredient 'mine'"):
        pantry.add(run_folder, ingredient_id="mine")
    with pytest.raises(SoupError, match="may hold only letters"):
        pantry.add(run_folder, ingredient_id="../evil")
    second = pantry.add(run_folder)
    assert second.id == "run"
    with pytest.raises(SoupError, match="no ingredient 'nope'; it has: mine, run"):
        pantry.get("nope")
    pantry.remove(first.id)
    assert [i.id for i in pantry.list()] == ["run"]
    assert not (tmp_path / "pantry" / "ingredients" / "mine").exists()
    with pytest.raises(SoupError, match="no ingredient 'mine'"):
        pantry.remove("mine")


def test_bad_ledgers_are_clear_errors(tmp_path, run_folder):
    pantry = Pantry(tmp_path / "pantry")
    pantry.add(run_folder)
    ledger = tmp_path / "pantry" / "pantry.json"
    good = ledger.read_text()
    ledger.write_text("{truncated")
    with pytest.raises(SoupError, match="pantry.json is not valid JSON"):
        pantry.list()
    data = json.loads(good)
    data["format"] = 7
    ledger.write_text(json.dumps(data))
    with pytest.raises(SoupError, match="format 7, newer than this hf_soup understands"):
        pantry.list()
    data["format"] = 1
    data["ingredients"][0]["path"] = "../../etc"
    ledger.write_text(json.dumps(data))
    with pytest.raises(SoupError, match="leads outside the pantry"):
        pantry.location(pantry.list()[0])
    data["ingredients"][0]["colour"] = "red"
    ledger.write_text(json.dumps(data))
    with pytest.raises(SoupError, match="unknown field.*colour"):
        pantry.list()
    ledger.write_text(json.dumps([1, 2]))
    with pytest.raises(SoupError, match="must be a mapping"):
        pantry.list()


def test_unwritable_or_file_pantry(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SoupError, match="exists and is not a folder"):
        Pantry(tmp_path / "afile")
    with pytest.raises(SoupError, match="is not writable"):
        Pantry(tmp_path / "afile" / "pantry").check_writable()


def test_verify_finds_corruption_and_strays(tmp_path, run_folder):
    pantry = Pantry(tmp_path / "pantry")
    ingredient = pantry.add(run_folder, link="copy")
    weights = pantry.location(ingredient) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    (tmp_path / "pantry" / "ingredients" / "orphan").mkdir()
    (tmp_path / "pantry" / ".staging-abc").mkdir()
    problems = pantry.verify()
    assert problems == [
        "run: model.safetensors does not match its sha256 (changed or corrupt)",
        "stray folder ingredients/orphan is claimed by no entry",
        "unfinished add .staging-abc (an interrupted copy)",
    ]


def _add_many(root, source, count, worker):
    pantry = Pantry(root)
    for i in range(count):
        pantry.add(source, run=f"w{worker}", step=i)


def test_concurrent_writers_lose_nothing(tmp_path, run_folder):
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_add_many, args=(tmp_path / "pantry", run_folder, 5, worker)) for worker in range(4)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    ingredients = Pantry(tmp_path / "pantry").list()
    assert sorted(i.id for i in ingredients) == sorted(f"w{w}-{i}" for w in range(4) for i in range(5))
    assert len(os.listdir(tmp_path / "pantry" / "ingredients")) == 20


def test_loose_ingredient(run_folder):
    ingredient = Ingredient.from_folder(run_folder)
    assert ingredient.id == "run" and ingredient.kind == "full" and ingredient.path == str(run_folder)
    adapter = run_folder.parent / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    assert Ingredient.from_folder(adapter).kind == "adapter"
