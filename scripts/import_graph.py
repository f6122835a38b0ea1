"""Measure branchlens's import graph: cycles, upward imports, private names, shims.

An AST scan of ``src/branchlens`` (or the folder given), counting module-level and
function-level imports but not those under ``if TYPE_CHECKING:``. A *unit* is a top-level
module or a package folder (``branchlens.run``, ``branchlens.analysis``). An import is *upward*
when its target's unit sits in a higher row of :data:`LAYERS` than its source's; the rows are
the layer list of ``docs/ARCHITECTURE.md`` (keep the two in step). A *shim* import is a
deprecated re-export: an import inside a module's ``__getattr__`` or on a line that says "kept
for one release". Shim imports are listed, and left out of every other count.

    python scripts/import_graph.py [SRC] [--check] [--json]

``--check`` exits 1 when there is a cycle, an upward import or a private name crossing modules.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "branchlens"
SHIM_MARK = "kept for one release"

# The layer list of docs/ARCHITECTURE.md, top row first: a unit may import any unit in its own
# row or a lower one. ``branchlens`` is the package's own __init__ (lazy public re-exports).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("branchlens", "cli", "__main__"),
    ("pipeline",),
    ("schema",),
    ("stages", "replicates"),
    ("report",),
    ("run",),
    ("latent",),
    ("notebook",),
    ("viz",),
    ("analysis", "interventions", "interop"),
    ("sae", "sae_kernels", "train"),
    ("store", "harvest", "classify"),
    ("data", "streaming", "decode"),
    ("model", "weights"),
    ("variants",),
    ("config", "settings", "presets", "layout", "artifacts", "progress", "devices",
     "distributed", "threads", "_version"),
)
ROW = {name: i for i, row in enumerate(LAYERS) for name in row}


@dataclass
class Import:
    source: str  # importing module
    target: str  # imported module
    names: list[str]  # names taken from it (empty: the module itself)
    line: int
    lazy: bool  # inside a function

    def where(self) -> str:
        lazy = " (lazy)" if self.lazy else ""
        names = f" {', '.join(self.names)}" if self.names else ""
        return f"{self.source}:{self.line} -> {self.target}{names}{lazy}"


@dataclass
class Graph:
    modules: dict[str, Path]
    imports: list[Import] = field(default_factory=list)
    shims: list[Import] = field(default_factory=list)
    private_attrs: list[tuple[str, int, str, str]] = field(default_factory=list)
    defined: dict[str, set[str]] = field(default_factory=dict)  # module -> its top-level names
    lazy: set[str] = field(default_factory=set)  # modules with a ``__getattr__`` (shims)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _resolve(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _ancestors(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> Iterator[ast.AST]:
    while node in parents:
        node = parents[node]
        yield node


def scan(root: Path) -> Graph:
    """Every import between modules of the package at ``root``."""
    g = Graph({module_name(p, root): p for p in sorted(root.rglob("*.py"))})
    for mod, path in g.modules.items():
        text = path.read_text()
        lines, tree = text.splitlines(), ast.parse(text)
        parents, is_pkg = _parents(tree), path.name == "__init__.py"
        aliases: dict[str, str] = {}  # local name -> branchlens module it is bound to
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            up = list(_ancestors(node, parents))
            if any(isinstance(a, ast.If) and "TYPE_CHECKING" in ast.unparse(a.test) for a in up):
                continue
            funcs = [a for a in up if isinstance(a, (ast.FunctionDef, ast.AsyncFunctionDef))]
            shim = (any(f.name == "__getattr__" for f in funcs) or
                    any(SHIM_MARK in ln for ln in lines[node.lineno - 1:node.end_lineno]))
            for imp, local in _imports(node, mod, is_pkg, g.modules, bool(funcs)):
                (g.shims if shim else g.imports).append(imp)
                if not imp.names and local:
                    aliases[local] = imp.target
        g.defined[mod] = set(_top_level_names(tree.body))
        if "__getattr__" in g.defined[mod]:
            g.lazy.add(mod)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr)):
                g.private_attrs.append((mod, node.lineno, aliases[node.value.id], node.attr))
    return g


def _imports(node: ast.Import | ast.ImportFrom, mod: str, is_pkg: bool,
             modules: dict[str, Path], lazy: bool) -> Iterator[tuple[Import, str]]:
    """(import, the local name a module import binds) per branchlens module ``node`` reads."""
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.name.split(".")[0] == PACKAGE:
                yield Import(mod, a.name, [], node.lineno, lazy), a.asname or ""
        return
    target = _resolve(mod, is_pkg, node.level, node.module)
    if target.split(".")[0] != PACKAGE:
        return
    names = []
    for a in node.names:
        if f"{target}.{a.name}" in modules:  # `from pkg import submodule`
            yield (Import(mod, f"{target}.{a.name}", [], node.lineno, lazy),
                   a.asname or a.name)
        else:
            names.append(a.name)
    if names:
        yield Import(mod, target, names, node.lineno, lazy), ""


def _top_level_names(body: list[ast.stmt]) -> Iterator[str]:
    """Names a module binds when it runs (inside ``if``/``try`` too), not in functions."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            yield from ((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            yield from (n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for part in ("body", "orelse", "finalbody", "handlers"):
                for sub in getattr(node, part, []):
                    yield from _top_level_names(sub.body if isinstance(sub, ast.ExceptHandler)
                                                else [sub])


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


