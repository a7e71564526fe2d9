"""Tasting adapter soups without merging: ONE base model holding all k adapters, weighted at forward time.

Each LoRA layer computes W x + Σᵢ cᵢ Bᵢ Aᵢ x with its per-adapter scaling set to cᵢ = wᵢ sᵢ, which is exactly the
merged soup W + Σᵢ wᵢ sᵢ Bᵢ Aᵢ (a module an adapter does not target has no term). Full tensors (`modules_to_save`)
are mixed into one resident copy. Memory is the base model plus k adapters; nothing is streamed or merged.

For learned soups the scalings are made differentiable tensors cᵢ = α[g, i] sᵢ, so one backward pass gives
∂L/∂α[g, i] for every LoRA module directly; for full tensors ∂L/∂α[g, i] = ⟨∂L/∂H, Hᵢ⟩ as for full models.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..checkpoint import CheckpointReader
from ..errors import SoupError
from ..ingredient import Ingredient
from ..kitchen import Kitchen
from ..scoring import Scorer
from ..strategies.tasting import Coefficients, Tasting
from .reading import PREFIX, Adapter


class AdapterTasting(Tasting):
    """The `Tasting` interface over LoRA adapters of one base (see `hf_soup.strategies.tasting.Tasting`).

    Args:
        ingredients (`list[Ingredient]`), adapters (`list[Adapter]`): in recipe order.
        base_folder (`Path`): the base model folder (config + weights).
        scorer (`Scorer`), split (`str`), reuse_recorded (`bool`): as for `Tasting`.
        device_map, max_memory, offload_folder, trust_remote_code: where the base model lives (see `Kitchen`); it
            must be resident (no disk offload).

    Example:

    ```python
    >>> tasting = AdapterTasting(ingredients, adapters, Path("base"), scorer, "validation")
    >>> tasting.taste([0.5, 0.5, 0.0])   # the soup of the first two adapters, scored without merging
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
        trust_remote_code: bool = False,
    ):
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper

        kitchen = Kitchen(
            base_folder,
            scorer.task,
            device_map=device_map or "auto",
            max_memory=max_memory,
            offload_folder=offload_folder,
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
        except BaseException:
            kitchen.close()
            raise
        super().__init__(
            ingredients, [a.reader for a in adapters], kitchen, scorer, split, reuse_recorded=reuse_recorded
        )
        self.adapters = list(adapters)
        self.peft_model = peft_model
        self.layers: dict[str, LoraLayer] = {}
        self.scalings: dict[str, dict[str, float]] = {}  # module → adapter name → its own scaling sᵢ
        self.heads: dict[str, tuple[torch.nn.Parameter, list[torch.Tensor]]] = {}  # tensor → (slot, [H₁ … Hₖ])
        for module_name, module in peft_model.named_modules():
            name = module_name.removeprefix(PREFIX)
            if isinstance(module, LoraLayer):
                self.layers[name] = module
                self.scalings[name] = {a: float(module.scaling[a]) for a in self.adapter_names if a in module.scaling}
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

    # -- the Tasting interface ------------------------------------------------------------------------------------
    def _set(self, weight_of, *, keep_zero: bool = False) -> None:
        """Scale each layer's adapters by `weight_of(unit, i)` (a float or a differentiable 0-d tensor)."""
        for name, layer in self.layers.items():
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
    def _mix_heads(self, weight_of) -> None:
        for name, (slot, values) in self.heads.items():
            out = torch.zeros_like(values[0])
            for i, value in enumerate(values):
                weight = float(weight_of(name, i))
                if weight != 0.0:
                    out.add_(value, alpha=weight)
            slot.copy_(out)

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

        self._set(weight_of)
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
        and ∂loss/∂α: through the scalings for LoRA modules (autograd, no streaming), ⟨∂loss/∂H, Hᵢ⟩ for full
        tensors."""
        leaf = alpha.detach().clone().requires_grad_(True)
        self._set(lambda name, i: leaf[groups[name], i], keep_zero=True)
        self._mix_heads(lambda name, i: alpha[groups[name], i])
        for slot, _ in self.heads.values():
            slot.requires_grad_(True)
            slot.grad = None
        model = self.kitchen.model
        logits = self.scorer.task.training_outputs(model, batch) * beta
        loss = self.scorer.task.training_loss(logits, batch["labels"].to(logits.device), self.scorer.causal)
        loss.backward()
        dots = leaf.grad.clone() if leaf.grad is not None else torch.zeros(alpha.shape)
        for name, (slot, values) in self.heads.items():
            if slot.grad is not None:
                flat = slot.grad.detach().float().reshape(-1)
                for i, value in enumerate(values):
                    dots[groups[name], i] += torch.dot(flat, value.float().reshape(-1)).cpu()
            slot.grad = None
            slot.requires_grad_(False)
        self.mix(lambda name: alpha[groups[name]].tolist())  # plain float scalings again: no graph kept alive
        return loss.item(), dots
