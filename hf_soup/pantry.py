"""The pantry: a folder of ingredients and `pantry.json`, the ledger of what each ingredient is.

Layout::

    pantry/
      pantry.json            {"format": 1, "ingredients": [ {record}, ... ]}
      .pantry.lock           file lock: several processes may add at once
      ingredients/<id>/      config, weights, tokenizer files of one ingredient
      lost+found/            folders `Pantry.repair` found in ingredients/ but claimed by no entry

Adding copies (or hard-links) the files into a staging folder first, hashes them, and only then, under the lock,
renames the folder into place and appends the record with an atomic rewrite of `pantry.json`. A crash leaves
either a complete entry, or a staging folder (named after its process, `.staging-<host>-<pid>-<random>`), or, killed
between the rename and the ledger write, a folder claimed by no entry. `Pantry.verify` reports all of them;
`Pantry.repair` removes the staging folders whose process is gone and moves unclaimed folders to `lost+found/`.
An entry is never dropped by either: one whose files are missing is reported. The records themselves and the check
of each field are `ingredient.Ingredient`'s.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from . import inventory
from .atomic import DISK_FULL, disk_full_error, fsync_folder, owner_tag, sha256_file, write_text
from .errors import SoupError, brief
from .ingredient import LEDGER, Ingredient, config_hash, detect_kind
from .inventory import INGREDIENTS, REMOVING, STAGING
from .jsonfile import check_model_files, parse_json

FORMAT = 1
LOCK = ".pantry.lock"
# Training state that never belongs in an ingredient (optimizer moments are 2x the model; training_args is a pickle).
SKIPPED_FILES = re.compile(r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth|training_args\.bin|.*\.lock)$")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:60] or "ingredient"


def _copy_or_link(source: Path, target: Path, link: str) -> None:
    if link in ("auto", "hardlink"):
        try:
            os.link(source, target)
            return
        except OSError:
            if link == "hardlink":
                raise
    shutil.copy2(source, target)


class Pantry:
    """A folder of ingredients with a `pantry.json` ledger; safe for several processes at once.

    Example:

    ```python
    >>> pantry = Pantry("pantry")
    >>> ingredient = pantry.add("runs/lr3e-5/checkpoint-400", metric="eval_accuracy", value=0.91, run="lr3e-5")
    >>> [i.id for i in pantry.list()]
    ['lr3e-5-400']
    ```
    """

    def __init__(self, root: str | os.PathLike, *, lock_timeout: float = 600):
        self.root = Path(root).absolute()
        self.lock_timeout = lock_timeout
        if self.root.exists() and not self.root.is_dir():
            raise SoupError(f"pantry {self.root} exists and is not a folder; choose a folder path for the pantry")

    @property
    def ledger(self) -> Path:
        return self.root / LEDGER

    # -- reading -------------------------------------------------------------------------------------------------
    def _read(self) -> list[Ingredient]:
        if not self.ledger.is_file():
            return []
        # The one JSON reader; the ledger's shape is checked below and record by record (`Ingredient.from_dict`),
        # with messages of its own.
        data = parse_json(
            self.ledger, fix=f"restore it from a backup (the ingredient folders are in {self.root / INGREDIENTS})"
        )
        if not isinstance(data, dict) or not isinstance(data.get("ingredients"), list):
            raise SoupError(
                f"{self.ledger} must be a mapping with 'format' and an 'ingredients' list, got "
                f"{brief(data if not isinstance(data, dict) else sorted(data, key=str))}; restore it from a backup"
            )
        version = data.get("format")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise SoupError(
                f"{self.ledger} has format {brief(version)}; expected an integer format (this hf_soup: {FORMAT}); "
                "restore it from a backup"
            )
        if version > FORMAT:
            raise SoupError(
                f"{self.ledger} has format {version}, newer than this hf_soup understands ({FORMAT}); "
                "upgrade hf_soup (pip install -U hf_soup)"
            )
        ingredients = [Ingredient.from_dict(item, source=str(self.ledger)) for item in data["ingredients"]]
        counts = collections.Counter(i.id for i in ingredients)
        duplicated = sorted(i for i, n in counts.items() if n > 1)
        if duplicated:
            raise SoupError(
                f"{self.ledger} lists ingredient id(s) twice: {brief(', '.join(map(repr, duplicated)))}; "
                "remove one of each by hand"
            )
        return ingredients

    def list(self) -> list[Ingredient]:
        """Every ingredient, in the order they were added."""
        return self._read()

    def get(self, ingredient_id: str) -> Ingredient:
        ingredients = self._read()
        for ingredient in ingredients:
            if ingredient.id == ingredient_id:
                return ingredient
        known = ", ".join(i.id for i in ingredients) or "none"
        raise SoupError(f"pantry {self.root} has no ingredient {ingredient_id!r}; it has: {known}")

    def location(self, ingredient: Ingredient | str, files: bool = True) -> Path:
        """The absolute folder of an ingredient, confined to the pantry: a path escaping it is refused, and so (unless
        `files` is false) is a file in the folder that links outside the pantry."""
        if isinstance(ingredient, str):
            ingredient = self.get(ingredient)
        root = self.root.resolve()
        folder = (self.root / ingredient.path).resolve()
        if not folder.is_relative_to(root):
            raise SoupError(
                f"{self.ledger}: ingredient {ingredient.id} has path {ingredient.path!r}, which leads outside the "
                "pantry; pantry paths must stay inside it"
            )
        for item in folder.iterdir() if files and folder.is_dir() else ():
            if item.is_symlink() and not item.resolve().is_relative_to(root):
                raise SoupError(
                    f"{self.ledger}: ingredient {ingredient.id} has file {item.name}, a link to {item.resolve()} "
                    "outside the pantry; pantry files must stay inside it (replace the link with the file itself)"
                )
        return folder

    # -- writing -------------------------------------------------------------------------------------------------
    def lock(self) -> FileLock:
        """The pantry's file lock (creating the pantry folder if need be), shared by every process that writes to it.

        Hold it (`with pantry.lock():`) to see the ledger and `ingredients/` with no add or removal half-way, and to
        change them; acquiring waits at most `lock_timeout` seconds. Each call makes a new lock: do not nest them.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / LOCK), timeout=self.lock_timeout)

    def _write(self, ingredients: Iterable[Ingredient]) -> None:
        """Rewrite the ledger atomically: one record per line, so that it stays readable and `json`'s C encoder
        (not used with `indent`) keeps the rewrite fast for hundreds of entries."""
        records = ",\n".join(f"    {json.dumps(i.to_dict())}" for i in ingredients)
        listed = f"[\n{records}\n  ]" if records else "[]"
        write_text(self.ledger, f'{{\n  "format": {FORMAT},\n  "ingredients": {listed}\n}}\n')

    def check_writable(self) -> None:
        """Raise a clear error now if the pantry cannot be created or written (before hours of training)."""
        try:
            probe = self.root / f".write-probe-{uuid.uuid4().hex[:8]}"
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            if error.errno in DISK_FULL:
                raise disk_full_error(probe, error, "free space or choose another pantry") from None
            raise SoupError(
                f"pantry {self.root} is not writable ({error.strerror or error}); choose a folder you can write to"
            ) from None
        self._read()

    def add(
        self,
        source: str | os.PathLike,
        *,
        metric: str | None = None,
        value: float | None = None,
        greater_is_better: bool | None = None,
        split: str | None = None,
        step: int | None = None,
        run: str | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        base_model: str | None = None,
        base_revision: str | None = None,
        ingredient_id: str | None = None,
        link: str = "auto",
    ) -> Ingredient:
        """Copy a model or adapter folder into the pantry and record it.

        Args:
            source (`str` or `os.PathLike`): a model folder (config + safetensors) or a peft adapter folder.
            link (`str`, *optional*, defaults to `"auto"`): `"auto"` hard-links weight files where the file system
                allows and copies otherwise; `"copy"` always copies; `"hardlink"` fails where it cannot link. Other
                files (config, tokenizer, trainer state) are always copied.
            ingredient_id (`str`, *optional*): the id; defaults to `<run>-<step>` (made unique).
            Other arguments are recorded as given (see `Ingredient`).

        Returns:
            The recorded `Ingredient`.
        """
        from .checkpoint import weight_files  # here: reading a pantry (`hf-soup pantry list`) needs no torch

        if link not in ("auto", "copy", "hardlink"):
            raise SoupError(f"link must be 'auto', 'copy' or 'hardlink', got {link!r}")
        source = Path(source).absolute()
        weights = weight_files(source)
        check_model_files(source)  # a wrong-shaped config or tokenizer file is refused before the pantry changes
        self.check_writable()
        staging = self.root / f"{STAGING}{owner_tag()}-{uuid.uuid4().hex[:12]}"  # named after its process: see repair
        try:
            staging.mkdir()
            record = self._stage(
                source,
                staging,
                weights,
                link,
                Ingredient(
                    id="",
                    path="",
                    kind=detect_kind(source),
                    metric=metric,
                    value=None if value is None else float(value),
                    greater_is_better=greater_is_better,
                    split=split,
                    step=step,
                    run=run,
                    hyperparameters=dict(hyperparameters or {}),
                    tags=dict(tags or {}),
                    base_model=base_model,
                    base_revision=base_revision,
                    config_hash=config_hash(source),
                    created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                ),
            )
            with self.lock():
                ingredients = self._read()
                wanted = ingredient_id or (f"{run or source.name}-{step}" if step is not None else run or source.name)
                record.id = self._new_id(wanted, ingredients, explicit=ingredient_id)
                record.path = f"{INGREDIENTS}/{record.id}"
                (self.root / INGREDIENTS).mkdir(exist_ok=True)
                os.rename(staging, self.root / record.path)
                try:
                    fsync_folder(self.root / INGREDIENTS)
                    self._write([*ingredients, record])
                except BaseException:
                    self._unplace(record)
                    raise
        except BaseException as error:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(error, OSError) and error.errno in DISK_FULL:
                what = f"adding {source} to the pantry"
                raise disk_full_error(staging, error, "free space or choose another pantry", what=what) from None
            raise
        return record

    @staticmethod
    def _stage(source: Path, staging: Path, weights: list[Path], link: str, record: Ingredient) -> Ingredient:
        """Copy (or link) `source`'s files into `staging` and hash the weights; returns `record` completed."""
        for item in sorted(source.iterdir()):
            if not item.is_file() or SKIPPED_FILES.match(item.name):
                continue
            # Only weights are linked: JSON files (config, trainer state) are rewritten in place by a later
            # save into the same checkpoint folder, which would change the pantry's copy through the link.
            _copy_or_link(item, staging / item.name, link if item in weights else "copy")
            if item in weights:
                record.sha256[item.name] = sha256_file(staging / item.name)
                record.size += item.stat().st_size
        json.dumps(record.to_dict())  # fail now, not at write time, on values JSON cannot hold
        fsync_folder(staging)
        return record

    def _unplace(self, record: Ingredient) -> None:
        """The ledger write failed after the folder was renamed in: take the folder out again, unless the record
        did reach the ledger (an interruption after the rename of `pantry.json`)."""
        try:
            listed = any(i.id == record.id for i in self._read())
        except SoupError:
            return  # cannot tell: the folder stays, `verify` reports it and `repair` moves it to lost+found
        if not listed:
            shutil.rmtree(self.root / record.path, ignore_errors=True)

    def _new_id(self, wanted: str, ingredients: list[Ingredient], *, explicit: str | None) -> str:
        taken = {i.id for i in ingredients} | {p.name for p in (self.root / INGREDIENTS).glob("*")}
        base = _slug(wanted)
        if explicit is not None:
            if base != explicit:
                raise SoupError(f"ingredient id {explicit!r} may hold only letters, digits, '.', '_' and '-'")
            if base in taken:
                raise SoupError(f"pantry {self.root} already has an ingredient {explicit!r}; choose another id")
            return base
        candidate, n = base, 2
        while candidate in taken:
            candidate, n = f"{base}-{n}", n + 1
        return candidate

    def remove(self, ingredient_id: str) -> Ingredient:
        """Remove one ingredient: its record first (atomically), then its folder.

        Under the lock the folder is renamed out of `ingredients/` (to `.removing-<host>-<pid>-<id>`) and deleted
        after; a process killed while deleting leaves that folder, which `repair` deletes.
        """
        with self.lock():
            ingredients = self._read()
            kept = [i for i in ingredients if i.id != ingredient_id]
            if len(kept) == len(ingredients):
                known = ", ".join(i.id for i in ingredients) or "none"
                raise SoupError(f"pantry {self.root} has no ingredient {ingredient_id!r}; it has: {known}")
            removed = next(i for i in ingredients if i.id == ingredient_id)
            try:
                folder = self.location(removed)
            except SoupError:  # a record whose path leads outside: the record goes, files outside are not touched
                folder = None
            self._write(kept)
            trash = self.root / f"{REMOVING}{owner_tag()}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(folder, trash)
            except (OSError, TypeError):  # no folder (already gone, or outside)
                return removed
        shutil.rmtree(trash, ignore_errors=True)
        return removed

    # -- checking ------------------------------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Check every recorded file's sha256 and report what is wrong; returns the problems (empty when all is well).

        Problems: an entry whose folder or weight files are missing or changed, a folder in `ingredients/` claimed
        by no entry, and the leftovers of an interrupted add or removal (an add still running is not a problem).
        """
        return inventory.verify(self)

    def repair(self) -> Repair:
        """Put the pantry in order after interrupted adds and removals, losing nothing; then verify it.

        Under the pantry lock: staging folders of adds whose process is gone (on this machine) are removed (an add
        never listed them; the source checkpoint still holds the files), so are the folders of unfinished removals
        and temporary ledger files of killed writers; folders in `ingredients/` claimed by no entry are moved to
        `lost+found/` (add one back with `Pantry.add` if you want it). Entries whose files are missing are never
        dropped: they are in the returned problems. Staging folders of adds still running, made on another machine
        or by an older hf_soup are left alone and reported.

        Returns:
            `Repair`: `actions` (what was changed or left, one line each) and `problems` (what `verify` still finds).

        Example:

        ```python
        >>> result = Pantry("pantry").repair()
        >>> result.problems
        []
        ```
        """
        return Repair(inventory.tidy(self), self.verify())


@dataclass
class Repair:
    """What `Pantry.repair` did (`actions`) and what is still wrong after it (`problems`, from `Pantry.verify`)."""

    actions: list[str]
    problems: list[str]
