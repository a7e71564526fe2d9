"""Benchmark of issue 19: TIES and DARE with `device: cuda` against hf_soup's CPU path and mergekit's `--cuda`.

On issue 2's Llama ingredients (`scripts/bench_merge.py`'s recipe: a seed-0 Llama plus seeded noise per ingredient,
fp32) and their seed-0 base, each method runs as `hf-soup cook` with `device: cuda`, with the default CPU, and as
`mergekit-yaml --cuda` (plus `mergekit-yaml` on the CPU with `--mergekit-cpu`): each its own process, after an
untimed warm-up round, page cache warmed before each run. It reports wall and CPU seconds, peak RSS and peak GPU
memory (`torch.cuda.max_memory_reserved`, read at exit), and how far the outputs are apart:

- *cuda vs cpu*: hf_soup's GPU soup against its CPU soup, max |a − b| / max |b| over all tensors, and the share of
  entries left at the base in one soup and not in the other (TIES: the trim; DARE: the masks; 0 means the same
  entries, i.e. the same masks from the same seed);
- *vs mergekit*: hf_soup's GPU soup against mergekit's (`bench_methods.difference`; for DARE the masks are random
  in both tools, so compare the changed share and mean |θ − θ_base|).

The recipes are issue 6's (`bench_methods.configs`): `ties` density 0.5, `dare` drop_rate 0.5 with `merge: ties`
against mergekit's `dare_ties` density 0.5 with `normalize: true`.

    python scripts/bench_device.py --size small --k 4 --repeat 2 --markdown

On the device machine (an H200 with torch but without mergekit): mergekit and the packages it needs that the
machine lacks travel as wheels. Here, in the repository root, once:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl \\
        mergekit==0.1.5 pydantic==2.11.7 pydantic-core==2.33.2 annotated-types==0.7.0 typing-inspection==0.4.1 \\
        immutables==0.21

then one `run` with `carry: [".whl"]` and `timeout_s` 540:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \\
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && \\
    python3 scripts/bench_device.py --work /tmp/bench --size small --k 4 --repeat 2 --markdown \\
        --json $OUT/device.json 2>&1 | tee $OUT/device.log

(building the small ingredients takes about a minute there; `--size large` triples the model.) Without a GPU the
script says so and measures the CPU contenders only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import measure, warm, weight_paths  # noqa: E402

# Runs `module:function` as a program (its argv after the target) and, at exit, writes the process's peak reserved
# GPU memory to the file named by BENCH_GPU_PEAK (nothing when CUDA was never used).
WRAPPER = """
import atexit, importlib, os, sys
target = sys.argv[1]
sys.argv = sys.argv[1:]
def report():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        with open(os.environ["BENCH_GPU_PEAK"], "w") as handle:
            handle.write(str(torch.cuda.max_memory_reserved()))
