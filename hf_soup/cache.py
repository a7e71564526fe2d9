"""hf_soup's cache folder: downloaded demo data, and the sha256 of weight files it has already hashed.

A file's digest is reused only while the file is provably the same one: same device, inode, size, modification
time and change time (the change time moves on every write and cannot be set by a user, as in git's index). Any
difference, or an unreadable or unwritable cache, means hashing again; the cache never changes a result.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .atomic import sha256_file, write_json

logger = logging.getLogger(__name__)

DIGESTS = "sha256.json"
MAX_ENTRIES = 20_000


def cache_dir() -> Path:
    """`$HF_SOUP_CACHE`, else `~/.cache/hf_soup`."""
    return Path(os.environ.get("HF_SOUP_CACHE") or Path.home() / ".cache" / "hf_soup")


def _identity(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"


def cached_sha256(paths: list[Path]) -> dict[str, str]:
    """name → sha256 of each file: from the cache when the file is unchanged, else computed (and remembered)."""
    ledger = cache_dir() / DIGESTS
    try:
        known = json.loads(ledger.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    digests, fresh = {}, {}
    for path in paths:
        key = f"{Path(path).resolve()}|{_identity(Path(path))}"
        digest = known.get(key)
        if not isinstance(digest, str):
            digest = fresh[key] = sha256_file(path)
            if _identity(Path(path)) not in key:  # changed while being hashed: do not remember it
                fresh.pop(key)
        digests[Path(path).name] = digest
    if fresh:
        try:
            ledger.parent.mkdir(parents=True, exist_ok=True)
            merged = {**known, **fresh}
            write_json(ledger, dict(list(merged.items())[-MAX_ENTRIES:]))
        except OSError as error:
            logger.debug("sha256 cache %s not written (%s)", ledger, error)
    return digests
