"""Benchmark of issue 2: `hf-soup cook` (uniform) against the read floor, the naive way and mergekit `linear`.

Builds k fp32 Llama ingredients (a base plus seeded noise of 1e-3 × each tensor's std) once under `--work`, then
runs every contender as its own process, `--repeat` times, and reports the median wall time and the peak RSS of
that process (`ru_maxrss` from `os.wait4`: exact, and it counts file pages the process has mapped and touched)
beside the peak anonymous RSS (RssAnon sampled every 5 ms from /proc: memory the process really owns).

    python scripts/bench_merge.py --ks 4 8 --size both --repeat 3 --markdown
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

SIZES = {  # LlamaConfig fields; untied lm_head. small ≈ 106M parameters, large ≈ 3 × small.
    "small": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8),
    "large": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=18),
}
NOISE = 1e-3


def build(work: Path, size: str, count: int) -> list[Path]:
    """`count` ingredient folders of model `size` (reused when already there), and a pantry that hard-links them."""
    folders = [work / size / f"ingredient-{i}" for i in range(count)]
    if not all((folder / "done").is_file() for folder in folders):
        make_ingredients(folders, size)
    from hf_soup import Pantry

    pantry = Pantry(work / size / "pantry")
    have = {ingredient.id for ingredient in pantry.list()} if pantry.ledger.is_file() else set()
    for folder in folders:
        if folder.name not in have:  # sha256 recorded once, as SoupCallback does when a run saves its checkpoint
            pantry.add(folder, ingredient_id=folder.name, run=folder.name, link="hardlink")
    return folders


def make_ingredients(folders: list[Path], size: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[size], num_attention_heads=16, num_key_value_heads=16, dtype="float32")
    base = LlamaForCausalLM(config).state_dict()
    model = LlamaForCausalLM(config)
    for i, folder in enumerate(folders):
        if (folder / "done").is_file():
            continue
        generator = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                scale = base[name].std() if base[name].numel() > 1 and base[name].std() > 0 else 1.0
                noise = torch.randn(tensor.shape, generator=generator) * (NOISE * float(scale))
                tensor.copy_(base[name] + noise)
        model.save_pretrained(folder)
        (folder / "done").write_text("ok\n")
        print(f"built {folder}", file=sys.stderr)


def weight_paths(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def child(mode: str, output: str, folders: list[str]) -> int:
    """The read floor, the write floor and the naive way, each in its own process (imports included)."""
    if mode == "write":  # as many bytes as one ingredient's weights written and fsynced: what a durable output costs
        size, chunk = sum(path.stat().st_size for path in weight_paths(Path(folders[0]))), bytes(16 << 20)
        Path(output).mkdir(parents=True, exist_ok=True)
        with open(f"{output}/model.safetensors", "wb") as handle:
            for start in range(0, size, len(chunk)):
                handle.write(chunk[: size - start])
            handle.flush()
            os.fsync(handle.fileno())
        return 0
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    files = [path for folder in folders for path in weight_paths(Path(folder))]
    if mode == "floor":  # every byte read once and summed; nothing written. One accumulator alive at a time.
        handles = [safe_open(str(path), framework="pt") for path in files]
        for name in handles[0].keys():
            total = handles[0].get_tensor(name).float().clone()
            for handle in handles[1:]:
                total.add_(handle.get_tensor(name))
        return 0
    states = [load_file(str(path)) for path in files]  # naive: every state dict fully loaded, then averaged
    soup = {name: sum(state[name] for state in states) / len(states) for name in states[0]}
    Path(output).mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in soup.items()}, f"{output}/model.safetensors")
    return 0


def warm(files: list[Path]) -> None:
    """Read every ingredient byte once (untimed), so each contender starts from the same warm page cache."""
    buffer = bytearray(16 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def measure(command: list[str]) -> tuple[float, float, float, float]:
    """(wall s, CPU s, peak RSS MiB, sampled peak anonymous RSS MiB) of one process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_anon = [0]

    def sample() -> None:
        while process.returncode is None:
            try:
                text = Path(f"/proc/{process.pid}/status").read_text()
                line = next(line for line in text.splitlines() if line.startswith("RssAnon:"))
                peak_anon[0] = max(peak_anon[0], int(line.split()[1]))
            except (OSError, StopIteration):
                return
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({process.returncode}): {process.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, peak_anon[0] / 1024


def contenders(args, work: Path, folders: list[Path], out: Path) -> dict[str, tuple[list[str], Path | None]]:
    """name → (command, output folder or None)."""
    recipe, pantry = work / f"recipe-k{len(folders)}.yaml", work / f"recipe-pantry-k{len(folders)}.yaml"
    recipe.write_text(json.dumps({"method": "uniform", "ingredients": [str(f) for f in folders]}) + "\n")
    selected = {"method": "uniform", "pantry": str(folders[0].parent / "pantry"), "select": [f.name for f in folders]}
    pantry.write_text(json.dumps(selected) + "\n")
    cook = [args.hf_soup_bin, "cook", "--quiet"]
    found = {
        "read floor": (helper("floor", "-", *map(str, folders)), None),
        "write floor (no torch)": (helper("write", str(out / "write"), str(folders[0])), "write"),
        "hf-soup cook": ([*cook, str(recipe), "--output", str(out / "cook")], "cook"),
        "hf-soup cook, pantry": ([*cook, str(pantry), "--output", str(out / "cook-pantry")], "cook-pantry"),
        # a first cook of these folders: no digest in hf_soup's sha256 cache yet, so every weight file is hashed
        "hf-soup cook, first time": (first_time(cook, recipe, out / "cook-first", work / "empty-cache"), "cook-first"),
        "naive (load all, average)": (helper("naive", str(out / "naive"), *map(str, folders)), "naive"),
    }
    if args.mergekit_bin:
        config = work / f"mergekit-k{len(folders)}.yaml"
        models = [{"model": str(f), "parameters": {"weight": 1.0}} for f in folders]
        config.write_text(json.dumps({"merge_method": "linear", "models": models, "dtype": "float32"}) + "\n")
        command = [args.mergekit_bin, str(config), str(out / "mergekit"), "--no-copy-tokenizer", "--quiet"]
        found["mergekit linear"] = (command, "mergekit")
    return {name: (command, out / sub if sub else None) for name, (command, sub) in found.items()}


def first_time(cook: list[str], recipe: Path, output: Path, cache: Path) -> list[str]:
    """`hf-soup cook` with an emptied sha256 cache (`HF_SOUP_CACHE`), as the first cook of new folders runs."""
    line = " ".join(map(shlex.quote, [*cook, str(recipe), "--output", str(output)]))
    return ["bash", "-c", f"rm -rf {shlex.quote(str(cache))} && HF_SOUP_CACHE={shlex.quote(str(cache))} exec {line}"]


def compare(folders: list[Path], outputs: dict[str, Path]) -> dict[str, str]:
    """Each output against the fp32 mean `(t_1 + ... + t_k) / k` computed left to right in numpy."""
    import numpy as np
    from safetensors import safe_open

    def opened(folder: Path) -> dict:
        handles = [safe_open(str(path), framework="np") for path in weight_paths(folder)]
        return {name: handle for handle in handles for name in handle.keys()}

    ingredients = [opened(folder) for folder in folders]
    soups = {name: opened(folder) for name, folder in outputs.items()}
    diffs = dict.fromkeys(outputs, 0.0)
    for name in ingredients[0]:
        mean = ingredients[0][name].get_tensor(name).astype(np.float32)
        for handles in ingredients[1:]:
            mean = mean + handles[name].get_tensor(name)
        mean = mean / np.float32(len(folders))
        for soup, handles in soups.items():
            value = handles[name].get_tensor(name)
            diffs[soup] = max(diffs[soup], float(np.abs(value.astype(np.float32) - mean).max()))
            if value.dtype != np.float32 or not np.array_equal(value, mean):
                diffs[soup] = max(diffs[soup], 1e-300)  # not bit-identical even where the difference rounds to 0
    return {name: "yes" if diff == 0 else f"no (max abs diff {diff:.2g})" for name, diff in diffs.items()}


def bench(args, size: str, k: int, folders: list[Path]) -> list[dict]:
    work, out = args.work, args.out or args.work / "out"
    files = [path for folder in folders for path in weight_paths(folder)]
    runs = contenders(args, work, folders, out)
    times: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in runs}
    for attempt in range(args.repeat + 1):  # attempt 0 is an untimed warm-up of every contender
        for name, (command, output) in runs.items():
            if output is not None:
                shutil.rmtree(output, ignore_errors=True)
            warm(files)
            result = measure(command)
            if attempt:
                times[name].append(result)
    outputs = {name: str(output) for name, (_, output) in runs.items() if output is not None and "floor" not in name}
    job = json.dumps({"folders": [str(f) for f in folders], "outputs": outputs})
    identical = json.loads(subprocess.run(helper("compare", job), check=True, capture_output=True, text=True).stdout)
    params = sum(math.prod(v["shape"]) for v in _header(files[0]).values())
    floor = statistics.median(t[0] for t in times["read floor"])
    rows = []
    for name, results in times.items():
        wall, cpu = (statistics.median(t[i] for t in results) for i in (0, 1))
        rss, anon = (max(t[i] for t in results) for i in (2, 3))
        rows.append(
            dict(size=size, params=f"{params / 1e6:.0f}M", k=k, contender=name, wall=wall, cpu=cpu, rss=rss, anon=anon)
        )
        walls = [round(t[0], 2) for t in results]
        rows[-1].update(ratio=wall / floor, identical=identical.get(name, "-"), walls=walls)
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def _header(path: Path) -> dict:
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    header.pop("__metadata__", None)
    return header


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | k | contender | wall s (median) | × floor | CPU s | peak RSS MiB | peak anon MiB | = fp32 mean |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} ({r['params']}) | {r['k']} | {r['contender']} | {r['wall']:.2f} | {r['ratio']:.2f} "
            f"| {r['cpu']:.2f} | {r['rss']:.0f} | {r['anon']:.0f} | {r['identical']} |"
        )
    return "\n".join(lines)


