"""Faults: processes SIGKILLed at random and at chosen moments, and full disks.

- A cook killed at any moment leaves the previous complete soup, or the new complete one, under the output name
  (nothing, for a first cook); its staging folder is removed by the next cook.
- A pantry add (or removal) killed at any moment leaves every listed entry with its files and loses none;
  `hf-soup pantry repair` then leaves nothing unclaimed.
- A full disk (a 2 MB tmpfs) is one clear error, exit code 2, no staging folder, the previous output and the
  pantry unchanged.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_model, save_model
from faults import ENV, AddCase, CookCase, Forked, digests

from hf_soup.atomic import STAGING_PREFIX, owner_tag, remove_stale_staging, staged_folder
from hf_soup.cli import main
from hf_soup.errors import SoupError
from hf_soup.inventory import check, strays
from hf_soup.pantry import Pantry


# -- cooks killed at random -----------------------------------------------------------------------------------------
def test_killed_cooks_leave_a_complete_soup_and_no_pile_of_staging_folders(tmp_path):
    """Ten kills of cooks forked with their imports done (see tests/faults.py), one of `python -m hf_soup cook`."""
    case = CookCase(tmp_path, launch="fork").build()
    report = case.kill_loop(8, seed=9)
    assert report.kills >= 5, report.to_dict()  # kills that hit a running cook (some come after its exit)
    assert report.outcomes["previous soup complete"] >= 1, f"no kill landed before the swap: {report.to_dict()}"
    assert report.most_leftovers <= 1, report.to_dict()  # each cook removes the staging folders of killed ones
    fresh = case.kill_loop(2, seed=10, fresh=True)
    assert set(fresh.outcomes) <= {"no output", "new soup complete"}, fresh.to_dict()
    assert case.kill_loop(1, seed=11, launch="subprocess").kills + fresh.kills >= 2
    process = case.cook("new", case.target)
    assert process.wait() == 0, case.error(process)
    assert case.state() == "new" and case.staging() == []


@pytest.mark.slow
def test_many_killed_cooks(tmp_path):
    case = CookCase(tmp_path).build()  # `python -m hf_soup cook` every time
    report = case.kill_loop(40, seed=1)
    assert report.kills >= 36 and report.most_leftovers <= 1, report.to_dict()
    assert report.outcomes["previous soup complete"] >= 5, report.to_dict()
    assert case.kill_loop(10, seed=2, fresh=True).kills >= 8


# -- staged_folder killed at chosen moments -------------------------------------------------------------------------
STAGE_CHILD = r"""
import os, signal, sys
from pathlib import Path
from hf_soup import atomic

target, where = Path(sys.argv[1]), sys.argv[2]
real_exchange, real_rename = atomic.exchange, os.rename


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def exchange_then_die(first, second):
    assert real_exchange(first, second)
    die()


def rename_then_die(source, destination):
    real_rename(source, destination)
    if str(destination).endswith("-old"):
        die()


if where == "before the swap":
    atomic.exchange = lambda first, second: die()
elif where == "after the swap":
    atomic.exchange = exchange_then_die
else:  # a platform without an atomic exchange: two renames, killed between them
    atomic.exchange = lambda first, second: False
    atomic.os.rename = rename_then_die
with atomic.staged_folder(target, overwrite=True) as tmp:
    for i in range(3):
        (tmp / f"part{i}").write_text("new")
