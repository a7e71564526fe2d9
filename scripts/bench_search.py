"""Benchmark of issue 10: the search strategy on the real ingredients of issue 4, against greedy and learned.

Reuses `scripts/bench_soups.py`'s work folder (8 all-MiniLM-L6-v2 fine-tunes on VADER movie snippets, in a pantry,
and their splits; run that script first). Cooks, each with a budget of `--trials` trials (TPE, seed 0):

- `weights`: the weighted soup's k weights (k-dimensional, each in [0, 1], normalised);
- `ties`: TIES density × scale (density in [0.1, 1], scale in [0.5, 2]; base = the shared initialization);
- `greedy-alpha`: the α-blend greedy soup with α from {0.25, 0.5, 0.75};
- `ties-off`: the `ties` search with `cache: off` (every trial recomputes TIES), its first 10 trials: the uncached
  trial cost, and the same proposals and scores as `ties`'s first 10 when the cache changes nothing.

Each soup is then scored on the test split and the three shifts. Time per trial is compared with one plain
evaluation measured inside the same trials (the scorer's forward passes), so the ratio does not depend on what
else the machine runs. Usage::

    python scripts/bench_search.py --soups-work bench_work/soups --work bench_work/search --trials 50 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_soups import SHIFTS, evaluation, read_json, write_json  # noqa: E402

SPLITS = ("validation", "test", *SHIFTS)
COOKS = {
    "weights": {"method": "search", "merge": "weighted", "space": {"weights": {"low": 0.0, "high": 1.0}}},
    "ties": {
        "method": "search",
        "merge": "ties",
        "space": {"density": {"low": 0.1, "high": 1.0}, "scale": {"low": 0.5, "high": 2.0}},
        "base": True,
    },
    "greedy-alpha": {"method": "greedy", "alpha": [0.25, 0.5, 0.75]},
}
COOKS["ties-off"] = {**COOKS["ties"], "cache": "off", "trials": 10}


def cook(soups_work: Path, work: Path, name: str, ids: list[str], data, trials: int) -> dict:
    """Cook one soup through the public API, timing each scorer call; then score it on every split."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_soup import SoupBuilder
    from hf_soup.evaluation import Evaluation

    options = dict(COOKS[name])
    if options.pop("base", False):
        options["base_model"] = str(soups_work / "init")
    if options["method"] == "search":
        options.setdefault("trials", trials)
        options["sampler"] = "tpe"
    timers = Timers()
    try:
        started = time.perf_counter()
        builder = SoupBuilder(
            pantry=str(soups_work / "pantry"), select=ids, evaluation=evaluation(data, [], ("validation",)), **options
        )
        soup = builder.cook(work / "soups" / name, overwrite=True, progress=False)
        wall = time.perf_counter() - started
    finally:
        timers.restore()
    strategy = soup.record["strategy"]
    mapping = evaluation(data, [], SPLITS)
    scorer = Evaluation.from_mapping(mapping, base_dir=work, source="bench").scorer(
        AutoTokenizer.from_pretrained(soups_work / "init")
    )
    model = AutoModelForSequenceClassification.from_pretrained(soup.path)
    scores = {split: scorer.score(model, split) for split in SPLITS}
    result = {"wall_s": wall, "scores": scores, "strategy": strategy}
    if options["method"] == "search":
        result["trials"] = timers.totals  # seconds summed over this cook's trials: total, score, merge, write
    return result


class Timers:
    """Time spent inside the search's trials (`hf_soup.strategies.search._taste`): in all, scoring (the
    scorer's forward passes), computing the candidate's tensors (`merge_tensor`, `TrialCache.merge` or
    `Tasting.combine`) and writing them into the resident model (`Kitchen.write`)."""

    def __init__(self):
        import hf_soup.strategies.search as search
        import hf_soup.strategies.tasting as tasting
        from hf_soup.kitchen import Kitchen
        from hf_soup.scoring import Scorer
        from hf_soup.strategies.trial_cache import TrialCache

        self.totals = {"count": 0, "total": 0.0, "score": 0.0, "merge": 0.0, "write": 0.0}
        self.inside, self.originals = False, []
        self.wrap(search, "_taste", "total", outer=True)
        self.wrap(Scorer, "outputs", "score")
        self.wrap(tasting, "merge_tensor", "merge")
        self.wrap(tasting.Tasting, "combine", "merge")
        self.wrap(TrialCache, "merge", "merge")
        self.wrap(Kitchen, "write", "write")

    def wrap(self, owner, attribute: str, key: str, outer: bool = False) -> None:
        original = getattr(owner, attribute)
        self.originals.append((owner, attribute, original))

        def timed(*args, **kwargs):
            if not (outer or self.inside):
                return original(*args, **kwargs)
            self.inside = True
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.totals[key] += time.perf_counter() - started
                if outer:
                    self.inside = False
                    self.totals["count"] += 1

        setattr(owner, attribute, timed)

    def restore(self) -> None:
        for owner, attribute, original in self.originals:
            setattr(owner, attribute, original)


