"""`device:` — where the merge math runs. On the CPU: the explicit `cpu` equals the default bit for bit, `cuda` without
a GPU is refused before anything is written, `auto` falls back to the CPU and says so in soup.json, and the rules that
make a soup the same on every device (TIES's tie-break, DARE's CPU-drawn masks) hold. With CUDA: TIES, DARE (same
seed) and SLERP on the GPU equal the CPU's soup to fp32 rounding."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, save_model, state_dict_of

from hf_soup import SoupBuilder
from hf_soup.errors import SoupError
from hf_soup.merge import merge_device, tensor_generator
from hf_soup.methods.sparsify import drop_and_rescale, keep_largest

CUDA = torch.cuda.is_available()
RECIPES = {  # method → its parameters; every one that draws, trims or takes angles
    "ties": {"density": 0.3},
    "dare": {"drop_rate": 0.5, "seed": 7},
    "dare_ties": {"drop_rate": 0.5, "merge": "ties", "seed": 7},
    "slerp": {"t": 0.3},
    "uniform": {},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three bf16 fine-tunes of one base (bf16 task vectors are quantised: TIES's threshold has ties) and the base."""
    root = tmp_path_factory.mktemp("device")
    runs = [save_model(make_model("llama", seed), root / f"run{seed}", dtype=torch.bfloat16) for seed in range(3)]
    return runs, save_model(make_model("llama", None), root / "base", dtype=torch.bfloat16)


def cook(folders, method: str, output, **options):
    runs, base = folders
    parameters = dict(RECIPES[method])
    if method == "slerp":
        return SoupBuilder(runs[:2], method="slerp", **parameters, **options).cook(output, progress=False)
    method = "dare" if method.startswith("dare") else method
    with_base = {"base_model": str(base)} if method in ("ties", "dare") else {}
    return SoupBuilder(runs, method=method, **with_base, **parameters, **options).cook(output, progress=False)


@pytest.mark.parametrize("method", list(RECIPES))
def test_explicit_cpu_is_the_default_bit_for_bit(folders, method, tmp_path):
    default = cook(folders, method, tmp_path / "default")
    explicit = cook(folders, method, tmp_path / "cpu", device="cpu")
    one, two = state_dict_of(default.path), state_dict_of(explicit.path)
    assert one.keys() == two.keys()
    assert all(torch.equal(one[name], two[name]) and one[name].dtype == two[name].dtype for name in one)
    assert default.record["device"] == {"asked": None, "used": "cpu"}
    assert explicit.record["device"] == {"asked": "cpu", "used": "cpu"}


@pytest.mark.skipif(CUDA, reason="checks the refusal where torch sees no GPU")
def test_cuda_without_a_gpu_is_refused_before_anything_is_written(folders, tmp_path):
    for asked in ("cuda", "cuda:1"):
        with pytest.raises(SoupError, match=f"device: {asked}, but torch sees no CUDA GPU") as error:
            cook(folders, "ties", tmp_path / "soup", device=asked)
        assert "set device: auto" in str(error.value) and "or device: cpu" in str(error.value)
        assert not (tmp_path / "soup").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(SoupError, match="torch sees no CUDA GPU"):
        merge_device("cuda")


@pytest.mark.skipif(CUDA, reason="auto is the CPU only where torch sees no GPU")
def test_auto_without_a_gpu_is_the_cpu_and_is_recorded(folders, tmp_path):
    auto = cook(folders, "dare", tmp_path / "auto", device="auto")
    default = cook(folders, "dare", tmp_path / "default")
    assert auto.record["device"] == {"asked": "auto", "used": "cpu"}
    one, two = state_dict_of(auto.path), state_dict_of(default.path)
    assert all(torch.equal(one[name], two[name]) for name in one)


def test_unknown_device_is_refused_by_the_recipe(folders, tmp_path):
    for asked, says in (("gpu", "device 'gpu' is unknown; choose auto, cpu, cuda or cuda:N"), (0, "must be a string")):
        with pytest.raises(SoupError, match=says):
            cook(folders, "uniform", tmp_path / "soup", device=asked)
    assert merge_device(None) == torch.device("cpu") and merge_device("cpu") == torch.device("cpu")


