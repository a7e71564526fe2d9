"""The ingredients' tokenizers: found, loaded, compared, and the recipe's `tokenizer:` choice parsed.

Without a `tokenizer:` choice, `check_tokenizers` refuses ingredients whose tokenizers hold different tokens (naming
them), before any tensor is read; `hf_soup.vocabulary` builds the soup's vocabulary when a choice is made.

Example:

```python
>>> choice = TokenizerChoice.parse({"vocabulary": "union", "chat_template": "chat"}, "recipe.yaml")
>>> tokenizer = load_tokenizer(Path("runs/chat"), "chat")
```
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SoupError, brief, first_line
from .jsonfile import read_model_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")  # one is enough
SAVED_FILES = (  # what a tokenizer may have saved: replaced as a whole when the soup's tokenizer is written
    *TOKENIZER_FILES,
    *("special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "spiece.model"),
    *("sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json"),
)
HOW = "(see README, 'Vocabularies')"


@dataclass(frozen=True)
class TokenizerChoice:
    """The recipe's `tokenizer:`: a mode alone (`tokenizer: union`) or a mapping with `vocabulary` (the mode),
    `chat_template` (whose template, an ingredient id or `base`) and `rows` (token → `base`, `mean` or an
    ingredient id: where a model that lacks the token takes its row from)."""

    vocabulary: str
    chat_template: str | None = None
    rows: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any, source: str) -> TokenizerChoice | None:
        if value is None:
            return None
        data = {"vocabulary": value} if isinstance(value, str) else value
        if not isinstance(data, Mapping):
            raise SoupError(f"{source}: `tokenizer` must be base, union, an ingredient id or a mapping")
        unknown = [key for key in data if key not in ("vocabulary", "chat_template", "rows")]
        if unknown:
            raise SoupError(
                f"{source}: tokenizer: unknown key {brief(unknown[0])}; keys: vocabulary (base, union or an "
                "ingredient id), chat_template (an ingredient id or base), rows (token: base, mean or ingredient id)"
            )
        rows = data.get("rows", {})
        expected = {"vocabulary": (str,), "chat_template": (str, type(None)), "rows": (Mapping,)}
        for key, kinds in expected.items():
            value = data.get(key, {} if key == "rows" else None)
            if not isinstance(value, kinds) or value == "":
                wanted = "a mapping of token to base, mean or an ingredient id" if key == "rows" else "a string"
                raise SoupError(f"{source}: tokenizer: `{key}` must be {wanted}, got {brief(value)} {HOW}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in rows.items()):
            raise SoupError(f"{source}: tokenizer: `rows` maps tokens (strings) to base, mean or an ingredient id")
        return cls(data["vocabulary"], data.get("chat_template"), dict(rows))


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: Path, label: str | None = None):
    """The tokenizer saved in `folder` (its JSON files checked first); what Transformers cannot load is a one-line
    `SoupError` naming the folder."""
    from transformers import AutoTokenizer

    for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json"):
        read_model_file(Path(folder), name)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except SoupError:
        raise
    except Exception as error:  # noqa: BLE001 - tokenizers' own parse errors are plain `Exception`s
        raise SoupError(
            (f"ingredient {label}: " if label else "")
            + f"cannot load the tokenizer saved in {folder} ({type(error).__name__}: {first_line(error)}); check "
            "its tokenizer_config.json and special_tokens_map.json, or save the tokenizer again "
            "(tokenizer.save_pretrained)"
        ) from None


@dataclass
class Held:
    """One model's tokenizer as the soup sees it: its tokens by id, and its embedding rows."""

    label: str
    folder: Path
    tokenizer: Any
    rows: int

    def __post_init__(self):
        self.ids = dict(self.tokenizer.get_vocab())  # token → id
        self.tokens = {i: token for token, i in self.ids.items()}
        self.size = max(self.ids.values(), default=-1) + 1
        self.added = dict(self.tokenizer.added_tokens_decoder)
        self.template = getattr(self.tokenizer, "chat_template", None)
        self.held = {token: i for token, i in self.ids.items() if i < self.rows}  # tokens with an embedding row


def _fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in SAVED_FILES:
        if (Path(folder) / name).is_file():
            digest.update(name.encode() + b"\0" + (Path(folder) / name).read_bytes())
    return digest.hexdigest()


def check_tokenizers(models: Sequence[Any], source: str) -> list[str]:
    """Default: every model with a tokenizer holds the same tokens at the same ids; differing chat templates are
    noted (the soup keeps the tokenizer it copies)."""
    present = [model for model in models if has_tokenizer(model.folder)]
    if len({_fingerprint(model.folder) for model in present}) <= 1:
        return []
    loaded = [(model.label, load_tokenizer(model.folder, model.label)) for model in present]
    first, vocabulary = loaded[0][0], loaded[0][1].get_vocab()
    for label, tokenizer in loaded[1:]:
        other = tokenizer.get_vocab()
        if other == vocabulary:
            continue
        extra = sorted((t for t in other if t not in vocabulary), key=other.get)
        gone = sorted((t for t in vocabulary if t not in other), key=vocabulary.get)
        moved = [t for t in other if t in vocabulary and other[t] != vocabulary[t]]
        parts = [f"{label} has {len(extra)} token(s) {first} lacks ({few(extra)})"] if extra else []
        parts += [f"{first} has {len(gone)} token(s) {label} lacks ({few(gone)})"] if gone else []
        parts += (
            [f"{moved[0]!r} is id {other[moved[0]]} in {label} but {vocabulary[moved[0]]} in {first}"] if moved else []
        )
        raise SoupError(
            f"{source}: the tokenizers differ: {'; '.join(parts)}; choose the soup's vocabulary with `tokenizer: "
            "union` (every token), `tokenizer: base` (the base model's) or `tokenizer: <ingredient id>` " + HOW
        )
    templates = {label: getattr(tokenizer, "chat_template", None) for label, tokenizer in loaded}
    if len({json.dumps(t, sort_keys=True) for t in templates.values()}) > 1:
        return [
            f"the chat templates differ ({', '.join(k for k, t in templates.items() if t)} have one, not all the "
            "same): the soup keeps the tokenizer copied from the base model (else the first ingredient); "
            "`tokenizer: <ingredient id>` keeps that ingredient's"
        ]
    return []


def few(tokens: Sequence[str], count: int = 3) -> str:
    """Up to `count` tokens quoted, and how many more."""
    shown = ", ".join(repr(t) for t in list(tokens)[:count])
    return f"{shown}, +{len(tokens) - count} more" if len(tokens) > count else shown
