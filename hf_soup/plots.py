"""Figures: the pictures of the model-soups paper (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482) for your
own soups.

Each figure is two functions: one computes its data (plain numbers: what the tests check), one draws the data into a
PNG. Figures 1, 2 and 5 come from data a strategy cook already has (`draw_report_figures`, run at the end of every
strategy cook and by `hf-soup plot report`); 3 and 4 need many evaluations and are drawn on demand from a recipe
(`hf-soup plot interpolation|landscape|angles RECIPE`, `hf_soup.recipe_plots`). This module draws from records and
tastings only. matplotlib is optional (`pip install 'hf_soup[plots]'`); it is
imported only to draw, with the Agg canvas (no pyplot, no global backend change).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import FLOAT_DTYPES, CheckpointReader
from .errors import SoupError
from .inspection import task_vector_geometry
from .record import read_record

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'hf_soup[plots]'"
# file name → caption, in the order the model card shows them
FIGURES = {
    "figure_scores.png": "Held-out vs. shift score of every ingredient and soup (paper figure 1).",
    "figure_trace.png": "Greedy soup: score after each candidate; accepted ● / rejected ✕ (paper recipe 1).",
    "figure_coefficients.png": "Learned soup: mixing coefficient of each ingredient (mean over tensors).",
    "figure_search.png": "Search: held-out score of every trial ● and the best so far (line); failed trials ✕.",
    "figure_interpolation.png": "Soup (1−α)θ₁ + αθ₂ vs. the logit ensemble along α (paper figure 4).",
    "figure_landscape.png": "Error landscape on the plane through θ₀ (base), θ₁ and θ₂ (paper figure 2).",
    "figure_angles.png": "Angles between task vectors (with `hf-soup plot angles --gains`: soup gain vs. angle for "
    "pairs, paper figure 3).",
}


# -- data from soup.json ---------------------------------------------------------------------------------------------
def report_scores(record: dict[str, Any], *, x: str | None = None, y: Sequence[str] | None = None) -> dict | None:
    """Figure 1's points: every ingredient and every soup row at (score on `x`, mean score on `y`).

    `x` defaults to the selection split (held-out), `y` to every other split (the shifts); `None` when the record
    has no report or only one split.
    """
    report = record.get("report")
    if not report:
        return None
    x = x or report["selection_split"]
    y = list(y) if y else [s for s in report["splits"] if s != x]
    if not y or any(s not in report["splits"] for s in [x, *y]):
        return None

    def point(scores: dict[str, float]) -> list[float]:
        return [scores[x], sum(scores[s] for s in y) / len(y)]

    return {
        "metric": report["metric"],
        "x_split": x,
        "y_splits": y,
        "ingredients": {name: point(scores) for name, scores in report["individuals"].items()},
        "soups": {name: point(scores) for name, scores in report["rows"].items() if name != "best individual"},
        "best_individual": report["best_individual"],
    }


def greedy_trace(record: dict[str, Any]) -> dict | None:
    """Figure 2's data: each candidate's score, whether it was kept, and the soup's score after each step."""
    strategy = record.get("strategy") or {}
    trace = strategy.get("trace")
    if not trace:
        return None
    best, running = trace[0]["score"], []
    for step in trace:
        best = step["score"] if step["accepted"] else best
        running.append(best)
    return {
        "ids": [step["id"] for step in trace],
        "scores": [step["score"] for step in trace],
        "accepted": [step["accepted"] for step in trace],
        "soup": running,
        "metric": (record.get("report") or {}).get("metric", "score"),
        "split": strategy.get("selection_split"),
    }


def learned_coefficients(record: dict[str, Any]) -> dict | None:
    """The learned soup's mean mixing coefficient per ingredient (recipe order)."""
    strategy = record.get("strategy") or {}
    if "alpha_mean" not in strategy:
        return None
    return {"ids": [i["id"] for i in record["ingredients"]], "alpha": strategy["alpha_mean"]}


def search_history(record: dict[str, Any]) -> dict | None:
    """The search strategy's score per trial and the best score so far (in the metric's direction)."""
    strategy = record.get("strategy") or {}
    history = strategy.get("history")
    if not history:
        return None
    greater = (record.get("report") or {}).get("greater_is_better", True)
    trials, scores, best, failed = [], [], [], []
    for row in history:
        if row["state"] != "COMPLETE":
            failed.append(row["trial"])
            continue
        trials.append(row["trial"])
        scores.append(row["score"])
        previous = best[-1] if best else row["score"]
        best.append(max(previous, row["score"]) if greater else min(previous, row["score"]))
    return {
        "trials": trials,
        "scores": scores,
        "best": best,
        "failed": failed,
        "metric": (record.get("report") or {}).get("metric", "score"),
        "split": strategy.get("selection_split"),
        "title": f"{strategy.get('sampler')} search over {strategy.get('merge')} ({len(history)} trials)",
    }


