"""The kitchen: ONE resident model, built once through accelerate, whose weights are overwritten in place.

The model is made on the meta device (`init_empty_weights`), placed with a device map (`"auto"`, an explicit map,
and/or `max_memory`; modules that do not fit go to a disk offload folder owned by the kitchen), and dispatched with
`dispatch_model`. Writing a candidate soup never re-instantiates anything: resident tensors are `copy_`'d, and
disk-offloaded tensors are written into the kitchen's own memory-mapped offload files, which accelerate's hooks
read at every forward. Ingredient files are never written to.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import SoupError, first_line
from .tasks import Task


class Kitchen:
    """One resident model for scoring candidate soups.

    Args:
        folder (`str` or `Path`): a model folder whose `config.json` describes the architecture (the first
            ingredient or the base model). Its weights are NOT loaded: call `write` / `load` with the candidate.
        task (`Task`): gives the Auto class.
        device_map (`str` or `dict`, *optional*, defaults to `"auto"`): `"auto"` (accelerate's
            `infer_auto_device_map`, all on the CPU when there is no GPU and no `max_memory`), `"cpu"`, `"cuda"`, or
            an explicit `{module: device}` map whose devices may include `"cpu"` and `"disk"`.
        max_memory (`dict`, *optional*): e.g. `{0: "10GiB", "cpu": "30GiB"}`; what does not fit is offloaded to disk.
        offload_folder (`str`, *optional*): where the kitchen makes its own offload folder (default: a temp dir).
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): dtype of the resident weights (kept as
            `kitchen.dtype`); candidates are written into them cast from the fp32 soup, never read back.
        config_overrides (`dict`, *optional*): config attributes that differ from `folder`'s, e.g. the `vocab_size`
            of a soup whose vocabulary is the union of the ingredients' (`hf_soup.vocabulary`).

    Example:

    ```python
    >>> kitchen = Kitchen("runs/a/best", get_task("sequence-classification"), max_memory={"cpu": "200MB"})
    >>> kitchen.load(reader.get(name) for name in reader.names())   # or kitchen.write(name, tensor) per tensor
    >>> scorer.score(kitchen.model, "validation")
    ```
    """

    def __init__(
        self,
        folder: str | Path,
        task: Task,
        *,
        device_map: str | Mapping[str, Any] | None = "auto",
        max_memory: Mapping[Any, Any] | None = None,
        offload_folder: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        config_overrides: Mapping[str, Any] | None = None,
    ):
        from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
        from accelerate.utils import (
            find_tied_parameters,
            offload_weight,
            save_offload_index,
            set_module_tensor_to_device,
        )
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, **(config_overrides or {}))
        task.check_config(config)
        with init_empty_weights():
            try:
                model = task.model_class().from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
            except ValueError as error:  # transformers: "Unrecognized configuration class ... for this AutoModel"
                raise SoupError(
                    f"task {task.name!r} scores {task.auto_class} models, which cannot be built from {folder}'s "
                    f"{config.model_type!r} config ({first_line(error, 120)}); set evaluation.task to the model's task"
                ) from None
        model.eval()
        model.tie_weights()
        tied = find_tied_parameters(model)
        if device_map in (None, "auto"):
            if max_memory is None and not torch.cuda.is_available():
                device_map = {"": "cpu"}
            else:
                device_map = infer_auto_device_map(
                    model,
                    max_memory=dict(max_memory) if max_memory else None,
                    no_split_module_classes=getattr(model, "_no_split_modules", None) or [],
                    dtype=dtype,
                )
        elif isinstance(device_map, str):
            device_map = {"": device_map}
        device_map = dict(device_map)
        offload_root = None
        index: dict[str, Any] = {}
        tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        for name, tensor in tensors:  # tied names each get their place; `write` fills all names of a tie group
            if tensor.device.type != "meta" and _device_of(name, device_map) != "disk":
                continue
            device = _device_of(name, device_map)
            empty = torch.zeros(tensor.shape, dtype=tensor.dtype)
            if device == "disk":
                if offload_root is None:
                    parent = Path(offload_folder) if offload_folder else None
                    if parent is not None:
                        parent.mkdir(parents=True, exist_ok=True)
                    offload_root = Path(tempfile.mkdtemp(prefix="hf_soup-offload-", dir=parent))
                offload_weight(empty, name, str(offload_root), index=index)
            else:
                set_module_tensor_to_device(model, name, device, value=empty)
        if offload_root is not None:
            save_offload_index(index, str(offload_root))
        model.tie_weights()
        if len(set(device_map.values())) > 1 or "disk" in device_map.values():
            model = dispatch_model(model, device_map, offload_dir=str(offload_root) if offload_root else None)
        elif next(iter(device_map.values())) != "cpu":
            model.to(next(iter(device_map.values())))
        self._settle(model, tied, device_map, offload_root, index)
        self.dtype = dtype

    @classmethod
    def around(cls, model: torch.nn.Module) -> Kitchen:
        """A kitchen whose resident model is one that already exists (a `Trainer`'s): candidates are written into
        its weights in place, where they are; nothing is built, placed or offloaded."""
        from accelerate.utils import find_tied_parameters

        kitchen = cls.__new__(cls)
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        kitchen._settle(model, find_tied_parameters(model), {"": str(device)}, None, {})
        kitchen.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return kitchen

    def _settle(self, model, tied: list[list[str]], device_map: dict, offload_root: Path | None, index: dict) -> None:
        """Hold `model` and find where each of its tensors lives (resident, in an accelerate weights map, on disk)."""
        self.model = model
        # names that share one tensor (tied embeddings): a write to one is a write to all
        self._tied = {name: group for group in tied for name in group}
        self.device_map = device_map
        self._offload_root = offload_root
        self._offload_index = index
        self._targets = self._find_targets()

    @property
    def offloaded(self) -> bool:
        """Whether some weights live in the disk offload folder."""
        return bool(self._offload_index)

    def _find_targets(self) -> dict[str, Any]:
        targets: dict[str, Any] = {}
        for name in self.model.state_dict(keep_vars=True):
            module_name, _, attribute = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            tensor = getattr(module, attribute)
            if tensor.device.type != "meta":
                targets[name] = tensor
            elif name in self._offload_index:
                targets[name] = ("disk", name)
            else:
                hook = getattr(module, "_hf_hook", None)
                weights = getattr(getattr(hook, "weights_map", None), "dataset", None)
                state = getattr(weights, "state_dict", {}) or {}
                if name in state:
                    targets[name] = state[name]
                elif not any(other in self._offload_index for other in self._tied.get(name, [])):
                    raise SoupError(f"cannot find where accelerate keeps offloaded tensor {name}")
        return targets

    def tied(self, name: str) -> list[str]:
        """Every name that shares `name`'s tensor (tied embeddings), `name` included; a write to one is a write to
        all."""
        return list(self._tied.get(name, [name]))

    def names(self) -> list[str]:
        """Tensor names the kitchen accepts (the model's state dict, tied names included)."""
        return list(self._targets)

    @torch.no_grad()
    def write(self, name: str, value: torch.Tensor) -> None:
        """Overwrite one tensor of the resident model in place (cast to its dtype and device)."""
        for tied in self._tied.get(name, [name]):
            if tied in self._targets or tied == name:
                self._write_one(tied, value)

    def _write_one(self, name: str, value: torch.Tensor) -> None:
        target = self._targets.get(name)
        if target is None:
            raise SoupError(
                f"tensor {name} of the ingredients has no place in the {type(self.model).__name__} built from the "
                "config; the ingredients and the task (evaluation.task) must describe the same model"
            )
        if isinstance(target, tuple):
            info = self._offload_index[name]
            value = value.to(torch.bfloat16 if info["dtype"] == "bfloat16" else getattr(torch, info["dtype"]))
            if info["dtype"] == "bfloat16":
                value = value.view(torch.int16)
            array = np.memmap(
                self._offload_root / f"{name}.dat",
                dtype=str(value.numpy().dtype),
                mode="r+",
                shape=tuple(info["shape"]) or (1,),
            )
            array[:] = value.reshape(array.shape).numpy()
            array.flush()
            return
        if tuple(target.shape) != tuple(value.shape):
            raise SoupError(
                f"tensor {name}: ingredients have shape {list(value.shape)}, model has {list(target.shape)}"
            )
        target.copy_(value)

    def parameter(self, name: str) -> torch.Tensor | None:
        """The resident tensor of `name` (`None` when it is offloaded to disk)."""
        target = self._targets.get(name)
        return None if target is None or isinstance(target, tuple) else target

    def load(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Write a whole candidate, tensor by tensor, and check that every weight of the model was written."""
        written = set()
        for name, tensor in tensors:
            self.write(name, tensor)
            written.add(name)
        self.check_covered(written)

    def check_covered(self, written: set[str]) -> None:
        """Raise when a weight of the model (not tied to a written one) received no tensor."""
        written = {tied for name in written for tied in self._tied.get(name, [name])}
        seen = {id(t) for n, t in self._targets.items() if n in written and not isinstance(t, tuple)}
        missing = [
            name
            for name in self.model.state_dict()
            if name not in written
            and name in self._targets
            and (isinstance(self._targets[name], tuple) or id(self._targets[name]) not in seen)
        ]
        if missing:
            raise SoupError(
                f"the ingredients have no tensor for {', '.join(missing[:3])}"
                + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
                + "; they do not match the model the task builds"
            )

    def close(self) -> None:
        """Remove the kitchen's offload folder."""
        if self._offload_root is not None:
            shutil.rmtree(self._offload_root, ignore_errors=True)
            self._offload_root = None

    def __enter__(self) -> Kitchen:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _device_of(name: str, device_map: Mapping[str, Any]) -> Any:
    """The device of a tensor: the longest device-map prefix that contains it."""
    best, device = -1, None
    for prefix, value in device_map.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if len(prefix) > best:
                best, device = len(prefix), value
    if device is None:
        raise SoupError(f"device_map does not place {name}; add its module (or '') to the map")
    return device
