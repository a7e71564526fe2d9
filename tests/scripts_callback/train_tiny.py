"""A tiny Trainer run with SoupCallback, run as a subprocess by tests/test_callback.py.

Used for `accelerate launch --multi_gpu --num_processes 2` (one pantry entry for two ranks) and for several
processes writing to one pantry at once. Offline, CPU, from-config model, a few dozen rows in memory.
"""

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from hf_soup.callback import SoupCallback  # noqa: E402
from hf_soup.pantry import Pantry  # noqa: E402

CALLS = {"check_writable": 0, "add": 0, "remove": 0, "list": 0}
ADDING: list[float] = []  # when the first add began and the last one ended


def counted(name):
    method = getattr(Pantry, name)

    def wrapper(self, *args, **kwargs):
        CALLS[name] += 1
        begin = time.time()
        try:
            return method(self, *args, **kwargs)
        finally:
            if name == "add":
                ADDING[:] = [ADDING[0] if ADDING else begin, time.time()]

    return wrapper


for _name in CALLS:  # which rank touches the pantry, and how often
    setattr(Pantry, _name, counted(_name))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    parser.add_argument("--pantry", required=True)
    parser.add_argument("--run-name", default="tiny")
    parser.add_argument("--keep", default="best")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ready", help="a folder: start training once --writers processes have written a file there")
    parser.add_argument("--writers", type=int, default=1)
    options = parser.parse_args()
    if options.ready:
        Path(options.ready, options.run_name).write_text("ready")
        deadline = time.time() + 120
        while len(list(Path(options.ready).iterdir())) < options.writers and time.time() < deadline:
            time.sleep(0.05)

    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=2
    )
    torch.manual_seed(options.seed)
    model = BertForSequenceClassification(config)
    ids = torch.randint(0, 64, (32, 8), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})
    args = TrainingArguments(
        options.output,
        run_name=options.run_name,
        seed=options.seed,
        max_steps=options.steps,
        per_device_train_batch_size=4,
        eval_strategy="steps",
        eval_steps=options.every,
        save_steps=options.every,
        save_total_limit=1,
        metric_for_best_model="loss",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        logging_steps=options.every,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        callbacks=[SoupCallback(options.pantry, keep=options.keep, tags={"writer": options.run_name})],
    )
    trainer.train()
    state = trainer.state
    result = {"rank": args.process_index, "world_size": args.world_size, "best_metric": state.best_metric}
    result = {**result, "best": state.best_model_checkpoint, "calls": CALLS, "adding": ADDING}
    # One file per rank: the ranks share stdout, where their lines may interleave with progress bars.
    Path(f"{options.output}.result-{args.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
