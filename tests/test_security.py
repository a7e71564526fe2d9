"""Security guarantees: no pickle is loaded without opt-in (and then only with `weights_only=True`), no remote code
runs without opt-in, nothing is uploaded by a cook. Paths that leave a pantry (`../`, absolute, a symlink) or a
checkpoint folder (a shard index naming `../x`) are refused in the table of tests/test_bad_inputs.py."""

from __future__ import annotations

import ast
import json
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import Payload, edit_config, make_split, state_dict_of

import hf_soup
from hf_soup.cli import main
from hf_soup.recipe import Recipe

PACKAGE = Path(hf_soup.__file__).parent
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def dotted(node: ast.AST) -> str:
    """`torch.load` for the expression `torch.load`; '' for anything that is not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}" if dotted(node.value) else ""
    return ""


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_constant(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loads(source: str) -> list[str]:
    """What in `source` could unpickle without the user's opt-in: `torch.load` without `weights_only=True`, any
    `weights_only=False`, pickle-family modules, `numpy.load(allow_pickle=True)`, `use_safetensors=False`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"line {node.lineno}: imports {m}" for m in modules if m.split(".")[0] in PICKLE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        if name == "torch.load" and not is_constant(keyword(node, "weights_only"), True):
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        if is_constant(keyword(node, "weights_only"), False) or is_constant(keyword(node, "use_safetensors"), False):
            found.append(f"line {node.lineno}: {name} loads pickles")
        if name in ("numpy.load", "np.load") and is_constant(keyword(node, "allow_pickle"), True):
            found.append(f"line {node.lineno}: {name}(allow_pickle=True)")
    return found


