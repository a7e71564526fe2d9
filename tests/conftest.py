"""Tiny models built from config, offline: a base plus seeded noise per ingredient."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def _private_cache() -> None:
    """Tests write hf_soup's cache (sha256 digests) into a temporary folder, never the user's; the demo data that
    `scripts/dev.sh` fetched into the real cache is linked in (the tests are offline)."""
    import tempfile

    from hf_soup.cache import cache_dir
    from hf_soup.demo.data import SDIST

    real = cache_dir() / SDIST
    private = Path(tempfile.mkdtemp(prefix="hf_soup-test-cache-"))
    if real.is_file():
        (private / SDIST).symlink_to(real)
    os.environ["HF_SOUP_CACHE"] = str(private)


_private_cache()
torch.set_num_threads(1)  # tiny models: intra-op threads cost more than they give, most of all on a busy machine

# Two CPU processes (gloo) under `accelerate launch`, as a multi-GPU sweep or distributed scoring would run.
ACCELERATE_LAUNCH = [
    str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
]  # fmt: skip


def launched(arguments: list[str], tmp_path: Path) -> tuple[dict, list[dict]]:
    """Run a script (`arguments`: the script and its options) in one process and under `accelerate launch` with 2;
    each rank writes `<output>.rank-<n>.json`. Returns what the 1-process rank and the 2 ranks wrote."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for name, prefix in (("one", [sys.executable]), ("two", ACCELERATE_LAUNCH)):
        command = [*prefix, *arguments, "--output", str(tmp_path / name)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    one = json.loads((tmp_path / "one.rank-0.json").read_text())
    return one, [json.loads((tmp_path / f"two.rank-{rank}.json").read_text()) for rank in (0, 1)]


def llama_config(**overrides):
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def t5_config():
    """A tiny T5 (pad 0, eos 1) for seq2seq tests."""
    from transformers import T5Config

    return T5Config(
        vocab_size=64,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def bert_config(**overrides):
    from transformers import BertConfig

    settings = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    settings.update(overrides)
    return BertConfig(**settings)


def make_model(kind: str = "llama", seed: int = 0, noise: float = 0.02, **overrides):
    """The base model (seed 0 init) plus noise drawn with `seed`; `seed=None` gives the base itself."""
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(llama_config(**overrides))
    elif kind == "bert":
        model = BertForSequenceClassification(bert_config(**overrides))
    else:
        raise ValueError(kind)
    if seed is not None:
        generator = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
    return model.eval()


def save_model(model, folder: Path, *, dtype: torch.dtype | None = None, max_shard_size: str | None = None) -> Path:
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture
def make_ingredients(tmp_path):
    """`make_ingredients(k, kind="llama", dtype=None, max_shard_size=None, **config)` → list of saved folders."""

    def make(k: int = 3, kind: str = "llama", *, dtype=None, max_shard_size=None, prefix="run", **overrides):
        folders = []
        for seed in range(k):
            model = make_model(kind, seed, **overrides)
            folders.append(save_model(model, tmp_path / f"{prefix}{seed}", dtype=dtype, max_shard_size=max_shard_size))
        return folders

    return make


def state_dict_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved folder (single or sharded), read with safetensors."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def edit_weights(folder: Path, change) -> Path:
    """Rewrite a single-file folder's `model.safetensors` after `change(tensors)` has edited the dict in place."""
    from safetensors.torch import save_file

    tensors = state_dict_of(folder)
    change(tensors)
    save_file(tensors, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
    return folder


def edit_config(folder: Path, **changes) -> Path:
    """Set keys of a folder's `config.json`."""
    import json

    path = Path(folder) / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


def word_tokenizer(added=(), *, template=None, words=58, swap=False):
    """A tiny fast tokenizer built in memory: `<unk>`, `<s>`, `</s>` and `words` words `w0`, `w1`, ... (61 ids by
    default: a 64-row embedding has 3 padding rows), then the special tokens `added` and a chat `template`.
    `swap` exchanges the ids of `w0` and `w1` (another tokenizer of the same words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = [f"w{i}" for i in range(words)]
    if swap:
        names[0], names[1] = names[1], names[0]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{name: i + 3 for i, name in enumerate(names)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if added:
        tokenizer.add_special_tokens({"extra_special_tokens": list(added)})
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


class Payload:
    """A pickle that makes the folder `path` when it is unpickled (the stand-in for any code a pickle can run)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def make_split(count, seed, *, shift=False):
    """Label = whether the first token is in the upper half of the vocabulary (the task the model learns).

    The shift split draws the other tokens from a different range.
    """
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(4, 64, (count, 1), generator=generator)
    rest = torch.randint(40 if shift else 4, 64 if shift else 40, (count, 7), generator=generator)
    ids = torch.cat([first, rest], dim=1)
    return Dataset.from_dict({"input_ids": ids.tolist(), "label": (first[:, 0] >= 34).long().tolist()})


# -- a tiny BERT trained so the answers of strategies are known (test_strategies, test_search) -------------------
@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny BERT classifier trained to ~100% accuracy, saved once per session."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config(num_labels=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = make_split(512, 1)
    ids, labels = torch.tensor(data["input_ids"]), torch.tensor(data["label"])
    model.train()
    for step in range(80):
        batch = slice((step * 32) % 512, (step * 32) % 512 + 32)
        loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return save_model(model, tmp_path_factory.mktemp("trained") / "model")


def perturbed(trained, folder, seed, scale):
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(trained)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return save_model(model, folder)


@pytest.fixture
def ingredients(trained, tmp_path):
    """Two good fine-tunes (small perturbations) and one broken run (large noise)."""
    return [
        perturbed(trained, tmp_path / "good_a", 1, 0.005),
        perturbed(trained, tmp_path / "good_b", 2, 0.005),
        perturbed(trained, tmp_path / "noise", 3, 1.0),
    ]


@pytest.fixture
def splits():
    return {"validation": make_split(96, 10), "test": make_split(96, 11), "shift": make_split(96, 12, shift=True)}


def evaluation(splits, **extra):
    return {"splits": splits, "selection_split": "validation", "report_splits": ["test", "shift"], **extra}
