"""Figures: the numbers behind each plot, and that a non-empty PNG is written."""

import contextlib
import json
import math

import pytest
import torch
from conftest import make_model, make_split, save_model

from hf_soup import SoupError, plots
from hf_soup.checkpoint import CheckpointReader
from hf_soup.ingredient import Ingredient
from hf_soup.kitchen import Kitchen
from hf_soup.scoring import Scorer
from hf_soup.strategies import Tasting


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    base = save_model(make_model("bert", None, num_labels=2), root / "base")
    return base, [
        save_model(make_model("bert", seed, noise=0.05, num_labels=2), root / f"m{seed}") for seed in range(3)
    ]


@pytest.fixture(scope="module")
def splits():
    return {"validation": make_split(40, 10), "shift": make_split(40, 12, shift=True)}


@pytest.fixture(scope="module")
def tasting(folders, splits):
    _, ingredients = folders
    scorer = Scorer(splits, batch_size=40)
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(CheckpointReader(f, label=f.name)) for f in ingredients]
        kitchen = stack.enter_context(Kitchen(ingredients[0], scorer.task))
        yield Tasting([Ingredient.from_folder(f) for f in ingredients], readers, kitchen, scorer, "validation")


def score_of(state, folder, scorer, split):
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(folder).eval()
    model.load_state_dict(state)
    return scorer.score(model, split)


def states(*paths):
    from transformers import BertForSequenceClassification

    return [BertForSequenceClassification.from_pretrained(p).state_dict() for p in paths]


def test_interpolation_endpoints_are_the_ingredients(tasting, folders, tmp_path):
    data = plots.interpolation_curve(tasting, 0, 2, [0.0, 0.5, 1.0], splits=["validation", "shift"])
    assert data["ids"] == ["m0", "m2"] and data["alphas"] == [0.0, 0.5, 1.0]
    for split in ("validation", "shift"):
        assert data["soup"][split][0] == data["ensemble"][split][0] == data["individual"]["m0"][split]
        assert data["soup"][split][-1] == data["ensemble"][split][-1] == data["individual"]["m2"][split]
    a, c = states(folders[1][0], folders[1][2])
    middle = {k: (a[k] + c[k]) / 2 if a[k].is_floating_point() else a[k] for k in a}
    assert data["soup"]["shift"][1] == pytest.approx(score_of(middle, folders[1][0], tasting.scorer, "shift"))
    path = plots.plot_interpolation(data, tmp_path / "interpolation.png")
    assert path.stat().st_size > 1000


def test_landscape_corners_are_the_models(tasting, folders, tmp_path):
    base_folder, ingredients = folders
    with CheckpointReader(base_folder) as base:
        data = plots.landscape(tasting, base, 0, 1, grid=2, span=(0.0, 1.0), split="validation")
    assert data["a"] == data["b"] == [0.0, 1.0]
    base_state, first, second = states(base_folder, ingredients[0], ingredients[1])
    scorer = tasting.scorer
    assert data["scores"][0][0] == score_of(base_state, base_folder, scorer, "validation")
    assert data["scores"][0][1] == score_of(first, base_folder, scorer, "validation")  # a = 1, b = 0: θ₁
    assert data["scores"][1][0] == score_of(second, base_folder, scorer, "validation")  # a = 0, b = 1: θ₂
    far = {k: first[k] + second[k] - base_state[k] if first[k].is_floating_point() else first[k] for k in first}
    assert data["scores"][1][1] == pytest.approx(score_of(far, base_folder, scorer, "validation"))
    floats = [k for k in first if first[k].is_floating_point() and k in tasting.names]
    u = torch.cat([(first[k] - base_state[k]).double().flatten() for k in floats])
    v = torch.cat([(second[k] - base_state[k]).double().flatten() for k in floats])
    assert data["points"]["base"] == [0.0, 0.0]
    assert data["points"]["m0"] == pytest.approx([u.norm().item(), 0.0])
    assert math.dist(data["points"]["m0"], data["points"]["m1"]) == pytest.approx((u - v).norm().item())
    assert plots.plot_landscape(data, tmp_path / "landscape.png").stat().st_size > 1000
    with pytest.raises(SoupError, match="grid ≥ 2"):
        plots.landscape(tasting, None, 0, 1, grid=1)


def test_task_vector_angles_and_pair_gains(tasting, folders, tmp_path):
    base_folder, ingredients = folders
    with CheckpointReader(base_folder) as base:
        data = plots.task_vector_angles(tasting.readers, base, labels=["m0", "m1", "m2"])
    angle, cosine = torch.tensor(data["angle"]), torch.tensor(data["cosine"])
    assert torch.equal(angle, angle.T) and torch.equal(angle.diagonal(), torch.zeros(3))
    assert torch.equal(cosine.diagonal(), torch.ones(3)) and data["reference"] == "base model"
    base_state, *models = states(base_folder, *ingredients)
    names = [k for k in base_state if base_state[k].is_floating_point() and k in tasting.names]
    vectors = [torch.cat([(m[k] - base_state[k]).double().flatten() for k in names]) for m in models]
    expected = torch.nn.functional.cosine_similarity(vectors[0], vectors[2], dim=0).item()
    assert data["cosine"][0][2] == pytest.approx(expected, abs=1e-9)
    assert data["angle"][0][2] == pytest.approx(math.degrees(math.acos(expected)), abs=1e-6)
    assert data["l2"][1][2] == pytest.approx((vectors[1] - vectors[2]).norm().item())
    gains = plots.pair_gains(tasting, split="validation")
    assert [row["pair"] for row in gains["pairs"]] == [["m0", "m1"], ["m0", "m2"], ["m1", "m2"]]
    for row in gains["pairs"]:
        assert row["gain"] == pytest.approx(row["soup"] - row["mean"])
    assert gains["pairs"][0]["soup"] == tasting.taste([0.5, 0.5, 0.0])
    assert plots.plot_angles(data, tmp_path / "angles.png", gains).stat().st_size > 1000


