"""Reading checkpoints: which weight files a folder holds, and a lazy per-tensor reader over (sharded) safetensors.

The reader opens only headers until a tensor is asked for, then maps just that tensor's bytes. Pickled weights are
read only on opt-in (`allow_pickle`, then with `weights_only=True`). Writing is `writer.py`'s.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SoupError, brief
from .jsonfile import SHARD_INDEX, SHARD_INDEX_FIX, read_json

SAFE_SINGLE = ("model.safetensors", "adapter_model.safetensors")
SAFE_INDEX = ("model.safetensors.index.json",)
PICKLE_SINGLE = ("pytorch_model.bin", "adapter_model.bin")
PICKLE_INDEX = ("pytorch_model.bin.index.json",)
MAP_MIN_BYTES = 1 << 20  # `CheckpointReader.get` maps tensors at least this large on their own

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
FLOAT_DTYPES = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}
PICKLE_HINT = (
    "pickle files can run arbitrary code when loaded, so hf_soup reads safetensors only. Convert once with "
    "`python -c \"from transformers import AutoModel; AutoModel.from_pretrained('{folder}')"
    ".save_pretrained('{folder}-safetensors')\"` (AutoModelFor... of your task), or opt in with `allow_pickle: true` "
    "in the recipe (allow_pickle=True in Python; loaded with torch.load(weights_only=True))"
)


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """`"bfloat16"`, `"bf16"`, `"float32"`, ... or a `torch.dtype` → a floating `torch.dtype`."""
    if isinstance(value, torch.dtype):
        dtype = value
    else:
        aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp64": "float64"}
        name = aliases.get(str(value).lower().removeprefix("torch."), str(value).lower().removeprefix("torch."))
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
            raise SoupError(
                f"unknown dtype {value!r}; use one of float32, bfloat16, float16, float64 (or fp32, bf16, fp16)"
            )
    if dtype not in FLOAT_DTYPES:
        raise SoupError(f"dtype {dtype} is not a floating dtype; use float32, bfloat16, float16 or float64")
    return dtype


def parse_size(value: int | str) -> int:
    """`"5GB"`, `"500MiB"`, `1_000_000` → bytes (the `max_shard_size` convention of transformers)."""
    if isinstance(value, bool):
        raise SoupError(f"size must be an integer number of bytes or a string like '5GB', not {value!r}")
    how = "write bytes as an integer or like '500MB', '5GB', '2GiB'"
    if isinstance(value, int):
        if value <= 0:
            raise SoupError(f"size must be positive, got {value}; {how}")
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(value), flags=re.IGNORECASE)
    if not match:
        raise SoupError(f"cannot read size {brief(value, 40)}; {how}")
    unit = (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    exact = float(match.group(1)) * base ** {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    if not math.isfinite(exact):
        raise SoupError(f"cannot read size {brief(value, 40)} (too large); {how}")
    size = int(exact)
    if size <= 0:
        raise SoupError(f"size must be positive, got {value!r}; {how}")
    return size


def weight_files(folder: str | os.PathLike, *, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a model or adapter folder, in shard order.

    Raises `SoupError` when the folder has no weights, when an index names a missing shard, or when only pickle
    weights exist and `allow_pickle` is False.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SoupError(f"ingredient {folder} does not exist or is not a folder; give a model or adapter folder")
    for name in SAFE_SINGLE:
        if (folder / name).is_file():
            return [folder / name]
    for name in SAFE_INDEX:
        if (folder / name).is_file():
            return _shards_from_index(folder / name)
    pickles = [folder / n for n in PICKLE_SINGLE + PICKLE_INDEX if (folder / n).is_file()]
    if pickles:
        if not allow_pickle:
            raise SoupError(f"{pickles[0]} is a pickle checkpoint; " + PICKLE_HINT.format(folder=folder))
        if pickles[0].name in PICKLE_INDEX:
            return _shards_from_index(pickles[0])
        return pickles[:1]
    found = sorted(p.name for p in folder.iterdir())[:8]
    raise SoupError(
        f"no weights in {folder} (found: {', '.join(found) or 'nothing'}); an ingredient folder holds "
        "model.safetensors, a sharded model.safetensors.index.json, or adapter_model.safetensors"
    )


def _read_index(index: Path) -> dict[str, str]:
    fix = SHARD_INDEX_FIX
    weight_map = read_json(index, SHARD_INDEX, fix=fix, label="shard index ")["weight_map"]
    if not weight_map:
        raise SoupError(f"shard index {index} has no 'weight_map' of tensor names to shard files; {fix}")
    wrong = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if wrong is not None:
        raise SoupError(
            f"shard index {index} maps tensor {wrong[0]} to {brief(wrong[1])}, not a shard file name in its "
            f"'weight_map'; {fix}"
        )
    return weight_map


def _shards_from_index(index: Path) -> list[Path]:
    weight_map = _read_index(index)
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        path = index.parent / shard
        if Path(shard).name != shard:
            raise SoupError(f"shard index {index} names {shard!r}, which is not a file in the same folder")
        if not path.is_file():
            raise SoupError(f"shard {shard} named in {index} is missing; the checkpoint is incomplete, copy it again")
    return [index.parent / shard for shard in shards]


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


@functools.cache
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _data_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Tensor name → (first byte, end byte) in a safetensors file, from its header."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    start = 8 + size
    return {
        name: (start + entry["data_offsets"][0], start + entry["data_offsets"][1])
        for name, entry in header.items()
        if name != "__metadata__"
    }


def _unpickling(error: Exception) -> str:
    """The line of a `torch.load(weights_only=True)` error that says what was refused (not its general advice)."""
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(advice)]
    reason = (specific or lines or [type(error).__name__])[0].removeprefix("WeightsUnpickler error:").strip()
    return reason[:160]


class CheckpointReader:
    """Lazy per-tensor access to a checkpoint folder (single file or sharded; safetensors, or pickle on opt-in).

    Only headers are read when it opens; `get(name)` reads one tensor.

    Example:

    ```python
    >>> with CheckpointReader("runs/a/best") as reader:
    ...     for info in reader.infos():
    ...         tensor = reader.get(info.name)
    ```
    """

    def __init__(self, folder: str | os.PathLike, *, allow_pickle: bool = False, label: str | None = None):
        self.folder = Path(folder)
        self.label = label or str(self.folder)
        if not self.folder.is_dir():
            raise SoupError(f"{self.label}: {self.folder} does not exist or is not a folder; check the path")
        self.files = weight_files(self.folder, allow_pickle=allow_pickle)
        self._handles: dict[Path, object] = {}
        self._files: dict[Path, object] = {}  # safetensors files opened for `get`, on first use
        self._spans: dict[str, tuple[int, int]] = {}  # safetensors: tensor name → (start, end) byte in its file
        self._where: dict[str, Path] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        for path in self.files:
            if path.suffix == ".bin":
                self._open_pickle(path)
            else:
                self._open_safetensors(path)
        index = next((self.folder / n for n in SAFE_INDEX + PICKLE_INDEX if (self.folder / n).is_file()), None)
        if index is not None and self.files[0].name not in SAFE_SINGLE + PICKLE_SINGLE:
            self._check_index(index)

    def _open_safetensors(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as error:
            raise SoupError(
                f"ingredient {self.label}: {path.name} is not a valid safetensors file ({error}); it is truncated "
                "or corrupt, copy or save it again"
            ) from None
        self._handles[path] = handle
        self._spans.update(_data_spans(path))  # safe_open has checked the header, offsets included
        for name in handle.keys():
            if name in self._where:
                raise SoupError(
                    f"ingredient {self.label}: tensor {name} appears in two shards; re-save the checkpoint"
                )
            sliced = handle.get_slice(name)
            dtype_name = sliced.get_dtype()
            if dtype_name not in DTYPES_BY_NAME:
                raise SoupError(f"ingredient {self.label}: tensor {name} has dtype {dtype_name}, not supported here")
            self._where[name] = path
            self._infos[name] = TensorInfo(name, tuple(sliced.get_shape()), DTYPES_BY_NAME[dtype_name])

    def _open_pickle(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # noqa: BLE001 - torch raises many types for bad pickles
            raise SoupError(
                f"ingredient {self.label}: cannot load {path.name} with weights_only=True ({_unpickling(error)}); it "
                "is damaged or not a state dict of tensors (objects or code are never unpickled): save the weights "
                "again as safetensors from a copy you trust"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise SoupError(
                f"ingredient {self.label}: {path.name} is not a state dict of tensors; save the model's state_dict "
                "(or better, save_pretrained as safetensors)"
            )
        self._pickled[path] = state
        for name, tensor in state.items():
            self._where[name] = path
            self._infos[name] = TensorInfo(name, tuple(tensor.shape), tensor.dtype)

    def _check_index(self, index: Path) -> None:
        weight_map = _read_index(index)
        for name, shard in weight_map.items():
            if self._where.get(name) is None or self._where[name].name != shard:
                raise SoupError(
                    f"ingredient {self.label}: {index.name} maps tensor {name} to {shard}, which does not hold it; "
                    "the index and the shards disagree, re-save the checkpoint"
                )
        extra = sorted(set(self._where) - set(weight_map))
        if extra:
            raise SoupError(
                f"ingredient {self.label}: shards hold tensors the index does not list ({', '.join(extra[:3])}); "
                "re-save the checkpoint"
            )

    def names(self) -> list[str]:
        """Tensor names in storage order (shard by shard)."""
        return list(self._infos)

    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor: a CPU tensor the caller may keep and change (changes never reach the file).

        A safetensors tensor of 1 MiB or more is a private copy-on-write map of its own bytes: no copy is made, and
        its pages stay mapped only while the tensor lives, so streaming tensor by tensor keeps memory flat whatever
        the file size (tensors from one whole-file map would keep every page read so far resident until the file is
        closed). Each such tensor holds a file descriptor while it lives; where the process runs out of them (or of
        address space), and for small tensors, the tensor comes from the whole-file map instead.
        """
        path = self._where[name]
        if path in self._pickled:
            return self._pickled[path][name].clone()
        info, (start, end) = self._infos[name], self._spans[name]
        if end - start < MAP_MIN_BYTES:
            return self._handles[path].get_tensor(name)
        if path not in self._files:
            self._files[path] = open(path, "rb")
        first = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            region = mmap.mmap(self._files[path].fileno(), end - first, offset=first, access=mmap.ACCESS_COPY)
        except OSError:
            return self._handles[path].get_tensor(name)
        # The tensor holds `region`: the map lives exactly as long as the tensor (never close it by hand).
        data = torch.frombuffer(region, dtype=torch.uint8, count=end - start, offset=start - first)
        return data.view(info.dtype).view(info.shape)

    def metadata(self) -> dict[str, str]:
        """The `__metadata__` of the first safetensors file ({} for pickle)."""
        first = self._handles.get(self.files[0])
        return dict(first.metadata() or {}) if first is not None else {}

    def close(self) -> None:
        for handle in self._handles.values():
            exit_ = getattr(handle, "__exit__", None)
            if exit_ is not None:
                exit_(None, None, None)
        for file in self._files.values():
            file.close()
        self._handles.clear()
        self._files.clear()
        self._pickled.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RenamedReader:
    """A read-only view that presents tensors of several readers under new names (e.g. a stacked model).

    Args:
        readers: the underlying readers.
        mapping: `(output name, reader index, source name)` triples, in output order.
    """

    def __init__(self, readers: Sequence[CheckpointReader], mapping: Sequence[tuple[str, int, str]]):
        self._readers = list(readers)
        self._sources = {out: (index, source) for out, index, source in mapping}
        self.label = "+".join(reader.label for reader in readers)
        self.files = self._readers[0].files

    def names(self) -> list[str]:
        return list(self._sources)

    def info(self, name: str) -> TensorInfo:
        index, source = self._sources[name]
        info = self._readers[index].info(source)
        return TensorInfo(name, info.shape, info.dtype)

    def infos(self) -> list[TensorInfo]:
        return [self.info(name) for name in self._sources]

    def get(self, name: str) -> torch.Tensor:
        index, source = self._sources[name]
        return self._readers[index].get(source)
