"""The model card (README.md) of a soup folder, written from its `soup.json`: where the soup came from and why it is
better.

YAML metadata (huggingface_hub `ModelCardData`): `base_model`, `tags` (hf_soup, model-soup, merge), `library_name`,
`pipeline_tag` and a `model-index` with the soup's score on every scored split. Body: the recipe, the ingredients
(run, hyperparameters, metric, weight or accepted/rejected), the greedy trace or learned coefficients, the comparison
table, the command that rebuilds the soup, and the figures found in the folder.

Example:

```python
>>> write_card("soups/greedy")                     # README.md, written atomically
>>> ModelCard.load("soups/greedy/README.md").data.eval_results[0].metric_value
```
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .atomic import write_text
from .comparison import markdown, rounded
from .jsonfile import check_model_files, read_model_file
from .plots import FIGURES, INSTALL_HINT, draw_report_figures
from .record import FIX, read_record

TAGS = ["hf_soup", "model-soup", "merge"]
PIPELINES = {
    "sequence-classification": "text-classification",
    "causal-lm": "text-generation",
    "causal-generation": "text-generation",
    "image-classification": "image-classification",
    "audio-classification": "audio-classification",
    "token-classification": "token-classification",
    "multiple-choice": "multiple-choice",
    "question-answering": "question-answering",
    "seq2seq": "text2text-generation",
}
ARCHITECTURES = {
    "ForSequenceClassification": "sequence-classification",
    "ForCausalLM": "causal-lm",
    "ForImageClassification": "image-classification",
    "ForAudioClassification": "audio-classification",
    "ForTokenClassification": "token-classification",
    "ForMultipleChoice": "multiple-choice",
    "ForQuestionAnswering": "question-answering",
}
PAPER = "https://arxiv.org/abs/2203.05482"
BUILDERS = {"csv", "json", "parquet", "text", "arrow", "pandas", "sql", "imagefolder", "audiofolder", "webdataset"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _base_models(record: dict[str, Any], folder: Path) -> list[str]:
    """Hub ids the soup was fine-tuned from (local paths are left out: the Hub would reject them)."""
    candidates = [record.get("base_model"), *(i.get("base_model") for i in record["ingredients"])]
    adapter_config = read_model_file(folder, "adapter_config.json", fix=FIX)
    if adapter_config is not None:
        candidates.append(adapter_config.get("base_model_name_or_path"))
    found = []
    for name in candidates:
        if isinstance(name, str) and HUB_ID.match(name) and not os.path.exists(name) and name not in found:
            found.append(name)
    return found


def _task(record: dict[str, Any], folder: Path) -> str | None:
    evaluation = record["recipe"].get("evaluation")
    if isinstance(evaluation, dict):
        return evaluation.get("task", "sequence-classification")
    architectures = (read_model_file(folder, "config.json", fix=FIX) or {}).get("architectures") or []
    return next((task for end, task in ARCHITECTURES.items() for a in architectures if a.endswith(end)), None)


def _dataset(record: dict[str, Any]) -> tuple[str, str]:
    """(name shown, Hub dataset type) of the evaluation data."""
    dataset = (record["recipe"].get("evaluation") or {}).get("dataset")
    if isinstance(dataset, dict) and isinstance(dataset.get("path"), str):
        name = dataset["path"] + (f"/{dataset['name']}" if dataset.get("name") else "")
        hub = HUB_ID.match(dataset["path"]) and not os.path.exists(dataset["path"]) and dataset["path"] not in BUILDERS
        return name, dataset["path"] if hub else "custom"
    if isinstance(dataset, dict) and dataset.get("load_from_disk"):
        return Path(str(dataset["load_from_disk"])).name, "custom"
    return "evaluation data", "custom"


def eval_results(record: dict[str, Any], folder: Path) -> list:
    """The soup's score on every scored split, as huggingface_hub `EvalResult`s (empty without a report)."""
    from huggingface_hub import EvalResult

    report = record.get("report")
    if not report:
        return []
    row = report["rows"].get(record["strategy"]["name"], {})
    task = PIPELINES.get(_task(record, folder) or "", "text-classification")
    name, kind = _dataset(record)
    return [
        EvalResult(
            task_type=task,
            dataset_type=kind,
            dataset_name=f"{name} ({split})",
            dataset_split=split,
            metric_type=report["metric"],
            metric_name=f"{report['metric']} ({split}{', selection' if split == report['selection_split'] else ''})",
            metric_value=rounded(row[split]),  # as the table shows it; soup.json keeps the exact value
        )
        for split in report["splits"]
        if split in row
    ]


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _ingredients(record: dict[str, Any]) -> list[str]:
    strategy = record.get("strategy") or {}
    kept = {step["id"]: step["accepted"] for step in strategy.get("trace", [])}
    status = "kept" if kept else "weight"
    lines = [
        f"| ingredient | run | hyperparameters | metric | {status} | weights sha256 |",
        "|---|---|---|---|---|---|",
    ]
    for item in record["ingredients"]:
        parameters = ", ".join(f"{k}={v}" for k, v in (item.get("hyperparameters") or {}).items())
        value = item.get("value")
        metric = f"{item.get('metric')} = {value:.4g}" if isinstance(value, (int, float)) else "-"
        if isinstance(value, (int, float)) and item.get("split"):
            metric += f" ({item['split']})"
        if kept:
            decision = "accepted" if kept.get(item["id"]) else "rejected"
        else:
            weight = item.get("weight")
            decision = f"{weight:.4g}" if isinstance(weight, (int, float)) else "per layer" if weight else "-"
        digests = item.get("sha256") or {}
        digest = next(iter(digests.values()))[:12] if len(digests) == 1 else f"{len(digests)} files"
        cells = [item["id"], item.get("run") or "-", parameters or "-", metric, decision, f"`{digest}`"]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _vocabulary(record: dict[str, Any]) -> list[str]:
    """How the soup's vocabulary was made when the ingredients' tokenizers differed (`tokenizer:` in the recipe)."""
    vocabulary = record.get("vocabulary")
    if not vocabulary:
        return []
    mode, reference = vocabulary["tokenizer"], vocabulary.get("reference", "-")
    source = {"union": f"every token of {reference}, then those the ingredients added", "base": "the base model's"}
    lines = [
        "## Vocabulary",
        "",
        f"`tokenizer: {mode}`: the soup's tokenizer is {source.get(mode, f'that of {mode}')}: {vocabulary['tokens']} "
        f"tokens in {vocabulary['rows']} embedding rows ({vocabulary.get('padding_rows', 0)} padding rows, which hold "
        "no token). A model that lacks a token takes the base's row for it, else the mean of the rows of the "
        "ingredients that have it; the rows every model holds are merged as one block, the others as another.",
        "",
    ]
    mapping = vocabulary.get("mapping") or []
    if mapping:
        lines += ["| token | soup id | id in each model | rows for the models that lack it |", "|---|---:|---|---|"]
        for entry in mapping[:20]:
            ids = ", ".join(f"{label} {'-' if i is None else i}" for label, i in entry["ids"].items())
            filled = ", ".join(entry.get("filled_from", [])) or "-"
            lines.append(f"| `{_cell(entry['token'])}` | {entry['id']} | {_cell(ids)} | {_cell(filled)} |")
        if len(mapping) > 20:
            lines.append(f"| … | | {len(mapping) - 20} more in `soup.json` | |")
        lines.append("")
    for label, tokens in (vocabulary.get("dropped") or {}).items():
        lines += [f"Dropped: {len(tokens)} token(s) of {_cell(label)} ({_cell(', '.join(tokens[:5]))}).", ""]
    if vocabulary.get("chat_template"):
        lines += [f"The chat template is {_cell(vocabulary['chat_template'])}'s.", ""]
    return lines


