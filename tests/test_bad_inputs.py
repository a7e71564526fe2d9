"""Bad inputs through the CLI, as a table.

Each case builds what it needs (copies of tiny models, damaged on purpose, a pantry, a dataset) and a recipe that
`hf-soup cook` must refuse: exit code 2, ONE line on stderr that names the offending input and says how to fix it,
nothing on stdout, no output folder, no staging folder left beside it, and every file the case was given (the
pantry included) byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    Payload,
    edit_config,
    edit_weights,
    make_model,
    make_split,
    save_model,
    state_dict_of,
    word_tokenizer,
)
from safetensors.torch import load_file, save_file

from hf_soup import Pantry, SoupBuilder
from hf_soup.atomic import STAGING_PREFIX
from hf_soup.cli import main

LORA_MODULE = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def stock(tmp_path_factory) -> Path:
    """Folders built once and copied into each case: llama runs and base, BERT classifiers, a llama with another
    vocabulary, a sharded llama, and a dataset saved to disk."""
    from datasets import DatasetDict

    root = tmp_path_factory.mktemp("stock")
    save_model(make_model("llama", 0), root / "run0")
    save_model(make_model("llama", 1), root / "run1")
    save_model(make_model("llama", None), root / "base")
    save_model(make_model("llama", 2, vocab_size=128), root / "vocab128")
    save_model(make_model("llama", 3), root / "sharded", max_shard_size="20KB")
    save_model(make_model("bert", 0, num_labels=2), root / "bert0")
    save_model(make_model("bert", 1, num_labels=2), root / "bert1")
    DatasetDict({"validation": make_split(16, 1), "test": make_split(16, 2)}).save_to_disk(str(root / "data"))
    SoupBuilder([root / "run0", root / "run1"], method="uniform").cook(root / "soup_uniform", progress=False)
    return root


@dataclass
class Bench:
    """The folder of one case, and the stock it copies from."""

    root: Path
    stock: Path

    def take(self, name: str, as_name: str | None = None) -> str:
        """Copy a stock folder into the case; returns its name, which is its path relative to the recipe."""
        shutil.copytree(self.stock / name, self.root / (as_name or name), symlinks=True)
        return as_name or name

    def pantry(self, *names: str) -> Pantry:
        """A pantry holding copies of the named stock folders, with those names as ids."""
        pantry = Pantry(self.root / "pantry")
        for name in names:
            pantry.add(self.root / self.take(name, f"runs-{name}"), run=name, ingredient_id=name)
        return pantry

    def edit_ledger(self, pantry: Pantry, change) -> None:
        """Rewrite pantry.json after `change(data)` has edited it in place."""
        data = json.loads(pantry.ledger.read_text())
        change(data)
        pantry.ledger.write_text(json.dumps(data))

    def lora(self, name: str, base: str, seed: int) -> str:
        """A peft LoRA adapter folder (rank 2 on layer 0's q_proj) trained, so it says, on the folder `base`."""
        folder = self.root / name
        folder.mkdir()
        generator = torch.Generator().manual_seed(seed)
        tensors = {
            f"{LORA_MODULE}.lora_A.weight": torch.randn(2, 32, generator=generator),
            f"{LORA_MODULE}.lora_B.weight": torch.randn(32, 2, generator=generator),
        }
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": 2,
            "lora_alpha": 4,
            "target_modules": ["q_proj"],
            "bias": "none",
            "base_model_name_or_path": str(self.root / base),
        }
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return name

    def tokenizer(self, folder: str, *added: str, **options) -> str:
        """Save a tiny word tokenizer (`conftest.word_tokenizer`) into a case folder; returns the folder's name."""
        word_tokenizer(added, **options).save_pretrained(self.root / folder)
        return folder

    def shard(self, folder: str, number: int) -> Path:
        return sorted((self.root / folder).glob("model-*.safetensors"))[number]


@dataclass
class Command:
    """What a case returns to run another `hf-soup` command than `cook` (the arguments after `hf-soup`)."""

    argv: list[str]


def write_json(path: Path, value) -> None:
    """Write `value` as the JSON file `path` (valid JSON, whatever its shape)."""
    path.write_text(json.dumps(value))


def recipe(*ingredients: str, method: str = "uniform", **keys) -> dict:
    return {"method": method, "ingredients": list(ingredients), "output": "soup", **keys}


def greedy(bench: Bench, **evaluation) -> dict:
    """A greedy recipe over two BERT classifiers, scored on the stock dataset."""
    section = {"dataset": {"load_from_disk": bench.take("data")}, "selection_split": "validation", **evaluation}
    return recipe(bench.take("bert0"), bench.take("bert1"), method="greedy", evaluation=section)


CASES = []


def case(*says: str):
    """Register a case: a function that sets up the bench and returns the recipe (a mapping, YAML text or bytes;
    `None` writes no recipe file), or a `Command` to run instead of `cook`. `says` are substrings the error line
    must hold."""

    def register(function):
        CASES.append(pytest.param(function, says, id=function.__name__))
        return function

    return register


# -- weight files ------------------------------------------------------------------------------------------------


@case("ingredient run1", "model.safetensors is not a valid safetensors file", "copy or save it again")
def garbage_safetensors(b: Bench):
    generator = torch.Generator().manual_seed(0)
    garbage = torch.randint(0, 256, (4096,), generator=generator, dtype=torch.uint8).numpy().tobytes()
    (b.root / b.take("run1") / "model.safetensors").write_bytes(garbage)
    return recipe(b.take("run0"), "run1")


