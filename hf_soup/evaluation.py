"""The `evaluation:` section of a recipe: which data, which metric, which split selects and which are reported.

```yaml
evaluation:
  task: sequence-classification          # or causal-lm, image-classification, token-classification, multiple-choice,
                                         # question-answering, seq2seq, audio-classification, causal-generation
  dataset: {path: csv, data_files: {validation: data/val.csv, test: data/test.csv, shift: data/shift.csv}}
  # or dataset: {load_from_disk: data/my_dataset}   (a DatasetDict saved with save_to_disk)
  columns: {text: sentence, label: label}
  metric: accuracy                       # built-in, an evaluate module path, or module:function (compute_metrics)
  selection_split: validation            # greedy / learned choose on this split only
  report_splits: [test, shift]           # reported, never used to choose
```
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SoupError, brief, did_you_mean, first_line
from .scoring import Scorer
from .tasks import TASKS

logger = logging.getLogger(__name__)

EVALUATION_KEYS = {
    "task": "sequence-classification, causal-lm, image-classification, token-classification, multiple-choice, "
    "question-answering, seq2seq, audio-classification or causal-generation",
    "dataset": "arguments of datasets.load_dataset, or {load_from_disk: DIR}",
    "selection_split": "the split greedy/learned soups are chosen on",
    "report_splits": "splits reported but never used to choose (test, distribution shifts)",
    "metric": "built-in name, evaluate module path, or module:function compute_metrics",
    "greater_is_better": "direction of a metric that is not built in",
    "metric_key": "which value of a metric that returns several",
    "columns": "column names of the raw data by key: text, text_pair, label (tokens, tags; choices, context; "
    "question, answers; source, target; audio; prompt, answer)",
    "max_length": "tokenizer truncation length",
    "max_length_seconds": "audio-classification: clips are cut to this many seconds (default: whole clips)",
    "generation_max_length": "seq2seq, causal-generation: the longest generation in tokens (causal-generation: new "
    "tokens after the prompt; default: the generation config's)",
    "num_beams": "seq2seq, causal-generation: beams of the search (default: the generation config's)",
    "chat_template": "causal-generation: each prompt as a user message through the tokenizer's chat template "
    "(default false)",
    "batch_size": "evaluation batch size (default 32)",
    "preprocess": "module:function mapping a batch of raw rows to model inputs (instead of tokenizing text)",
    "compare": "extra rows of the report: uniform, greedy, learned, ensemble (default: uniform, ensemble)",
    "device_map": "where the resident model lives: auto, cpu, cuda, or {module: device}",
    "dtype": "the resident model's dtype for scoring: float32 (default), bfloat16, float16 (GPU only)",
    "max_memory": "per-device memory limits for device_map auto, e.g. {0: 10GiB, cpu: 30GiB}",
    "offload_folder": "where disk-offloaded weights of the resident model go",
    "reuse_recorded_scores": "use pantry scores measured on the selection split (default true)",
}
COMPARABLE = ("uniform", "greedy", "learned", "ensemble")
COMPARED_BY_DEFAULT = ("uniform", "ensemble")
# Keys whose `null` in YAML means "not given" (the default); the others must hold a value of their kind.
NULLABLE = {
    "metric",
    "greater_is_better",
    "metric_key",
    "max_length",
    "max_length_seconds",
    "generation_max_length",
    "num_beams",
    "preprocess",
    "device_map",
    "dtype",
    "max_memory",
    "offload_folder",
}


def _import(spec: str | Callable, what: str) -> Callable:
    if callable(spec):
        return spec
    import importlib

    module, _, attribute = str(spec).partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise SoupError(f"cannot import {what} {spec!r} ({error}); write it as 'package.module:function'") from None


@dataclass
class Evaluation:
    """A validated `evaluation:` section."""

    selection_split: str
    dataset: dict[str, Any] | None = None
    splits: Mapping[str, Any] | None = None
    task: str = "sequence-classification"
    report_splits: list[str] = field(default_factory=list)
    metric: str | Callable | None = None
    greater_is_better: bool | None = None
    metric_key: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    max_length: int | None = None
    max_length_seconds: float | None = None
    generation_max_length: int | None = None
    num_beams: int | None = None
    batch_size: int = 32
    preprocess: str | Callable | None = None
    compare: list[str] = field(default_factory=lambda: list(COMPARED_BY_DEFAULT))
    device_map: Any = "auto"
    dtype: str = "float32"
    max_memory: dict[Any, Any] | None = None
    offload_folder: str | None = None
    reuse_recorded_scores: bool = True
    chat_template: bool = False
    trust_remote_code: bool = False  # the recipe's top-level key: an evaluate metric from the Hub runs its code

    @classmethod
    def from_mapping(cls, data: Any, *, base_dir: Path, source: str, trust_remote_code: bool = False) -> Evaluation:
        where = f"{source}: evaluation"
        if not isinstance(data, Mapping):
            raise SoupError(
                f"{where} must be a mapping (task, dataset, selection_split, ...), got {type(data).__name__}"
            )
        unknown = [key for key in data if key not in EVALUATION_KEYS and key != "splits"]
        if unknown:
            raise SoupError(
                f"{where}: unknown key {brief(unknown[0])}{did_you_mean(unknown[0], EVALUATION_KEYS)}; valid "
                f"keys: {', '.join(EVALUATION_KEYS)}"
            )
        if "selection_split" not in data:
            raise SoupError(f"{where} needs selection_split: the held-out split the soup is chosen on")
        kinds = {
            "task": str,
            "selection_split": str,
            "report_splits": list,
            "metric": (str, Callable),
            "preprocess": (str, Callable),
            "device_map": (str, int, Mapping),
            "dtype": str,
            "greater_is_better": bool,
            "metric_key": str,
            "columns": Mapping,
            "max_length": int,
            "max_length_seconds": (int, float),
            "generation_max_length": int,
            "num_beams": int,
            "batch_size": int,
            "compare": list,
            "max_memory": Mapping,
            "offload_folder": str,
            "reuse_recorded_scores": bool,
            "chat_template": bool,
            "dataset": Mapping,
        }
        for key, kind in kinds.items():
            if key not in data or (data[key] is None and key in NULLABLE):
                continue
            value = data[key]
            if not isinstance(value, kind) or (kind in (int, (int, float)) and isinstance(value, bool)):
                names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
                got = "null (an empty value)" if value is None else f"{type(value).__name__} {brief(value)}"
                raise SoupError(f"{where}.{key} must be a {names}, got {got} ({EVALUATION_KEYS[key]})")
        task = data.get("task", "sequence-classification")
        if task not in TASKS:
            raise SoupError(
                f"{where}.task {brief(task)}{did_you_mean(task, TASKS)} is unknown; tasks: {', '.join(TASKS)}"
            )
        if ("dataset" in data) == ("splits" in data):
            raise SoupError(
                f"{where} needs `dataset:` (how to load the data), e.g. {{path: csv, data_files: {{...}}}}"
            )
        splits = data.get("splits")
        if "splits" in data and (
            not isinstance(splits, Mapping) or not all(hasattr(s, "column_names") for s in splits.values())
        ):
            raise SoupError(
                f"{where}.splits must map split names to datasets.Dataset objects (Python API); in a recipe file "
                "use `dataset:` instead"
            )
        if "load_from_disk" in data.get("dataset", {}) and not isinstance(data["dataset"]["load_from_disk"], str):
            raise SoupError(f"{where}.dataset.load_from_disk must be a folder path (string)")
        for name in data.get("compare", []):
            if name not in COMPARABLE:
                raise SoupError(f"{where}.compare: unknown row {brief(name)}; choose from {', '.join(COMPARABLE)}")
        for key in ("report_splits", "compare"):
            if not all(isinstance(item, str) for item in data.get(key, [])):
                raise SoupError(f"{where}.{key} must be a list of names (strings), got {brief(data[key])}")
        keys = ", ".join(TASKS[task].column_keys)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in data.get("columns", {}).items()):
            raise SoupError(f"{where}.columns must map {keys} to column names (strings)")
        TASKS[task].check_columns(data.get("columns", {}), f"{where}.columns")
        for key in ("batch_size", "max_length", "generation_max_length", "num_beams"):
            if data.get(key) is not None and data[key] < 1:
                raise SoupError(f"{where}.{key} must be ≥ 1, got {data[key]}")
        generating = [name for name, kind in TASKS.items() if kind.generates]
        for key in ("generation_max_length", "num_beams"):
            if data.get(key) is not None and not TASKS[task].generates:
                raise SoupError(
                    f"{where}.{key} sets generation, which only tasks {' and '.join(generating)} do (task is "
                    f"{task!r}); remove it"
                )
        seconds = data.get("max_length_seconds")
        if seconds is not None and (task != "audio-classification" or not 0 < seconds < math.inf):
            raise SoupError(
                f"{where}.max_length_seconds cuts audio clips: a number of seconds > 0 for task audio-classification "
                f"(task is {task!r}, got {brief(seconds)}); remove it or fix it"
            )
        if task == "audio-classification" and data.get("max_length") is not None:
            raise SoupError(f"{where}.max_length truncates text; audio clips are cut by max_length_seconds")
        if data.get("chat_template") and task != "causal-generation":
            raise SoupError(
                f"{where}.chat_template shows prompts through the tokenizer's chat template, which only task "
                f"causal-generation has (task is {task!r}); remove it"
            )
        _check_dtype(data.get("dtype"), data.get("device_map", "auto"), where)
        dataset = dict(data["dataset"]) if data.get("dataset") is not None else None
        if dataset is not None:
            dataset = _resolve_files(dataset, base_dir)
        report = [str(s) for s in data.get("report_splits", [])]
        if data["selection_split"] in report:
            logger.warning(
                "SELECTING ON A REPORTED SPLIT: %r is both the selection split and a report split; its numbers are "
                "optimistic. Hold out a separate split for selection.",
                data["selection_split"],
            )
        values = {k: v for k, v in data.items() if k in EVALUATION_KEYS or k == "splits"}
        values.update(dataset=dataset, report_splits=report, columns=dict(data.get("columns", {})))
        values["trust_remote_code"] = trust_remote_code
        return cls(**values)

    def load_splits(self) -> dict[str, Any]:
        """The selection and report splits as `datasets.Dataset`s."""
        import datasets

        if self.splits is not None:
            loaded = dict(self.splits)
        elif "load_from_disk" in self.dataset:
            folder = self.dataset["load_from_disk"]
            try:
                found = datasets.load_from_disk(folder)
            except Exception as error:  # noqa: BLE001 - datasets raises many kinds for a bad folder
                raise SoupError(
                    f"evaluation.dataset load_from_disk {folder} could not be loaded ({first_line(error)}); give a "
                    "folder written by DatasetDict.save_to_disk"
                ) from None
            if not isinstance(found, datasets.DatasetDict):  # a single Dataset: its one split has no name
                raise SoupError(
                    f"evaluation.dataset load_from_disk {folder} holds one Dataset, not a DatasetDict of named "
                    "splits; save DatasetDict({'validation': ..., 'test': ...}) instead"
                )
            loaded = dict(found)
        else:
            try:
                loaded = dict(datasets.load_dataset(**self.dataset))
            except Exception as error:  # noqa: BLE001 - datasets raises many kinds for bad specs
                raise SoupError(
                    f"evaluation.dataset {self.dataset} could not be loaded ({first_line(error)}); give the arguments "
                    "of datasets.load_dataset, e.g. {path: csv, data_files: {validation: val.csv}}"
                ) from None
        wanted = [self.selection_split, *[s for s in self.report_splits if s != self.selection_split]]
        for split in wanted:
            if split not in loaded:
                key = "selection_split" if split == self.selection_split else "report_splits"
                raise SoupError(
                    f"evaluation split {split!r} does not exist; the dataset has: {', '.join(loaded)}; set "
                    f"evaluation.{key} to splits it has"
                )
        return {split: loaded[split] for split in wanted}

    @property
    def resident_dtype(self) -> str:
        """The resident model's dtype name (`dtype`, float32 when not given)."""
        return self.dtype or "float32"

    def placement(self) -> dict[str, Any]:
        """Where the resident model goes: the `Kitchen` keyword arguments of this section."""
        return {"device_map": self.device_map, "max_memory": self.max_memory, "offload_folder": self.offload_folder}

    def scorer(self, tokenizer=None) -> Scorer:
        """A `Scorer` over the selection and report splits (preprocessed once)."""
        return Scorer(
            self.load_splits(),
            task=self.task,
            metric=self.metric if self.metric is None or callable(self.metric) else str(self.metric),
            greater_is_better=self.greater_is_better,
            metric_key=self.metric_key,
            tokenizer=tokenizer,
            columns=self.columns,
            max_length=self.max_length,
            preprocess=_import(self.preprocess, "preprocess") if self.preprocess else None,
            generation={"max_length": self.generation_max_length, "num_beams": self.num_beams},
            max_length_seconds=self.max_length_seconds,
            chat_template=self.chat_template,
            batch_size=self.batch_size,
            trust_remote_code=self.trust_remote_code,
        )