def helper(mode: str, *args: str) -> list[str]:
    """A command running this script's `mode` in a fresh process (the parent never imports torch, see `main`)."""
    return [sys.executable, __file__, "--child", mode, *args]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # building and comparing also run in children, so that this process stays small:
        mode, rest = argv[1], argv[2:]  # a child's ru_maxrss starts from the parent's peak RSS at spawn time
        if mode == "build":
            build(Path(rest[0]), rest[1], int(rest[2]))
        elif mode == "compare":
            job = json.loads(rest[0])
            print(
                json.dumps(compare([Path(f) for f in job["folders"]], {n: Path(p) for n, p in job["outputs"].items()}))
            )
        else:
            return child(mode, rest[0], rest[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_work/merge"), help="ingredients and outputs")
    parser.add_argument("--out", type=Path, help="where outputs are written (default: WORK/out)")
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8], help="numbers of ingredients")
    parser.add_argument("--size", choices=["small", "large", "both"], default="small")
    parser.add_argument("--large-ks", type=int, nargs="+", help="ks for the large model (default: --ks)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per contender (median reported)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--hf-soup-bin", default=str(Path(sys.executable).with_name("hf-soup")))
    parser.add_argument("--mergekit-bin", default=shutil.which("mergekit-yaml"), help="default: PATH, else skipped")
    args = parser.parse_args(argv)
    args.work, args.out = args.work.absolute(), args.out.absolute() if args.out else None
    if not args.mergekit_bin:
        print("mergekit-yaml not found (--mergekit-bin PATH); mergekit skipped", file=sys.stderr)
    rows = []
    for size in ["small", "large"] if args.size == "both" else [args.size]:
        ks = args.large_ks if size == "large" and args.large_ks else args.ks
        subprocess.run(helper("build", str(args.work), size, str(max(ks))), check=True)
        folders = [args.work / size / f"ingredient-{i}" for i in range(max(ks))]
        for k in ks:
            rows += bench(args, size, k, folders[:k])
    shutil.rmtree(args.out or args.work / "out", ignore_errors=True)
    print(markdown(rows) if args.markdown else json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
