"""Checking a pantry's folder: `verify` (every sha256, unclaimed folders, leftovers of interrupted work) and `tidy`.

Leftovers are told apart by the writer their name carries (see `hf_soup.atomic.owner_tag`): an add still running is
never touched, one whose process is gone is cleaned up, and one that cannot be judged (another machine, an older
hf_soup) is reported. Nothing that could be an ingredient is deleted: unclaimed folders go to `lost+found/`.

This module never imports `pantry.py` (which imports it for `Pantry.verify` and `Pantry.repair`): it takes a pantry
by its public side (`PantryLike`), and holds the names of the folder's parts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .atomic import OWNER, fsync_folder, owner_state, sha256_file
from .errors import SoupError, brief
from .ingredient import LEDGER, Ingredient

if TYPE_CHECKING:
    from filelock import FileLock

INGREDIENTS = "ingredients"  # the folder of ingredient folders
STAGING = ".staging-"  # prefix of an add's staging folder
REMOVING = ".removing-"  # prefix of a removal's folder, renamed out of ingredients/ before it is deleted
LOST = "lost+found"  # where `tidy` moves the folders no entry claims


class PantryLike(Protocol):
    """What this module uses of a pantry: `hf_soup.Pantry`'s public side."""

    root: Path

    @property
    def ledger(self) -> Path: ...

    def list(self) -> list[Ingredient]: ...

    def location(self, ingredient: Ingredient, files: bool = True) -> Path: ...

    def lock(self) -> FileLock: ...


@dataclass(frozen=True)
class Leftover:
    """A temporary file or folder in a pantry's root, and the process that made it (`owner`, None if unknown)."""

    path: Path
    what: str
    owner: str | None

    @property
    def state(self) -> str:
        return owner_state(self.owner)

    @property
    def pid(self) -> str:
        return self.owner.split("-")[1] if self.owner else "?"

    def problem(self) -> str | None:
        """What `verify` says about it (None while its process runs: work in progress is not a problem)."""
        name, state = self.path.name, self.state
        if state == "running":
            return None
        if state == "gone":
            return f"{self.what} {name}: its process {self.pid} is gone; `hf-soup pantry repair` removes it"
        return f"{self.what} {name}: {self._unjudged()}"

    def _unjudged(self) -> str:
        if self.state == "elsewhere":
            return (
                "made on another machine (running there, or interrupted); run `hf-soup pantry repair` on that "
                "machine, or delete it by hand once nothing writes to the pantry"
            )
        return "its process is not recorded (an older hf_soup); delete it by hand once nothing writes to the pantry"


def leftovers(root: Path) -> list[Leftover]:
    """The staging folders of adds, folders of unfinished removals and temporary ledger files in `root`."""
    kinds = ((STAGING, "unfinished add"), (REMOVING, "unfinished removal"), (f".{LEDGER}.", "temporary ledger file"))
    found = []
    with contextlib.suppress(OSError):
        for path in sorted(root.iterdir()):
            for prefix, what in kinds:
                if path.name.startswith(prefix) and (what != "temporary ledger file" or path.name.endswith(".tmp")):
                    rest = path.name[len(prefix) :]
                    match = OWNER.match(rest)
                    owner = match.group(0) if match and rest[match.end() : match.end() + 1] == "-" else None
                    found.append(Leftover(path, what, owner))
    return found


def strays(pantry: PantryLike, ingredients: list[Ingredient]) -> list[Path]:
    """What `ingredients/` holds that no entry claims."""
    claimed = set()
    for ingredient in ingredients:
        with contextlib.suppress(SoupError):
            claimed.add(pantry.location(ingredient, files=False))  # a folder with a bad link is still claimed
    folder = pantry.root / INGREDIENTS
    if not folder.is_dir():
        return []
    return [
        path
        for path in sorted(folder.iterdir())
        if not any(c == path.resolve() or c.is_relative_to(path.resolve()) for c in claimed)
    ]