# -- data that needs evaluations -------------------------------------------------------------------------------------
def _score(tasting, coefficients: Sequence[float], splits: Sequence[str]) -> dict[str, float]:
    tasting.mix(list(coefficients))
    return {split: tasting.scorer.score(tasting.kitchen.model, split) for split in splits}


def interpolation_curve(tasting, i: int, j: int, alphas: Sequence[float], *, splits: Sequence[str] | None = None):
    """Figure 3's data: the score of the soup (1−α)θᵢ + αθⱼ and of the logit ensemble (1−α)fᵢ + αfⱼ along α.

    Works on any `Tasting`. Returns `{"ids", "alphas", "splits", "soup": {split: [...]}, "ensemble": {...},
    "individual": {id: {split: score}}, "metric"}`; at α = 0 and 1 both curves equal the individual scores.
    """
    if i == j:
        raise SoupError("interpolation needs two different ingredients")
    splits = list(splits or [tasting.split])
    scorer, ids = tasting.scorer, [tasting.ingredients[i].id, tasting.ingredients[j].id]
    outputs = {(n, s): tasting.outputs(n, s) for n in (i, j) for s in splits}  # before mixing: outputs() loads
    soup: dict[str, list[float]] = {s: [] for s in splits}
    ensemble: dict[str, list[float]] = {s: [] for s in splits}
    for alpha in alphas:
        coefficients = [0.0] * tasting.count
        coefficients[i], coefficients[j] = 1.0 - alpha, float(alpha)
        for split, value in _score(tasting, coefficients, splits).items():
            soup[split].append(value)
        for split in splits:
            mixed = [
                ((1 - alpha) * a + alpha * b, labels)
                for (a, labels), (b, _) in zip(*(outputs[n, split] for n in (i, j)))
            ]
            ensemble[split].append(scorer.compute(mixed))
    individual = {ids[n]: {s: scorer.compute(outputs[m, s]) for s in splits} for n, m in enumerate((i, j))}
    head = {"ids": ids, "alphas": [float(a) for a in alphas], "splits": splits, "metric": scorer.metric.name}
    return {**head, "soup": soup, "ensemble": ensemble, "individual": individual}


def landscape(tasting, base: CheckpointReader, i: int, j: int, *, grid: int = 11, span=(-0.5, 1.5), split=None):
    """Figure 4's data: scores on the plane θ₀ + a(θᵢ − θ₀) + b(θⱼ − θ₀), a and b on a `grid` × `grid` lattice over
    `span`; `scores[r][c]` is at (a = coords[c], b = coords[r]); `x`, `y` are the points in an orthonormal basis of the
    plane (distances are true). Needs a full-model `Tasting` (its readers and resident model)."""
    if not tasting.supports("apply"):  # writes tensors of its readers into the resident model, as `apply` does
        raise SoupError("the landscape needs full-model ingredients (not adapters)")
    if grid < 2 or i == j:
        raise SoupError(f"the landscape needs grid ≥ 2 and two different ingredients (got grid {grid}, {i} and {j})")
    split = split or tasting.split
    readers = [base, tasting.readers[i], tasting.readers[j]]
    gram = task_vector_geometry(readers[1:], base).gram
    uu, uv, vv = gram[0][0], gram[0][1], gram[1][1]
    if uu == 0:
        raise SoupError(f"ingredient {tasting.ingredients[i].id} equals the base: no plane to draw")
    height = math.sqrt(max(vv - uv * uv / uu, 0.0))
    coords = [span[0] + (span[1] - span[0]) * n / (grid - 1) for n in range(grid)]
    scores = []
    for b in coords:
        row = []
        for a in coords:
            for name in tasting.names:
                if readers[1].info(name).dtype not in FLOAT_DTYPES:
                    tasting.kitchen.write(name, readers[1].get(name))
                    continue
                value = None
                for reader, weight in zip(readers, (1.0 - a - b, a, b)):
                    if weight != 0:
                        term = reader.get(name).float() * weight
                        value = term if value is None else value.add_(term)
                tasting.kitchen.write(name, value)  # the weights sum to 1: at least one term
            row.append(tasting.scorer.score(tasting.kitchen.model, split))
        scores.append(row)
    root = math.sqrt(uu)

    def place(a: float, b: float) -> list[float]:
        return [a * root + b * uv / root, b * height]

    ids, metric = [tasting.ingredients[i].id, tasting.ingredients[j].id], tasting.scorer.metric
    head = {"ids": ids, "split": split, "metric": metric.name, "greater_is_better": metric.greater_is_better}
    x, y = ([[place(a, b)[axis] for a in coords] for b in coords] for axis in (0, 1))
    points = {"base": place(0, 0), ids[0]: place(1, 0), ids[1]: place(0, 1), "soup": place(0.5, 0.5)}
    return {**head, "a": coords, "b": coords, "scores": scores, "x": x, "y": y, "points": points}


