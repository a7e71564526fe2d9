"""The soup's vocabulary when the ingredients' tokenizers differ: the recipe's `tokenizer:` choice.

- no `tokenizer:` (default): the tokenizers of the ingredients (and of `base_model`) must hold the same tokens at the
  same ids; differing ones are refused with the tokens that differ.
- `union`: every token of every model: the base's ids first (the first ingredient's without a base), then the
  tokens the ingredients added, in recipe order and then id order.
- `base`: the base model's tokenizer; tokens the ingredients added are dropped (with a note).
- an ingredient id: that ingredient's tokenizer; tokens the others added are dropped (with a note).

A model that lacks a token of the soup gets, for that row, the base's row, or else the mean of the rows of the
ingredients that have it (`rows: {token: base | mean | <ingredient id>}` chooses per token). Rows beyond a tokenizer
(an embedding padded to a multiple of 64) are padding, never tokens: the soup pads its own rows the same way. The
rows are moved where tensors are read (`hf_soup.alignment`); this module decides where each comes from, and writes
the soup's tokenizer and `config.json`'s `vocab_size`.

Example:

```python
>>> choice = TokenizerChoice.parse("union", "recipe.yaml")
>>> vocabulary, notes = prepare_vocabulary(choice, readers, base, source="recipe.yaml")
>>> readers, base = vocabulary.align(readers, base)       # embedding and output rows in the soup's order
>>> vocabulary.write(staging_folder)                       # tokenizer files and config.json's vocab_size
```
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import torch

from .alignment import AlignedReader, Alignment, RowFills, source_rows, vocabulary_tensors
from .errors import SoupError, brief, did_you_mean
from .jsonfile import read_model_file
from .tokenization import SAVED_FILES, Held, TokenizerChoice, check_tokenizers, few, has_tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

MODES = ("union", "base")
ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass
class Vocabulary:
    """The soup's vocabulary: its tokenizer, where each row of the vocabulary tensors comes from, and the record."""

    mode: str
    tokenizer: Any
    alignment: Alignment
    record: dict[str, Any]
    notes: list[str]

    def align(self, readers: Sequence[Any], base: Any | None) -> tuple[list[AlignedReader], AlignedReader | None]:
        """Views of the ingredients (and base) with their vocabulary tensors in the soup's row order."""
        models = [*readers, *([base] if base is not None else [])]
        fills = RowFills(self.alignment, models)
        views = [AlignedReader(reader, i, self.alignment, fills) for i, reader in enumerate(models)]
        return views[: len(readers)], views[-1] if base is not None else None

    def config_overrides(self) -> dict[str, int]:
        return {"vocab_size": self.alignment.rows}

    def write(self, folder: Path) -> None:
        """Replace the tokenizer files in `folder` by the soup's tokenizer and set `config.json`'s `vocab_size`."""
        for name in SAVED_FILES:
            (Path(folder) / name).unlink(missing_ok=True)
        self.tokenizer.save_pretrained(folder)
        config = read_model_file(Path(folder), "config.json")
        if config is not None:
            inner = config.get("text_config") if "vocab_size" not in config else None
            (inner if isinstance(inner, dict) else config)["vocab_size"] = self.alignment.rows
            (Path(folder) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def prepare_vocabulary(
    choice: TokenizerChoice | None, readers: Sequence[Any], base: Any | None, *, source: str, trust_remote_code=False
) -> tuple[Vocabulary | None, list[str]]:
    """The soup's vocabulary for the recipe's `tokenizer:` choice, and notes; `(None, notes)` when no choice was
    made (then differing tokenizers are refused)."""
    models = [*readers, *([base] if base is not None else [])]
    if choice is None:
        return None, check_tokenizers(models, source)
    names = vocabulary_tensors(readers[0], trust_remote_code=trust_remote_code)
    held = []
    for reader in models:
        if not has_tokenizer(reader.folder):
            raise SoupError(
                f"{source}: tokenizer: {choice.vocabulary}: {reader.label} has no tokenizer files; the soup's "
                "vocabulary is built from every model's tokenizer: save it there (tokenizer.save_pretrained)"
            )
        shapes = {reader.info(name).shape[0] for name in names if name in reader}
        if len(shapes) != 1:
            raise SoupError(
                f"ingredient {reader.label}: "
                + (
                    f"its embedding tensors ({', '.join(names)}) differ in rows {sorted(shapes)}"
                    if shapes
                    else f"lacks the embedding tensors of {readers[0].label} ({', '.join(names)})"
                )
                + "; ingredients must come from one architecture"
            )
        held.append(Held(reader.label, reader.folder, load_tokenizer(reader.folder, reader.label), shapes.pop()))
    vocabulary = _build(choice, held, base is not None, frozenset(names), source)
    for model in held:
        rowless = sorted((t for t in model.ids if t not in model.held), key=model.ids.get)
        if rowless:
            vocabulary.notes.append(
                f"{model.label}'s tokenizer has {len(rowless)} token(s) beyond its {model.rows} embedding rows "
                f"({few(rowless)}; its embeddings were not resized): it lacks them, and a token no model has a row "
                "for is left out"
            )
    for note in vocabulary.notes:
        logger.warning(note)
    return vocabulary, vocabulary.notes


def _build(
    choice: TokenizerChoice, held: list[Held], has_base: bool, names: frozenset[str], source: str
) -> Vocabulary:
    """The soup's tokenizer for the choice, then where each of its rows comes from in every model."""
    ingredients, reference = (held[:-1], held[-1]) if has_base else (held, held[0])
    labels, mode, notes = [model.label for model in ingredients], choice.vocabulary, []
    if mode not in (*MODES, *labels) or (mode == "base" and not has_base):
        raise SoupError(
            f"{source}: tokenizer: {brief(mode)} is not "
            + (
                "available: `base` takes the base model's tokenizer, add `base_model:`"
                if mode == "base"
                else f"union, base or an ingredient id ({', '.join(labels)}){did_you_mean(mode, [*MODES, *labels])}"
            )
        )
    _check_shared_ids(reference, held, has_base, mode, source)
    if mode == "union":
        chosen, tokenizer = reference, load_tokenizer(reference.folder, reference.label)
        notes += _add_union(tokenizer, reference, ingredients, source)
    else:
        chosen = held[-1] if mode == "base" else ingredients[labels.index(mode)]
        tokenizer = chosen.tokenizer
    template = _template(choice, held, chosen, has_base, source, notes)
    if template is not None:
        tokenizer.chat_template = template.template
    alignment, record = _align(
        choice, tokenizer, held, has_base, reference, chosen if mode != "union" else None, source
    )
    alignment = Alignment(names, *alignment)
    record = {"tokenizer": mode, "reference": reference.label, **record}
    record["chat_template"] = template.label if template else None
    return Vocabulary(mode, tokenizer, alignment, record, [*_describe(record), *notes])


def _check_shared_ids(reference: Held, held: list[Held], strict: bool, mode: str, source: str) -> None:
    """Ids below the reference's size mean one token in every model (fine-tunes of one tokenizer). Without a base,
    two ingredients may hold different added tokens at one id (each added its own)."""
    for model in held:
        if model is reference:
            continue
        for i in range(min(reference.size, model.size)):
            mine, theirs = reference.tokens.get(i), model.tokens.get(i)
            if mine != theirs and (strict or i not in reference.added or i not in model.added):
                raise SoupError(
                    f"{source}: tokenizer: {mode}: {model.label} has {theirs!r} at id {i} where {reference.label} "
                    f"has {mine!r}; ids below {reference.size} ({reference.label}'s tokenizer) must mean the same "
                    "token in every model, as in fine-tunes of one tokenizer: these were not, and cannot be merged"
                )


def _add_union(tokenizer: Any, reference: Held, ingredients: list[Held], source: str) -> list[str]:
    """Add to the reference's tokenizer every token an ingredient added (its flags kept), and special-token roles
    the reference lacks; returns notes on roles that differ."""
    from tokenizers import AddedToken

    present, new, special = set(tokenizer.get_vocab()), [], []
    for model in ingredients:
        for i in sorted(model.held.values()):
            token = model.tokens[i]
            if token in present:
                continue
            if i not in model.added:
                raise SoupError(
                    f"{source}: tokenizer: union: {model.label}'s tokenizer holds {token!r} (id {i}) in its own "
                    f"vocabulary, not as an added token, and {reference.label}'s lacks it; union adds added tokens "
                    f"only: use `tokenizer: {model.label}` to take that tokenizer as it is"
                )
            flags = model.added[i]
            new.append(
                AddedToken(
                    token,
                    **{k: getattr(flags, k) for k in ("single_word", "lstrip", "rstrip")},
                    normalized=flags.normalized,
                    special=flags.special,
                )
            )
            special += [token] if token in _extra_special(model.tokenizer) else []
            present.add(token)
    tokenizer.add_tokens(new)
    if special:
        try:
            tokenizer.add_special_tokens({"extra_special_tokens": special}, replace_extra_special_tokens=False)
        except TypeError:  # transformers 4
            tokenizer.add_special_tokens(
                {"additional_special_tokens": special}, replace_additional_special_tokens=False
            )
    notes = []
    for role in ROLES:
        mine = getattr(tokenizer, role, None)
        others = [(m.label, str(v)) for m in ingredients if (v := getattr(m.tokenizer, role, None)) is not None]
        others = [(label, value) for label, value in others if value != (str(mine) if mine is not None else None)]
        if mine is None and others and others[0][1] in present:
            setattr(tokenizer, role, others[0][1])
            notes.append(f"{role} {others[0][1]!r} is {others[0][0]}'s ({reference.label}'s tokenizer has none)")
        elif others:
            shown = ", ".join(f"{label} {value!r}" for label, value in others)
            notes.append(f"{role}: the soup keeps {reference.label}'s {mine!r} (the ingredients differ: {shown})")
    return notes


def _extra_special(tokenizer: Any) -> set[str]:
    extra = getattr(tokenizer, "extra_special_tokens", None) or getattr(tokenizer, "additional_special_tokens", None)
    return {str(token) for token in (extra.values() if isinstance(extra, Mapping) else extra or [])}


def _template(
    choice: TokenizerChoice, held: list[Held], chosen: Held, has_base: bool, source: str, notes: list[str]
) -> Held | None:
    """The model whose chat template the soup keeps: the one named, else the chosen tokenizer's own (`base` or an
    ingredient id), else for `union` the one template the models have (differing ones are refused)."""
    named = {**({"base": held[-1]} if has_base else {}), **{model.label: model for model in held}}
    if choice.chat_template is not None:
        model = named.get(choice.chat_template)
        if model is None or model.template is None:
            have = [label for label, m in named.items() if m.template is not None and label != "base"]
            raise SoupError(
                f"{source}: tokenizer: chat_template: {brief(choice.chat_template)} "
                + ("has no chat template" if model is not None else "is not an ingredient id or base")
                + f"; models with a chat template: {', '.join(have) or 'none'}"
            )
        return model
    kinds: dict[str, list[str]] = {}
    for model in held:
        if model.template is not None:
            kinds.setdefault(json.dumps(model.template, sort_keys=True), []).append(model.label)
    if choice.vocabulary != "union":
        if len(kinds) > 1 or (kinds and chosen.template is None):
            others = [
                label for labels in kinds.values() for label in labels if named[label].template != chosen.template
            ]
            kept = f"keeps {chosen.label}'s" if chosen.template is not None else f"has none ({chosen.label} has none)"
            notes.append(
                f"chat template: the soup {kept}; {', '.join(others)} had another (tokenizer: chat_template: "
                "<ingredient id> keeps that one)"
            )
        return None
    if len(kinds) > 1:
        groups = "; ".join(f"{', '.join(labels)} have one" for labels in kinds.values())
        raise SoupError(
            f"{source}: tokenizer: union: the chat templates differ ({groups}); choose the one the soup keeps with "
            "tokenizer: {vocabulary: union, chat_template: <ingredient id or base>}"
        )
    return named[next(iter(kinds.values()))[0]] if kinds else None


def _align(
    choice: TokenizerChoice,
    tokenizer: Any,
    held: list[Held],
    has_base: bool,
    reference: Held,
    chosen: Held | None,
    source: str,
) -> tuple[tuple[int, list[torch.Tensor], dict[int, tuple[int, ...]], torch.Tensor], dict[str, Any]]:
    """The soup's rows (its tokens, padded like the models), each model's source rows, the fills and the shared
    rows (the fields of an `Alignment` after its names), and the record of the mapping."""
    vocabulary = tokenizer.get_vocab()
    tokens = {i: token for token, i in vocabulary.items()}
    size = max(tokens, default=-1) + 1
    padded = [model.rows for model in held if model.rows > model.size]
    multiple = reduce(math.gcd, padded) & -reduce(math.gcd, padded) if padded else None  # largest power of two
    if chosen is None:
        rows = max(reference.rows, -(-size // (multiple or 1)) * (multiple or 1))
    elif size > chosen.rows:
        raise SoupError(f"{source}: {chosen.label}'s tokenizer has {size} ids but its embeddings {chosen.rows} rows")
    else:
        rows = chosen.rows
    stacked = torch.stack([source_rows(model.held, tokens, rows, model.rows) for model in held])
    count, labels = len(held) - has_base, [model.label for model in held]
    rules = dict(choice.rows)
    fills = {}
    for row in (stacked < 0).any(0).nonzero().flatten().tolist():
        holders = tuple(i for i in range(count) if stacked[i, row] >= 0)
        rule = rules.pop(tokens[row], None) if row in tokens else None
        if rule is None:
            fills[row] = (len(held) - 1,) if has_base and stacked[-1, row] >= 0 else holders
            continue
        index = len(held) - 1 if rule == "base" and has_base else labels.index(rule) if rule in labels[:count] else -1
        if (rule == "mean" and not holders) or (rule != "mean" and (index < 0 or stacked[index, row] < 0)):
            having = ", ".join(labels[i] for i in range(len(held)) if stacked[i, row] >= 0)
            raise SoupError(
                f"{source}: tokenizer: rows: {tokens[row]!r}: {brief(rule)} has no row for it; choose mean or one "
                f"of the models that have one: {having}"
            )
        fills[row] = holders if rule == "mean" else (index,)
    if rules:
        token = next(iter(rules))
        raise SoupError(
            f"{source}: tokenizer: rows: {brief(token)} "
            + (
                "is held by every model: there is no row to fill"
                if token in vocabulary
                else "is not in the soup's vocabulary"
            )
        )
    is_token = torch.zeros(rows, dtype=torch.bool)
    is_token[[row for row in tokens if row < rows]] = True
    shared = (is_token & (stacked >= 0).all(0)).nonzero().flatten()
    mapping = []
    for row in ((stacked != torch.arange(rows)).any(0) & is_token).nonzero().flatten().tolist():
        ids = {label: int(stacked[i, row]) if stacked[i, row] >= 0 else None for i, label in enumerate(labels)}
        mapping.append({"token": tokens[row], "id": row, "ids": ids})
        if row in fills:
            mapping[-1]["filled_from"] = [labels[i] for i in fills[row]]
    record = {
        "tokens": len(vocabulary),
        "rows": rows,
        "padding_rows": rows - int(is_token.sum()),
        "pad_to_multiple_of": multiple,
        "mapping": mapping,
        "dropped": {
            m.label: sorted((t for t in m.held if t not in vocabulary), key=m.held.get)
            for m in held
            if set(m.held) - set(vocabulary)
        },
        "models": [{"id": model.label, "tokens": model.size, "rows": model.rows} for model in held],
    }
    return (rows, list(stacked), fills, shared), record


def _describe(record: dict[str, Any]) -> list[str]:
    """The notes a vocabulary leaves in soup.json and on the card."""
    mode, reference, mapping = record["tokenizer"], record["reference"], record["mapping"]
    notes = [f"tokenizer: {mode}: the soup's vocabulary has {record['tokens']} tokens ({reference}'s ids first)"]
    filled = [entry["token"] for entry in mapping if "filled_from" in entry]
    if filled:
        notes.append(
            f"{len(filled)} token(s) some models lack ({few(filled)}) take, in those models, the base's row, else "
            "the mean of the rows of the ingredients that have them (soup.json: vocabulary.mapping)"
        )
    if record["padding_rows"]:
        notes.append(
            f"{record['padding_rows']} padding row(s) after the tokens (embeddings padded to a multiple of "
            f"{record['pad_to_multiple_of']}, as in the models); padding rows are never taken for tokens"
        )
    for label, tokens in record["dropped"].items():
        notes.append(f"tokenizer: {mode} drops {len(tokens)} token(s) of {label} ({few(tokens)}): the soup lacks them")
    return notes
