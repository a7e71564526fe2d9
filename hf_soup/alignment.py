"""Aligned reading: an ingredient's embedding and output rows permuted into the soup's vocabulary as they are read.

When ingredients hold different vocabularies (a fine-tune added chat tokens), `hf_soup.vocabulary` decides the soup's
vocabulary and, for every model read (each ingredient, the base), which of its rows each output row comes from. This
module applies that decision where tensors are read, so the merge engine, the methods and the strategies only ever
see aligned tensors of one shape:

- `vocabulary_tensors` finds the tensors that hold one row per token (the input embeddings and the output layer,
  named by the model's own `get_input_embeddings` / `get_output_embeddings`).
- `Alignment` is the decision: per model, the source row of each output row (`-1` where the model lacks that token),
  and for each such row the models whose rows fill it in (averaged).
- `AlignedReader` is a read-only view of one `CheckpointReader`: reading a vocabulary tensor is one gather, plus the
  few filled rows (computed once per tensor by `RowFills`, one model's tensor at a time).
- `split_rows` lets the engine merge a vocabulary tensor in two blocks: the rows every model holds (so a method's
  whole-tensor statistics, TIES's top-k or SLERP's angle, are those of the shared vocabulary alone) and the rest.

Example:

```python
>>> vocabulary_tensors(reader)                     # ["model.embed_tokens.weight", "lm_head.weight"]
>>> aligned = AlignedReader(reader, 0, alignment, RowFills(alignment, readers))
>>> aligned.get("model.embed_tokens.weight").shape  # (alignment.rows, hidden)
```
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointReader, TensorInfo
from .errors import SoupError
from .jsonfile import read_model_file

logger = logging.getLogger(__name__)


def vocabulary_tensors(reader: CheckpointReader, *, trust_remote_code: bool = False) -> list[str]:
    """The tensors of a checkpoint that hold one row per token: the input embedding's weight and the output layer's
    weight and bias, as the model class of `config.json` names them (built on the meta device, nothing allocated).

    A checkpoint of a tied model has no output tensor (the embedding serves both). Where the model class cannot be
    built (no `architectures`, custom code), the tensors shaped `[vocab_size, hidden_size]` are taken.
    """
    config = read_model_file(reader.folder, "config.json") or {}
    modules = _embedding_modules(reader.folder, config, trust_remote_code)
    if modules is not None:
        found = [name for wanted in modules for name in reader.names() if _same_tensor(name, wanted)]
    else:
        vocab, hidden = config.get("vocab_size"), config.get("hidden_size")
        shape = (vocab, hidden) if vocab != hidden else None
        found = [info.name for info in reader.infos() if info.shape == shape]
    if not found:
        raise SoupError(
            f"cannot find the embedding tensors of {reader.label} (config.json names no model class hf_soup can "
            "build, and no tensor is shaped [vocab_size, hidden_size]); vocabularies can only be merged for models "
            "whose config.json has `architectures` and `vocab_size`"
        )
    return list(dict.fromkeys(found))


def _embedding_modules(folder: Path, config: dict, trust_remote_code: bool) -> list[str] | None:
    """Parameter names of the input and output embedding modules of the config's model class, or `None`."""
    import transformers
    from accelerate import init_empty_weights

    architecture = (config.get("architectures") or [None])[0]
    model_class = getattr(transformers, architecture, None) if isinstance(architecture, str) else None
    if model_class is None:
        return None
    try:
        settings = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            model = model_class(settings)
    except Exception as error:  # noqa: BLE001 - any failure means: fall back to shapes
        logger.info("cannot build %s on the meta device (%s); embeddings found by shape", architecture, error)
        return None
    where = {id(module): name for name, module in model.named_modules()}
    wanted = []
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is None or id(module) not in where:
            continue
        prefix = f"{where[id(module)]}." if where[id(module)] else ""
        wanted += [prefix + name for name, _ in module.named_parameters(recurse=False)]
    return wanted


def _same_tensor(stored: str, wanted: str) -> bool:
    """A checkpoint name and a model parameter name for one tensor (either may lack the other's prefix, as a base
    model saved without its head does)."""
    return stored == wanted or stored.endswith("." + wanted) or wanted.endswith("." + stored)


@dataclass(frozen=True)
class Alignment:
    """Where each row of the soup's vocabulary tensors comes from, for every model read.

    Attributes:
        names (`frozenset[str]`): the vocabulary tensors (one row per token, rows first).
        rows (`int`): the soup's rows (its tokens, then padding rows).
        sources (`list[torch.Tensor]`): per model (ingredients in recipe order, then the base), output row → the
            model's own row, `-1` where it lacks that token (or padding row).
        fills (`dict[int, tuple[int, ...]]`): for each row some model lacks, the models whose rows are averaged into
            it (one model: its row is taken as it is); empty for a padding row nobody has (zeros).
        shared (`torch.Tensor`): the token rows every model holds, merged as one block (see `split_rows`).
    """

    names: frozenset[str]
    rows: int
    sources: list[torch.Tensor]
    fills: dict[int, tuple[int, ...]]
    shared: torch.Tensor

    @property
    def rest(self) -> torch.Tensor:
        """The rows some model lacks (tokens not everywhere, padding), ascending."""
        mask = torch.ones(self.rows, dtype=torch.bool)
        mask[self.shared] = False
        return mask.nonzero().flatten()


