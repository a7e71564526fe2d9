"""Search: tune the parameters of any merge method on the held-out split (grid, random, TPE, CMA-ES via Optuna).

Each trial writes the candidate soup into the ONE resident model, tensor by tensor (no disk round trip), and scores
it on the selection split; the best trial's parameters write the soup. With per-layer groups (`groups:` in the
space) and the CMA-ES sampler this is the evolutionary model merge of Akiba et al. 2024 (https://arxiv.org/abs/
2403.13187; mergekit-evolve) restricted to parameter space, scored by the recipe's own evaluation.

The study is kept in a journal file beside the soup (`<soup>.study.log`): a cook that is interrupted, or run again
with a larger `trials`, resumes it without repeating finished trials. Delete the file to start afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from ..cache import cached_sha256
from ..errors import SoupError
from ..methods import get_method
from ..scoring import Scorer, process_state
from .registry import StrategyResult, register_strategy
from .space import SearchSpace
from .tasting import Tasting
from .trial_cache import TrialCache, parse_cache

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'hf_soup[search]'"
INTERRUPTED = "interrupted: the cook stopped during this trial"
INTERRUPTED_TRIALS = "hf_soup_interrupted_trials"  # the study's user attribute listing them


def check_search(parameters: dict[str, Any], count: int) -> dict[str, Any]:
    """The space must fit the merge method (checked at both ends of every range), the budget be positive."""
    SearchSpace.parse(parameters["merge"], parameters["space"], parameters["fixed"] or {}, count)
    parse_cache(parameters["cache"])
    if parameters["trials"] < 1 or parameters["grid_points"] < 2:
        raise SoupError(
            f"search: trials must be ≥ 1 and grid_points ≥ 2, got trials {parameters['trials']}, "
            f"grid_points {parameters['grid_points']}"
        )
    return parameters


def _merge_of(parameters: Mapping[str, Any]) -> str | None:
    merge = parameters.get("merge")
    return merge if isinstance(merge, str) else None


def _needs(parameters: Mapping[str, Any]) -> dict[str, str]:
    """Linear methods are tasted by their coefficients (`mix`); any other method tensor by tensor (`apply`)."""
    needs = {"mix": "search tastes candidate soups"}
    merge = _merge_of(parameters)
    if merge is not None and get_method(merge).mixing is None:
        needs["apply"] = f"method {merge!r} is not a linear combination"
    return needs


@register_strategy("search", check=check_search, writes=_merge_of, needs=_needs)
def search(
    tasting: Tasting,
    *,
    merge: str,
    space: dict,
    fixed: dict | None = None,
    sampler: Literal["tpe", "random", "grid", "cmaes"] = "tpe",
    trials: int = 50,
    grid_points: int = 5,
    cache: Any = "auto",
    seed: int,
    storage: Path | None,
) -> StrategyResult:
    """Search the parameters of a merge method on the selection split (Optuna: tpe, random, grid or cmaes).

    Args:
        merge (`str`): the method whose parameters are searched (weighted, slerp, task_arithmetic, ties, dare, ...).
        space (`dict`): parameter → range (`{low, high, log, step, groups}`) or `{choices: [...]}`; list
            parameters (`weights`) get one dimension per ingredient, `groups: G` one value per layer group.
        fixed (`dict`, *optional*): the method's other parameters, held fixed.
        sampler (`str`, *optional*, defaults to `"tpe"`): `tpe`, `random`, `grid` (`grid_points` values per
            numeric dimension, visited in a seeded random order) or `cmaes`.
        trials (`int`, *optional*, defaults to 50): the budget, finished trials of a resumed study included.
        grid_points (`int`, *optional*, defaults to 5): values per numeric dimension for `grid`.
        cache (`str` or `int`, *optional*, defaults to `"auto"`): memory for what TIES and DARE trials share (see
            `hf_soup.strategies.trial_cache`): `auto` (half the available memory), `off`, or a size (`"4GB"`).
    """
    optuna = _optuna()
    space_ = SearchSpace.parse(merge, space, fixed or {}, tasting.count)
    state = process_state()
    grid = space_.grid(grid_points) if sampler == "grid" else None
    study = None
    if state.is_main_process:
        name = _study_name(tasting, merge, space_, sampler, seed, grid_points)
        study = _open_study(optuna, name, storage, _sampler(optuna, sampler, seed, grid), tasting.scorer)
    done = _broadcast(state, len(_finished(optuna, study)) if study is not None else None)
    budget = trials if grid is None else min(trials, _grid_size(grid))
    prepared = _prepare(tasting, space_, cache) if budget > done else None
    evaluations = _run_trials(study, tasting, space_, budget - done, prepared)
    history = _broadcast(state, _history(optuna, study) if study is not None else None)
    best = _best(tasting.scorer, history)
    parameters = space_.parameters(best["parameters"], tasting.names)
    seconds = [row["seconds"] for row in history if row["state"] == "COMPLETE" and row.get("seconds") is not None]
    record = {
        "merge": merge,
        "sampler": sampler,
        "trials": trials,
        "space": space_.to_dict(),
        "fixed": space_.fixed,
        "best_trial": best["trial"],
        "best_parameters": best["parameters"],
        "written_parameters": _jsonable(parameters, tasting.names),
        "history": history,
        "resumed_trials": done,
        "new_trials": evaluations,
        "seconds_per_trial": sum(seconds) / len(seconds) if seconds else None,
        "storage": str(storage) if storage is not None else None,
        "study": study.study_name if study is not None else None,
        "cache": prepared.record() if prepared is not None else None,
    }
    return StrategyResult(
        chosen=list(range(tasting.count)), method=merge, parameters=parameters, score=best["score"], record=record
    )


def _open_study(optuna, name: str, storage: Path | None, sampler, scorer: Scorer):
    """Create the study, or resume it from `storage`: trials a killed cook left running are marked failed first."""
    journal = _storage(optuna, storage)
    direction = "maximize" if scorer.metric.greater_is_better else "minimize"
    study = optuna.create_study(
        study_name=name, storage=journal, sampler=sampler, direction=direction, load_if_exists=True
    )
    _fail_interrupted(optuna, study, journal)
    return study


def _prepare(tasting: Tasting, space: SearchSpace, setting: Any) -> TrialCache | None:
    """The cache of what this search's trials share (TIES and DARE on full models), filled before the first one."""
    if space.method.mixing is not None or not tasting.supports("apply"):
        return None
    readers, base = tasting.readers, tasting.base
    processes = process_state().num_processes
    return TrialCache.build(space.method, readers, base, space.held(), setting=setting, seed=tasting.seed,
                            processes=processes)  # fmt: skip