def task_vector_angles(readers: Sequence[CheckpointReader], base_reader=None, *, labels=None) -> dict:
    """Figure 5's matrix: cosines, angles (degrees) and L2 distances of task vectors (streamed; see inspection)."""
    return task_vector_geometry(readers, base_reader, labels=labels).to_dict()


def pair_gains(tasting, pairs: Sequence[tuple[int, int]] | None = None, *, split: str | None = None) -> dict:
    """Soup gain of pairs: score of ½θᵢ + ½θⱼ minus the mean of their scores (sign so that > 0 is better)."""
    split = split or tasting.split
    k, scorer = tasting.count, tasting.scorer
    pairs = list(pairs or [(a, b) for a in range(k) for b in range(a + 1, k)])
    individual = {n: scorer.compute(tasting.outputs(n, split)) for n in sorted({n for pair in pairs for n in pair})}
    sign = 1 if scorer.metric.greater_is_better else -1
    rows = []
    for a, b in pairs:
        coefficients = [0.0] * k
        coefficients[a] = coefficients[b] = 0.5
        soup = _score(tasting, coefficients, [split])[split]
        mean = (individual[a] + individual[b]) / 2
        pair = [tasting.ingredients[a].id, tasting.ingredients[b].id]
        rows.append({"pair": pair, "soup": soup, "mean": mean, "gain": sign * (soup - mean)})
    return {"split": split, "metric": scorer.metric.name, "pairs": rows}


# -- drawing --------------------------------------------------------------------------------------------------------
def _figure(width: float = 6.0, height: float = 4.5, columns: int = 1):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SoupError(f"figures need matplotlib; install it with `{INSTALL_HINT}`") from None
    figure = Figure(figsize=(width * columns, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(1, columns, n + 1) for n in range(columns)]


def _save(figure, path: str | os.PathLike) -> Path:
    """Write the PNG through a temporary file and a rename (never half a PNG under its name)."""
    path = Path(path)
    figure.tight_layout(pad=1.2)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        figure.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def plot_scores(data: dict, path) -> Path:
    figure, (axes,) = _figure()
    points = list(data["ingredients"].values())
    axes.scatter([p[0] for p in points], [p[1] for p in points], c="0.55", label="ingredients", zorder=2)
    best = data["ingredients"][data["best_individual"]]
    axes.scatter([best[0]], [best[1]], s=160, facecolors="none", edgecolors="k", label="best individual", zorder=3)
    for (name, (x, y)), marker in zip(data["soups"].items(), "*sD^vP"):
        axes.scatter([x], [y], marker=marker, s=140, label=name, zorder=4)
    axes.set_xlabel(f"{data['metric']} on {data['x_split']} (held-out)")
    axes.set_ylabel(
        f"{data['metric']} on {', '.join(data['y_splits'])}" + (" (mean)" if len(data["y_splits"]) > 1 else "")
    )
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_trace(data: dict, path) -> Path:
    figure, (axes,) = _figure(max(6.0, 0.5 * len(data["ids"])))
    steps = range(len(data["ids"]))
    axes.step(steps, data["soup"], where="post", color="0.3", label="soup")
    for accepted, marker, colour in ((True, "o", "tab:green"), (False, "x", "tab:red")):
        chosen = [n for n in steps if data["accepted"][n] == accepted]
        scores, label = [data["scores"][n] for n in chosen], "accepted" if accepted else "rejected"
        axes.scatter(chosen, scores, marker=marker, c=colour, s=60, zorder=3, label=label)
    axes.set_xticks(list(steps), data["ids"], rotation=45, ha="right", fontsize=8)
    axes.set_ylabel(f"{data['metric']} on {data['split']}")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_coefficients(data: dict, path) -> Path:
    figure, (axes,) = _figure(max(6.0, 0.5 * len(data["ids"])))
    axes.bar(range(len(data["ids"])), data["alpha"], color="tab:blue")
    axes.set_xticks(range(len(data["ids"])), data["ids"], rotation=45, ha="right", fontsize=8)
    axes.set_ylabel("mixing coefficient (mean over tensors)")
    return _save(figure, path)


def plot_search(data: dict, path) -> Path:
    figure, (axes,) = _figure()
    axes.scatter(data["trials"], data["scores"], c="tab:blue", s=25, zorder=3, label="trial")
    axes.step(data["trials"], data["best"], where="post", color="0.3", label="best so far")
    if data["failed"] and data["scores"]:
        low = min(data["scores"])
        axes.scatter(data["failed"], [low] * len(data["failed"]), marker="x", c="tab:red", label="failed")
    axes.set_xlabel("trial")
    axes.set_ylabel(f"{data['metric']} on {data['split']}")
    axes.set_title(data["title"], fontsize=9)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_interpolation(data: dict, path) -> Path:
    figure, (axes,) = _figure()
    for split in data["splits"]:
        alphas = data["alphas"]
        line = axes.plot(alphas, data["soup"][split], marker="o", label=f"soup ({split})")[0]
        axes.plot(alphas, data["ensemble"][split], ls="--", color=line.get_color(), label=f"ensemble ({split})")
    axes.set_xlabel(f"α   (0 = {data['ids'][0]}, 1 = {data['ids'][1]})")
    axes.set_ylabel(data["metric"])
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_landscape(data: dict, path) -> Path:
    figure, (axes,) = _figure(6.0, 5.0)
    values = data["scores"]
    flat = [v for row in values for v in row]
    error = data["greater_is_better"] and all(0 <= v <= 1 for v in flat)
    shown = [[1 - v for v in row] for row in values] if error else values
    filled = axes.contourf(data["x"], data["y"], shown, levels=12, cmap="viridis_r" if error else "viridis")
    figure.colorbar(filled, ax=axes, label=f"error (1 − {data['metric']})" if error else data["metric"])
    for name, (x, y) in data["points"].items():
        axes.scatter([x], [y], c="w", edgecolors="k", s=60, zorder=3)
        axes.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8, color="w")
    axes.set_title(f"{data['split']}: plane through the base, {data['ids'][0]} and {data['ids'][1]}", fontsize=9)
    axes.set_aspect("equal")
    return _save(figure, path)