def _strategy(record: dict[str, Any]) -> list[str]:
    strategy = record.get("strategy")
    if not strategy:
        return []
    metric = (record.get("report") or {}).get("metric", "score")
    lines = [f"## {strategy['name'].capitalize()} soup", ""]
    if "score" in strategy:
        lines.append(
            f"Chosen on the `{strategy.get('selection_split')}` split: {len(strategy.get('chosen', []))} of "
            f"{len(record['ingredients'])} ingredients, {strategy.get('evaluations')} evaluations, {metric} "
            f"{strategy['score']:.4f}."
        )
    if strategy.get("trace"):
        blend = "alpha" in strategy["trace"][0]
        lines += [
            "",
            f"| step | candidate | {metric} of the soup with it | soup size | {'α | ' if blend else ''}decision |",
            "|---:|---|---:|---:|" + ("---:|" if blend else "") + "---|",
        ]
        for n, step in enumerate(strategy["trace"]):
            decision = "accepted" if step["accepted"] else "rejected"
            size, alpha = step.get("soup_size", ""), f"{step.get('alpha', 1.0):.3g} | " if blend else ""
            lines.append(f"| {n} | {_cell(step['id'])} | {step['score']:.4f} | {size} | {alpha}{decision} |")
    if strategy.get("history"):
        lines += _search(strategy, metric, (record.get("report") or {}).get("greater_is_better", True))
    if "alpha_mean" in strategy:
        lines += [
            "",
            f"Coefficients learned per {'tensor' if strategy.get('granularity') == 'layer' else 'model'} "
            f"({strategy.get('epochs')} epochs, lr {strategy.get('lr')}, logit scale β = "
            f"{strategy.get('beta', 1):.4g}; the full table is in `soup.json`).",
            "",
            "| ingredient | mean coefficient |",
            "|---|---:|",
        ]
        for item, alpha in zip(record["ingredients"], strategy["alpha_mean"]):
            lines.append(f"| {_cell(item['id'])} | {alpha:.4f} |")
        if strategy.get("loss_per_epoch"):
            lines += ["", "Loss per epoch: " + ", ".join(f"{v:.4f}" for v in strategy["loss_per_epoch"]) + "."]
    return lines + [""]


