"""Tokenizer-aware merges (`tokenizer:` in a recipe): two tiny Llama fine-tunes of one base, one of which added three
chat tokens and a chat template.

The base tokenizer has 61 ids in a 64-row embedding (3 padding rows); the chat fine-tune's 3 added tokens took those
rows (ids 61–63), so both fine-tunes have the same shapes and only the tokenizers tell the rows apart.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import edit_config, edit_weights, make_model, save_model, state_dict_of, word_tokenizer

from hf_soup import SoupBuilder, SoupError
from hf_soup.record import read_record

CHAT = ["<|im_start|>", "<|im_end|>", "<|system|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>{% endif %}"
)
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
WORDS = 61  # the base tokenizer's ids


def save(folder, seed, tokenizer, **config):
    save_model(make_model("llama", seed, **config), folder)
    tokenizer.save_pretrained(folder)
    return folder


def base_vocabulary(folder, target):
    """The model restricted to the base's vocabulary: its first 61 rows, `vocab_size` 61, the base tokenizer."""
    shutil.copytree(folder, target)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (target / name).unlink(missing_ok=True)
    word_tokenizer().save_pretrained(target)

    def cut(tensors):
        for name in (EMBED, HEAD):
            if name in tensors:
                tensors[name] = tensors[name][:WORDS].contiguous()

    edit_weights(target, cut)
    return edit_config(target, vocab_size=WORDS)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocabulary")
    save(root / "base", None, word_tokenizer())
    save(root / "run", 1, word_tokenizer())
    save(root / "chat", 2, word_tokenizer(CHAT, template=TEMPLATE))
    for name in ("base", "run", "chat"):
        base_vocabulary(root / name, root / f"{name}-61")
    return root


def cook(folders, output, **options):
    return SoupBuilder([str(f) for f in folders], **options).cook(output, progress=False)


