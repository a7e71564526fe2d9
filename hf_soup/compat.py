"""Compatibility checks over ingredient configs, done before any tensor is read: one architecture, no custom code
unless opted in. (Tensor names, shapes and dtypes are checked by the engine's plan, `hf_soup.merge.plan_soup`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import SoupError
from .jsonfile import check_model_files, read_model_file


def read_config(folder: Path, name: str = "config.json") -> dict | None:
    """`config.json` (or another JSON file of `hf_soup.jsonfile.MODEL_FILES`) of a model folder as a dict (`None`
    when absent), checked: bad JSON or a wrong shape is a clear error."""
    return read_model_file(folder, name)


def check_configs(folders: Sequence[Path], labels: Sequence[str], *, trust_remote_code: bool = False) -> None:
    """Every JSON file of every folder has its shape (`check_model_files`); same `model_type` and `architectures`
    everywhere; remote-code configs (model or tokenizer) only on opt-in."""
    for folder in folders:
        check_model_files(folder)
    configs = [read_config(folder) for folder in folders]
    first = next(((label, c) for label, c in zip(labels, configs) if c is not None), None)
    for label, config, folder in zip(labels, configs, folders):
        if not trust_remote_code:
            tokenizer = read_config(folder, "tokenizer_config.json")
            for name, found in (("config.json", config), ("tokenizer_config.json", tokenizer)):
                if found is not None and found.get("auto_map"):
                    raise SoupError(
                        f"ingredient {label}: {name} has auto_map (custom code from the model repo); hf_soup runs "
                        "no remote code unless you opt in with trust_remote_code: true"
                    )
        if config is None:
            continue
        if first is None:
            continue
        for key in ("model_type", "architectures"):
            if config.get(key) != first[1].get(key):
                raise SoupError(
                    f"ingredient {label} has {key} {config.get(key)!r} but {first[0]} has {first[1].get(key)!r}; "
                    "a soup needs ingredients fine-tuned from one architecture"
                )
