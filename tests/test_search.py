"""The search strategy and α-blend greedy, on the tiny trained BERT of conftest where the best parameters are known."""

import json

import pytest
import torch
from conftest import evaluation, launched, perturbed, save_model, state_dict_of

from hf_soup import SoupBuilder, SoupError
from hf_soup.schedules import depth, layer_count
from hf_soup.scoring import Scorer


def cook(paths, splits, output, **options):
    options.setdefault("evaluation", evaluation(splits, compare=["uniform"]))
    return SoupBuilder([str(p) for p in paths], method="search", **options).cook(output, progress=False)


def scored(soup, splits) -> float:
    from transformers import BertForSequenceClassification

    return Scorer(splits).score(BertForSequenceClassification.from_pretrained(soup.path), "validation")


def test_weight_search_puts_the_weight_on_the_good_ingredient(trained, splits, tmp_path):
    paths = [perturbed(trained, tmp_path / "noise", 3, 1.0), perturbed(trained, tmp_path / "good", 1, 0.005)]
    soup = cook(
        paths,
        splits,
        tmp_path / "soup",
        merge="weighted",
        space={"weights": {"low": 0.0, "high": 1.0}},
        sampler="random",
        trials=12,
    )
    strategy = soup.record["strategy"]
    assert [d["name"] for d in strategy["space"]] == ["weights[0]", "weights[1]"]
    assert len(strategy["history"]) == 12 and strategy["evaluations"] == 12  # one per trial, nothing else
    weights = {i["id"]: i["weight"] for i in soup.record["ingredients"]}
    assert weights["good"] > 0.8 and weights["noise"] < 0.2 and sum(weights.values()) == pytest.approx(1.0)
    best = max(row["score"] for row in strategy["history"])
    assert strategy["score"] == best == scored(soup, splits)  # the written soup is the best trial's soup
    assert soup.record["report"]["rows"]["search"]["validation"] == pytest.approx(best)
    assert soup.record["method"] == "search" and soup.record["strategy"]["merge"] == "weighted"
    assert (tmp_path / "soup.study.log").is_file() and (soup.path / "figure_search.png").is_file()


def test_slerp_t_finds_the_midpoint_of_a_constructed_pair(trained, splits, tmp_path):
    """θ₀ ± δ with a large δ: either end is broken, the midpoint is the trained model."""
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(trained)
    generator = torch.Generator().manual_seed(5)
    delta = {n: torch.randn(p.shape, generator=generator) * 0.5 for n, p in model.named_parameters()}
    for sign, name in ((1, "plus"), (-1, "minus")):
        copy = BertForSequenceClassification.from_pretrained(trained)
        with torch.no_grad():
            for n, p in copy.named_parameters():
                p.add_(delta[n] * sign)
        save_model(copy, tmp_path / name)
    soup = cook(
        [tmp_path / "plus", tmp_path / "minus"],
        splits,
        tmp_path / "soup",
        merge="slerp",
        space={"t": {"low": 0.0, "high": 1.0}},
        sampler="grid",
        grid_points=5,
        trials=50,
    )
    strategy = soup.record["strategy"]
    assert len(strategy["history"]) == 5  # the budget stops at the grid's size
    assert sorted(row["parameters"]["t"] for row in strategy["history"]) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert strategy["best_parameters"] == {"t": 0.5}
    ends = [row["score"] for row in strategy["history"] if row["parameters"]["t"] in (0.0, 1.0)]
    assert strategy["score"] > max(ends) + 0.2


def test_task_arithmetic_scale_needs_the_base_and_finds_one(trained, splits, tmp_path):
    base = perturbed(trained, tmp_path / "base", 7, 0.3)
    paths = [perturbed(trained, tmp_path / f"ft{i}", i, 0.002) for i in (1, 2)]
    space = {"scale": {"low": 0.0, "high": 1.5, "step": 0.5}}
    with pytest.raises(SoupError, match="method 'task_arithmetic' needs `base_model:`"):
        SoupBuilder(
            [str(p) for p in paths],
            method="search",
            merge="task_arithmetic",
            space=space,
            evaluation=evaluation(splits),
        )
    soup = cook(
        paths,
        splits,
        tmp_path / "soup",
        merge="task_arithmetic",
        space=space,
        fixed={"weights": [0.5, 0.5]},
        sampler="grid",
        base_model=str(base),
    )
    strategy = soup.record["strategy"]
    assert sorted(row["parameters"]["scale"] for row in strategy["history"]) == [0.0, 0.5, 1.0, 1.5]
    assert strategy["best_parameters"] == {"scale": 1.0}
    assert soup.record["parameters"]["merge"] == "task_arithmetic"
    assert strategy["score"] == scored(soup, splits)  # written with the base, like the candidate that was scored