def _search(strategy: dict[str, Any], metric: str, greater_is_better: bool) -> list[str]:
    """The search strategy's best parameters and the best trials."""
    history = strategy["history"]
    completed = [row for row in history if row["state"] == "COMPLETE"]
    lines = [
        "",
        f"{strategy['sampler']} search over the parameters of `{strategy['merge']}`: {len(history)} trials "
        f"({len(completed)} scored, {strategy.get('resumed_trials', 0)} resumed from the study file), "
        f"best trial {strategy['best_trial']}"
        + (f", {strategy['seconds_per_trial']:.2f} s per trial" if strategy.get("seconds_per_trial") else "")
        + ". Fixed parameters: "
        + (", ".join(f"{k} = {v}" for k, v in strategy.get("fixed", {}).items()) or "none")
        + ".",
        "",
        "| parameter | best value |",
        "|---|---:|",
    ]
    for name, value in strategy["best_parameters"].items():
        lines.append(f"| {_cell(name)} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |")
    top = sorted(completed, key=lambda row: row["score"], reverse=greater_is_better)[:5]
    lines += ["", f"| trial | {metric} | parameters |", "|---:|---:|---|"]
    for row in top:
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["parameters"].items())
        lines.append(f"| {row['trial']} | {row['score']:.4f} | {_cell(shown)} |")
    return lines


def _rebuild(record: dict[str, Any], name: str) -> list[str]:
    import yaml

    recipe = {k: v for k, v in record["recipe"].items() if k != "source"}
    source = str(record["recipe"].get("source", ""))
    lines = ["## How to rebuild it", ""]
    if source.endswith((".yaml", ".yml")):
        lines += ["```bash", f"hf-soup cook {source} --output {name}", "```", ""]
        lines.append(f"The recipe (`{source}`; relative paths are resolved against its folder):")
    else:
        lines += ["```bash", f"hf-soup cook recipe.yaml --output {name}", "```", ""]
        lines.append("The recipe was given from Python; saved as `recipe.yaml` it rebuilds the soup:")
        evaluation = recipe.get("evaluation")
        if isinstance(evaluation, dict) and isinstance(evaluation.get("splits"), dict):
            lines.append(
                "(its evaluation splits were Python objects: replace `splits:` by a `dataset:` that loads them)"
            )
            recipe["evaluation"] = {
                **evaluation,
                "splits": {split: "<given from Python>" for split in evaluation["splits"]},
            }
    dumped = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True).rstrip()
    lines += ["", "```yaml", dumped, "```", ""]
    lines.append("Check the ingredients against the sha256 digests above (`hf-soup pantry verify` for a pantry).")
    return lines + [""]


