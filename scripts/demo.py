"""The main job, end to end on models it makes itself (until `hf-soup demo` fine-tunes a real model).

It builds k tiny BERT classifiers from one initialization (each a seeded perturbation, standing in for fine-tuning
runs), puts them in a pantry, writes a recipe, cooks a uniform soup with the `hf-soup` CLI, loads it with
`from_pretrained` and checks that it is exactly the average of the ingredients.

    python scripts/demo.py [--output DIR] [--runs K]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_soup import Pantry
from hf_soup.cli import main as hf_soup


def make_runs(folder: Path, runs: int) -> list[Path]:
    config = BertConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=2
    )
    folders = []
    for run in range(runs):
        torch.manual_seed(0)  # one shared initialization
        model = BertForSequenceClassification(config)
        generator = torch.Generator().manual_seed(run + 1)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
        path = folder / f"run{run}"
        model.save_pretrained(path)
        folders.append(path)
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("demo_output"))
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args(argv)
    if args.output.exists():
        shutil.rmtree(args.output)
    runs = make_runs(args.output / "runs", args.runs)
    pantry = Pantry(args.output / "pantry")
    for i, run in enumerate(runs):
        pantry.add(run, run=f"run{i}", step=0, hyperparameters={"seed": i + 1})
    recipe = args.output / "uniform.yaml"
    recipe.write_text("method: uniform\npantry: pantry\noutput: soups/uniform\n")
    print(f"$ hf-soup pantry list {pantry.root}")
    hf_soup(["pantry", "list", str(pantry.root)])
    print(f"\n$ hf-soup cook {recipe}")
    code = hf_soup(["cook", str(recipe), "--quiet"])
    if code:
        return code
    soup = BertForSequenceClassification.from_pretrained(args.output / "soups" / "uniform")
    models = [BertForSequenceClassification.from_pretrained(run) for run in runs]
    worst = max(
        (tensor - sum(m.state_dict()[name] for m in models) / len(models)).abs().max().item()
        for name, tensor in soup.state_dict().items()
    )
    logits = soup(input_ids=torch.tensor([[1, 5, 9, 2]])).logits
    print(f"\nsoup loads with from_pretrained; max |soup - mean of runs| = {worst:.1e}; logits {logits.tolist()}")
    return 0 if worst < 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
