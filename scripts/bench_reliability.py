"""Benchmark of issue 9: kills survived, concurrent pantry writers, a soup of 32 ingredients, and a model larger
than half of RAM.

    python scripts/bench_reliability.py --markdown
    python scripts/bench_reliability.py --parts kills writers --cook-kills 20

Each part runs in its own process (the parent stays small, so that children's peak RSS is their own), and writes its
figures to WORK/results.json:

- kills: the SIGKILL loops of tests/faults.py. `hf-soup cook --overwrite` killed a seeded random delay after its
  staging folder appears (within 1.3 × the time to the swap), then the output checked: the previous or the new
  complete soup, never anything else; a pantry add-and-remove loop killed at random, then checked (every listed
  entry has its files, no finished add lost) and repaired with `hf-soup pantry repair`. Most processes are forked
  with their imports done (the same `hf_soup.cli.main`, without 3 s of start-up); `--subprocess-kills` of each
  are fresh `python -m hf_soup cook` / `python -c` processes.
- writers: 8 processes × 25 entries added to one pantry at once (forked, and fresh `python -c` processes).
- k32: `hf-soup cook` of a uniform soup of 32 random fp32 Llamas (~21M parameters each): wall, peak RSS and anon
  (measured as scripts/bench_merge.py does, by importing it), and whether it is bit for bit the fp32 mean.
- big: 4 random fp32 Llamas of ~0.95B parameters (together more than half of RAM) cooked with `hf-soup cook`:
  peak RSS and anon against the streaming bound (k + 2) × the largest tensor + the baseline of a tiny cook.
  The ingredients are deleted afterwards (`--keep` keeps them).
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

import bench_merge  # scripts/: `measure` (wall, CPU, peak RSS, sampled peak anon) and the fp32-mean comparison

REPO = Path(__file__).absolute().parent.parent
PARTS = ("kills", "writers", "k32", "big")
MODELS = {  # LlamaConfig fields; untied lm_head
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "k32": dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
    "big": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16
    ),
}


def make_random_llama(folder: Path, size: str, seed: int, max_shard_size: str) -> None:
    """An fp32 Llama of `MODELS[size]` with random weights, streamed tensor by tensor into sharded safetensors."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_soup.checkpoint import TensorInfo
    from hf_soup.writer import CheckpointWriter

    if (folder / "done").is_file():
        return
    config = LlamaConfig(**MODELS[size], num_key_value_heads=MODELS[size]["num_attention_heads"], dtype="float32")
    with init_empty_weights():
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    infos = [TensorInfo(name, shape, torch.float32) for name, shape in shapes.items()]
    with CheckpointWriter(folder, infos, max_shard_size=max_shard_size) as writer:
        for info in infos:
            writer.write(info.name, torch.randn(info.shape, generator=generator).mul_(0.02))
    config.save_pretrained(folder)
    (folder / "done").write_text("ok\n")


def largest_tensor(folder: Path) -> int:
    sizes = []
    for path in folder.glob("*.safetensors"):
        for entry in bench_merge._header(path).values():
            sizes.append(entry["data_offsets"][1] - entry["data_offsets"][0])
    return max(sizes)


def total_bytes(folders: list[Path]) -> int:
    return sum(path.stat().st_size for folder in folders for path in folder.glob("*.safetensors"))


def cook_measured(work: Path, name: str, folders: list[Path]) -> dict:
    """`hf-soup cook` of a uniform recipe over `folders`, as its own process: wall, CPU, peak RSS and anon (MiB)."""
    recipe, output = work / f"{name}.yaml", work / f"{name}-soup"
    recipe.write_text(json.dumps({"method": "uniform", "ingredients": [str(f) for f in folders]}) + "\n")
    shutil.rmtree(output, ignore_errors=True)
    command = [str(Path(sys.executable).with_name("hf-soup")), "cook", "--quiet", str(recipe), "--output", str(output)]
    wall, cpu, rss, anon = bench_merge.measure(command)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mib": round(rss), "peak_anon_mib": round(anon)}


