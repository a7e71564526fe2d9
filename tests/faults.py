"""Fault injection shared by `tests/test_faults.py` and `scripts/bench_reliability.py`.

`CookCase` SIGKILLs `hf-soup cook --overwrite` at seeded random moments of its writing and checks that the output
name always holds a complete soup: the previous one or the new one. `AddCase` SIGKILLs a process that adds to (and
removes from) a pantry in a loop and checks that no entry is lost, none lacks its files, and that
`hf-soup pantry repair` leaves nothing unclaimed. Both return a report of what the kills left behind.

Processes are started one of two ways (`launch`): `"subprocess"`, a fresh `python -m hf_soup cook ...` (or
`python -c` for adds), as a user runs it; or `"fork"`, a child forked from a server that has imported torch,
transformers and hf_soup once (multiprocessing's forkserver), which runs the same `hf_soup.cli.main` without the
~3 s of imports: what the fast tests use to afford ten kills.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hf_soup.atomic import STAGING_PREFIX, sha256_file

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
LAUNCHES = ("subprocess", "fork")
_PRELOAD = ["hf_soup.cli", "hf_soup.builder", "hf_soup.pantry", "hf_soup.checkpoint", "hf_soup.inventory", "faults"]


@functools.cache
def _forkserver():
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


class Forked:
    """A forkserver child with the `subprocess.Popen` methods the loops use."""

    def __init__(self, target, *args):
        self.process = _forkserver().Process(target=target, args=args, daemon=True)
        self.process.start()
        self.pid = self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()

    def wait(self) -> int:
        self.process.join()
        return self.process.exitcode


def _to_log(log: str) -> None:
    handle = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(handle, 1)
    os.dup2(handle, 2)


def _add_child(root: str, source: str, log: str, ready: str, errors: str) -> None:
    _to_log(errors)
    add_forever(root, source, log, ready)


def _cook_child(argv: list[str], log: str) -> None:
    """What `python -m hf_soup cook ...` runs, in a forked child (output to `log`)."""
    _to_log(log)
    import threading

    from tqdm import tqdm

    from hf_soup.cli import main

    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock, which a killed child would leak
    raise SystemExit(main(argv))


def make_llama(folder: Path, seed: int, **config) -> Path:
    """A small Llama from config (seed-0 weights plus seeded noise), saved with safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    settings.update(num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, **config)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    model.save_pretrained(folder)
    return folder


def digests(folder: Path) -> dict[str, str]:
    """sha256 of a soup's weight files and index."""
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")])
    return {path.name: sha256_file(path) for path in files}


