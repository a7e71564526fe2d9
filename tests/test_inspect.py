"""hf-soup inspect: compatibility, sizes, task-vector geometry, and a warning when ingredients do not share a base."""

import math

import pytest
import torch
from conftest import make_model, save_model, state_dict_of

from hf_soup import inspect_ingredients
from hf_soup.checkpoint import CheckpointReader
from hf_soup.cli import main


def other_base(folder, seed=1, **overrides):
    """A llama of the same config initialised with another seed: a different pretrained model."""
    from conftest import llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return save_model(LlamaForCausalLM(llama_config(**overrides)), folder)


def flat(folder, names):
    tensors = state_dict_of(folder)
    return torch.cat([tensors[name].double().flatten() for name in names])


def test_fine_tunes_of_one_base(tmp_path, make_ingredients):
    folders = make_ingredients(3, noise=0.005)
    base = save_model(make_model("llama", None), tmp_path / "base")
    report = inspect_ingredients(folders, base)
    assert report.compatible and report.warnings == [] and report.problems == []
    expected = sum(t.numel() for t in state_dict_of(folders[0]).values() if t.is_floating_point())
    assert report.parameters == [expected] * 3
    geometry = report.geometry
    assert geometry.reference == "base model" and geometry.labels == ["run0", "run1", "run2"]
    names = sorted(state_dict_of(base))
    vectors = [flat(f, names) - flat(base, names) for f in folders]
    for i in range(3):
        assert geometry.angle[i][i] == 0 and geometry.cosine[i][i] == 1
        for j in range(3):
            assert geometry.angle[i][j] == geometry.angle[j][i]
            assert geometry.l2[i][j] == pytest.approx((vectors[i] - vectors[j]).norm().item())
    cosine = torch.nn.functional.cosine_similarity(vectors[0], vectors[1], dim=0).item()
    assert geometry.cosine[0][1] == pytest.approx(cosine, abs=1e-9)
    assert 80 < geometry.angle[0][1] < 100  # independent noise: nearly orthogonal task vectors
    against_mean = inspect_ingredients(folders).geometry
    assert against_mean.reference == "mean of the ingredients"
    assert torch.allclose(torch.tensor(against_mean.l2), torch.tensor(geometry.l2))  # whatever the reference
    text = report.text()
    assert "compatible: yes" in text and "task-vector angles in degrees (vs the base model" in text


def test_ingredients_from_two_bases_warn(tmp_path, make_ingredients, capsys, caplog):
    folders = make_ingredients(1, noise=0.005)
    stranger = other_base(tmp_path / "stranger")
    report = inspect_ingredients([*folders, stranger])
    assert report.compatible  # same architecture: a soup could be cooked, but it would be meaningless
    assert len(report.warnings) == 1 and "run0 and stranger do not share a base" in report.warnings[0]
    assert report.geometry.weight_cosine[0][1] < 0.2
    assert "do not share a base" in caplog.text
    capsys.readouterr()
    assert main(["inspect", str(folders[0]), str(stranger)]) == 0
    assert "warning: run0 and stranger do not share a base" in capsys.readouterr().out
    other_config = other_base(tmp_path / "rope", seed=0, rope_theta=500.0)  # same weights, another config
    report = inspect_ingredients([*folders, other_config])
    assert any("configs differ" in warning and "config hash" in warning for warning in report.warnings)


def test_incompatible_ingredients_are_reported(tmp_path, make_ingredients, capsys):
    folders = make_ingredients(1)
    wide = save_model(make_model("llama", 0, intermediate_size=96), tmp_path / "wide")
    report = inspect_ingredients([*folders, wide])
    assert not report.compatible and "shape" in report.problems[0]
    assert report.geometry is not None and report.geometry.tensors < len(state_dict_of(wide))  # shared tensors only
    capsys.readouterr()
    assert main(["inspect", str(folders[0]), str(wide), "--json"]) == 1
    assert '"compatible": false' in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "missing")]) == 2


def test_same_named_folders_are_told_apart(tmp_path):
    from hf_soup.ingredient import folder_labels

    llama = save_model(make_model("llama", 0), tmp_path / "a" / "ft_00")
    wide = save_model(make_model("llama", 1, intermediate_size=96), tmp_path / "b" / "ft_00")
    report = inspect_ingredients([llama, wide])
    assert report.labels == ["a/ft_00", "b/ft_00"] and report.geometry.labels == ["a/ft_00", "b/ft_00"]
    assert not report.compatible and "ingredient b/ft_00" in report.problems[0] and "a/ft_00" in report.problems[0]
    # the one rule: the shortest suffix of the path that no other folder (nor a reserved label) shares
    assert folder_labels(["/x/a/run/ft", "/x/b/run/ft", "/y/c/ft", "/y/d"]) == ["a/run/ft", "b/run/ft", "c/ft", "d"]
    assert folder_labels(["/ft", "/a/ft"]) == ["/ft", "a/ft"]  # no suffix of /ft tells it apart: its whole path
    assert folder_labels(["/x/base", "/y/run"], reserved=["base"]) == ["x/base", "run"]
    assert folder_labels(["/x/ft", "/x/ft", "/y/ft"]) == ["x/ft", "x/ft", "y/ft"]  # listed twice: refused elsewhere


def test_geometry_streams_one_tensor_per_ingredient_at_a_time(make_ingredients, monkeypatch):
    from hf_soup.inspection import task_vector_geometry

    readers = [CheckpointReader(f) for f in make_ingredients(3)]
    live, peak = [0], [0]
    original = CheckpointReader.get

    def counted(self, name):
        tensor = original(self, name)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        import weakref

        weakref.finalize(tensor, lambda: live.__setitem__(0, live[0] - 1))
        return tensor

    monkeypatch.setattr(CheckpointReader, "get", counted)
    geometry = task_vector_geometry(readers)
    assert peak[0] <= len(readers) and geometry.tensors == len(readers[0].names())
    assert not math.isnan(geometry.angle[0][1])
