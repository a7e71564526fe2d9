"""Fuzzing the JSON files hf_soup reads with valid JSON of the wrong shape: one line, exit 2, nothing written.

Each file starts from a valid document. A mutation replaces one place its declared shape (`hf_soup.jsonfile`,
`hf_soup.record.RECORD`) describes, the whole document included, by a JSON value of a type that place does not allow
(lists, objects, scalars, null, huge numbers, very long strings, nested), or drops a required field. Every mutation is
a document the reader must refuse; each goes through the paths a user takes: `hf-soup cook` (loose folders and a
pantry), `hf-soup pantry list`, `hf-soup inspect`, the model card (`card_text`, `hf-soup plot report`) and
`hf-soup push` (offline: it must fail at reading the soup, before the network). Each must end in one line on stderr,
exit code 2, no output folder, no staging folder, every file byte for byte as it was.

Few examples per file and one set of tiny models per module keep the whole file to a few seconds.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import make_model, save_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_inputs import Bench, pantry_state, snapshot

from hf_soup import Pantry, SoupBuilder
from hf_soup.atomic import STAGING_PREFIX
from hf_soup.card import card_text
from hf_soup.cli import main
from hf_soup.errors import SoupError
from hf_soup.jsonfile import MODEL_FILES, Shape, check, shape
from hf_soup.record import RECORD

FUZZ = settings(
    max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
LONG = "x" * 100_000
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.just(10**400)  # valid JSON, too large for a float
    | st.floats()  # NaN and infinities included (Python's json reads them)
    | st.text(max_size=8)
    | st.just(LONG)
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)

# The ledger's shape as `Ingredient.from_dict` checks it (pantry.py keeps its own checks and messages).
OPTIONAL_STRING = shape("string", "null")
LEDGER = shape(
    "object",
    required=("ingredients",),
    fields={
        "format": shape("integer"),
        "ingredients": shape(
            "list",
            each=shape(
                "object",
                required=("id", "path"),
                fields={
                    "id": shape("string"),
                    "path": shape("string"),
                    "sha256": shape("object", each=shape("string")),
                    "value": shape("number", "null"),
                    "greater_is_better": shape("boolean", "null"),
                    "step": shape("integer", "null"),
                    "hyperparameters": shape("object"),
                    "tags": shape("object"),
                    "size": shape("integer"),
                    "created_at": shape("string"),
                    **{name: OPTIONAL_STRING for name in ("metric", "split", "run", "base_model", "config_hash")},
                },
            ),
        ),
    },
)


def places(value, declared: Shape, path=()):
    """(path, shape) of every place `declared` describes in `value`: the value itself, each declared field (absent
    ones too: a mutation adds them), each list item and each free value of an object."""
    yield path, declared
    if isinstance(value, dict) and declared.allows(value):
        for key, inner in declared.fields.items():
            yield from places(value[key], inner, (*path, key)) if key in value else [((*path, key), inner)]
        if declared.each is not None:
            for key, item in value.items():
                if key not in declared.fields:
                    yield from places(item, declared.each, (*path, key))
    elif isinstance(value, list) and declared.each is not None:
        for number, item in enumerate(value):
            yield from places(item, declared.each, (*path, number))


def required(value, declared: Shape):
    """The path of every required field `value` has (a mutation drops one)."""
    for place, inner in places(value, declared):
        container = value
        for key in place:
            container = container[key] if isinstance(container, (dict, list)) and key in _keys(container) else None
        if isinstance(container, dict):
            yield from ((*place, key) for key in inner.required if key in container)


def _keys(container):
    return container if isinstance(container, dict) else range(len(container))


def replaced(document, path, value):
    if not path:
        return value
    document = copy.deepcopy(document)
    container = document
    for key in path[:-1]:
        container = container[key]
    container[path[-1]] = value
    return document


def dropped(document, path):
    document = copy.deepcopy(document)
    container = document
    for key in path[:-1]:
        container = container[key]
    del container[path[-1]]
    return document


def wrong_documents(document, declared: Shape):
    """Documents that differ from the valid `document` in one place, in a way `declared` does not allow."""
    spots = list(places(document, declared))
    mutations = st.sampled_from(spots).flatmap(
        lambda spot: VALUES.filter(lambda value: not spot[1].allows(value)).map(
            lambda value: replaced(document, spot[0], value)
        )
    )
    drops = sorted(set(required(document, declared)), key=str)
    return mutations | st.sampled_from(drops).map(lambda path: dropped(document, path)) if drops else mutations


VALID = {
    "generation_config.json": {"bos_token_id": 1, "eos_token_id": [2, 3], "max_length": 20, "temperature": 0.7},
    "tokenizer_config.json": {
        "model_max_length": 512,
        "pad_token": "<pad>",
        "eos_token": {"content": "</s>", "lstrip": False},
        "additional_special_tokens": ["<a>", {"content": "<b>"}],
        "added_tokens_decoder": {"0": {"content": "<pad>", "special": True}},
        "tokenizer_class": "PreTrainedTokenizerFast",
    },
    "special_tokens_map.json": {
        "pad_token": "<pad>",
        "eos_token": {"content": "</s>"},
        "additional_special_tokens": [],
    },
}


@pytest.fixture(scope="module")
def stock(tmp_path_factory) -> Path:
    """run0, run1 (llama, with tokenizer and generation files), a sharded run, a base, two LoRA adapters of it and a
    uniform soup with every section a strategy soup has."""
    root = tmp_path_factory.mktemp("stock")
    for name, seed in (("run0", 0), ("run1", 1), ("base", None)):
        save_model(make_model("llama", seed), root / name)
    save_model(make_model("llama", 3), root / "sharded", max_shard_size="20KB")
    for name, document in VALID.items():
        for run in ("run0", "run1"):
            (root / run / name).write_text(json.dumps(document))
    bench = Bench(root, root)
    for n in range(2):
        bench.lora(f"lora{n}", "base", n)
        config = json.loads((root / f"lora{n}" / "adapter_config.json").read_text())
        config.update(alpha_pattern={"q_proj": 8}, rank_pattern={"q_proj": 2}, modules_to_save=None, r=2)
        (root / f"lora{n}" / "adapter_config.json").write_text(json.dumps(config))
    soup = SoupBuilder([root / "run0", root / "run1"], method="uniform").cook(root / "soup", progress=False)
    record = json.loads((soup.path / "soup.json").read_text())
    scores = {"validation": 0.8100000023841858, "test": 0.5}
    record["recipe"]["evaluation"] = {"task": "causal-lm", "dataset": {"load_from_disk": "data"}}
    record["report"] = {
        "metric": "accuracy",
        "greater_is_better": True,
        "selection_split": "validation",
        "splits": ["validation", "test"],
        "best_individual": "run0",
        "rows": {"best individual": scores, "greedy": scores},
        "individuals": {"run0": scores, "run1": scores},
        "greedy_ensemble": ["run0"],
    }
    record["strategy"] = {
        "name": "greedy",
        "selection_split": "validation",
        "score": 0.81,
        "chosen": ["run0"],
        "evaluations": 2,
        "trace": [{"id": "run0", "score": 0.81, "accepted": True, "soup_size": 1, "alpha": 1.0}],
        "history": [{"trial": 0, "state": "COMPLETE", "score": 0.8, "parameters": {"density": 0.5}}],
        "sampler": "tpe",
        "merge": "ties",
        "best_trial": 0,
        "best_parameters": {"density": 0.5},
        "fixed": {},
        "resumed_trials": 0,
        "alpha_mean": [0.5, 0.5],
        "loss_per_epoch": [0.2],
        "beta": 1.0,
    }
    record["task_vectors"] = {
        "ids": ["run0", "run1"],
        "reference": "mean of the ingredients",
        **{name: [[1.0, None], [None, 1.0]] for name in ("cosine", "angle", "l2", "weight_cosine")},
        "tensors": 3,
    }
    (soup.path / "soup.json").write_text(json.dumps(record))
    (soup.path / "README.md").unlink()  # push generates the card: the card's reading is on the push path
    return root


@pytest.fixture(scope="module")
def bench(stock, tmp_path_factory) -> Bench:
    """One folder for every example of the module: the stock copied once, plus a pantry of run0 and run1."""
    root = tmp_path_factory.mktemp("bench")
    for name in ("run0", "run1", "sharded", "base", "lora0", "lora1", "soup"):
        shutil.copytree(stock / name, root / name)
    pantry = Pantry(root / "pantry")
    for name in ("run0", "run1"):
        pantry.add(root / name, run=name, ingredient_id=name, metric="eval_loss", value=1.0, step=1)
    for name, recipe in {
        "full.yaml": {"method": "uniform", "ingredients": ["run0", "run1"], "output": "out"},
        "sharded.yaml": {"method": "uniform", "ingredients": ["run0", "sharded"], "output": "out"},
        "lora.yaml": {"method": "uniform", "ingredients": ["lora0", "lora1"], "output": "out"},
        "pantry.yaml": {"method": "uniform", "pantry": "pantry", "output": "out"},
    }.items():
        (root / name).write_text(yaml.safe_dump(recipe))
    return Bench(root, stock)


def refused(bench: Bench, argv: list[str], capsys, *, path: Path, document) -> str:
    """Write `document` as `path`, run `hf-soup argv`: exit 2, one line, nothing written or changed; the file is put
    back afterwards. Returns the error line."""
    original = path.read_bytes() if path.exists() else None
    path.write_text(json.dumps(document))
    try:
        before, pantry_before = snapshot(bench.root), pantry_state(bench.root / "pantry")
        capsys.readouterr()
        code = main(argv)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2, captured.err[-2000:]
        assert len(lines) == 1 and lines[0].startswith("hf-soup: error: "), captured.err[-2000:]
        assert len(lines[0]) < 2000, "the message quotes too much"
        assert not (bench.root / "out").exists(), "an output folder appeared"
        assert not list(bench.root.rglob(f"{STAGING_PREFIX}*")), "a staging folder was left behind"
        assert pantry_state(bench.root / "pantry") == pantry_before, "the pantry changed"
        assert snapshot(bench.root) == before, "files changed"
        return lines[0]
    finally:
        if original is None:
            path.unlink()
        else:
            path.write_bytes(original)


def valid(stock: Path, folder: str, name: str):
    return json.loads((stock / folder / name).read_text())


# Where each model file sits in the stock, and the recipe a cook of it takes.
COOKED = {
    "config.json": ("run1", "full.yaml"),
    "generation_config.json": ("run1", "full.yaml"),
    "tokenizer_config.json": ("run0", "full.yaml"),
    "special_tokens_map.json": ("run1", "full.yaml"),
    "adapter_config.json": ("lora1", "lora.yaml"),
    "model.safetensors.index.json": ("sharded", "sharded.yaml"),
}


def test_the_valid_documents_pass(stock):
    for name, (folder, _) in COOKED.items():
        check(valid(stock, folder, name), MODEL_FILES[name][0], name, "fix")
    check(valid(stock, "soup", "soup.json"), RECORD, "soup.json", "fix")
    assert "| greedy | 0.8100 | 0.5000 |" in card_text(stock / "soup")


@pytest.mark.parametrize("name", sorted(COOKED))
def test_cook_refuses_wrong_shapes(name, stock, bench, capsys):
    folder, recipe = COOKED[name]

    @FUZZ
    @given(document=wrong_documents(valid(stock, folder, name), MODEL_FILES[name][0]))
    def run(document):
        line = refused(
            bench,
            ["cook", str(bench.root / recipe), "--quiet"],
            capsys,
            path=bench.root / folder / name,
            document=document,
        )
        assert name in line

    run()


@pytest.mark.parametrize("name", ["config.json", "adapter_config.json", "model.safetensors.index.json"])
def test_inspect_refuses_wrong_shapes(name, stock, bench, capsys):
    folder, _ = COOKED[name]
    other = {"run1": "run0", "lora1": "lora0", "sharded": "run0"}[folder]

    @FUZZ
    @given(document=wrong_documents(valid(stock, folder, name), MODEL_FILES[name][0]))
    def run(document):
        argv = ["inspect", str(bench.root / other), str(bench.root / folder)]
        assert name in refused(bench, argv, capsys, path=bench.root / folder / name, document=document)

    run()


def test_pantry_refuses_wrong_ledgers(bench, capsys):
    ledger = bench.root / "pantry" / "pantry.json"

    @FUZZ
    @given(document=wrong_documents(json.loads(ledger.read_text()), LEDGER))
    def run(document):
        assert "pantry.json" in refused(
            bench, ["pantry", "list", str(bench.root / "pantry")], capsys, path=ledger, document=document
        )
        refused(bench, ["cook", str(bench.root / "pantry.yaml"), "--quiet"], capsys, path=ledger, document=document)

    run()


def test_pantry_refuses_wrong_ingredient_files(stock, bench, capsys, tmp_path):
    """A wrong config in a pantry's ingredient stops a cook from the pantry; one in a run stops `Pantry.add`."""
    name = "config.json"
    run_folder = tmp_path / "run"
    shutil.copytree(stock / "run1", run_folder)
    pantry = Pantry(bench.root / "pantry")

    @FUZZ
    @given(document=wrong_documents(valid(stock, "run1", name), MODEL_FILES[name][0]))
    def run(document):
        inside = bench.root / "pantry" / "ingredients" / "run1" / name
        refused(bench, ["cook", str(bench.root / "pantry.yaml"), "--quiet"], capsys, path=inside, document=document)
        (run_folder / name).write_text(json.dumps(document))
        before = snapshot(pantry.root)
        with pytest.raises(SoupError) as error:
            pantry.add(run_folder, run="again")
        assert len(str(error.value).splitlines()) == 1 and name in str(error.value)
        assert snapshot(pantry.root) == before

    run()


