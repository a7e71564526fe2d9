"""A `hyperparameter_search` (optuna, 2 trials) whose SoupCallback cooks the greedy soup, scored by the Trainer, when
the last trial ends; run by tests/test_cook_at_end.py in 1 process and under `accelerate launch` with 2.

Each rank writes `<output>.rank-<n>.json`: how often it called the cook and wrote a soup folder, and what it chose.
Offline, CPU, a from-config BERT, a few dozen rows in memory.
"""

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from hf_soup import SoupCallback, cook_at_end  # noqa: E402
from hf_soup.soup import Staging  # noqa: E402
from hf_soup.sweep import SweepCook  # noqa: E402

CALLS = {"cook": 0, "finish": 0}  # cook: SweepCook called; finish: a soup.json written (only the writer does)


def counted(owner, name: str, key: str) -> None:
    method = getattr(owner, name)

    def wrapper(*args, **kwargs):
        CALLS[key] += 1
        return method(*args, **kwargs)

    setattr(owner, name, wrapper)


counted(SweepCook, "__call__", "cook")
counted(Staging, "finish", "finish")


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    options = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=2
    )
    ids = torch.randint(0, 64, (32, 8), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})
    args = TrainingArguments(
        f"{options.output}-runs",
        run_name="hp",
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        save_total_limit=1,
        metric_for_best_model="accuracy",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )

    def model_init(trial):
        torch.manual_seed(0)
        return BertForSequenceClassification(config)

    trainer = Trainer(
        model_init=model_init, args=args, train_dataset=data, eval_dataset=data, compute_metrics=accuracy
    )
    cook = cook_at_end(method="greedy", trainer=trainer, output=f"{options.output}-soup", progress=False)
    callback = SoupCallback(f"{options.output}-pantry", split="validation", runs=2, cook=cook)
    trainer.add_callback(callback)
    rates = [1e-3, 3e-3]
    trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": trial.suggest_categorical("learning_rate", rates)},
        backend="optuna",
        n_trials=2,
        direction="maximize",
        sampler=optuna.samplers.GridSampler({"learning_rate": rates}),
    )
    result = {
        "rank": args.process_index,
        "world_size": args.world_size,
        "calls": CALLS,
        "ended": callback.ended,
        "error": None if callback.error is None else str(callback.error),
        "path": str(callback.soup.path),
        "strategy": callback.soup.record["strategy"],
    }
    Path(f"{options.output}.rank-{args.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
