import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import edit_config, edit_weights, make_model, save_model, state_dict_of
from safetensors.torch import save_file

from hf_soup import Pantry, SoupBuilder, SoupError
from hf_soup.atomic import STAGING_PREFIX


def fp32_mean(folders):
    states = [state_dict_of(folder) for folder in folders]
    return {name: sum(s[name].float() for s in states) / len(states) for name in states[0]}


def assert_no_output(output: Path):
    assert not output.exists()
    assert not list(output.parent.glob(f"{STAGING_PREFIX}*")), "a staging folder was left behind"


def test_uniform_soup_is_the_fp32_mean_and_loads(tmp_path, make_ingredients):
    from transformers import LlamaForCausalLM

    folders = make_ingredients(3)
    soup = SoupBuilder(folders).cook(tmp_path / "soup", progress=False)
    mean = fp32_mean(folders)
    got = state_dict_of(soup.path)
    assert set(got) == set(mean)
    for name in mean:
        assert torch.equal(got[name], mean[name]), name  # left-to-right fp32 sum / k, bit for bit
    model = LlamaForCausalLM.from_pretrained(soup.path)
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor, mean[name], atol=1e-6, rtol=0)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()
    record = json.loads((soup.path / "soup.json").read_text())
    assert record["method"] == "uniform"
    assert [i["weight"] for i in record["ingredients"]] == pytest.approx([1 / 3] * 3)
    for ingredient, folder in zip(record["ingredients"], folders):
        digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        assert ingredient["sha256"] == {"model.safetensors": digest}
    assert sorted(p.name for p in soup.path.iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "soup.json",
    ]


def test_sharded_ingredients_and_sharded_output(tmp_path, make_ingredients):
    from transformers import LlamaForCausalLM

    folders = make_ingredients(2, max_shard_size="20KB") + make_ingredients(1, prefix="single")
    soup = SoupBuilder(folders, max_shard_size="30KB").cook(tmp_path / "soup", progress=False)
    assert (soup.path / "model.safetensors.index.json").is_file()
    assert len(list(soup.path.glob("model-*.safetensors"))) > 1
    mean = fp32_mean(folders)
    model = LlamaForCausalLM.from_pretrained(soup.path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, mean[name])


def test_tied_embeddings_stay_tied(tmp_path, make_ingredients):
    from transformers import LlamaForCausalLM

    folders = make_ingredients(3, tie_word_embeddings=True)
    assert "lm_head.weight" not in state_dict_of(folders[0])
    soup = SoupBuilder(folders).cook(tmp_path / "soup", progress=False)
    assert "lm_head.weight" not in state_dict_of(soup.path)
    model = LlamaForCausalLM.from_pretrained(soup.path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, fp32_mean(folders)["model.embed_tokens.weight"])


def test_bf16_ingredients_give_bf16_soup(tmp_path, make_ingredients):
    folders = make_ingredients(3, dtype=torch.bfloat16)
    soup = SoupBuilder(folders).cook(tmp_path / "soup", progress=False)
    got = state_dict_of(soup.path)
    for name, tensor in fp32_mean(folders).items():
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], tensor.to(torch.bfloat16))


def test_output_dtype_and_mixed_dtypes(tmp_path, make_ingredients):
    fp32 = make_ingredients(1, prefix="f")
    bf16 = make_ingredients(1, prefix="b", dtype=torch.bfloat16)
    mixed = SoupBuilder(fp32 + bf16).cook(tmp_path / "mixed", progress=False)
    assert "mix dtypes" in mixed.record["notes"][0] and "float32" in mixed.record["notes"][0]
    assert all(t.dtype == torch.float32 for t in state_dict_of(mixed.path).values())
    chosen = SoupBuilder(fp32 + bf16, dtype="bfloat16").cook(tmp_path / "chosen", progress=False)
    assert all(t.dtype == torch.bfloat16 for t in state_dict_of(chosen.path).values())
    assert json.loads((chosen.path / "config.json").read_text())["dtype"] == "bfloat16"


