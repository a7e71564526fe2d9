"""The sha256 cache: a digest is reused only for the very same unchanged file."""

from __future__ import annotations

import json
import os

import hf_soup.cache as cache
from hf_soup import SoupBuilder
from hf_soup.atomic import sha256_file


def counting(monkeypatch) -> list[str]:
    calls: list[str] = []

    def spy(path, **kwargs):
        calls.append(os.fspath(path))
        return sha256_file(path, **kwargs)

    monkeypatch.setattr(cache, "sha256_file", spy)
    return calls


def test_digest_is_reused_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SOUP_CACHE", str(tmp_path / "cache"))
    calls = counting(monkeypatch)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    first = cache.cached_sha256([weights])
    assert first == {"model.safetensors": sha256_file(weights)} and len(calls) == 1
    assert cache.cached_sha256([weights]) == first and len(calls) == 1  # reused
    weights.write_bytes(b"b" * 1000)  # same size, new content: the change time moves
    second = cache.cached_sha256([weights])
    assert second == {"model.safetensors": sha256_file(weights)} != first and len(calls) == 2
    replaced = tmp_path / "other.safetensors"
    replaced.write_bytes(b"a" * 1000)
    os.replace(replaced, weights)  # another inode under the same name
    assert cache.cached_sha256([weights]) == first and len(calls) == 3


def test_a_broken_or_unwritable_cache_only_costs_a_rehash(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / cache.DIGESTS).write_text("{not json")
    monkeypatch.setenv("HF_SOUP_CACHE", str(folder))
    calls = counting(monkeypatch)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x" * 10)
    assert cache.cached_sha256([weights]) == {"model.safetensors": sha256_file(weights)}
    assert len(json.loads((folder / cache.DIGESTS).read_text())) == 1
    monkeypatch.setenv("HF_SOUP_CACHE", str(weights))  # a file: the cache folder cannot be made
    assert cache.cached_sha256([weights]) == {"model.safetensors": sha256_file(weights)} and len(calls) == 2


def test_a_second_cook_of_the_same_folders_reuses_their_digests(make_ingredients, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SOUP_CACHE", str(tmp_path / "cache"))
    folders = make_ingredients(2)
    calls = counting(monkeypatch)
    first = SoupBuilder(folders).cook(tmp_path / "a", progress=False)
    assert len(calls) == 2
    second = SoupBuilder(folders).cook(tmp_path / "b", progress=False)
    assert len(calls) == 2
    digests = [i["sha256"] for i in first.record["ingredients"]]
    assert digests == [i["sha256"] for i in second.record["ingredients"]]
    assert digests[0] == {"model.safetensors": sha256_file(folders[0] / "model.safetensors")}
