"""Load: many processes adding to one pantry at once, and a soup of many ingredients.

- 8 processes add 25 entries each to one pantry at the same moment: all 200 are listed, ids unique, verify clean.
  The fast test forks its processes with their imports done (see tests/faults.py); the slow one starts
  `python -c` processes.
- A uniform soup of k = 32 ingredients is bit for bit the fp32 mean summed left to right, and within fp32 rounding
  of the float64 mean.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import state_dict_of
from faults import ADD_MANY, ENV, Forked, add_many

from hf_soup import SoupBuilder
from hf_soup.pantry import Pantry


def tiny_source(folder: Path) -> Path:
    """The smallest ingredient folder a pantry takes: a config and a one-tensor safetensors file."""
    from safetensors.torch import save_file

    folder.mkdir()
    save_file({"w": torch.arange(16, dtype=torch.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def run_writers(tmp_path: Path, writers: int, each: int, *, launch: str) -> float:
    """Start `writers` processes, release them together, wait; returns the seconds from release to the last exit."""
    root, source, start = tmp_path / "pantry", tiny_source(tmp_path / "source"), tmp_path / "start"
    Pantry(root).check_writable()
    arguments = [[str(root), str(source), str(w), str(each), str(start)] for w in range(writers)]
    if launch == "fork":
        processes = [Forked(add_many, a[0], a[1], int(a[2]), int(a[3]), a[4]) for a in arguments]
    else:
        processes = [subprocess.Popen([sys.executable, "-c", ADD_MANY, *a], env=ENV) for a in arguments]
        time.sleep(1)
    started = time.monotonic()
    start.touch()
    codes = [process.wait() for process in processes]
    seconds = time.monotonic() - started
    assert codes == [0] * writers
    pantry = Pantry(root)
    ids = [i.id for i in pantry.list()]
    assert sorted(ids) == sorted(f"w{w}-{s}" for w in range(writers) for s in range(each)), "an add was lost"
    assert len(set(ids)) == len(ids) == writers * each
    assert sorted(p.name for p in (root / "ingredients").iterdir()) == sorted(ids)
    assert pantry.verify() == []
    return seconds


def test_eight_processes_add_two_hundred_entries_at_once(tmp_path):
    run_writers(tmp_path, 8, 25, launch="fork")


@pytest.mark.slow
def test_eight_python_processes_add_two_hundred_entries_at_once(tmp_path):
    run_writers(tmp_path, 8, 25, launch="subprocess")


def test_a_soup_of_32_ingredients_is_the_exact_mean(tmp_path, make_ingredients):
    folders = make_ingredients(32)
    soup = SoupBuilder(folders, method="uniform").cook(tmp_path / "soup", progress=False)
    got = state_dict_of(soup.path)
    states = [state_dict_of(folder) for folder in folders]
    assert len(soup.record["ingredients"]) == 32 and set(got) == set(states[0])
    for name, value in got.items():
        total = states[0][name].clone()
        for state in states[1:]:
            total += state[name]
        assert torch.equal(value, total / 32), name  # fp32, summed left to right, divided once: bit for bit
        exact = torch.stack([state[name].double() for state in states]).mean(0)
        assert torch.allclose(value.double(), exact, rtol=0, atol=32 * torch.finfo(torch.float32).eps), name