RESIDENT_DTYPES = ("float32", "bfloat16", "float16")


def _check_dtype(dtype: str | None, device_map: Any, where: str) -> None:
    """`dtype` is a resident dtype; float16 only where the resident model can be on a GPU."""
    if dtype is None:
        return
    if dtype not in RESIDENT_DTYPES:
        raise SoupError(
            f"{where}.dtype {brief(dtype)}{did_you_mean(dtype, RESIDENT_DTYPES)} is not a resident dtype; use "
            f"{', '.join(RESIDENT_DTYPES)} (the soup itself is written in `dtype:` at the recipe's top level)"
        )
    import torch

    on_cpu = device_map == "cpu" or (device_map in (None, "auto") and not torch.cuda.is_available())
    if dtype == "float16" and on_cpu:
        raise SoupError(
            f"{where}.dtype float16 puts the resident model in half precision on the CPU, which is slow and "
            "overflows where bfloat16 does not; use bfloat16 (also slower than float32 on most CPUs) or float32, "
            "or place the model on a GPU (device_map: cuda)"
        )


def _resolve_files(dataset: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Relative `data_files`, `data_dir` and `load_from_disk` paths are relative to the recipe's folder."""

    def resolve(value):
        if isinstance(value, str) and not os.path.isabs(value) and "://" not in value:
            return str(base_dir / value)
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, Mapping):
            return {k: resolve(v) for k, v in value.items()}
        return value

    for key in ("data_files", "data_dir", "load_from_disk"):
        if key in dataset:
            dataset[key] = resolve(dataset[key])
    if "path" in dataset and (base_dir / str(dataset["path"])).exists():
        dataset["path"] = str(base_dir / dataset["path"])
    return dataset
