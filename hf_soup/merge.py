"""The streaming merge engine: for each tensor name, read it from every ingredient, apply the method, write it.

The engine owns what methods must not care about: I/O, dtypes (inputs to fp32, output in the planned dtype),
non-floating tensors (copied, checked equal), finiteness, seeds, the device the method runs on and progress. Peak
memory is about (k + 3) × the largest tensor: k inputs, the output, its cast, and one tensor being written by the
writer thread. With `device: cuda` tensors are still read and written on the CPU: each input is moved to the GPU as
it is read and the output comes back once cast, so the same bound holds on the GPU, and the CPU holds less.
Before anything is written, `plan_soup` checks names, shapes and dtypes across the ingredients (headers only) and
decides each output tensor's dtype.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .alignment import split_rows
from .checkpoint import FLOAT_DTYPES, CheckpointReader, TensorInfo
from .errors import SoupError
from .methods import Method
from .writer import CheckpointWriter

logger = logging.getLogger(__name__)
Parameters = Mapping[str, Any] | Callable[[str], Mapping[str, Any]]


@dataclass
class Plan:
    """What the soup will hold: one `TensorInfo` per output tensor, and notes on what was decided."""

    infos: list[TensorInfo]
    notes: list[str] = field(default_factory=list)


def plan_soup(
    readers: Sequence[CheckpointReader],
    *,
    dtype: torch.dtype | None = None,
    base: CheckpointReader | None = None,
) -> Plan:
    """Check names, shapes and dtypes across ingredients and decide each output tensor's dtype.

    Args:
        readers: one per ingredient, in recipe order.
        dtype: the output dtype for floating tensors; `None` keeps the first ingredient's dtype per tensor.
        base: the base model, when the method needs one (it must have every tensor too).
    """
    if not readers:
        raise SoupError("no ingredients: give at least one model folder (ingredients: [...]) or a pantry")
    first = readers[0]
    names = first.names()
    wanted = set(names)
    for reader in [*readers[1:], *([base] if base is not None else [])]:
        have = set(reader.names())
        missing, extra = sorted(wanted - have), sorted(have - wanted)
        if missing or extra:
            what = f"lacks {_few(missing)}" if missing else f"has extra {_few(extra)}"
            raise SoupError(
                f"ingredient {reader.label} {what} compared with {first.label}; ingredients must have the same "
                "tensors (same architecture, same tied-weight setting, same adapter targets)"
            )
    notes = []
    mixed: set[tuple[torch.dtype, ...]] = set()
    infos = []
    for name in names:
        reference = first.info(name)
        for reader in [*readers[1:], *([base] if base is not None else [])]:
            info = reader.info(name)
            if info.shape != reference.shape:
                raise SoupError(
                    f"ingredient {reader.label}: tensor {name} has shape {list(info.shape)} but {first.label} has "
                    f"{list(reference.shape)}; ingredients must come from one architecture (vocab size, heads, ...)"
                )
            is_float = info.dtype in FLOAT_DTYPES
            if is_float != (reference.dtype in FLOAT_DTYPES):
                raise SoupError(
                    f"ingredient {reader.label}: tensor {name} is {info.dtype} but {first.label} has "
                    f"{reference.dtype}; a tensor must be floating in every ingredient or in none"
                )
            if not is_float and info.dtype != reference.dtype:
                raise SoupError(
                    f"ingredient {reader.label}: non-floating tensor {name} is {info.dtype} but {first.label} "
                    f"has {reference.dtype}"
                )
        if reference.dtype in FLOAT_DTYPES:
            dtypes = tuple(sorted({str(r.info(name).dtype) for r in readers}))
            if len(dtypes) > 1:
                mixed.add(dtypes)
            infos.append(TensorInfo(name, reference.shape, dtype or reference.dtype))
        else:
            infos.append(reference)
    if mixed:
        target = f"{dtype}" if dtype is not None else f"the dtype of {first.label} for each tensor"
        notes.append(
            f"ingredients mix dtypes ({'; '.join(', '.join(m) for m in sorted(mixed))}): every tensor is averaged "
            f"in float32 and written as {target}; set `dtype:` to choose"
        )
    if len(readers) == 1:
        notes.append(f"only one ingredient ({first.label}): the soup is that model")
    for note in notes:
        logger.warning(note)
    return Plan(infos, notes)


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return f"{shown} (+{len(names) - 3} more)" if len(names) > 3 else shown


DEVICES = "auto, cpu, cuda or cuda:N"  # what a recipe's `device:` may say
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(asked: str) -> str:
    """`asked` if it is a device a recipe may name (`DEVICES`), else a `SoupError`; nothing is probed."""
    if not isinstance(asked, str) or not _DEVICE.fullmatch(asked):
        raise SoupError(f"device {asked!r} is unknown; choose {DEVICES} (the device the merge math runs on)")
    return asked


def merge_device(asked: str | None) -> torch.device:
    """The device the merge math runs on: the CPU when nothing is asked, `auto` = the GPU when torch sees one.

    `cuda` (or `cuda:N`) where torch sees no such GPU is a `SoupError` that says what to do instead.
    """
    if asked is None:
        return torch.device("cpu")
    check_device(asked)
    if asked == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if asked == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise SoupError(
            f"device: {asked}, but torch sees no CUDA GPU (torch {torch.__version__}, {build}); run on a machine with "
            "an NVIDIA GPU and a CUDA build of torch, or set device: auto (the GPU when there is one, else the CPU) "
            "or device: cpu"
        )
    device = torch.device(asked)
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise SoupError(
            f"device: {asked}, but torch sees {torch.cuda.device_count()} GPU(s) (cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}); name one of them, or set device: cuda"
        )
    return torch.device("cuda", index)


def device_record(asked: str | None, used: torch.device) -> dict[str, Any]:
    """What `soup.json` records of the device: what the recipe asked, what was used, and the GPU's name."""
    record: dict[str, Any] = {"asked": asked, "used": str(used)}
    if used.type == "cuda":
        record["name"] = torch.cuda.get_device_name(used)
    return record


