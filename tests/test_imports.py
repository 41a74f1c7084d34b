"""How dropspy's modules import each other: no framework in the core, no import circle."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dropspy"
FRAMEWORK_MODULES = ("torch", "tensorflow", "keras", "tf_keras", "jax", "matplotlib")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _may_import_a_framework(module: str) -> bool:
    """Adapter packages, the shared Keras base and the framework callbacks import their
    framework; nothing else may (the protocols in frameworks/base.py and the callbacks' shared
    integrations/_base.py included)."""
    parts = module.split(".")
    return (module == "dropspy.frameworks.keras_base"
            or (len(parts) > 2 and parts[1] in ("frameworks", "integrations")
                and parts[2] not in ("base", "_base")))


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The dropspy modules ``module`` imports at run time, at top level or inside functions.

    ``if TYPE_CHECKING:`` blocks are left out: they never run. ``from pkg import name`` counts as
    an import of ``pkg.name`` when that is a module, else of ``pkg``.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "dropspy":
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] == "dropspy":
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    found.add(sub if sub in known else source)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    found.discard(module)
    return found & known


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_import_walker_sees_relative_lazy_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "dropspy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from dropspy import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from dropspy import a\n"
                              "else:\n    from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("import dropspy.a\n")
    known = {"dropspy", "dropspy.a", "dropspy.b", "dropspy.sub", "dropspy.sub.c"}
    graph = {
        name: _imports(name, path, known) for name, path in {
            "dropspy.a": pkg / "a.py", "dropspy.b": pkg / "b.py",
            "dropspy.sub": pkg / "sub" / "__init__.py", "dropspy.sub.c": pkg / "sub" / "c.py",
        }.items()
    }
    assert graph == {"dropspy.a": {"dropspy.b"}, "dropspy.b": {"dropspy.sub.c"},
                     "dropspy.sub": {"dropspy.sub.c"}, "dropspy.sub.c": {"dropspy.a"}}
    assert _circles(graph) == [["dropspy.a", "dropspy.b", "dropspy.sub.c"]]


def test_no_import_circle_between_dropspy_modules():
    graph = _graph()
    assert len(graph) > 30, "the walker found too few modules to prove anything"
    assert _circles(graph) == []


def test_the_analysis_never_imports_the_reader_or_the_writer():
    graph = _graph()
    analysis = [m for m in graph if m == "dropspy.analysis" or m.startswith("dropspy.analysis.")]
    assert analysis
    for module in analysis:
        assert not graph[module] & {"dropspy.store", "dropspy.writer"}, module


def test_adapters_import_the_vocabulary_not_the_writer_or_the_reader():
    graph = _graph()
    adapters = [m for m in graph if m.startswith("dropspy.frameworks.")]
    for module in adapters:
        assert not graph[module] & {"dropspy.store", "dropspy.writer"}, module


def test_import_dropspy_and_every_core_module_imports_no_framework():
    core = sorted(m for m in _modules() if not _may_import_a_framework(m)
                  and m not in ("dropspy.__main__",))
    assert {"dropspy", "dropspy.frameworks", "dropspy.frameworks.base", "dropspy.cli",
            "dropspy.store", "dropspy.analysis.rules", "dropspy.integrations",
            "dropspy.integrations._base"} <= set(core)
    code = (f"import importlib, sys\nfor m in {core!r}:\n    importlib.import_module(m)\n"
            f"print(','.join(m for m in {FRAMEWORK_MODULES!r} if m in sys.modules))\n")
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""


def test_core_modules_reach_framework_packages_only_through_the_registry():
    # Function-level imports count: the subprocess test above cannot see those.
    graph = _graph()
    for module, deps in graph.items():
        if not _may_import_a_framework(module):
            assert not {d for d in deps if _may_import_a_framework(d)}, module