def remote_code_defaults(source: str) -> list[str]:
    """Every place in `source` where `trust_remote_code` could become true without the user saying so: a call that
    passes a literal other than False (passing a variable along is fine), a parameter or field defaulting to
    anything but False."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            value = keyword(node, "trust_remote_code")
            if isinstance(value, ast.Constant) and value.value is not False:
                found.append(f"line {node.lineno}: {dotted(node.func)}(trust_remote_code={value.value!r})")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            positional = arguments.posonlyargs + arguments.args
            pairs = list(zip(positional[len(positional) - len(arguments.defaults) :], arguments.defaults))
            pairs += [(a, d) for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults) if d is not None]
            for argument, default in pairs:
                if argument.arg == "trust_remote_code" and not is_constant(default, False):
                    found.append(f"line {node.lineno}: {node.name}(trust_remote_code={ast.unparse(default)})")
        if isinstance(node, ast.AnnAssign) and dotted(node.target) == "trust_remote_code":
            if node.value is not None and not is_constant(node.value, False):
                found.append(f"line {node.lineno}: field trust_remote_code = {ast.unparse(node.value)}")
    return found


def package_sources() -> dict[str, str]:
    return {str(path.relative_to(PACKAGE)): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def test_the_scanners_find_what_they_look_for():
    assert unsafe_loads("import torch\nstate = torch.load(path)\n") == ["line 2: torch.load without weights_only=True"]
    assert unsafe_loads("torch.load(path, weights_only=True, mmap=True)\n") == []
    assert len(unsafe_loads("torch.load(path, weights_only=False)\n")) == 2
    assert unsafe_loads("import pickle\n") == ["line 1: imports pickle"]
    assert unsafe_loads("from dill import loads\n") == ["line 1: imports dill"]
    assert unsafe_loads("np.load(f, allow_pickle=True)\n") == ["line 1: np.load(allow_pickle=True)"]
    assert unsafe_loads("Auto.from_pretrained(d, use_safetensors=False)\n") == [
        "line 1: Auto.from_pretrained loads pickles"
    ]
    assert remote_code_defaults("f(d, trust_remote_code=True)\n") == ["line 1: f(trust_remote_code=True)"]
    assert remote_code_defaults("f(d, trust_remote_code=flag)\nf(d, trust_remote_code=False)\n") == []
    assert remote_code_defaults("def f(*, trust_remote_code=True): pass\n") == ["line 1: f(trust_remote_code=True)"]
    assert remote_code_defaults("def f(a, trust_remote_code=None): pass\n") == ["line 1: f(trust_remote_code=None)"]
    assert remote_code_defaults("class C:\n    trust_remote_code: bool = True\n") == [
        "line 2: field trust_remote_code = True"
    ]


def test_no_pickle_is_loaded_without_weights_only_anywhere_in_the_package():
    sources = package_sources()
    assert "checkpoint.py" in sources and "torch.load(" in sources["checkpoint.py"]  # the scan sees the one loader
    found = {name: unsafe_loads(source) for name, source in sources.items()}
    assert {name: problems for name, problems in found.items() if problems} == {}


def test_trust_remote_code_is_false_unless_passed_along_from_the_user():
    sources = package_sources()
    assert sum(source.count("trust_remote_code=trust_remote_code") for source in sources.values()) >= 3
    found = {name: remote_code_defaults(source) for name, source in sources.items()}
    assert {name: problems for name, problems in found.items() if problems} == {}
    evaluation = {"dataset": {"path": "csv"}, "selection_split": "validation"}
    recipe = Recipe.from_mapping({"method": "greedy", "ingredients": ["a"], "evaluation": evaluation})
    assert recipe.trust_remote_code is False and recipe.allow_pickle is False
    assert recipe.evaluation.trust_remote_code is False


def write_recipe(folder: Path, **keys) -> str:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output": "soup", **keys}))
    return str(path)


def to_pickle(folder: Path) -> Path:
    """Turn a safetensors ingredient into a pickle (`pytorch_model.bin`) one."""
    torch.save(state_dict_of(folder), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_an_opted_in_pickle_is_read_with_weights_only(tmp_path, make_ingredients, monkeypatch, capsys):
    folders = make_ingredients(2)
    ingredients = [folder.name for folder in folders]
    assert main(["cook", write_recipe(tmp_path, method="uniform", ingredients=ingredients), "--quiet"]) == 0
    expected = state_dict_of(tmp_path / "soup")
    to_pickle(folders[1])
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    recipe = write_recipe(tmp_path, method="uniform", ingredients=ingredients, allow_pickle=True, output="pickled")
    assert main(["cook", recipe, "--quiet"]) == 0
    assert calls == [True]
    got = state_dict_of(tmp_path / "pickled")
    assert got.keys() == expected.keys() and all(torch.equal(got[name], expected[name]) for name in expected)


def test_a_pickle_payload_never_runs_even_with_allow_pickle(tmp_path, make_ingredients, capsys):
    folders = make_ingredients(2)
    marker = tmp_path / "pwned"
    path = folders[1] / "pytorch_model.bin"
    torch.save({"model.norm.weight": torch.ones(32), "payload": Payload(marker)}, path)
    (folders[1] / "model.safetensors").unlink()
    torch.load(path, weights_only=False)  # the control: an unrestricted unpickling runs the payload
    assert marker.is_dir()
    marker.rmdir()
    ingredients = [folder.name for folder in folders]
    assert main(["cook", write_recipe(tmp_path, method="uniform", ingredients=ingredients), "--quiet"]) == 2
    assert "pickle checkpoint" in capsys.readouterr().err
    recipe = write_recipe(tmp_path, method="uniform", ingredients=ingredients, allow_pickle=True)
    assert main(["cook", recipe, "--quiet"]) == 2
    assert "GLOBAL posix.mkdir" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "soup").exists()


def test_remote_code_configs_cook_only_on_opt_in_and_their_code_never_runs(tmp_path, make_ingredients, capsys):
    """A data-free soup of custom-code models copies the code files along and never imports them."""
    marker = tmp_path / "imported"
    folders = make_ingredients(2)
    for folder in folders:
        edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"})
        (folder / "modeling_evil.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    ingredients = [folder.name for folder in folders]
    assert main(["cook", write_recipe(tmp_path, method="uniform", ingredients=ingredients), "--quiet"]) == 2
    assert "trust_remote_code: true" in capsys.readouterr().err
    recipe = write_recipe(tmp_path, method="uniform", ingredients=ingredients, trust_remote_code=True)
    assert main(["cook", recipe, "--quiet"]) == 0
    assert (tmp_path / "soup" / "modeling_evil.py").is_file()
    assert not marker.exists()


def test_a_hub_metric_is_loaded_only_on_opt_in(monkeypatch):
    """An evaluate module from the Hub is downloaded Python code: refused unless trust_remote_code is set."""
    import evaluate

    from hf_soup import SoupError
    from hf_soup.scoring import make_metric
    from hf_soup.tasks import get_task

    loaded = []

    def load(name, **kwargs):
        loaded.append(name)
        return SimpleNamespace(name="f1", compute=lambda **kwargs: {"f1": 1.0})

    monkeypatch.setattr(evaluate, "load", load)
    task = get_task("sequence-classification")
    with pytest.raises(SoupError, match="metric 'someone/f1' is not built in .* trust_remote_code: true"):
        make_metric("someone/f1", task=task, greater_is_better=True)
    assert loaded == []
    metric = make_metric("someone/f1", task=task, greater_is_better=True, trust_remote_code=True)
    assert metric.name == "f1" and metric.compute([(torch.eye(2), torch.arange(2))], False) == 1.0
    assert loaded == ["someone/f1"]


UPLOADS = (
    "create_commit",
    "create_repo",
    "create_branch",
    "upload_file",
    "upload_folder",
    "upload_large_folder",
    "preupload_lfs_files",
    "create_pull_request",
)


@pytest.fixture
def no_network(monkeypatch):
    """Every Hub upload function raises, and every attempt to open an internet connection is recorded (and
    refused); yields the list of attempts."""
    import huggingface_hub
    from huggingface_hub import hf_api

    def upload(*args, **kwargs):
        raise AssertionError("a cook tried to upload to the Hub")

    patched = [(owner, name) for name in UPLOADS for owner in (hf_api.HfApi, huggingface_hub, hf_api)]
    for owner, name in patched:
        if hasattr(owner, name):
            monkeypatch.setattr(owner, name, upload)
    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError("network is off in this test")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def test_the_network_guard_catches_uploads_and_connections(no_network, tmp_path):
    import huggingface_hub

    with pytest.raises(AssertionError, match="tried to upload"):
        huggingface_hub.HfApi().upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="a/b")
    with pytest.raises(AssertionError, match="tried to upload"):
        huggingface_hub.upload_folder(folder_path=str(tmp_path), repo_id="a/b")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    assert no_network == [("127.0.0.1", 9)]


def test_a_cook_uploads_nothing_and_opens_no_connection(no_network, tmp_path, make_ingredients, capsys):
    """A greedy cook does the most (resident model, scoring, report, figures, model card): still no network."""
    from datasets import DatasetDict

    folders = make_ingredients(2, kind="bert", num_labels=2)
    DatasetDict({"validation": make_split(16, 1), "test": make_split(16, 2)}).save_to_disk(str(tmp_path / "data"))
    evaluation = {"dataset": {"load_from_disk": "data"}, "selection_split": "validation", "report_splits": ["test"]}
    recipe = write_recipe(tmp_path, method="greedy", ingredients=[f.name for f in folders], evaluation=evaluation)
    assert main(["cook", recipe, "--quiet"]) == 0
    assert json.loads((tmp_path / "soup" / "soup.json").read_text())["method"] == "greedy"
    assert (tmp_path / "soup" / "README.md").is_file()
    assert no_network == []