def markdown(results: dict, soups: dict, data) -> str:
    def cells(scores: dict) -> str:
        values = [100 * scores[s] for s in SPLITS] + [100 * sum(scores[s] for s in SHIFTS) / len(SHIFTS)]
        return " | ".join(f"{v:.2f}" for v in values) + " |"

    rows = soups["report"]["rows"]
    header = " | ".join(SPLITS) + " | mean shift |"
    lines = [f"| accuracy (%) | {header}", "|---|" + "---:|" * (len(SPLITS) + 1)]
    for label in ("best individual", "uniform", "greedy", "learned"):
        lines.append(f"| {label} (issue 4) | " + cells(rows[label]))
    for name, result in results.items():
        lines.append(f"| {name} | " + cells(result["scores"]))
    lines += [
        "",
        "| cook | trials | best parameters | s per trial | of which: scoring | candidate's tensors | writes into the "
        "model | trial / scoring | wall (s) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        strategy = result["strategy"]
        if "history" not in strategy:
            kept = ", ".join(f"{i.split('-')[0]} {c:.3f}" for i, c in strategy["coefficients"].items())
            lines.append(
                f"| {name} | {strategy['evaluations']} evaluations | {kept} | | | | | | {result['wall_s']:.0f} |"
            )
            continue
        best = ", ".join(f"{k} {v:.3f}" for k, v in strategy["best_parameters"].items())
        t = {k: v / result["trials"]["count"] for k, v in result["trials"].items() if k != "count"}
        lines.append(
            f"| {name} | {len(strategy['history'])} | {best} | {t['total']:.2f} | {t['score']:.2f} | "
            f"{t['merge']:.2f} | {t['write']:.2f} | {t['total'] / t['score']:.3f} | {result['wall_s']:.0f} |"
        )
    for name, result in results.items():
        cache = result["strategy"].get("cache")
        if cache and cache["setting"] == "off":
            lines.append(f"\n- {name}: cache off, every tensor recomputed in every trial")
        elif cache:
            lines.append(
                f"\n- {name}: cache {cache['setting']} kept {cache['kept']} for {cache['cached_tensors']} tensors "
                f"({cache['bytes'] / 1e9:.2f} GB of a {cache['budget_bytes'] / 1e9:.2f} GB budget; "
                f"{cache['recomputed_tensors']} recomputed), built in {cache['seconds']:.1f} s before the first trial"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soups-work", type=Path, default=Path("bench_work/soups"), help="bench_soups.py's folder")
    parser.add_argument("--work", type=Path, default=Path("bench_work/search"))
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--cooks", nargs="*", default=list(COOKS), choices=list(COOKS))
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--recook", action="store_true", help="cook again even when results exist")
    args = parser.parse_args(argv)
    if args.threads:
        __import__("torch").set_num_threads(args.threads)
    soups_work, work = args.soups_work.absolute(), args.work.absolute()
    soups = read_json(soups_work / "cook.json")
    if soups is None:
        parser.error(f"{soups_work} has no cook.json: run scripts/bench_soups.py first")
    import datasets

    data = datasets.load_from_disk(str(soups_work / "data" / "splits"))
    ids = list(soups["pantry"])
    results = {}
    for name in args.cooks:
        path = work / f"{name}.json"
        result = None if args.recook else read_json(path)
        if result is None:
            (work / "soups" / f"{name}.study.log").unlink(missing_ok=True)  # a new study, not a resumed one
            print(f"cooking {name}", file=sys.stderr, flush=True)
            result = cook(soups_work, work, name, ids, data, args.trials)
            write_json(path, result)
        results[name] = result
    text = markdown(results, soups, data)
    (work / "report.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
