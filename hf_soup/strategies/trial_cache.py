"""The search's trial cache: what a TIES or DARE trial does not change, kept between trials within a memory budget.

A TIES trial changes the density and the scale; the task vectors, the order of their entries by magnitude and —
with the weights and the sign rule fixed — every disjoint merge a density can give stay the same
(`hf_soup.methods.ties.trim_states`), so a trial only counts, per entry, the ingredients its density keeps. A
DARE trial keeps the task vectors and the random draws (the method's own, seeded by the recipe's seed and the
tensor name). Every tensor is bit-identical to the method's (`merge_tensor`). Tensors that do not fit in the budget
are recomputed in every trial, and the search's record says how many.

```yaml
method: search
merge: ties
space: {density: {low: 0.1, high: 1.0}, scale: {low: 0.5, high: 2.0}}
cache: auto          # half the available memory (the default); off, or a size: 4GB, 500MiB
```
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..checkpoint import FLOAT_DTYPES, CheckpointReader, parse_size
from ..errors import SoupError, brief
from ..merge import check_finite, is_finite, tensor_generator
from ..methods import Method
from ..methods.dare import dare_combine
from ..methods.sparsify import (
    disjoint_merge,
    draws,
    keep_ranked,
    kept_count,
    magnitude_ranks,
    rescale_kept,
    task_vectors,
    weights_or_ones,
)
from ..methods.ties import merged_at, trim_states

logger = logging.getLogger(__name__)

CACHED_METHODS = ("ties", "dare")
UNKNOWN_MEMORY = 2**30  # the budget of `auto` where the available memory cannot be read
WHAT = {
    "trims": "every TIES merge a density can give (trim states)",
    "ranks": "task vectors and their magnitude order",
    "draws": "task vectors and DARE's random draws",
}


def parse_cache(value: Any) -> str | int:
    """A search's `cache:` setting: `"auto"`, `"off"` or a size in bytes (YAML's `off`/`on` read as booleans)."""
    if value is True or value == "auto":
        return "auto"
    if value is False or value == "off":
        return "off"
    try:
        if not isinstance(value, (str, int)):
            raise SoupError(f"a size is bytes (an integer) or a string like '4GB', not {type(value).__name__}")
        return parse_size(value)
    except SoupError as error:
        raise SoupError(
            f"search: cache must be auto (half the available memory), off, or the memory kept between trials as a "
            f"size like '4GB'; got {brief(value, 40)}: {error}"
        ) from None


def available_memory() -> int | None:
    """Bytes of memory available now (psutil when installed; else the free pages, which leave out the page cache)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def cache_budget(setting: str | int, processes: int = 1) -> int:
    """The bytes a setting of `parse_cache` allows each of `processes` processes on this machine."""
    if setting == "off":
        return 0
    if setting != "auto":
        return int(setting)
    available = available_memory()
    return (available // 2 if available is not None else UNKNOWN_MEMORY) // max(processes, 1)


class TrialCache:
    """What the trials of a TIES or DARE search share, per tensor name (build it with `TrialCache.build`).

    `merge(name, parameters)` gives the tensor a trial's parameters make, bit-identical to `merge_tensor`, or
    `None` for a tensor that is not cached (the caller merges it); `record()` says what was kept.
    """

    def __init__(self, method: Method, readers: Sequence[CheckpointReader], base: CheckpointReader, held: dict):
        self.method, self.readers, self.base, self.held = method, list(readers), base, held
        self.kind = "draws" if method.name == "dare" else "ranks"
        if method.name == "ties" and {"weights", "majority_sign"} <= set(held):
            self.kind = "trims"
        self.entries: dict[str, tuple[Any, ...]] = {}  # name → tensors, or (lists of tensors, one per ingredient)
        self.setting: str | int = "off"
        self.budget = self.used = self.unfit = 0  # unfit: tensors left out for the budget
        self.unusable: list[str] = []  # tensors left out because an ingredient or the base holds NaN or Inf there
        self.seconds = 0.0

    @classmethod
    def build(
        cls,
        method: Method,
        readers: Sequence[CheckpointReader],
        base: CheckpointReader | None,
        held: Mapping[str, Any],
        *,
        setting: Any,
        seed: int,
        processes: int = 1,
    ) -> TrialCache | None:
        """Fill a cache for a search of `method` (None for methods it does not serve) within the budget of
        `setting` (the recipe's `cache:`), tensor by tensor in checkpoint order; `held` are the parameters no trial
        changes."""
        if method.name not in CACHED_METHODS or base is None:
            return None
        cache = cls(method, readers, base, dict(held))
        parsed = parse_cache(setting)
        cache.setting = parsed if isinstance(parsed, str) else setting  # as the recipe wrote it: 4GB
        cache.budget = cache_budget(parsed, processes)
        started = time.perf_counter()
        for name in readers[0].names():
            info = readers[0].info(name)
            numel = math.prod(info.shape)
            if info.dtype not in FLOAT_DTYPES or numel == 0:
                continue
            if cache.used + cache.size(numel) > cache.budget:
                cache.unfit += 1
            elif cache.add(name, seed):
                cache.used += _nbytes(cache.entries[name])
            else:
                cache.unusable.append(name)
        cache.seconds = time.perf_counter() - started
        if cache.note() and parsed != "off":
            logger.warning(cache.note())
        logger.info("search cache: %s for %d tensors (%.2f GB) in %.1f s", WHAT[cache.kind], len(cache.entries),
                    cache.used / 1e9, cache.seconds)  # fmt: skip
        return cache

    def size(self, numel: int) -> int:
        """Bytes one tensor of `numel` entries takes in the cache."""
        count, rank = len(self.readers), 4 if numel < 2**31 else 8
        per_entry = {"trims": count * rank + (count + 1) * 4, "ranks": count * (4 + rank), "draws": count * 8}
        return numel * per_entry[self.kind]

    def add(self, name: str, seed: int) -> bool:
        """Cache tensor `name`; False (and nothing kept) when an ingredient or the base holds NaN or Inf there (the
        engine then names it in every trial)."""
        base = self.base.get(name).float()
        taus = task_vectors([reader.get(name).float() for reader in self.readers], base)
        if not all(is_finite(tau) for tau in taus):
            return False
        if self.kind == "trims":
            weights = weights_or_ones(self.held["weights"], len(taus))
            joins, merged = trim_states(taus, weights, self.held["majority_sign"])
            if not is_finite(merged):
                return False
            self.entries[name] = (joins, merged)
        elif self.kind == "ranks":
            self.entries[name] = ([tau.flatten() for tau in taus], [magnitude_ranks(tau) for tau in taus])
        else:
            generator = tensor_generator(seed, name)  # as `merge_tensor` gives it to the method
            self.entries[name] = (taus, [draws(tau, generator) for tau in taus])
        return True

    def merge(self, name: str, parameters: Mapping[str, Any] | Callable[[str], Mapping]) -> torch.Tensor | None:
        """Tensor `name` of the soup a trial's `parameters` make (fp32), or None when it is not cached."""
        entry = self.entries.get(name)
        if entry is None:
            return None
        values = parameters(name) if callable(parameters) else parameters
        if any(values[key] != held for key, held in self.held.items() if key in ("weights", "majority_sign")):
            return None  # not the parameters the cache was built for
        base = self.base.get(name).float()
        if self.kind == "draws":
            weights = weights_or_ones(values["weights"], len(self.readers))
            taus = [rescale_kept(tau, values["drop_rate"], uniform) for tau, uniform in zip(*entry)]
            out = dare_combine(taus, base, weights, values["merge"], values["majority_sign"], values["scale"])
            return check_finite(out, name, self.method)
        keep = kept_count(values["density"], base.numel())
        if self.kind == "trims":
            merged = merged_at(*entry, keep)
        else:
            weights = weights_or_ones(values["weights"], len(self.readers))
            trimmed = [keep_ranked(tau, ranks, keep) for tau, ranks in zip(*entry)]
            merged = disjoint_merge(trimmed, weights, values["majority_sign"])
        return check_finite((base.flatten() + values["scale"] * merged).view_as(base), name, self.method)

    def note(self) -> str | None:
        """What was not cached, and how to cache it (None when everything was)."""
        if self.setting == "off":
            return "cache: off: every tensor is recomputed in every trial"
        notes = []
        if self.unfit:
            total = len(self.entries) + self.unfit + len(self.unusable)
            notes.append(
                f"search cache: {total - self.unfit} of {total} tensors fit in the budget ({self.budget / 1e9:.2f} "
                f"GB, cache: {self.setting}); the other {self.unfit} are recomputed in every trial, which is slower "
                "and gives the same soups; raise `cache:` to keep them all"
            )
        if self.unusable:
            notes.append(
                f"search cache: {len(self.unusable)} tensors ({', '.join(self.unusable[:3])}"
                f"{', ...' if len(self.unusable) > 3 else ''}) hold NaN or Inf in an ingredient or the base and are "
                "recomputed in every trial"
            )
        return "; ".join(notes) or None

    def record(self) -> dict[str, Any]:
        """What the cache kept, for the search's record in `soup.json`."""
        return {
            "setting": self.setting,
            "kept": WHAT[self.kind],
            "budget_bytes": self.budget,
            "bytes": self.used,
            "cached_tensors": len(self.entries),
            "recomputed_tensors": self.unfit + len(self.unusable),
            "seconds": self.seconds,
            "note": self.note(),
        }


def _nbytes(entry: tuple[Any, ...]) -> int:
    return sum(t.nbytes for part in entry for t in (part if isinstance(part, list) else [part]))
