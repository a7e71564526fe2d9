"""Greedy and learned soups, ensembles and the report, on a tiny BERT trained so the answers are known."""

import json
import logging

import pytest
import torch
from conftest import evaluation, launched, perturbed

from hf_soup import Pantry, SoupBuilder, SoupError
from hf_soup.kitchen import Kitchen
from hf_soup.scoring import Scorer
from hf_soup.tasks import get_task


def test_greedy_rejects_the_noise_ingredient_and_reports(ingredients, splits, tmp_path):
    from transformers import BertForSequenceClassification

    builder = SoupBuilder(ingredients, method="greedy", evaluation=evaluation(splits))
    soup = builder.cook(tmp_path / "soup", progress=False)
    strategy = soup.record["strategy"]
    assert strategy["chosen"] == ["good_a", "good_b"] or strategy["chosen"] == ["good_b", "good_a"]
    noise = [step for step in strategy["trace"] if step["id"] == "noise"]
    assert noise == [{"id": "noise", "score": noise[0]["score"], "accepted": False, "soup_size": 3}]
    assert noise[0]["score"] < strategy["score"]
    assert strategy["evaluations"] == 2 * 3 - 1  # k individual scores + k - 1 candidates
    weights = {i["id"]: i["weight"] for i in soup.record["ingredients"]}
    assert weights == {"good_a": 0.5, "good_b": 0.5, "noise": 0.0}
    report = soup.record["report"]
    assert set(report["rows"]) == {"best individual", "uniform", "greedy", "ensemble", "greedy ensemble"}
    assert report["splits"] == ["validation", "test", "shift"]
    assert report["rows"]["greedy"]["validation"] == pytest.approx(strategy["score"])
    assert report["rows"]["uniform"]["validation"] < report["rows"]["greedy"]["validation"]
    # the written soup is the greedy soup that was scored
    model = BertForSequenceClassification.from_pretrained(soup.path)
    scorer = Scorer(splits)
    assert scorer.score(model, "validation") == pytest.approx(strategy["score"])
    assert json.loads((soup.path / "soup.json").read_text())["strategy"]["kept"] == strategy["kept"]


def test_tastings_declare_what_they_can_do_and_strategies_what_they_need():
    """Checked against each other before a strategy runs (`Tasting.require`): adapters cannot `apply` a method."""
    from hf_soup.adapters.tasting import AdapterTasting
    from hf_soup.strategies import Tasting, get_strategy

    assert Tasting.capabilities == {"mix", "backward", "apply"}
    assert AdapterTasting.capabilities == {"mix", "backward"} and set(AdapterTasting.lacking) == {"apply"}
    search = get_strategy("search")
    assert set(search.capabilities_needed({"merge": "weighted"})) == {"mix"}
    assert search.capabilities_needed({"merge": "slerp"})["apply"] == "method 'slerp' is not a linear combination"
    assert set(get_strategy("greedy").capabilities_needed({})) == {"mix"}
    assert set(get_strategy("learned").capabilities_needed({})) == {"mix", "backward"}


def test_ties_follow_the_rule(trained, splits, tmp_path):
    import shutil

    good = perturbed(trained, tmp_path / "good", 1, 0.005)
    twin = tmp_path / "twin"
    shutil.copytree(good, twin)  # identical weights: adding it leaves the score equal
    paths = [good, twin]
    loose = SoupBuilder(paths, method="greedy", evaluation=evaluation(splits)).cook(tmp_path / "ge", progress=False)
    strict = SoupBuilder(paths, method="greedy", rule=">", evaluation=evaluation(splits)).cook(
        tmp_path / "gt", progress=False
    )
    assert loose.record["strategy"]["chosen"] == ["good", "twin"]  # ≥ keeps an equal score (the paper's rule)
    assert strict.record["strategy"]["chosen"] == ["good"]
    assert [step["accepted"] for step in strict.record["strategy"]["trace"]] == [True, False]


def test_recorded_pantry_scores_save_evaluations(ingredients, splits, tmp_path):
    from transformers import BertForSequenceClassification

    scorer = Scorer(splits)
    pantry = Pantry(tmp_path / "pantry")
    for folder in ingredients:
        value = scorer.score(BertForSequenceClassification.from_pretrained(folder), "validation")
        pantry.add(folder, run=folder.name, metric="eval_accuracy", value=value, split="validation", step=1)
    soup = SoupBuilder(pantry=str(pantry.root), method="greedy", evaluation=evaluation(splits)).cook(
        tmp_path / "soup", progress=False
    )
    strategy = soup.record["strategy"]
    assert strategy["evaluations"] == 3 - 1  # only the candidates are evaluated
    assert sorted(strategy["recorded_scores_used"]) == ["good_a-1", "good_b-1", "noise-1"]
    assert "noise-1" not in strategy["chosen"]


