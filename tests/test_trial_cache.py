"""The search's trial cache (TIES and DARE): trials give bit-identical tensors, scores and soups with the cache on,
off, or too small for every tensor; bad `cache:` values are refused before any tensor is read."""

import logging

import pytest
import torch
from conftest import edit_weights, evaluation, perturbed, state_dict_of

from hf_soup import SoupBuilder, SoupError
from hf_soup.checkpoint import CheckpointReader
from hf_soup.merge import merge_tensor
from hf_soup.methods.sparsify import keep_largest, keep_ranked, kept_count, magnitude_ranks
from hf_soup.strategies import trial_cache
from hf_soup.strategies.space import SearchSpace
from hf_soup.strategies.trial_cache import TrialCache, cache_budget, parse_cache

SEARCHES = {  # merge → (space, fixed, what the cache keeps)
    "ties": ({"density": {"low": 0.05, "high": 1.0}, "scale": {"low": 0.5, "high": 2.0}}, {}, "trim states"),
    "ties-weights": (
        {"density": {"low": 0.05, "high": 1.0}, "weights": {"low": 0.0, "high": 1.0}},
        {"majority_sign": "frequency"},
        "magnitude order",
    ),
    "ties-groups": ({"density": {"low": 0.05, "high": 1.0, "groups": 2}}, {"weights": [0.2, 1.0, 0.7]}, "trim"),
    "dare": ({"drop_rate": {"low": 0.0, "high": 0.9}, "scale": {"low": 0.5, "high": 2.0}}, {}, "random draws"),
    "dare-ties": ({"drop_rate": {"low": 0.0, "high": 0.9}}, {"merge": "ties", "weights": [1, 2, 0.5]}, "draws"),
}


def coarse(trained, folder, seed):
    """A fine-tune whose task vector holds many equal magnitudes (steps of 1e-3): ties at every trim's cut."""
    perturbed(trained, folder, seed, 0.0)
    generator = torch.Generator().manual_seed(seed)

    def change(tensors):
        for tensor in tensors.values():
            if tensor.is_floating_point():
                tensor.add_(torch.randint(-3, 4, tensor.shape, generator=generator).float() * 1e-3)

    return edit_weights(folder, change)


@pytest.fixture
def task(trained, tmp_path):
    """Three fine-tunes of the tiny trained BERT with coarse task vectors; the base is the trained model."""
    return [coarse(trained, tmp_path / f"ft{i}", i) for i in range(3)], trained


def search(paths, base, splits, output, name, **options):
    space, fixed, _ = SEARCHES[name]
    return SoupBuilder(
        [str(p) for p in paths],
        method="search",
        merge=name.split("-")[0],
        space=space,
        fixed=fixed,
        sampler="random",
        trials=5,
        base_model=str(base),
        evaluation=evaluation(splits, metric="loss"),
        **options,
    ).cook(output, progress=False)


@pytest.mark.parametrize("name", list(SEARCHES))
def test_a_cached_trial_writes_the_tensors_the_method_writes(task, name):
    paths, base = task
    readers, base_reader = [CheckpointReader(p) for p in paths], CheckpointReader(base)
    space, fixed, kept = SEARCHES[name]
    space = SearchSpace.parse(name.split("-")[0], space, fixed, len(paths))
    cache = TrialCache.build(space.method, readers, base_reader, space.held(), setting="auto", seed=3)
    assert kept in cache.record()["kept"] and cache.record()["recomputed_tensors"] == 0
    generator = torch.Generator().manual_seed(0)
    proposals = [space.middle()] + [
        {d.name: d.low + (d.high - d.low) * float(torch.rand((), generator=generator)) for d in space.dimensions}
        for _ in range(4)
    ]
    proposals.append({d.name: d.high for d in space.dimensions})  # density 1, the largest drop rate
    names = readers[0].names()
    for values in proposals:
        parameters = space.parameters(values, names)
        for tensor in names:
            got = cache.merge(tensor, parameters)
            expected = merge_tensor(tensor, readers, space.method, parameters, base=base_reader, seed=3)
            assert (got is None) == (not expected.is_floating_point())
            assert got is None or torch.equal(got, expected), (values, tensor)


@pytest.mark.parametrize("name", ["ties", "dare-ties"])
def test_cached_and_uncached_searches_give_the_same_trials_and_soup(task, splits, tmp_path, name):
    paths, base = task
    cached = search(paths, base, splits, tmp_path / "cached", name)
    plain = search(paths, base, splits, tmp_path / "plain", name, cache="off")
    one, other = cached.record["strategy"], plain.record["strategy"]
    assert [(r["parameters"], r["score"]) for r in one["history"]] == [
        (r["parameters"], r["score"]) for r in other["history"]
    ]
    assert len({r["score"] for r in one["history"]}) == 5  # the loss tells every trial apart
    assert one["best_parameters"] == other["best_parameters"]
    soup, reference = state_dict_of(cached.path), state_dict_of(plain.path)
    assert soup.keys() == reference.keys() and all(torch.equal(soup[n], reference[n]) for n in soup)
    assert one["cache"]["cached_tensors"] > 0 and one["cache"]["recomputed_tensors"] == 0
    assert one["cache"]["bytes"] <= one["cache"]["budget_bytes"] and one["cache"]["note"] is None
    assert other["cache"]["cached_tensors"] == 0 and "every tensor is recomputed" in other["cache"]["note"]


