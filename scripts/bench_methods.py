"""Benchmark of issue 6: hf_soup's merge methods against mergekit's on the same ~100M-parameter ingredients.

For linear, task_arithmetic, ties, dare_ties and slerp it runs `hf-soup cook` and `mergekit-yaml` on the same folders
(ingredients and base built by scripts/bench_merge.py's recipe), each as its own process, and reports wall time, peak
RSS and how far the two outputs are apart: max |a − b| / max |b| over all tensors where the definitions agree, and for
DARE (random masks: mergekit draws from torch's global generator, hf_soup from a per-tensor seeded one) statistics of
the task vectors instead (share of entries left at the base, mean |θ − θ_base|).

    python scripts/bench_methods.py --k 4 --markdown
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import SIZES, build, measure, warm, weight_paths  # noqa: E402


def build_base(work: Path, size: str) -> Path:
    """The model every ingredient was perturbed from (seed-0 init, as in bench_merge.make_ingredients)."""
    folder = work / size / "base"
    if not (folder / "done").is_file():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(**SIZES[size], num_attention_heads=16, num_key_value_heads=16, dtype="float32")
        LlamaForCausalLM(config).save_pretrained(folder)
        (folder / "done").write_text("ok\n")
    return folder


def configs(folders: list[Path], base: Path) -> dict[str, tuple[dict, dict]]:
    """method → (hf_soup recipe, mergekit config), defined to agree where the methods do."""
    paths = [str(f) for f in folders]

    def kit(method, parameters=None, with_base=True, models=paths, extra=None):
        config = {
            "merge_method": method,
            "models": [{"model": p, "parameters": {"weight": 1.0, **(parameters or {})}} for p in models],
            "dtype": "float32",
            **(extra or {}),
        }
        if with_base:
            config["base_model"] = str(base)
        return config

    return {
        "linear": ({"method": "uniform", "ingredients": paths}, kit("linear", with_base=False)),
        "task_arithmetic": (
            {"method": "task_arithmetic", "ingredients": paths, "base_model": str(base)},
            kit("task_arithmetic"),
        ),
        "ties": (
            {"method": "ties", "ingredients": paths, "base_model": str(base), "density": 0.5},
            kit("ties", {"density": 0.5}),
        ),
        "dare_ties": (
            {"method": "dare", "ingredients": paths, "base_model": str(base), "drop_rate": 0.5, "merge": "ties"},
            # mergekit's dare_ties sums the agreeing entries by default (normalize: false); the DARE-TIES of the
            # papers, and hf_soup's, takes their mean: normalize: true asks mergekit for the same definition
            kit("dare_ties", {"density": 0.5}, extra={"parameters": {"normalize": True}}),
        ),
        "slerp": (
            {"method": "slerp", "ingredients": paths[:2], "t": 0.3},
            {
                "merge_method": "slerp",
                "base_model": paths[0],
                "models": [{"model": paths[0]}, {"model": paths[1]}],
                "parameters": {"t": 0.3},
                "dtype": "float32",
            },
        ),
    }


def difference(ours: Path, theirs: Path, base: Path | None) -> dict[str, float]:
    """Relative max difference, and task-vector statistics of both outputs when a base is given."""
    import numpy as np
    from safetensors import safe_open

    def opened(folder: Path) -> dict:
        handles = [safe_open(str(path), framework="np") for path in weight_paths(folder)]
        return {name: handle for handle in handles for name in handle.keys()}

    a, b = opened(ours), opened(theirs)
    c = opened(base) if base is not None else None
    worst, scale, differ, total = 0.0, 0.0, 0, 0
    kept = {"ours": [0, 0], "theirs": [0, 0]}
    size = {"ours": 0.0, "theirs": 0.0}
    for name, handle in a.items():
        x, y = handle.get_tensor(name), b[name].get_tensor(name)
        worst, scale = max(worst, float(np.abs(x - y).max())), max(scale, float(np.abs(y).max()))
        differ, total = differ + int((np.abs(x - y) > 1e-6 * np.abs(y).max()).sum()), total + x.size
        if c is not None:
            z = c[name].get_tensor(name)
            for key, value in (("ours", x), ("theirs", y)):
                delta = value - z
                kept[key][0] += int((delta != 0).sum())
                kept[key][1] += delta.size
                size[key] += float(np.abs(delta).sum())
    result = {"relative": worst / scale if scale else worst, "entries_differing": differ / total}
    if c is not None:
        for key in kept:
            result[f"changed_{key}"] = kept[key][0] / kept[key][1]
            result[f"mean_delta_{key}"] = size[key] / kept[key][1]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_work/merge"))
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["linear", "task_arithmetic", "ties", "dare_ties", "slerp"])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--hf-soup-bin", default=str(Path(sys.executable).with_name("hf-soup")))
    parser.add_argument("--mergekit-bin", default=shutil.which("mergekit-yaml"))
    args = parser.parse_args(argv)
    args.work = args.work.absolute()  # recipes resolve relative paths against their own folder
    if not args.mergekit_bin:
        print("mergekit-yaml not found: install mergekit (in its own venv) and pass --mergekit-bin", file=sys.stderr)
        return 2
    folders = build(args.work, args.size, args.k)
    base = build_base(args.work, args.size)
    out = args.work / "methods-out"
    rows = []
    for method, (recipe, kit) in configs(folders, base).items():
        if method not in args.methods:
            continue
        recipe_path, kit_path = out / f"{method}.recipe.yaml", out / f"{method}.mergekit.yaml"
        out.mkdir(parents=True, exist_ok=True)
        recipe_path.write_text(json.dumps(recipe) + "\n")
        kit_path.write_text(json.dumps(kit) + "\n")
        used = folders[:2] if method == "slerp" else folders
        files = [p for f in [*used, base] for p in weight_paths(f)]
        commands = {
            "hf_soup": [
                args.hf_soup_bin,
                "cook",
                str(recipe_path),
                "--output",
                str(out / f"{method}-hf_soup"),
                "--quiet",
            ],
            "mergekit": [
                args.mergekit_bin,
                str(kit_path),
                str(out / f"{method}-mergekit"),
                "--no-copy-tokenizer",
                "--quiet",
            ],
        }
        timings = {name: [] for name in commands}
        for attempt in range(args.repeat + 1):  # attempt 0 warms up
            for name, command in commands.items():
                shutil.rmtree(out / f"{method}-{name}", ignore_errors=True)
                warm(files)
                result = measure(command)
                if attempt:
                    timings[name].append(result)
        diff = difference(out / f"{method}-hf_soup", out / f"{method}-mergekit", base if method != "linear" else None)
        row = {"method": method, "k": len(used), **diff}
        for name, results in timings.items():
            row[f"{name}_wall"] = statistics.median(r[0] for r in results)
            row[f"{name}_rss"] = max(r[2] for r in results)
            row[f"{name}_anon"] = max(r[3] for r in results)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    if args.markdown:
        print(
            "| method | k | hf_soup wall s | mergekit wall s | hf_soup peak RSS / anon MiB "
            "| mergekit peak RSS / anon MiB | max abs diff / max abs | entries differing by > 1e-6 × max abs "
            "| changed entries (hf_soup / mergekit) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in rows:
            changed = f"{r['changed_ours']:.3f} / {r['changed_theirs']:.3f}" if "changed_ours" in r else "-"
            print(
                f"| {r['method']} | {r['k']} | {r['hf_soup_wall']:.1f} | {r['mergekit_wall']:.1f} "
                f"| {r['hf_soup_rss']:.0f} / {r['hf_soup_anon']:.0f} "
                f"| {r['mergekit_rss']:.0f} / {r['mergekit_anon']:.0f} "
                f"| {r['relative']:.1e} | {r['entries_differing']:.1e} | {changed} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
