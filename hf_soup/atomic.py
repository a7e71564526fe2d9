"""Nothing half-written: files and folders appear under their final name complete, or not at all.

Temporary names carry their writer (a hash of the host name and the process id, see `owner_tag`), so a leftover of a
killed process can be told from the work of one still running: `remove_stale_staging` and `Pantry.repair` remove only
leftovers whose process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import SoupError

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".hf_soup-staging-"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
OWNER = re.compile(r"(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]{1,10})")
_STAGING_REST = re.compile(rf"(?P<owner>{OWNER.pattern})-[0-9a-f]{{10}}(?P<old>-old)?")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


# -- who wrote a temporary name ------------------------------------------------------------------------------------
@functools.cache
def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owner_tag() -> str:
    """`<host hash>-<pid>`: put into a temporary name, it says which process of which machine made it."""
    return f"{_host()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or not a pid we could have written): assume it runs
    with contextlib.suppress(OSError, IndexError):  # a killed process its parent has not reaped yet is gone too
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    return True


def owner_state(tag: str | None) -> str:
    """What became of the writer a tag (see `owner_tag`) names: `"running"` (a process of this machine that still
    runs), `"gone"` (one that does not), `"elsewhere"` (another machine: cannot be told) or `"unknown"` (no tag)."""
    match = OWNER.fullmatch(tag or "")
    if match is None or int(match["pid"]) <= 0:
        return "unknown"
    if match["host"] != _host():
        return "elsewhere"
    return "running" if _alive(int(match["pid"])) else "gone"


def owner_gone(tag: str | None) -> bool:
    """True only when `tag` names a process of this machine that no longer runs: only then may its leftovers go."""
    return owner_state(tag) == "gone"


# -- disk full -----------------------------------------------------------------------------------------------------
def _shown(path: Path) -> Path:
    """The folder a user knows: `path` without the temporary staging folders hf_soup wrote it through."""
    while path.name.startswith((STAGING_PREFIX, ".staging-")) or not path.exists():
        if path.parent == path:
            break
        path = path.parent
    return path


def disk_full_error(path: str | os.PathLike, error: OSError, remedy: str, *, what: str | None = None) -> SoupError:
    """The one-line error for an ENOSPC / EDQUOT `error` met while writing `path` (or the file the error names).

    `what` says what was being done (default: `writing <file name>`); `remedy` what the user can do.
    """
    named = error.filename2 or error.filename  # a copy names source and destination: the destination is written
    if isinstance(named, (str, bytes, os.PathLike)):
        path = os.fsdecode(named)
    what = what or f"writing {Path(path).name}"
    where = _shown(Path(path).parent)
    try:
        free = f"{shutil.disk_usage(where).free / 1e6:.1f} MB free there"
    except OSError:
        free = "free space unknown"
    cause = " (disk quota exceeded)" if error.errno == errno.EDQUOT else ""
    return SoupError(f"no space left on device{cause} while {what} in {where} ({free}); {remedy}")


@contextlib.contextmanager
def disk_space(path: str | os.PathLike, remedy: str = "free space or choose another output") -> Iterator[None]:
    """Turn an ENOSPC / EDQUOT `OSError` raised in the block into a clear `SoupError` naming `path` and `remedy`."""
    try:
        yield
    except OSError as error:
        if error.errno in DISK_FULL:
            raise disk_full_error(path, error, remedy) from None
        raise


# -- files ---------------------------------------------------------------------------------------------------------
def fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (no-op where the platform cannot open folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path` for writing it: `.<name>.<owner tag>-<random>.tmp`."""
    return path.with_name(f".{path.name}.{owner_tag()}-{uuid.uuid4().hex[:8]}.tmp")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    tmp = temporary_name(path)
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


# -- folders -------------------------------------------------------------------------------------------------------
def check_output_folder(target: Path, *, overwrite: bool) -> None:
    """Refuse an output folder that would destroy something the user did not ask to replace."""
    if target.exists() and not target.is_dir():
        raise SoupError(f"output {target} exists and is not a folder; choose another output path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise SoupError(
            f"output folder {target} already exists and is not empty; choose another output or pass "
            "overwrite=True (CLI: --overwrite) to replace it"
        )


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc ≥ 2.28
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`).

    Returns False, having changed nothing, where the platform or the file system cannot.
    """
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _replace_folder(staging: Path, target: Path) -> None:
    """Put `staging` under `target`'s name; `target` holds a complete folder at every instant where it can."""
    if not target.exists():
        os.rename(staging, target)
        return
    if exchange(staging, target):  # `staging` now holds the previous output
        shutil.rmtree(staging, ignore_errors=True)
        return
    # Elsewhere: two renames. A crash between them leaves no `target` and the previous output under `-old`, which
    # the next `staged_folder` of the same target (`remove_stale_staging`) puts back.
    old = staging.with_name(f"{staging.name}-old")
    os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_staging(target: str | os.PathLike) -> list[Path]:
    """Remove the staging folders of `target` left by processes of this machine that are gone (killed cooks).

    A previous output left under a `-old` name by a crash between two renames (platforms without an atomic
    exchange) is put back under `target` when `target` is missing. Returns the folders removed or put back.
    """
    target = Path(target).absolute()
    lead = f"{STAGING_PREFIX}{target.name}-"
    found = []
    with contextlib.suppress(OSError):
        found = [p for p in target.parent.iterdir() if p.name.startswith(lead)]
    handled = []
    for folder in sorted(found, key=lambda p: not p.name.endswith("-old")):
        match = _STAGING_REST.fullmatch(folder.name[len(lead) :])
        if match is None or not owner_gone(match["owner"]):
            continue
        if match["old"] and not target.exists():
            with contextlib.suppress(OSError):
                os.rename(folder, target)
                logger.warning("put back the previous output %s from %s (a cook was killed)", target, folder.name)
                handled.append(folder)
                continue
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("removed %s, left by a killed process", folder)
        handled.append(folder)
    return handled


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; move it to `target` only when the block succeeds.

    On any error (or interruption) the temporary folder is removed and `target` is left as it was. With
    `overwrite=True` an existing `target` is swapped with the new folder in one atomic step (Linux), so `target`
    holds the previous output or the new one at every instant, even if the process is killed. Staging folders of the
    same target left by killed processes are removed first. A full disk raises a `SoupError` that says so.

    Example:

    ```python
    >>> with staged_folder("soups/uniform") as tmp:
    ...     (tmp / "config.json").write_text("{}")
    ```
    """
    target = Path(target).absolute()
    check_output_folder(target, overwrite=overwrite)
    with disk_space(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(target)
        tmp = target.parent / f"{STAGING_PREFIX}{target.name}-{owner_tag()}-{uuid.uuid4().hex[:10]}"
        tmp.mkdir()
    try:
        with disk_space(target):
            yield tmp
            fsync_folder(tmp)
            _replace_folder(tmp, target)
        fsync_folder(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, *, chunk_size: int = 1 << 24) -> str:
    """The hex sha256 of a file, read in chunks (hashlib releases the GIL on large chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