def check(pantry: PantryLike, ingredient: Ingredient) -> list[str]:
    """The problems of one entry: folder or weight files missing, or not matching their sha256."""
    label = ingredient.id if ingredient.id.isprintable() else brief(ingredient.id)
    try:
        folder = pantry.location(ingredient)
    except SoupError as error:  # the path, or a file linked from the folder, leads outside the pantry
        return [str(error)]
    remedy = f"restore it, or drop the entry: hf-soup pantry remove <pantry> {label}"
    if not folder.is_dir():
        return [f"{label}: folder {ingredient.path} is missing; {remedy}"]
    problems = []
    for name, digest in ingredient.sha256.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{label}: {name} is missing; {remedy}")
        elif sha256_file(path) != digest:
            problems.append(f"{label}: {name} does not match its sha256 (changed or corrupt); {remedy}")
    return problems


@contextlib.contextmanager
def _locked_if_possible(pantry: PantryLike) -> Iterator[None]:
    """The pantry lock, for a view where no add is half-way between its rename and its ledger write; a pantry that
    cannot be locked (read-only) is read without it: nobody can be adding to it."""
    lock = None
    if pantry.root.is_dir():
        with contextlib.suppress(OSError):
            lock = pantry.lock()
            lock.acquire()
    try:
        yield
    finally:
        if lock is not None and lock.is_locked:
            lock.release()


def verify(pantry: PantryLike) -> list[str]:
    """The problems `Pantry.verify` reports. Files are hashed without holding the lock; folders are listed under it."""
    found = {(i.id, i.path): check(pantry, i) for i in pantry.list()}
    with _locked_if_possible(pantry):
        listed = pantry.list()
        stray = strays(pantry, listed)
        left = leftovers(pantry.root)
    problems = []
    for ingredient in listed:  # an entry removed meanwhile is no problem; one added meanwhile is checked now
        key = (ingredient.id, ingredient.path)
        problems += found[key] if key in found else check(pantry, ingredient)
    for path in stray:
        problems.append(
            f"stray folder {INGREDIENTS}/{path.name} is claimed by no entry; `hf-soup pantry repair` moves it to "
            f"{LOST}/"
        )
    problems += [problem for item in left if (problem := item.problem()) is not None]
    return problems


def _free_name(folder: Path, name: str) -> Path:
    candidate, n = folder / name, 2
    while candidate.exists() or candidate.is_symlink():
        candidate, n = folder / f"{name}-{n}", n + 1
    return candidate


def tidy(pantry: PantryLike) -> list[str]:
    """What `Pantry.repair` changes (before it verifies): leftovers removed, unclaimed folders moved to `lost+found/`.

    Returns:
        `list[str]`: what was changed or left, one line each.
    """
    root = pantry.root
    if not root.is_dir():
        raise SoupError(f"pantry {root} does not exist; give the folder SoupCallback or Pantry.add wrote")
    if not pantry.ledger.is_file() and any((root / INGREDIENTS).glob("*")):
        raise SoupError(
            f"pantry {root} has ingredient folders but no {LEDGER}; restore {LEDGER} from a backup first (repair "
            f"would find every folder unclaimed and move it to {LOST}/)"
        )
    actions = []
    with pantry.lock():
        ingredients = pantry.list()  # a corrupt ledger stops here, before anything is touched
        for item in leftovers(root):
            name, state = item.path.name, item.state
            if state == "running":
                actions.append(f"left {item.what} {name}: its process {item.pid} still runs")
                continue
            if state != "gone":
                actions.append(f"left {item.what} {name}: {item._unjudged()}")
                continue
            try:
                if item.path.is_dir() and not item.path.is_symlink():
                    shutil.rmtree(item.path)
                else:
                    item.path.unlink()
            except OSError as error:
                actions.append(f"could not remove {item.what} {name} ({error.strerror or error}); delete it by hand")
            else:
                actions.append(f"removed {item.what} {name} (its process {item.pid} is gone)")
        for path in strays(pantry, ingredients):
            (root / LOST).mkdir(exist_ok=True)
            destination = _free_name(root / LOST, path.name)
            os.rename(path, destination)
            actions.append(
                f"moved {INGREDIENTS}/{path.name} (claimed by no entry) to {LOST}/{destination.name}; add it back "
                "with Pantry.add, or delete it"
            )
        fsync_folder(root)
    return actions
