"""Interleaved before / after timing of `hf-soup cook` (uniform) on issue 2's ingredients: is a change free?

Each tree is a folder holding an `hf_soup` package (e.g. `git archive REV hf_soup | tar -x -C DIR`); its cook runs as
`python -m hf_soup` from that folder. Rounds alternate before, after, before, after, ... so noise from a shared
machine falls on both; the first round is a warm-up, medians of the rest. `--methods` times issue 6's recipes
(`bench_methods.configs`: task_arithmetic, ties, dare_ties, slerp, against the seed-0 base) instead of or beside the
uniform soup, and `--configs` chooses the models (`small:4 large:8`).

```bash
mkdir -p /tmp/before /tmp/after
git archive 997cdcb hf_soup | tar -x -C /tmp/before && git archive HEAD hf_soup | tar -x -C /tmp/after
python scripts/bench_ab.py --before /tmp/before --after /tmp/after --work bench_work/merge --rounds 6
python scripts/bench_ab.py --before /tmp/before --after /tmp/after --methods ties dare_ties --configs small:4
```
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import helper, measure, warm, weight_paths  # noqa: E402
from bench_methods import configs  # noqa: E402

CONFIGS = [("small", 4), ("small", 8), ("large", 4), ("large", 8)]
METHODS = ["uniform", "task_arithmetic", "ties", "dare_ties", "slerp"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="folder holding the `hf_soup` package before")
    parser.add_argument("--after", type=Path, required=True, help="folder holding the `hf_soup` package after")
    parser.add_argument("--work", type=Path, default=Path("bench_work/merge"), help="issue 2's ingredients")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of (before, after); the first is a warm-up")
    parser.add_argument("--methods", nargs="+", default=["uniform"], choices=METHODS)
    parser.add_argument("--configs", nargs="+", default=[f"{s}:{k}" for s, k in CONFIGS], help="SIZE:K, e.g. small:4")
    args = parser.parse_args(argv)
    work = args.work.absolute()
    rows = []
    chosen = [(config.split(":")[0], int(config.split(":")[1])) for config in args.configs]
    for (size, k), method in [(config, method) for config in chosen for method in args.methods]:
        subprocess.run(helper("build", str(work), size, str(k)), check=True)  # once; kept between runs
        folders = [work / size / f"ingredient-{i}" for i in range(k)]
        base = work / size / "base"
        data = {"method": "uniform", "ingredients": [str(f) for f in folders]}
        if method != "uniform":  # issue 6's recipe, against the seed-0 base (built in a child: no torch here)
            code = f"import pathlib, bench_methods; bench_methods.build_base(pathlib.Path({str(work)!r}), {size!r})"
            subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)
            data = configs(folders, base)[method][0]
        recipe = work / f"ab-{size}-k{k}-{method}.yaml"
        recipe.write_text(json.dumps(data) + "\n")
        used = [Path(f) for f in data["ingredients"]] + ([base] if "base_model" in data else [])
        warm([path for folder in used for path in weight_paths(folder)])
        results: dict[str, list] = {"before": [], "after": []}
        for _ in range(args.rounds):
            for name, tree in (("before", args.before), ("after", args.after)):
                output = work / "out" / f"ab-{name}"
                shutil.rmtree(output, ignore_errors=True)
                code = f"import os, sys; os.chdir({str(tree.absolute())!r}); sys.path.insert(0, ''); "
                code += "from hf_soup.cli import main; sys.exit(main(sys.argv[1:]))"
                command = [sys.executable, "-c", code, "cook", "--quiet", str(recipe), "--output", str(output)]
                results[name].append(measure(command))
        for name, values in results.items():
            kept = values[1:]
            rows.append(
                (
                    size,
                    len(used) - ("base_model" in data),
                    method,
                    name,
                    *(statistics.median(v[i] for v in kept) for i in (0, 1)),
                    *(max(v[i] for v in kept) for i in (2, 3)),
                )
            )
    shutil.rmtree(work / "out", ignore_errors=True)
    print("| model | k | method | code | wall s (median) | CPU s | peak RSS MiB | peak anon MiB |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for size, k, method, name, wall, cpu, rss, anon in rows:
        print(f"| {size} | {k} | {method} | {name} | {wall:.2f} | {cpu:.2f} | {rss:.0f} | {anon:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
