"""Load: many processes adding to one pantry at once, and a soup of many ingredients.

- 8 processes add 25 entries each to one pantry at the same moment: all 200 are listed, ids unique, verify clean.
  The fast test forks its processes with their imports done (see tests/faults.py); the slow one starts
  `python -c` processes.
- A uniform soup of k = 32 ingredients is bit for bit the fp32 mean summed left to right, and within fp32 rounding
  of the float64 mean.
"""

from __future__ import annotations

import pytest
import torch
from conftest import state_dict_of
from faults import concurrent_adds

from hf_soup import SoupBuilder


def test_eight_processes_add_two_hundred_entries_at_once(tmp_path):
    concurrent_adds(tmp_path, 8, 25, launch="fork")


@pytest.mark.slow
def test_eight_python_processes_add_two_hundred_entries_at_once(tmp_path):
    concurrent_adds(tmp_path, 8, 25, launch="subprocess")


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
