"""The literature's merge methods against small hand-computed cases."""

import math

import pytest
import torch

from hf_soup.errors import SoupError
from hf_soup.methods import get_method
from hf_soup.methods.ema import ema_weights


def run(name, tensors, count=None, base=None, seed=0, **parameters):
    method = get_method(name)
    bound = method.bind(parameters, count or len(tensors))
    context = {}
    if method.needs_base:
        context["base"] = base
    if "generator" in method.context:
        context["generator"] = torch.Generator().manual_seed(seed)
    return method.function([t.float() for t in tensors], **bound, **context)


def test_slerp_endpoints_midpoint_and_collinear_fallback():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(run("slerp", [a, b], t=0.0), a)
    assert torch.allclose(run("slerp", [a, b], t=1.0), b)
    half = math.sqrt(0.5)
    assert torch.allclose(run("slerp", [a, b], t=0.5), torch.tensor([half, half]))
    c = torch.tensor([2.0, 2.0001])  # nearly parallel to [1, 1]: linear interpolation
    d = torch.tensor([1.0, 1.0])
    assert torch.equal(run("slerp", [c, d], t=0.25), torch.lerp(c, d, 0.25))
    with pytest.raises(SoupError, match="exactly 2 ingredients, got 3"):
        run("slerp", [a, b, a], t=0.5)
    with pytest.raises(SoupError, match=r"t must be in \[0, 1\]"):
        run("slerp", [a, b], t=1.5)


def test_multislerp_of_two_is_slerp_and_keeps_the_norm():
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 3.0, 0.0])
    got = run("multislerp", [a, b], weights=[0.7, 0.3])
    assert torch.allclose(got, run("slerp", [a, b], t=0.3), atol=1e-6)
    assert torch.isclose(got.norm(), torch.tensor(3.0))


def test_task_arithmetic_adds_and_negates():
    base = torch.tensor([1.0, 1.0])
    one, two = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0])
    assert torch.equal(run("task_arithmetic", [one, two], base=base), torch.tensor([2.0, 3.0]))
    assert torch.equal(
        run("task_arithmetic", [one, two], base=base, weights=[1, -1], scale=0.5), torch.tensor([1.5, 0.0])
    )


def test_ties_on_a_2x3_case_with_a_sign_conflict():
    base = torch.zeros(2, 3)
    tau1 = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.5]])
    tau2 = torch.tensor([[-3.0, 1.2, 1.0], [1.0, -0.5, 2.0]])
    # density 1: no trimming. Elected sign (of the sum): [[-, -, +], [+, -, +]]
    got = run("ties", [tau1, tau2], base=base, density=1.0)
    assert torch.allclose(got, torch.tensor([[-3.0, -2.0, 2.0], [0.75, -0.5, 2.0]]))
    # density 0.5 keeps 3 of 6 entries per task vector: tau1 → 3, -2, -1.5; tau2 → -3, 2, 1.2
    got = run("ties", [tau1, tau2], base=base, density=0.5)
    assert torch.allclose(got, torch.tensor([[-3.0, -2.0, 3.0], [0.0, 0.0, 2.0]]))
    # frequency: one vote each on the conflicts, ties go to +
    got = run("ties", [tau1, tau2], base=base, density=1.0, majority_sign="frequency")
    assert torch.allclose(got, torch.tensor([[1.0, 1.2, 2.0], [0.75, -0.5, 2.0]]))