def test_layer_groups_find_which_ingredient_is_good_where(trained, splits, tmp_path):
    """Ingredient A holds the trained weights in the first half of the layers and noise in the second, B the other
    way round: only one value of t per layer group (t@0 = 0, t@1 = 1) gives back the trained model."""
    from safetensors.torch import save_file

    weights = state_dict_of(trained)
    names = list(weights)
    layers = layer_count(names)
    generator = torch.Generator().manual_seed(9)
    noise = {n: t + torch.randn(t.shape, generator=generator) * 1.0 for n, t in weights.items()}
    for label, first in (("a", weights), ("b", noise)):
        folder = save_model_like(trained, tmp_path / label)
        second = noise if first is weights else weights
        mixed = {n: (first if min(int(depth(n, layers) * 2), 1) == 0 else second)[n].contiguous() for n in names}
        save_file(mixed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    soup = cook(
        [tmp_path / "a", tmp_path / "b"],
        splits,
        tmp_path / "soup",
        merge="slerp",
        space={"t": {"low": 0.0, "high": 1.0, "groups": 2}},
        sampler="grid",
        grid_points=3,
    )
    strategy = soup.record["strategy"]
    assert [d["name"] for d in strategy["space"]] == ["t@0", "t@1"]
    assert len(strategy["history"]) == 9
    assert strategy["best_parameters"] == {"t@0": 0.0, "t@1": 1.0}
    written = strategy["written_parameters"]
    assert written["bert.embeddings.word_embeddings.weight"]["t"] == 0.0
    assert written["classifier.weight"]["t"] == 1.0
    assert torch.equal(
        state_dict_of(soup.path)["bert.encoder.layer.0.output.dense.weight"],
        weights["bert.encoder.layer.0.output.dense.weight"],
    )


def save_model_like(trained, folder):
    import shutil

    shutil.copytree(trained, folder)
    return folder


def test_a_study_resumes_from_its_storage_without_repeating_trials(ingredients, splits, tmp_path):
    options = dict(merge="weighted", space={"weights": {"low": 0.0, "high": 1.0}}, sampler="random")
    first = cook(ingredients, splits, tmp_path / "soup", trials=4, **options)
    second = SoupBuilder(
        [str(p) for p in ingredients], method="search", trials=6, evaluation=evaluation(splits, compare=[]), **options
    ).cook(tmp_path / "soup", progress=False, overwrite=True)
    one, two = first.record["strategy"], second.record["strategy"]
    assert one["new_trials"] == 4 and two["resumed_trials"] == 4 and two["new_trials"] == 2
    assert two["evaluations"] == 2
    assert two["history"][:4] == one["history"]
    assert [row["trial"] for row in two["history"]] == list(range(6))
    # a changed space is another study in the same file: it starts afresh
    third = SoupBuilder(
        [str(p) for p in ingredients],
        method="search",
        trials=2,
        evaluation=evaluation(splits, compare=[]),
        **{**options, "space": {"weights": {"low": 0.1, "high": 1.0}}},
    ).cook(tmp_path / "soup", progress=False, overwrite=True)
    assert third.record["strategy"]["resumed_trials"] == 0 and third.record["strategy"]["study"] != two["study"]


def test_a_trial_left_running_by_a_killed_cook_is_marked_and_not_counted(ingredients, splits, tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    options = dict(merge="weighted", space={"weights": {"low": 0.0, "high": 1.0}}, sampler="random")
    options["evaluation"] = evaluation(splits, compare=[])
    first = cook(ingredients, splits, tmp_path / "soup", trials=2, **options)
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "soup.study.log")))
    optuna.load_study(study_name=first.record["strategy"]["study"], storage=storage).ask()  # a kill mid-trial
    again = SoupBuilder([str(p) for p in ingredients], method="search", trials=3, **options).cook(
        tmp_path / "soup", progress=False, overwrite=True
    )
    strategy = again.record["strategy"]
    assert strategy["resumed_trials"] == 2 and strategy["new_trials"] == 1
    assert [row["state"] for row in strategy["history"]] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    assert strategy["history"][2]["error"].startswith("interrupted")


