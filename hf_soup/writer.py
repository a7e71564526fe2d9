"""Writing checkpoints: a streaming sharded safetensors writer.

The writer knows every tensor's name, shape and dtype up front (a *plan*), so it writes each safetensors header first
and then each tensor's bytes at their final offset as soon as the tensor is ready: no shard is ever held in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .atomic import disk_space
from .checkpoint import DTYPE_NAMES, TensorInfo, parse_size
from .errors import SoupError

WRITEBACK_BYTES = 64 << 20  # `CheckpointWriter` starts the disk writing after this many new bytes


def plan_shards(infos: Sequence[TensorInfo], max_shard_size: int) -> list[list[TensorInfo]]:
    """Split tensors, in order, into shards of at most `max_shard_size` bytes (a larger tensor gets its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


class CheckpointWriter:
    """Write tensors, in plan order, straight into their final place in (sharded) safetensors files.

    Each shard's header is written when the shard is opened, so a tensor's bytes go to disk as soon as it is given;
    memory use is one tensor. Files are written into `folder`, which should be a staging folder (see
    `hf_soup.atomic.staged_folder`): the writer itself does not make files appear atomically.

    Example:

    ```python
    >>> infos = [TensorInfo("w", (2, 2), torch.float32)]
    >>> with CheckpointWriter(tmp_folder, infos) as writer:
    ...     writer.write("w", torch.ones(2, 2))
    ```
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        infos: Iterable[TensorInfo],
        *,
        max_shard_size: int | str = "5GB",
        prefix: str = "model",
        metadata: dict[str, str] | None = None,
    ):
        self.folder = Path(folder)
        self.infos = list(infos)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(self.infos, parse_size(max_shard_size))
        count = len(self.shards)
        self.filenames = (
            [f"{prefix}.safetensors"]
            if count == 1
            else [f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self.index_name = f"{prefix}.safetensors.index.json" if count > 1 else None
        self._queue = [(shard_no, info) for shard_no, shard in enumerate(self.shards) for info in shard]
        self._position = 0
        self._handle = None
        self._shard_no = -1
        self._unwritten = 0

    def _open_shard(self, shard_no: int) -> None:
        if self._handle is not None:  # durable before the staging folder is renamed, like the last shard in `close`
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for info in self.shards[shard_no]:
            header[info.name] = {
                "dtype": DTYPE_NAMES[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [offset, offset + info.nbytes],
            }
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._handle = open(self.folder / self.filenames[shard_no], "wb")
        self._handle.write(len(raw).to_bytes(8, "little"))
        self._handle.write(raw)
        self._shard_no = shard_no

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of the plan; its name, shape and dtype must match the plan."""
        if self._position >= len(self._queue):
            raise SoupError(f"writer got tensor {name} after the last planned tensor")
        shard_no, info = self._queue[self._position]
        if name != info.name or tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise SoupError(
                f"writer expected {info.name} {list(info.shape)} {info.dtype}, got {name} {list(tensor.shape)} "
                f"{tensor.dtype}"
            )
        with disk_space(self.folder / self.filenames[shard_no]):  # a full disk: one clear error, not ENOSPC
            if shard_no != self._shard_no:
                self._open_shard(shard_no)
            data = tensor.detach().to("cpu").contiguous()
            if data.numel():
                self._handle.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
                self._unwritten += info.nbytes
                if self._unwritten >= WRITEBACK_BYTES:
                    self._start_writeback()
        self._position += 1

    def _start_writeback(self) -> None:
        """Ask the kernel to start writing what this shard has so far (it returns at once): the disk then works
        while the next tensors are merged, instead of all at the final fsync, and the soup's pages do not crowd the
        page cache. Linux's POSIX_FADV_DONTNEED starts writeback of dirty pages and drops pages already clean."""
        self._unwritten = 0
        if hasattr(os, "posix_fadvise"):
            self._handle.flush()
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> list[Path]:
        """Finish the files (and the index when sharded); return the written paths."""
        try:
            with disk_space(self.folder / self.filenames[max(self._shard_no, 0)]):
                return self._close()
        except BaseException:
            self._drop_handle()
            raise

    def _drop_handle(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):  # flushing onto a full disk fails again: keep the first error
                self._handle.close()
            self._handle = None

    def _close(self) -> list[Path]:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None
        if self._position != len(self._queue):
            missing = [info.name for _, info in self._queue[self._position : self._position + 3]]
            raise SoupError(f"writer closed before every planned tensor was written (next: {', '.join(missing)})")
        written = [self.folder / name for name in self.filenames]
        if self.index_name is not None:
            weight_map = {info.name: self.filenames[no] for no, shard in enumerate(self.shards) for info in shard}
            total = sum(info.nbytes for info in self.infos)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / self.index_name).write_text(json.dumps(index, indent=2) + "\n")
            written.append(self.folder / self.index_name)
        return written

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._drop_handle()