def test_dare_with_no_drop_is_task_arithmetic_and_rescales_what_it_keeps():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(50, 40, generator=generator)
    tensors = [base + torch.randn(50, 40, generator=generator) for _ in range(3)]
    expected = run("task_arithmetic", tensors, base=base, weights=[0.5, 0.3, 0.2])
    assert torch.allclose(run("dare", tensors, base=base, drop_rate=0.0, weights=[0.5, 0.3, 0.2]), expected)
    dropped = run("dare", tensors, base=base, drop_rate=0.5, weights=[0.5, 0.3, 0.2])
    assert torch.equal(dropped, run("dare", tensors, base=base, drop_rate=0.5, weights=[0.5, 0.3, 0.2]))
    assert not torch.equal(dropped, run("dare", tensors, base=base, seed=1, drop_rate=0.5, weights=[0.5, 0.3, 0.2]))
    single = run("dare", tensors[:1], base=base, drop_rate=0.5)
    kept = (single - base) != 0
    assert 0.45 < kept.float().mean() < 0.55
    assert torch.allclose((single - base)[kept], 2 * (tensors[0] - base)[kept])
    ties_like = run("dare", tensors, base=base, drop_rate=0.0, merge="ties")
    assert torch.allclose(ties_like, run("ties", tensors, base=base, density=1.0))


def test_model_stock_identical_and_orthogonal_task_vectors():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    same = base + torch.tensor([1.0, 2.0, 0.0, 0.0])
    assert torch.allclose(run("model_stock", [same, same.clone()], base=base), same)
    one, two = base + torch.tensor([1.0, 0.0, 0.0, 0.0]), base + torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert torch.allclose(run("model_stock", [one, two], base=base), base)
    # cos φ = 0.5, k = 2: t = 1 / 1.5
    three = base + torch.tensor([1.0, 0.0, 0.0, 0.0])
    four = base + torch.tensor([0.5, math.sqrt(0.75), 0.0, 0.0])
    t = 2 * 0.5 / (1 + 0.5)
    assert torch.allclose(run("model_stock", [three, four], base=base), t * (three + four) / 2 + (1 - t) * base)
    with pytest.raises(SoupError, match="at least 2 ingredients"):
        run("model_stock", [three], base=base)


def test_ema_and_swa_weights():
    a, b, c = torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([2.0])
    assert torch.allclose(run("ema", [a, b], decay=0.75), torch.tensor([0.25]))
    assert ema_weights(3, 0.5) == [0.25, 0.25, 0.5] and math.isclose(sum(ema_weights(7, 0.9)), 1.0)
    assert torch.allclose(run("swa", [a, b, c], last=2), torch.tensor([1.5]))
    assert torch.allclose(run("swa", [a, b, c]), torch.tensor([1.0]))
    assert get_method("swa").mixing({"last": 2}, 3) == [0.0, 0.5, 0.5]
    with pytest.raises(SoupError, match="decay must be in"):
        run("ema", [a, b], decay=1.0)


def test_schedules_vary_a_scalar_over_depth_and_by_name():
    from hf_soup.schedules import per_tensor, value_at

    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(5)] + [
        "model.embed_tokens.weight",
        "lm_head.weight",
    ]
    assert [value_at([0.0, 1.0], n, 5) for n in names] == [0.0, 0.25, 0.5, 0.75, 1.0, 0.0, 1.0]
    schedule = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.3}, {"value": 0.5}]
    assert value_at(schedule, "model.layers.2.self_attn.k_proj.weight", 5) == 0.5
    assert value_at(schedule, "model.layers.4.self_attn.k_proj.weight", 5) == 1.0
    assert value_at(schedule, "model.layers.0.mlp.up_proj.weight", 5) == 0.3
    assert value_at(schedule, "model.norm.weight", 5) == 0.5
    resolve = per_tensor({"t": [0.0, 1.0], "collinear": 0.9995}, ["t", "collinear"], names)
    assert resolve(names[4]) == {"t": 1.0, "collinear": 0.9995}
    assert per_tensor({"t": 0.5}, ["t"], names) == {"t": 0.5}


def test_schedules_are_validated_against_the_method():
    slerp = get_method("slerp")
    assert slerp.bind({"t": [0, 0.5, 1]}, 2)["t"] == [0.0, 0.5, 1.0]
    with pytest.raises(SoupError, match=r"t must be in \[0, 1\], got 1.5"):
        slerp.bind({"t": [0.0, 1.5]}, 2)
    with pytest.raises(SoupError, match=r"t\[0\] must be \{filter: TEXT, value"):
        slerp.bind({"t": [{"filter": "mlp"}]}, 2)
    with pytest.raises(SoupError, match="must be a number or a non-empty list of numbers"):
        slerp.bind({"t": [{"value": "high"}]}, 2)
    assert get_method("ties").scalar == ["density", "scale"]


