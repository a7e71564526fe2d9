import json

import pytest
import torch
from conftest import state_dict_of

from hf_soup import Pantry
from hf_soup.cli import main


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "cook" in capsys.readouterr().out


def test_cook_writes_soup_and_output_flag_wins(tmp_path, make_ingredients, capsys):
    folders = make_ingredients(2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: uniform\ningredients: [{folders[0].name}, {folders[1].name}]\noutput: from_recipe\n")
    assert main(["cook", str(recipe), "--quiet"]) == 0
    assert (tmp_path / "from_recipe" / "soup.json").is_file()
    out = capsys.readouterr().out
    assert "run0" in out and "0.5" in out and "soup (uniform) written to" in out
    assert main(["cook", str(recipe), "--output", str(tmp_path / "flag"), "--quiet"]) == 0
    assert torch.equal(
        state_dict_of(tmp_path / "flag")["model.norm.weight"],
        state_dict_of(tmp_path / "from_recipe")["model.norm.weight"],
    )


def test_cook_bad_input_is_one_line_exit_2_and_no_output(tmp_path, make_ingredients, capsys):
    folders = make_ingredients(2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: weighted\ningredients: [{folders[0]}, {folders[1]}]\nweights: [1]\noutput: soup\n")
    capsys.readouterr()
    assert main(["cook", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(
        f"hf-soup: error: {recipe}: weights has 1 value(s) for 2 ingredient(s)"
    )
    assert not (tmp_path / "soup").exists()
    recipe.write_text("method: uniform\n")
    assert main(["cook", str(recipe)]) == 2
    assert main(["cook", str(tmp_path / "missing.yaml")]) == 2
    recipe.write_text(f"method: uniform\ningredients: [{folders[0]}]\n")
    assert main(["cook", str(recipe)]) == 2
    assert "no output folder" in capsys.readouterr().err


def test_pantry_list_verify_remove(tmp_path, make_ingredients, capsys):
    folders = make_ingredients(2)
    pantry = Pantry(tmp_path / "pantry")
    pantry.add(folders[0], run="lr1", metric="eval_accuracy", value=0.875, step=10)
    pantry.add(folders[1], run="lr2", metric="eval_accuracy", value=0.9, step=10, link="copy")
    assert main(["pantry", "list", str(pantry.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "run", "metric", "value", "kind", "size"]
    assert lines[2].split()[:5] == ["lr1-10", "lr1", "eval_accuracy", "0.875", "full"]
    assert main(["pantry", "verify", str(pantry.root)]) == 0
    weights = pantry.location("lr2-10") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert main(["pantry", "verify", str(pantry.root)]) == 1
    assert "lr2-10: model.safetensors does not match its sha256" in capsys.readouterr().out
    assert main(["pantry", "remove", str(pantry.root), "lr2-10"]) == 0
    assert [i.id for i in pantry.list()] == ["lr1-10"]
    assert main(["pantry", "list", str(tmp_path / "nothing")]) == 2
    assert "is not a pantry" in capsys.readouterr().err


def test_an_unexpected_file_system_error_is_one_line_exit_2(tmp_path, make_ingredients, monkeypatch, capsys):
    pantry = Pantry(tmp_path / "pantry")
    pantry.add(make_ingredients(1)[0], run="lr1")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self.ledger))

    monkeypatch.setattr(Pantry, "_read", denied)
    capsys.readouterr()
    assert main(["pantry", "list", str(pantry.root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Permission denied" in err and "pantry.json'; check that path" in err


def test_methods_lists_the_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "uniform" in out and "weighted" in out and "weights, normalize=True" in out


def test_soup_json_records_the_recipe(tmp_path, make_ingredients):
    folders = make_ingredients(2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: weighted\ningredients: [{folders[0]}, {folders[1]}]\nweights: [1, 3]\ndtype: bf16\n")
    assert main(["cook", str(recipe), "--output", str(tmp_path / "s"), "--quiet"]) == 0
    record = json.loads((tmp_path / "s" / "soup.json").read_text())
    assert record["recipe"]["weights"] == [1, 3] and record["recipe"]["source"] == str(recipe)
    assert record["dtype"] == "bf16" and record["files"] == ["model.safetensors"]