def wait_until(condition, process: subprocess.Popen, timeout: float = 300) -> bool:
    """Poll `condition` every millisecond until it holds (True) or `process` ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return bool(condition())
        time.sleep(0.001)
    raise TimeoutError(f"nothing happened in {timeout} s")


@dataclass
class KillReport:
    """What a kill loop saw: kills that hit a running process, what each left, the largest pile of leftovers."""

    kills: int = 0
    finished_first: int = 0
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    most_leftovers: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "kills": self.kills,
            "finished_before_the_kill": self.finished_first,
            "outcomes": dict(sorted(self.outcomes.items())),
            "most_leftovers_at_once": self.most_leftovers,
            "seconds": round(self.seconds, 1),
        }


class CookCase:
    """Two recipes over three small Llamas (`old`: uniform of two, `new`: uniform of three), sharded output.

    `build` cooks each once (the reference digests). Kills are drawn in a window after the staging folder appears:
    1.3 × the time from there to the swap under the output name, measured (`calibrate`) on warm cooks of the same
    launch; before the window the process imports and reads headers (nothing written), after it it only exits.
    """

    def __init__(self, work: Path, *, max_shard_size: str = "400KB", launch: str = "subprocess"):
        if launch not in LAUNCHES:
            raise ValueError(f"launch must be one of {LAUNCHES}, got {launch!r}")
        self.launch = launch
        self.work = Path(work).absolute()
        self.target = self.work / "soup"
        self.max_shard_size = max_shard_size
        self.references: dict[str, dict[str, str]] = {}
        self.windows: dict[str, float] = {}

    def recipe(self, label: str) -> Path:
        return self.work / f"{label}.yaml"

    def build(self) -> CookCase:
        self.work.mkdir(parents=True, exist_ok=True)
        folders = [
            self.work / f"ingredient{i}" if (self.work / f"ingredient{i}" / "config.json").is_file()
            else make_llama(self.work / f"ingredient{i}", i)
            for i in range(3)
        ]  # fmt: skip
        for label, chosen in (("old", folders[:2]), ("new", folders)):
            recipe = {"method": "uniform", "ingredients": [str(f) for f in chosen]}
            self.recipe(label).write_text(json.dumps({**recipe, "max_shard_size": self.max_shard_size}) + "\n")
        reference = self.work / "reference"
        shutil.rmtree(reference, ignore_errors=True)
        for label in ("new", "old"):  # ends with `old` under the target
            process = self.cook(label, reference if label == "new" else self.target)
            if process.wait() != 0:
                raise RuntimeError(f"reference cook of {label} failed: {self.error(process)}")
        self.references = {"new": digests(reference), "old": digests(self.target)}
        if len(self.references["new"]) < 4:
            raise RuntimeError(f"the soup has {len(self.references['new'])} files; want several shards")
        return self

    def window(self, launch: str | None = None) -> float:
        """1.3 × the shortest time from the staging folder's appearance to the swap, over warm cooks of the target
        (two forked, or one fresh process); measured once per launch."""
        launch = launch or self.launch
        if launch not in self.windows:
            spans = []
            for _ in range(2 if launch == "fork" else 1):
                label = "new" if self.state() == "old" else "old"
                before = self._inode()
                process = self.cook(label, self.target, launch=launch)
                mine = f"-{process.pid}-"
                seen = wait_until(lambda mine=mine: any(mine in p.name for p in self.staging()), process)
                staged = time.monotonic()
                swapped = wait_until(lambda before=before: self._inode() not in (before, None), process)
                spans.append(time.monotonic() - staged)
                if process.wait() != 0 or not (seen and swapped):
                    raise RuntimeError(f"calibration cook of {label} failed: {self.error(process)}")
            self.windows[launch] = 1.3 * min(spans)
        return self.windows[launch]

    def _inode(self) -> int | None:
        try:
            return self.target.stat().st_ino
        except FileNotFoundError:
            return None

    def cook(self, label: str, output: Path, *, launch: str | None = None) -> subprocess.Popen | Forked:
        """Start `hf-soup cook RECIPE --output OUTPUT --overwrite --quiet` (`launch`: default the case's)."""
        argv = ["cook", str(self.recipe(label)), "--output", str(output), "--overwrite", "--quiet"]
        if (launch or self.launch) == "fork":
            return Forked(_cook_child, argv, str(self.work / "cook.log"))
        with open(self.work / "cook.log", "w") as log:
            return subprocess.Popen([sys.executable, "-m", "hf_soup", *argv], env=ENV, stdout=log, stderr=log)

    def error(self, process: subprocess.Popen) -> str:
        return f"exit {process.returncode}: {(self.work / 'cook.log').read_text()[-2000:]}"

    def staging(self, target: Path | None = None) -> list[Path]:
        target = target or self.target
        return [p for p in target.parent.iterdir() if p.name.startswith(f"{STAGING_PREFIX}{target.name}-")]

    def state(self) -> str:
        """`absent`, the label of the complete soup the target holds, or what is wrong with it."""
        if not self.target.exists():
            return "absent"
        found = digests(self.target)
        label = next((name for name, reference in self.references.items() if found == reference), None)
        if label is None:
            return f"partial ({len(found)} weight files matching no complete soup)"
        try:
            record = json.loads((self.target / "soup.json").read_text())
        except (OSError, ValueError) as error:
            return f"partial (soup.json: {error})"
        if len(record["ingredients"]) != (2 if label == "old" else 3) or not (self.target / "config.json").is_file():
            return "partial (soup.json or config.json does not belong to the weights)"
        return label

    def kill_loop(self, kills: int, *, seed: int, fresh: bool = False, launch: str | None = None) -> KillReport:
        """Cook the other recipe over the target (`fresh`: into an emptied target name), SIGKILL it a seeded random
        delay after its staging folder appears, and check the target; `kills` times. Raises AssertionError at the
        first broken invariant: the target must hold the previous complete soup (or nothing, when `fresh`) or the
        new complete soup."""
        window = self.window(launch)
        rng, report, started = random.Random(seed), KillReport(), time.monotonic()
        current = self.state()
        assert current in ("old", "new", "absent"), current
        for attempt in range(kills):
            label = "new" if current == "old" else "old"
            if fresh:
                shutil.rmtree(self.target, ignore_errors=True)
                current = "absent"
            process = self.cook(label, self.target, launch=launch)
            mine = f"-{process.pid}-"
            if not wait_until(lambda mine=mine: any(mine in p.name for p in self.staging()), process):
                raise RuntimeError(f"cook {attempt} never staged: {self.error(process)}")
            time.sleep(rng.uniform(0, window))
            running = process.poll() is None
            process.kill()
            process.wait()
            if not running and process.returncode != 0:
                raise RuntimeError(f"cook {attempt} failed: {self.error(process)}")
            state = self.state()
            assert state in (current, label), f"kill {attempt}: the output holds {state}, not {current} or {label}"
            report.kills += running
            report.finished_first += not running
            before = "no output" if current == "absent" else "previous soup complete"
            report.outcomes[before if state == current else "new soup complete"] += 1
            report.most_leftovers = max(report.most_leftovers, len(self.staging()))
            current = state
        report.seconds = time.monotonic() - started
        return report


def add_forever(root: str, source: str, log: str, ready: str) -> None:
    """The killed child: add `source` to the pantry, log it, remove the previous add, log it; forever."""
    import hf_soup.checkpoint  # noqa: F401 - torch, imported before `ready`: the random delay is spent adding
    from hf_soup.pantry import Pantry

    pantry, previous, count = Pantry(root), None, 0
    with open(log, "a", buffering=1) as written:
        Path(ready).touch()
        while True:  # ids never come back: a removed id listed again would be a resurrected entry
            count += 1
            ingredient = pantry.add(source, run=f"killed-{os.getpid()}-{count}", link="copy")
            written.write(f"added {ingredient.id}\n")
            if previous is not None:
                pantry.remove(previous)
                written.write(f"removed {previous}\n")
            previous = ingredient.id


def add_many(root: str, source: str, worker: int, count: int, start: str) -> None:
    """One of several writers (tests/test_load.py): say it is ready (imports done), wait for the common start (a
    file), then add `count` entries."""
    import hf_soup.checkpoint  # noqa: F401 - torch, imported before the start
    from hf_soup.pantry import Pantry

    pantry = Pantry(root)
    Path(start).with_name(f"ready-{worker}").touch()
    while not os.path.exists(start):
        time.sleep(0.001)
    for step in range(count):
        pantry.add(source, run=f"w{worker}", step=step, link="copy")


ADD_MANY = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from faults import add_many; "
ADD_MANY += "add_many(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])"


def tiny_source(folder: Path) -> Path:
    """The smallest ingredient folder a pantry takes: a config and a one-tensor safetensors file."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    save_file({"w": torch.arange(16, dtype=torch.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def concurrent_adds(work: Path, writers: int, each: int, *, launch: str) -> float:
    """Start `writers` processes that add `each` entries to one pantry, release them together, wait, and check that
    every entry is listed once with its files; returns the seconds from the release to the last exit."""
    from hf_soup.pantry import Pantry

    root, source, start = work / "pantry", tiny_source(work / "source"), work / "start"
    Pantry(root).check_writable()
    arguments = [[str(root), str(source), str(w), str(each), str(start)] for w in range(writers)]
    if launch == "fork":
        processes = [Forked(add_many, a[0], a[1], int(a[2]), int(a[3]), a[4]) for a in arguments]
    else:
        processes = [subprocess.Popen([sys.executable, "-c", ADD_MANY, *a], env=ENV) for a in arguments]
    for worker, process in enumerate(processes):
        assert wait_until((work / f"ready-{worker}").exists, process), f"writer {worker} failed to start"
    started = time.monotonic()
    start.touch()
    codes = [process.wait() for process in processes]
    seconds = time.monotonic() - started
    assert codes == [0] * writers
    pantry = Pantry(root)
    ids = [i.id for i in pantry.list()]
    assert sorted(ids) == sorted(f"w{w}-{s}" for w in range(writers) for s in range(each)), "an add was lost"
    assert len(set(ids)) == len(ids) == writers * each
    assert sorted(p.name for p in (root / "ingredients").iterdir()) == sorted(ids)
    assert pantry.verify() == []
    return seconds


ADD_CHILD = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from faults import add_forever; "
ADD_CHILD += "add_forever(*sys.argv[1:])"


class AddCase:
    """A pantry and a sharded source folder (`shards` × `shard_bytes` of random weights) that a child process adds
    and removes in a loop (`ADD_CHILD`) until it is killed."""

    def __init__(self, work: Path, *, shards: int = 4, shard_bytes: int = 2 << 20, launch: str = "subprocess"):
        if launch not in LAUNCHES:
            raise ValueError(f"launch must be one of {LAUNCHES}, got {launch!r}")
        self.launch = launch
        self.work = Path(work).absolute()
        self.root = self.work / "pantry"
        self.source = self.work / "source"
        self.shards, self.shard_bytes = shards, shard_bytes
        self.window = 0.0

    def build(self) -> AddCase:
        import torch
        from safetensors.torch import save_file

        from hf_soup.pantry import Pantry

        self.source.mkdir(parents=True, exist_ok=True)
        weight_map = {}
        generator = torch.Generator().manual_seed(0)
        for i in range(self.shards):
            name = f"model-{i + 1:05d}-of-{self.shards:05d}.safetensors"
            tensor = torch.randint(0, 255, (self.shard_bytes,), dtype=torch.uint8, generator=generator)
            save_file({f"w{i}": tensor}, str(self.source / name))
            weight_map[f"w{i}"] = name
        index = {"metadata": {"total_size": self.shards * self.shard_bytes}, "weight_map": weight_map}
        (self.source / "model.safetensors.index.json").write_text(json.dumps(index))
        (self.source / "config.json").write_text(json.dumps({"model_type": "llama"}))
        pantry = Pantry(self.root)
        started = time.monotonic()
        for _ in range(2):  # one add-and-remove cycle of the child, timed here
            pantry.remove(pantry.add(self.source, run="timing", link="copy").id)
        self.window = 2.5 * (time.monotonic() - started) / 2
        return self

    def kill_loop(self, kills: int, *, seed: int) -> KillReport:
        """Start the child, SIGKILL it a seeded random delay after it is ready, check the pantry, repair it with
        `hf-soup pantry repair`, check again, and empty it; `kills` times."""
        from hf_soup.cli import main
        from hf_soup.inventory import LOST, check, leftovers, strays
        from hf_soup.pantry import Pantry

        rng, report, started = random.Random(seed), KillReport(), time.monotonic()
        pantry, log = Pantry(self.root), self.work / "adds.log"
        for attempt in range(kills):
            log.write_text("")
            ready, errors = self.work / "ready", self.work / "child.log"
            ready.unlink(missing_ok=True)
            arguments = [str(self.root), str(self.source), str(log), str(ready)]
            if self.launch == "fork":
                process = Forked(_add_child, *arguments, str(errors))
            else:
                with open(errors, "w") as output:
                    command = [sys.executable, "-c", ADD_CHILD, *arguments]
                    process = subprocess.Popen(command, env=ENV, stdout=output, stderr=output)
            if not wait_until(ready.exists, process):
                raise RuntimeError(f"add child {attempt} failed: {errors.read_text()[-2000:]}")
            time.sleep(rng.uniform(0, self.window))
            running = process.poll() is None
            process.kill()
            process.wait()
            if not running:
                raise RuntimeError(f"add child {attempt} stopped by itself: {errors.read_text()[-2000:]}")
            report.kills += 1
            # what the child finished (logged) against what the ledger holds
            added, removed = [], set()
            for line in log.read_text().splitlines():
                action, ingredient_id = line.split(" ", 1)
                (added.append if action == "added" else removed.add)(ingredient_id)
            listed = {i.id: i for i in pantry.list()}
            live = set(added) - removed
            assert not removed & set(listed), f"kill {attempt}: removed entries are listed again"
            assert not added or added[-1] in listed, f"kill {attempt}: the last finished add {added[-1]} is lost"
            unlogged = set(listed) - live
            assert len(unlogged) <= 1, f"kill {attempt}: entries nobody added: {sorted(unlogged)}"
            for ingredient in listed.values():  # no entry without its files
                assert check(pantry, ingredient) == [], f"kill {attempt}: {check(pantry, ingredient)}"
            unclaimed = strays(pantry, list(listed.values()))
            left = [item.what for item in leftovers(self.root)] + ["unclaimed folder"] * len(unclaimed)
            report.outcomes.update(left or ["nothing left over"])
            report.most_leftovers = max(report.most_leftovers, len(left))
            with contextlib.redirect_stdout(io.StringIO()) as out:
                code = main(["pantry", "repair", str(self.root)])
            assert code == 0, f"kill {attempt}: repair exit {code}: {out.getvalue()}"
            assert {i.id for i in pantry.list()} == set(listed), f"kill {attempt}: repair changed the entries"
            assert pantry.verify() == [] and not leftovers(self.root) and not strays(pantry, pantry.list())
            found = sorted(p.name for p in (self.root / LOST).iterdir()) if (self.root / LOST).exists() else []
            assert found == sorted(p.name for p in unclaimed), f"kill {attempt}: lost+found holds {found}"
            for ingredient_id in listed:  # back to empty for the next kill
                pantry.remove(ingredient_id)
            shutil.rmtree(self.root / LOST, ignore_errors=True)
        report.seconds = time.monotonic() - started
        return report
