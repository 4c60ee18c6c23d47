"""The package's floor plan: no module imports one that imports it back, directly or through
others (imports inside functions included), so the layers read from the bottom up."""

from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

PKG = pathlib.Path(__file__).resolve().parent.parent / "mlx_gdn"


def _graph() -> dict:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    edges = defaultdict(set)
    for name, f in mods.items():
        pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
                targets = subs or ([mod] if mod in mods else [])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name in mods]
            else:
                continue
            edges[name].update(t for t in targets if t != name)
    return mods, edges


def test_no_import_cycles():
    mods, edges = _graph()
    state = {}  # name -> 1 while on the current path, 2 when done

    def visit(n, path):
        state[n] = 1
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                cycle = path[path.index(m):] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in sorted(mods):
        if n not in state:
            visit(n, [n])
    assert len(mods) > 20  # the scan saw the package


def test_a_planted_cycle_is_found(monkeypatch):
    # The check itself must be able to fail: a module importing its importer is reported.
    mods, edges = _graph()
    edges["mlx_gdn.validate"].add("mlx_gdn.api")
    monkeypatch.setitem(globals(), "_graph", lambda: (mods, edges))
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "import cycle" in str(e)
    else:
        raise AssertionError("a planted cycle was not found")