@pytest.mark.parametrize("name", ["soup.json", "config.json"])
def test_card_plot_and_push_refuse_wrong_soup_files(name, stock, bench, capsys):
    soup = bench.root / "soup"
    declared = RECORD if name == "soup.json" else MODEL_FILES[name][0]

    @FUZZ
    @given(document=wrong_documents(valid(stock, "soup", name), declared))
    def run(document):
        line = refused(bench, ["push", str(soup), "me/soup"], capsys, path=soup / name, document=document)
        assert name in line and "offline" not in line  # refused at reading the soup, before any network use
        refused(bench, ["plot", "report", str(soup)], capsys, path=soup / name, document=document)
        original = (soup / name).read_bytes()
        (soup / name).write_text(json.dumps(document))
        try:
            with pytest.raises(SoupError) as error:
                card_text(soup)
            assert len(str(error.value).splitlines()) == 1
        finally:
            (soup / name).write_bytes(original)

    run()


def test_a_valid_soup_reaches_the_offline_refusal(bench, capsys):
    """The push above stopped at reading; a valid soup goes on to the offline check (so none touched the network)."""
    assert main(["push", str(bench.root / "soup"), "me/soup"]) == 2
    assert "offline mode" in capsys.readouterr().err


def test_trainer_state_is_never_read(stock, tmp_path):
    """hf_soup does not read trainer_state.json (the Trainer does): a cook leaves it out, whatever it holds."""
    for name in ("run0", "run1"):
        shutil.copytree(stock / name, tmp_path / name)
        (tmp_path / name / "trainer_state.json").write_text("[1, 2]")
    soup = SoupBuilder([tmp_path / "run0", tmp_path / "run1"]).cook(tmp_path / "soup", progress=False)
    assert not (soup.path / "trainer_state.json").exists()


def test_a_tokenizer_transformers_cannot_load_is_one_line(tmp_path):
    """The tokenizer a scorer needs: a wrong shape is refused before Transformers reads it; what Transformers still
    refuses becomes one line naming the folder."""
    from hf_soup.preparation import saved_tokenizer

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": ["<pad>"]}))
    with pytest.raises(SoupError, match=r"tokenizer_config.json: field pad_token must be .* found a list"):
        saved_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchTokenizerFast"}))
    with pytest.raises(SoupError, match="cannot load the tokenizer saved in") as error:
        saved_tokenizer(tmp_path)
    assert len(str(error.value).splitlines()) == 1 and str(tmp_path) in str(error.value)
