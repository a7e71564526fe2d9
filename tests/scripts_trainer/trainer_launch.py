"""Cook a greedy soup scored by a Trainer, in 1 process or N under `accelerate launch`, and write what each rank saw
as JSON (the Trainer's own distributed evaluation gathers every rank's predictions)."""

import argparse
import json
from pathlib import Path

import numpy as np
from datasets import load_from_disk
from transformers import BertForSequenceClassification, Trainer, TrainingArguments

from hf_soup import SoupBuilder
from hf_soup.scoring import process_state


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ingredients", nargs="+", required=True)
    parser.add_argument("--data", required=True, help="a DatasetDict saved with save_to_disk")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    data = load_from_disk(args.data)
    training = TrainingArguments(
        f"{args.output}.trainer",
        per_device_eval_batch_size=8,
        metric_for_best_model="accuracy",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    model = BertForSequenceClassification.from_pretrained(args.ingredients[0])
    eval_dataset = {name: data[name] for name in ("validation", "test", "shift")}
    trainer = Trainer(model, training, eval_dataset=eval_dataset, compute_metrics=accuracy)
    soup = SoupBuilder(args.ingredients, method="greedy", trainer=trainer).cook(args.output, progress=False)
    state = process_state()
    result = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "trace": soup.record["strategy"]["trace"],
        "report": soup.record["report"]["rows"],
        "individuals": soup.record["report"]["individuals"],
    }
    Path(f"{args.output}.rank-{state.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
