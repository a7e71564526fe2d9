"""Nothing half-written: files and folders appear under their final name complete, or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import SoupError

STAGING_PREFIX = ".hf_soup-staging-"


def fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (no-op where the platform cannot open folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Atomically write `data` as indented JSON."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def check_output_folder(target: Path, *, overwrite: bool) -> None:
    """Refuse an output folder that would destroy something the user did not ask to replace."""
    if target.exists() and not target.is_dir():
        raise SoupError(f"output {target} exists and is not a folder; choose another output path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise SoupError(
            f"output folder {target} already exists and is not empty; choose another output or pass "
            "overwrite=True (CLI: --overwrite) to replace it"
        )


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; rename it to `target` only when the block succeeds.

    On any error (or interruption) the temporary folder is removed and `target` is left as it was. With
    `overwrite=True` an existing `target` is replaced; a crash between the two renames leaves the previous
    output under a `.hf_soup-staging-*` name, never a partial folder under `target`.

    Example:

    ```python
    >>> with staged_folder("soups/uniform") as tmp:
    ...     (tmp / "config.json").write_text("{}")
    ```
    """
    target = Path(target).absolute()
    check_output_folder(target, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:10]
    tmp = target.parent / f"{STAGING_PREFIX}{target.name}-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_folder(tmp)
        if target.exists():
            old = target.parent / f"{STAGING_PREFIX}{target.name}-{tag}-old"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        fsync_folder(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, *, chunk_size: int = 1 << 24) -> str:
    """The hex sha256 of a file, read in chunks (hashlib releases the GIL on large chunks)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