def test_an_interrupted_last_grid_point_is_marked_without_stopping_the_study(ingredients, splits, tmp_path):
    """The grid sampler stops its study once every grid point is finished, which Optuna refuses outside `optimize`:
    marking the last grid point, left running by a killed cook, must not go through it."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    options = dict(merge="slerp", space={"t": {"choices": [0.0, 1.0]}}, sampler="grid")
    options["evaluation"] = evaluation(splits, compare=[])
    first = cook(ingredients[:2], splits, tmp_path / "soup", trials=1, **options)
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "soup.study.log")))
    grid = optuna.samplers.GridSampler({"t": [0.0, 1.0]}, seed=0)
    optuna.load_study(study_name=first.record["strategy"]["study"], storage=storage, sampler=grid).ask()  # a kill
    again = SoupBuilder([str(p) for p in ingredients[:2]], method="search", trials=2, **options).cook(
        tmp_path / "soup", progress=False, overwrite=True
    )
    strategy = again.record["strategy"]
    assert strategy["resumed_trials"] == 1
    assert [row["state"] for row in strategy["history"][:2]] == ["COMPLETE", "FAIL"]
    assert strategy["history"][1]["error"].startswith("interrupted")


@pytest.mark.parametrize("sampler", ["random", "grid", "tpe", "cmaes"])
def test_samplers_are_deterministic_given_the_seed(ingredients, splits, tmp_path, sampler):
    options = dict(
        merge="weighted",
        space={"weights": {"low": 0.0, "high": 1.0}},
        sampler=sampler,
        trials=4,
        evaluation=evaluation(splits, compare=[]),
    )
    runs = [
        cook(ingredients, splits, tmp_path / name, seed=seed, **options)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    proposals = [[row["parameters"] for row in soup.record["strategy"]["history"]] for soup in runs]
    assert proposals[0] == proposals[1]
    assert proposals[0] != proposals[2]
    assert [row["score"] for row in runs[0].record["strategy"]["history"]] == [
        row["score"] for row in runs[1].record["strategy"]["history"]
    ]


def test_alpha_blend_greedy_rejects_the_noise_ingredient(ingredients, splits, tmp_path):
    soup = SoupBuilder(
        [str(p) for p in ingredients], method="greedy", alpha=[0.25, 0.5], evaluation=evaluation(splits)
    ).cook(tmp_path / "soup", progress=False)
    strategy = soup.record["strategy"]
    trace = {step["id"]: step for step in strategy["trace"]}
    assert trace["noise"]["accepted"] is False and trace["noise"]["score"] < strategy["score"]
    assert [t["alpha"] for t in trace["noise"]["tried"]] == [0.25, 0.5]
    assert "noise" not in strategy["kept"] and trace["noise"]["alpha"] in (0.25, 0.5)
    weights = {i["id"]: i["weight"] for i in soup.record["ingredients"]}
    assert weights["noise"] == 0.0 and sum(weights.values()) == pytest.approx(1.0)
    assert strategy["evaluations"] == 3 + 2 * 2  # k individual scores + 2 candidates × 2 values of α
    assert scored(soup, splits) == strategy["score"]
    if len(strategy["kept"]) == 2:  # the second good run was blended in with its α
        second = next(step for step in strategy["trace"][1:] if step["accepted"])
        assert weights[second["id"]] == pytest.approx(second["alpha"])


def test_fixed_alpha_blend_is_the_running_mixture(trained, splits, tmp_path):
    """Three copies of one model: every candidate is accepted (equal scores), and with α = 0.5 the coefficients
    are 1/4, 1/4, 1/2 — the blend θ ← (1 − α)θ + αθᵢ applied twice."""
    import shutil

    good = perturbed(trained, tmp_path / "g0", 1, 0.005)
    for name in ("g1", "g2"):
        shutil.copytree(good, tmp_path / name)
    soup = SoupBuilder(
        [str(tmp_path / n) for n in ("g0", "g1", "g2")], method="greedy", alpha=0.5, evaluation=evaluation(splits)
    ).cook(tmp_path / "soup", progress=False)
    assert soup.record["strategy"]["coefficients"] == {"g0": 0.25, "g1": 0.25, "g2": 0.5}
    assert [step["alpha"] for step in soup.record["strategy"]["trace"]] == [1.0, 0.5, 0.5]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"merge": "nope", "space": {"t": {"low": 0, "high": 1}}}, "unknown method 'nope'"),
        ({"merge": "slerp", "space": {"tt": {"low": 0, "high": 1}}}, "'tt' is not a parameter of method 'slerp'"),
        ({"merge": "slerp", "space": {"t": {"low": 1, "high": 0}}}, "must have low < high"),
        ({"merge": "slerp", "space": {"t": {"low": 0, "high": 2}}}, "t must be in \\[0, 1\\]"),
        ({"merge": "slerp", "space": {"t": 0.5}}, "put parameters that are not searched under `fixed:`"),
        ({"merge": "slerp", "space": {"t": {"low": 0, "high": 1, "groups": 0}}}, "groups must be a positive"),
        ({"merge": "slerp", "space": {"t": {"low": 0, "high": 1, "size": 3}}}, "unknown key 'size'"),
        ({"merge": "slerp", "space": {"t": {"choices": []}}}, "choices must be a non-empty list"),
        ({"merge": "slerp", "space": {}}, "`space:` must map parameters"),
        (
            {"merge": "slerp", "space": {"t": {"low": 0, "high": 1}}, "fixed": {"t": 0.5}},
            "both searched .* and fixed",
        ),
        ({"merge": "slerp", "space": {"t": {"low": 0, "high": 1}}, "sampler": "bayes"}, "sampler must be one of"),
        ({"merge": "slerp", "space": {"t": {"low": 0, "high": 1}}, "trials": 0}, "trials must be ≥ 1"),
        ({"merge": "fisher", "space": {"weights": {"low": 0, "high": 1}}}, "'fisher' cannot be searched"),
        ({"merge": "weighted", "space": {"weights": {"low": -1, "high": 1}}}, "must not be negative"),
    ],
)
def test_bad_search_recipes_are_refused_before_any_tensor_is_read(ingredients, tmp_path, splits, options, message):
    paths = [str(p) for p in ingredients[:2]]
    with pytest.raises(SoupError, match=message):
        SoupBuilder(paths, method="search", evaluation=evaluation(splits), **options).cook(tmp_path / "soup")
    assert not (tmp_path / "soup").exists()


def test_bad_greedy_alpha_is_refused(ingredients, tmp_path, splits):
    paths = [str(p) for p in ingredients]
    for alpha in (0.0, 1.5, [], [0.5, -0.1]):
        with pytest.raises(SoupError, match="alpha must be a number in \\(0, 1\\]"):
            SoupBuilder(paths, method="greedy", alpha=alpha, evaluation=evaluation(splits)).cook(tmp_path / "s")


def test_two_process_search_gives_the_same_history(ingredients, splits, tmp_path):
    from pathlib import Path

    from datasets import DatasetDict

    DatasetDict(splits).save_to_disk(str(tmp_path / "data"))
    script = Path(__file__).parent / "scripts_strategies" / "greedy_launch.py"
    arguments = [str(script), "--ingredients", *map(str, ingredients), "--data", str(tmp_path / "data")]
    arguments += ["--search", json.dumps({"merge": "weighted", "space": {"weights": {"low": 0, "high": 1}}})]
    one, two = launched(arguments, tmp_path)
    assert [r["world_size"] for r in two] == [2, 2]
    for result in two:
        assert [row["parameters"] for row in result["history"]] == [row["parameters"] for row in one["history"]]
        assert [row["score"] for row in result["history"]] == [row["score"] for row in one["history"]]
        assert result["evaluations"] == one["evaluations"]
    assert (tmp_path / "two.study.log").is_file() and not (tmp_path / "two" / ".." / "rank-1.study.log").exists()


def test_cli_cooks_a_search_recipe_and_explains_it(ingredients, splits, tmp_path, capsys):
    from datasets import DatasetDict

    from hf_soup.cli import main

    DatasetDict(splits).save_to_disk(str(tmp_path / "data"))
    recipe = tmp_path / "search.yaml"
    names = ", ".join(folder.name for folder in ingredients)
    recipe.write_text(
        f"method: search\nmerge: weighted\nspace: {{weights: {{low: 0.0, high: 1.0}}}}\nsampler: random\ntrials: 3\n"
        f"ingredients: [{names}]\noutput: soup\nevaluation:\n  dataset: {{load_from_disk: data}}\n"
        "  selection_split: validation\n  report_splits: [test]\n  compare: [uniform]\n"
    )
    capsys.readouterr()
    assert main(["cook", str(recipe), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "search soup: 3 of 3 ingredients, 3 evaluations on 'validation'" in out
    assert "best of 3 trials (trial " in out and "weights[0]=" in out
    assert "| search |" in out and "| uniform |" in out
    card = (tmp_path / "soup" / "README.md").read_text()
    assert "random search over the parameters of `weighted`: 3 trials (3 scored, 0 resumed" in card
    assert "figure_search.png" in card and (tmp_path / "soup.study.log").is_file()