def test_random_order_is_seeded(ingredients, splits, tmp_path):
    def order(seed, name):
        soup = SoupBuilder(ingredients, method="greedy", order="random", seed=seed, evaluation=evaluation(splits))
        return [step["id"] for step in soup.cook(tmp_path / name, progress=False).record["strategy"]["trace"]]

    assert order(0, "a") == order(0, "b")
    assert sorted(order(0, "c")) == ["good_a", "good_b", "noise"]


def test_learned_coefficients_move_to_the_good_ingredients(ingredients, splits, tmp_path):
    builder = SoupBuilder(
        ingredients, method="learned", granularity="global", batch_size=16, evaluation=evaluation(splits, compare=[])
    )
    soup = builder.cook(tmp_path / "soup", progress=False)
    alpha = soup.record["strategy"]["alpha"]
    assert alpha[2] < 1 / 3 - 0.05  # the noise ingredient loses weight
    assert alpha[0] + alpha[1] > 2 / 3 + 0.05
    losses = soup.record["strategy"]["loss_per_epoch"]
    assert losses[-1] < losses[0]
    assert [i["weight"] for i in soup.record["ingredients"]] == pytest.approx(alpha)


def test_learned_by_layer_writes_per_tensor_weights(ingredients, splits, tmp_path):
    from transformers import BertForSequenceClassification

    soup = SoupBuilder(ingredients, method="learned", epochs=1, evaluation=evaluation(splits, compare=[])).cook(
        tmp_path / "soup", progress=False
    )
    alpha = soup.record["strategy"]["alpha"]
    name = "classifier.weight"
    states = [BertForSequenceClassification.from_pretrained(f).state_dict()[name] for f in ingredients]
    expected = sum(w * s for w, s in zip(alpha[name], states))
    got = BertForSequenceClassification.from_pretrained(soup.path).state_dict()[name]
    assert torch.allclose(got, expected, atol=1e-6)
    assert len({tuple(v) for v in alpha.values()}) > 1  # coefficients differ by tensor


def test_offloaded_resident_model_gives_the_same_scores(ingredients, splits, tmp_path):
    plain = SoupBuilder(ingredients, method="greedy", evaluation=evaluation(splits, compare=[]))
    offloaded = SoupBuilder(
        ingredients,
        method="greedy",
        evaluation=evaluation(splits, compare=[], max_memory={"cpu": 60_000}, offload_folder=str(tmp_path / "off")),
    )
    a = plain.cook(tmp_path / "a", progress=False).record["strategy"]["trace"]
    b = offloaded.cook(tmp_path / "b", progress=False).record["strategy"]["trace"]
    assert a == b
    assert not list((tmp_path / "off").iterdir())  # the kitchen removed its offload files


def test_kitchen_offload_splits_the_model(ingredients):
    kitchen = Kitchen(ingredients[0], get_task("sequence-classification"), max_memory={"cpu": 60_000})
    try:
        assert kitchen.offloaded and {"cpu", "disk"} <= set(kitchen.device_map.values())
    finally:
        kitchen.close()


def test_resident_model_equals_from_pretrained(ingredients, splits):
    from transformers import BertForSequenceClassification

    from hf_soup.checkpoint import CheckpointReader

    with (
        Kitchen(ingredients[0], get_task("sequence-classification")) as kitchen,
        CheckpointReader(ingredients[1]) as reader,
    ):
        kitchen.load((name, reader.get(name)) for name in reader.names())
        reference = BertForSequenceClassification.from_pretrained(ingredients[1]).eval()
        for name, tensor in reference.state_dict().items():
            assert torch.equal(kitchen.model.state_dict()[name], tensor), name
        scorer = Scorer(splits)
        assert scorer.score(kitchen.model, "test") == scorer.score(reference, "test")