def _figures(record: dict[str, Any], folder: Path, shown: Path) -> list[str]:
    names = [n for n in FIGURES if (folder / n).is_file()]
    names += sorted(p.name for p in folder.glob("*.png") if p.name not in FIGURES and not p.name.startswith("."))
    if not names:
        if record.get("report"):
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                return [
                    "## Figures",
                    "",
                    f"Figures were skipped: matplotlib is not installed. Install it with `{INSTALL_HINT}` and run "
                    f"`hf-soup plot report {shown.name}`.",
                    "",
                ]
        return []
    lines = ["## Figures", ""]
    for name in names:
        caption = FIGURES.get(name, name)
        lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    return lines


def read_soup(soup_dir: str | os.PathLike) -> dict[str, Any]:
    """The checked `soup.json` of a soup folder, after every other JSON file of the folder that the card reads, the
    hub uploads or Transformers loads has been checked (`hf_soup.jsonfile.check_model_files`)."""
    record = read_record(soup_dir)
    check_model_files(Path(soup_dir), fix=FIX)
    return record


def card_text(
    soup_dir: str | os.PathLike, *, output: str | os.PathLike | None = None, repo_id: str | None = None
) -> str:
    """The README.md text of a soup folder (see `write_card`)."""
    from huggingface_hub import ModelCardData

    folder = Path(soup_dir)
    record = read_soup(folder)
    name = repo_id.split("/")[-1] if repo_id else Path(output or folder).absolute().name
    adapter = any(str(f).startswith("adapter_model") for f in record.get("files", []))
    task = _task(record, folder)
    data = ModelCardData(
        base_model=(lambda found: found[0] if len(found) == 1 else found or None)(_base_models(record, folder)),
        library_name="peft" if adapter else "transformers",
        tags=list(TAGS),
        pipeline_tag=PIPELINES.get(task or ""),
        model_name=name,
        eval_results=eval_results(record, folder) or None,
    )
    count = len(record["ingredients"])
    lines = [
        f"# {name}",
        "",
        f"A **{record['method']}** [model soup]({PAPER}) of {count} fine-tuned "
        f"{'adapters' if adapter else 'models'}, cooked with hf_soup {record.get('hf_soup_version', '')} on "
        f"{record.get('created_at', '?')}: the weights of the ingredients are averaged into one model of the same "
        "size, so it costs nothing extra at inference.",
        "",
    ]
    report = record.get("report")
    if report:
        lines += ["## Results", "", markdown(report), ""]
        lines.append(
            f"Rows: the best individual ingredient (chosen on `{report['selection_split']}`), the soups and the logit "
            f"ensembles; soups are chosen on `{report['selection_split']}` only, the other splits are reported."
        )
        lines.append("")
    lines += _figures(record, folder, Path(output or folder).absolute())
    lines += ["## Ingredients", "", *_ingredients(record), ""]
    lines += _vocabulary(record)
    lines += _strategy(record)
    if record.get("notes"):
        lines += ["## Notes", "", *(f"- {note}" for note in record["notes"]), ""]
    lines += _rebuild(record, name)
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines).rstrip() + "\n"


def write_card(soup_dir: str | os.PathLike, *, output: str | os.PathLike | None = None, repo_id: str | None = None):
    """Write the model card `README.md` into a soup folder (atomically); returns its path.

    Args:
        soup_dir (`str`): the soup folder (or the staging folder of a cook).
        output (`str`, *optional*): the soup's final folder, when `soup_dir` is a staging folder (names the model).
        repo_id (`str`, *optional*): the Hub repository it is pushed to (names the model).
    """
    path = Path(soup_dir) / "README.md"
    write_text(path, card_text(soup_dir, output=output, repo_id=repo_id))
    return path


def explain_soup(soup_dir: str | os.PathLike, *, output: str | os.PathLike | None = None) -> None:
    """What every cook ends with: figures 1, 2 and 5 from `soup.json` (strategy soups), then the model card."""
    record = read_soup(soup_dir)
    if record.get("report") or record.get("task_vectors"):
        draw_report_figures(soup_dir)
    write_card(soup_dir, output=output)
