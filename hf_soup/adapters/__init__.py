"""Soups of peft LoRA adapters trained from one base, exact and in adapter space.

The soup of adapters i = 1..k with weights wᵢ (Σ wᵢ = 1) is, for every LoRA module,

    ΔW = Σᵢ wᵢ sᵢ Bᵢ Aᵢ,   sᵢ = lora_alpha / r  (lora_alpha / √r with rsLoRA),

which is exactly the soup of the k merged models ([LoRA](https://arxiv.org/abs/2106.09685),
[rsLoRA](https://arxiv.org/abs/2312.03732)). Averaging A and B separately, as peft's
`add_weighted_adapter(combination_type="linear")` and LoraHub do, gives (Σ wᵢ Bᵢ)(Σ wᵢ Aᵢ) with cross terms instead
(peft issues [#2796](https://github.com/huggingface/peft/issues/2796),
[#2918](https://github.com/huggingface/peft/issues/2918), [#3004](https://github.com/huggingface/peft/issues/3004),
[#3761](https://github.com/huggingface/peft/issues/3761)); it is offered only as the named approximation `naive`,
with its error reported.

Outputs (`adapter_output`): `concat` (exact, rank Σ rᵢ, loads with `PeftModel.from_pretrained`), `svd` (rank `rank`,
relative Frobenius error per module and overall), `merged` (a full model, streamed from the base checkpoint), `naive`.
Greedy and learned soups score adapters on one base model holding all k adapters (`AdapterTasting`).

Example:

```python
>>> from hf_soup import SoupBuilder
>>> soup = SoupBuilder(["runs/lora-a", "runs/lora-b"], method="uniform", adapter_output="svd", rank=16).cook("soup")
>>> soup.record["relative_error"]
```
"""

from .algebra import concat_factors, delta_weight, naive_factors, norm_squared, truncated_svd
from .cooking import cook_adapters
from .reading import Adapter, LoraModule, check_same_base, check_soupable, read_adapter, resolve_base
from .tasting import AdapterTasting
from .writing import OUTPUTS, unit_names, write_adapter, write_merged

__all__ = [
    "OUTPUTS",
    "Adapter",
    "AdapterTasting",
    "LoraModule",
    "check_same_base",
    "check_soupable",
    "concat_factors",
    "cook_adapters",
    "delta_weight",
    "naive_factors",
    "norm_squared",
    "read_adapter",
    "resolve_base",
    "truncated_svd",
    "unit_names",
    "write_adapter",
    "write_merged",
]