def _run_trials(study, tasting: Tasting, space: SearchSpace, count: int, cache: TrialCache | None = None) -> int:
    """Run `count` more trials: the main process (the one holding `study`) proposes, every process scores its shard
    of the split (under `accelerate launch`). Returns how many candidates this process scored."""
    state = process_state()
    evaluations = 0

    def taste(values: dict[str, Any]) -> float:
        nonlocal evaluations
        parameters = space.parameters(values, tasting.names)  # SoupError: a proposal the method refuses
        evaluations += 1
        return _taste(tasting, space, parameters, cache)

    def objective(trial) -> float:
        values = _broadcast(state, {d.name: d.suggest(trial) for d in space.dimensions})
        started = time.perf_counter()
        try:
            score = taste(values)
        except SoupError as error:  # e.g. weights that are all 0: the trial fails, the search goes on
            trial.set_user_attr("error", str(error))
            raise
        trial.set_user_attr("seconds", time.perf_counter() - started)
        logger.info("search trial %d: %s → %.6g", trial.number, values, score)
        return score

    if study is not None:
        if count > 0:  # the grid sampler stops the study itself once every grid point is taken
            study.optimize(objective, n_trials=count, catch=(SoupError,))
        _broadcast(state, None)
    else:  # the other processes score what the main process proposes, until it says None
        while (values := _broadcast(state, None)) is not None:
            try:
                taste(values)
            except SoupError:
                pass
    return evaluations