def test_weighted_normalised_or_not(tmp_path, make_ingredients):
    folders = make_ingredients(2)
    states = [state_dict_of(f) for f in folders]
    name = "model.norm.weight"
    soup = SoupBuilder(folders, method="weighted", weights=[3, 1]).cook(tmp_path / "norm", progress=False)
    assert [i["weight"] for i in soup.record["ingredients"]] == [0.75, 0.25]
    assert torch.allclose(state_dict_of(soup.path)[name], 0.75 * states[0][name] + 0.25 * states[1][name], atol=1e-7)
    raw = SoupBuilder(folders, method="weighted", weights=[3, 1], normalize=False).cook(
        tmp_path / "raw", progress=False
    )
    assert torch.allclose(state_dict_of(raw.path)[name], 3 * states[0][name] + states[1][name], atol=1e-6)
    assert raw.record["parameters"] == {"weights": [3.0, 1.0], "normalize": False}


def test_one_ingredient_is_that_model(tmp_path, make_ingredients, caplog):
    folders = make_ingredients(1)
    soup = SoupBuilder(folders).cook(tmp_path / "soup", progress=False)
    assert "only one ingredient" in soup.record["notes"][0]
    assert "only one ingredient" in caplog.text
    got, want = state_dict_of(soup.path), state_dict_of(folders[0])
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_side_files_copied_training_files_not(tmp_path, make_ingredients):
    folders = make_ingredients(2)
    (folders[0] / "special_tokens_map.json").write_text('{"pad_token": "<pad>"}')
    (folders[0] / "tokenizer_config.json").write_text("{}")
    (folders[0] / "optimizer.pt").write_bytes(b"x")
    (folders[0] / "trainer_state.json").write_text("{}")
    soup = SoupBuilder(folders).cook(tmp_path / "soup", progress=False)
    names = {p.name for p in soup.path.iterdir()}
    assert {"special_tokens_map.json", "tokenizer_config.json", "config.json"} <= names
    assert not {"optimizer.pt", "trainer_state.json"} & names


def test_pantry_ingredients_and_select(tmp_path, make_ingredients):
    folders = make_ingredients(3)
    pantry = Pantry(tmp_path / "pantry")
    ids = [pantry.add(folder, run=f"r{i}", metric="eval_loss", value=float(i)).id for i, folder in enumerate(folders)]
    soup = SoupBuilder(pantry=str(pantry.root), select=ids[:2]).cook(tmp_path / "soup", progress=False)
    assert [i["id"] for i in soup.record["ingredients"]] == ids[:2]
    assert soup.record["ingredients"][1]["value"] == 1.0
    assert soup.record["ingredients"][0]["sha256"] == pantry.get(ids[0]).sha256
    mean = fp32_mean(folders[:2])
    assert all(torch.equal(t, mean[n]) for n, t in state_dict_of(soup.path).items())
    with pytest.raises(SoupError, match="no ingredient 'zz'"):
        SoupBuilder(pantry=str(pantry.root), select=["zz"]).cook(tmp_path / "bad", progress=False)
    assert_no_output(tmp_path / "bad")


def test_non_float_tensors_copied_and_checked(tmp_path):
    folders = []
    for i in range(2):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "toy"}')
        save_file({"w": torch.full((2,), float(i)), "ids": torch.arange(3)}, str(folder / "model.safetensors"))
        folders.append(folder)
    soup = SoupBuilder(folders).cook(tmp_path / "soup", progress=False)
    got = state_dict_of(soup.path)
    assert torch.equal(got["ids"], torch.arange(3)) and torch.equal(got["w"], torch.full((2,), 0.5))
    save_file({"w": torch.zeros(2), "ids": torch.arange(1, 4)}, str(folders[1] / "model.safetensors"))
    with pytest.raises(SoupError, match="ingredient m1: non-floating tensor ids differs from m0"):
        SoupBuilder(folders).cook(tmp_path / "bad", progress=False)
    assert_no_output(tmp_path / "bad")


def _nan(folder):
    edit_weights(folder, lambda state: state["model.norm.weight"].index_fill_(0, torch.tensor([3]), torch.nan))


def _truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _drop_tensor(folder):
    edit_weights(folder, lambda state: state.pop("model.norm.weight"))


def _add_tensor(folder):
    edit_weights(folder, lambda state: state.update({"extra.bias": torch.zeros(2)}))


def _other_vocab(folder):
    save_model(make_model("llama", 5, vocab_size=80), folder)


def _other_type(folder):
    edit_config(folder, model_type="mistral")


def _remote_code(folder):
    edit_config(folder, auto_map={"AutoModel": "modeling_evil.EvilModel"})


