"""The processes of a run under `accelerate launch` or torchrun: which one this is, and a call they make together.

Plain `torch.distributed`, as the Trainer (or accelerate) initialised it; when it is not initialised this is the one
process, and a call made together is an ordinary call.

Example:

```python
>>> result = call_together(cook, pantry)   # on every process: each gets the result, or each raises
```
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import SoupError, first_line


def rank() -> int:
    """This process's global rank (0: the main process, and the only one outside a distributed run)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gathered(value: Any) -> list[Any]:
    """Every process's `value` (picklable), in rank order: `[value]` alone. Every process must call it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def call_together(function: Callable[..., Any], *args: Any, problem: str | None = None) -> Any:
    """`function(*args)` on every process at once, after each has arrived (so what the main process wrote before
    is there for all); returns its result, or raises on every process, so that none is left waiting for another.

    Every process must call it. A process that passes `problem` (why it cannot go on) stops them all before
    `function` runs: each raises a `SoupError` naming it. A process whose `function` raises re-raises its error,
    and the others a `SoupError` naming the failed process and its message.
    """
    problems = [f"process {index}: {text}" for index, text in enumerate(gathered(problem)) if text]
    if problems:
        raise SoupError(f"not called, a process could not go on: {'; '.join(problems)}")
    try:
        result, failure = function(*args), None
    except Exception as error:
        result, failure = None, error
    failed = [(index, text) for index, text in enumerate(gathered(failure and first_line(failure))) if text]
    if failure is not None:
        raise failure
    if failed:
        index, text = failed[0]
        raise SoupError(f"process {index} failed ({text}); its log has the details")
    return result
