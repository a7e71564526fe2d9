"""The package's shape: dependencies go one way (no import cycle), modules use each other's public names only, and
every module stays small. Read from the source with `ast`: every import counts, function-level ones included
(only `if TYPE_CHECKING:` blocks are left out: they never run)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hf_soup"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def runtime_nodes(tree: ast.AST):
    """Every node, except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported hf_soup module, names taken from it) for every import statement of module `name`."""
    here = name if is_package(name) else name.rpartition(".")[0]
    found = []
    for node in runtime_nodes(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "hf_soup"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "hf_soup":
                continue
            names = [alias.name for alias in node.names]
            found.append((target, names))
            found += [(f"{target}.{n}", []) for n in names if f"{target}.{n}" in MODULES]  # submodules
    return found


def graph() -> dict[str, set[str]]:
    """module → the modules importing it runs: each imported module, and the packages above it that the importer
    is not inside of (importing a.b.c from outside a.b runs a.b's `__init__` first)."""
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for target, _ in imports(name):
            parts = target.split(".")
            for n in range(2, len(parts) + 1):
                module = ".".join(parts[:n])
                inside = name == module or name.startswith(module + ".") and n < len(parts)
                if module in MODULES and not inside:
                    edges[name].add(module)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(edges[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_import_walk_sees_function_level_and_relative_imports():
    edges = graph()
    assert "hf_soup.preparation" in edges["hf_soup.builder"]  # module level, relative
    assert "hf_soup.adapters" in edges["hf_soup.builder"]  # a package
    assert "hf_soup.strategies.tasting" in edges["hf_soup.adapters.tasting"]  # two dots
    assert "hf_soup.strategies" in edges["hf_soup.adapters.tasting"]  # the package above runs first
    assert "hf_soup.recipe_plots" in edges["hf_soup.cli"]  # function level


def test_no_import_cycle_in_the_package():
    found = cycles(graph())
    assert found == [], "import cycles: " + "; ".join(" ↔ ".join(c) for c in found)


@pytest.mark.parametrize(
    "lower, upper",
    [
        ("hf_soup.card", "hf_soup.builder"),
        ("hf_soup.plots", "hf_soup.builder"),
        ("hf_soup.plots", "hf_soup.card"),
        ("hf_soup.hub", "hf_soup.builder"),
        ("hf_soup.hub", "hf_soup.soup"),
        ("hf_soup.adapters.cooking", "hf_soup.builder"),
        ("hf_soup.record", "hf_soup.card"),
        ("hf_soup.preparation", "hf_soup.builder"),
        ("hf_soup.inventory", "hf_soup.pantry"),
    ],
)
def test_lower_modules_do_not_reach_up(lower, upper):
    """The one-way house: a module never imports, directly or through others, a module built on top of it."""
    edges, seen, todo = graph(), set(), [lower]
    while todo:
        node = todo.pop()
        for other in edges[node] - seen:
            seen.add(other)
            todo.append(other)
    assert upper not in seen


def private_definitions(tree: ast.AST) -> set[str]:
    """The private names a module defines: functions, classes, assignments and `self._x` attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {name for name in names if _private(name)}


def private_uses(tree: ast.AST, imported: list[tuple[str, list[str]]]) -> list[str]:
    """Private names a module takes from others: imported (`from .x import _y`), or reached on an object or module
    (`pantry._read()`) when the module does not define that name itself (`self._x` is always its own)."""
    problems = [f"imports {target}.{n}" for target, names in imported for n in names if _private(n)]
    own = private_definitions(tree)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            and node.attr not in own
        ):
            problems.append(f"line {node.lineno} uses {ast.unparse(node)}")
    return problems


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_the_private_name_check_catches_reaching_in():
    tree = ast.parse("from x import _z\nstudy._storage.set(1)\nself._own = 1\nitem._own\n")
    imported = [("hf_soup.builder", ["_tokenizer", "Soup"])]
    assert private_uses(tree, imported) == ["imports hf_soup.builder._tokenizer", "line 2 uses study._storage"]


def test_no_module_uses_another_modules_private_names():
    problems = {}
    for name, path in MODULES.items():
        found = private_uses(ast.parse(path.read_text()), imports(name))
        if found:
            problems[name] = found
    assert problems == {}


def test_every_module_is_small():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def layout_order() -> dict[str, int]:
    """Position of every module in README's Layout table (a package's modules share the package's position)."""
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
    names = [name for row in rows for name in re.findall(r"`([\w/]+(?:\.py|/))`", row.split("|")[2])]
    position = {}
    for n, name in enumerate(names):
        module = "hf_soup" if name == "__init__.py" else "hf_soup." + name.removesuffix(".py").strip("/")
        for known in MODULES:
            if known == module or name.endswith("/") and known.startswith(module + "."):
                position.setdefault(known, n)
    return position


def test_readme_layout_lists_every_module_in_dependency_order():
    position = layout_order()
    assert sorted(set(MODULES) - set(position)) == []  # the table names every module
    upward = [
        f"{name} imports {other}"
        for name, targets in graph().items()
        for other in targets
        if position[other] > position[name]
    ]
    assert upward == []