@pytest.mark.parametrize(
    ("damage", "options", "message"),
    [
        (_nan, {}, "ingredient run1: tensor model.norm.weight holds NaN or Inf"),
        (_truncate, {}, "ingredient run1: model.safetensors is not a valid safetensors file"),
        (_drop_tensor, {}, "ingredient run1 lacks model.norm.weight compared with run0"),
        (_add_tensor, {}, "ingredient run1 has extra extra.bias"),
        (
            _other_vocab,
            {},
            r"ingredient run1: tensor \S+ has shape \[80, 32\] but run0 has \[64, 32\]",
        ),
        (_other_type, {}, "ingredient run1 has model_type 'mistral' but run0 has 'llama'"),
        (_remote_code, {}, "auto_map.*trust_remote_code"),
        (None, {"method": "weighted", "weights": [1, 1]}, "weights has 2 value.* for 3 ingredient"),
        (None, {"method": "weighted", "weights": [1, -1, 1]}, "weights must not be negative"),
        (None, {"method": "weighted", "weights": [0, 0, 0]}, "sum to 0"),
        (None, {"method": "weighted"}, "method 'weighted' needs parameter 'weights'"),
        (None, {"method": "uniform", "density": 0.5}, "unknown key 'density'.*parameters of method 'uniform': none"),
        (None, {"method": "avg"}, "unknown method 'avg'; methods: .*uniform.*; strategies: greedy, learned"),
        (None, {"dtype": "int4"}, "unknown dtype 'int4'"),
    ],
)
def test_bad_inputs_leave_no_output(tmp_path, make_ingredients, damage, options, message):
    folders = make_ingredients(3)
    if damage is not None:
        damage(folders[1])
    output = tmp_path / "soup"
    with pytest.raises(SoupError, match=message):
        SoupBuilder(folders, **options).cook(output, progress=False)
    assert_no_output(output)


def test_bad_ingredient_lists(tmp_path, make_ingredients):
    folders = make_ingredients(2)
    output = tmp_path / "soup"
    with pytest.raises(SoupError, match="ingredient list is empty"):
        SoupBuilder([]).cook(output, progress=False)
    with pytest.raises(SoupError, match="listed twice"):
        SoupBuilder([folders[0], folders[1], folders[0]]).cook(output, progress=False)
    with pytest.raises(SoupError, match="does not exist"):
        SoupBuilder([folders[0], tmp_path / "missing"]).cook(output, progress=False)
    assert_no_output(output)


def test_existing_output_is_kept_unless_overwrite(tmp_path, make_ingredients):
    folders = make_ingredients(2)
    output = tmp_path / "soup"
    output.mkdir()
    (output / "precious.txt").write_text("mine")
    with pytest.raises(SoupError, match="already exists and is not empty.*--overwrite"):
        SoupBuilder(folders).cook(output, progress=False)
    assert (output / "precious.txt").read_text() == "mine"
    SoupBuilder(folders).cook(output, overwrite=True, progress=False)
    assert not (output / "precious.txt").exists() and (output / "soup.json").is_file()
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_interrupted_cook_leaves_previous_output(tmp_path, make_ingredients, monkeypatch):
    folders = make_ingredients(2)
    output = tmp_path / "soup"
    SoupBuilder(folders).cook(output, progress=False)
    before = (output / "model.safetensors").read_bytes()
    import hf_soup.builder

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_soup.builder, "copy_side_files", explode)
    with pytest.raises(KeyboardInterrupt):
        SoupBuilder(folders, method="weighted", weights=[1, 2]).cook(output, overwrite=True, progress=False)
    assert (output / "model.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_bert_classifier_soup_loads_and_classifies(tmp_path, make_ingredients):
    from transformers import BertForSequenceClassification

    folders = make_ingredients(3, kind="bert")
    soup = SoupBuilder(folders, dtype="float16").cook(tmp_path / "soup", progress=False)
    model = BertForSequenceClassification.from_pretrained(soup.path, dtype=torch.float32)
    mean = fp32_mean(folders)
    for name, tensor in model.state_dict().items():
        if name in mean:
            assert torch.equal(tensor, mean[name].to(torch.float16).float()), name
    logits = model(input_ids=torch.tensor([[2, 7, 9]])).logits
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()
