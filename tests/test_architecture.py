"""The package has no import cycles, neither at module level nor through imports inside functions.

Every ``import`` / ``from ... import`` statement anywhere in a module (``ast.walk``, so function bodies count) is an
edge to the deformattn module it names; ``from pkg import name`` points at ``pkg.name`` when that is a module, else at
``pkg``. A strongly connected component with more than one module is a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import deformattn

PACKAGE_DIR = Path(deformattn.__file__).resolve().parent


def _modules(root: Path) -> dict[str, tuple[Path, list[str]]]:
    """Dotted module name -> (file, the package that relative imports start from)."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            package = parts
        else:
            package = parts[:-1]
        mods[".".join(parts)] = (path, package)
    return mods


def import_graph(root: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    mods = _modules(root)
    edges: dict[str, set[str]] = {name: set() for name in mods}
    for name, (path, package) in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            edges[name].update(t for t in targets if t in mods and t != name)
    return edges


def strongly_connected_components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in no particular order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
    return out


def test_graph_sees_function_level_and_relative_imports():
    edges = import_graph()
    assert len(edges) > 40
    # module-level relative import
    assert "deformattn.attention" in edges["deformattn.models.dat"]
    # `from . import dat` resolves to the submodule, not the package
    assert "deformattn.models.dat" in edges["deformattn.models.registry"]
    # function-level import (timm is optional, so registry imports _timm inside timm_register)
    assert "deformattn.models._timm" in edges["deformattn.models.registry"]


def test_cycle_detector_finds_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert [c for c in strongly_connected_components(edges) if len(c) > 1] == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = [c for c in strongly_connected_components(import_graph()) if len(c) > 1]
    assert not cycles, f"import cycles in deformattn: {cycles}"


def test_every_public_name_exists():
    """Each core module's ``__all__`` names only what the module defines (``from m import *`` must not fail).
    Modules behind optional extras (export, train, viz, timm glue) are left out: importing them needs the extras."""
    import importlib

    optional = ("deformattn.export", "deformattn.train", "deformattn.viz", "deformattn.models._timm")
    root = Path(deformattn.__file__).parent
    missing, checked = [], 0
    for path in sorted(root.rglob("*.py")):
        name = ".".join(("deformattn",) + path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        if name.startswith(optional) or name.endswith("__main__"):
            continue
        module = importlib.import_module(name)
        checked += 1
        missing += [f"{name}.{n}" for n in getattr(module, "__all__", ()) if not hasattr(module, n)]
    assert checked > 10 and missing == []