def plot_angles(data: dict, path, gains: dict | None = None) -> Path:
    figure, axes = _figure(5.5, 4.5, columns=2 if gains else 1)
    ids, angle = data["ids"], [[math.nan if v is None else v for v in row] for row in data["angle"]]
    image = axes[0].imshow(angle, cmap="magma", vmin=0)
    figure.colorbar(image, ax=axes[0], label="angle (degrees)")
    axes[0].set_title(f"task vectors vs the {data['reference']}", fontsize=9)
    axes[0].set_xticks(range(len(ids)), ids, rotation=45, ha="right", fontsize=8)
    axes[0].set_yticks(range(len(ids)), ids, fontsize=8)
    if len(ids) <= 12:
        for r, row in enumerate(angle):
            for c, value in enumerate(row):
                if not math.isnan(value):
                    axes[0].text(c, r, f"{value:.0f}", ha="center", va="center", fontsize=7, color="0.5")
    if gains:
        position = {name: n for n, name in enumerate(ids)}
        xs = [angle[position[a]][position[b]] for a, b in (row["pair"] for row in gains["pairs"])]
        axes[1].scatter(xs, [row["gain"] for row in gains["pairs"]], c="tab:blue")
        axes[1].axhline(0, color="0.5", lw=0.8)
        axes[1].set_xlabel("angle between task vectors (°)")
        axes[1].set_ylabel(f"soup gain ({gains['metric']} on {gains['split']})")
        axes[1].grid(alpha=0.3)
    return _save(figure, path)


def draw_report_figures(soup_dir: str | os.PathLike) -> list[Path]:
    """Draw figures 1, 2 and 5 (and the search history) from a soup folder's `soup.json` (what it has data for);
    returns the PNGs written.

    Without matplotlib nothing is drawn (a warning says how to install it) and the cook goes on.
    """
    folder = Path(soup_dir)
    record = read_record(folder)
    jobs = [
        (report_scores(record), plot_scores, "figure_scores.png"),
        (greedy_trace(record), plot_trace, "figure_trace.png"),
        (learned_coefficients(record), plot_coefficients, "figure_coefficients.png"),
        (search_history(record), plot_search, "figure_search.png"),
        (record.get("task_vectors"), plot_angles, "figure_angles.png"),
    ]
    written = []
    try:
        for data, draw, name in jobs:
            if data:
                written.append(draw(data, folder / name))
    except SoupError as error:
        logger.warning("figures skipped: %s", error)
    return written