def _best(scorer: Scorer, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The best completed trial of `history` (the first of equally good ones)."""
    completed = [row for row in history if row["state"] == "COMPLETE"]
    if not completed:
        reasons = sorted({row.get("error", "") for row in history} - {""})
        raise SoupError(f"search: no trial succeeded; {reasons[0] if reasons else 'check the space'}")
    best = completed[0]
    for row in completed[1:]:
        if scorer.better(row["score"], best["score"], strict=True):
            best = row
    return best


def _taste(tasting: Tasting, space: SearchSpace, parameters, cache: TrialCache | None = None) -> float:
    """Write one candidate into the resident model and score it: linear methods by their coefficients, others
    with the method itself (what `cache` holds taken from there)."""
    if space.method.mixing is not None:
        count = tasting.count
        if callable(parameters):
            return tasting.taste(lambda name: space.method.mixing(parameters(name), count))
        return tasting.taste(space.method.mixing(parameters, count))
    tasting.apply(space.method.name, parameters, cache=cache)
    return tasting.scorer.score(tasting.kitchen.model, tasting.split)


def _optuna():
    try:
        import optuna
    except ImportError:
        raise SoupError(f"the search strategy needs Optuna; install it with `{INSTALL_HINT}`") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _sampler(optuna, name: str, seed: int, grid: dict[str, list] | None):
    if name == "grid":
        return optuna.samplers.GridSampler(grid, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    try:
        import cmaes  # noqa: F401
    except ImportError:
        raise SoupError(f"the cmaes sampler needs the `cmaes` package; install it with `{INSTALL_HINT}`") from None
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


def _storage(optuna, path: Path | None):
    """A journal file (append-only, safe to interrupt) or, without a path, memory."""
    if path is None:
        return None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _study_name(tasting: Tasting, merge: str, space: SearchSpace, sampler: str, seed: int, points: int) -> str:
    """One study per (ingredients, split, metric, method, space, sampler, seed): a changed recipe starts anew."""
    readers = getattr(tasting, "readers", [None] * tasting.count)
    base = getattr(tasting, "base", None)
    key = {
        "ingredients": [i.id for i in tasting.ingredients],
        "sha256": [i.sha256 or _digests(r) for i, r in zip(tasting.ingredients, readers)],
        "base": _digests(base),
        "split": tasting.split,
        "metric": tasting.scorer.metric.name,
        "merge": merge,
        "space": space.to_dict(),
        "fixed": space.fixed,
        "sampler": sampler,
        "seed": seed,
        "grid_points": points if sampler == "grid" else None,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"hf_soup-search-{merge}-{digest}"


def _digests(reader) -> dict[str, str] | None:
    """sha256 of a loose folder's weight files (from hf_soup's digest cache when unchanged): retrained weights
    under the same folder name make another study, never a resumed one with stale scores."""
    return None if reader is None else cached_sha256(list(reader.files))


def _finished(optuna, study) -> list:
    """Trials that count against the budget: scored ones, and proposals the method refused."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    interrupted = _interrupted(study)
    return [t for t in study.get_trials(deepcopy=False, states=states) if t.number not in interrupted]


def _interrupted(study) -> set[int]:
    """The numbers of the trials a killed cook left running (kept in the study's user attributes; a journal written
    by an older hf_soup marked the trial itself)."""
    marked = {t.number for t in study.get_trials(deepcopy=False) if t.user_attrs.get("error") == INTERRUPTED}
    return marked | set(study.user_attrs.get(INTERRUPTED_TRIALS, []))


def _fail_interrupted(optuna, study, journal) -> None:
    """Trials left running by a killed cook are marked failed (and not counted), so a resumed study goes on.

    One cook per study file at a time: a second cook on the same file would see the first one's running trial here.
    They are told through a random-sampler view of the study: its own sampler must not see them (the grid sampler
    would stop a study that is not running).
    """
    running = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    if not running:
        return
    study.set_user_attr(INTERRUPTED_TRIALS, sorted(_interrupted(study) | set(running)))  # marked before told
    view = optuna.load_study(study_name=study.study_name, storage=journal, sampler=optuna.samplers.RandomSampler())
    for number in running:
        view.tell(number, state=optuna.trial.TrialState.FAIL)


def _grid_size(grid: dict[str, list]) -> int:
    size = 1
    for values in grid.values():
        size *= len(values)
    return size


def _history(optuna, study) -> list[dict[str, Any]]:
    rows, interrupted = [], _interrupted(study)
    for trial in study.get_trials(deepcopy=False):
        if trial.state == optuna.trial.TrialState.RUNNING:
            continue
        row = {"trial": trial.number, "parameters": dict(trial.params), "state": trial.state.name}
        row["score"] = trial.value
        row["seconds"] = trial.user_attrs.get("seconds")
        if trial.number in interrupted:
            row["error"] = INTERRUPTED
        elif "error" in trial.user_attrs:
            row["error"] = trial.user_attrs["error"]
        rows.append(row)
    return rows


def _broadcast(state, value: Any) -> Any:
    """The main process's `value`, on every process (under `accelerate launch`); `value` itself otherwise."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def _jsonable(parameters, names) -> Any:
    """The written parameters as JSON: a dict, or per tensor name when they vary by layer group."""
    if not callable(parameters):
        return parameters
    return {name: parameters(name) for name in names}
