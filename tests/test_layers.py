"""The layer order of docs/architecture.md ("Layers"), enforced on the source: every import in
src/backdoorlab goes to the importing module's own layer or a lower one, no modules import each
other in a cycle, and the imports the doc forbids do not exist.

Imports inside functions (the lazy ones, written to load heavy code late or to dodge a cycle)
count like module-level ones: a lazy import is still a dependency, and a cycle of lazy imports is
still two modules that cannot be understood, tested or moved apart."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "backdoorlab"
DOC = ROOT / "docs" / "architecture.md"

# The layer table, lowest layer first; docs/architecture.md quotes it (a test keeps the two equal).
# Names are relative to ``backdoorlab``: a package stands for every module under it, ``__init__``
# for the package's own ``__init__`` (``__version__``). A module may import its own layer and the
# layers below it, never one above.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("__init__", "registry", "plugins", "options", "files", "metrics", "progress", "plotting")),
    ("data", ("data",)),
    ("attacks and models", ("attacks", "models")),
    ("training", ("training",)),
    ("defenses", ("defenses",)),
    ("evaluation", ("evaluation",)),
    ("clip", ("clip",)),
    ("experiments", ("experiments",)),
    ("gallery", ("gallery",)),
    ("report", ("report",)),
    ("cli", ("cli", "__main__")),
)

# Imports that must never exist although the layer order allows them: (importer, imported, why);
# a name covers the modules under it.
FORBIDDEN: tuple[tuple[str, str, str], ...] = (
    ("training", "attacks", "the loop trains on a TensorDataset and never learns what is poisoned"),
    ("defenses", "attacks.poisoning", "a defense never gets the poison mask, the PoisonSpec or the triggered test set"),
)


@dataclass(frozen=True)
class Import:
    """One import of a backdoorlab module by another, where it is written."""

    importer: str
    imported: str
    line: int
    lazy: bool  # inside a function

    def where(self) -> str:
        path = module_path(self.importer).relative_to(ROOT)
        return f"{path}:{self.line}{' (inside a function)' if self.lazy else ''}"

    def __str__(self) -> str:
        return f"{self.where()} imports {self.imported}"


def module_path(name: str) -> Path:
    """The file of a module, by its relative name (``data.sources``, ``data``, ``__init__``)."""
    if name == "__init__":
        return PACKAGE / "__init__.py"
    folder = PACKAGE.joinpath(*name.split("."))
    return folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")


@cache
def modules() -> frozenset[str]:
    """Every module of the package by relative name; a package by its folder's name."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        names.add(".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts))
    return frozenset(names)


def _relative(absolute: str) -> str | None:
    """``backdoorlab.data.sources`` -> ``data.sources``, ``backdoorlab`` -> ``__init__``; None
    outside the package."""
    if absolute == "backdoorlab":
        return "__init__"
    return absolute.removeprefix("backdoorlab.") if absolute.startswith("backdoorlab.") else None