@case("ingredient run1", "model.safetensors is not a valid safetensors file", "truncated or corrupt")
def truncated_safetensors(b: Bench):
    path = b.root / b.take("run1") / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    return recipe(b.take("run0"), "run1")


@case("ingredient run1", "model.safetensors is not a valid safetensors file", "copy or save it again")
def empty_safetensors(b: Bench):
    (b.root / b.take("run1") / "model.safetensors").write_bytes(b"")
    return recipe(b.take("run0"), "run1")


@case("model.safetensors.index.json", "sharded", "not valid JSON", "re-save the checkpoint")
def index_not_json(b: Bench):
    (b.root / b.take("sharded") / "model.safetensors.index.json").write_text("{not json")
    return recipe(b.take("run0"), "sharded")


@case("model.safetensors.index.json", "weight_map", "re-save the checkpoint")
def index_without_weight_map(b: Bench):
    (b.root / b.take("sharded") / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return recipe(b.take("run0"), "sharded")


@case("model.safetensors.index.json", "weight_map", "re-save the checkpoint")
def index_weight_map_of_numbers(b: Bench):
    (b.root / b.take("sharded") / "model.safetensors.index.json").write_text('{"weight_map": {"a": 1, "b": [2]}}')
    return recipe(b.take("run0"), "sharded")


@case("model-00002-of-", "is missing", "copy it again")
def shard_missing(b: Bench):
    b.shard(b.take("sharded"), 1).unlink()
    return recipe(b.take("run0"), "sharded")


@case("missing-00009.safetensors", "is missing", "copy it again")
def index_names_missing_shard(b: Bench):
    index = b.root / b.take("sharded") / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = "missing-00009.safetensors"
    index.write_text(json.dumps(data))
    return recipe(b.take("run0"), "sharded")


@case("ingredient sharded", "maps tensor ghost.weight", "does not hold it", "re-save the checkpoint")
def index_names_absent_tensor(b: Bench):
    index = b.root / b.take("sharded") / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = b.shard("sharded", 0).name
    index.write_text(json.dumps(data))
    return recipe(b.take("run0"), "sharded")


@case("'../run0/model.safetensors'", "not a file in the same folder")
def index_shard_outside_its_folder(b: Bench):
    index = b.root / b.take("sharded") / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = "../run0/model.safetensors"
    index.write_text(json.dumps(data))
    return recipe(b.take("run0"), "sharded")


@case("no weights in", "empty", "found: config.json", "model.safetensors")
def folder_without_weights(b: Bench):
    (b.root / "empty").mkdir()
    shutil.copy(b.stock / "run0" / "config.json", b.root / "empty")
    return recipe(b.take("run0"), "empty")


@case("run1", "config.json is not valid JSON", "save the model again")
def config_not_json(b: Bench):
    (b.root / b.take("run1") / "config.json").write_text("{'model_type': llama")
    return recipe(b.take("run0"), "run1")


@case("ingredient run1: tensor model.norm.weight has shape [16]", "run0 has [32]", "one architecture")
def mismatched_shapes(b: Bench):
    edit_weights(b.root / b.take("run1"), lambda state: state.update({"model.norm.weight": torch.ones(16)}))
    return recipe(b.take("run0"), "run1")


@case("ingredient run1 lacks model.norm.weight", "compared with run0", "same tensors")
def mismatched_names(b: Bench):
    edit_weights(
        b.root / b.take("run1"), lambda state: state.update({"model.final_norm": state.pop("model.norm.weight")})
    )
    return recipe(b.take("run0"), "run1")


@case("ingredient bert0 has model_type 'bert' but run0 has 'llama'", "one architecture")
def different_architectures(b: Bench):
    return recipe(b.take("run0"), b.take("bert0"))


@case("ingredient b/ft_00 has model_type 'bert' but a/ft_00 has 'llama'", "one architecture")
def different_architectures_in_same_named_folders(b: Bench):
    return recipe(b.take("run0", "a/ft_00"), b.take("bert0", "b/ft_00"))


@case("ingredient vocab128: tensor lm_head.weight has shape [128, 32]", "run0 has [64, 32]", "vocab size")
def different_vocab_sizes(b: Bench):
    return recipe(b.take("run0"), b.take("vocab128"))


# -- vocabularies (tokenizer:) -------------------------------------------------------------------------------------

CHAT = ("<|im_start|>", "<|im_end|>")


@case("the tokenizers differ: run1 has 2 token(s) run0 lacks ('<|im_start|>', '<|im_end|>')", "tokenizer: union")
def tokenizers_differ_without_a_choice(b: Bench):
    return recipe(b.tokenizer(b.take("run0")), b.tokenizer(b.take("run1"), *CHAT))


@case("tokenizer: union: run1 has 'w1' at id 3 where run0 has 'w0'", "must mean the same token", "cannot be merged")
def union_of_tokenizers_that_disagree_on_an_id(b: Bench):
    return recipe(b.tokenizer(b.take("run0")), b.tokenizer(b.take("run1"), swap=True), tokenizer="union")


@case("tokenizer: union: run0 has 'w0' at id 3 where base_model has 'w1'", "must mean the same token")
def union_with_a_base_of_another_tokenizer(b: Bench):
    b.tokenizer(b.take("base"), swap=True)
    return recipe(
        b.tokenizer(b.take("run0")), b.tokenizer(b.take("run1"), *CHAT), tokenizer="union", base_model="base"
    )


@case("ingredient run1: cannot load the tokenizer saved in", "data did not match", "save the tokenizer again")
def union_with_a_tokenizer_that_fails_to_load(b: Bench):
    path = b.root / b.tokenizer(b.take("run1"), *CHAT) / "tokenizer.json"
    data = json.loads(path.read_text())
    data["model"]["type"] = "Unknown"  # written by another version, or damaged
    write_json(path, data)
    return recipe(b.tokenizer(b.take("run0")), "run1", tokenizer="union")


@case("tokenizer: union: the chat templates differ (run0 have one; run1 have one)", "chat_template: <ingredient id")
def union_with_differing_chat_templates(b: Bench):
    run0 = b.tokenizer(b.take("run0"), template="{{ messages[0]['content'] }}")
    return recipe(run0, b.tokenizer(b.take("run1"), *CHAT, template="<|im_start|>"), tokenizer="union")


@case("tokenizer: union: run1 has no tokenizer files", "tokenizer.save_pretrained")
def union_with_an_ingredient_without_tokenizer(b: Bench):
    return recipe(b.tokenizer(b.take("run0")), b.take("run1"), tokenizer="union")


@case("tokenizer: 'unoin' is not union, base or an ingredient id (run0, run1) (did you mean 'union'?)")
def tokenizer_choice_misspelt(b: Bench):
    return recipe(b.tokenizer(b.take("run0")), b.tokenizer(b.take("run1"), *CHAT), tokenizer="unoin")


@case("tokenizer: 'base' is not available", "add `base_model:`")
def tokenizer_base_without_base_model(b: Bench):
    return recipe(b.tokenizer(b.take("run0")), b.tokenizer(b.take("run1"), *CHAT), tokenizer="base")


@case("tokenizer: rows: 'w5' is held by every model: there is no row to fill")
def tokenizer_rows_for_a_token_every_model_holds(b: Bench):
    folders = b.tokenizer(b.take("run0")), b.tokenizer(b.take("run1"), *CHAT)
    return recipe(*folders, tokenizer={"vocabulary": "union", "rows": {"w5": "mean"}})


@case(
    "tokenizer: rows: '<|im_start|>': 'run0' has no row for it", "choose mean or one of the models that have one: run1"
)
def tokenizer_rows_from_a_model_that_lacks_the_token(b: Bench):
    folders = b.tokenizer(b.take("run0")), b.tokenizer(b.take("run1"), *CHAT)
    return recipe(*folders, tokenizer={"vocabulary": "union", "rows": {"<|im_start|>": "run0"}})


@case("`tokenizer` must be a string or a mapping, got list ['union']")
def tokenizer_not_a_choice(b: Bench):
    return recipe(b.take("run0"), b.take("run1"), tokenizer=["union"])


@case("tokenizer: unknown key 'chat'", "keys: vocabulary (base, union or an ingredient id), chat_template")
def tokenizer_mapping_with_an_unknown_key(b: Bench):
    return recipe(b.take("run0"), b.take("run1"), tokenizer={"vocabulary": "union", "chat": "run1"})


@case("`tokenizer:` merges the vocabularies of full models", "remove `tokenizer:`")
def tokenizer_choice_for_adapters(b: Bench):
    b.take("base")
    return recipe(b.lora("lora0", "base", 0), b.lora("lora1", "base", 1), tokenizer="union")


@case("ingredient run1: non-floating tensor step differs from run0", "must be equal in every ingredient")
def integer_tensors_differ(b: Bench):
    edit_weights(b.root / b.take("run0"), lambda state: state.update({"step": torch.tensor([1, 2])}))
    edit_weights(b.root / b.take("run1"), lambda state: state.update({"step": torch.tensor([1, 3])}))
    return recipe("run0", "run1")


@case("ingredient run1: tensor model.norm.weight holds NaN or Inf", "leave it out")
def nan_in_weights(b: Bench):
    edit_weights(
        b.root / b.take("run1"), lambda state: state["model.norm.weight"].index_fill_(0, torch.tensor([3]), torch.nan)
    )
    return recipe(b.take("run0"), "run1")


@case("ingredient run0: tensor model.layers.1.mlp.up_proj.weight holds NaN or Inf", "leave it out")
def inf_in_weights(b: Bench):
    edit_weights(b.root / b.take("run0"), lambda state: state["model.layers.1.mlp.up_proj.weight"].fill_(-torch.inf))
    return recipe("run0", b.take("run1"), method="weighted", weights=[1, 2])


@case("ingredient lora1", f"{LORA_MODULE}.lora_B.weight", "NaN or Inf", "leave it out")
def nan_in_lora_adapter(b: Bench):
    b.take("base")
    b.lora("lora0", "base", 0)
    path = b.root / b.lora("lora1", "base", 1) / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[f"{LORA_MODULE}.lora_B.weight"][0, 0] = torch.nan
    save_file(tensors, str(path), metadata={"format": "pt"})
    return recipe("lora0", "lora1")


@case("ingredient lora1 was trained on base", "other", "different bases cannot be souped", "base_model_name_or_path")
def lora_adapters_of_different_bases(b: Bench):
    b.take("base")
    b.take("vocab128", "other")
    return recipe(b.lora("lora0", "base", 0), b.lora("lora1", "other", 1))


@case("ingredients run0 are full models but the others are peft adapters", "soup adapters with adapters")
def adapter_mixed_with_full_model(b: Bench):
    b.take("base")
    return recipe(b.lora("lora0", "base", 0), b.take("run0"))


@case("ingredient run0", "auto_map", "trust_remote_code: true")
def remote_code_without_opt_in(b: Bench):
    edit_config(b.root / b.take("run0"), auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"})
    return recipe("run0", b.take("run1"))


@case("ingredient base_model", "config.json has auto_map", "trust_remote_code: true")
def remote_code_base_of_adapters_without_opt_in(b: Bench):
    edit_config(b.root / b.take("base"), auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"})
    return recipe(b.lora("lora0", "base", 0), b.lora("lora1", "base", 1), base_model="base")


@case("pytorch_model.bin is a pickle checkpoint", "allow_pickle: true", "safetensors")
def pickle_without_opt_in(b: Bench):
    folder = b.root / b.take("run1")
    torch.save(state_dict_of(folder), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return recipe(b.take("run0"), "run1")


@case("ingredient run1: cannot load pytorch_model.bin with weights_only=True", "GLOBAL posix.mkdir", "never unpickled")
def malicious_pickle_with_opt_in(b: Bench):
    folder = b.root / b.take("run1")
    torch.save(
        {"model.norm.weight": torch.ones(32), "payload": Payload(b.root / "pwned")}, folder / "pytorch_model.bin"
    )
    (folder / "model.safetensors").unlink()
    return recipe(b.take("run0"), "run1", allow_pickle=True)  # the payload would add the folder `pwned`


@case("ingredient run0", "tokenizer_config.json has auto_map", "trust_remote_code: true")
def remote_code_tokenizer_without_opt_in(b: Bench):
    (b.root / b.take("run0") / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["x.T", None]}})
    )
    return recipe("run0", b.take("run1"))


# -- the recipe file -----------------------------------------------------------------------------------------------


@case("cannot read recipe", "recipe.yaml", "give a YAML file's path")
def recipe_missing(b: Bench):
    return None


@case("cannot read recipe", "recipe.yaml", "give a YAML file's path")
def recipe_is_a_folder(b: Bench):
    (b.root / "recipe.yaml").mkdir()
    return None


@case("recipe.yaml", "is not UTF-8 text", "save it as UTF-8")
def recipe_not_text(b: Bench):
    return b"method: uniform\ningredients: [\xff\xfe]\n"


@case("recipe.yaml", "is not valid YAML at line 3", "fix the YAML")
def invalid_yaml(b: Bench):
    return "method: uniform\ningredients: [run0\noutput: soup\n"


@case("recipe.yaml", "must be a mapping", "got list", "method:")
def yaml_list(b: Bench):
    return "- method: uniform\n- ingredients: [run0]\n"


@case("recipe.yaml", "must be a mapping", "got str", "method:")
def yaml_scalar(b: Bench):
    return "uniform soup of run0 and run1\n"


@case("recipe.yaml", "is empty", "method:")
def yaml_empty(b: Bench):
    return "# nothing yet\n"


@case("recipe.yaml", "needs `method:`", "method: uniform")
def no_method(b: Bench):
    return {"ingredients": [b.take("run0")], "output": "soup"}


@case("recipe.yaml", "unknown method 'avg'", "uniform", "greedy")
def unknown_method(b: Bench):
    return recipe(b.take("run0"), method="avg")


@case("recipe.yaml", "unknown method 'Uniform'", "did you mean 'uniform'?")
def unknown_method_close_to_one(b: Bench):
    return recipe(b.take("run0"), method="Uniform")


@case("recipe.yaml", "`method` must be a string", "got list")
def method_not_a_string(b: Bench):
    return recipe(b.take("run0"), method=["uniform", "ties"])


@case("recipe.yaml", "unknown key 'densty'", "did you mean 'density'?", "parameters of method 'ties'")
def unknown_parameter(b: Bench):
    return recipe(b.take("run0"), b.take("run1"), method="ties", base_model=b.take("base"), densty=0.5)


@case("recipe.yaml", "unknown key 'ouput'", "did you mean 'output'?")
def unknown_recipe_key(b: Bench):
    return {"method": "uniform", "ingredients": [b.take("run0")], "ouput": "soup"}


@case("recipe.yaml", "`ingredients` must be a list", "got str 'run0'")
def ingredients_not_a_list(b: Bench):
    return {"method": "uniform", "ingredients": b.take("run0"), "output": "soup"}


@case("recipe.yaml", "ingredients[1] must be a folder path (string)", "got 7")
def ingredient_not_a_string(b: Bench):
    return recipe(b.take("run0"), 7)


@case("the ingredient list is empty", "give at least one model folder")
def empty_ingredients(b: Bench):
    return recipe()


@case("ingredient run0 is listed twice", "list each once")
def duplicate_ingredients(b: Bench):
    return recipe(b.take("run0"), b.take("run1"), "./run0")


@case("ingredient", "nowhere", "does not exist", "check the path")
def ingredient_does_not_exist(b: Bench):
    return recipe(b.take("run0"), "nowhere")


@case("recipe.yaml", "either `ingredients:` or `pantry:`")
def ingredients_and_pantry(b: Bench):
    b.pantry("run0")
    return recipe(b.take("run1"), pantry="pantry")


@case("recipe.yaml", "`pantry` must be a string", "got int 5")
def pantry_not_a_string(b: Bench):
    return {"method": "uniform", "pantry": 5, "output": "soup"}


@case("recipe.yaml", "`base_model` must be a string", "got list ['base']")
def base_model_not_a_string(b: Bench):
    return recipe(b.take("run0"), b.take("run1"), method="ties", density=0.5, base_model=[b.take("base")])


@case("recipe.yaml", "`rank` must be an integer", "got str 'four'")
def rank_not_an_integer(b: Bench):
    return recipe(b.take("run0"), adapter_output="svd", rank="four")


@case("recipe.yaml", "dtype", "unknown dtype 'int8'", "bfloat16")
def dtype_unknown(b: Bench):
    return recipe(b.take("run0"), dtype="int8")


@case("recipe.yaml", "`dtype` must be a string", "got int 16")
def dtype_not_a_string(b: Bench):
    return recipe(b.take("run0"), dtype=16)


@case("recipe.yaml", "max_shard_size", "cannot read size 'huge'", "'5GB'")
def max_shard_size_unreadable(b: Bench):
    return recipe(b.take("run0"), max_shard_size="huge")


@case("recipe.yaml", "max_shard_size", "must be positive", "got 0")
def max_shard_size_zero(b: Bench):
    return recipe(b.take("run0"), max_shard_size=0)


@case("recipe.yaml", "max_shard_size", "cannot read size", "'5GB'")
def max_shard_size_infinite(b: Bench):
    return recipe(b.take("run0"), max_shard_size="1" + "0" * 400 + "GB")


@case("recipe.yaml", "`seed` must be an integer", "got str 'forty-two'")
def seed_a_string(b: Bench):
    return recipe(b.take("run0"), seed="forty-two")


@case("recipe.yaml", "`seed` must be an integer from 0 to", "got -1")
def seed_negative(b: Bench):
    return recipe(b.take("run0"), seed=-1)


@case("recipe.yaml", "`device`: device 'gpu' is unknown", "choose auto, cpu, cuda or cuda:N")
def device_unknown(b: Bench):
    return recipe(b.take("run0"), device="gpu")


@case("recipe.yaml", "`device` must be a string", "got int 0")
def device_a_number(b: Bench):
    return recipe(b.take("run0"), device=0)


if not torch.cuda.is_available():  # where torch sees a GPU, `cuda` is honoured

    @case("recipe.yaml", "device: cuda, but torch sees no CUDA GPU", "set device: auto", "or device: cpu")
    def device_cuda_without_a_gpu(b: Bench):
        return recipe(b.take("run0"), b.take("run1"), device="cuda")


@case("recipe.yaml", "device: cuda runs the merge math of full-model soups", "LoRA", "set device: auto")
def device_cuda_for_adapters(b: Bench):
    b.take("base")
    return recipe(b.lora("lora0", "base", 0), b.lora("lora1", "base", 1), device="cuda")


@case("recipe.yaml", "`allow_pickle` must be true or false", "got str 'yes please'")
def allow_pickle_a_string(b: Bench):
    return recipe(b.take("run0"), allow_pickle="yes please")


@case("recipe.yaml", "`trust_remote_code` must be true or false", "got int 1")
def trust_remote_code_a_number(b: Bench):
    return recipe(b.take("run0"), trust_remote_code=1)


@case("recipe.yaml", "adapter_output 'lossless' is unknown", "concat, svd, merged, naive")
def adapter_output_unknown(b: Bench):
    return recipe(b.take("run0"), adapter_output="lossless")


@case("recipe.yaml", "adapter_output: svd goes with `rank:`", "got adapter_output 'svd', rank None")
def svd_without_rank(b: Bench):
    return recipe(b.take("run0"), adapter_output="svd")


@case("recipe.yaml", "adapter_output: svd goes with `rank:`", "rank 0")
def svd_rank_zero(b: Bench):
    return recipe(b.take("run0"), adapter_output="svd", rank=0)


@case("recipe.yaml: weights has 1 value(s) for 2 ingredient(s)", "give one weight each")
def weights_of_wrong_length(b: Bench):
    return recipe(b.take("run0"), b.take("run1"), method="weighted", weights=[1.0])


@case("recipe.yaml: method 'weighted': weights[1] must be a number", "got str 'a lot'")
def weights_not_numbers(b: Bench):
    return recipe(b.take("run0"), b.take("run1"), method="weighted", weights=[1, "a lot"])


@case("method 'weighted': weights[0] must be a finite number", "got nan")
def weights_nan(b: Bench):
    return recipe(b.take("run0"), b.take("run1"), method="weighted", weights=[float("nan"), 1.0])


@case("method 'weighted' needs parameter 'weights'", "accepted: weights, normalize")
def weights_missing(b: Bench):
    return recipe(b.take("run0"), b.take("run1"), method="weighted")


@case("recipe.yaml: ties: density must be in (0, 1]", "got -0.5", "fraction of entries kept")
def density_negative(b: Bench):
    return recipe(b.take("run0"), b.take("run1"), method="ties", base_model=b.take("base"), density=-0.5)


@case("recipe.yaml: ties: density must be in (0, 1]", "got 2.0")
def density_scheduled_out_of_range(b: Bench):
    return recipe(b.take("run0"), b.take("run1"), method="ties", base_model=b.take("base"), density=[0.2, 2.0])


@case("recipe.yaml: dare: drop_rate must be in [0, 1)", "got 1.0")
def drop_rate_one(b: Bench):
    return recipe(b.take("run0"), b.take("run1"), method="dare", base_model=b.take("base"), drop_rate=1.0)


@case("method 'ties': density must be a number", "got str 'half'")
def density_not_a_number(b: Bench):
    return recipe(b.take("run0"), b.take("run1"), method="ties", base_model=b.take("base"), density="half")


@case("method 'passthrough': slices must be a list", "got int 1")
def passthrough_slices_not_a_list(b: Bench):
    return recipe(b.take("run0"), b.take("run1"), method="passthrough", slices=1)


@case("recipe.yaml", "method 'ties' needs `base_model:`")
def ties_without_base_model(b: Bench):
    return recipe(b.take("run0"), b.take("run1"), method="ties", density=0.5)


@case("base_model", "no_base", "does not exist", "check the path")
def base_model_does_not_exist(b: Bench):
    return recipe(b.take("run0"), b.take("run1"), method="ties", density=0.5, base_model="no_base")


@case("output", "soup", "exists and is not a folder", "choose another output path")
def output_is_a_file(b: Bench):
    (b.root / "soup").write_text("my notes")
    return recipe(b.take("run0"), b.take("run1"))


@case("output folder", "soup", "already exists and is not empty", "--overwrite")
def output_is_a_full_folder(b: Bench):
    (b.root / "soup").mkdir()
    (b.root / "soup" / "precious.txt").write_text("mine")
    return recipe(b.take("run0"), b.take("run1"))


@case("recipe.yaml", "no output folder", "set `output:`", "--output DIR")
def output_missing(b: Bench):
    return {"method": "uniform", "ingredients": [b.take("run0")]}


@case("recipe.yaml", "`output` must be a string", "got list")
def output_not_a_string(b: Bench):
    return recipe(b.take("run0"), output=["a", "b"])


# -- evaluation ----------------------------------------------------------------------------------------------------


@case("recipe.yaml", "strategy 'greedy' needs data", "add an `evaluation:` section")
def greedy_without_evaluation(b: Bench):
    return recipe(b.take("bert0"), b.take("bert1"), method="greedy")


@case("recipe.yaml: evaluation must be a mapping", "got list")
def evaluation_not_a_mapping(b: Bench):
    return recipe(b.take("bert0"), b.take("bert1"), method="greedy", evaluation=["validation"])


@case("recipe.yaml: evaluation: unknown key 'selection'", "did you mean 'selection_split'?")
def evaluation_unknown_key(b: Bench):
    return recipe(b.take("bert0"), method="greedy", evaluation={"dataset": {"path": "csv"}, "selection": "validation"})


@case("recipe.yaml: evaluation.batch_size must be", "got 0")
def evaluation_batch_size_zero(b: Bench):
    return greedy(b, batch_size=0)


@case("recipe.yaml: evaluation.report_splits must be a list", "got null")
def evaluation_report_splits_empty(b: Bench):
    return greedy(b, report_splits=None)


@case("evaluation split 'dev' does not exist", "the dataset has: validation, test", "selection_split")
def evaluation_split_does_not_exist(b: Bench):
    return greedy(b, selection_split="dev")


@case("evaluation split 'shift' does not exist", "report_splits")
def evaluation_report_split_does_not_exist(b: Bench):
    return greedy(b, report_splits=["test", "shift"])


@case("metric 'acuracy' (did you mean 'accuracy'?) is not built in", "trust_remote_code: true")
def metric_does_not_exist(b: Bench):
    return greedy(b, metric="acuracy")


@case("split 'validation' has no label column 'target'", "evaluation.columns.label")
def label_column_missing(b: Bench):
    return greedy(b, columns={"label": "target"})


@case("evaluation.dataset", "load_from_disk", "no_data", "could not be loaded")
def dataset_folder_missing(b: Bench):
    section = {"dataset": {"load_from_disk": "no_data"}, "selection_split": "validation"}
    return recipe(b.take("bert0"), b.take("bert1"), method="greedy", evaluation=section)


# -- pantries ------------------------------------------------------------------------------------------------------


@case("pantry.json is not valid JSON", "restore it from a backup")
def pantry_json_corrupt(b: Bench):
    pantry = b.pantry("run0", "run1")
    pantry.ledger.write_text(pantry.ledger.read_text()[:-20])
    return {"method": "uniform", "pantry": "pantry", "output": "soup"}


@case("pantry.json has format 2", "newer than this hf_soup understands", "upgrade hf_soup")
def pantry_json_of_a_newer_format(b: Bench):
    pantry = b.pantry("run0", "run1")
    b.edit_ledger(pantry, lambda data: data.update(format=2))
    return {"method": "uniform", "pantry": "pantry", "output": "soup"}


@case("is not a pantry (no pantry.json)", "SoupCallback")
def pantry_without_ledger(b: Bench):
    (b.root / "pantry").mkdir()
    return {"method": "uniform", "pantry": "pantry", "output": "soup"}


@case("ingredient run1 has path '../runs-run1'", "leads outside the pantry")
def pantry_path_escapes_with_dotdot(b: Bench):
    pantry = b.pantry("run0", "run1")
    b.edit_ledger(pantry, lambda data: data["ingredients"][1].update(path="../runs-run1"))
    return {"method": "uniform", "pantry": "pantry", "output": "soup"}


@case("ingredient run1 has path", "runs-run1'", "leads outside the pantry")
def pantry_path_absolute(b: Bench):
    pantry = b.pantry("run0", "run1")
    b.edit_ledger(pantry, lambda data: data["ingredients"][1].update(path=str(b.root / "runs-run1")))
    return {"method": "uniform", "pantry": "pantry", "output": "soup"}


@case("ingredient run1 has path 'ingredients/run1'", "leads outside the pantry")
def pantry_path_symlinked_out(b: Bench):
    pantry = b.pantry("run0", "run1")
    shutil.rmtree(pantry.root / "ingredients" / "run1")
    (pantry.root / "ingredients" / "run1").symlink_to(b.root / "runs-run1", target_is_directory=True)
    return {"method": "uniform", "pantry": "pantry", "output": "soup"}


@case("ingredient run1 has file model.safetensors, a link to", "outside the pantry", "replace the link")
def pantry_weight_file_symlinked_out(b: Bench):
    pantry = b.pantry("run0", "run1")
    weights = pantry.root / "ingredients" / "run1" / "model.safetensors"
    weights.unlink()
    weights.symlink_to(b.root / "runs-run1" / "model.safetensors")
    return {"method": "uniform", "pantry": "pantry", "output": "soup"}


@case("has no ingredient 'run7'", "it has: run0, run1")
def select_of_an_unknown_id(b: Bench):
    b.pantry("run0", "run1")
    return {"method": "uniform", "pantry": "pantry", "select": ["run0", "run7"], "output": "soup"}


@case("recipe.yaml", "`select:` picks ingredient ids of a pantry", "add `pantry: DIR`")
def select_without_pantry(b: Bench):
    return recipe(b.take("run0"), select=["run0"])


@case("recipe.yaml", "`select` must be a list", "got str 'run0'")
def select_not_a_list(b: Bench):
    b.pantry("run0")
    return {"method": "uniform", "pantry": "pantry", "select": "run0", "output": "soup"}


# -- JSON files of the wrong shape (valid JSON, wrong types) -----------------------------------------------------


@case("run1", "config.json must hold a JSON object, found a list of 2 item(s)", "save the model again")
def config_a_list(b: Bench):
    write_json(b.root / b.take("run1") / "config.json", [1, 2])
    return recipe(b.take("run0"), "run1")


@case("config.json: field architectures[0] must be a string, found an integer 7", "save the model again")
def config_architectures_of_numbers(b: Bench):
    edit_config(b.root / b.take("run1"), architectures=[7])
    return recipe(b.take("run0"), "run1")


@case("base", "config.json: field model_type must be a string, found an object", "save the model again")
def base_config_model_type_an_object(b: Bench):
    edit_config(b.root / b.take("base"), model_type={"name": "llama"})
    return recipe(b.take("run0"), b.take("run1"), method="ties", density=0.5, base_model="base")


@case("run0", "generation_config.json must hold a JSON object, found a string 'greedy'", "save the model again")
def generation_config_a_string(b: Bench):
    write_json(b.root / b.take("run0") / "generation_config.json", "greedy")
    return recipe("run0", b.take("run1"))


@case("generation_config.json: field eos_token_id must be an integer, a list or null", "found a string")
def generation_config_eos_token_a_string(b: Bench):
    write_json(b.root / b.take("run1") / "generation_config.json", {"eos_token_id": "</s>", "max_length": 20})
    return recipe(b.take("run0"), "run1")


@case("run1", "tokenizer_config.json must hold a JSON object, found null", "save the tokenizer again")
def tokenizer_config_null(b: Bench):
    write_json(b.root / b.take("run1") / "tokenizer_config.json", None)
    return recipe(b.take("run0"), "run1")


@case("tokenizer_config.json: field model_max_length must be a number or null", "found a list", "save the tokenizer")
def tokenizer_config_max_length_a_list(b: Bench):
    write_json(b.root / b.take("run0") / "tokenizer_config.json", {"model_max_length": [512]})
    return recipe("run0", b.take("run1"))


@case("special_tokens_map.json must hold a JSON object, found an integer 3", "save the tokenizer again")
def special_tokens_map_a_number(b: Bench):
    write_json(b.root / b.take("run1") / "special_tokens_map.json", 3)
    return recipe(b.take("run0"), "run1")


@case("special_tokens_map.json: field additional_special_tokens[1] must be a string or an object", "found true")
def special_tokens_map_token_a_boolean(b: Bench):
    write_json(b.root / b.take("run1") / "special_tokens_map.json", {"additional_special_tokens": ["<a>", True]})
    return recipe(b.take("run0"), "run1")


@case("lora1", "adapter_config.json must hold a JSON object, found a list of 0 item(s)", "save the adapter again")
def adapter_config_a_list(b: Bench):
    b.take("base")
    b.lora("lora0", "base", 0)
    write_json(b.root / b.lora("lora1", "base", 1) / "adapter_config.json", [])
    return recipe("lora0", "lora1")


@case("adapter_config.json: field lora_alpha must be a finite number", "found an integer 1000", "save the adapter")
def adapter_config_alpha_too_large_for_a_float(b: Bench):
    b.take("base")
    b.lora("lora0", "base", 0)
    path = b.root / b.lora("lora1", "base", 1) / "adapter_config.json"
    path.write_text(path.read_text().replace('"lora_alpha": 4', '"lora_alpha": 1' + "0" * 400))
    return recipe("lora0", "lora1")


@case("adapter_config.json: field alpha_pattern['q_proj'] must be a finite number", "found a string 'eight'")
def adapter_config_alpha_pattern_of_strings(b: Bench):
    b.take("base")
    b.lora("lora0", "base", 0)
    path = b.root / b.lora("lora1", "base", 1) / "adapter_config.json"
    write_json(path, {**json.loads(path.read_text()), "alpha_pattern": {"q_proj": "eight"}})
    return recipe("lora0", "lora1")


@case("adapter_config.json: field base_model_name_or_path must be a string or null", "found a list")
def adapter_config_base_a_list(b: Bench):
    b.take("base")
    path = b.root / b.lora("lora0", "base", 0) / "adapter_config.json"
    write_json(path, {**json.loads(path.read_text()), "base_model_name_or_path": ["base"]})
    return recipe("lora0", b.lora("lora1", "base", 1))


@case("shard index", "model.safetensors.index.json: field weight_map must be an object, found a list")
def index_weight_map_a_list(b: Bench):
    write_json(b.root / b.take("sharded") / "model.safetensors.index.json", {"weight_map": ["model.norm.weight"]})
    return recipe(b.take("run0"), "sharded")


@case("shard index", "model.safetensors.index.json must hold a JSON object, found a number 1e+308", "re-save")
def index_a_huge_number(b: Bench):
    write_json(b.root / b.take("sharded") / "model.safetensors.index.json", 1e308)
    return recipe(b.take("run0"), "sharded")


@case("pantry.json must be a mapping with 'format' and an 'ingredients' list", "got [1, 2]", "restore it")
def pantry_json_a_list(b: Bench):
    pantry = b.pantry("run0", "run1")
    write_json(pantry.ledger, [1, 2])
    return {"method": "uniform", "pantry": "pantry", "output": "soup"}


@case("pantry.json: ingredient 'run1' has sha256 = ['ab']", "expected a mapping of weight file name")
def pantry_json_sha256_a_list(b: Bench):
    pantry = b.pantry("run0", "run1")
    b.edit_ledger(pantry, lambda data: data["ingredients"][1].update(sha256=["ab"]))
    return {"method": "uniform", "pantry": "pantry", "output": "soup"}


@case("ingredients/run1/config.json must hold a JSON object, found a string", "save the model again")
def pantry_ingredient_config_a_string(b: Bench):
    pantry = b.pantry("run0", "run1")
    write_json(pantry.root / "ingredients" / "run1" / "config.json", "llama")
    return {"method": "uniform", "pantry": "pantry", "output": "soup"}


@case("soup.json must hold a JSON object, found a list of 2 item(s)", "cook the soup again")
def soup_json_a_list_pushed(b: Bench):
    write_json(b.root / b.take("soup_uniform", "soup") / "soup.json", [1, 2])
    return Command(["push", str(b.root / "soup"), "me/soup"])


@case("soup.json: field ingredients[1].sha256['model.safetensors'] must be a string", "found null", "cook the soup")
def soup_json_sha256_null_pushed(b: Bench):
    path = b.root / b.take("soup_uniform", "soup") / "soup.json"
    data = json.loads(path.read_text())
    data["ingredients"][1]["sha256"]["model.safetensors"] = None
    write_json(path, data)
    return Command(["push", str(b.root / "soup"), "me/soup"])


@case("soup.json: field report.rows['greedy'] must be an object, found a list", "cook the soup again")
def soup_json_report_rows_of_lists_plotted(b: Bench):
    path = b.root / b.take("soup_uniform", "soup") / "soup.json"
    report = {"metric": "accuracy", "selection_split": "validation", "splits": ["validation"], "best_individual": "a"}
    write_json(
        path, {**json.loads(path.read_text()), "report": {**report, "rows": {"greedy": [0.8]}, "individuals": {}}}
    )
    return Command(["plot", "report", str(b.root / "soup")])


@case("soup", "config.json must hold a JSON object, found a list", "cook the soup again")
def soup_config_a_list_pushed(b: Bench):
    write_json(b.root / b.take("soup_uniform", "soup") / "config.json", ["llama"])
    return Command(["push", str(b.root / "soup"), "me/soup"])


@case(
    "ingredient run1: ",
    "tokenizer_config.json: field pad_token must be a string, an object or null",
    "found an integer 0",
)
def tokenizer_config_inspected(b: Bench):
    write_json(b.root / b.take("run1") / "tokenizer_config.json", {"pad_token": 0})
    return Command(["inspect", str(b.root / b.take("run0")), str(b.root / "run1")])


# -- the test ------------------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root` (symlinks not followed): relative path → sha256 of a file, 'folder', or the link."""
    entries = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                entries[key] = f"link to {os.readlink(path)}"
            elif path.is_dir():
                entries[key] = "folder"
            else:
                entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def pantry_state(root: Path) -> tuple[str | None, list[str]]:
    """The sha256 of pantry.json and the pantry's listing."""
    ledger = root / "pantry.json"
    digest = hashlib.sha256(ledger.read_bytes()).hexdigest() if ledger.is_file() else None
    return digest, sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.is_dir() else []


def test_the_table_is_large():
    assert len(CASES) >= 30


@pytest.mark.parametrize(("setup", "says"), CASES)
def test_bad_input_is_refused_cleanly(setup, says, stock, tmp_path, capsys):
    bench = Bench(tmp_path / "case", stock)
    bench.root.mkdir()
    content = setup(bench)
    path = bench.root / "recipe.yaml"
    if content is not None and not isinstance(content, Command):
        text = yaml.safe_dump(content, sort_keys=False) if isinstance(content, dict) else content
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    output = bench.root / "soup"
    before, pantry_before, output_before = snapshot(bench.root), pantry_state(bench.root / "pantry"), output.exists()
    capsys.readouterr()

    code = main(content.argv if isinstance(content, Command) else ["cook", str(path), "--quiet"])

    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("hf-soup: error: "), captured.err
    for text in says:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert captured.out == ""
    assert output.exists() == output_before, "an output folder appeared"
    assert not list(bench.root.glob(f"{STAGING_PREFIX}*")), "a staging folder was left behind"
    assert pantry_state(bench.root / "pantry") == pantry_before, "the pantry changed"
    assert snapshot(bench.root) == before, "files changed"
