import pytest
import torch

from hf_soup.errors import SoupError
from hf_soup.methods import METHODS, get_method, list_methods, register_method

# name → (ingredient count, parameters) for the registry-wide checks; methods added later fall back to DEFAULTS.
EXAMPLES = {
    "slerp": (2, {"t": 0.3}),
    "ties": (3, {"density": 0.5}),
    "dare": (3, {"drop_rate": 0.3}),
    "passthrough": (3, {"slices": [{"ingredient": 0, "layers": [0, 1]}]}),
}
DEFAULTS = {"weights": None, "density": 0.5, "drop_rate": 0.3, "t": 0.5}


def example(method):
    count, given = EXAMPLES.get(method.name, (3, {}))
    required = [name for name, p in method.parameters.items() if p.default is p.empty and name not in given]
    parameters = {**{name: DEFAULTS[name] for name in required}, **given}
    if "weights" in parameters and parameters["weights"] is None:
        parameters["weights"] = [1.0 + i for i in range(count)]
    return count, parameters


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_keeps_shape_is_finite_pure_and_deterministic(name):
    method = get_method(name)
    count, given = example(method)
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(4, 6, generator=generator) for _ in range(count)]
    copies = [t.clone() for t in tensors]
    parameters = method.bind(given, count)
    context = {}
    if method.needs_base:
        context["base"] = torch.randn(4, 6, generator=generator)
    if "generator" in method.context:
        context["generator"] = torch.Generator().manual_seed(1)
    if "statistics" in method.context:  # Fisher-like diagonals (4×6) or Gram matrices of the inputs (6×6)
        shape = (6, 6) if name == "regmean" else (4, 6)
        context["statistics"] = [torch.rand(shape, generator=generator) + torch.eye(*shape) for _ in range(count)]
    base_copy = context.get("base", torch.zeros(1)).clone()
    out = method.function(tensors, **parameters, **context)
    assert out.shape == (4, 6) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert all(torch.equal(a, b) for a, b in zip(tensors, copies)), "inputs were mutated"
    assert torch.equal(context.get("base", torch.zeros(1)), base_copy), "base was mutated"
    if "generator" in method.context:
        context["generator"] = torch.Generator().manual_seed(1)
    assert torch.equal(out, method.function(tensors, **parameters, **context))
    assert method.summary, "every method needs a docstring"


def test_uniform_and_weighted_values():
    tensors = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    assert torch.equal(get_method("uniform").function(tensors), torch.tensor([2.0, 4.0]))
    weighted = get_method("weighted")
    assert torch.equal(weighted.function(tensors, weights=[1, 3]), torch.tensor([2.5, 5.0]))
    assert torch.equal(weighted.function(tensors, weights=[1, 3], normalize=False), torch.tensor([10.0, 20.0]))
    assert weighted.mixing({"weights": [1, 3], "normalize": True}, 2) == [0.25, 0.75]


def test_bind_checks_names_and_types():
    weighted = get_method("weighted")
    with pytest.raises(
        SoupError, match="unknown parameter 'wieghts' for method 'weighted'; accepted: weights, normalize"
    ):
        weighted.bind({"wieghts": [1]}, 1)
    with pytest.raises(SoupError, match="method 'ties' needs parameter 'density'"):
        get_method("ties").bind({}, 2)
    with pytest.raises(SoupError, match="weights must be a list, got str"):
        weighted.bind({"weights": "1,2"}, 2)
    with pytest.raises(SoupError, match=r"weights\[1\] must be a number, got str"):
        weighted.bind({"weights": [1, "a"]}, 2)
    with pytest.raises(SoupError, match="normalize must be a bool"):
        weighted.bind({"weights": [1, 2], "normalize": "yes"}, 2)
    assert weighted.bind({"weights": [1, 2]}, 2) == {"weights": [1.0, 2.0], "normalize": True}


def test_register_method_rejects_bad_declarations():
    with pytest.raises(SoupError, match="already registered"):
        register_method("uniform")(lambda tensors: tensors[0])
    with pytest.raises(SoupError, match="lower-case identifier"):
        register_method("Bad-Name")(lambda tensors: tensors[0])
    with pytest.raises(SoupError, match="one positional argument"):

        @register_method("two_positional")
        def two(tensors, other):
            return tensors[0]

    assert "two_positional" not in METHODS


def test_registered_method_is_usable_and_listed():
    @register_method("first_only_for_test")
    def first_only(tensors, *, scale: float = 1.0, base: torch.Tensor):
        """Keep the first ingredient (test method)."""
        return tensors[0] * scale

    try:
        method = get_method("first_only_for_test")
        assert list(method.parameters) == ["scale"] and method.context == ("base",) and method.needs_base
        assert method in list_methods()
    finally:
        del METHODS["first_only_for_test"]
