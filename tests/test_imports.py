"""The import graph of `pipeline/`, `schemas/` and `flows/`: no circles, and imports point one way.

Read with `ast` (nothing is imported), so imports inside functions count as much as top-level ones:
a lazy import hides a circle from Python, not from a reader. Direction: `schemas/` is the bottom
(configs and records), `pipeline/` the library, `flows/` the Prefect wiring on top; `pipeline/` and
`schemas/` never import `flows/` or Prefect, `schemas/` never imports `pipeline/`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "schemas", "flows")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def import_statements(path: Path, name: str) -> list[tuple[str, list[str]]]:
    """(module, names taken from it) of every import in `path`, wherever it is (relative ones resolved)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            found.append((mod, [a.name for a in node.names]))
    return found


def imported_names(path: Path, name: str) -> set[str]:
    """Every module name `path` imports; `from pkg import sub` also names the submodule pkg.sub."""
    out: set[str] = set()
    for mod, names in import_statements(path, name):
        out.add(mod)
        out.update(f"{mod}.{n}" for n in names)
    return out


def graph() -> dict[str, set[str]]:
    """module -> the modules of this repository it imports.

    `from pkg import sub_a, sub_b` where every name is a submodule is an edge to the submodules only:
    it runs `pkg/__init__.py` the way any import of `pkg.x` does, which is not counted either (else every
    package that re-exports its submodules would be a circle with each of them).
    """
    modules = all_modules()
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for mod, names in import_statements(path, name):
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
            targets.update(subs)
            if mod in modules and (not names or len(subs) < len(names)):
                targets.add(mod)
        targets.discard(name)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_lazy_imports_and_circles(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from pipeline.x import y\n    import prefect.flows\n")
    assert {"pipeline.x", "pipeline.x.y", "prefect.flows"} <= imported_names(f, "pipeline.m")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles() -> None:
    found = cycles(graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_imports_point_one_way() -> None:
    bad: list[str] = []
    for name, path in all_modules().items():
        top = name.split(".")[0]
        for imp in imported_names(path, name):
            head = imp.split(".")[0]
            if top in ("pipeline", "schemas") and head in ("flows", "prefect", "prefect_dask"):
                bad.append(f"{name} imports {imp}")
            if top == "schemas" and head == "pipeline":
                bad.append(f"{name} imports {imp}")
    assert not bad, "\n".join(sorted(bad))


def test_only_the_executors_import_the_stages() -> None:
    """Stages sit on top of the library: the corpus, synthesis and output packages read the stages'
    result records from `pipeline.core.results`, never from a stage module."""
    allowed = ("pipeline.stages", "pipeline.build", "flows")
    bad: list[str] = []
    for name, path in all_modules().items():
        if name == "pipeline.stages" or name.startswith(allowed):
            continue
        bad += [
            f"{name} imports {imp}" for imp in imported_names(path, name) if imp.startswith("pipeline.stages")
        ]
    assert not bad, "\n".join(sorted(bad))
