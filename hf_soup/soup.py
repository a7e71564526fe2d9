"""The soup folder: `Soup` (a cooked soup, to save or push), and `staged_soup`, the end every cook shares.

`staged_soup` is how both cooks (full models, LoRA adapters) write: only the main process writes (under
`accelerate launch` the others wait), the ingredients' sha256 are computed on a thread while the weights are written,
everything goes into a staging folder beside the target, and `finish` records `soup.json` and the model card there
before the folder is renamed into place. A cook that fails leaves no output.

Example:

```python
>>> with staged_soup(target, located, recipe, overwrite=False) as staging:
...     if staging is None:          # not the main process
...         return
...     files = write_weights(staging.folder)
...     staging.finish("uniform", parameters, weights=[0.5, 0.5], notes=[], files=files)
>>> staging.record["method"]
'uniform'
```
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .atomic import staged_folder
from .cache import cached_sha256
from .card import explain_soup
from .checkpoint import weight_files
from .hub import push_to_hub, save_soup
from .jsonfile import read_model_file
from .pantry import SKIPPED_FILES
from .preparation import Located
from .recipe import Recipe
from .record import NAME as RECORD_NAME
from .record import IngredientEntry, SoupRecord, write_record
from .scoring import process_state

# Files of the first ingredient (or base model) that are not copied into the soup: weights are cooked, and these
# describe a training run rather than the soup.
NOT_COPIED = {"README.md", RECORD_NAME, "trainer_state.json", "training_args.bin"}
INDEX_NAMES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}


@dataclass
class Soup:
    """A cooked soup: its folder and its `soup.json` record."""

    path: Path
    record: dict[str, Any]

    def save_pretrained(self, save_directory: str | os.PathLike, *, max_shard_size="5GB", overwrite=False) -> Soup:
        """Copy the soup to `save_directory` with its weights re-sharded (streamed, staged, renamed)."""
        record = save_soup(self.path, save_directory, max_shard_size=max_shard_size, overwrite=overwrite)
        return Soup(Path(save_directory).absolute(), record)

    def push_to_hub(self, repo_id: str, *, private=None, revision=None, commit_message=None, token=None) -> str:
        """Upload the soup folder to a Hub model repository in one commit; returns the commit URL (`hf_soup.hub`)."""
        options = {"private": private, "revision": revision, "commit_message": commit_message, "token": token}
        return push_to_hub(self.path, repo_id, **options)


class Staging:
    """A soup being written into `folder` (renamed to `target` when the `staged_soup` block ends)."""

    def __init__(self, folder: Path, target: Path, located: Sequence[Located], recipe: Recipe, digests: Future):
        self.folder, self.target, self.located, self.recipe = folder, target, located, recipe
        self.digests = digests
        self.record: dict[str, Any] | None = None

    def finish(
        self,
        method: str,
        parameters: dict[str, Any],
        *,
        weights: Sequence[Any] | None,
        notes: list[str],
        files: Sequence[Path],
        base_model: str | None = None,
        **sections: Any,
    ) -> dict[str, Any]:
        """Write `soup.json` (the ingredients with their weights and sha256, the recipe, `sections` such as
        `strategy` and `report`) and the model card with its figures; returns the record written."""
        recipe = self.recipe
        weights = list(weights) if weights is not None else [None] * len(self.located)
        entries = [
            IngredientEntry(
                id=ingredient.id,
                path=str(folder),
                kind=ingredient.kind,
                weight=weight,
                sha256=digest,
                run=ingredient.run,
                metric=ingredient.metric,
                value=ingredient.value,
                split=ingredient.split,
                hyperparameters=ingredient.hyperparameters,
                base_model=ingredient.base_model,
            )
            for (ingredient, folder), digest, weight in zip(self.located, self.digests.result(), weights)
        ]
        record = SoupRecord(
            method=method,
            parameters=parameters,
            recipe={"source": recipe.source, **recipe.raw},
            ingredients=entries,
            files=sorted(path.name for path in files),
            notes=notes,
            base_model=base_model or (str(recipe.base_model) if recipe.base_model else None),
            dtype=recipe.dtype,
            seed=recipe.seed,
            sections=sections,
            hf_soup_version=__version__,
        )
        self.record = write_record(self.folder, record)
        explain_soup(self.folder, output=self.target)  # figures 1, 2, 5 (strategies) and the README.md model card
        return self.record


@contextlib.contextmanager
def staged_soup(
    target: Path, located: Sequence[Located], recipe: Recipe, *, overwrite: bool
) -> Iterator[Staging | None]:
    """Write a soup into a staging folder renamed to `target` when the block ends, `Staging.finish` called; yields
    `None` on processes other than the main one under `accelerate launch` (they write nothing and wait for the main
    one, which releases them whether its write succeeds or fails)."""
    state = process_state()
    if not state.is_main_process:
        yield None
        state.wait_for_everyone()
        return
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_soup-sha256") as hasher:
            digests = hasher.submit(ingredient_digests, located, recipe.allow_pickle)
            with staged_folder(target, overwrite=overwrite) as folder:
                staging = Staging(folder, target, located, recipe, digests)
                yield staging
                if staging.record is None:
                    raise RuntimeError("a staged soup ended without Staging.finish: soup.json was not written")
    finally:  # written or failed, the other processes are released (they learn of a failure from the caller)
        state.wait_for_everyone()


def ingredient_digests(located: Sequence[Located], allow_pickle: bool) -> list[dict[str, str]]:
    """sha256 of each ingredient's weight files: from the pantry ledger where recorded, else from the digest cache
    (`hf_soup.cache`) or computed."""
    digests = []
    for ingredient, folder in located:
        if ingredient.sha256:
            digests.append(dict(ingredient.sha256))
        else:
            digests.append(cached_sha256(list(weight_files(folder, allow_pickle=allow_pickle))))
    return digests


def copy_side_files(source: Path, staging: Path, dtype) -> None:
    """Copy config, generation config and tokenizer files; record a chosen output dtype in the config."""
    weights = {path.name for path in weight_files(source, allow_pickle=True)}
    for item in sorted(source.iterdir()):
        if (
            item.is_file()
            and item.name not in weights | INDEX_NAMES | NOT_COPIED
            and not SKIPPED_FILES.match(item.name)
            and not (staging / item.name).exists()
        ):
            shutil.copy2(item, staging / item.name)
    config_path = staging / "config.json"
    if dtype is not None and config_path.is_file():
        config = read_model_file(staging, "config.json")  # a copy of a config check_configs has checked
        name = str(dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = name
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