RECORD = {
    "format": 1,
    "method": "greedy",
    "ingredients": [{"id": "a"}, {"id": "b"}, {"id": "c"}],
    "strategy": {
        "name": "greedy",
        "selection_split": "val",
        "chosen": ["b", "a"],
        "evaluations": 5,
        "score": 0.85,
        "trace": [
            {"id": "b", "score": 0.8, "accepted": True},
            {"id": "a", "score": 0.85, "accepted": True},
            {"id": "c", "score": 0.7, "accepted": False},
        ],
    },
    "report": {
        "metric": "accuracy",
        "selection_split": "val",
        "splits": ["val", "test", "shift"],
        "best_individual": "b",
        "individuals": {
            "a": {"val": 0.7, "test": 0.6, "shift": 0.4},
            "b": {"val": 0.8, "test": 0.7, "shift": 0.5},
            "c": {"val": 0.1, "test": 0.2, "shift": 0.3},
        },
        "rows": {
            "best individual": {"val": 0.8, "test": 0.7, "shift": 0.5},
            "greedy": {"val": 0.85, "test": 0.75, "shift": 0.65},
        },
    },
    "task_vectors": {
        "ids": ["a", "b", "c"],
        "reference": "base model",
        "angle": [[0, 80, 90], [80, 0, 85], [90, 85, 0]],
    },
}


def test_report_figures_from_soup_json(tmp_path):
    scores = plots.report_scores(RECORD)
    assert scores["x_split"] == "val" and scores["y_splits"] == ["test", "shift"]
    assert scores["ingredients"]["a"] == pytest.approx([0.7, 0.5])
    assert scores["soups"] == {"greedy": pytest.approx([0.85, 0.7])}  # the best individual is an ingredient point
    assert plots.report_scores(RECORD, x="test", y=["shift"])["soups"]["greedy"] == [0.75, 0.65]
    trace = plots.greedy_trace(RECORD)
    assert trace["soup"] == [0.8, 0.85, 0.85] and trace["accepted"] == [True, True, False]
    assert plots.learned_coefficients(RECORD) is None
    learned = {**RECORD, "strategy": {"name": "learned", "alpha_mean": [0.5, 0.4, 0.1]}}
    assert plots.learned_coefficients(learned) == {"ids": ["a", "b", "c"], "alpha": [0.5, 0.4, 0.1]}
    assert plots.plot_coefficients(plots.learned_coefficients(learned), tmp_path / "c.png").stat().st_size > 1000
    (tmp_path / "soup.json").write_text(json.dumps(RECORD))
    written = plots.draw_report_figures(tmp_path)
    assert [p.name for p in written] == ["figure_scores.png", "figure_trace.png", "figure_angles.png"]
    assert all(p.stat().st_size > 1000 for p in written)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # PNGs written through a rename


def test_cli_plot_report_and_errors(tmp_path, capsys):
    from hf_soup.cli import main

    record = {**RECORD, "format": 1, "recipe": {"source": "<python>", "method": "greedy"}, "notes": [], "files": []}
    record["ingredients"] = [{"id": i, "weight": None, "sha256": {"model.safetensors": "0" * 64}} for i in "abc"]
    (tmp_path / "soup.json").write_text(json.dumps(record))
    assert main(["plot", "report", str(tmp_path)]) == 0
    assert "![Held-out vs. shift" in (tmp_path / "README.md").read_text()
    assert (tmp_path / "figure_trace.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["plot", "report", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("hf-soup: error: ") and True


@pytest.mark.slow
def test_cli_plot_from_a_recipe(folders, splits, tmp_path, capsys):
    from datasets import DatasetDict

    from hf_soup.cli import main

    base, ingredients = folders
    DatasetDict(splits).save_to_disk(str(tmp_path / "data"))
    recipe = tmp_path / "greedy.yaml"
    names = ", ".join(str(f) for f in ingredients)
    recipe.write_text(
        f"method: greedy\ningredients: [{names}]\nbase_model: {base}\noutput: soup\nevaluation:\n"
        "  dataset: {load_from_disk: data}\n  selection_split: validation\n  report_splits: [shift]\n"
    )
    assert main(["cook", str(recipe), "--quiet"]) == 0
    assert main(["plot", "interpolation", str(recipe), "--pair", "m0", "m1", "--steps", "3"]) == 0
    assert main(["plot", "landscape", str(recipe), "--pair", "m0", "m1", "--grid", "3"]) == 0
    assert main(["plot", "angles", str(recipe), "--gains"]) == 0
    soup = tmp_path / "soup"
    for kind in ("interpolation", "landscape", "angles"):
        assert (soup / f"figure_{kind}.png").stat().st_size > 1000
        assert f"](figure_{kind}.png)" in (soup / "README.md").read_text()
    interpolation = json.loads((soup / "figure_interpolation.json").read_text())
    assert interpolation["soup"]["validation"][0] == interpolation["individual"]["m0"]["validation"]
    capsys.readouterr()
    assert main(["plot", "interpolation", str(recipe), "--pair", "m0", "zz"]) == 2
    assert "no ingredient 'zz' in the recipe; its ingredients: m0, m1, m2" in capsys.readouterr().err
