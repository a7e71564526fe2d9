"""The model card: written by every cook inside the staging folder, parsed back by huggingface_hub."""

import json
import shutil
import sys

import pytest
from conftest import make_model, make_split, save_model

from hf_soup import SoupBuilder, SoupError
from hf_soup.card import explain_soup, write_card


def cook_greedy(folder):
    """A greedy soup of three tiny BERT classifiers (one of them very noisy), scored on three small splits."""
    folder.mkdir(parents=True, exist_ok=True)
    ingredients = [save_model(make_model("bert", seed, num_labels=2), folder / f"run{seed}") for seed in range(2)]
    ingredients.append(save_model(make_model("bert", 2, noise=1.0, num_labels=2), folder / "noise"))
    splits = {"validation": make_split(48, 10), "test": make_split(48, 11), "shift": make_split(48, 12, shift=True)}
    evaluation = {"splits": splits, "selection_split": "validation", "report_splits": ["test", "shift"]}
    return SoupBuilder(ingredients, method="greedy", evaluation=evaluation).cook(folder / "soup", progress=False)


@pytest.fixture(scope="module")
def greedy_soup(tmp_path_factory):
    return cook_greedy(tmp_path_factory.mktemp("card"))


def test_greedy_cook_writes_a_card_that_parses(greedy_soup):
    from huggingface_hub import ModelCard

    from hf_soup.comparison import markdown

    record = json.loads((greedy_soup.path / "soup.json").read_text())
    card = ModelCard.load(greedy_soup.path / "README.md")
    assert card.data.tags == ["hf_soup", "model-soup", "merge"]
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert card.data.base_model is None  # local folders are not Hub ids
    report = record["report"]
    results = {r.dataset_split: r.metric_value for r in card.data.eval_results}
    assert results == {split: round(report["rows"]["greedy"][split], 4) for split in report["splits"]}
    assert {r.metric_type for r in card.data.eval_results} == {"accuracy"}
    assert card.data.model_name == "soup"  # the final folder's name, not the staging folder's
    body = card.text
    assert markdown(report) in body
    kept = {step["id"]: step["accepted"] for step in record["strategy"]["trace"]}
    for ingredient in record["ingredients"]:
        decision = "accepted" if kept[ingredient["id"]] else "rejected"
        assert (
            f"| {ingredient['id']} | - | - | - | {decision} | `{next(iter(ingredient['sha256'].values()))[:12]}` |"
            in body
        )
    for n, step in enumerate(record["strategy"]["trace"]):
        assert f"| {n} | {step['id']} | {step['score']:.4f} |" in body
    assert "hf-soup cook recipe.yaml --output soup" in body and "<given from Python>" in body
    for name in ("figure_scores.png", "figure_trace.png", "figure_angles.png"):
        assert (greedy_soup.path / name).stat().st_size > 1000
        assert f"]({name})" in body
    assert not list(greedy_soup.path.parent.glob(".hf_soup-staging-*"))


