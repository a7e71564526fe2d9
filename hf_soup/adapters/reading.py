"""Reading peft LoRA adapter folders: modules, per-module scalings, full tensors, and what cannot be souped exactly.

A LoRA module adds ΔW = s · B A to a base weight W ([LoRA](https://arxiv.org/abs/2106.09685)), with the scaling
s = lora_alpha / r, or lora_alpha / √r with rsLoRA ([rsLoRA](https://arxiv.org/abs/2312.03732)); `rank_pattern` and
`alpha_pattern` give some modules their own r and alpha. The rank of each module is read from its tensors, the alpha
from the config, with peft's own pattern rule.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import FLOAT_DTYPES, CheckpointReader
from ..errors import SoupError
from ..ingredient import config_hash
from ..jsonfile import check_model_files, read_model_file

PREFIX = "base_model.model."
# suffix of a tensor key → (factor, module kind)
FACTORS = {
    ".lora_A.weight": ("A", "linear"),
    ".lora_B.weight": ("B", "linear"),
    ".lora_embedding_A": ("A", "embedding"),
    ".lora_embedding_B": ("B", "embedding"),
}
SAVED_BASE = ".base_layer.weight"  # peft saves the base embedding beside an embedding LoRA (save_embedding_layers)
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
MERGE_INSTEAD = (
    "merge each adapter into its own full model (PeftModel.merge_and_unload().save_pretrained(...)) and soup those "
    "models instead"
)


@dataclass
class LoraModule:
    """One LoRA module of an adapter.

    Attributes:
        name (`str`): the module's name in the base model, e.g. `"model.layers.0.self_attn.q_proj"`.
        a_key, b_key (`str`): the keys of A (r × in) and B (out × r) in the adapter file.
        rank (`int`): r, read from A.
        scaling (`float`): s = alpha / r, or alpha / √r with rsLoRA.
        kind (`str`): `"linear"`, `"embedding"` or `"conv"`.
        transposed (`bool`): the base weight holds ΔWᵀ (embeddings; `fan_in_fan_out` Conv1D layers).
    """

    name: str
    a_key: str
    b_key: str
    rank: int
    scaling: float
    kind: str
    transposed: bool


@dataclass
class Adapter:
    """A LoRA adapter folder, checked, with a lazy reader over its tensors.

    Attributes:
        label (`str`): the ingredient id (used in every message).
        folder (`Path`): the adapter folder.
        config (`dict`): its `adapter_config.json`.
        reader (`CheckpointReader`): its tensors.
        modules (`dict[str, LoraModule]`): LoRA modules by module name.
        full (`dict[str, str]`): full tensors (`modules_to_save`, e.g. a classifier head) by base tensor name → key.
        saved_base (`dict[str, str]`): copies of base weights peft saved beside the adapter, base name → key.
    """

    label: str
    folder: Path
    config: dict[str, Any]
    reader: CheckpointReader
    modules: dict[str, LoraModule] = field(default_factory=dict)
    full: dict[str, str] = field(default_factory=dict)
    saved_base: dict[str, str] = field(default_factory=dict)

    @property
    def base_name(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None

    def summary(self) -> dict[str, Any]:
        """What soup.json records of this adapter: ranks, alpha, rsLoRA, scalings."""
        ranks = sorted({m.rank for m in self.modules.values()})
        scalings = sorted({round(m.scaling, 8) for m in self.modules.values()})
        return {
            "ranks": ranks,
            "lora_alpha": self.config.get("lora_alpha"),
            "use_rslora": bool(self.config.get("use_rslora")),
            "scalings": scalings,
            "modules": len(self.modules),
            "full_tensors": sorted(self.full),
        }


def pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    """The `rank_pattern`/`alpha_pattern` key that applies to module `name` (peft's rule: the key is a regular
    expression matched against the end of the module name, after a dot)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def module_scaling(config: dict[str, Any], name: str, rank: int) -> float:
    """s = alpha / r (alpha / √r with `use_rslora`), alpha from `alpha_pattern` when a key matches `name`."""
    patterns = config.get("alpha_pattern") or {}
    key = pattern_key(patterns, name)
    alpha = float(patterns[key] if key is not None else config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_config(folder: Path, label: str) -> dict[str, Any]:
    """The checked `adapter_config.json` of an adapter folder, after every other JSON file of the folder (its
    tokenizer files are copied into the soup)."""
    config = read_model_file(folder, "adapter_config.json", label=f"ingredient {label}: ")
    if config is None:
        raise SoupError(f"ingredient {label}: {folder} has no adapter_config.json; give a peft adapter folder")
    check_model_files(folder, label=f"ingredient {label}: ")
    return config


def check_soupable(config: dict[str, Any], label: str) -> None:
    """Refuse what the exact soup Σᵢ wᵢ sᵢ Bᵢ Aᵢ does not describe, naming the setting and the fix."""
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise SoupError(
            f"ingredient {label} is a {kind} adapter; hf_soup soups LoRA adapters (peft_type LORA) exactly. For "
            f"other adapter types, {MERGE_INSTEAD}"
        )
    if config.get("use_dora"):
        raise SoupError(
            f"ingredient {label} is a DoRA adapter (use_dora: true): DoRA rescales each merged weight by a learned "
            f"magnitude, so Σ wᵢ ΔWᵢ is not the soup of the DoRA models; {MERGE_INSTEAD}"
        )
    if config.get("lora_bias"):
        raise SoupError(
            f"ingredient {label} trains a bias on lora_B (lora_bias: true), which hf_soup does not soup yet; "
            f"{MERGE_INSTEAD}, or train with lora_bias=False"
        )
    if config.get("bias", "none") != "none":
        raise SoupError(
            f"ingredient {label} trains the base layers' biases (bias: {config.get('bias')!r}); adapter soups need "
            f"bias='none': {MERGE_INSTEAD}"
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise SoupError(
            f"ingredient {label} was initialised with init_lora_weights={init!r}, which changes the base weights; "
            "save it with save_pretrained(..., path_initial_model_for_weight_conversion=...) to turn it into a plain "
            "LoRA adapter of the original base, then soup that"
        )
    for key, what in (
        ("target_parameters", "LoRA on parameters (target_parameters)"),
        ("layer_replication", "layer_replication"),
        ("trainable_token_indices", "trainable tokens (trainable_token_indices)"),
    ):
        if config.get(key):
            raise SoupError(f"ingredient {label} uses {what}, which hf_soup does not soup yet; {MERGE_INSTEAD}")
    variant = _variant(config)
    if variant is not None:
        raise SoupError(
            f"ingredient {label} is a LoRA variant ({variant}) whose forward is not W + s·B A, so the exact adapter "
            f"soup does not apply; {MERGE_INSTEAD}"
        )


def _variant(config: dict[str, Any]) -> str | None:
    """The LoRA variant a config requests (peft tags variant fields of `LoraConfig` with `is_lora_variant`)."""
    try:
        from peft import LoraConfig
    except ImportError:  # reading adapters needs no peft; the explicit checks above still ran
        return None
    for item in dataclasses.fields(LoraConfig):
        value = config.get(item.name)
        if item.name == "init_lora_weights" and value in item.metadata.get("lora_variants", ()):
            return f"init_lora_weights={value!r}"
        if item.metadata.get("is_lora_variant") and value:
            return f"{item.name}={value!r}"
    return None


def read_adapter(folder: str | os.PathLike, label: str | None = None, *, allow_pickle: bool = False) -> Adapter:
    """Read and check one peft LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`).

    Raises `SoupError` for adapters that cannot be souped exactly (DoRA, `lora_bias`, other variants and peft types,
    `bias != "none"`, inits that change the base weights).

    Example:

    ```python
    >>> adapter = read_adapter("runs/lora-a/best")
    >>> {name: (m.rank, m.scaling) for name, m in adapter.modules.items()}
    ```
    """
    folder = Path(folder)
    label = label or folder.name
    config = read_config(folder, label)
    check_soupable(config, label)
    reader = CheckpointReader(folder, allow_pickle=allow_pickle, label=label)
    try:
        _check_finite(reader, label)
        return _index(Adapter(label, folder, config, reader))
    except BaseException:
        reader.close()
        raise


def _check_finite(reader: CheckpointReader, label: str) -> None:
    """No NaN or Inf in any floating tensor: a soup of a diverged adapter would be silently wrong. Adapters are
    small beside their base, so one pass over each before anything is written costs little."""
    import torch

    for name in reader.names():
        if reader.info(name).dtype not in FLOAT_DTYPES:
            continue
        tensor = reader.get(name)
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            tensor = tensor.float()
        if tensor.numel() and not all(map(torch.isfinite, torch.aminmax(tensor))):
            raise SoupError(f"ingredient {label}: tensor {name} holds NaN or Inf; that run diverged, leave it out")


def _index(adapter: Adapter) -> Adapter:
    label, reader, config = adapter.label, adapter.reader, adapter.config
    factors: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    for key in reader.names():
        if not key.startswith(PREFIX):
            raise SoupError(
                f"ingredient {label}: tensor {key} does not start with {PREFIX!r}; this is not a peft LoRA adapter "
                "file saved by save_pretrained"
            )
        name = key[len(PREFIX) :]
        if "lora_magnitude_vector" in name:
            raise SoupError(f"ingredient {label} holds DoRA magnitudes ({key}); {MERGE_INSTEAD}")
        if name.endswith(".lora_B.bias"):
            raise SoupError(f"ingredient {label} holds a lora_B bias ({key}) (lora_bias); {MERGE_INSTEAD}")
        suffix = next((s for s in FACTORS if name.endswith(s)), None)
        if suffix is not None:
            module = name[: -len(suffix)]
            factor, kind = FACTORS[suffix]
            factors.setdefault(module, {})[factor] = key
            kinds[module] = kind
        elif name.endswith(SAVED_BASE):
            adapter.saved_base[name[: -len(SAVED_BASE)] + ".weight"] = key
        else:
            adapter.full[name] = key
    for module, keys in factors.items():
        if set(keys) != {"A", "B"}:
            raise SoupError(
                f"ingredient {label}: LoRA module {module} lacks its {'A' if 'A' not in keys else 'B'} "
                "matrix; the adapter file is incomplete, save it again"
            )
        a, b = reader.info(keys["A"]).shape, reader.info(keys["B"]).shape
        kind = "conv" if len(a) == 4 else kinds[module]
        if len(a) not in (2, 4) or a[0] != b[1]:
            raise SoupError(
                f"ingredient {label}: LoRA module {module} has A {list(a)} and B {list(b)}, not a rank-r "
                "pair; the adapter file is damaged, save it again"
            )
        rank = a[0]
        transposed = kind == "embedding" or (kind == "linear" and bool(config.get("fan_in_fan_out")))
        adapter.modules[module] = LoraModule(
            module, keys["A"], keys["B"], rank, module_scaling(config, module, rank), kind, transposed
        )
    if not adapter.modules:
        raise SoupError(f"ingredient {label}: the adapter holds no LoRA matrices; give a trained LoRA adapter folder")
    return adapter


def resolve_base(name: str | None) -> Path | None:
    """The local folder of a base model named in `adapter_config.json`: a folder path, or a Hub id already in the
    local cache (nothing is downloaded). `None` when it cannot be found locally."""
    if not name:
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        return path.absolute()
    if path.is_absolute() or name.count("/") > 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        found = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, not a valid id, hub library missing: not found
        return None
    return found if (found / "config.json").is_file() else None


def base_identity(name: str | None, revision: str | None) -> str | None:
    """What names a base: its real path when it is a local folder, else its name (and revision)."""
    folder = resolve_base(name)
    if folder is not None:
        return str(folder.resolve())
    return None if not name else f"{name}" + (f"@{revision}" if revision else "")


def check_same_base(adapters: list[Adapter], base_model: Path | None = None) -> None:
    """Refuse adapters of different bases: base names, task types, layer shapes, saved base copies; and a recipe
    `base_model` whose config differs from the config of the base the adapters name (when that one is local)."""
    identities = {a.label: base_identity(a.base_name, a.config.get("revision")) for a in adapters}
    named = [(label, identity) for label, identity in identities.items() if identity is not None]
    for label, identity in named[1:]:
        if identity != named[0][1]:
            other = next(a for a in adapters if a.label == label)
            reference = next(a for a in adapters if a.label == named[0][0])
            raise SoupError(
                f"ingredient {label} was trained on base {other.base_name!r} but {reference.label} on "
                f"{reference.base_name!r}; adapters of different bases cannot be souped. If they are the same model "
                "stored in two places, set base_model_name_or_path in their adapter_config.json to one of them"
            )
    named_base = resolve_base(adapters[0].base_name) if named else None
    if base_model is not None and named_base is not None and named_base.resolve() != base_model.resolve():
        if config_hash(named_base) != config_hash(base_model):
            raise SoupError(
                f"base_model {base_model} has another config than {named_base}, the base ingredient "
                f"{adapters[0].label} was trained on; give the base the adapters were trained on"
            )
    for key, what in (("task_type", "task_type"), ("fan_in_fan_out", "fan_in_fan_out")):
        values = {a.label: a.config.get(key) or None for a in adapters}
        if len(set(values.values()) - ({None} if key == "task_type" else set())) > 1:
            raise SoupError(
                f"ingredients disagree on {what}: {values}; adapters of one soup must be trained for one task on one "
                "base architecture"
            )
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], str]] = {}
    for adapter in adapters:
        for module in adapter.modules.values():
            a = adapter.reader.info(module.a_key).shape
            b = adapter.reader.info(module.b_key).shape
            shape = (tuple(a[1:]), (b[0], *b[2:]), module.kind)
            if shapes.setdefault(module.name, shape) != shape:
                raise SoupError(
                    f"ingredient {adapter.label}: module {module.name} maps {list(shape[0])} → {list(shape[1])} but "
                    f"another adapter maps {list(shapes[module.name][0])} → {list(shapes[module.name][1])}; the "
                    "adapters were trained on different bases"
                )
    import torch

    holders: dict[str, Adapter] = {}
    for adapter in adapters:
        for name, key in adapter.saved_base.items():
            other = holders.setdefault(name, adapter)
            if other is not adapter and not torch.equal(
                adapter.reader.get(key), other.reader.get(other.saved_base[name])
            ):
                raise SoupError(
                    f"ingredient {adapter.label}: the base weight {name} saved with the adapter differs from "
                    f"{other.label}'s; the adapters were trained on different bases (or a trained embedding)"
                )


def check_against_base(adapters: list[Adapter], base: CheckpointReader) -> None:
    """Every LoRA module must change a base weight of its shape (out × in, or in × out when transposed)."""
    for adapter in adapters:
        for module in adapter.modules.values():
            a, b = adapter.reader.info(module.a_key).shape, adapter.reader.info(module.b_key).shape
            name = f"{module.name}.weight"
            if module.kind == "conv":
                expected = (b[0], a[1], *a[2:])
            else:
                expected = (a[1], b[0]) if module.transposed else (b[0], a[1])
            if name not in base or tuple(base.info(name).shape) != tuple(expected):
                found = list(base.info(name).shape) if name in base else "no such tensor"
                raise SoupError(
                    f"ingredient {adapter.label}: module {module.name} changes a {list(expected)} weight but the base "
                    f"model {base.folder} has {found}; give the base the adapters were trained on (`base_model:`), "
                    "saved with the same model class"
                )
