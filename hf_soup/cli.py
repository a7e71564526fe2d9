"""`hf-soup`: cook soups from recipes, look after pantries, list methods, inspect, plot and push soups.

Every command is `main(argv) -> int`; bad input prints one line on stderr and returns 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .errors import SoupError


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cook(args: argparse.Namespace) -> int:
    from .builder import SoupBuilder

    builder = SoupBuilder.from_recipe(args.recipe)
    soup = builder.cook(args.output, overwrite=args.overwrite, progress=not args.quiet)
    from .scoring import process_state

    if not process_state().is_main_process:  # under accelerate launch, the main process writes and reports
        return 0
    rows = [
        (i["id"], "" if i["weight"] is None else f"{i['weight']:.4g}", i.get("metric") or "", i.get("value") or "")
        for i in soup.record["ingredients"]
    ]
    print(table(("ingredient", "weight", "metric", "value"), rows))
    if "report" in soup.record:
        from .comparison import markdown

        strategy = soup.record["strategy"]
        print(
            f"\n{strategy['name']} soup: {len(strategy['chosen'])} of {len(rows)} ingredients, "
            f"{strategy['evaluations']} evaluations on {strategy['selection_split']!r}\n"
        )
        if "best_parameters" in strategy:  # the search strategy
            best = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in strategy["best_parameters"].items()
            )
            print(f"best of {len(strategy['history'])} trials (trial {strategy['best_trial']}): {best}\n")
        print(markdown(soup.record["report"]) + "\n")
    for note in soup.record["notes"]:
        print(f"note: {note}")
    print(f"soup ({soup.record['method']}) written to {soup.path}")
    return 0


def _pantry(args: argparse.Namespace) -> int:
    from .pantry import Pantry

    if not (args.pantry_dir / "pantry.json").is_file():
        raise SoupError(f"{args.pantry_dir} is not a pantry (no pantry.json); give the folder SoupCallback wrote")
    pantry = Pantry(args.pantry_dir)
    if args.action == "list":
        rows = [
            (i.id, i.run, i.metric, "" if i.value is None else f"{i.value:.6g}", i.kind, _human(i.size))
            for i in pantry.list()
        ]
        print(table(("id", "run", "metric", "value", "kind", "size"), rows))
        return 0
    if args.action == "remove":
        for ingredient_id in args.ids:
            removed = pantry.remove(ingredient_id)
            print(f"removed {removed.id}")
        return 0
    if args.action == "repair":
        result = pantry.repair()
        for line in result.actions:
            print(line)
        problems = result.problems
    else:
        problems = pantry.verify()
    for problem in problems:
        print(problem)
    count = len(pantry.list())
    print(f"{count} ingredient(s) checked: " + ("all sha256 match" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def _methods(args: argparse.Namespace) -> int:
    from .methods import list_methods
    from .strategies import STRATEGIES

    rows = []
    for method in [*list_methods(), *(STRATEGIES[name] for name in sorted(STRATEGIES))]:
        parameters = ", ".join(
            name if p.default is p.empty else f"{name}={p.default!r}" for name, p in method.parameters.items()
        )
        rows.append((method.name, method.kind, parameters or "-", method.summary))
    print(table(("name", "kind", "parameters", "what it does"), rows))
    return 0


def _push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub

    url = push_to_hub(
        args.soup_dir, args.repo_id, private=args.private or None, revision=args.revision, commit_message=args.message
    )
    print(f"pushed {args.soup_dir} to {args.repo_id}: {url}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from . import plots

    if args.kind == "report":
        from .card import read_soup, write_card

        read_soup(args.target)  # every file the card reads is checked before a figure is drawn
        written = plots.draw_report_figures(args.target)
        if not written:
            raise SoupError(
                f"no figure drawn in {args.target}: matplotlib is missing ({plots.INSTALL_HINT}) or soup.json has no "
                "report (only greedy/learned soups have one; for angles run `hf-soup plot angles RECIPE`)"
            )
        write_card(args.target)
    else:
        from .recipe_plots import plot_recipe

        written = [
            plot_recipe(
                args.kind,
                args.target,
                output=args.output,
                pair=args.pair,
                base=args.base,
                steps=args.steps,
                grid=args.grid,
                span=tuple(args.span),
                split=args.split,
                gains=args.gains,
            )
        ]
    for path in written:
        print(f"wrote {path}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    from .inspection import inspect_ingredients

    quiet = logging.getLogger("hf_soup.inspection")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its warnings are printed with the report
    try:
        report = inspect_ingredients(args.folders, args.base, min_weight_cosine=args.min_cosine)
    finally:
        quiet.setLevel(level)  # `main` is called in-process too (tests, notebooks): leave logging as it was
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0 if report.compatible else 1


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output, runs=args.runs, quick=args.quick, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pathlib import Path

    from . import __version__

    parser = argparse.ArgumentParser(prog="hf-soup", description="Model soups for Hugging Face Transformers.")
    parser.add_argument("--version", action="version", version=f"hf_soup {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    cook = commands.add_parser("cook", help="cook a soup from a recipe YAML file")
    cook.add_argument("recipe", type=Path, help="recipe YAML (see README: recipe reference)")
    cook.add_argument("--output", type=Path, help="soup folder (wins over the recipe's `output:`)")
    cook.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    cook.add_argument("--quiet", action="store_true", help="no progress bar")
    cook.set_defaults(run=_cook)

    pantry = commands.add_parser("pantry", help="list, verify, repair or remove pantry ingredients")
    actions = pantry.add_subparsers(dest="action", required=True)
    for action, text in (
        ("list", "print the ingredients"),
        ("verify", "check every sha256, report unclaimed folders and interrupted adds; exit 1 on a problem"),
        (
            "repair",
            "remove the leftovers of killed adds, move unclaimed folders to lost+found/ (nothing is deleted), "
            "then verify; exit 1 if a problem remains",
        ),
    ):
        sub = actions.add_parser(action, help=text)
        sub.add_argument("pantry_dir", type=Path)
        sub.set_defaults(run=_pantry)
    remove = actions.add_parser("remove", help="remove ingredients (record, then files)")
    remove.add_argument("pantry_dir", type=Path)
    remove.add_argument("ids", nargs="+")
    remove.set_defaults(run=_pantry)

    methods = commands.add_parser("methods", help="list the registered methods and strategies and their parameters")
    methods.set_defaults(run=_methods)

    push = commands.add_parser("push", help="upload a soup folder to the Hugging Face Hub in one commit")
    push.add_argument("soup_dir", type=Path)
    push.add_argument("repo_id", help="user/name or org/name (created when missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", help="branch to commit to (created when missing)")
    push.add_argument("--message", help="commit message")
    push.set_defaults(run=_push)

    plot = commands.add_parser("plot", help="draw figures: report SOUP_DIR, or interpolation|landscape|angles RECIPE")
    plot.add_argument("kind", choices=("report", "interpolation", "landscape", "angles"))
    plot.add_argument("target", type=Path, help="the soup folder (report) or the recipe YAML (the others)")
    plot.add_argument("--pair", nargs=2, metavar=("A", "B"), help="two ingredient ids (default: the best two)")
    plot.add_argument("--output", type=Path, help="folder for the PNG (default: the recipe's soup folder)")
    plot.add_argument("--base", type=Path, help="base model folder θ₀ (landscape; angles vs the base)")
    plot.add_argument("--split", help="evaluation split (default: all for interpolation, else the selection split)")
    plot.add_argument("--steps", type=int, default=11, help="points along α (interpolation, default 11)")
    plot.add_argument("--grid", type=int, default=11, help="points per axis (landscape, default 11)")
    plot.add_argument("--span", type=float, nargs=2, default=(-0.5, 1.5), metavar=("LO", "HI"), help="landscape axes")
    plot.add_argument("--gains", action="store_true", help="angles: also score every pair's soup (k(k-1)/2 runs)")
    plot.set_defaults(run=_plot)

    inspect = commands.add_parser("inspect", help="compatibility, sizes, task-vector angles and distances")
    inspect.add_argument("folders", nargs="+", type=Path, help="ingredient folders")
    inspect.add_argument("--base", type=Path, help="the model they were fine-tuned from")
    inspect.add_argument("--min-cosine", type=float, default=0.2, help="warn below this weight cosine (default 0.2)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(run=_inspect)

    demo = commands.add_parser("demo", help="fine-tune all-MiniLM-L6-v2 on real data K times, cook and compare soups")
    demo.add_argument("--output", type=Path, default=Path("demo_output"), help="demo folder (default demo_output)")
    demo.add_argument("--runs", type=int, help="number of fine-tunes, 2 to 8 (default 4; 3 with --quick)")
    demo.add_argument("--quick", action="store_true", help="less data and one epoch per run (about 2 minutes)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `hf-soup` with `argv` (default: the command line); returns the exit code."""
    # Idle OpenMP threads sleep instead of spinning: a cook is memory-bound, and spinning threads take the cores the
    # writer and hashing threads need (about 1 s of 7 on a 2-core machine, scripts/bench_merge.py). Read when torch
    # is first imported, which happens after this line.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="hf-soup: %(message)s")
    try:
        return args.run(args)
    except SoupError as error:
        print(f"hf-soup: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file-system failure no layer anticipated (permissions, a vanished folder, ...)
        print(f"hf-soup: error: {error}; check that path and run the command again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hf-soup: interrupted; nothing was written under the output name", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