# -- the measures -----------------------------------------------------------------------------

def unit_graph(g: Graph) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for i in g.imports:
        if unit(i.source) != unit(i.target):
            out[unit(i.source)].add(unit(i.target))
    return out


def module_graph(g: Graph) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for i in g.imports:
        if i.source != i.target and i.target in g.modules:
            out[i.source].add(i.target)
    return out


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of size > 1 (Tarjan, iterative)."""
    nodes = sorted(set(graph) | {v for vs in graph.values() for v in vs})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    groups: list[list[str]] = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                group = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    group.append(w)
                    if w == v:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def elementary_cycles(graph: dict[str, set[str]], limit: int = 100000) -> list[list[str]]:
    """Each simple cycle once, rooted at its smallest node (plain DFS; the graph is small)."""
    nodes = sorted(set(graph) | {v for vs in graph.values() for v in vs})
    order = {n: k for k, n in enumerate(nodes)}
    found: list[list[str]] = []

    def walk(start: str, v: str, path: list[str]) -> None:
        for w in sorted(graph.get(v, ())):
            if len(found) >= limit:
                return
            if w == start:
                found.append(path[:])
            elif w not in path and order[w] > order[start]:
                walk(start, w, [*path, w])

    for s in nodes:
        walk(s, s, [s])
    return found


def upward(g: Graph) -> tuple[list[Import], list[str]]:
    """Imports against the layer list, and the units the list does not place."""
    ups, unplaced = [], set()
    for i in g.imports:
        a, b = unit(i.source), unit(i.target)
        if a == b:
            continue
        if a not in ROW or b not in ROW:
            unplaced |= {u for u in (a, b) if u not in ROW}
        elif ROW[b] < ROW[a]:
            ups.append(i)
    return ups, sorted(unplaced)


def private_names(g: Graph) -> list[str]:
    """``from m import _x`` and ``m._x`` across modules."""
    out = [f"{i.source}:{i.line} <- {i.target}.{n}" for i in g.imports for n in i.names
           if _private(n) and i.source != i.target]
    out += [f"{m}:{line} <- {t}.{a} (attribute)" for m, line, t, a in g.private_attrs if m != t]
    return out


def through_shims(g: Graph) -> list[str]:
    """Imports of a name that its module only hands out from ``__getattr__`` (a shim)."""
    return [f"{i.source}:{i.line} <- {i.target}.{n}" for i in g.imports for n in i.names
            if i.target in g.lazy and n not in g.defined[i.target] and n != "*"]


def measure(root: Path) -> dict:
    g = scan(root)
    units = unit_graph(g)
    pairs = sorted({tuple(sorted((a, b))) for a in units for b in units[a]
                    if a in units.get(b, ())})
    ups, unplaced = upward(g)
    return {
        "modules": len(g.modules),
        "imports": len(g.imports),
        "unit_cycle_groups": strongly_connected(units),
        "unit_elementary_cycles": elementary_cycles(units),
        "two_way_unit_pairs": [list(p) for p in pairs],
        "module_cycle_groups": strongly_connected(module_graph(g)),
        "upward": [i.where() for i in ups],
        "upward_unit_pairs": sorted({f"{unit(i.source)} -> {unit(i.target)}" for i in ups}),
        "unplaced_units": unplaced,
        "private_across_modules": private_names(g),
        "shims": [i.where() for i in g.shims],
        "imports_through_shims": through_shims(g),
    }


COUNTS = (("unit_cycle_groups", "cyclic groups between units (strongly connected, size > 1)"),
          ("unit_elementary_cycles", "elementary cycles between units"),
          ("two_way_unit_pairs", "two-way unit pairs"),
          ("module_cycle_groups", "cyclic groups between modules"),
          ("upward", "upward import statements"),
          ("upward_unit_pairs", "upward unit pairs"),
          ("private_across_modules", "private names imported across modules"),
          ("shims", "shim imports (deprecated re-exports, not counted above)"),
          ("imports_through_shims", "imports of a name through a shim"),
          ("unplaced_units", "units missing from the layer list"))
FAILING = ("unit_cycle_groups", "module_cycle_groups", "upward", "private_across_modules",
           "unplaced_units")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", nargs="?", default=str(Path(__file__).resolve().parents[1] / "src"
                                                  / PACKAGE))
    ap.add_argument("--check", action="store_true", help="exit 1 on a cycle, upward or private")
    ap.add_argument("--json", action="store_true", help="print the measures as JSON")
    args = ap.parse_args(argv)
    res = measure(Path(args.src))
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"{res['modules']} modules, {res['imports']} imports between them")
        for key, label in COUNTS:
            print(f"{label}: {len(res[key])}")
            for item in res[key][:60]:
                print(f"    {' -> '.join(item) if isinstance(item, list) else item}")
    return int(args.check and any(res[k] for k in FAILING))


if __name__ == "__main__":
    sys.exit(main())
