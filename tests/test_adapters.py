"""LoRA adapter soups: exact in adapter space (concat, SVD, merged), the naive A/B average as a named approximation,
refusals, and greedy/learned soups tasted on one base model holding every adapter. Tiny Llama and BERT bases."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import bert_config, make_model, make_split

from hf_soup import Pantry, SoupBuilder, SoupError
from hf_soup.adapters import read_adapter
from hf_soup.scoring import Scorer

LLAMA = [  # mixed ranks, alphas, rsLoRA, rank/alpha patterns, different targets, an embedding LoRA
    {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
    {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "k_proj", "o_proj"]},
    {
        "r": 3,
        "lora_alpha": 6,
        "target_modules": ["q_proj", "v_proj", "gate_proj", "embed_tokens"],
        "rank_pattern": {"v_proj": 5},
        "alpha_pattern": {"gate_proj": 2},
    },
]
BERT = [  # one rank everywhere (so the naive average is defined), different alphas, rsLoRA and targets
    {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]},
    {"r": 2, "lora_alpha": 8, "use_rslora": True, "target_modules": ["query", "key"]},
    {"r": 2, "lora_alpha": 2, "target_modules": ["query", "value", "dense"]},
]


def model_class(kind):
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    return LlamaForCausalLM if kind == "llama" else BertForSequenceClassification


def make_adapter(base, folder, *, seed, kind="llama", b_scale=1.0, head_noise=0.0, **settings):
    """A LoRA adapter with non-zero deltas (`init_lora_weights=False`), B scaled by `b_scale`, head copies + noise."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    if kind == "bert":
        settings.setdefault("task_type", "SEQ_CLS")
    model = get_peft_model(model_class(kind).from_pretrained(base), LoraConfig(init_lora_weights=False, **settings))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                parameter.mul_(b_scale)
            if "modules_to_save" in name:
                parameter.add_(torch.randn(parameter.shape) * head_noise)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    make_model("llama", None).save_pretrained(root / "base")
    return root / "base", [make_adapter(root / "base", root / f"a{i}", seed=i, **s) for i, s in enumerate(LLAMA)]


@pytest.fixture(scope="session")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    make_model("bert", None).save_pretrained(root / "base")
    adapters = [
        make_adapter(root / "base", root / f"b{i}", seed=i, kind="bert", b_scale=0.3, head_noise=0.1, **s)
        for i, s in enumerate(BERT)
    ]
    return root / "base", adapters


def merged_state(base, folder, kind):
    from peft import PeftModel

    return PeftModel.from_pretrained(model_class(kind).from_pretrained(base), folder).merge_and_unload().state_dict()


def reference(base, folders, kind, weights=None):
    """The soup of the merged models: Σᵢ wᵢ (base + ΔWᵢ), heads Σᵢ wᵢ Hᵢ (what the adapter soup must equal)."""
    weights = weights or [1 / len(folders)] * len(folders)
    states = [merged_state(base, folder, kind) for folder in folders]
    model = model_class(kind).from_pretrained(base)
    model.load_state_dict({name: sum(w * s[name] for w, s in zip(weights, states)) for name in states[0]})
    return model.eval()


IDS = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model):
    return model.eval()(input_ids=IDS).logits


def renamed_base(folders, root, name):
    """Copies of adapter folders whose adapter_config.json names base `name`."""
    copies = []
    for folder in folders:
        config = json.loads((folder / "adapter_config.json").read_text())
        (root / folder.name).mkdir(parents=True)
        (root / folder.name / "adapter_model.safetensors").write_bytes(
            (folder / "adapter_model.safetensors").read_bytes()
        )
        (root / folder.name / "adapter_config.json").write_text(
            json.dumps({**config, "base_model_name_or_path": name})
        )
        copies.append(root / folder.name)
    return copies