def test_selecting_on_a_reported_split_warns(ingredients, splits, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        SoupBuilder(
            ingredients[:2],
            method="greedy",
            evaluation={"splits": splits, "selection_split": "test", "report_splits": ["test"], "compare": []},
        ).cook(tmp_path / "soup", progress=False)
    assert "SELECTING ON A REPORTED SPLIT" in caplog.text


def test_evaluation_errors(ingredients, splits, tmp_path):
    with pytest.raises(SoupError, match="add an `evaluation:` section"):
        SoupBuilder(ingredients, method="greedy")
    with pytest.raises(SoupError, match="evaluation split 'dev' does not exist; the dataset has: validation, test"):
        SoupBuilder(ingredients, method="greedy", evaluation={"splits": splits, "selection_split": "dev"}).cook(
            tmp_path / "soup", progress=False
        )
    with pytest.raises(SoupError, match="unknown key 'selection'"):
        SoupBuilder(ingredients, method="greedy", evaluation={"splits": splits, "selection": "validation"})
    bad = {k: v.rename_column("label", "y") for k, v in splits.items()}
    with pytest.raises(SoupError, match="no label column 'label'"):
        SoupBuilder(ingredients, method="greedy", evaluation=evaluation(bad)).cook(tmp_path / "soup", progress=False)
    with pytest.raises(SoupError, match="metric 'no_such_metric' is not built in"):
        SoupBuilder(ingredients, method="greedy", evaluation=evaluation(splits, metric="no_such_metric")).cook(
            tmp_path / "soup", progress=False
        )
    with pytest.raises(SoupError, match="unknown key 'rules'.*parameters of strategy 'greedy': rule, order, alpha$"):
        SoupBuilder(ingredients, method="greedy", rules=">", evaluation=evaluation(splits)).cook(
            tmp_path / "soup", progress=False
        )
    assert not (tmp_path / "soup").exists()


def test_compute_metrics_callable_and_ensembles(ingredients, splits, tmp_path):
    import numpy as np

    def compute_metrics(prediction):
        predicted = np.argmax(prediction.predictions, axis=-1)
        return {"error_rate": float((predicted != prediction.label_ids).mean())}

    soup = SoupBuilder(
        ingredients, method="greedy", evaluation=evaluation(splits, metric=compute_metrics, greater_is_better=False)
    ).cook(tmp_path / "soup", progress=False)
    report = soup.record["report"]
    assert report["metric"] == "compute_metrics" and report["greater_is_better"] is False
    accuracy = Scorer(splits)
    rows = soup.record["report"]["rows"]
    assert rows["greedy"]["validation"] <= rows["uniform"]["validation"]
    assert report["greedy_ensemble"][0] in ("good_a", "good_b")
    assert 0 <= rows["ensemble"]["test"] <= 1 and accuracy.metric.greater_is_better


def test_two_process_launch_gives_the_same_trace(ingredients, splits, tmp_path):
    from pathlib import Path

    from datasets import DatasetDict

    DatasetDict(splits).save_to_disk(str(tmp_path / "data"))
    script = Path(__file__).parent / "scripts_strategies" / "greedy_launch.py"
    arguments = [str(script), "--ingredients", *map(str, ingredients), "--data", str(tmp_path / "data")]
    one, two = launched(arguments, tmp_path)
    assert [r["world_size"] for r in two] == [2, 2]
    for result in two:
        assert result["trace"] == one["trace"]
        assert result["report"] == one["report"]
    assert (tmp_path / "two" / "soup.json").is_file()  # written once, by the main process
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf_soup-staging")] == []


def test_cli_cooks_a_greedy_recipe_and_prints_the_table(ingredients, splits, tmp_path, capsys):
    from datasets import DatasetDict

    from hf_soup.cli import main

    DatasetDict(splits).save_to_disk(str(tmp_path / "data"))
    recipe = tmp_path / "greedy.yaml"
    names = ", ".join(folder.name for folder in ingredients)
    recipe.write_text(
        f"method: greedy\ningredients: [{names}]\noutput: soup\nevaluation:\n"
        "  dataset: {load_from_disk: data}\n  selection_split: validation\n  report_splits: [test, shift]\n"
    )
    capsys.readouterr()
    assert main(["cook", str(recipe), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "greedy soup: 2 of 3 ingredients, 5 evaluations on 'validation'" in out
    assert "| accuracy | validation (selection) | test | shift |" in out
    for row in ("best individual", "uniform", "greedy", "ensemble", "greedy ensemble"):
        assert f"| {row} |" in out
    assert (tmp_path / "soup" / "model.safetensors").is_file()


def test_task_vector_geometry_of_a_cook_does_not_grow_with_k(make_ingredients, monkeypatch):
    """A strategy cook records the task-vector geometry: its float64 chunks, all ingredients together, stay within
    CHUNK elements whatever k (k × CHUNK grew by ~100 MB per ingredient: more than a MiniLM model each)."""
    import hf_soup.inspection as inspection
    from hf_soup.checkpoint import CheckpointReader

    folders = make_ingredients(8, kind="bert", vocab_size=4096)  # word embeddings: 131072 elements
    monkeypatch.setattr(inspection, "CHUNK", 1 << 15)
    stack, sizes = torch.stack, []

    def spy(tensors, *args, **kwargs):
        out = stack(tensors, *args, **kwargs)
        sizes.append(out.numel())
        return out

    results = {}
    for k in (2, 8):
        readers = [CheckpointReader(folder) for folder in folders[:k]]
        sizes.clear()
        monkeypatch.setattr(inspection.torch, "stack", spy)
        results[k] = inspection.task_vector_geometry(readers)
        monkeypatch.setattr(inspection.torch, "stack", stack)
        assert max(sizes) <= inspection.CHUNK
        monkeypatch.setattr(inspection, "CHUNK", 1 << 30)  # one chunk per tensor: the same geometry
        whole = inspection.task_vector_geometry(readers)
        monkeypatch.setattr(inspection, "CHUNK", 1 << 15)
        assert torch.allclose(torch.tensor(results[k].gram), torch.tensor(whole.gram), rtol=1e-9, atol=1e-12)