def _fp32(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (read on the CPU) as fp32 on `device`: moved in its own dtype (fewer bytes to copy), then cast. On the
    CPU both steps are no-ops for an fp32 tensor: no copy is made."""
    return tensor.to(device).float()


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded by `seed` and the tensor name: the same soup whatever the order of tensors."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


class _BackgroundWriter:
    """Hand tensors to a `CheckpointWriter` on a thread, so disk writes overlap the next tensor's reads."""

    def __init__(self, writer: CheckpointWriter, depth: int = 1):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="hf_soup-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write(*item)
                except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
                    self.error = error

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((name, tensor))

    def finish(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def is_finite(tensor: torch.Tensor) -> bool:
    """No NaN and no Inf; one pass and no allocation (min and max propagate NaN)."""
    if not tensor.numel():
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def merge_tensor(
    name: str,
    readers: Sequence[CheckpointReader],
    method: Method,
    parameters: Parameters,
    *,
    base: CheckpointReader | None = None,
    seed: int = 0,
    statistics: Sequence[Any] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Merge one tensor name across ingredients; returns fp32 for floating tensors, the shared value otherwise.

    `parameters` is the method's parameters, or a function of the tensor name giving them (per-layer values).
    Floating tensors are merged on `device` (default: the CPU) and returned there; random draws stay on the CPU
    (`tensor_generator`), so a seed gives the same soup on every device. Non-floating tensors stay on the CPU.
    """
    first = readers[0]
    if first.info(name).dtype not in FLOAT_DTYPES:
        value = first.get(name)
        for reader in readers[1:]:
            if not torch.equal(value, reader.get(name)):
                raise SoupError(
                    f"ingredient {reader.label}: non-floating tensor {name} differs from {first.label}; integer "
                    "and boolean tensors (buffers, ids) cannot be averaged and must be equal in every ingredient"
                )
        return value
    device = device or torch.device("cpu")
    blocks = split_rows(name, readers, base, statistics)
    if blocks is not None:  # a vocabulary tensor: the rows every model holds, then the others (`hf_soup.alignment`)
        out = torch.empty(first.info(name).shape, device=device)
        for number, (rows, part, part_base, part_statistics) in enumerate(blocks):
            out[rows] = merge_tensor(
                name,
                part,
                method,
                parameters,
                base=part_base,
                seed=seed + number,
                statistics=part_statistics,
                device=device,
            )
        return out
    tensors = [_fp32(reader.get(name), device) for reader in readers]
    context: dict[str, Any] = {}
    if "base" in method.context:
        context["base"] = _fp32(base.get(name), device)
    if "generator" in method.context:
        context["generator"] = tensor_generator(seed, name)
    if "statistics" in method.context:
        context["statistics"] = [
            _fp32(handle.get_tensor(name), device) if name in handle.keys() else None for handle in statistics
        ]
    values = parameters(name) if callable(parameters) else parameters
    return check_finite(method.function(tensors, **values, **context), name, method, readers, tensors)


def check_finite(
    out: torch.Tensor,
    name: str,
    method: Method,
    readers: Sequence[CheckpointReader] = (),
    tensors: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """`out`, once it is known to hold no NaN or Inf; else the error names the diverged ingredient among
    `readers`/`tensors` (the method's inputs), or the method."""
    if not is_finite(out):
        for reader, tensor in zip(readers, tensors):
            if not is_finite(tensor):
                raise SoupError(
                    f"ingredient {reader.label}: tensor {name} holds NaN or Inf; that run diverged, leave it out"
                )
        raise SoupError(f"method {method.name!r} produced NaN or Inf for tensor {name}; check its parameters")
    return out


def stream_merge(
    readers: Sequence[CheckpointReader],
    method: Method,
    parameters: Parameters,
    plan: Plan,
    writer: CheckpointWriter,
    *,
    base: CheckpointReader | None = None,
    seed: int = 0,
    progress: bool = True,
    statistics: Sequence[Any] | None = None,
    device: torch.device | None = None,
) -> None:
    """Merge every planned tensor on `device` (default: the CPU) and hand it to `writer` (in plan order), back on
    the CPU, writing on a background thread."""
    from tqdm.auto import tqdm

    total = sum(info.nbytes for info in plan.infos)
    background = _BackgroundWriter(writer)
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"cooking {method.name}", disable=not progress) as bar:
            for info in plan.infos:
                out = merge_tensor(
                    info.name, readers, method, parameters, base=base, seed=seed, statistics=statistics, device=device
                )
                background.put(info.name, out.to(info.dtype).cpu())
                bar.update(info.nbytes)
    finally:
        background.finish()
