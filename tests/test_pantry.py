import hashlib
import json
import os
import subprocess

import pytest
from conftest import make_model, save_model

from hf_soup.atomic import owner_tag
from hf_soup.cli import main
from hf_soup.errors import SoupError
from hf_soup.ingredient import Ingredient, config_hash
from hf_soup.pantry import Pantry


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


def dead_owner() -> str:
    """The owner tag of a process of this machine that has ended."""
    process = subprocess.Popen(["true"])
    process.wait()
    return f"{owner_tag().split('-')[0]}-{process.pid}"


def test_verify_finds_corruption_strays_and_leftovers(tmp_path, run_folder):
    pantry = Pantry(tmp_path / "pantry")
    ingredient = pantry.add(run_folder, link="copy")
    weights = pantry.location(ingredient) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    root = tmp_path / "pantry"
    (root / "ingredients" / "orphan").mkdir()
    (root / ".staging-abc").mkdir()  # an older hf_soup's staging folder: no process recorded
    dead = dead_owner()
    (root / f".staging-{dead}-0123456789ab").mkdir()
    (root / f".staging-{owner_tag()}-0123456789ab").mkdir()  # an add of this (running) process: not a problem
    (root / ".staging-00000000-1-0123456789ab").mkdir()  # another machine
    problems = pantry.verify()
    pid = dead.split("-")[1]
    assert problems == [
        "run: model.safetensors does not match its sha256 (changed or corrupt); restore it, or drop the entry: "
        "hf-soup pantry remove <pantry> run",
        "stray folder ingredients/orphan is claimed by no entry; `hf-soup pantry repair` moves it to lost+found/",
        "unfinished add .staging-00000000-1-0123456789ab: made on another machine (running there, or interrupted); "
        "run `hf-soup pantry repair` on that machine, or delete it by hand once nothing writes to the pantry",
        f"unfinished add .staging-{dead}-0123456789ab: its process {pid} is gone; `hf-soup pantry repair` removes it",
        "unfinished add .staging-abc: its process is not recorded (an older hf_soup); delete it by hand once nothing "
        "writes to the pantry",
    ]
    assert main(["pantry", "verify", str(root)]) == 1


def test_verify_and_location_refuse_a_weight_file_linked_out_of_the_pantry(tmp_path, run_folder):
    pantry = Pantry(tmp_path / "pantry")
    ingredient = pantry.add(run_folder, link="copy")
    weights = pantry.location(ingredient) / "model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    weights.rename(outside)
    weights.symlink_to(outside)  # same bytes, so only the link itself is wrong
    with pytest.raises(SoupError, match="has file model.safetensors, a link to .*elsewhere.safetensors outside"):
        pantry.location(ingredient)
    [problem] = pantry.verify()
    assert "a link to" in problem and "replace the link with the file itself" in problem
    assert not pantry.repair().actions and weights.is_symlink()  # repair leaves the entry's folder where it is
    assert main(["pantry", "verify", str(tmp_path / "pantry")]) == 1


def test_repair_removes_dead_leftovers_keeps_entries_and_moves_strays(tmp_path, run_folder, capsys):
    root = tmp_path / "pantry"
    pantry = Pantry(root)
    kept = pantry.add(run_folder, run="kept")
    lost = pantry.add(run_folder, run="lost")
    dead = dead_owner()
    for name in (f".staging-{dead}-0123456789ab", f".removing-{dead}-01234567"):
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"half a copy")
    (root / f".pantry.json.{dead}-01234567.tmp").write_text("{")
    running = root / f".staging-{owner_tag()}-0123456789ab"  # an add in progress in this process
    running.mkdir()
    for name in ("orphan", "twice"):
        (root / "ingredients" / name).mkdir()
        (root / "ingredients" / name / "model.safetensors").write_bytes(name.encode())
    (root / "lost+found" / "twice").mkdir(parents=True)  # an earlier repair's find: not overwritten
    for item in (pantry.location(lost)).iterdir():
        item.unlink()
    pantry.location(lost).rmdir()
    before = pantry.list()

    result = pantry.repair()

    assert pantry.list() == before, "repair changed the ledger"
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [".pantry.lock", "ingredients", "lost+found", "pantry.json", running.name]
    )
    assert (root / "lost+found" / "orphan" / "model.safetensors").read_bytes() == b"orphan"
    assert (root / "lost+found" / "twice-2" / "model.safetensors").read_bytes() == b"twice"
    assert sorted(p.name for p in (root / "ingredients").iterdir()) == [kept.id]
    pid, add_back = dead.split("-")[1], "add it back with Pantry.add, or delete it"
    assert sorted(result.actions) == [
        f"left unfinished add {running.name}: its process {os.getpid()} still runs",
        f"moved ingredients/orphan (claimed by no entry) to lost+found/orphan; {add_back}",
        f"moved ingredients/twice (claimed by no entry) to lost+found/twice-2; {add_back}",
        f"removed temporary ledger file .pantry.json.{dead}-01234567.tmp (its process {pid} is gone)",
        f"removed unfinished add .staging-{dead}-0123456789ab (its process {pid} is gone)",
        f"removed unfinished removal .removing-{dead}-01234567 (its process {pid} is gone)",
    ]
    # the entry whose files are gone is reported, never dropped
    assert result.problems == [
        "lost: folder ingredients/lost is missing; restore it, or drop the entry: hf-soup pantry remove <pantry> lost"
    ]
    capsys.readouterr()
    assert main(["pantry", "repair", str(root)]) == 1
    out = capsys.readouterr().out
    assert "lost: folder ingredients/lost is missing" in out and "2 ingredient(s) checked: 1 problem(s)" in out
    assert main(["pantry", "remove", str(root), "lost"]) == 0
    running.rmdir()
    assert main(["pantry", "repair", str(root)]) == 0
    assert main(["pantry", "verify", str(root)]) == 0
    assert "1 ingredient(s) checked: all sha256 match" in capsys.readouterr().out


