"""Every snippet of README.md runs, in README order, in one project folder.

The README's snippets assume a project with the user's pretrained model in `base/` and CSV files in `data/`; this
module builds tiny stand-ins (a 2-layer BERT with a word-level tokenizer, sentences made of sentiment words) and
copies `recipes/` beside them. Python blocks run as scripts (a first line `# NAME.py` also saves the block under
that name, for later commands), bash blocks line by line, YAML blocks (first line `# NAME.yaml`) are saved and
cooked. The set-up block (`scripts/dev.sh`) is what CI itself runs; here its subcommands are checked to exist.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

ROOT = Path(__file__).parent.parent
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
POSITIVE = ["good", "great", "fine", "lovely", "superb", "warm", "fun", "bright"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "cold", "sad", "weak"]
NEUTRAL = ["the", "movie", "film", "plot", "was", "a", "very", "and", "actors", "story"]


def readme_blocks() -> list[tuple[int, str, str]]:
    text = (ROOT / "README.md").read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1), m.group(2)) for m in BLOCK.finditer(text)]


def sentences(count: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.randint(0, 1)
        words = rng.sample(NEUTRAL, 4) + rng.sample(POSITIVE if label else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """`base/` (a tiny BERT classifier with its tokenizer), `base-seq2seq/` (a tiny T5 with the same tokenizer),
    `data/*.csv` and a copy of `recipes/`."""
    root = tmp_path_factory.mktemp("readme-project")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *NEUTRAL]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(words)})  # (vocab_file= is ignored in 5.x)
    assert tokenizer.unk_token_id not in tokenizer("a good movie")["input_ids"]
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    seq2seq = T5Config(
        vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    T5ForConditionalGeneration(seq2seq).save_pretrained(root / "base-seq2seq")
    tokenizer.save_pretrained(root / "base-seq2seq")
    (root / "data").mkdir()
    for seed, (split, count) in enumerate({"train": 96, "validation": 32, "test": 32, "shift": 32}.items()):
        lines = ["sentence,label", *(f"{text},{label}" for text, label in sentences(count, seed))]
        (root / "data" / f"{split}.csv").write_text("\n".join(lines) + "\n")
    shutil.copytree(ROOT / "recipes", root / "recipes")
    return root


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # hf-soup, accelerate
    env.pop("HF_TOKEN", None)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def check(done: subprocess.CompletedProcess, what: str, expected: int = 0) -> None:
    assert done.returncode == expected, (
        f"{what} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )


def slow(code: str) -> bool:
    """Blocks that launch several processes run in the slow set; no later block needs what they make."""
    return "accelerate launch" in code


def blocks_with_marks():
    for line, language, code in readme_blocks():
        marks = [pytest.mark.slow] if slow(code) else []
        yield pytest.param(line, language, code, id=f"README.md:{line}-{language}", marks=marks)


def test_readme_has_a_snippet_for_each_way_of_working():
    code = "\n".join(code for _, _, code in readme_blocks())
    for needed in ("SoupCallback(", "hf-soup cook recipes/", "accelerate launch", "-m hf_soup cook", "hf-soup demo"):
        assert needed in code or needed in (ROOT / "README.md").read_text()


RAN: set[int] = set()  # README lines of the blocks already run in this module's project


@pytest.mark.parametrize(("line", "language", "code"), list(blocks_with_marks()))
def test_readme_snippet_runs(project, line, language, code):
    for earlier, earlier_language, earlier_code in readme_blocks():  # a block may use what the ones above made
        if earlier < line and earlier not in RAN and not slow(earlier_code):  # (deselected, e.g. `-m slow` alone)
            execute(project, earlier, earlier_language, earlier_code)
    execute(project, line, language, code)


def execute(project: Path, line: int, language: str, code: str) -> None:
    RAN.add(line)
    first = code.splitlines()[0]
    named = re.fullmatch(r"# (\S+\.(?:py|yaml))\b.*", first)
    if "scripts/dev.sh" in code:  # the set-up block: CI runs `dev.sh test`; `dev.sh demo` is `hf-soup demo`
        dev = (ROOT / "scripts" / "dev.sh").read_text()
        for sub in re.findall(r"scripts/dev\.sh (\w+)", code):
            assert f"  {sub})" in dev
        assert re.search(r'demo\) exec "\$VENV/bin/hf-soup" demo', dev), "dev.sh demo must run `hf-soup demo`"
        return
    if language == "python":
        script = project / (named.group(1) if named else f"readme_{line}.py")
        script.write_text(code)
        check(run([sys.executable, script.name], project), f"README.md:{line} python block")
    elif language == "yaml":
        assert named, f"README.md:{line}: a YAML block starts with `# NAME.yaml`"
        (project / named.group(1)).write_text(code)
        check(run(["hf-soup", "cook", named.group(1), "--quiet"], project), f"README.md:{line} yaml block")
    elif language == "bash":
        for command in code.splitlines():
            command = command.split("  #")[0].strip()
            if not command or command.startswith("#"):
                continue
            done = run(["bash", "-c", command], project)
            if command.startswith("hf-soup push"):  # offline: one clear line and exit code 2, nothing pushed
                check(done, command, expected=2)
                assert "hf-soup: error:" in done.stderr and "offline" in done.stderr.lower()
            else:
                check(done, command)
    else:
        pytest.fail(f"README.md:{line}: a {language!r} block that no test runs; use python, bash or yaml")