def load_soup(base, soup, kind):
    from peft import PeftModel

    if (soup / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(model_class(kind).from_pretrained(base), soup)
    return model_class(kind).from_pretrained(soup)


@pytest.mark.parametrize("output", ["concat", "merged", "svd"])
def test_llama_soup_equals_the_soup_of_merged_models(llama, tmp_path, output):
    base, folders = llama
    options = {"rank": 64} if output == "svd" else {}
    soup = SoupBuilder(folders, method="uniform", adapter_output=output, **options).cook(
        tmp_path / "s", progress=False
    )
    want = logits(reference(base, folders, "llama"))
    assert (logits(load_soup(base, soup.path, "llama")) - want).abs().max() <= 1e-5
    record = json.loads((soup.path / "soup.json").read_text())
    assert record["adapter_output"] == output and record["base_model"] == str(base)  # read from adapter_config.json
    assert [i["weight"] for i in record["ingredients"]] == pytest.approx([1 / 3] * 3)
    if output == "svd":
        assert record["relative_error"] < 1e-6  # rank 64 ≥ Σ rᵢ: exact
        assert max(record["relative_error_per_module"].values()) < 1e-6


def test_concat_adapter_round_trips_through_peft(llama, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    base, folders = llama
    soup = SoupBuilder(folders, method="uniform").cook(tmp_path / "soup", progress=False)
    model = PeftModel.from_pretrained(model_class("llama").from_pretrained(base), soup.path)
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    # mixed ranks: q_proj has 2 + 4 + 3, v_proj 2 + 5 (rank_pattern), k_proj 4, gate_proj 3, embed_tokens 3
    expected = {"self_attn.q_proj": 9, "self_attn.v_proj": 7, "self_attn.k_proj": 4, "mlp.gate_proj": 3}
    for layer in (0, 1):
        for name, rank in expected.items():
            module = layers[f"model.layers.{layer}.{name}"]
            assert module.r["default"] == rank and module.scaling["default"] == 1.0
    assert layers["model.embed_tokens"].r["default"] == 3
    assert "model.layers.0.mlp.up_proj" not in layers  # no adapter targets it
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    for key, tensor in load_file(soup.path / "adapter_model.safetensors").items():
        if "lora_" in key:
            assert torch.equal(state[key], tensor), key
    assert soup.record["ranks"]["model.layers.0.self_attn.q_proj"] == 9


def test_weighted_bert_soup_averages_modules_to_save(bert, tmp_path):
    from safetensors.torch import load_file

    base, folders = bert
    weights = [0.5, 0.3, 0.2]
    want_model = reference(base, folders, "bert", weights)
    for output in ("concat", "merged"):
        soup = SoupBuilder(folders, method="weighted", weights=weights, adapter_output=output).cook(
            tmp_path / output, progress=False
        )
        assert (logits(load_soup(base, soup.path, "bert")) - logits(want_model)).abs().max() <= 1e-5
    heads = [load_file(f / "adapter_model.safetensors")["base_model.model.classifier.weight"] for f in folders]
    written = load_file(tmp_path / "concat" / "adapter_model.safetensors")["base_model.model.classifier.weight"]
    assert torch.allclose(written, sum(w * h for w, h in zip(weights, heads)), atol=1e-7)
    assert not torch.allclose(heads[0], heads[1])  # the heads differ, so the average is tested
    merged = load_file(tmp_path / "merged" / "model.safetensors")["classifier.weight"]
    assert torch.allclose(merged, written, atol=1e-7)


def test_a_head_missing_from_one_adapter_is_the_base_head(bert, tmp_path):
    base, folders = bert
    plain = make_adapter(base, tmp_path / "plain", seed=7, kind="bert", task_type=None, target_modules=["value"])
    assert "classifier.weight" not in read_adapter(plain).full
    trio = [folders[0], folders[1], plain]
    soup = SoupBuilder(trio, method="uniform").cook(tmp_path / "soup", progress=False)
    assert (logits(load_soup(base, soup.path, "bert")) - logits(reference(base, trio, "bert"))).abs().max() <= 1e-5
    # without a findable base the head of `plain` is unknown: a clear error, and nothing written
    moved = renamed_base(trio, tmp_path / "moved", "gone/model")
    with pytest.raises(SoupError, match="missing from some adapters.*set `base_model:` in the recipe"):
        SoupBuilder(moved, method="uniform").cook(tmp_path / "nope", progress=False)
    assert not (tmp_path / "nope").exists()
    explicit = SoupBuilder(moved, method="uniform", base_model=str(base)).cook(tmp_path / "explicit", progress=False)
    assert explicit.record["base_model"] == str(base)


def test_svd_below_full_rank_reports_the_true_error(llama, tmp_path):
    from safetensors.torch import load_file

    base, folders = llama
    soup = SoupBuilder(folders, method="uniform", adapter_output="svd", rank=2).cook(tmp_path / "svd", progress=False)
    record = soup.record
    assert record["rank"] == 2 and 0.05 < record["relative_error"] < 1
    exact = reference(base, folders, "llama").state_dict()
    start = model_class("llama").from_pretrained(base).state_dict()
    tensors = load_file(soup.path / "adapter_model.safetensors")
    errors, norms = [], []
    for module, reported in record["relative_error_per_module"].items():
        delta = exact[f"{module}.weight"] - start[f"{module}.weight"]
        if module == "model.embed_tokens":
            written = (
                tensors[f"base_model.model.{module}.lora_embedding_B"]
                @ tensors[f"base_model.model.{module}.lora_embedding_A"]
            ).T
        else:
            written = (
                tensors[f"base_model.model.{module}.lora_B.weight"]
                @ tensors[f"base_model.model.{module}.lora_A.weight"]
            )
        error = (written - delta).norm()
        assert float(error / delta.norm()) == pytest.approx(reported, rel=1e-3, abs=1e-6)
        singular = torch.linalg.svdvals(delta.double())
        assert reported == pytest.approx(float(singular[2:].norm() / singular.norm()), rel=1e-3, abs=1e-6)  # optimal
        errors.append(float(error) ** 2)
        norms.append(float(delta.norm()) ** 2)
    assert record["relative_error"] == pytest.approx(math.sqrt(sum(errors) / sum(norms)), rel=1e-3)
    assert max(record["ranks"].values()) == 2 and "SVD-compressed to rank 2" in record["notes"][0]


def test_naive_average_is_named_and_its_error_reported(bert, llama, tmp_path):
    from safetensors.torch import load_file

    base, folders = bert
    soup = SoupBuilder(folders, method="uniform", adapter_output="naive").cook(tmp_path / "naive", progress=False)
    record = soup.record
    assert record["relative_error"] > 0.05 and any("NOT the soup" in note for note in record["notes"])
    exact = reference(base, folders, "bert").state_dict()
    start = model_class("bert").from_pretrained(base).state_dict()
    tensors = load_file(soup.path / "adapter_model.safetensors")
    module = "bert.encoder.layer.0.attention.self.query"
    delta = exact[f"{module}.weight"] - start[f"{module}.weight"]
    written = tensors[f"base_model.model.{module}.lora_B.weight"] @ tensors[f"base_model.model.{module}.lora_A.weight"]
    assert float((written - delta).norm() / delta.norm()) == pytest.approx(
        record["relative_error_per_module"][module], rel=1e-3
    )
    with pytest.raises(SoupError, match="needs one rank per module.*use the exact soup"):
        SoupBuilder(llama[1], method="uniform", adapter_output="naive").cook(tmp_path / "mixed", progress=False)


REFUSED = [
    ({"use_dora": True}, "DoRA"),
    ({"lora_bias": True}, "lora_bias"),
    ({"bias": "all"}, "bias='none'"),
    ("ia3", "IA3 adapter; hf_soup soups LoRA adapters"),
    ("other base", "trained on base .* adapters of different bases cannot be souped"),
    ("mica", r"LoRA variant \(init_lora_weights='mica'\)"),
]


@pytest.mark.parametrize(("setting", "message"), REFUSED, ids=[m.split()[0] for _, m in REFUSED])
def test_what_cannot_be_souped_exactly_is_refused(llama, tmp_path, setting, message):
    from peft import IA3Config, get_peft_model

    base, folders = llama
    bad = tmp_path / "bad"
    if setting == "ia3":
        model = model_class("llama").from_pretrained(base)
        get_peft_model(model, IA3Config(target_modules=["q_proj"], feedforward_modules=[])).save_pretrained(bad)
    elif setting == "other base":
        make_model("llama", seed=5).save_pretrained(tmp_path / "other")
        make_adapter(tmp_path / "other", bad, seed=0, r=2, target_modules=["q_proj"])
    elif setting == "mica":  # a variant peft tags on LoraConfig: found from peft's own metadata
        make_adapter(base, bad, seed=0, r=2, target_modules=["q_proj"])
        config = json.loads((bad / "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "mica"}))
    else:
        make_adapter(base, bad, seed=0, r=2, target_modules=["q_proj"], **setting)
    with pytest.raises(SoupError, match=message):
        SoupBuilder([folders[0], bad], method="uniform").cook(tmp_path / "soup", progress=False)
    assert not (tmp_path / "soup").exists()


def test_adapter_and_recipe_errors(llama, bert, tmp_path):
    base, folders = llama
    with pytest.raises(SoupError, match="adapter_output 'sum' is unknown; choose concat, svd, merged, naive"):
        SoupBuilder(folders, adapter_output="sum")
    with pytest.raises(SoupError, match="adapter_output: svd goes with `rank:`"):
        SoupBuilder(folders, adapter_output="svd")
    with pytest.raises(SoupError, match="adapter_output: svd goes with `rank:`"):
        SoupBuilder(folders, rank=4)
    with pytest.raises(SoupError, match="are full models but the others are peft adapters"):
        SoupBuilder([folders[0], base], method="uniform").cook(tmp_path / "soup", progress=False)
    with pytest.raises(
        SoupError, match="base_model .* has another config than .*, the base ingredient a0 was trained"
    ):
        SoupBuilder(folders, base_model=str(bert[0]), adapter_output="merged").cook(tmp_path / "soup", progress=False)
    unnamed = renamed_base(folders, tmp_path / "unnamed", None)
    with pytest.raises(SoupError, match="module model.layers.0.self_attn.q_proj changes a .* but the base model"):
        SoupBuilder(unnamed, base_model=str(bert[0]), adapter_output="merged").cook(tmp_path / "soup", progress=False)
    with pytest.raises(SoupError, match="adapter_output: merged writes base .* set `base_model:` in the recipe"):
        SoupBuilder(unnamed, adapter_output="merged").cook(tmp_path / "soup", progress=False)
    with pytest.raises(SoupError, match="every adapter has weight 0"):
        SoupBuilder(folders[:2], method="weighted", weights=[0.0, 0.0], normalize=False).cook(
            tmp_path / "soup", progress=False
        )
    assert not (tmp_path / "soup").exists()


# -- greedy and learned soups over adapters ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny BERT classifier trained on the task (the base), two good LoRA fine-tunes and a noise adapter."""
    from transformers import BertForSequenceClassification

    root = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config(num_labels=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = make_split(512, 1)
    ids, labels = torch.tensor(data["input_ids"]), torch.tensor(data["label"])
    for step in range(30):
        batch = slice((step * 32) % 512, (step * 32) % 512 + 32)
        model(input_ids=ids[batch], labels=labels[batch]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(root / "base")
    settings = {"kind": "bert", "r": 2, "lora_alpha": 4, "target_modules": ["query", "value", "dense"]}
    good = [
        make_adapter(root / "base", root / f"good_{n}", seed=s, b_scale=0.02, **settings)
        for n, s in (("a", 1), ("b", 2))
    ]
    noise = make_adapter(root / "base", root / "noise", seed=3, b_scale=16.0, **settings)
    return root / "base", [*good, noise]


@pytest.fixture
def splits():
    return {"validation": make_split(96, 10), "test": make_split(96, 11), "shift": make_split(96, 12, shift=True)}


def evaluation(splits, **extra):
    return {"splits": splits, "selection_split": "validation", "report_splits": ["test", "shift"], **extra}


@pytest.mark.parametrize("mixing", ["in_place", "branches"])
def test_tasting_scores_adapters_as_their_merged_models(llama, tmp_path, mixing):
    """One base holding all adapters, the soup written into the base weights or weighted at forward time, gives the
    merged models' outputs; learned-soup gradients (from the weights' gradient, or through the scalings) match
    finite differences."""
    from datasets import Dataset

    from hf_soup.adapters import AdapterTasting
    from hf_soup.ingredient import Ingredient

    base, folders = llama
    data = Dataset.from_dict({"input_ids": IDS.tolist()})
    scorer = Scorer({"validation": data}, task="causal-lm", metric="loss", batch_size=2)
    adapters = [read_adapter(folder) for folder in folders]
    ingredients = [Ingredient.from_folder(folder) for folder in folders]
    with AdapterTasting(ingredients, adapters, base, scorer, "validation", mixing=mixing) as tasting:
        assert tasting.in_place == (set(tasting.layers) if mixing == "in_place" else set())
        assert "model.embed_tokens" in tasting.layers  # an embedding LoRA, untied: written in place too
        for module, layer in tasting.layers.items():  # peft's own scalings = ours (rsLoRA, alpha_pattern)
            for i, adapter in enumerate(adapters):
                if module in adapter.modules:
                    assert layer.scaling[f"soup{i}"] == pytest.approx(adapter.modules[module].scaling)
        for i, folder in enumerate(folders):
            got = torch.cat([batch[0] for batch in tasting.outputs(i, "validation")])
            assert (got - logits(reference(base, [folder], "llama"))).abs().max() <= 1e-5
        weights = [0.2, 0.5, 0.3]
        want = scorer.score(reference(base, folders, "llama", weights), "validation")
        assert tasting.taste(weights) == pytest.approx(want, abs=1e-5)
        groups = tasting.groups("global")
        assert set(groups) >= {"model.layers.0.self_attn.q_proj", "model.embed_tokens"} and set(groups.values()) == {0}
        batch = scorer.collator([scorer.split("validation")[i] for i in range(4)])
        alpha = torch.tensor([weights])
        loss, dots = tasting.backward(alpha, groups, batch, torch.tensor(1.0))
        assert loss == pytest.approx(want, abs=1e-4)
        for i in range(3):
            step = torch.zeros(1, 3)
            step[0, i] = 1e-2
            up, _ = tasting.backward(alpha + step, groups, batch, torch.tensor(1.0))
            down, _ = tasting.backward(alpha - step, groups, batch, torch.tensor(1.0))
            assert dots[0, i].item() == pytest.approx((up - down) / 2e-2, rel=2e-2, abs=1e-4)
        assert tasting.learning_in_place == tasting.in_place
        assert tasting.summary()["adapter_mixing"]["learning"]["in_place"] == len(tasting.in_place)


def test_a_tied_embedding_keeps_its_branches(tmp_path):
    """A LoRA on an embedding tied to the output layer changes only the lookup: writing its soup into the shared
    weight would change the output layer too, so that module keeps branches (the others are written in place)."""
    from datasets import Dataset

    from hf_soup.adapters import AdapterTasting
    from hf_soup.ingredient import Ingredient

    make_model("llama", None, tie_word_embeddings=True).save_pretrained(tmp_path / "base")
    settings = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "embed_tokens"]}
    folders = [make_adapter(tmp_path / "base", tmp_path / f"t{i}", seed=i, b_scale=0.5, **settings) for i in range(2)]
    data = Dataset.from_dict({"input_ids": IDS.tolist(), "attention_mask": torch.ones_like(IDS).tolist()})
    losses = {}
    for mixing in ("in_place", "branches"):
        scorer = Scorer({"validation": data}, task="causal-lm", metric="loss", batch_size=2)
        adapters = [read_adapter(folder) for folder in folders]
        ingredients = [Ingredient.from_folder(folder) for folder in folders]
        with AdapterTasting(ingredients, adapters, tmp_path / "base", scorer, "validation", mixing=mixing) as tasting:
            assert "model.embed_tokens" in tasting.layers and "model.embed_tokens" not in tasting.in_place
            assert len(tasting.in_place) == (len(tasting.layers) - 1 if mixing == "in_place" else 0)
            losses[mixing] = tasting.taste([0.3, 0.7])
    assert losses["in_place"] == pytest.approx(losses["branches"], rel=1e-6)


def test_in_place_and_branches_choose_the_same_greedy_and_learned_soups(trained, splits):
    """Greedy and learned soups over adapters written in place give the same trace, choices, scores and learned
    coefficients as with branches (to fp32 rounding), and the tasting records how it applied them."""
    from hf_soup.adapters import AdapterTasting
    from hf_soup.comparison import choose
    from hf_soup.ingredient import Ingredient
    from hf_soup.strategies.registry import get_strategy

    base, folders = trained
    records = {}
    for mixing in ("in_place", "branches"):
        adapters = [read_adapter(folder) for folder in folders]
        ingredients = [Ingredient.from_folder(folder) for folder in folders]
        with AdapterTasting(ingredients, adapters, base, Scorer(splits), "validation", mixing=mixing) as tasting:
            _, greedy = choose(
                get_strategy("greedy"), {}, tasting, seed=0, report_splits=["test", "shift"], compared=["uniform"]
            )
            learned_parameters = {"epochs": 2, "batch_size": 32, "granularity": "global"}
            _, learned = choose(
                get_strategy("learned"), learned_parameters, tasting, seed=0, report_splits=[], compared=[]
            )
            records[mixing] = greedy, learned, tasting.summary()["adapter_mixing"], len(tasting.layers)
    (greedy, learned, mixed, count), (greedy_b, learned_b, branched, _) = records["in_place"], records["branches"]
    assert [(s["id"], s["accepted"]) for s in greedy["strategy"]["trace"]] == [
        (s["id"], s["accepted"]) for s in greedy_b["strategy"]["trace"]
    ]
    assert greedy["strategy"]["chosen"] == greedy_b["strategy"]["chosen"] == ["good_a", "good_b"]
    for step, other in zip(greedy["strategy"]["trace"], greedy_b["strategy"]["trace"]):
        assert step["score"] == pytest.approx(other["score"], abs=1e-9)
    for row, scores in greedy["report"]["rows"].items():
        assert scores == pytest.approx(greedy_b["report"]["rows"][row], abs=1e-9), row
    assert learned["strategy"]["alpha"] == pytest.approx(learned_b["strategy"]["alpha"], abs=1e-5)
    assert learned["strategy"]["loss_per_epoch"] == pytest.approx(learned_b["strategy"]["loss_per_epoch"], rel=1e-5)
    assert mixed["mixing"] == "in_place" and mixed["scoring"]["in_place"] == mixed["learning"]["in_place"] == count
    assert branched["scoring"]["branches"] == branched["learning"]["branches"] == count
    assert branched["scoring"]["in_place"] == 0 and greedy["report"]["adapter_mixing"]["scoring"]["tokens"] == 96 * 8


def test_each_module_tastes_the_cheaper_way_and_the_cook_records_it(trained, splits, tmp_path):
    """Scoring writes the soup in place once the split has more tokens than about half the layer's width; learning
    keeps branches for few adapters of small rank on a wide layer, in place for a narrow one with several (MiniLM's
    case, measured). `auto` follows the costs, per module."""
    from hf_soup.adapters.mixing import ModuleShape, costs, plan

    square = ModuleShape(entries=384 * 384, branch=768, rank=48, adapters=6, out=384, in_place=True)
    assert plan({"q": square}, 100, learning=False)[0] == set()
    assert plan({"q": square}, 300, learning=False)[0] == {"q"}
    assert plan({"q": square}, 2048, learning=True)[0] == {"q"}
    wide = ModuleShape(entries=4096 * 4096, branch=8192, rank=32, adapters=2, out=4096, in_place=True)
    assert plan({"w": wide}, 2048, learning=True)[0] == set()
    assert plan({"w": wide}, 16384, learning=False)[0] == {"w"}  # a split of 16k tokens
    tied = ModuleShape(entries=384 * 384, branch=768, rank=48, adapters=6, out=384, in_place=False)
    assert plan({"q": tied}, 2048, learning=True, mixing="in_place")[0] == set()
    chosen, record = plan({"q": square, "w": wide}, 2048, learning=True)
    assert chosen == {"q"} and record["in_place"] == record["branches"] == 1
    both = costs(square, 2048, learning=True)["in_place"] + costs(wide, 2048, learning=True)["branches"]
    assert record["multiply_adds"] == both
    with pytest.raises(SoupError, match="adapter mixing 'inplace' .* is unknown; use auto, in_place, branches"):
        plan({"q": square}, 1, learning=False, mixing="inplace")
    base, folders = trained
    soup = SoupBuilder(
        folders, method="learned", epochs=1, batch_size=16, evaluation=evaluation(splits, compare=[])
    ).cook(tmp_path / "soup", progress=False)
    mixing = soup.record["report"]["adapter_mixing"]
    modules = len(soup.record["ranks"])
    assert mixing["mixing"] == "auto"
    assert mixing["scoring"]["in_place"] == modules and mixing["scoring"]["tokens"] == 96 * 8
    assert mixing["learning"]["in_place"] == modules and mixing["learning"]["tokens"] == 16 * 8  # 32 wide, k = 3


def test_tasting_mixes_heads_without_losing_any(bert):
    """Scoring each adapter alone, then a soup, gives the merged soup: the resident head copy is overwritten by each
    candidate, never the adapters' own heads."""
    from datasets import Dataset

    from hf_soup.adapters import AdapterTasting
    from hf_soup.ingredient import Ingredient

    base, folders = bert
    data = Dataset.from_dict({"input_ids": IDS.tolist(), "label": [0, 1, 2, 0]})
    scorer = Scorer({"validation": data}, batch_size=4)
    adapters = [read_adapter(folder) for folder in folders]
    with AdapterTasting([Ingredient.from_folder(f) for f in folders], adapters, base, scorer, "validation") as tasting:
        assert set(tasting.heads) == {"classifier.weight", "classifier.bias"}
        for i, folder in enumerate(folders):
            got = tasting.outputs(i, "validation")[0][0]
            assert (got - logits(reference(base, [folder], "bert"))).abs().max() <= 1e-5
        weights = [0.5, 0.3, 0.2]
        tasting.mix(weights)
        got = torch.cat([batch[0] for batch in scorer.outputs(tasting.kitchen.model, "validation")])
        assert (got - logits(reference(base, folders, "bert", weights))).abs().max() <= 1e-5
        assert tasting.supports("mix") and tasting.supports("backward") and not tasting.supports("apply")
        with pytest.raises(SoupError, match="^apply: a 'ties' soup is written tensor by tensor, and adapter"):
            tasting.apply("ties", {"density": 0.5})


def test_greedy_rejects_a_noise_adapter_and_writes_the_scored_soup(trained, splits, tmp_path):
    base, folders = trained
    soup = SoupBuilder(folders, method="greedy", evaluation=evaluation(splits)).cook(tmp_path / "soup", progress=False)
    strategy = soup.record["strategy"]
    assert sorted(strategy["chosen"]) == ["good_a", "good_b"]
    noise = next(step for step in strategy["trace"] if step["id"] == "noise")
    assert noise["accepted"] is False and noise["score"] < strategy["score"]
    assert strategy["evaluations"] == 2 * 3 - 1
    assert {i["id"]: i["weight"] for i in soup.record["ingredients"]} == {"good_a": 0.5, "good_b": 0.5, "noise": 0.0}
    rows = soup.record["report"]["rows"]
    assert set(rows) == {"best individual", "uniform", "greedy", "ensemble", "greedy ensemble"}
    assert rows["uniform"]["validation"] < rows["greedy"]["validation"]
    assert soup.record["ranks"]["bert.encoder.layer.0.attention.self.query"] == 4  # noise left out: 2 + 2
    scorer = Scorer(splits)
    assert scorer.score(load_soup(base, soup.path, "bert"), "validation") == pytest.approx(strategy["score"])


def test_learned_adapter_soup_moves_weight_off_the_noise_adapter(trained, splits, tmp_path):
    base, folders = trained
    soup = SoupBuilder(
        folders,
        method="learned",
        granularity="global",
        epochs=3,
        batch_size=16,
        evaluation=evaluation(splits, compare=[]),
    ).cook(tmp_path / "global", progress=False)
    alpha = soup.record["strategy"]["alpha"]
    assert (
        alpha[2] < 1 / 3 - 0.05
        and soup.record["strategy"]["loss_per_epoch"][-1] < soup.record["strategy"]["loss_per_epoch"][0]
    )
    layered = SoupBuilder(
        folders,
        method="learned",
        epochs=1,
        batch_size=32,
        adapter_output="merged",
        evaluation=evaluation(splits, compare=[]),
    ).cook(tmp_path / "layer", progress=False)
    per_unit = layered.record["strategy"]["alpha"]
    assert "bert.encoder.layer.0.attention.self.query" in per_unit and "classifier.weight" in per_unit
    assert len({tuple(v) for v in per_unit.values()}) > 1  # one row per LoRA module and head tensor
    scorer = Scorer(splits)
    got = scorer.score(load_soup(base, layered.path, "bert"), "validation")
    assert got == pytest.approx(layered.record["strategy"]["score"])


def test_search_of_a_method_that_is_not_linear_is_refused_over_adapters_before_any_trial(trained, splits, tmp_path):
    """A new user's recipe: search `ties` over two LoRA adapters, `base_model:` set. Adapters are tasted in adapter
    space, where only linear soups are: the refusal says so before trial 0 (not "add `base_model:`": it is there)."""
    base, folders = trained
    scorer = Scorer(splits)
    builder = SoupBuilder(
        folders[:2],
        method="search",
        merge="ties",
        space={"density": {"low": 0.2, "high": 0.8}},
        trials=3,
        base_model=str(base),
        evaluation=evaluation(splits, compare=[]),
    )
    with pytest.raises(SoupError) as refused:
        builder.cook(tmp_path / "soup", progress=False, scorer=scorer)
    assert str(refused.value) == (
        "search: method 'ties' is not a linear combination, and adapter ingredients are tasted in adapter space, "
        "where only linear soups can be tasted; use weighted or uniform-family methods over adapters, or merge the "
        "adapters into full models first"
    )
    assert scorer.evaluations == 0  # no trial scored, not even an ingredient
    assert list(tmp_path.iterdir()) == []  # no soup, no staging folder, no study


def test_pantry_recipe_and_cli(llama, tmp_path, capsys):
    from hf_soup.cli import main

    base, folders = llama
    pantry = Pantry(tmp_path / "pantry")
    for folder in folders:
        pantry.add(folder, run=folder.name, base_model=str(base))
    recipe = tmp_path / "lora.yaml"
    recipe.write_text("method: uniform\npantry: pantry\nadapter_output: svd\nrank: 4\noutput: soup\n")
    assert main(["cook", str(recipe), "--quiet"]) == 0
    record = json.loads((tmp_path / "soup" / "soup.json").read_text())
    assert [i["id"] for i in record["ingredients"]] == ["a0", "a1", "a2"] and record["ingredients"][0]["sha256"]
    assert record["adapter_output"] == "svd" and record["rank"] == 4 and record["relative_error"] > 0


@pytest.mark.slow
def test_soup_of_lora_runs_collected_by_the_callback(tmp_path):
    """SoupCallback on peft runs → pantry of adapters → the recipe in recipes/lora_uniform.yaml, cooked."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments

    from hf_soup import SoupCallback
    from hf_soup.recipe import load_recipe

    make_model("bert", None, num_labels=2).save_pretrained(tmp_path / "base")
    data = make_split(64, 0).rename_column("label", "labels")
    for lr in (1e-3, 3e-3):
        model = get_peft_model(
            BertForSequenceClassification.from_pretrained(tmp_path / "base"),
            LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"]),
        )
        args = TrainingArguments(
            str(tmp_path / f"runs/lr{lr:g}"),
            learning_rate=lr,
            max_steps=4,
            eval_strategy="steps",
            eval_steps=2,
            save_steps=2,
            per_device_train_batch_size=16,
            metric_for_best_model="loss",
            report_to="none",
            use_cpu=True,
        )
        Trainer(
            model, args, train_dataset=data, eval_dataset=data, callbacks=[SoupCallback(tmp_path / "pantry")]
        ).train()
    assert [i.kind for i in Pantry(tmp_path / "pantry").list()] == ["adapter", "adapter"]
    source = Path(__file__).parent.parent / "recipes" / "lora_uniform.yaml"
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "lora_uniform.yaml").write_text(source.read_text())
    recipe = load_recipe(tmp_path / "recipes" / "lora_uniform.yaml")
    soup = SoupBuilder.from_recipe(recipe).cook(progress=False)
    assert soup.record["base_model"] == str(tmp_path / "base") and soup.record["adapter_output"] == "concat"
    assert (soup.path / "adapter_model.safetensors").is_file()


def test_adapter_soup_scored_by_a_trainer_equals_the_recipe_scorer(trained, splits, tmp_path):
    """LoRA adapters with `trainer=`: the tasting's model (base + every adapter) is scored by the Trainer's loop; the
    choice and every number equal the built-in scorer's on the same splits."""
    import numpy as np
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    base, folders = trained
    args = TrainingArguments(str(tmp_path / "t"), per_device_eval_batch_size=32, metric_for_best_model="accuracy",
                             report_to="none", disable_tqdm=True)  # fmt: skip
    data = {name: split.rename_column("label", "labels") for name, split in splits.items()}
    trainer = Trainer(BertForSequenceClassification.from_pretrained(base), args, eval_dataset=data,
                      compute_metrics=accuracy)  # fmt: skip
    own = trainer.model
    by_trainer = SoupBuilder(folders, method="greedy", trainer=trainer, base_model=str(base)).cook(tmp_path / "a")
    by_recipe = SoupBuilder(folders, method="greedy", evaluation=evaluation(splits)).cook(tmp_path / "b")
    assert by_trainer.record["strategy"]["chosen"] == by_recipe.record["strategy"]["chosen"]
    for part in ("rows", "individuals"):
        mine, theirs = by_trainer.record["report"][part], by_recipe.record["report"][part]
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert mine[name] == pytest.approx(theirs[name], abs=1e-9), (part, name)
    assert trainer.model is own  # the adapter tasting's model was lent to the Trainer, then given back