def test_repair_refuses_a_pantry_without_its_ledger(tmp_path, run_folder, capsys):
    root = tmp_path / "pantry"
    Pantry(root).add(run_folder)
    (root / "pantry.json").unlink()
    with pytest.raises(SoupError, match="has ingredient folders but no pantry.json; restore pantry.json"):
        Pantry(root).repair()
    assert (root / "ingredients" / "run").is_dir()
    (root / "pantry.json").write_text("{broken")
    assert main(["pantry", "repair", str(root)]) == 2
    assert "pantry.json is not valid JSON" in capsys.readouterr().err
    assert (root / "ingredients" / "run").is_dir()


def test_a_failed_ledger_write_leaves_no_folder(tmp_path, run_folder, monkeypatch):
    pantry = Pantry(tmp_path / "pantry")
    first = pantry.add(run_folder, run="first")
    ledger = (tmp_path / "pantry" / "pantry.json").read_text()

    def fail(self, ingredients):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Pantry, "_write", fail)
    with pytest.raises(OSError, match="Input/output error"):
        pantry.add(run_folder, run="second")
    monkeypatch.undo()
    assert (tmp_path / "pantry" / "pantry.json").read_text() == ledger
    assert sorted(p.name for p in (tmp_path / "pantry" / "ingredients").iterdir()) == [first.id]
    assert pantry.verify() == []


def test_removal_goes_through_a_named_trash_folder(tmp_path, run_folder, monkeypatch):
    pantry = Pantry(tmp_path / "pantry")
    pantry.add(run_folder, run="a")
    pantry.add(run_folder, run="b")
    monkeypatch.setattr("hf_soup.pantry.shutil.rmtree", lambda *args, **kwargs: None)  # "killed" before deleting
    pantry.remove("a")
    monkeypatch.undo()
    trash = [p.name for p in (tmp_path / "pantry").glob(".removing-*")]
    assert trash == [trash[0]] and trash[0].startswith(f".removing-{owner_tag()}-")
    assert pantry.verify() == []  # this process still runs: not yet a leftover
    assert [i.id for i in pantry.list()] == ["b"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sha256", ["model.safetensors"], "has sha256 = \\['model.safetensors'\\]; expected a mapping"),
        ("sha256", {"../../etc/passwd": "00"}, "expected a mapping of weight file name"),
        ("value", "0.9", "has value = '0.9'; expected a number or null"),
        ("step", True, "has step = True; expected an integer"),
        ("size", -1, "has size = -1; expected bytes"),
        ("kind", "lora", "has kind = 'lora'; expected one of 'full', 'adapter'"),
        ("id", "a\nb", "lacks a non-empty printable string 'id'"),
    ],
)
def test_ledger_fields_are_checked(tmp_path, run_folder, field, value, message):
    pantry = Pantry(tmp_path / "pantry")
    pantry.add(run_folder)
    data = json.loads(pantry.ledger.read_text())
    data["ingredients"][0][field] = value
    pantry.ledger.write_text(json.dumps(data))
    with pytest.raises(SoupError, match=message) as caught:
        pantry.list()
    assert "\n" not in str(caught.value)


def test_loose_ingredient(run_folder):
    ingredient = Ingredient.from_folder(run_folder)
    assert ingredient.id == "run" and ingredient.kind == "full" and ingredient.path == str(run_folder)
    adapter = run_folder.parent / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    assert Ingredient.from_folder(adapter).kind == "adapter"