def logits(folder, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits


PROMPTS = torch.randint(3, WORDS, (2, 8), generator=torch.Generator().manual_seed(0))
METHODS = {
    "uniform": {"method": "uniform"},
    "ties": {"method": "ties", "density": 0.5, "base": True},
    "slerp": {"method": "slerp", "t": 0.3},
}


@pytest.mark.parametrize("name", METHODS)
def test_union_soup_equals_the_merge_of_the_base_vocabulary_models(models, tmp_path, name):
    """On prompts of base tokens, the union soup's logits over the base vocabulary are those of the same method on
    the models cut to the base vocabulary; the added tokens' rows are the chat fine-tune's own."""
    options = dict(METHODS[name])
    base = options.pop("base", False)
    union = cook(
        [models / "run", models / "chat"],
        tmp_path / "union",
        tokenizer="union",
        **options,
        **({"base_model": str(models / "base")} if base else {}),
    )
    cut = cook(
        [models / "run-61", models / "chat-61"],
        tmp_path / "cut",
        **options,
        **({"base_model": str(models / "base-61")} if base else {}),
    )
    got, want = logits(union.path, PROMPTS), logits(cut.path, PROMPTS)
    assert got.shape[-1] == 64 and want.shape[-1] == WORDS
    torch.testing.assert_close(got[..., :WORDS], want, rtol=0, atol=1e-6)
    soup, chat, reference = state_dict_of(union.path), state_dict_of(models / "chat"), state_dict_of(cut.path)
    for tensor in (EMBED, HEAD):
        assert torch.equal(soup[tensor][WORDS:], chat[tensor][WORDS:])  # not blended with run's padding rows
        assert torch.equal(soup[tensor][:WORDS], reference[tensor])
    assert all(torch.equal(soup[n], reference[n]) for n in soup if n not in (EMBED, HEAD))


def test_union_soup_loads_encodes_the_chat_template_and_generates(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    soup = cook([models / "run", models / "chat"], tmp_path / "soup", tokenizer="union")
    tokenizer = AutoTokenizer.from_pretrained(soup.path)
    model = AutoModelForCausalLM.from_pretrained(soup.path)
    assert len(tokenizer) == 64 == model.config.vocab_size
    assert tokenizer.convert_tokens_to_ids(CHAT) == [61, 62, 63] and tokenizer.chat_template == TEMPLATE
    assert tokenizer("w0 <|im_start|> w1")["input_ids"] == [3, 61, 4]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": "w1 w2"}], add_generation_prompt=True)
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    assert ids == [61, 4, 5, 62, 61]
    out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert out.shape == (1, 9) and int(out.max()) < 64
    record = read_record(soup.path)
    vocabulary = record["vocabulary"]
    assert (vocabulary["tokenizer"], vocabulary["tokens"], vocabulary["rows"]) == ("union", 64, 64)
    assert [(e["token"], e["id"], e["ids"], e["filled_from"]) for e in vocabulary["mapping"]] == [
        (token, 61 + i, {"run": None, "chat": 61 + i}, ["chat"]) for i, token in enumerate(CHAT)
    ]
    assert vocabulary["chat_template"] == "chat" and vocabulary["padding_rows"] == 0
    card = (soup.path / "README.md").read_text()
    assert "## Vocabulary" in card and "`tokenizer: union`" in card and "The chat template is chat's." in card


def test_base_drops_the_added_tokens_with_a_note(models, tmp_path):
    soup = cook(
        [models / "run", models / "chat"], tmp_path / "soup", tokenizer="base", base_model=str(models / "base")
    )
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(soup.path)) == WORDS
    assert json.loads((soup.path / "config.json").read_text())["vocab_size"] == 64  # the base's rows, padded
    assert any("drops 3 token(s) of chat" in note for note in soup.record["notes"])
    assert soup.record["vocabulary"]["dropped"] == {"chat": CHAT}
    got, run, chat, base = (state_dict_of(f) for f in (soup.path, models / "run", models / "chat", models / "base"))
    torch.testing.assert_close(got[EMBED][:WORDS], (run[EMBED][:WORDS] + chat[EMBED][:WORDS]) / 2)
    # padding rows: chat has none (its 64 rows are tokens), so it takes the base's; its chat rows are not padding
    torch.testing.assert_close(got[EMBED][WORDS:], (run[EMBED][WORDS:] + base[EMBED][WORDS:]) / 2)


def test_an_ingredient_tokenizer_is_taken_as_it_is(models, tmp_path):
    union = cook([models / "run", models / "chat"], tmp_path / "union", tokenizer="union")
    chosen = cook([models / "run", models / "chat"], tmp_path / "chat", tokenizer="chat")
    from transformers import AutoTokenizer

    soup, chat = AutoTokenizer.from_pretrained(chosen.path), AutoTokenizer.from_pretrained(models / "chat")
    assert soup.get_vocab() == chat.get_vocab() and soup.chat_template == TEMPLATE
    got, want = state_dict_of(chosen.path), state_dict_of(union.path)
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_tied_embeddings_stay_tied(models, tmp_path):
    from transformers import AutoModelForCausalLM

    run = save(tmp_path / "run", 1, word_tokenizer(), tie_word_embeddings=True)
    chat = save(tmp_path / "chat", 2, word_tokenizer(CHAT, template=TEMPLATE), tie_word_embeddings=True)
    soup = cook([run, chat], tmp_path / "soup", tokenizer="union")
    tensors = state_dict_of(soup.path)
    assert HEAD not in tensors and tensors[EMBED].shape == (64, 32)
    assert torch.equal(tensors[EMBED][WORDS:], state_dict_of(chat)[EMBED][WORDS:])
    model = AutoModelForCausalLM.from_pretrained(soup.path)
    assert (
        model.config.tie_word_embeddings
        and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    )


def test_padding_rows_are_never_tokens(models, tmp_path):
    """A fine-tune that grew to 65 tokens in 128 rows (padded to a multiple of 64): the union pads its 65 tokens to
    128 rows too; its tokens' rows are the fine-tune's own, whatever padding rows the other model has."""
    tool = save(tmp_path / "tool", 3, word_tokenizer([*CHAT, "<|tool|>"]), vocab_size=128)
    soup = cook([models / "run", tool], tmp_path / "soup", tokenizer="union")
    vocabulary = soup.record["vocabulary"]
    assert (vocabulary["tokens"], vocabulary["rows"], vocabulary["padding_rows"]) == (65, 128, 63)
    assert vocabulary["pad_to_multiple_of"] == 64
    got, own = state_dict_of(soup.path), state_dict_of(tool)
    assert got[EMBED].shape == (128, 32) and torch.equal(got[EMBED][WORDS:65], own[EMBED][WORDS:65])
    out = logits(soup.path, PROMPTS)
    assert out.shape == (2, 8, 128) and torch.isfinite(out).all()


def test_a_missing_token_takes_the_mean_of_those_that_have_it_or_the_chosen_row(models, tmp_path):
    other = save(tmp_path / "chat_b", 3, word_tokenizer(CHAT, template=TEMPLATE))
    folders = [models / "run", models / "chat", other]
    mean = cook(folders, tmp_path / "mean", tokenizer="union")
    chosen = cook(folders, tmp_path / "chosen", tokenizer={"vocabulary": "union", "rows": {"<|im_start|>": "chat"}})
    a, b = state_dict_of(models / "chat")[EMBED], state_dict_of(other)[EMBED]
    torch.testing.assert_close(state_dict_of(mean.path)[EMBED][61:], (a[61:] + b[61:]) / 2)
    got = state_dict_of(chosen.path)[EMBED]
    torch.testing.assert_close(got[61], (2 * a[61] + b[61]) / 3)
    torch.testing.assert_close(got[62:], (a[62:] + b[62:]) / 2)
    assert chosen.record["vocabulary"]["mapping"][0]["filled_from"] == ["chat"]


def test_differing_tokenizers_are_refused_by_default(models, tmp_path):
    with pytest.raises(SoupError, match=r"the tokenizers differ: chat has 3 token\(s\) run lacks \('<\|im_start\|>'"):
        cook([models / "run", models / "chat"], tmp_path / "soup")
    assert not (tmp_path / "soup").exists()


def test_differing_chat_templates_of_one_vocabulary_are_a_note(models, tmp_path):
    other = save(tmp_path / "run_b", 3, word_tokenizer(template="{{ messages[0]['content'] }}"))
    soup = cook([models / "run", other], tmp_path / "soup")
    assert any("chat templates differ (run_b have one" in note for note in soup.record["notes"])


def test_strategies_taste_aligned_models(models, tmp_path):
    """Greedy and search (slerp, applied on the resident model) score the union soup they write."""
    from datasets import Dataset

    from hf_soup.scoring import Scorer

    rows = torch.randint(3, 64, (8, 10), generator=torch.Generator().manual_seed(1))
    splits = {"validation": Dataset.from_dict({"input_ids": rows.tolist()})}
    evaluation = {"task": "causal-lm", "metric": "loss", "splits": splits, "selection_split": "validation"}
    folders = [models / "run", models / "chat"]
    greedy = cook(folders, tmp_path / "greedy", method="greedy", tokenizer="union", evaluation=evaluation)
    search = cook(
        folders,
        tmp_path / "search",
        method="search",
        merge="slerp",
        space={"t": {"low": 0.0, "high": 1.0}},
        sampler="grid",
        grid_points=3,
        tokenizer="union",
        evaluation=evaluation,
    )
    from transformers import AutoModelForCausalLM

    scorer = Scorer(splits, task="causal-lm", metric="loss")
    for soup in (greedy, search):
        model = AutoModelForCausalLM.from_pretrained(soup.path)
        assert model.config.vocab_size == 64
        assert scorer.score(model, "validation") == pytest.approx(soup.record["strategy"]["score"], abs=1e-5)


def test_figures_from_a_union_recipe_read_the_aligned_models(models):
    """`hf-soup plot` tastes a recipe's ingredients and base in the soup's vocabulary, as the cook does."""
    from datasets import Dataset

    from hf_soup.plots import landscape
    from hf_soup.recipe import Recipe
    from hf_soup.recipe_plots import recipe_tasting

    rows = torch.randint(3, 64, (4, 6), generator=torch.Generator().manual_seed(2))
    evaluation = {
        "task": "causal-lm",
        "metric": "loss",
        "splits": {"validation": Dataset.from_dict({"input_ids": rows.tolist()})},
        "selection_split": "validation",
    }
    recipe = Recipe.from_mapping(
        {
            "method": "greedy",
            "ingredients": [str(models / "run"), str(models / "chat")],
            "base_model": str(models / "base"),
            "tokenizer": "union",
            "evaluation": evaluation,
        }
    )
    with recipe_tasting(recipe) as tasting:
        assert tasting.base.info(EMBED).shape == (64, 32) and tasting.kitchen.model.config.vocab_size == 64
        data = landscape(tasting, tasting.base, 0, 1, grid=2, span=(0.0, 1.0))
    scores = [score for row in data["scores"] for score in row]
    assert len(scores) == 4 and all(score == score for score in scores)
