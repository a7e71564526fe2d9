"""Benchmark of issue 17: the cost of scoring one candidate soup with the user's Trainer (`TrainerScorer`) and with
hf_soup's built-in scorer, against one plain `trainer.evaluate()` of a loaded model on the same split, in one run.

Ingredients: the fine-tunes of a pantry (by default `hf-soup demo`'s: real all-MiniLM-L6-v2 sentiment classifiers on
the VADER movie sentences); split: the demo's validation sentences. Each timed call is repeated and interleaved
with the others, medians reported; the candidate is the uniform soup, written in place before each score.

```bash
python scripts/bench_trainer.py --pantry demo_output/pantry --rows 300 --repeat 5
```
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def time_candidates(pantry, trainer, builtin, split: str, baseline: tuple[str, Callable[[], float]], *, repeat: int):
    """Time, interleaved (`repeat` rounds after one warm-up call each, medians): `baseline` (a name and a call of a
    plain evaluation of one loaded model that returns its score), writing the uniform soup of `pantry` in place into
    the Trainer's model, and scoring that candidate through the Trainer path (`TrainerScorer(trainer)`, write +
    score) and the built-in path (`builtin`, a `Scorer`, in its own resident model; write + score), on `split`.
    Then the first ingredient is written into both resident models and scored: the same numbers as the baseline
    (which must hold the first ingredient) are expected. Returns `{"k", "times": [{what, median_s, ratio}],
    "scores"}`."""
    from hf_soup.checkpoint import CheckpointReader
    from hf_soup.kitchen import Kitchen
    from hf_soup.strategies import Tasting
    from hf_soup.trainer_scoring import TrainerScorer

    ingredients = pantry.list()
    folders = [pantry.location(i) for i in ingredients]
    k = len(folders)
    uniform = [1.0 / k] * k
    baseline_name, baseline_call = baseline
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(CheckpointReader(f, label=i.id)) for f, i in zip(folders, ingredients)]
        via_trainer = TrainerScorer(trainer)
        trainer_tasting = Tasting(ingredients, readers, Kitchen.around(trainer.model), via_trainer, split)
        kitchen = stack.enter_context(Kitchen(folders[0], builtin.task, device_map="cpu"))
        builtin_tasting = Tasting(ingredients, readers, kitchen, builtin, split)
        jobs = {
            baseline_name: baseline_call,
            "write the candidate in place (Trainer's model)": lambda: trainer_tasting.mix(uniform),
            "candidate, Trainer path (write + score)": lambda: trainer_tasting.taste(uniform),
            "candidate, built-in path (write + score)": lambda: builtin_tasting.taste(uniform),
        }
        for call in jobs.values():  # warm-up: first calls build dataloaders, caches, the tokenised split
            call()
        times: dict[str, list[float]] = {name: [] for name in jobs}
        for _ in range(repeat):
            for name, call in jobs.items():
                started = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - started)
        first = [1.0] + [0.0] * (k - 1)
        trainer_tasting.mix(first)
        builtin_tasting.mix(first)
        metric = via_trainer.metric.name
        scores = {
            f"{metric}, {baseline_name}": baseline_call(),
            f"{metric}, Trainer path": via_trainer.score(trainer_tasting.kitchen.model, split),
            f"{builtin.metric.name}, built-in path": builtin.score(builtin_tasting.kitchen.model, split),
        }
    plain_time = statistics.median(times[baseline_name])
    rows = [
        {"what": name, "median_s": statistics.median(values), "ratio": statistics.median(values) / plain_time}
        for name, values in times.items()
    ]
    return {"k": k, "repeat": repeat, "times": rows, "scores": scores}


def timing_table(rows: list[dict], baseline: str) -> str:
    """The timing rows as a Markdown table."""
    lines = [f"| per call | median s | × {baseline} |", "|---|---:|---:|"]
    lines += [f"| {row['what']} | {row['median_s']:.3f} | {row['ratio']:.3f} |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pantry", type=Path, required=True, help="a pantry of fine-tunes of one base")
    parser.add_argument("--rows", type=int, default=300, help="validation sentences (the demo's default split)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)

    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from hf_soup import Pantry, Scorer
    from hf_soup.demo.data import vader_splits

    if args.threads:
        torch.set_num_threads(args.threads)
    pantry = Pantry(args.pantry)
    folders = [pantry.location(i) for i in pantry.list()]
    tokenizer = AutoTokenizer.from_pretrained(folders[0])
    # movie sentences after the first 1000 (the demo's largest training split): unseen by its fine-tunes
    raw = vader_splits(1000, args.rows, 0, 0, sort_by_length=True)["validation"]
    encoded = raw.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length), batched=True)
    encoded = encoded.remove_columns(["text"])
    training = TrainingArguments(
        "/tmp/hf_soup-bench-trainer",
        per_device_eval_batch_size=args.batch_size,
        metric_for_best_model="accuracy",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(
        AutoModelForSequenceClassification.from_pretrained(folders[0]),
        training,
        eval_dataset={"validation": encoded},
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    plain = Trainer(
        AutoModelForSequenceClassification.from_pretrained(folders[0]),
        training,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    builtin = Scorer({"validation": raw}, tokenizer=tokenizer, max_length=args.max_length, batch_size=args.batch_size)
    measured = time_candidates(
        pantry,
        trainer,
        builtin,
        "validation",
        ("trainer.evaluate() of one loaded model", lambda: plain.evaluate(eval_dataset=encoded)["eval_accuracy"]),
        repeat=args.repeat,
    )
    print(json.dumps({"rows": args.rows, "threads": torch.get_num_threads(), **measured}, indent=2))
    print("\n" + timing_table(measured["times"], "trainer.evaluate()"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