def test_ties_keeps_ties_at_the_threshold_lowest_index_first():
    """k = 3 of 6: the 3 is kept, then two of the four entries of magnitude 1, the first two; never topk's choice."""
    tau = torch.tensor([3.0, -1.0, 1.0, 1.0, -1.0, 0.5])
    assert torch.equal(keep_largest(tau, 0.5), torch.tensor([3.0, -1.0, 1.0, 0.0, 0.0, 0.0]))
    reversed_ties = torch.tensor([0.5, -1.0, 1.0, 1.0, -1.0, 3.0])
    assert torch.equal(keep_largest(reversed_ties, 0.5), torch.tensor([0.0, -1.0, 1.0, 0.0, 0.0, 3.0]))
    many = torch.ones(1000).neg_()  # all tied: exactly k, the first k
    kept = keep_largest(many.view(10, 100), 0.25)
    assert kept.shape == (10, 100) and torch.equal(kept.flatten() != 0, torch.arange(1000) < 250)


def test_ties_trim_keeps_nan_so_a_diverged_run_is_caught():
    tau = torch.tensor([float("nan"), 1.0, 2.0, 3.0])
    assert keep_largest(tau, 0.5).isnan().any() and keep_largest(tau, 0.25).isnan().any()


def test_ties_trim_of_quantised_task_vectors_is_the_stable_order():
    """Task vectors of bf16 weights have many equal magnitudes: the trim keeps the first k of the magnitudes sorted
    largest first, ties in index order (a stable sort), whatever the density."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(4096, generator=generator).bfloat16()
    tau = (base.float() + 0.01 * torch.randn(4096, generator=generator)).bfloat16().float() - base.float()
    for density in (0.1, 0.3, 0.5, 0.9):
        count = int(density * tau.numel())
        order = tau.abs().sort(descending=True, stable=True).indices
        expected = torch.zeros_like(tau)
        expected[order[:count]] = tau[order[:count]]
        threshold = tau.abs()[order[count - 1]]
        assert int((tau.abs() == threshold).sum()) > 1  # the case is one with ties at the threshold
        assert torch.equal(keep_largest(tau, density), expected), density


def test_dare_masks_come_from_the_cpu_generator_whatever_the_tensor_device():
    """The mask is drawn on the generator's CPU and moved: the CPU draw is the same for a tensor on another device
    (the meta device here, the one other device a CPU-only torch has)."""
    tau = torch.randn(8, 16)
    cpu = drop_and_rescale(tau, 0.5, tensor_generator(7, "w"))
    elsewhere = drop_and_rescale(tau.to("meta"), 0.5, tensor_generator(7, "w"))
    assert elsewhere.device.type == "meta" and elsewhere.shape == cpu.shape
    mask = torch.rand(tau.shape, generator=tensor_generator(7, "w")) >= 0.5
    assert torch.equal(cpu != 0, mask & (tau != 0))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", list(RECIPES))
def test_cuda_soup_equals_the_cpu_soup_to_fp32_rounding(folders, method, tmp_path):
    on_gpu = cook(folders, method, tmp_path / "cuda", device="cuda", dtype="float32")
    on_cpu = cook(folders, method, tmp_path / "cpu", dtype="float32")
    assert on_gpu.record["device"]["used"].startswith("cuda") and on_gpu.record["device"]["name"]
    gpu, cpu = state_dict_of(on_gpu.path), state_dict_of(on_cpu.path)
    base = state_dict_of(folders[1])
    for name in cpu:
        scale = float(cpu[name].abs().max()) or 1.0
        assert float((gpu[name] - cpu[name]).abs().max()) <= 4e-7 * scale, name  # a few fp32 ulps of the largest
        if method.startswith("dare"):  # the same masks: the same entries left at the base
            assert torch.equal(gpu[name] == base[name].float(), cpu[name] == base[name].float()), name
        if method == "ties":  # the same entries trimmed on both devices
            assert torch.equal(gpu[name] == base[name].float(), cpu[name] == base[name].float()), name