def test_card_numbers_are_rounded_for_people_and_soup_json_keeps_them_exact(greedy_soup):
    """The card's YAML `model-index` and its results table show scores to 4 decimals, the same values; soup.json
    keeps the exact ones."""
    import re

    import yaml

    record = json.loads((greedy_soup.path / "soup.json").read_text())
    report = record["report"]
    text = (greedy_soup.path / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    shown = {
        result["dataset"]["split"]: metric["value"]
        for entry in metadata["model-index"]
        for result in entry["results"]
        for metric in result["metrics"]
    }
    table = {}
    header = next(line for line in text.splitlines() if line.startswith(f"| {report['metric']} |"))
    splits = [cell.strip().removesuffix(" (selection)") for cell in header.strip("|").split("|")[1:]]
    row = next(line for line in text.splitlines() if line.startswith("| greedy |"))
    table = dict(zip(splits, (cell.strip() for cell in row.strip("|").split("|")[1:])))
    exact = report["rows"]["greedy"]
    assert set(shown) == set(table) == set(exact) == set(report["splits"])
    for split, value in shown.items():
        assert re.fullmatch(r"-?\d+(\.\d{1,4})?", str(value)), f"{split}: {value} is not rounded to 4 decimals"
        assert value == round(exact[split], 4) == float(table[split])
        assert re.fullmatch(r"-?\d+\.\d{4}", table[split])
    assert any(len(repr(value)) > 8 for value in exact.values())  # the exact scores are float32 sums: long


def test_same_named_folders_get_distinct_names_in_soup_json_trace_and_card(trained, tmp_path):
    """Runs saved as a/ft_00, b/ft_00, c/ft_00: each keeps its own name (the shortest path suffix that tells them
    apart) in soup.json, the greedy trace and the card, and the card gives each its own decision."""
    from conftest import perturbed

    splits = {"validation": make_split(48, 10), "test": make_split(48, 11)}
    scales = {"a": 0.005, "b": 0.005, "c": 1.0}  # c is a broken run: greedy leaves it out
    folders = [perturbed(trained, tmp_path / n / "ft_00", seed, s) for seed, (n, s) in enumerate(scales.items())]
    evaluation = {"splits": splits, "selection_split": "validation", "report_splits": ["test"]}
    soup = SoupBuilder(folders, method="greedy", evaluation=evaluation).cook(tmp_path / "soup", progress=False)
    record = json.loads((soup.path / "soup.json").read_text())
    names = ["a/ft_00", "b/ft_00", "c/ft_00"]
    assert [i["id"] for i in record["ingredients"]] == names
    assert sorted(step["id"] for step in record["strategy"]["trace"]) == names
    assert sorted(record["report"]["individuals"]) == names
    decisions = {step["id"]: step["accepted"] for step in record["strategy"]["trace"]}
    assert not decisions["c/ft_00"] and decisions["a/ft_00"] != decisions["c/ft_00"]  # the noisy run is left out
    body = (soup.path / "README.md").read_text()
    for name in names:
        decision = "accepted" if decisions[name] else "rejected"
        assert sum(line.startswith(f"| {name} | - | - | - | {decision} |") for line in body.splitlines()) == 1
    assert "| ft_00 |" not in body


def test_card_of_a_recipe_names_the_command_and_base_model(tmp_path, make_ingredients):
    from huggingface_hub import ModelCard

    from hf_soup import Pantry
    from hf_soup.cli import main

    pantry = Pantry(tmp_path / "pantry")
    for n, folder in enumerate(make_ingredients(2)):
        pantry.add(
            folder,
            run=f"lr{n}",
            metric="eval_loss",
            value=1.5 - n,
            split="validation",
            step=1,
            hyperparameters={"learning_rate": 10.0 ** -(n + 4)},
            base_model="org/tiny-llama",
        )
    recipe = tmp_path / "uniform.yaml"
    recipe.write_text("method: weighted\nweights: [0.75, 0.25]\npantry: pantry\noutput: soups/weighted\n")
    assert main(["cook", str(recipe), "--quiet"]) == 0
    folder = tmp_path / "soups" / "weighted"
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "org/tiny-llama" and card.data.eval_results is None
    assert f"hf-soup cook {recipe} --output weighted" in card.text
    assert "| lr0-1 | lr0 | learning_rate=0.0001 | eval_loss = 1.5 (validation) | 0.75 |" in card.text
    assert "## Figures" not in card.text and not list(folder.glob("*.png"))  # data-free: nothing to draw


def test_without_matplotlib_the_card_says_figures_were_skipped(greedy_soup, tmp_path, monkeypatch):
    folder = tmp_path / "soup"
    shutil.copytree(greedy_soup.path, folder)
    for png in folder.glob("*.png"):
        png.unlink()
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    explain_soup(folder)  # what the builder calls: it must not fail
    text = (folder / "README.md").read_text()
    assert "Figures were skipped: matplotlib is not installed" in text and "pip install 'hf_soup[plots]'" in text
    assert not list(folder.glob("*.png"))


def test_write_card_is_atomic_and_names_the_repository(greedy_soup, tmp_path):
    from huggingface_hub import ModelCard

    folder = tmp_path / "soup"
    shutil.copytree(greedy_soup.path, folder)
    path = write_card(folder, repo_id="me/bert-soup")
    assert ModelCard.load(path).data.model_name == "bert-soup"
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_adapter_soups_get_a_card_too(tmp_path):
    import torch
    from huggingface_hub import ModelCard
    from peft import LoraConfig, get_peft_model

    make_model("llama", None).save_pretrained(tmp_path / "base")
    adapters = []
    for seed in range(2):
        torch.manual_seed(seed)
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(make_model("llama", None), config).save_pretrained(tmp_path / f"a{seed}")
        adapters.append(tmp_path / f"a{seed}")
    soup = SoupBuilder(adapters, method="uniform").cook(tmp_path / "soup", progress=False)
    card = ModelCard.load(soup.path / "README.md")
    assert card.data.library_name == "peft" and "fine-tuned adapters" in card.text
    with pytest.raises(SoupError, match="would split the adapter into several files"):
        soup.save_pretrained(tmp_path / "split", max_shard_size=1000)
    copy = soup.save_pretrained(tmp_path / "copy")
    assert (copy.path / "adapter_model.safetensors").is_file() and (copy.path / "README.md").is_file()
