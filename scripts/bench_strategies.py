"""Benchmark of issue 20 (parts 2 and 3): what a strategy costs beyond the evaluation itself.

1. The greedy cook of issue 4 (its pantry of MiniLM fine-tunes, its 500 validation sentences, batch 64, 64 tokens)
   against a plain PyTorch loop that scores the same candidates: all state dicts loaded with `safetensors`, each
   candidate averaged in fp32 and `load_state_dict`'d into one model, the same rows tokenised once and batched in
   the same order (longest first) under `torch.inference_mode`, accuracy; the greedy rule over the pantry's recorded
   scores, as the cook reuses them; the soup saved with `save_pretrained`. Both run in this process, alternated, after
   a warm-up; the plain loop must reach the same trace and the same accuracies.
2. Greedy and learned soups over the LoRA adapters of issue 5 against the same strategy over the adapters merged into
   full models first (merging not counted), each a child process timing the cook alone: adapters with the automatic
   choice (`auto`), forced `in_place`, forced `branches` (the way before issue 20), and full models. Every
   individual is scored (no recorded scores) so that both sides do the same evaluations: 11 for greedy over 6.
   With `--rounds N`, also one candidate (the uniform soup of all, through `taste_uniform` as greedy tastes it) and
   one learned step (`backward`, 32 rows, by layer) timed in turn for each way in one process, N rounds after a
   warm-up: on a shared machine the load then falls alike on every way.
3. With `--before DIR` (a checkout of hf_soup before this change), the same cooks run with that code in child
   processes, and their traces and scores are compared with this code's.

Usage::

    python scripts/bench_strategies.py --soups-work bench_work/soups --adapters-work bench_work/adapters \\
        --work bench_work/strategies --repeat 3 --threads 1 --rounds 5 --before /path/to/old/checkout \\
        --mixings auto --once branches
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_LENGTH, BATCH_SIZE = 64, 64
LEARNED = {"epochs": 1, "batch_size": 32}  # issue 5's cost rows: one epoch


def in_memory(folder: Path, split: str):
    """One split of a saved DatasetDict, copied into memory (nothing is ever written beside the original)."""
    import datasets

    return datasets.Dataset.from_dict(datasets.load_from_disk(str(folder))[split].to_dict())


def vm(field: str) -> float:
    """MB of this process from /proc/self/status (`VmHWM`: peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no {field} in /proc/self/status (Linux only)")


# -- 1. the greedy cook against a plain PyTorch loop ---------------------------------------------------------------
def cook_greedy(pantry: Path, validation, out: Path) -> dict:
    from hf_soup import SoupBuilder

    evaluation = {"splits": {"validation": validation}, "selection_split": "validation", "metric": "accuracy",
                  "compare": [], "max_length": MAX_LENGTH, "batch_size": BATCH_SIZE}  # fmt: skip
    started = time.perf_counter()
    soup = SoupBuilder(pantry=str(pantry), method="greedy", evaluation=evaluation).cook(
        out, overwrite=True, progress=False
    )
    seconds = time.perf_counter() - started
    strategy, report = soup.record["strategy"], soup.record["report"]
    trace = [[step["id"], step["score"], step["accepted"]] for step in strategy["trace"]]
    return {"seconds": seconds, "trace": trace, "evaluations": strategy["evaluations"], "dtype": report.get("dtype"),
            "report": {name: scores["validation"] for name, scores in report["individuals"].items()}
            | {"greedy": report["rows"]["greedy"]["validation"]}}  # fmt: skip


def plain_greedy(pantry: Path, validation, out: Path) -> dict:
    """The greedy soup as a plain PyTorch script would compute it, scoring the same candidates."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_soup import Pantry

    started = time.perf_counter()
    shelf = Pantry(pantry)
    ingredients = shelf.list()
    folders = [shelf.location(i) for i in ingredients]
    tokenizer = AutoTokenizer.from_pretrained(folders[0])
    encoded = tokenizer(list(validation["text"]), truncation=True, max_length=MAX_LENGTH)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    rows = sorted(range(len(lengths)), key=lambda row: -lengths[row])
    labels = torch.tensor(list(validation["label"]))
    batches = []
    for start in range(0, len(rows), BATCH_SIZE):
        chosen = rows[start : start + BATCH_SIZE]
        batch = tokenizer.pad([{k: encoded[k][r] for k in encoded} for r in chosen], return_tensors="pt")
        batches.append((dict(batch), labels[chosen]))
    states = [load_file(str(folder / "model.safetensors")) for folder in folders]
    model = AutoModelForSequenceClassification.from_pretrained(folders[0]).eval()

    def uniform(members: list[int]) -> dict:
        first = states[members[0]]
        return {
            name: sum(states[i][name].float() for i in members) / len(members) if first[name].is_floating_point()
            else first[name]
            for name in first
        }  # fmt: skip

    def accuracy(state: dict) -> float:
        model.load_state_dict(state, strict=False)
        right = 0
        with torch.inference_mode():
            for batch, truth in batches:
                right += int((model(**batch).logits.argmax(-1) == truth).sum())
        return right / len(rows)

    ranking = sorted(range(len(ingredients)), key=lambda i: (-ingredients[i].value, i))
    best, kept = float(ingredients[ranking[0]].value), [ranking[0]]
    trace = [[ingredients[ranking[0]].id, best, True]]
    scoring = 0.0
    for candidate in ranking[1:]:
        state = uniform([*kept, candidate])
        tick = time.perf_counter()
        score = accuracy(state)
        scoring += time.perf_counter() - tick
        trace.append([ingredients[candidate].id, score, score >= best])
        if score >= best:
            kept, best = [*kept, candidate], score
    greedy_seconds = time.perf_counter() - started
    # what the cook's report scores on the selection split: every individual, and the soup served as weights 1/n
    report = {ingredient.id: accuracy(state) for ingredient, state in zip(ingredients, states)}
    soup = {}
    for name, tensor in states[kept[0]].items():
        if tensor.is_floating_point():
            soup[name] = states[kept[0]][name].float() * (1 / len(kept))
            for i in kept[1:]:
                soup[name].add_(states[i][name].float(), alpha=1 / len(kept))
        else:
            soup[name] = tensor
    report["greedy"] = accuracy(soup)
    model.load_state_dict(uniform(kept), strict=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"seconds": time.perf_counter() - started, "greedy_seconds": greedy_seconds, "scoring_seconds": scoring,
            "trace": trace, "report": report}  # fmt: skip


def greedy_rounds(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    pantry = args.soups_work / "pantry"
    validation = in_memory(args.soups_work / "data" / "splits", "validation")
    work = args.work / "greedy"
    results = {"cook": [], "plain": []}
    plain_greedy(pantry, validation, work / "warm-plain")  # warm-up: imports, page cache, first-call costs
    cook_greedy(pantry, validation, work / "warm")
    for _ in range(args.repeat):
        results["cook"].append(cook_greedy(pantry, validation, work / "cook"))
        results["plain"].append(plain_greedy(pantry, validation, work / "plain"))
    if args.before:
        results["before"] = [child(args, "soups-greedy", args.before)]
    return results


# -- 2. strategies over adapters against merged full models (child processes) --------------------------------------
def adapter_cook(args, contender: str) -> dict:
    """One cook in this process: `adapter-<strategy>-<mixing>` (`before`: the code on PYTHONPATH, as it is) or
    `full-<strategy>`; `soups-greedy` is part 1's cook. Returns seconds and the choice."""
    import functools

    import torch

    from hf_soup import Pantry, SoupBuilder

    torch.set_num_threads(args.threads)
    if contender == "soups-greedy":
        validation = in_memory(args.soups_work / "data" / "splits", "validation")
        return cook_greedy(args.soups_work / "pantry", validation, args.work / "out" / contender)
    kind, strategy, *rest = contender.split("-")
    validation = in_memory(args.adapters_work / "data" / "splits", "validation")
    evaluation = {"splits": {"validation": validation}, "selection_split": "validation", "compare": [],
                  "max_length": MAX_LENGTH, "batch_size": BATCH_SIZE, "reuse_recorded_scores": False}  # fmt: skip
    if kind == "adapter":
        shelf = Pantry(args.adapters_work / "pantry")
        folders = [shelf.location(i) for i in shelf.list()]
        if rest and rest[0] != "before":
            import hf_soup.adapters.cooking as cooking

            cooking.AdapterTasting = functools.partial(cooking.AdapterTasting, mixing=rest[0])
    else:
        folders = sorted((args.work / "merged").iterdir())
    options = LEARNED if strategy == "learned" else {}
    builder = SoupBuilder(folders, method=strategy, evaluation=evaluation, **options)
    started = time.perf_counter()
    soup = builder.cook(args.work / "out" / contender, overwrite=True, progress=False)
    seconds = time.perf_counter() - started
    record = soup.record["strategy"]
    return {
        "seconds": seconds,
        "peak_rss_mb": vm("VmHWM"),
        "score": record["score"],
        "evaluations": record["evaluations"],
        "trace": [(step["id"].split("-")[0], step["score"], step["accepted"]) for step in record.get("trace") or []],
        "alpha_mean": record.get("alpha_mean"),
        "loss_per_epoch": record.get("loss_per_epoch"),
        "mixing": soup.record["report"].get("adapter_mixing"),
    }


def child(args, contender: str, pythonpath: Path | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(pythonpath or Path(__file__).absolute().parents[1])
    command = [sys.executable, __file__, "--work", str(args.work), "--threads", str(args.threads),
               "--child", contender]  # fmt: skip
    for option, folder in (("--adapters-work", args.adapters_work), ("--soups-work", args.soups_work)):
        command += [option, str(folder)] if folder else []
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{contender} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def merged_models(args) -> None:
    """Every adapter merged into its own full model once (`merge_and_unload`), as issue 5's full-first way."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_adapters import merge_each

    from hf_soup import Pantry

    if (args.work / "merged").is_dir():
        return
    shelf = Pantry(args.adapters_work / "pantry")
    folders = [shelf.location(i) for i in shelf.list()]
    merge_each(folders, args.adapters_work / "base", args.work / "merged")


def adapter_rounds(args) -> dict:
    merged_models(args)
    contenders = []
    for strategy in ("greedy", "learned"):
        contenders += [f"adapter-{strategy}-{mixing}" for mixing in args.mixings.split(",")]
        contenders.append(f"full-{strategy}")
    results: dict[str, list] = {c: [] for c in contenders}
    for _ in range(args.repeat):
        for contender in contenders:
            results[contender].append(child(args, contender))
    for strategy in ("greedy", "learned"):  # the way before issue 20, once for reference
        if args.once:
            results[f"adapter-{strategy}-{args.once}"] = [child(args, f"adapter-{strategy}-{args.once}")]
    if args.before:
        for strategy in ("greedy", "learned"):
            results[f"adapter-{strategy}-before"] = [child(args, f"adapter-{strategy}-before", args.before)]
    return results


def interleaved(args) -> dict:
    """One candidate and one learned step, timed in turn for each way, round after round in one process, so that
    the load of a shared machine falls alike on all: adapters in place, adapters with branches, merged full models."""
    import torch

    from hf_soup import Pantry, Scorer
    from hf_soup.adapters import AdapterTasting, read_adapter
    from hf_soup.checkpoint import CheckpointReader
    from hf_soup.ingredient import Ingredient
    from hf_soup.kitchen import Kitchen
    from hf_soup.strategies import Tasting

    torch.set_num_threads(args.threads)
    merged_models(args)
    validation = in_memory(args.adapters_work / "data" / "splits", "validation")
    shelf = Pantry(args.adapters_work / "pantry")
    folders = [shelf.location(i) for i in shelf.list()]
    full = sorted((args.work / "merged").iterdir())
    base = args.adapters_work / "base"
    from transformers import AutoTokenizer

    def scorer():
        return Scorer({"validation": validation}, tokenizer=AutoTokenizer.from_pretrained(base),
                      max_length=MAX_LENGTH, batch_size=BATCH_SIZE)  # fmt: skip

    tastings = {
        mixing: AdapterTasting([Ingredient.from_folder(f) for f in folders], [read_adapter(f) for f in folders], base,
                               scorer(), "validation", mixing=mixing)
        for mixing in ("in_place", "branches")
    }  # fmt: skip
    readers = [CheckpointReader(folder) for folder in full]
    full_scorer = scorer()
    tastings["full"] = Tasting([Ingredient.from_folder(f) for f in full], readers,
                               Kitchen(full[0], full_scorer.task), full_scorer, "validation")  # fmt: skip
    weights = [1.0 / len(folders)] * len(folders)  # the uniform soup of all: one candidate of the greedy soup
    data = full_scorer.split("validation")
    batch = full_scorer.collator([data[i] for i in range(LEARNED["batch_size"])])
    times: dict[str, dict[str, list[float]]] = {"candidate": {}, "learned step": {}}
    scores: dict[str, list[float]] = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        names = list(tastings)
        names = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in names:
            tasting = tastings[name]
            started = time.perf_counter()
            score = tasting.taste_uniform(list(range(len(weights))))  # full models: greedy's running sum, kept
            candidate = time.perf_counter() - started
            groups = tasting.groups("layer")
            alpha = torch.full((max(groups.values()) + 1, len(weights)), 1.0 / len(weights))
            started = time.perf_counter()
            loss, _ = tasting.backward(alpha, groups, batch, torch.tensor(1.0))
            step = time.perf_counter() - started
            if round_:
                times["candidate"].setdefault(name, []).append(candidate)
                times["learned step"].setdefault(name, []).append(step)
                scores.setdefault(name, []).append(score)
    plans = {name: tastings[name].summary().get("adapter_mixing") for name in ("in_place", "branches")}
    return {"times": times, "scores": scores, "plans": plans, "rows": len(data)}


# -- report --------------------------------------------------------------------------------------------------------
def median(runs: list[dict], key: str = "seconds") -> float:
    return statistics.median(run[key] for run in runs)


def markdown(results: dict) -> str:
    lines = []
    greedy = results.get("greedy")
    if greedy:
        cook, plain = median(greedy["cook"]), median(greedy["plain"])
        lines += ["| greedy, issue 4 pantry | seconds (median) | all runs | × plain loop |", "|---|---:|---|---:|"]
        rows = [("hf-soup cook (7 candidates + the report's 9 evaluations)", greedy["cook"], "seconds"),
                ("plain PyTorch loop, the same 16 evaluations", greedy["plain"], "seconds"),
                ("plain PyTorch loop, the 7 greedy candidates only", greedy["plain"], "greedy_seconds")]  # fmt: skip
        for name, runs, key in rows:
            every = " / ".join(f"{r[key]:.1f}" for r in runs)
            lines.append(f"| {name} | {median(runs, key):.1f} | {every} | {median(runs, key) / plain:.3f} |")
        rounds = ", ".join(f"{c['seconds'] / p['seconds']:.3f}" for c, p in zip(greedy["cook"], greedy["plain"]))
        lines.append(f"\ncook / plain loop per round: {rounds}; of the medians: {cook / plain:.3f}")
        same = all(
            c["trace"] == p["trace"] and c["report"] == p["report"] for c, p in zip(greedy["cook"], greedy["plain"])
        )
        lines.append(f"same trace and accuracies as the plain loop: {same}")
        for before in greedy.get("before", []):
            same = before["trace"] == greedy["cook"][0]["trace"] and before["report"] == greedy["cook"][0]["report"]
            lines.append(f"same trace and accuracies as the code before: {same}")
    turns = results.get("interleaved")
    if turns:
        header = f"| interleaved ({turns['rows']} rows) | way | seconds (median) | × full models (median of rounds) |"
        lines += ["", header, "|---|---|---:|---:|"]
        for what, ways in turns["times"].items():
            for name, seconds in ways.items():
                ratios = [a / b for a, b in zip(seconds, ways["full"])]
                lines.append(
                    f"| {what} | {name} | {statistics.median(seconds):.2f} | {statistics.median(ratios):.3f} |"
                )
        lines.append(f"scores of the candidate: {json.dumps({k: v[0] for k, v in turns['scores'].items()})}")
    adapters = results.get("adapters")
    if adapters:
        lines += ["", "| strategy | contender | seconds (median) | all runs | × full models | peak RSS MB | score |",
                  "|---|---|---:|---|---:|---:|---:|"]  # fmt: skip
        for strategy in ("greedy", "learned"):
            full = median(adapters[f"full-{strategy}"])
            for contender, runs in adapters.items():
                if contender.split("-")[1] != strategy:
                    continue
                every = " / ".join(f"{r['seconds']:.1f}" for r in runs)
                lines.append(
                    f"| {strategy} | {contender} | {median(runs):.1f} | {every} | {median(runs) / full:.3f} | "
                    f"{median(runs, 'peak_rss_mb'):.0f} | {runs[0]['score']:.4f} |"
                )
        for strategy in ("greedy", "learned"):
            ours = adapters[f"adapter-{strategy}-auto"][0]
            for contender, runs in adapters.items():
                if contender.startswith(f"adapter-{strategy}-") and contender != f"adapter-{strategy}-auto":
                    lines.append(f"{contender} against auto: {agreement(ours, runs[0])}")
    return "\n".join(lines)


def agreement(ours: dict, theirs: dict) -> str:
    """How two cooks' choices compare: the same trace (ids, accepted), and the largest score or coefficient gap."""
    same = [step[::2] for step in ours["trace"]] == [step[::2] for step in theirs["trace"]]
    gaps = [abs(a[1] - b[1]) for a, b in zip(ours["trace"], theirs["trace"])] + [abs(ours["score"] - theirs["score"])]
    if ours.get("alpha_mean"):
        gaps += [abs(a - b) for a, b in zip(ours["alpha_mean"], theirs["alpha_mean"])]
    return f"same trace {same}, largest gap in scores and mean coefficients {max(gaps):.2e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soups-work", type=Path, help="issue 4's work folder (its pantry and data; read only)")
    parser.add_argument("--adapters-work", type=Path, help="issue 5's work folder (its pantry, base and data)")
    parser.add_argument("--work", type=Path, default=Path("bench_work/strategies"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before", type=Path, help="a checkout of hf_soup before issue 20, to compare outputs")
    parser.add_argument("--rounds", type=int, default=0, help="rounds of the interleaved adapter timing (0: none)")
    parser.add_argument("--mixings", default="auto,in_place,branches", help="adapter ways timed every round")
    parser.add_argument("--once", help="an adapter way timed once after the rounds, for reference (e.g. branches)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.work = args.work.absolute()
    if args.child:
        print(json.dumps(adapter_cook(args, args.child)))
        return 0
    results_file = args.work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if args.soups_work and "greedy" not in results:
        results["greedy"] = greedy_rounds(args)
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=1) + "\n")
    if args.adapters_work and args.rounds and "interleaved" not in results:
        results["interleaved"] = interleaved(args)
        results_file.write_text(json.dumps(results, indent=1) + "\n")
    if args.adapters_work and "adapters" not in results:
        results["adapters"] = adapter_rounds(args)
        results_file.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