def test_a_budget_too_small_recomputes_some_tensors_says_so_and_changes_nothing(task, splits, tmp_path, caplog):
    paths, base = task
    full = search(paths, base, splits, tmp_path / "full", "ties").record["strategy"]
    budget = full["cache"]["bytes"] // 2
    with caplog.at_level(logging.WARNING, logger="hf_soup.strategies.trial_cache"):
        small = search(paths, base, splits, tmp_path / "small", "ties", cache=budget).record["strategy"]
    record = small["cache"]
    assert record["setting"] == budget == record["budget_bytes"] and 0 < record["bytes"] <= budget
    assert record["cached_tensors"] > 0 and record["recomputed_tensors"] > 0
    assert record["cached_tensors"] + record["recomputed_tensors"] == full["cache"]["cached_tensors"]
    assert f"{record['recomputed_tensors']} are recomputed in every trial" in record["note"]
    assert record["note"] in caplog.text and "raise `cache:`" in record["note"]
    assert [r["score"] for r in small["history"]] == [r["score"] for r in full["history"]]
    soup, reference = state_dict_of(tmp_path / "small"), state_dict_of(tmp_path / "full")
    assert all(torch.equal(soup[n], reference[n]) for n in soup)


def test_an_ingredient_with_nan_is_recomputed_as_the_method_does_it(task, splits, tmp_path):
    """TIES never elects a NaN's sign, so the soup stays finite; the cache leaves that tensor to the method."""
    paths, base = task
    edit_weights(paths[1], lambda tensors: tensors["classifier.weight"].view(-1)[0:1].fill_(float("nan")))
    cached = search(paths, base, splits, tmp_path / "cached", "ties").record["strategy"]
    plain = search(paths, base, splits, tmp_path / "plain", "ties", cache="off").record["strategy"]
    assert [r["score"] for r in cached["history"]] == [r["score"] for r in plain["history"]]
    assert cached["cache"]["recomputed_tensors"] == 1
    assert "1 tensors (classifier.weight) hold NaN or Inf" in cached["cache"]["note"]
    soup, reference = state_dict_of(tmp_path / "cached"), state_dict_of(tmp_path / "plain")
    assert all(torch.equal(soup[n], reference[n]) for n in soup)


@pytest.mark.parametrize("value", ["lots", "-1GB", 0, -5, 1.5, [1], "", None])
def test_bad_cache_values_are_refused_before_any_tensor_is_read(task, splits, tmp_path, value):
    paths, base = task
    with pytest.raises(SoupError, match="cache must be auto .*, off, or the memory kept between trials"):
        search(paths, base, splits, tmp_path / "soup", "ties", cache=value)
    assert not (tmp_path / "soup").exists()


def test_cache_settings_read_yaml_booleans_and_sizes(monkeypatch):
    assert parse_cache("auto") == parse_cache(True) == "auto"
    assert parse_cache("off") == parse_cache(False) == "off"
    assert parse_cache("2GB") == 2 * 10**9 and parse_cache("500MiB") == 500 * 2**20 and parse_cache(4096) == 4096
    assert cache_budget("off") == 0 and cache_budget(4096, processes=2) == 4096
    monkeypatch.setattr(trial_cache, "available_memory", lambda: 10 * 10**9)
    assert cache_budget("auto") == 5 * 10**9 and cache_budget("auto", processes=2) == 2.5 * 10**9
    monkeypatch.setattr(trial_cache, "available_memory", lambda: None)
    assert cache_budget("auto") == trial_cache.UNKNOWN_MEMORY


def test_the_trim_keeps_the_earlier_of_equal_magnitudes_and_matches_the_ranks():
    tau = torch.tensor([0.5, -1.0, 1.0, 0.25, -1.0, 1.0])
    assert keep_largest(tau, 0.5).tolist() == [0.0, -1.0, 1.0, 0.0, -1.0, 0.0]  # 3 of the four ±1: the first three
    assert magnitude_ranks(tau).tolist() == [4, 0, 1, 5, 2, 3]
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        tau = torch.randint(-4, 5, (int(torch.randint(1, 300, (), generator=generator)),), generator=generator) / 4
        density = float(torch.rand((), generator=generator)) * 0.99 + 0.01
        keep = kept_count(density, tau.numel())
        assert torch.equal(keep_largest(tau, density), keep_ranked(tau, magnitude_ranks(tau), keep))


def test_the_trim_keeps_the_top_k_where_no_magnitudes_tie():
    """Where no magnitudes tie at the cut, the trim keeps the entries `topk` finds (as before the cache existed)."""
    for seed in range(3):
        tensor = torch.randn(40, 30, generator=torch.Generator().manual_seed(seed))
        top = tensor.flatten().abs().topk(kept_count(0.3, tensor.numel())).indices
        kept = torch.zeros(tensor.numel(), dtype=torch.bool)
        kept[top] = True
        assert torch.equal(keep_largest(tensor, 0.3).flatten() != 0, kept)
