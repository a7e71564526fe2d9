"""Scoring speed without changing a number: rows batched by length, batches collated once, inference mode; and the
resident model's dtype (`evaluation.dtype`), recorded and checked."""

import pytest
import torch
from conftest import evaluation, make_model, state_dict_of

from hf_soup import SoupBuilder, SoupError
from hf_soup.evaluation import Evaluation
from hf_soup.scoring import Scorer
from hf_soup.strategies.ensemble import average_logits


def ragged(count, seed, *, mask=True):
    """Rows of 2–24 tokens with their attention mask and a label that depends on the first token."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 25, (count,), generator=generator).tolist()
    ids = [torch.randint(4, 64, (n,), generator=generator).tolist() for n in lengths]
    rows = {"input_ids": ids, "label": [int(row[0] >= 34) for row in ids]}
    if mask:
        rows["attention_mask"] = [[1] * n for n in lengths]
    return Dataset.from_dict(rows)


def padded(scorer, split):
    """Token positions the scorer's batches hold, padding included."""
    return sum(batch["input_ids"].numel() for batch in scorer.batches(split))


@pytest.mark.parametrize(
    "kind, task, metrics",
    [
        ("bert", "sequence-classification", ["accuracy", "macro_f1", "loss"]),
        ("llama", "causal-lm", ["next_token_accuracy", "loss", "perplexity"]),
    ],
)
def test_rows_sorted_by_length_give_the_numbers_of_the_split_order(kind, task, metrics):
    data = {"validation": ragged(37, 0)}
    models = [make_model(kind, seed) for seed in (1, 2)]
    for metric in metrics:
        fast = Scorer(data, task=task, metric=metric, batch_size=4)
        plain = Scorer(data, task=task, metric=metric, batch_size=4, sort_by_length=False)
        lengths = [len(ids) for ids in data["validation"]["input_ids"]]
        order = fast.orders["validation"]
        assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
        assert all(order[j] < order[j + 1] for j in range(36) if lengths[order[j]] == lengths[order[j + 1]])
        assert plain.orders["validation"] == list(range(37))
        assert padded(fast, "validation") < 0.8 * padded(plain, "validation")
        for model in models:
            got, want = fast.score(model, "validation"), plain.score(model, "validation")
            if "accuracy" in metric or metric == "macro_f1":
                assert got == want, metric
            else:
                assert got == pytest.approx(want, rel=1e-6), metric
        if task == "sequence-classification":  # the ensemble averages the same rows in either order
            ensembles = [
                s.compute(average_logits([s.outputs(m, "validation") for m in models])) for s in (fast, plain)
            ]
            assert ensembles[0] == pytest.approx(ensembles[1], rel=1e-6)


def test_order_kept_where_it_may_matter_or_padding_is_seen():
    """A user's compute_metrics sees the rows in split order; rows without an attention mask (the model would see
    the padding) are not reordered."""
    data = ragged(21, 1)
    seen = []

    def labels_in_order(prediction):
        seen.append(prediction.label_ids.tolist())
        return {"n": 1.0}

    scorer = Scorer({"validation": data}, metric=labels_in_order, greater_is_better=True, batch_size=4)
    assert scorer.orders["validation"] == list(range(21))
    scorer.score(make_model("bert", 1), "validation")
    assert seen == [data["label"]]
    unmasked = Scorer({"validation": ragged(21, 1, mask=False)}, batch_size=4)
    assert unmasked.orders["validation"] == list(range(21))


def test_batches_are_collated_once_and_outputs_made_under_inference_mode(monkeypatch):
    import hf_soup.scoring as scoring
    from hf_soup.tasks import collate, get_task

    calls = []
    padding = collate(get_task("sequence-classification"))

    def counted(examples):
        calls.append(len(examples))
        return padding(examples)

    scorer = Scorer({"validation": ragged(10, 2)}, collator=counted, batch_size=4)
    model = make_model("bert", 1)
    first = scorer.outputs(model, "validation")
    second = scorer.outputs(model, "validation")
    assert calls == [4, 4, 2] and scorer.evaluations == 2
    assert all(a[0].is_inference() and torch.equal(a[0], b[0]) for a, b in zip(first, second))
    monkeypatch.setattr(scoring, "BATCH_CACHE_BYTES", 0)  # over the budget: collated at every scoring
    fresh = Scorer({"validation": ragged(10, 2)}, collator=counted, batch_size=4)
    calls.clear()
    fresh.outputs(model, "validation")
    fresh.outputs(model, "validation")
    assert calls == [4, 4, 2, 4, 4, 2]


def test_strategies_after_scoring_under_inference_mode(ingredients, splits, tmp_path):
    """Greedy scores first (inference mode), then the learned soup trains on the same resident model."""
    soup = SoupBuilder(
        ingredients, method="greedy", evaluation=evaluation(splits, compare=["learned", "uniform"])
    ).cook(tmp_path / "soup", progress=False)
    rows = soup.record["report"]["rows"]
    assert set(rows) == {"best individual", "greedy", "learned", "uniform"}
    assert all(0.0 <= score <= 1.0 for row in rows.values() for score in row.values())


def test_resident_dtype_is_recorded_and_the_soup_still_comes_from_fp32(ingredients, splits, tmp_path):
    wide = SoupBuilder(ingredients, method="greedy", evaluation=evaluation(splits, compare=[])).cook(
        tmp_path / "fp32", progress=False
    )
    low = SoupBuilder(ingredients, method="greedy", evaluation=evaluation(splits, compare=[], dtype="bfloat16")).cook(
        tmp_path / "bf16", progress=False
    )
    assert wide.record["report"]["dtype"] == "float32" and low.record["report"]["dtype"] == "bfloat16"
    assert low.record["recipe"]["evaluation"]["dtype"] == "bfloat16"
    assert low.record["strategy"]["kept"] == wide.record["strategy"]["kept"] == ["good_a", "good_b"]
    assert low.record["strategy"]["score"] == pytest.approx(wide.record["strategy"]["score"], abs=0.05)
    mean = SoupBuilder(ingredients[:2], method="uniform").cook(tmp_path / "mean", progress=False)
    written, exact = state_dict_of(low.path), state_dict_of(mean.path)
    assert all(written[name].dtype == torch.float32 and torch.equal(written[name], exact[name]) for name in exact)


@pytest.mark.parametrize(
    "dtype, message",
    [
        ("int8", "evaluation.dtype 'int8' is not a resident dtype; use float32, bfloat16, float16"),
        ("bfloat", "evaluation.dtype 'bfloat' \\(did you mean 'bfloat16'\\?\\) is not a resident dtype"),
        (16, "evaluation.dtype must be a str, got int 16"),
    ],
)
def test_bad_resident_dtypes_are_refused(splits, tmp_path, dtype, message):
    with pytest.raises(SoupError, match=message):
        Evaluation.from_mapping(evaluation(splits, dtype=dtype), base_dir=tmp_path, source="recipe.yaml")


def test_half_precision_on_the_cpu_is_refused(ingredients, splits, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("float16 is allowed where the resident model can be on a GPU")
    with pytest.raises(SoupError, match="evaluation.dtype float16 .* on the CPU, .* use bfloat16"):
        SoupBuilder(ingredients, method="greedy", evaluation=evaluation(splits, dtype="float16"))
    with pytest.raises(SoupError, match="evaluation.dtype float16"):
        Evaluation.from_mapping(evaluation(splits, dtype="float16", device_map="cpu"), base_dir=tmp_path, source="r")
