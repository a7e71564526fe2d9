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
from pathlib import Path

import numpy as np


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


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
    from hf_soup.checkpoint import CheckpointReader
    from hf_soup.demo.data import vader_splits
    from hf_soup.kitchen import Kitchen
    from hf_soup.strategies import Tasting
    from hf_soup.trainer_scoring import TrainerScorer

    if args.threads:
        torch.set_num_threads(args.threads)
    pantry = Pantry(args.pantry)
    ingredients = pantry.list()
    folders = [pantry.location(i) for i in ingredients]
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
    k = len(folders)
    uniform = [1.0 / k] * k
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(CheckpointReader(f, label=i.id)) for f, i in zip(folders, ingredients)]
        via_trainer = TrainerScorer(trainer)
        trainer_tasting = Tasting(ingredients, readers, Kitchen.around(trainer.model), via_trainer, "validation")
        builtin = Scorer(
            {"validation": raw}, tokenizer=tokenizer, max_length=args.max_length, batch_size=args.batch_size
        )
        kitchen = stack.enter_context(Kitchen(folders[0], builtin.task, device_map="cpu"))
        builtin_tasting = Tasting(ingredients, readers, kitchen, builtin, "validation")
        plain_model = AutoModelForSequenceClassification.from_pretrained(folders[0])
        plain = Trainer(
            plain_model,
            training,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=accuracy,
        )

        def timed(call) -> float:
            started = time.perf_counter()
            call()
            return time.perf_counter() - started

        def write(tasting):
            tasting.mix(uniform)

        jobs = {
            "trainer.evaluate() of one loaded model": lambda: plain.evaluate(eval_dataset=encoded),
            "write the candidate in place (Trainer's model)": lambda: write(trainer_tasting),
            "candidate, Trainer path (write + score)": lambda: trainer_tasting.taste(uniform),
            "candidate, built-in path (write + score)": lambda: builtin_tasting.taste(uniform),
        }
        for call in jobs.values():  # warm-up: first calls build dataloaders, caches, the tokenised split
            call()
        times: dict[str, list[float]] = {name: [] for name in jobs}
        for _ in range(args.repeat):
            for name, call in jobs.items():
                times[name].append(timed(call))
        first = [1.0] + [0.0] * (k - 1)  # the first ingredient, which `plain` holds: the same numbers expected
        trainer_tasting.mix(first)
        builtin_tasting.mix(first)
        scores = {
            "accuracy, trainer.evaluate()": plain.evaluate(eval_dataset=encoded)["eval_accuracy"],
            "accuracy, Trainer path": via_trainer.score(trainer_tasting.kitchen.model, "validation"),
            "accuracy, built-in path": builtin.score(builtin_tasting.kitchen.model, "validation"),
        }
    plain_time = statistics.median(times["trainer.evaluate() of one loaded model"])
    rows = [
        {"what": name, "median_s": statistics.median(values), "ratio": statistics.median(values) / plain_time}
        for name, values in times.items()
    ]
    print(
        json.dumps({"rows": args.rows, "k": k, "threads": torch.get_num_threads(), "times": rows, **scores}, indent=2)
    )
    print("\n| per call | median s | × trainer.evaluate() |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['what']} | {row['median_s']:.3f} | {row['ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