def _targets(node: ast.Import | ast.ImportFrom, importer: str) -> list[str]:
    """The package modules an import statement loads (``from pkg import sub`` loads ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        found = [_relative(alias.name) for alias in node.names]
        return [name for name in found if name]
    if node.level:  # relative: resolve against the importer's package
        package = importer.split(".") if module_path(importer).name == "__init__.py" else importer.split(".")[:-1]
        base = package[: len(package) - (node.level - 1)]
        absolute = ".".join(["backdoorlab", *base, *([node.module] if node.module else [])])
    else:
        absolute = node.module or ""
    target = _relative(absolute)
    if target is None:
        return []
    prefix = "" if target == "__init__" else target + "."
    submodules = [prefix + alias.name for alias in node.names if prefix + alias.name in modules()]
    return submodules if len(submodules) == len(node.names) else [target, *submodules]


def _imports_in(importer: str) -> list[Import]:
    tree = ast.parse(module_path(importer).read_text(), str(module_path(importer)))
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.extend(Import(importer, t, child.lineno, lazy) for t in _targets(child, importer))
            visit(child, lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(tree, False)
    return found


@cache
def imports() -> tuple[Import, ...]:
    """Every import between package modules, module-level and inside functions."""
    return tuple(i for name in sorted(modules()) for i in _imports_in(name) if i.imported != i.importer)


def _covers(name: str, module: str) -> bool:
    return module == name or module.startswith(name + ".")


def layer_of(module: str) -> int:
    """The index in ``LAYERS`` of the entry that names ``module`` most closely."""
    matches = [(len(name), index) for index, (_, names) in enumerate(LAYERS) for name in names if _covers(name, module)]
    if not matches:
        raise LookupError(
            f"backdoorlab.{module} is in no layer: add it to LAYERS in tests/test_layers.py and docs/architecture.md"
        )
    return max(matches)[1]


def upward(edges: tuple[Import, ...] | list[Import]) -> list[str]:
    """One message per import from a lower layer to a higher one."""
    messages = []
    for i in edges:
        low, high = layer_of(i.importer), layer_of(i.imported)
        if high > low:
            messages.append(f"{i}: layer {LAYERS[low][0]!r} may not import from the higher layer {LAYERS[high][0]!r}")
    return messages


def cycles(edges: tuple[Import, ...] | list[Import]) -> list[str]:
    """One message per group of modules that import each other, naming one cycle's imports
    (Tarjan's strongly connected components; a path through each group by breadth-first search)."""
    graph: dict[str, list[Import]] = {}
    for i in edges:
        graph.setdefault(i.importer, []).append(i)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for i in graph.get(node, []):
            if i.imported not in index:
                connect(i.imported)
                low[node] = min(low[node], low[i.imported])
            elif i.imported in stack:
                low[node] = min(low[node], index[i.imported])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    messages = []
    for group in groups:
        start = min(group)
        paths: dict[str, list[Import]] = {start: []}
        frontier, path = [start], None
        while frontier and path is None:
            node = frontier.pop(0)
            for i in graph[node]:
                if i.imported == start:
                    path = [*paths[node], i]
                    break
                if i.imported in group and i.imported not in paths:
                    paths[i.imported] = [*paths[node], i]
                    frontier.append(i.imported)
        assert path is not None
        messages.append("import cycle: " + "; ".join(str(i) for i in path))
    return messages


def test_every_module_has_exactly_one_layer_and_every_layer_name_exists():
    names = [name for _, layer in LAYERS for name in layer]
    assert len(names) == len(set(names)), "a name is listed in two layers"
    assert not [n for n in names if n not in modules()], "LAYERS names a module or package that does not exist"
    for module in modules():
        layer_of(module)  # raises, naming the module, where it has no layer


def test_no_import_goes_from_a_lower_layer_to_a_higher_one():
    messages = upward(imports())
    assert not messages, "imports against the layer order (docs/architecture.md, Layers):\n" + "\n".join(messages)


def test_no_modules_import_each_other_in_a_cycle():
    messages = cycles(imports())
    assert not messages, "\n".join(messages)


def test_the_imports_the_doc_forbids_do_not_exist():
    found = [
        f"{i}: {why}"
        for i in imports()
        for importer, imported, why in FORBIDDEN
        if _covers(importer, i.importer) and _covers(imported, i.imported)
    ]
    assert not found, "forbidden imports (docs/architecture.md, Layers):\n" + "\n".join(found)


def test_the_checks_find_an_upward_import_and_a_cycle():
    """The checks are not vacuous: the two arrows issue 40 found are caught, and the scan sees
    imports inside functions (the CLI's are all lazy)."""
    assert any(i.importer == "cli" and i.lazy and i.imported == "report" for i in imports())
    up = Import("experiments.detectability", "report.plots", 225, lazy=True)
    back = Import("report.plots", "gallery", 132, lazy=True)
    forth = Import("gallery", "report.plots", 68, lazy=True)
    assert upward([up]) == [
        "src/backdoorlab/experiments/detectability.py:225 (inside a function) imports report.plots: "
        "layer 'experiments' may not import from the higher layer 'report'"
    ]
    assert cycles([back, forth]) == [
        "import cycle: src/backdoorlab/gallery.py:68 (inside a function) imports report.plots; "
        "src/backdoorlab/report/plots.py:132 (inside a function) imports gallery"
    ]


def test_the_doc_quotes_the_layer_table():
    text = DOC.read_text()
    assert "\n## Layers\n" in text, "docs/architecture.md has no '## Layers' section quoting LAYERS"
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if re.match(r"\|\s*\d+\s*\|", line)]
    quoted = []
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        quoted.append((int(cells[0]), cells[1], tuple(re.findall(r"`([^`]+)`", cells[2]))))
    expected = [(index, name, names) for index, (name, names) in enumerate(LAYERS)]
    assert quoted == expected, "docs/architecture.md's Layers table differs from LAYERS in tests/test_layers.py"