def identical(folders: list[Path], output: Path) -> str:
    """bench_merge's comparison with the fp32 mean, in a child process."""
    job = json.dumps({"folders": [str(f) for f in folders], "outputs": {"soup": str(output)}})
    result = subprocess.run(bench_merge.helper("compare", job), check=True, capture_output=True, text=True)
    return json.loads(result.stdout)["soup"]


def build(work: Path, size: str, count: int, max_shard_size: str) -> list[Path]:
    folders = [work / f"{size}-{i}" for i in range(count)]
    job = json.dumps({"folders": [str(f) for f in folders], "size": size, "max_shard_size": max_shard_size})
    subprocess.run([sys.executable, __file__, "--child", "build", job], check=True)
    return folders


def baseline(work: Path) -> dict:
    """A cook of two tiny models: the process's own memory (imports, torch, buffers) with next to no tensors."""
    return cook_measured(work, "baseline", build(work / "tiny", "tiny", 2, "5GB"))


# -- parts ---------------------------------------------------------------------------------------------------------
def part_kills(args, work: Path) -> dict:
    from faults import AddCase, CookCase

    results = {}
    case = CookCase(work / "cook", launch="fork").build()
    results["cook_forked"] = case.kill_loop(args.cook_kills, seed=1).to_dict()
    results["cook_forked_fresh_output"] = case.kill_loop(max(args.cook_kills // 10, 1), seed=2, fresh=True).to_dict()
    results["cook_subprocess"] = case.kill_loop(args.subprocess_kills, seed=3, launch="subprocess").to_dict()
    process = case.cook("new", case.target)
    assert process.wait() == 0 and case.state() == "new", case.error(process)
    results["cook_staging_left_after_next_complete_cook"] = len(case.staging())
    results["cook_window_s"] = {launch: round(window, 3) for launch, window in case.windows.items()}
    adds = AddCase(work / "add", launch="fork", shard_bytes=8 << 20).build()
    results["add_window_s"] = round(adds.window, 3)
    results["add_forked"] = adds.kill_loop(args.add_kills, seed=4).to_dict()
    adds.launch = "subprocess"
    results["add_subprocess"] = adds.kill_loop(max(args.subprocess_kills // 2, 1), seed=5).to_dict()
    return results


def part_writers(args, work: Path) -> dict:
    from faults import concurrent_adds

    results = {}
    for launch in ("fork", "subprocess"):
        folder = work / launch
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        seconds = concurrent_adds(folder, args.writers, args.entries // args.writers, launch=launch)
        results[launch] = {
            "processes": args.writers,
            "entries": args.entries // args.writers * args.writers,
            "seconds": round(seconds, 2),
            "entries_per_s": round(args.entries // args.writers * args.writers / seconds, 1),
            "lost": 0,  # concurrent_adds checks every entry is listed once, with its files (verify clean)
        }
        shutil.rmtree(folder)
    return results


def part_k32(args, work: Path) -> dict:
    folders = build(work / "k32", "k32", 32, "5GB")
    base = baseline(work)
    first = cook_measured(work, "k32", folders)  # hashes every ingredient into the digest cache
    bench_merge.warm([path for folder in folders for path in bench_merge.weight_paths(folder)])
    cooked = cook_measured(work, "k32", folders)
    return {
        "k": 32,
        "ingredient_bytes": total_bytes(folders),
        "first_cook": first,
        **bounded(32, largest_tensor(folders[0]), base, cooked),
        "identical_to_fp32_mean": identical(folders, work / "k32-soup"),
    }


def bounded(k: int, largest: int, base: dict, cooked: dict) -> dict:
    """The cook's peaks against the streaming bound (k + 2) × largest tensor + baseline, and in largest tensors."""
    mib = largest / 2**20
    return {
        "largest_tensor_bytes": largest,
        "baseline": base,
        "cook": cooked,
        "bound_rss_mib": round((k + 2) * mib + base["peak_rss_mib"]),
        "bound_anon_mib": round((k + 2) * mib + base["peak_anon_mib"]),
        "rss_in_largest_tensors": round((cooked["peak_rss_mib"] - base["peak_rss_mib"]) / mib, 2),
        "anon_in_largest_tensors": round((cooked["peak_anon_mib"] - base["peak_anon_mib"]) / mib, 2),
    }


def part_big(args, work: Path) -> dict:
    import psutil

    folders = build(work / "big", "big", args.big_k, "2GB")
    try:
        base = baseline(work)
        cooked = cook_measured(work, "big", folders)
        size, ram = total_bytes(folders), psutil.virtual_memory().total
        return {
            "k": args.big_k,
            "ingredient_bytes": size,
            "ram_bytes": ram,
            "ingredients_over_ram": round(size / ram, 3),
            **bounded(args.big_k, largest_tensor(folders[0]), base, cooked),
        }
    finally:
        if not args.keep:
            shutil.rmtree(work / "big", ignore_errors=True)
            shutil.rmtree(work / "big-soup", ignore_errors=True)


def markdown(results: dict) -> str:
    lines = []
    if "kills" in results:
        k = results["kills"]
        lines += [
            "| kill loop | kills that hit a running process | what the output or pantry held | most leftovers |",
            "|---|---:|---|---:|",
        ]
        for name, label in (
            ("cook_forked", "`hf-soup cook --overwrite`, forked"),
            ("cook_forked_fresh_output", "`hf-soup cook` into a new name, forked"),
            ("cook_subprocess", "`python -m hf_soup cook --overwrite`"),
            ("add_forked", "pantry add/remove loop, forked"),
            ("add_subprocess", "pantry add/remove loop, `python -c`"),
        ):
            r = k[name]
            outcomes = ", ".join(f"{what} {n}" for what, n in r["outcomes"].items())
            lines.append(f"| {label} | {r['kills']} | {outcomes} | {r['most_leftovers_at_once']} |")
        lines.append("")
    if "writers" in results:
        lines += ["| writers | processes | entries | seconds | entries/s | lost |", "|---|---:|---:|---:|---:|---:|"]
        for launch in ("fork", "subprocess"):
            r = results["writers"][launch]
            row = (launch, r["processes"], r["entries"], r["seconds"], r["entries_per_s"], r["lost"])
            lines.append("| " + " | ".join(map(str, row)) + " |")
        lines.append("")
    rows = [(name, results[name]) for name in ("k32", "big") if name in results]
    if rows:
        lines += [
            "| soup | k | ingredients GB | largest tensor MB | wall s | peak RSS MiB (bound) | peak anon MiB (bound) "
            "| RSS − baseline, in largest tensors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in rows:
            c = r["cook"]
            lines.append(
                f"| {name} | {r['k']} | {r['ingredient_bytes'] / 1e9:.2f} | {r['largest_tensor_bytes'] / 1e6:.0f} "
                f"| {c['wall_s']} | {c['peak_rss_mib']} ({r['bound_rss_mib']}) | {c['peak_anon_mib']} "
                f"({r['bound_anon_mib']}) | {r['rss_in_largest_tensors']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.path.insert(0, str(REPO / "tests"))  # tests/faults.py: the kill loops and concurrent writers
    if argv[:2] == ["--child", "build"]:
        job = json.loads(argv[2])
        for seed, folder in enumerate(job["folders"]):
            make_random_llama(Path(folder), job["size"], seed, job["max_shard_size"])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_work/reliability"))
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--cook-kills", type=int, default=100, help="forked cooks killed (default 100)")
    parser.add_argument("--add-kills", type=int, default=50, help="forked pantry add loops killed (default 50)")
    parser.add_argument("--subprocess-kills", type=int, default=20, help="fresh-process cooks killed (adds: half)")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--entries", type=int, default=200)
    parser.add_argument("--big-k", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the big ingredients")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_SOUP_CACHE", str(work / "cache"))  # sha256 digests of these ingredients stay here
    if args.part:  # one part, in this (child) process
        started = time.monotonic()
        (work / args.part).mkdir(parents=True, exist_ok=True)
        result = globals()[f"part_{args.part}"](args, work / args.part)
        result["part_seconds"] = round(time.monotonic() - started, 1)
        print(json.dumps(result))
        return 0
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for part in args.parts:
        command = [sys.executable, __file__, *argv, "--part", part]
        print(f"part {part} ...", file=sys.stderr)
        output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        results[part] = json.loads(output.strip().splitlines()[-1])
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({part: results[part]}), file=sys.stderr)
    print(markdown(results) if args.markdown else json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
