"""The package's shape, checked from its source: no import circle between its modules (function-level
imports included: a lazy import still ties two modules together), no module importing another's
private names, and the library apart from the demo."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "clip_benchmark_diffusion"
NAME = PACKAGE.name


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement in ``path``, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, names in _imports(path):
            if not target.startswith(NAME):
                continue
            # "from pkg import module" imports the module; "from module import name" the module itself.
            candidates = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules] or [target]
            graph[name].update(c for c in candidates if c in modules and c != name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's ``__init__`` re-exporting its submodules (lazily) is not a dependency of theirs on it."""
    inits = {m for m in graph if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").is_file()}
    return {m: {t for t in targets if t not in inits or m in inits} for m, targets in graph.items()}


def test_the_package_has_no_import_circle():
    assert _cycles(_without_package_inits(_graph())) == []


def test_the_circle_check_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for target, names in _imports(path):
            if target.startswith(NAME) and target != _module_name(path):
                offenders += [f"{_module_name(path)}: {target}.{n}" for n in names
                              if n.startswith("_") and not n.startswith("__")]
    assert offenders == []


@pytest.mark.parametrize("needle", ["clip_benchmark_diffusion_demo", "demo:"])
def test_the_library_does_not_know_the_demo_by_name(needle):
    mentions = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
                if needle in p.read_text(encoding="utf-8") and p.name != "hookspecs.py"]
    assert mentions == []


FACADE_MUST_NOT_IMPORT = (f"{NAME}.results", f"{NAME}.distributed", f"{NAME}.registry")


def _forbidden_in_facade(source: str) -> list[str]:
    """The modules of ``FACADE_MUST_NOT_IMPORT`` (or below them) that ``source`` imports, at any depth;
    ``from package import module`` counts as importing the module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return sorted({m for m in found if m.startswith(FACADE_MUST_NOT_IMPORT)})


def test_the_classifier_is_a_facade_over_collaborators_it_is_handed():
    """adapter/model.py registers what the loader builds: it imports no part of the results package (store,
    leases, keys, checkpoints), no process-group set-up and no registry, and stays about 200 lines."""
    source = (PACKAGE / "adapter" / "model.py").read_text(encoding="utf-8")
    assert _forbidden_in_facade(source) == []
    assert len(source.splitlines()) <= 250


def test_the_facade_check_sees_a_forbidden_import():
    source = (f"from {NAME} import distributed\nimport {NAME}.results.store\n"
              f"def f():\n    from {NAME}.registry import resolve\nfrom {NAME}.errors import UserError\n")
    assert _forbidden_in_facade(source) == [f"{NAME}.distributed", f"{NAME}.registry", f"{NAME}.registry.resolve",
                                            f"{NAME}.results.store"]
