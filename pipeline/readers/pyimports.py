"""Order a repository's files so that a Python module follows the in-repo modules it imports.

Imports are read with `ast` and resolved to files of the repository (absolute imports against the
repository root, `src/`, the folders holding top-level packages and a script's own folder; relative
imports against the importing file's package). The order is a stable topological sort (Kahn) with the
path as tie-break, so files without dependencies stay in path order; an import cycle is broken by
releasing the smallest path of a cycle that nothing outside it still waits on.
"""

from __future__ import annotations

import ast
import heapq
import posixpath
import warnings
from collections.abc import Iterable


class ModuleIndex:
    """Which repository files a dotted module name can refer to.

    `root_package`: the import name of the repository folder itself when it is a package (a folder
    like `requests/` read as the repository), so `import requests.utils` resolves inside it.
    """

    def __init__(self, paths: Iterable[str], root_package: str | None = None) -> None:
        self.files = {p for p in paths if p.endswith(".py")}
        self.root_package = root_package if "__init__.py" in self.files else None
        self.dirs: set[str] = set()
        for p in self.files:
            d = posixpath.dirname(p)
            while d:
                self.dirs.add(d)
                d = posixpath.dirname(d)
        self.roots = self._roots()

    def _is_package(self, d: str) -> bool:
        return posixpath.join(d, "__init__.py") in self.files

    def _roots(self) -> list[str]:
        roots = {""}
        if "src" in self.dirs:
            roots.add("src")
        for d in self.dirs:  # the folder holding a top-level package is an import root
            parent = posixpath.dirname(d)
            if self._is_package(d) and not (parent and self._is_package(parent)):
                roots.add(parent)
        return sorted(roots)

    def module_file(self, base: str, parts: list[str]) -> str | None:
        """The file of module `parts` under folder `base`: a .py file or a package's __init__.py."""
        stem = posixpath.join(base, *parts) if parts else base
        if parts and stem + ".py" in self.files:
            return stem + ".py"
        init = posixpath.join(stem, "__init__.py")
        return init if init in self.files else None

    def _exists(self, base: str, parts: list[str]) -> bool:
        stem = posixpath.join(base, *parts)
        return self.module_file(base, parts) is not None or stem in self.dirs  # namespace packages too

    def resolve_absolute(self, importer: str, parts: list[str]) -> str | None:
        if self.root_package is not None and parts[0] == self.root_package:
            return self._deepest("", parts[1:], shallowest=0)
        here = posixpath.dirname(importer)
        bases = ([] if self._is_package(here) else [here]) + self.roots
        for base in bases:
            if self._exists(base, parts[:1]):
                return self._deepest(base, parts, shallowest=1)
        return None

    def resolve_relative(self, importer: str, level: int, parts: list[str]) -> str | None:
        base = posixpath.dirname(importer)
        for _ in range(level - 1):
            if not base:
                return None  # climbs out of the repository
            base = posixpath.dirname(base)
        return self._deepest(base, parts, shallowest=0)

    def _deepest(self, base: str, parts: list[str], shallowest: int) -> str | None:
        """The most specific existing module along `parts` (a.b.c may name an attribute c of a.b).

        `shallowest=0` lets a relative import fall back to the package `base` itself.
        """
        for k in range(len(parts), shallowest - 1, -1):
            f = self.module_file(base, parts[:k])
            if f is not None:
                return f
        return None


def imports_of(path: str, source: str, index: ModuleIndex) -> set[str]:
    """Repository files that `path` imports; a file that does not parse imports nothing."""
    try:
        with warnings.catch_warnings():  # e.g. SyntaxWarning for invalid escapes: not ours to report
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=path)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return set()
    deps: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                _add(deps, index.resolve_absolute(path, alias.name.split(".")))
        elif isinstance(node, ast.ImportFrom):
            parts = node.module.split(".") if node.module else []
            for alias in node.names:
                # `from pkg import name` imports the submodule pkg.name when there is one
                sub = None if alias.name == "*" else [*parts, alias.name]
                if node.level:
                    found = index.resolve_relative(path, node.level, sub) if sub else None
                    _add(deps, found or index.resolve_relative(path, node.level, parts))
                else:
                    found = index.resolve_absolute(path, sub) if sub else None
                    _add(deps, found or (index.resolve_absolute(path, parts) if parts else None))
    deps.discard(path)
    return deps


def _add(deps: set[str], f: str | None) -> None:
    if f is not None:
        deps.add(f)


def dependency_order(paths: list[str], deps: dict[str, set[str]]) -> list[str]:
    """Every path once; each after its dependencies where cycles allow; ties in path order."""
    nodes = set(paths)
    waits_on = {p: {d for d in deps.get(p, ()) if d in nodes and d != p} for p in paths}
    needed_by: dict[str, list[str]] = {p: [] for p in paths}
    for p, ds in waits_on.items():
        for d in ds:
            needed_by[d].append(p)
    heap = [p for p, ds in waits_on.items() if not ds]
    heapq.heapify(heap)
    done: set[str] = set()
    order: list[str] = []
    while len(order) < len(paths):
        if not heap:
            heapq.heappush(heap, _cycle_breaker(nodes - done, waits_on))
        p = heapq.heappop(heap)
        if p in done:
            continue
        done.add(p)
        order.append(p)
        for q in needed_by[p]:
            w = waits_on[q]
            w.discard(p)
            if not w and q not in done:
                heapq.heappush(heap, q)
    return order


def _cycle_breaker(remaining: set[str], waits_on: dict[str, set[str]]) -> str:
    """The smallest path in a cycle that waits on nothing outside its own strongly connected component."""
    comps = strongly_connected(sorted(remaining), {p: waits_on[p] & remaining for p in remaining})
    comp_of = {p: i for i, comp in enumerate(comps) for p in comp}
    sources = [
        comp
        for i, comp in enumerate(comps)
        if all(comp_of[d] == i for p in comp for d in waits_on[p] & remaining)
    ]
    return min(min(comp) for comp in sources)


def strongly_connected(nodes: list[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iterative (repositories can be deep)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(edges[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, succ = work[-1]
            if succ:
                w = succ.pop()
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, sorted(edges[w])))
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
                comps.append(comp)
    return comps