"""


def contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


@pytest.mark.parametrize(
    ("where", "after_kill", "left", "after_cleanup"),
    [
        ("before the swap", "old", 1, "old"),  # left: the new folder, under its staging name
        ("after the swap", "new", 1, "new"),  # left: the previous soup, under the staging name
        ("between two renames", "absent", 2, "old"),  # the fallback's window: the next cook puts the old soup back
    ],
)
def test_staged_folder_killed_at_the_swap(tmp_path, where, after_kill, left, after_cleanup):
    target = tmp_path / "soup"
    with staged_folder(target) as tmp:
        for i in range(3):
            (tmp / f"part{i}").write_text("old")
    expected = {label: {f"part{i}": label for i in range(3)} for label in ("old", "new")} | {"absent": {}}
    process = subprocess.run([sys.executable, "-c", STAGE_CHILD, str(target), where], env=ENV, capture_output=True)
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()
    assert contents(target) == expected[after_kill]
    leftovers = sorted(p for p in tmp_path.iterdir() if p.name.startswith(STAGING_PREFIX))
    assert len(leftovers) == left and all(f"-{owner_tag().split('-')[0]}-" in p.name for p in leftovers)
    assert sorted(remove_stale_staging(target)) == leftovers
    assert contents(target) == expected[after_cleanup]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup"]


def test_staging_folders_of_running_or_foreign_processes_are_kept(tmp_path):
    target = tmp_path / "soup"
    mine = tmp_path / f"{STAGING_PREFIX}soup-{owner_tag()}-0123456789"
    foreign = tmp_path / f"{STAGING_PREFIX}soup-00000000-1-0123456789"  # another machine: cannot be judged
    other_target = tmp_path / f"{STAGING_PREFIX}soup2-{owner_tag().split('-')[0]}-999999999-0123456789"
    for folder in (mine, foreign, other_target):
        folder.mkdir()
    assert remove_stale_staging(target) == []
    with staged_folder(target) as tmp:
        (tmp / "a").write_text("a")
    assert mine.is_dir() and foreign.is_dir() and other_target.is_dir()


# -- pantry adds killed at random and at chosen moments ---------------------------------------------------------------
def test_killed_adds_lose_nothing_and_repair_leaves_nothing_unclaimed(tmp_path):
    case = AddCase(tmp_path, launch="fork").build()
    assert case.kill_loop(10, seed=3).kills == 10
    case.launch = "subprocess"
    assert case.kill_loop(1, seed=4).kills == 1


@pytest.mark.slow
def test_many_killed_adds(tmp_path):
    case = AddCase(tmp_path, shard_bytes=8 << 20).build()  # a `python -c` child every time
    assert case.kill_loop(30, seed=4).kills == 30


def add_killed_before_the_ledger(root: str, source: str) -> None:
    Pantry._write = lambda self, ingredients: os.kill(os.getpid(), signal.SIGKILL)
    Pantry(root).add(source, run="killed")


def test_an_add_killed_between_its_rename_and_the_ledger_is_found_again(tmp_path):
    source = save_model(make_model("llama", 1), tmp_path / "run")
    pantry = Pantry(tmp_path / "pantry")
    kept = pantry.add(source, run="kept")
    ledger = pantry.ledger.read_bytes()
    process = Forked(add_killed_before_the_ledger, str(pantry.root), str(source))
    assert process.wait() == -signal.SIGKILL
    assert pantry.ledger.read_bytes() == ledger and check(pantry, kept) == []
    assert [p.name for p in strays(pantry, pantry.list())] == ["killed"]
    assert pantry.verify() == [
        "stray folder ingredients/killed is claimed by no entry; `hf-soup pantry repair` moves it to lost+found/"
    ]
    assert main(["pantry", "repair", str(pantry.root)]) == 0
    moved = pantry.root / "lost+found" / "killed" / "model.safetensors"
    assert digests(moved.parent) == digests(source)  # nothing lost: the copy is whole, and kept
    assert pantry.list() == [kept] and pantry.verify() == []


# -- full disks -------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (needs root or CAP_SYS_ADMIN; skipped otherwise)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a 2 MB tmpfs ({mounted.stderr.decode().strip() or mounted.returncode}); the disk-full "
            "tests need root or CAP_SYS_ADMIN"
        )
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path, leave: int) -> None:
    """Leave `leave` bytes free in `folder`'s file system."""
    with open(folder / "filler", "wb") as handle:
        handle.write(b"\0" * max(shutil.disk_usage(folder).free - leave, 0))


def one_error_line(captured) -> str:
    assert captured.err.count("\n") == 1 and captured.err.startswith("hf-soup: error: "), captured.err
    return captured.err


def test_a_full_disk_is_one_clear_error_and_the_previous_soup_stays(tmp_path, small_disk, make_ingredients, capsys):
    folders = make_ingredients(2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"method": "uniform", "ingredients": [str(f) for f in folders]}))
    soup = small_disk / "soup"
    assert main(["cook", str(recipe), "--output", str(soup), "--quiet"]) == 0
    before = digests(soup)
    fill(small_disk, leave=24 << 10)
    capsys.readouterr()
    for output, overwrite in ((soup, ["--overwrite"]), (small_disk / "other", [])):
        assert main(["cook", str(recipe), "--output", str(output), "--quiet", *overwrite]) == 2
        line = one_error_line(capsys.readouterr())
        assert "no space left on device while writing" in line and f"in {small_disk} (" in line
        assert "MB free there); free space or choose another output" in line
        assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "soup"]  # no staging folder, no "other"
    assert digests(soup) == before


def test_a_full_disk_leaves_the_pantry_unchanged(tmp_path, small_disk):
    first = save_model(make_model("llama", 1), tmp_path / "first")
    pantry = Pantry(small_disk / "pantry")
    kept = pantry.add(first, run="kept")
    ledger = pantry.ledger.read_bytes()
    fill(small_disk, leave=24 << 10)
    with pytest.raises(SoupError) as caught:
        pantry.add(first, run="second")
    message = str(caught.value)
    assert message.startswith(f"no space left on device while adding {first} to the pantry in {pantry.root} (")
    assert message.endswith("MB free there); free space or choose another pantry") and "\n" not in message
    assert pantry.ledger.read_bytes() == ledger and pantry.list() == [kept] and pantry.verify() == []
    assert sorted(p.name for p in pantry.root.iterdir()) == [".pantry.lock", "ingredients", "pantry.json"]


def test_a_full_disk_at_the_ledger_write_takes_the_folder_back_out(tmp_path, monkeypatch):
    source = save_model(make_model("llama", 1), tmp_path / "run")
    pantry = Pantry(tmp_path / "pantry")
    kept = pantry.add(source, run="kept")
    ledger = pantry.ledger.read_bytes()

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("hf_soup.pantry.write_text", full)
    with pytest.raises(
        SoupError, match=r"^no space left on device while adding .*; free space or choose another pantry"
    ):
        pantry.add(source, run="second")
    monkeypatch.undo()
    assert pantry.ledger.read_bytes() == ledger and pantry.verify() == []
    assert sorted(p.name for p in (pantry.root / "ingredients").iterdir()) == [kept.id]
