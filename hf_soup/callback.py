"""SoupCallback: a Trainer run's best checkpoint (or its last evaluated ones) into a pantry, with what explains it.

The callback reads everything from the Trainer's own `args` and `state`: the metric a checkpoint is selected by
(`metric_for_best_model`, `greater_is_better`), the best checkpoint (`best_model_checkpoint`), the metric of each
evaluated step (`log_history`) and, under `Trainer.hyperparameter_search`, the trial (`trial_params`). It only talks
to a `Pantry` and never merges: cooking when the sweep ends is a function handed to it (`cook=`, e.g.
`hf_soup.cook_at_end(...)`), which reads the pantry like any cook; this module imports none of the cooking machinery.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .atomic import sha256_file
from .checkpoint import weight_files
from .errors import SoupError, first_line
from .ingredient import Ingredient
from .pantry import Pantry
from .processes import call_together, rank

logger = logging.getLogger(__name__)

KEEP = re.compile(r"^(best|last:([1-9][0-9]*))$")
WHEN = ("save", "end")
# The TrainingArguments that make one run of a sweep differ from another (missing ones are skipped).
HYPERPARAMETERS = (
    "learning_rate",
    "weight_decay",
    "seed",
    "data_seed",
    "num_train_epochs",
    "max_steps",
    "warmup_steps",
    "warmup_ratio",
    "lr_scheduler_type",
    "label_smoothing_factor",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "optim",
)


def _plain(value: Any) -> Any:
    """A JSON value for a TrainingArguments field (enums become their value, other objects their text)."""
    value = getattr(value, "value", value)
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _setting(value: Any) -> str:
    return str(getattr(value, "value", value))


class SoupCallback(TrainerCallback, ExportableState):
    """Put a run's best checkpoint into a pantry, with its metric, hyperparameters and base model.

    Each ingredient's weights are hard-linked (copied where the file system cannot link) into the pantry, so
    `save_total_limit` rotation or deleting `output_dir` cannot lose them. Its record holds the run name, the
    hyperparameters that make runs differ (plus `tags` and, under `Trainer.hyperparameter_search`, the trial's
    parameters), the metric name, value, direction and split, the global step, the base model and its revision,
    a config hash, and whether it is a full model or a peft adapter (a peft run stores its adapter, with
    `modules_to_save`, never a merged model).

    The run is named `args.run_name` (else after `output_dir`; under hyperparameter search, plus the trial's folder,
    e.g. `out-run-3`). Only the main process writes (`state.is_world_process_zero`): other ranks never wait on the
    pantry, only for the main process at the Trainer's next collective, so no longer than the copy. A resumed run
    does not add an ingredient twice.

    Args:
        pantry (`str`, `os.PathLike` or `Pantry`):
            the pantry folder (created if missing; checked for writing when training begins).
        keep (`str`, *optional*, defaults to `"best"`):
            `"best"`: one ingredient per run, the checkpoint the Trainer ranks best by `metric_for_best_model`.
            `"last:N"`: the last `N` evaluated checkpoints of the run (for a soup of one run, as in SWA).
        tags (`dict`, *optional*):
            JSON values recorded with each ingredient, e.g. `{"dataset": "sst2", "sweep": "lr-grid"}`.
        split (`str`, *optional*, defaults to `"eval"`):
            the name of the Trainer's evaluation split the metric is measured on, e.g. `"validation"`.
        when (`str`, *optional*, defaults to `"save"`):
            `"save"`: update the pantry as checkpoints are saved (a new best replaces the run's previous best), so
            a run that crashes or is stopped early still leaves its best; `"end"`: add once, when training ends.
        cook (`Callable[[Pantry], Any]`, *optional*):
            what to do with the pantry when the sweep ends, e.g. `hf_soup.cook_at_end("recipe.yaml")`; its result is
            kept in `callback.soup`. Called when the `runs`-th run ends, or by `callback.end_sweep()`. Under
            `accelerate launch` every process calls it at once (hf_soup's cooks score on every process and write on
            the main one). A failing cook leaves the pantry as it was; its error is logged, kept in `callback.error`.
            A `cook` with a `check(pantry)` method is checked here, before any training.
        runs (`int`, *optional*):
            cook when this many runs have ended with this callback: `n_trials` of `hyperparameter_search`, or the
            number of Trainers one callback object is given to in a loop. Without it, call `end_sweep()`.

    Example (a tiny model from a config, a few rows in memory):

    ```python
    >>> import torch
    >>> from datasets import Dataset
    >>> from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
    >>> from hf_soup import Pantry, SoupCallback
    >>> ids = torch.randint(0, 64, (32, 8)).tolist()
    >>> data = Dataset.from_dict({"input_ids": ids, "labels": [row[0] % 2 for row in ids]})
    >>> config = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    ... )
    >>> args = TrainingArguments(
    ...     "runs/lr1e-4", learning_rate=1e-4, max_steps=8, eval_strategy="steps", eval_steps=4, save_steps=4,
    ...     save_total_limit=1, metric_for_best_model="loss", use_cpu=True, report_to="none",
    ... )
    >>> trainer = Trainer(BertForSequenceClassification(config), args, train_dataset=data, eval_dataset=data,
    ...                   callbacks=[SoupCallback("pantry", tags={"sweep": "lr"})])
    >>> _ = trainer.train()
    >>> [(i.run, i.metric, i.value == trainer.state.best_metric) for i in Pantry("pantry").list()]
    [('lr1e-4', 'eval_loss', True)]
    ```
    """

    def __init__(
        self,
        pantry: str | os.PathLike | Pantry,
        *,
        keep: str = "best",
        tags: dict[str, Any] | None = None,
        split: str = "eval",
        when: str = "save",
        cook: Callable[[Pantry], Any] | None = None,
        runs: int | None = None,
    ):
        match = KEEP.match(str(keep))
        if match is None:
            raise SoupError(f"keep must be 'best' or 'last:N' with N >= 1 (e.g. 'last:3'), got {keep!r}")
        if when not in WHEN:
            raise SoupError(f"when must be one of {', '.join(map(repr, WHEN))}, got {when!r}")
        if match.group(2) and when == "end":
            raise SoupError(
                f"keep={keep!r} adds each evaluated checkpoint as it is saved, before rotation deletes it; "
                "use when='save' (the default) with it"
            )
        if not isinstance(split, str) or not split:
            raise SoupError(f"split must be a non-empty name such as 'validation', got {split!r}")
        if tags is not None and not isinstance(tags, dict):
            raise SoupError(f"tags must be a dict such as {{'sweep': 'lr'}}, got {type(tags).__name__}")
        try:
            json.dumps(tags or {})
        except (TypeError, ValueError) as error:
            raise SoupError(f"tags must hold JSON values (str, number, bool, list, dict): {error}") from None
        if cook is not None and not callable(cook):
            raise SoupError(f"cook must be a function of the pantry such as hf_soup.cook_at_end(...), got {cook!r}")
        if runs is not None and (not isinstance(runs, int) or isinstance(runs, bool) or runs < 1 or cook is None):
            raise SoupError(
                f"runs={runs!r}: runs is the number of runs after which `cook` is called, a whole number >= 1 (e.g. "
                "the n_trials of hyperparameter_search), given together with cook=hf_soup.cook_at_end(...)"
            )
        self.pantry = pantry if isinstance(pantry, Pantry) else Pantry(pantry)
        self.cook, self.runs = cook, runs
        self.ended, self.soup, self.error = 0, None, None  # runs ended here; what `cook` returned; why it failed
        if callable(getattr(cook, "check", None)):
            cook.check(self.pantry)  # a bad recipe or output fails now, not at the end of the sweep
        self.keep = keep
        self.last = int(match.group(2)) if match.group(2) else None
        self.tags = dict(tags or {})
        self.split = split
        self.when = when
        self._added: dict[str, int] = {}  # ingredient id -> step, the pantry entries this run owns
        self._pending: set[int] = set()  # keep="last:N": saved steps not yet in the pantry
        self._base: tuple[str | None, str | None] = (None, None)

    # -- ExportableState: survives checkpoint/resume in trainer_state.json -----------------------------------------
    def state(self) -> dict:
        return {
            "args": {
                "pantry": str(self.pantry.root),
                "keep": self.keep,
                "tags": self.tags,
                "split": self.split,
                "when": self.when,
            },
            "attributes": {"_added": dict(self._added)},
        }

    # -- Trainer events -------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._check_args(args)
        self._added, self._pending = {}, set()
        if not state.is_world_process_zero:
            return
        self.pantry.check_writable()
        self._base = _base_model(model)
        folder = self._checkpoint(args, state, state.global_step) if state.global_step > 0 else None
        if folder is not None:  # resumed: take back the entries this run added before it stopped
            run = self._run_name(args, state, folder)
            entries = {i.id: i for i in self.pantry.list()}
            self._added = {
                i: step
                for i, step in self._saved_entries(state).items()
                if i in entries and (entries[i].run, entries[i].step) == (run, step)
            }
            # The resume checkpoint's own add came after its trainer_state.json was written: find it by its weights.
            if state.global_step not in self._added.values():
                existing = self._find(run, state.global_step, folder)
                if existing is not None:
                    self._added[existing.id] = state.global_step

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.when == "save":
            self._pending.add(state.global_step)
            try:
                self._update(args, state, final=False)
            except (OSError, SoupError) as error:  # a pantry hiccup must not end hours of training
                logger.error(
                    f"SoupCallback could not update pantry {self.pantry.root} at step {state.global_step} ({error}); "
                    "training goes on, and SoupCallback tries again at the next save and at the end"
                )

    def on_train_end(self, args, state, control, **kwargs):
        self.ended += 1
        cooking = self.cook is not None and self.ended == self.runs
        try:
            if state.is_world_process_zero:
                self._update(args, state, final=True)
        except Exception as error:
            if cooking:  # the other processes are about to cook: tell them the pantry is not complete
                with contextlib.suppress(SoupError):
                    call_together(self.cook, self.pantry, problem=f"the pantry update failed ({first_line(error)})")
            raise
        if cooking:
            try:
                self.end_sweep()
            except Exception as error:  # the sweep's result is safe in the pantry: report, do not end the script
                if rank() == 0:
                    logger.error(
                        f"SoupCallback: the cook at the end of the sweep failed ({type(error).__name__}: {error}); "
                        f"every entry of pantry {self.pantry.root} is kept: cook it again with callback.end_sweep() "
                        "or `hf-soup cook`",
                        exc_info=None if isinstance(error, SoupError) else error,  # a bad input says it all
                    )

    def end_sweep(self) -> Any:
        """The sweep is over (e.g. a loop of Trainers, or a `hyperparameter_search` with a timeout): call `cook` on the
        pantry now, keep its result in `callback.soup` and return it. Under `accelerate launch`, call it on every
        process. A failing cook raises on every process; the pantry is left as it was."""
        if self.cook is None:
            raise SoupError("end_sweep calls the callback's cook, but none was given; give SoupCallback(cook=...)")
        self.soup, self.error = None, None
        try:
            self.soup = call_together(self.cook, self.pantry)  # after the main process's last pantry write
            return self.soup
        except Exception as error:
            self.error = error
            raise

    # -- checks ---------------------------------------------------------------------------------------------------
    def _check_args(self, args) -> None:
        if not args.metric_for_best_model:
            raise SoupError(
                "SoupCallback needs to know how to rank checkpoints, but TrainingArguments.metric_for_best_model is "
                "not set; pass e.g. metric_for_best_model='eval_loss' (or 'accuracy' with a compute_metrics that "
                "returns it) and, if needed, greater_is_better"
            )
        if _setting(args.eval_strategy) == "no":
            raise SoupError(
                "SoupCallback needs evaluated checkpoints, but eval_strategy is 'no'; set eval_strategy='steps' (or "
                "'epoch') with save_steps a multiple of eval_steps, and give the Trainer an eval_dataset"
            )
        if _setting(args.save_strategy) == "no":
            raise SoupError(
                "SoupCallback adds saved checkpoints, but save_strategy is 'no'; set save_strategy to 'steps', "
                "'epoch' or 'best'"
            )
        if getattr(args, "save_safetensors", True) is False:
            raise SoupError("SoupCallback reads safetensors checkpoints; set save_safetensors=True")

    def _saved_entries(self, state) -> dict[str, int]:
        saved = (state.stateful_callbacks or {}).get(type(self).__name__) or []
        for entry in saved if isinstance(saved, list) else [saved]:
            if isinstance(entry, dict) and entry.get("args", {}).get("pantry") == str(self.pantry.root):
                return {str(k): int(v) for k, v in entry.get("attributes", {}).get("_added", {}).items()}
        return {}

    # -- the pantry -----------------------------------------------------------------------------------------------
    def _update(self, args, state, *, final: bool) -> None:
        """Bring the pantry in line with `keep`: add the wanted checkpoint(s), remove entries no longer wanted."""
        if self.last is None:
            best = state.best_model_checkpoint
            if not best or not Path(best).is_dir():
                if final and not self._added:
                    logger.warning("SoupCallback: the run has no saved, evaluated best checkpoint; nothing added.")
                return
            step = _step_of(best)
            if step not in self._added.values() and not self._add(args, state, step, Path(best)):
                return
            self._forget(lambda s: s != step)
        else:
            for step in sorted(self._pending):  # the checkpoint just saved, and any whose earlier add failed
                folder = self._checkpoint(args, state, step)
                if step not in self._added.values() and folder is not None:
                    self._add(args, state, step, folder)
                self._pending.discard(step)
            newest = sorted(self._added.values())[-self.last :]
            self._forget(lambda s: s not in newest)

    def _add(self, args, state, step: int, folder: Path) -> bool:
        metric = args.metric_for_best_model
        metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        value = _metric_at(state, metric, step)
        if value is None:
            return False  # saved but not evaluated: nothing to rank it by
        run = self._run_name(args, state, folder)
        existing = self._find(run, step, folder)
        if existing is not None:
            self._added[existing.id] = step
            return True
        trial = dict(state.trial_params or {}) if state.is_hyper_param_search else {}
        tags = {"trial": folder.parent.name, **trial} if state.is_hyper_param_search else {}
        ingredient = self.pantry.add(
            folder,
            metric=metric,
            value=value,
            greater_is_better=bool(args.greater_is_better),
            split=self.split,
            step=step,
            run=run,
            hyperparameters={**_hyperparameters(args), **trial},
            tags={**tags, **self.tags},
            base_model=self._base[0],
            base_revision=self._base[1],
        )
        self._added[ingredient.id] = step
        logger.info(f"SoupCallback: added {folder} to pantry {self.pantry.root} as {ingredient.id} ({metric}={value})")
        return True

    def _forget(self, unwanted) -> None:
        for ingredient_id, step in list(self._added.items()):
            if unwanted(step):
                del self._added[ingredient_id]
                try:
                    self.pantry.remove(ingredient_id)
                except SoupError:  # already removed by hand: nothing to do
                    pass

    def _find(self, run: str, step: int, folder: Path) -> Ingredient | None:
        """An entry of this pantry holding exactly these weights (same run, step and sha256): a resumed run."""
        candidates = [i for i in self.pantry.list() if i.run == run and i.step == step]
        if not candidates:
            return None
        digests = {path.name: sha256_file(path) for path in weight_files(folder)}
        return next((i for i in candidates if i.sha256 == digests), None)

    def _checkpoint(self, args, state, step: int) -> Path | None:
        run_dir = Path(state.best_model_checkpoint).parent if state.best_model_checkpoint else Path(args.output_dir)
        folder = run_dir / f"checkpoint-{step}"
        return folder if folder.is_dir() else None

    @staticmethod
    def _run_name(args, state, folder: Path) -> str:
        name = args.run_name or Path(args.output_dir).absolute().name or "run"
        return f"{name}-{folder.parent.name}" if state.is_hyper_param_search else name


def _step_of(checkpoint: str | os.PathLike) -> int:
    match = re.search(r"checkpoint-([0-9]+)$", str(checkpoint).rstrip("/\\"))
    if match is None:
        raise SoupError(f"cannot read the step of checkpoint folder {checkpoint}; expected a name 'checkpoint-<step>'")
    return int(match.group(1))


def _metric_at(state, metric: str, step: int) -> float | None:
    """The metric logged at evaluation `step` (the value of that checkpoint, not necessarily `state.best_metric`)."""
    for entry in reversed(state.log_history):
        if entry.get("step") == step and metric in entry:
            return float(entry[metric])
    return None


def _hyperparameters(args) -> dict[str, Any]:
    values = {name: _plain(getattr(args, name)) for name in HYPERPARAMETERS if hasattr(args, name)}
    values["total_train_batch_size"] = (
        args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
    )
    return {name: value for name, value in values.items() if value is not None}


def _base_model(model) -> tuple[str | None, str | None]:
    """(name or path, revision) the model was fine-tuned from; a peft model answers for its base model."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        active = getattr(model, "active_adapter", None)
        config = peft_config.get(active) if isinstance(active, str) else None
        config = config or next(iter(peft_config.values()))
        return getattr(config, "base_model_name_or_path", None) or None, getattr(config, "revision", None)
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or None, getattr(config, "_commit_hash", None)