def source_rows(positions: Mapping[str, int], tokens: Mapping[int, str], rows: int, own_rows: int) -> torch.Tensor:
    """One model's source row for each of `rows` output rows: its row of the same token (`positions`: token → row,
    for the tokens it has a row for), `-1` where it lacks the token. Output rows without a token (padding) take the
    model's own padding rows in turn, never rows of its tokens."""
    source = torch.full((rows,), -1, dtype=torch.long)
    pairs = [(row, positions[token]) for row, token in tokens.items() if token in positions and row < rows]
    if pairs:
        index = torch.tensor(pairs, dtype=torch.long)
        source[index[:, 0]] = index[:, 1]
    used = set(positions.values())
    own = torch.tensor([row for row in range(own_rows) if row not in used], dtype=torch.long)
    padding = torch.tensor([row for row in range(rows) if row not in tokens], dtype=torch.long)
    if len(own) and len(padding):
        source[padding] = own[torch.arange(len(padding)) % len(own)]
    return source


class RowFills:
    """The filled rows of every vocabulary tensor, computed on first use from the unaligned readers (one model's
    tensor at a time) and kept (they are few rows)."""

    def __init__(self, alignment: Alignment, readers: Sequence[CheckpointReader]):
        self.alignment, self.readers = alignment, list(readers)
        self.order = sorted(alignment.fills)
        self.slot = torch.full((alignment.rows,), -1, dtype=torch.long)  # output row → its place in `values`
        self.slot[self.order] = torch.arange(len(self.order))
        self._values: dict[str, torch.Tensor] = {}

    def values(self, name: str) -> torch.Tensor:
        """fp32 rows, one per filled output row (in `order`)."""
        if name not in self._values:
            info = self.readers[0].info(name)
            total = torch.zeros((len(self.order), *info.shape[1:]), dtype=torch.float32)
            for model, reader in enumerate(self.readers):
                places = [i for i, row in enumerate(self.order) if model in self.alignment.fills[row]]
                if not places:
                    continue
                rows = torch.tensor([self.order[i] for i in places], dtype=torch.long)
                share = torch.tensor([1.0 / len(self.alignment.fills[self.order[i]]) for i in places])
                own = reader.get(name).index_select(0, self.alignment.sources[model][rows]).float()
                total[places] += own * share.view(-1, *([1] * (own.dim() - 1)))
            self._values[name] = total
        return self._values[name]


class AlignedReader:
    """A read-only view of one model's checkpoint with its vocabulary tensors in the soup's row order.

    Args:
        reader (`CheckpointReader`): the model's own reader.
        model (`int`): its index in `alignment.sources`.
        alignment (`Alignment`), fills (`RowFills`): shared by the views of every model.
    """

    def __init__(self, reader: CheckpointReader, model: int, alignment: Alignment, fills: RowFills):
        self.reader, self.alignment, self.fills = reader, alignment, fills
        self.source = alignment.sources[model]
        identity = len(self.source) == reader.info(next(iter(alignment.names))).shape[0]
        self._unchanged = identity and bool((self.source == torch.arange(len(self.source))).all())

    def __getattr__(self, attribute: str) -> Any:  # label, folder, files, metadata, ...: the reader's own
        return getattr(self.reader, attribute)

    def names(self) -> list[str]:
        return self.reader.names()

    def info(self, name: str) -> TensorInfo:
        info = self.reader.info(name)
        if name not in self.alignment.names:
            return info
        return TensorInfo(name, (self.alignment.rows, *info.shape[1:]), info.dtype)

    def infos(self) -> list[TensorInfo]:
        return [self.info(name) for name in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def get(self, name: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, its rows in the soup's order (only `rows` of them when given); filled rows are cast to the
        tensor's dtype."""
        tensor = self.reader.get(name)
        if name not in self.alignment.names:
            return tensor
        if rows is None and self._unchanged:
            return tensor
        source = self.source if rows is None else self.source[rows]
        out = tensor.index_select(0, source.clamp_min(0))
        lacking = source < 0
        if bool(lacking.any()):
            wanted = torch.arange(self.alignment.rows)[lacking] if rows is None else rows[lacking]
            out[lacking] = self.fills.values(name)[self.fills.slot[wanted]].to(out.dtype)
        return out


class _Rows:
    """Some rows of an aligned reader (or of a statistics file), as the engine reads a whole tensor."""

    def __init__(self, reader: Any, rows: torch.Tensor, total: int):
        self.reader, self.rows, self.total = reader, rows, total
        self.label = getattr(reader, "label", "")

    def info(self, name: str) -> TensorInfo:
        info = self.reader.info(name)
        return TensorInfo(name, (len(self.rows), *info.shape[1:]), info.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(name, self.rows)

    def keys(self):
        return self.reader.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        tensor = self.reader.get_tensor(name)  # a statistic shaped like the tensor is split like it; others are not
        return tensor[self.rows] if tensor.dim() and tensor.shape[0] == self.total else tensor


def split_rows(
    name: str, readers: Sequence[Any], base: Any | None, statistics: Sequence[Any] | None
) -> list[tuple[torch.Tensor, list[Any], Any | None, list[Any] | None]] | None:
    """For a vocabulary tensor whose rows are not all held by every model: the blocks it is merged in, each as
    (output rows, readers of those rows, base of those rows, statistics of those rows); `None` otherwise (the
    tensor is merged whole)."""
    first = readers[0]
    if not isinstance(first, AlignedReader) or name not in first.alignment.names:
        return None
    alignment = first.alignment
    if len(alignment.shared) in (0, alignment.rows):
        return None
    blocks = []
    for rows in (alignment.shared, alignment.rest):
        blocks.append(
            (
                rows,
                [_Rows(reader, rows, alignment.rows) for reader in readers],
                _Rows(base, rows, alignment.rows) if base is not None else None,
                [_Rows(h, rows, alignment.rows) for h in statistics] if statistics is not None else None,
            )
        )
    return blocks