def test_methods_end_to_end_from_recipes(tmp_path, make_ingredients):
    from conftest import make_model, save_model, state_dict_of
    from transformers import LlamaForCausalLM

    from hf_soup import SoupBuilder

    base = save_model(make_model("llama", None), tmp_path / "base")
    folders = make_ingredients(3)
    states = [state_dict_of(f) for f in folders]
    base_state = state_dict_of(base)
    name = "model.layers.1.mlp.up_proj.weight"

    soup = SoupBuilder(folders, method="ties", base_model=str(base), density=0.3).cook(
        tmp_path / "ties", progress=False
    )
    expected = run("ties", [s[name] for s in states], base=base_state[name], density=0.3)
    assert torch.allclose(state_dict_of(soup.path)[name], expected, atol=1e-7)
    LlamaForCausalLM.from_pretrained(soup.path)(torch.tensor([[1, 2]]))

    soup = SoupBuilder(folders, method="dare", base_model=str(base), drop_rate=0.4, seed=7).cook(
        tmp_path / "dare", progress=False
    )
    again = SoupBuilder(folders, method="dare", base_model=str(base), drop_rate=0.4, seed=7).cook(
        tmp_path / "dare2", progress=False
    )
    assert torch.equal(state_dict_of(soup.path)[name], state_dict_of(again.path)[name])  # seeded: reproducible

    two = folders[:2]
    soup = SoupBuilder(two, method="slerp", t=[0.0, 1.0]).cook(tmp_path / "slerp", progress=False)
    got = state_dict_of(soup.path)
    first, last = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(got[first], states[0][first]) and torch.allclose(got[last], states[1][last])
    assert soup.record["parameters"]["t"] == [0.0, 1.0]

    with pytest.raises(SoupError, match="method 'task_arithmetic' needs `base_model:`"):
        SoupBuilder(folders, method="task_arithmetic")
    with pytest.raises(SoupError, match="method 'ties' needs parameter 'density'"):
        SoupBuilder(folders, method="ties", base_model=str(base)).cook(tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_passthrough_stacks_layers_and_fixes_the_config(tmp_path, make_ingredients):
    import json

    from conftest import state_dict_of
    from transformers import LlamaForCausalLM

    from hf_soup import SoupBuilder

    a, b = make_ingredients(2, num_hidden_layers=3)
    slices = [{"ingredient": 0, "layers": [0, 2]}, {"ingredient": 1, "layers": [1, 3]}]
    soup = SoupBuilder([a, b], method="passthrough", slices=slices).cook(tmp_path / "stack", progress=False)
    config = json.loads((soup.path / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    got, sa, sb = state_dict_of(soup.path), state_dict_of(a), state_dict_of(b)
    q = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(got[q.format(0)], sa[q.format(0)]) and torch.equal(got[q.format(1)], sa[q.format(1)])
    assert torch.equal(got[q.format(2)], sb[q.format(1)]) and torch.equal(got[q.format(3)], sb[q.format(2)])
    assert torch.equal(got["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    model = LlamaForCausalLM.from_pretrained(soup.path)
    assert len(model.model.layers) == 4 and torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    with pytest.raises(SoupError, match="ingredient run1 has no layer 3"):
        SoupBuilder([a, b], method="passthrough", slices=[{"ingredient": 1, "layers": [2, 4]}]).cook(
            tmp_path / "bad", progress=False
        )
    with pytest.raises(SoupError, match=r"slices\[0\].layers must be \[START, END\)"):
        SoupBuilder([a, b], method="passthrough", slices=[{"ingredient": 0, "layers": [2, 1]}]).cook(
            tmp_path / "bad", progress=False
        )
    assert not (tmp_path / "bad").exists()
