"""`hf-soup`: cook soups from recipes, look after pantries, list methods.

Every command is `main(argv) -> int`; bad input prints one line on stderr and returns 2.
"""

from __future__ import annotations

import argparse
import logging
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

    pantry = commands.add_parser("pantry", help="list, verify or remove pantry ingredients")
    actions = pantry.add_subparsers(dest="action", required=True)
    for action, text in (("list", "print the ingredients"), ("verify", "check every sha256; exit 1 on a problem")):
        sub = actions.add_parser(action, help=text)
        sub.add_argument("pantry_dir", type=Path)
        sub.set_defaults(run=_pantry)
    remove = actions.add_parser("remove", help="remove ingredients (record, then files)")
    remove.add_argument("pantry_dir", type=Path)
    remove.add_argument("ids", nargs="+")
    remove.set_defaults(run=_pantry)

    methods = commands.add_parser("methods", help="list the registered methods and strategies and their parameters")
    methods.set_defaults(run=_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `hf-soup` with `argv` (default: the command line); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="hf-soup: %(message)s")
    try:
        return args.run(args)
    except SoupError as error:
        print(f"hf-soup: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hf-soup: interrupted; nothing was written under the output name", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
