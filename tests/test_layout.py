"""The layout shows the architecture (README "Architecture"): entry points in `harness/cli/`, the engine below
them, no import circles, and no engine module importing an entry point. Checked on the source with `ast`
(lazy imports inside functions count too: they are circles all the same)."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / "harness").rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _resolve(name: str, mods: dict) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in mods:
            return ".".join(parts[:i])
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the harness modules it imports (module level or inside functions)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package
                    base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # `from pkg import sub` is an import of the module pkg.sub; `from mod import name`, of mod
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names]
            else:
                continue
            for t in targets:
                if t.startswith("harness"):
                    r = _resolve(t, mods)
                    if r and r != name:
                        deps.add(r)
        graph[name] = deps
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_the_checker_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_engine_never_imports_an_entry_point():
    graph = import_graph()
    bad = {m: sorted(d for d in deps if d == "harness.cli" or d.startswith("harness.cli."))
           for m, deps in graph.items() if not (m == "harness.cli" or m.startswith("harness.cli."))}
    assert {m: d for m, d in bad.items() if d} == {}


def test_every_console_script_is_a_small_module_of_harness_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) == 8
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        assert module.startswith("harness.cli."), (name, target)
        path = ROOT / (module.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text())
        assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, (name, target)
        assert len(path.read_text().splitlines()) < 400, f"{path} is not a small entry point"
    # and nothing but entry points lives there
    cli = {p.stem for p in (ROOT / "harness" / "cli").glob("*.py")} - {"__init__", "__main__", "common"}
    assert cli == {t.partition(":")[0].rpartition(".")[2] for t in scripts.values()}
