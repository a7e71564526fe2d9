"""Fuzzing pantry.json: whatever the ledger holds, reading it gives records or one clear `SoupError` line.

Three sources of ledgers: any JSON value; JSON shaped like a ledger (a format and a list of records whose fields take
any JSON value); and a valid ledger mutated field by field and byte by byte (truncated, bytes replaced, inserted).
Each ledger is read with `Pantry.list`, each record located (`Pantry.location`), the pantry verified and listed with
`hf-soup pantry list`: nothing may raise anything but `SoupError`, and every message is one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_soup.cli import main
from hf_soup.errors import SoupError
from hf_soup.ingredient import Ingredient
from hf_soup.pantry import Pantry

FUZZ = settings(max_examples=300, deadline=None, derandomize=True)
FIELDS = [
    "id",
    "path",
    "kind",
    "sha256",
    "metric",
    "value",
    "greater_is_better",
    "split",
    "step",
    "run",
    "hyperparameters",
    "tags",
    "base_model",
    "base_revision",
    "config_hash",
    "size",
    "created_at",
]
# Every character, lone surrogates and control characters included (JSON escapes them, json.loads gives them back).
TEXT = st.text(st.characters(codec=None, categories=None, exclude_categories=[]), max_size=12)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=16,
)
# a field name: a real one most of the time, sometimes a stranger
KEYS = st.sampled_from(FIELDS) | TEXT
LEDGER_SHAPED = st.fixed_dictionaries(
    {
        "format": st.sampled_from([1, 1, 1, 0, 2, True, "1", 1.0, None]) | JSON,
        "ingredients": st.lists(st.dictionaries(KEYS, JSON, max_size=6) | JSON, max_size=4),
    },
    optional={"extra": JSON},
)


def valid_ledger() -> dict:
    records = [
        Ingredient(
            id=f"run{i}-40",
            path=f"ingredients/run{i}-40",
            sha256={"model.safetensors": "ab" * 32},
            metric="eval_loss",
            value=1.0 / (i + 1),
            greater_is_better=False,
            split="validation",
            step=40,
            run=f"run{i}",
            hyperparameters={"learning_rate": 1e-4 * (i + 1), "seed": i},
            tags={"sweep": "lr"},
            base_model="tiny",
            config_hash="0123456789abcdef",
            size=1234,
            created_at="2025-01-01T00:00:00+00:00",
        ).to_dict()
        for i in range(3)
    ]
    return {"format": 1, "ingredients": records}


@pytest.fixture(scope="module")
def pantry(tmp_path_factory) -> Pantry:
    return Pantry(tmp_path_factory.mktemp("fuzz") / "pantry")


def check_reading(pantry: Pantry, raw: bytes) -> None:
    """Write `raw` as pantry.json; every reader either works or raises a one-line `SoupError`."""
    pantry.root.mkdir(parents=True, exist_ok=True)
    pantry.ledger.write_bytes(raw)
    try:
        ingredients = pantry.list()
    except SoupError as error:
        assert_one_line(error)
        ingredients = None
    if ingredients is not None:
        assert all(isinstance(i, Ingredient) for i in ingredients)
        for ingredient in ingredients:
            assert isinstance(ingredient.id, str) and isinstance(ingredient.sha256, dict)
            assert ingredient.value is None or isinstance(ingredient.value, float)
            try:
                folder = pantry.location(ingredient)
            except SoupError as error:
                assert_one_line(error)
            else:
                assert folder.is_relative_to(pantry.root.resolve())
        try:
            problems = pantry.verify()
        except SoupError as error:
            assert_one_line(error)
        else:
            assert all(isinstance(p, str) and "\n" not in p for p in problems)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["pantry", "list", str(pantry.root)])
    assert code == (0 if ingredients is not None else 2), err.getvalue()
    if code == 2:
        assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("hf-soup: error: ")


def assert_one_line(error: SoupError) -> None:
    message = str(error)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    message.encode("utf-8")  # printable on stderr: no lone surrogates


@FUZZ
@given(value=JSON)
def test_any_json_value(pantry, value):
    check_reading(pantry, json.dumps(value).encode())


@FUZZ
@given(value=LEDGER_SHAPED)
def test_ledger_shaped_json(pantry, value):
    check_reading(pantry, json.dumps(value).encode())


MUTATIONS = ("set field", "drop field", "add field", "format", "duplicate", "replace record", "truncate", "bytes")


@FUZZ
@given(data=st.data())
def test_mutated_valid_ledgers(pantry, data):
    ledger = valid_ledger()
    records = ledger["ingredients"]
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        mutation = data.draw(st.sampled_from(MUTATIONS), label="mutation")
        index = data.draw(st.integers(0, len(records) - 1), label="record") if records else None
        if mutation == "set field" and index is not None and isinstance(records[index], dict):
            records[index][data.draw(st.sampled_from(FIELDS))] = data.draw(JSON)
        elif mutation == "drop field" and index is not None and isinstance(records[index], dict):
            records[index].pop(data.draw(st.sampled_from(FIELDS)), None)
        elif mutation == "add field" and index is not None and isinstance(records[index], dict):
            records[index][data.draw(TEXT)] = data.draw(JSON)
        elif mutation == "format":
            ledger["format"] = data.draw(JSON | st.integers(-2, 3))
        elif mutation == "duplicate" and index is not None:
            records.append(json.loads(json.dumps(records[index])))
        elif mutation == "replace record" and index is not None:
            records[index] = data.draw(JSON)
    raw = json.dumps(ledger, indent=data.draw(st.sampled_from([None, 2]))).encode()
    if data.draw(st.booleans(), label="damage bytes"):
        raw = damage(raw, data)
    check_reading(pantry, raw)


def damage(raw: bytes, data) -> bytes:
    """Truncate, replace or insert bytes (invalid UTF-8 included)."""
    position = data.draw(st.integers(0, len(raw)), label="position")
    kind = data.draw(st.sampled_from(["truncate", "replace", "insert"]), label="damage")
    if kind == "truncate":
        return raw[:position]
    piece = data.draw(st.binary(min_size=1, max_size=4) | st.sampled_from([b"\xff", b'"', b"{", b"]", b"\\u"]))
    end = position + (len(piece) if kind == "replace" else 0)
    return raw[:position] + piece + raw[end:]


def test_a_deeply_nested_ledger_is_a_clear_error(pantry):
    """Deeper than the JSON parser's recursion limit (hypothesis rarely builds this one)."""
    depth = 100_000
    check_reading(pantry, b"[" * depth + b"]" * depth)
    with pytest.raises(SoupError, match="pantry.json is not valid JSON"):
        pantry.list()


def test_values_json_reads_but_a_ledger_cannot_hold(pantry):
    """NaN and infinity parse (Python's json accepts them) and a record's value may be one of them."""
    ledger = valid_ledger()
    ledger["ingredients"][0]["value"] = math.inf
    ledger["ingredients"][1]["value"] = math.nan
    check_reading(pantry, json.dumps(ledger).encode())
    values = [i.value for i in pantry.list()]
    assert values[0] == math.inf and math.isnan(values[1])


def test_the_valid_ledger_reads(pantry):
    check_reading(pantry, json.dumps(valid_ledger()).encode())
    assert [i.id for i in pantry.list()] == ["run0-40", "run1-40", "run2-40"]
    assert Path(pantry.location(pantry.list()[0])).name == "run0-40"