atexit.register(report)
module, _, function = target.partition(":")
sys.exit(getattr(importlib.import_module(module), function)())
"""
METHODS = ("ties", "dare_ties")


def wrapped(target: str, *args: str) -> list[str]:
    return [sys.executable, "-c", WRAPPER, target, *args]


def child(mode: str, rest: list[str]) -> int:
    """Building and comparing run in children, so that the parent stays small (a child's ru_maxrss starts from its
    parent's peak RSS) and never initialises CUDA."""
    if mode == "build":
        from bench_merge import build
        from bench_methods import build_base

        work, size, k = Path(rest[0]), rest[1], int(rest[2])
        build(work, size, k)
        build_base(work, size)
        import torch

        print(json.dumps({"cuda": torch.cuda.is_available(), "gpu": _gpu_name(torch)}))
        return 0
    if mode == "compare":
        job = json.loads(rest[0])
        result = {}
        if job.get("cpu") and job.get("cuda"):
            result["cuda_vs_cpu"] = devices_apart(Path(job["cuda"]), Path(job["cpu"]), Path(job["base"]))
        if job.get("mergekit"):
            from bench_methods import difference

            ours = Path(job.get("cuda") or job["cpu"])
            result["vs_mergekit"] = difference(ours, Path(job["mergekit"]), Path(job["base"]))
        print(json.dumps(result))
        return 0
    raise SystemExit(f"unknown child mode {mode}")


def _gpu_name(torch) -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def devices_apart(ours: Path, theirs: Path, base: Path) -> dict[str, float]:
    """max |a − b| / max |b|, entries differing by more than 1e-6 × max |b|, and entries left at the base in one
    soup and not in the other (same trim, same masks: 0)."""
    import numpy as np
    from safetensors import safe_open

    def opened(folder: Path) -> dict:
        handles = [safe_open(str(path), framework="np") for path in weight_paths(folder)]
        return {name: handle for handle in handles for name in handle.keys()}

    a, b, c = opened(ours), opened(theirs), opened(base)
    worst = scale = 0.0
    differ = masks = total = 0
    for name, handle in a.items():
        x, y, z = handle.get_tensor(name), b[name].get_tensor(name), c[name].get_tensor(name)
        gap = np.abs(x - y)
        worst, scale = max(worst, float(gap.max())), max(scale, float(np.abs(y).max()))
        differ += int((gap > 1e-6 * np.abs(y).max()).sum())
        masks += int(((x == z) != (y == z)).sum())
        total += x.size
    return {"relative": worst / scale if scale else worst, "differing": differ / total, "masks_differ": masks / total}


def helper(mode: str, *args: str) -> list[str]:
    return [sys.executable, __file__, "--child", mode, *args]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_work/merge"), help="issue 2's ingredients")
    parser.add_argument("--size", choices=["small", "large"], default="small")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per contender (after one warm-up)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--mergekit-cpu", action="store_true", help="also time mergekit on the CPU")
    parser.add_argument("--no-mergekit", action="store_true", help="leave mergekit out")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args(argv)
    work = args.work.absolute()
    found = subprocess.run(helper("build", str(work), args.size, str(args.k)), check=True, capture_output=True)
    machine = json.loads(found.stdout.decode().strip().splitlines()[-1])
    if not machine["cuda"]:
        print("no CUDA GPU here: only the CPU contenders are measured", file=sys.stderr)
    mergekit = None if args.no_mergekit else _mergekit()
    if mergekit is None and not args.no_mergekit:
        print("mergekit is not importable: its contenders are left out (see the module docstring)", file=sys.stderr)
    from bench_methods import configs

    folders = [work / args.size / f"ingredient-{i}" for i in range(args.k)]
    base = work / args.size / "base"
    out = work / "device-out"
    out.mkdir(parents=True, exist_ok=True)
    files = [p for f in [*folders, base] for p in weight_paths(f)]
    rows = []
    for method, (recipe, kit) in configs(folders, base).items():
        if method not in args.methods:
            continue
        runs = {}
        for device in ["cpu", *(["cuda"] if machine["cuda"] else [])]:
            path = out / f"{method}-{device}.recipe.yaml"
            path.write_text(json.dumps({**recipe, **({"device": "cuda"} if device == "cuda" else {})}) + "\n")
            runs[f"hf_soup {device}"] = (
                wrapped("hf_soup.cli:main", "cook", str(path), "--output", str(out / f"{method}-{device}"), "--quiet"),
                out / f"{method}-{device}",
            )
        if mergekit is not None:
            kit_path = out / f"{method}.mergekit.yaml"
            kit_path.write_text(json.dumps(kit) + "\n")
            for device in [*(["cuda"] if machine["cuda"] else []), *(["cpu"] if args.mergekit_cpu else [])]:
                target = out / f"{method}-mergekit-{device}"
                options = ["--cuda"] if device == "cuda" else []
                command = wrapped(mergekit, str(kit_path), str(target), "--no-copy-tokenizer", "--quiet", *options)
                runs[f"mergekit {device}"] = (command, target)
        timings: dict[str, list] = {name: [] for name in runs}
        for attempt in range(args.repeat + 1):  # attempt 0 warms up (CUDA context, kernels, page cache)
            for name, (command, target) in runs.items():
                shutil.rmtree(target, ignore_errors=True)
                warm(files)
                with tempfile.NamedTemporaryFile("r", suffix=".gpu") as peak:
                    os.environ["BENCH_GPU_PEAK"] = peak.name
                    result = measure(command)
                    text = Path(peak.name).read_text().strip()
                if attempt:
                    timings[name].append((*result, int(text) / 2**20 if text else 0.0))
        job = {
            "base": str(base),
            "cpu": str(runs["hf_soup cpu"][1]),
            "cuda": str(runs["hf_soup cuda"][1]) if "hf_soup cuda" in runs else None,
            "mergekit": next((str(t) for n, (_, t) in runs.items() if n.startswith("mergekit")), None),
        }
        compared = json.loads(
            subprocess.run(helper("compare", json.dumps(job)), check=True, capture_output=True).stdout
        )
        for name, results in timings.items():
            row = {"method": method, "k": args.k, "size": args.size, "contender": name, "gpu": machine["gpu"]}
            row.update({key: statistics.median(r[i] for r in results) for i, key in enumerate(("wall", "cpu"))})
            row.update({key: max(r[i] for r in results) for i, key in ((2, "rss"), (3, "anon"), (4, "gpu_mib"))})
            row["walls"] = [round(r[0], 2) for r in results]
            if name == "hf_soup cuda":
                row.update(compared.get("cuda_vs_cpu", {}))
            if job["mergekit"] == str(runs[name][1]):
                row.update({f"mergekit_{k}": v for k, v in compared.get("vs_mergekit", {}).items()})
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    if args.markdown:
        print(markdown(rows))
    return 0


def _mergekit() -> str | None:
    """`module:function` of mergekit-yaml when mergekit is importable."""
    try:
        import importlib.util

        return "mergekit.scripts.run_yaml:main" if importlib.util.find_spec("mergekit") else None
    except (ImportError, ValueError):
        return None


def markdown(rows: list[dict]) -> str:
    lines = [
        "| method | model, k | contender | wall s (median) | CPU s | peak RSS / anon MiB | peak GPU MiB "
        "| vs hf_soup cpu: max abs diff / max abs, entries left at the base differently | vs mergekit |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        apart = f"{r['relative']:.1e}, {r['masks_differ']:.1e}" if "relative" in r else "-"
        kit = "-"
        if "mergekit_relative" in r:
            kit = f"{r['mergekit_relative']:.1e}"
            if "mergekit_changed_ours" in r:
                kit += f" (changed {r['mergekit_changed_ours']:.3f} / {r['mergekit_changed_theirs']:.3f})"
        lines.append(
            f"| {r['method']} | {r['size']}, {r['k']} | {r['contender']} | {r['wall']:.2f} | {r['cpu']:.2f} "
            f"| {r['rss']:.0f} / {r['anon']:.0f} | {r['gpu_mib']:.0f} | {apart} | {kit} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
