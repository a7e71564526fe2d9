"""Fine-tune k hyperparameter configurations with `SoupCallback`, show the pantry, and write a recipe to cook it.

The model and data are tiny and made up (a BERT built from a config, a toy task in memory) so the script runs
offline on a CPU in about a minute; swap in your own model, datasets and grid. Usage::

    python scripts/sweep.py --output-dir sweep -k 3
    hf-soup cook sweep/uniform.yaml
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from hf_soup.callback import SoupCallback
from hf_soup.pantry import Pantry

LEARNING_RATES = (1e-3, 5e-4, 2e-3)
SEEDS = (0, 1, 2)


def toy_split(rows: int, seed: int) -> Dataset:
    """Sequences of 8 tokens out of 64; the label says whether the first token is in the upper half."""
    ids = torch.randint(0, 64, (rows, 8), generator=torch.Generator().manual_seed(seed))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] >= 32).long().tolist()})


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def fine_tune(output_dir: Path, pantry: Path, learning_rate: float, seed: int, max_steps: int) -> None:
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=2
    )
    torch.manual_seed(0)  # one shared initialisation: a soup averages fine-tunes of the same base
    model = BertForSequenceClassification(config)
    run = f"lr{learning_rate:g}-seed{seed}"
    every = max(max_steps // 4, 1)
    args = TrainingArguments(
        output_dir=str(output_dir / "runs" / run),
        run_name=run,
        learning_rate=learning_rate,
        seed=seed,
        max_steps=max_steps,
        per_device_train_batch_size=16,
        warmup_steps=every,
        weight_decay=0.01,
        eval_strategy="steps",
        eval_steps=every,
        save_steps=every,
        save_total_limit=1,
        metric_for_best_model="accuracy",
        report_to="none",
        disable_tqdm=True,
        logging_steps=every,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=toy_split(512, seed=100 + seed),
        eval_dataset=toy_split(128, seed=7),
        compute_metrics=accuracy,
        callbacks=[SoupCallback(pantry, split="validation", tags={"sweep": "scripts/sweep.py"})],
    )
    trainer.train()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("sweep"), help="runs, pantry and recipe go here")
    parser.add_argument("-k", type=int, default=3, help="how many configurations to fine-tune (default 3)")
    parser.add_argument("--max-steps", type=int, default=40, help="training steps per run (default 40)")
    parser.add_argument("--pantry", type=Path, help="the pantry folder (default: OUTPUT_DIR/pantry)")
    options = parser.parse_args(argv)
    grid = [(learning_rate, seed) for seed, learning_rate in itertools.product(SEEDS, LEARNING_RATES)]
    if not 1 <= options.k <= len(grid):
        parser.error(f"-k must be between 1 and {len(grid)}, got {options.k}")
    output_dir = options.output_dir.absolute()
    pantry = (options.pantry or output_dir / "pantry").absolute()

    for learning_rate, seed in grid[: options.k]:
        fine_tune(output_dir, pantry, learning_rate, seed, options.max_steps)

    print(f"\npantry {pantry}:")
    print(f"{'ingredient':<22} {'learning_rate':>13} {'seed':>4} {'step':>5}  metric")
    for ingredient in Pantry(pantry).list():
        hyper = ingredient.hyperparameters
        print(
            f"{ingredient.id:<22} {hyper['learning_rate']:>13g} {hyper['seed']:>4} {ingredient.step:>5}  "
            f"{ingredient.metric}={ingredient.value:.4f} ({ingredient.split})"
        )
    recipe = output_dir / "uniform.yaml"
    recipe.write_text(
        f"method: uniform\npantry: {json.dumps(str(pantry))}\noutput: {json.dumps(str(output_dir / 'soup'))}\n"
    )
    print(f"\nrecipe written to {recipe}; cook the soup with:\n  hf-soup cook {recipe}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
