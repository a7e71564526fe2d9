"""Fisher and RegMean: hand-computed cases, and end to end with statistics computed on data."""

import pytest
import torch
from conftest import make_split, perturbed, state_dict_of

from hf_soup import SoupBuilder, SoupError
from hf_soup.methods import get_method


def test_fisher_takes_each_entry_from_the_confident_ingredient():
    fisher = get_method("fisher").function
    a, b = torch.tensor([1.0, 10.0]), torch.tensor([3.0, 20.0])
    got = fisher([a, b], statistics=[torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], floor=0.0)
    assert torch.equal(got, torch.tensor([1.0, 20.0]))
    equal = fisher([a, b], statistics=[torch.ones(2), torch.ones(2)])
    assert torch.allclose(equal, (a + b) / 2)
    assert torch.equal(fisher([a, b], statistics=[None, None]), (a + b) / 2)  # no Fisher: plain mean


def test_regmean_solves_the_least_squares_merge():
    regmean = get_method("regmean").function
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(3, 5, generator=generator) for _ in range(2)]
    inputs = [torch.randn(40, 5, generator=generator) for _ in range(2)]
    grams = [x.T @ x for x in inputs]
    merged = regmean(weights, statistics=grams, reduce_non_diagonal=1.0)
    # the normal equations of min_W Σᵢ ‖Xᵢ Wᵢᵀ − Xᵢ Wᵀ‖²
    residual = sum(g @ (merged.T - w.T) for g, w in zip(grams, weights))
    assert residual.abs().max() < 1e-4
    identity = [torch.eye(5), torch.eye(5)]
    assert torch.allclose(regmean(weights, statistics=identity), (weights[0] + weights[1]) / 2, atol=1e-6)
    bias = [torch.ones(3), torch.zeros(3)]
    assert torch.equal(regmean(bias, statistics=[None, None]), torch.full((3,), 0.5))


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_data_methods_end_to_end(trained, tmp_path, method):  # noqa: F811
    from transformers import BertForSequenceClassification

    from hf_soup.scoring import Scorer

    folders = [perturbed(trained, tmp_path / f"run{i}", i + 1, 0.02) for i in range(2)]
    splits = {"validation": make_split(48, 10), "test": make_split(48, 11)}
    evaluation = {"splits": splits, "selection_split": "validation"}
    soup = SoupBuilder(folders, method=method, examples=16, evaluation=evaluation).cook(
        tmp_path / method, progress=False
    )
    got = state_dict_of(soup.path)
    mean = {n: (state_dict_of(folders[0])[n] + state_dict_of(folders[1])[n]) / 2 for n in got}
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(got[name], mean[name], atol=1e-7)  # the statistics changed the merge
    assert torch.allclose(got[name], mean[name], atol=0.05)  # and it stays between close ingredients
    model = BertForSequenceClassification.from_pretrained(soup.path)
    assert Scorer(splits).score(model, "test") > 0.9
    assert not list(tmp_path.glob(".hf_soup-statistics-*"))  # temporary statistics removed
    with pytest.raises(SoupError, match=f"method '{method}' needs data: add an `evaluation:` section"):
        SoupBuilder(folders, method=method)
