"""Tasting adapter soups without merging them into k full models: ONE base model holding all k adapters.

A candidate soup is, per LoRA module, W + Σᵢ wᵢ sᵢ Bᵢ Aᵢ (a module an adapter does not target has no term). Each
module tastes it one of two ways, chosen by cost (`hf_soup.adapters.mixing`) and recorded in the report:

- in place: ΔW = Σᵢ wᵢ sᵢ Bᵢ Aᵢ is formed once per candidate and W + ΔW written into the base weight, from an exact
  copy of W kept from the base checkpoint; the adapter's branches are switched off, so a forward pass costs what a
  full model's costs;
- branches: the LoRA layer computes W x + Σᵢ cᵢ Bᵢ Aᵢ x with its per-adapter scaling set to cᵢ = wᵢ sᵢ.

Full tensors (`modules_to_save`) are mixed into one resident copy. Memory is the base model, k adapters and the copy
of the weights LoRA targets; nothing is streamed or merged into full models.

Learned soups need ∂L/∂α[g, i]: in place it is ⟨∂L/∂W, sᵢ Bᵢ Aᵢ⟩ from the base weight's gradient; with branches the
scalings are made differentiable tensors cᵢ = α[g, i] sᵢ and one backward pass gives it; for full tensors it is
⟨∂L/∂H, Hᵢ⟩ as for full models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointReader
from ..errors import SoupError
from ..ingredient import Ingredient
from ..kitchen import Kitchen
from ..scoring import Scorer
from ..strategies.tasting import Coefficients, Tasting
from ..tasks import column_lengths
from .mixing import ModuleShape, check_mixing, plan
from .reading import PREFIX, Adapter

WeightOf = Callable[[str, int], Any]  # (unit, adapter index) → its weight: a float, or a differentiable 0-d tensor


class AdapterTasting(Tasting):
    """The `Tasting` interface over LoRA adapters of one base (see `hf_soup.strategies.tasting.Tasting`).

    Args:
        ingredients (`list[Ingredient]`), adapters (`list[Adapter]`): in recipe order.
        base_folder (`Path`): the base model folder (config + weights).
        scorer (`Scorer`), split (`str`), reuse_recorded (`bool`): as for `Tasting`.
        device_map, max_memory, offload_folder, dtype, trust_remote_code: where the base model lives and in which
            dtype (see `Kitchen`); it must be resident (no disk offload).
        mixing (`str`, *optional*, defaults to `"auto"`): how each LoRA module tastes a soup: the cheaper way per
            module (`"auto"`), `"in_place"` wherever the base weight allows it, or `"branches"` everywhere (see
            `hf_soup.adapters.mixing`).

    Example:

    ```python
    >>> tasting = AdapterTasting(ingredients, adapters, Path("base"), scorer, "validation")
    >>> tasting.taste([0.5, 0.5, 0.0])   # the soup of the first two adapters, scored without merging
    >>> tasting.summary()["adapter_mixing"]["scoring"]["in_place"]   # LoRA modules that tasted it in place
    ```

    It supports `"mix"` and `"backward"`, not `"apply"` (see `Tasting.supports`): a soup that is not a linear
    combination of the adapters (ties, dare, slerp, ...) has no form in adapter space.
    """

    capabilities = frozenset({"mix", "backward"})
    lacking = {
        "apply": "adapter ingredients are tasted in adapter space, where only linear soups can be tasted; use "
        "weighted or uniform-family methods over adapters, or merge the adapters into full models first"
    }

    def __init__(
        self,
        ingredients: Sequence[Ingredient],
        adapters: Sequence[Adapter],
        base_folder: Path,
        scorer: Scorer,
        split: str,
        *,
        reuse_recorded: bool = True,
        device_map=None,
        max_memory=None,
        offload_folder=None,
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        mixing: str = "auto",
    ):
        from peft import PeftModel

        check_mixing(mixing)
        kitchen = Kitchen(
            base_folder,
            scorer.task,
            device_map=device_map or "auto",
            max_memory=max_memory,
            offload_folder=offload_folder,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
        try:
            if kitchen.offloaded:
                raise SoupError("adapter soups are tasted on a resident base model: give a device_map without disk")
            with CheckpointReader(base_folder, label="base_model") as reader:
                kitchen.load((name, reader.get(name)) for name in reader.names())
                self.adapter_names = [f"soup{i}" for i in range(len(adapters))]
                peft_model = PeftModel.from_pretrained(
                    kitchen.model, str(adapters[0].folder), adapter_name=self.adapter_names[0], is_trainable=False
                )
                for adapter, name in zip(adapters[1:], self.adapter_names[1:]):
                    peft_model.load_adapter(str(adapter.folder), adapter_name=name, is_trainable=False)
                self._find_units(peft_model, kitchen, reader)
        except BaseException:
            kitchen.close()
            raise
        super().__init__(
            ingredients, [a.reader for a in adapters], kitchen, scorer, split, reuse_recorded=reuse_recorded
        )
        self.adapters = list(adapters)
        self.peft_model = peft_model
        self.mixing = mixing
        self.in_place, scoring = plan(self.shapes, _split_tokens(scorer, split), learning=False, mixing=mixing)
        self.learning_in_place: set[str] | None = None  # planned at the first backward step, from its batch
        self.plans: dict[str, Any] = {"mixing": mixing, "scoring": scoring, "learning": None}
        self.written: set[str] = set()  # modules whose base weight holds a soup, not W

    def _find_units(self, peft_model, kitchen: Kitchen, reader: CheckpointReader) -> None:
        """The LoRA modules (with their scalings, shapes and, where the soup can be written in place, the exact base
        weight W from the checkpoint) and the full tensors of `modules_to_save` (with each adapter's copy)."""
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.layer import Conv1d, Conv2d, Conv3d, Embedding, Linear
        from peft.utils import ModulesToSaveWrapper

        self.layers: dict[str, LoraLayer] = {}
        self.scalings: dict[str, dict[str, float]] = {}  # module → adapter name → its own scaling sᵢ
        self.shapes: dict[str, ModuleShape] = {}
        self.bases: dict[str, tuple[str, torch.Tensor]] = {}  # module → (its weight's name, W) for in-place soups
        self.heads: dict[str, tuple[torch.nn.Parameter, list[torch.Tensor]]] = {}  # tensor → (slot, [H₁ … Hₖ])
        for module_name, module in peft_model.named_modules():
            name = module_name.removeprefix(PREFIX)
            if isinstance(module, LoraLayer):
                self.layers[name] = module
                self.scalings[name] = {a: float(module.scaling[a]) for a in self.adapter_names if a in module.scaling}
                weight = getattr(module.get_base_layer(), "weight", None)
                key = f"{name}.weight"
                writable = (
                    isinstance(module, (Linear, Embedding, Conv1d, Conv2d, Conv3d))
                    and not module.lora_variant
                    and weight is not None
                    and kitchen.parameter(key) is weight
                    and kitchen.tied(key) == [key]
                    and key in reader.names()
                )
                if writable:
                    self.bases[name] = (key, reader.get(key).to(device=weight.device, copy=True))
                reads, out = _branch_widths(weight, embedding=isinstance(module, Embedding))
                self.shapes[name] = ModuleShape(
                    entries=weight.numel() if weight is not None else 0,
                    branch=reads + out,
                    rank=sum(int(module.r[a]) for a in self.scalings[name]),
                    adapters=len(self.scalings[name]),
                    out=out,
                    in_place=writable,
                )
            elif isinstance(module, ModulesToSaveWrapper):
                slot = next(a for a in self.adapter_names if a in module.modules_to_save)
                module.set_adapter(slot, inference_mode=True)
                copies = module.modules_to_save
                for key, parameter in copies[slot].named_parameters():
                    values = []  # each adapter's own copy (the base's when it has none); the slot's is cloned
                    for adapter in self.adapter_names:
                        owner = copies[adapter] if adapter in copies else module.original_module
                        value = dict(owner.named_parameters())[key].detach()
                        values.append(value.clone() if owner is copies[slot] else value)
                    self.heads[f"{name}.{key}"] = (parameter, values)
        for parameter in peft_model.parameters():
            parameter.requires_grad_(False)

    def close(self) -> None:
        self.kitchen.close()

    def __enter__(self) -> AdapterTasting:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def summary(self) -> dict[str, Any]:
        """What the report records about this tasting: the resident dtype and how the LoRA modules tasted the soups
        (`adapter_mixing`: per purpose, modules in place and with branches, the tokens the choice assumed and the
        multiply-adds planned, against all branches)."""
        return {**super().summary(), "adapter_mixing": self.plans}

    # -- applying a soup ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _delta(self, name: str, weight_of: WeightOf) -> torch.Tensor:
        """ΔW = Σᵢ wᵢ sᵢ Bᵢ Aᵢ of module `name` in fp32, in the base weight's layout (peft's `get_delta_weight`)."""
        layer = self.layers[name]
        key, base = self.bases[name]
        delta = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
        for i, adapter in enumerate(self.adapter_names):
            weight = float(weight_of(name, i)) if adapter in self.scalings[name] else 0.0
            if weight != 0.0:
                layer.scaling[adapter] = self.scalings[name][adapter]
                delta.add_(layer.get_delta_weight(adapter).float(), alpha=weight)
        return delta

    def _write(self, name: str, weight_of: WeightOf | None) -> None:
        """Write W + ΔW (or W itself, `weight_of=None`) into module `name`'s base weight; its branches go off."""
        key, base = self.bases[name]
        if weight_of is None:
            if name in self.written:
                self.kitchen.write(key, base)
                self.written.discard(name)
            return
        self.kitchen.write(key, self._delta(name, weight_of).add_(base))
        self.written.add(name)
        self.layers[name].set_adapter([], inference_mode=True)

    def _set(self, weight_of: WeightOf, in_place: set[str], *, keep_zero: bool = False) -> None:
        """Apply the soup with adapter weights `weight_of(unit, i)` to every LoRA module: written in place for the
        modules in `in_place`, else by scaling each branch by wᵢ sᵢ (`keep_zero`: keep zero-weight branches on)."""
        for name, layer in self.layers.items():
            if name in in_place:
                self._write(name, weight_of)
                continue
            if name in self.bases:
                self._write(name, None)  # W again, for the branches to add to
            active = []
            for i, adapter in enumerate(self.adapter_names):
                if adapter not in self.scalings[name]:
                    continue
                weight = weight_of(name, i)
                if keep_zero or (float(weight) != 0.0):
                    layer.scaling[adapter] = weight * self.scalings[name][adapter]
                    active.append(adapter)
            layer.set_adapter(active, inference_mode=True)

    @torch.no_grad()
    def _mix_heads(self, weight_of: WeightOf) -> None:
        for name, (slot, values) in self.heads.items():
            out = torch.zeros(values[0].shape, dtype=torch.float32, device=values[0].device)
            for i, value in enumerate(values):
                weight = float(weight_of(name, i))
                if weight != 0.0:
                    out.add_(value.float(), alpha=weight)
            slot.copy_(out)

    # -- the Tasting interface ------------------------------------------------------------------------------------
    def mix(self, coefficients: Coefficients) -> None:
        """Weight adapter i by cᵢ (per LoRA module or full tensor when `coefficients` is a function of the name)."""
        if callable(coefficients):
            cache: dict[str, list[float]] = {}

            def weight_of(name: str, i: int) -> float:
                if name not in cache:
                    cache[name] = [float(c) for c in coefficients(name)]
                return cache[name][i]
        else:
            values = [float(c) for c in coefficients]

            def weight_of(name: str, i: int) -> float:
                return values[i]

        self._set(weight_of, self.in_place)
        self._mix_heads(weight_of)

    def load_ingredient(self, index: int) -> None:
        """Only adapter `index`, at its own scaling."""
        self.mix([1.0 if i == index else 0.0 for i in range(self.count)])

    def taste_uniform(self, members: Sequence[int]) -> float:
        """Score the uniform soup of `members`: each gets weight 1/n (no running sum needed)."""
        members = set(members)
        return self.taste([1.0 / len(members) if i in members else 0.0 for i in range(self.count)])

    def groups(self, granularity: str) -> dict[str, int]:
        """Which coefficient row each LoRA module and each full tensor uses: its own (`"layer"`) or one
        (`"global"`)."""
        units = [*self.layers, *self.heads]
        return {name: (i if granularity == "layer" else 0) for i, name in enumerate(units)}

    def backward(
        self, alpha: torch.Tensor, groups: dict[str, int], batch: dict[str, torch.Tensor], beta: torch.Tensor
    ) -> tuple[float, torch.Tensor]:
        """Loss of the soup with coefficients α[g(unit), i] on `batch` (logits × `beta`, whose gradient accumulates),
        and ∂loss/∂α: ⟨∂loss/∂W, sᵢ Bᵢ Aᵢ⟩ for LoRA modules tasted in place, through the scalings (autograd) for
        those with branches, ⟨∂loss/∂H, Hᵢ⟩ for full tensors."""
        if self.learning_in_place is None:
            tokens = batch["input_ids"].numel() if "input_ids" in batch else len(batch["labels"])
            self.learning_in_place, self.plans["learning"] = plan(
                self.shapes, int(tokens), learning=True, mixing=self.mixing
            )
        in_place = self.learning_in_place
        leaf = alpha.detach().clone().requires_grad_(True)
        self._set(lambda name, i: (alpha if name in in_place else leaf)[groups[name], i], in_place, keep_zero=True)
        self._mix_heads(lambda name, i: alpha[groups[name], i])
        trained = [slot for slot, _ in self.heads.values()]
        trained += [self.kitchen.parameter(self.bases[name][0]) for name in in_place]
        for parameter in trained:
            parameter.requires_grad_(True)
            parameter.grad = None
        model = self.kitchen.model
        logits = self.scorer.task.training_outputs(model, batch) * beta
        loss = self.scorer.task.training_loss(logits, batch["labels"].to(logits.device), self.scorer.causal)
        loss.backward()
        dots = leaf.grad.clone() if leaf.grad is not None else torch.zeros(alpha.shape)
        with torch.no_grad():
            for name in in_place:
                gradient = self.kitchen.parameter(self.bases[name][0]).grad
                if gradient is None:
                    continue
                flat = gradient.float().reshape(-1)
                for i, adapter in enumerate(self.adapter_names):
                    if adapter in self.scalings[name]:
                        one = self._delta(name, lambda unit, j, i=i: 1.0 if j == i else 0.0)  # sᵢ Bᵢ Aᵢ
                        dots[groups[name], i] += torch.dot(flat, one.reshape(-1)).cpu()
            for name, (slot, values) in self.heads.items():
                if slot.grad is not None:
                    flat = slot.grad.float().reshape(-1)
                    for i, value in enumerate(values):
                        dots[groups[name], i] += torch.dot(flat, value.float().reshape(-1)).cpu()
        for parameter in trained:
            parameter.grad = None
            parameter.requires_grad_(False)
        for layer in self.layers.values():  # plain float scalings again: no graph kept alive
            for adapter in layer.active_adapters:
                value = layer.scaling[adapter]
                layer.scaling[adapter] = float(value.detach()) if isinstance(value, torch.Tensor) else value
        return loss.item(), dots


def _branch_widths(weight: torch.Tensor | None, *, embedding: bool) -> tuple[int, int]:
    """Multiply-adds per token of a rank-1 branch of a LoRA module, as (A's, B's): in features (× kernel size) and
    out features or channels; an embedding's A is a lookup (1) and its B writes the embedding's width."""
    if weight is None:
        return 0, 0
    if embedding:
        return 1, weight.shape[1]
    return weight[0].numel(), weight.shape[0]


def _split_tokens(scorer: Scorer, split: str) -> int:
    """The tokens of `split` (its rows when it holds no `input_ids`): what one formed soup is scored on."""
    data = scorer.split(split)
    lengths = column_lengths(data, "input_ids") if hasattr(data, "column_names") else None
    return int(sum(lengths)) if lengths else len(data)
